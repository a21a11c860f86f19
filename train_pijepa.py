"""Pretrain PI-JEPA (I-JEPA on a latent pyramid) with HF Accelerate: one GPU, several, or the CPU.

    python train_pijepa.py --dataset digits --epochs 2 --out out/pi-demo      # offline CPU demo
    accelerate launch train_pijepa.py --epochs 10 --dataset cifar100 --out out/pi
    accelerate launch train_pijepa.py --dataset cifar10 --levels 2 --pyramid-masking full_resampling
    python evaluate_embeddings.py --ckpt out/pi

Same loop, flags and output folder as train_ijepa.py (train_ijepa.train), plus the "pyramid" flags. The
target encoder's layer-normed tokens are pooled 2 x 2 level by level into a latent pyramid (level l has
(G / 2^l)^2 cells); the context encoder runs once on the visible fine patches and a coarse context token
is the mean of its outputs inside a cell; one predictor, with a position embedding at each cell's centre
plus a learned level embedding, predicts each target block at every level from the context of every
level. No fine patch under any target cell of any level is visible. With --levels 1 this is I-JEPA,
computed by the same code. Definitions: models.PyramidIJEPA, masks.PyramidMaskSampler, README "PI-JEPA".
Results: RESULTS.md.
"""

import torch

from common import as_user_error, exit_on_user_error
from data import UserError
from masks import PYRAMID_STRATEGIES, PyramidMaskSampler
from models import check_pyramid_levels, PyramidIJEPA
from settings import non_negative_float, positive_int
from train_ijepa import build_parser, encoder_config, parse_args, predictor_config, train  # the loop it reuses

MOST_LEVELS = 3  # the default number of levels is at most this


def build_pyramid_parser():
    p = build_parser(__doc__)
    p.set_defaults(out="out/pijepa")
    g = p.add_argument_group("pyramid")
    g.add_argument("--levels", type=positive_int, help="pyramid levels (default: as many as keep at least 2x2 "
                   f"cells, at most {MOST_LEVELS}); 1 is I-JEPA")
    g.add_argument("--pyramid-masking", default="full_downsampling", choices=PYRAMID_STRATEGIES,
                   help="which levels carry targets and how they are drawn (see masks.PyramidMaskSampler)")
    g.add_argument("--pool-threshold", type=float, default=0.5, help="full_downsampling/coarse_only: a coarse "
                   "cell is a target when at least this fraction of its fine patches lie in the block")
    g.add_argument("--level-weights", type=non_negative_float, nargs="+", help="loss weight per level "
                   "(default: 1 each)")
    g.add_argument("--predict-per", default="block", choices=("block", "sample"), help="one predictor "
                   "sequence per target block (I-JEPA's way) or one per sample holding all blocks")
    return p


def default_levels(grid_size):
    """As many levels as keep at least 2 x 2 cells at the coarsest, at most MOST_LEVELS."""
    levels = 1
    while levels < MOST_LEVELS and grid_size % 2**levels == 0 and grid_size // 2**levels >= 2:
        levels += 1
    return levels


def finish_pyramid_args(args):
    i_jepa_only = [flag for flag, on in (("--predictor mlp", args.predictor == "mlp"),
                                         ("--vicreg-weight", args.vicreg_weight), ("--cycle-weight", args.cycle_weight),
                                         ("--target-scale-schedule", args.target_scale_schedule)) if on]
    if i_jepa_only:
        raise UserError(f"{', '.join(i_jepa_only)}: I-JEPA options (train_ijepa.py), not implemented for the "
                        "pyramid; drop them")
    grid = args.image_size // args.patch_size
    args.levels = args.levels or default_levels(grid)
    as_user_error(check_pyramid_levels, grid, args.levels)
    if not 0 < args.pool_threshold <= 1:
        raise UserError(f"--pool-threshold must lie in (0, 1], got {args.pool_threshold}")
    args.level_weights = list(args.level_weights or [1.0] * args.levels)
    if len(args.level_weights) != args.levels:
        raise UserError(f"--level-weights has {len(args.level_weights)} values for {args.levels} levels; "
                        "give one weight per level")


def build_model(args):
    encoder_cfg = encoder_config(args)
    return as_user_error(PyramidIJEPA, encoder_cfg, predictor_config(args, encoder_cfg, levels=args.levels),
                         loss=args.loss, level_weights=args.level_weights, predict_per=args.predict_per)


def build_mask_sampler(args, grid_size):
    return as_user_error(PyramidMaskSampler, grid_size, levels=args.levels, strategy=args.pyramid_masking,
                         pool_threshold=args.pool_threshold, num_targets=args.num_targets,
                         target_scale=args.target_scale, target_aspect=args.target_aspect,
                         context_scale=args.context_scale, min_keep=args.min_keep, num_context=args.num_context)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv, build_pyramid_parser())
    finish_pyramid_args(args)
    torch.manual_seed(args.seed)
    model = build_model(args)
    train(args, model, build_mask_sampler(args, model.encoder.cfg.grid_size), script="train_pijepa")


if __name__ == "__main__":
    main()

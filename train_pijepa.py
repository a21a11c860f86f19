"""Pretrain PI-JEPA (I-JEPA on a latent pyramid) with HF Accelerate: one GPU, several, or the CPU.

    python train_pijepa.py --dataset digits --epochs 2 --out out/pi-demo      # offline CPU demo
    accelerate launch train_pijepa.py --epochs 10 --dataset cifar100 --out out/pi
    accelerate launch train_pijepa.py --dataset cifar10 --levels 2 --pyramid-masking full_resampling
    python evaluate_embeddings.py --ckpt out/pi

Same loop, flags and output folder as train_ijepa.py (train_ijepa.train), plus the "pyramid" flags. Level l
of the latent pyramid is the image downsampled 2^l times, encoded by the same encoder on its own (G/2^l)^2
token grid: the context encoder sees each level's context cells; coarse targets are 2x2 pools of the EMA
target encoder's fine tokens (or, with --coarse-targets encoded, its encoding of each coarse image; README
"PI-JEPA" measures both). One predictor, with a
position embedding at each cell's centre plus a learned level embedding, predicts each target block at
every level from the context of every level. --pyramid-masking decides what each scale shows and hides
(full_downsampling: a target is hidden at every scale; full_resampling: independent masks per scale;
coarse_only / fine_only: targets at one side only, the other side's view is context). The fine level's
context and target sizes equal train_ijepa.py's under the same mask flags, and target blocks are whole.
With --levels 1 this is I-JEPA, computed by the same code. Definitions: models.PyramidIJEPA,
masks.PyramidMaskSampler, README "PI-JEPA". Results: RESULTS.md.
"""

import torch

from common import as_user_error, exit_on_user_error
from data import UserError
from masks import PYRAMID_STRATEGIES, PyramidMaskSampler
from models import check_pyramid_levels, COARSE_TARGETS, PyramidIJEPA
from settings import non_negative_float, positive_int
from train_ijepa import build_parser, encoder_config, parse_args, predictor_config, train  # the loop it reuses

MOST_LEVELS = 3  # the default number of levels is at most this
COARSEST_GRID = 4  # ... and keeps the coarsest grid at least this wide (8x8 -> 2 levels, 16x16 -> 3)


def build_pyramid_parser():
    p = build_parser(__doc__)
    p.set_defaults(out="out/pijepa")
    g = p.add_argument_group("pyramid")
    g.add_argument("--levels", type=positive_int, help="pyramid levels (default: as many as keep the coarsest "
                   f"grid at least {COARSEST_GRID}x{COARSEST_GRID}, at most {MOST_LEVELS}); 1 is I-JEPA")
    g.add_argument("--pyramid-masking", default="full_downsampling", choices=PYRAMID_STRATEGIES,
                   help="which levels carry targets and how they are drawn (see masks.PyramidMaskSampler)")
    g.add_argument("--coarse-targets", default="pooled", choices=COARSE_TARGETS, help="coarse target tokens: 2x2 "
                   "pools of the fine target tokens (pooled) or the target encoder on the downsampled image "
                   "(encoded); README 'PI-JEPA' has the measurement behind the default")
    g.add_argument("--level-weights", type=non_negative_float, nargs="+", help="loss weight per level "
                   "(default: 1 each)")
    g.add_argument("--predict-per", default="block", choices=("block", "sample"), help="one predictor "
                   "sequence per target block (I-JEPA's way) or one per sample holding all blocks")
    return p


def default_levels(grid_size):
    """As many levels as keep the coarsest grid at least COARSEST_GRID wide, at most MOST_LEVELS: a 2x2
    grid is too coarse to hold a target block and context apart."""
    levels = 1
    while levels < MOST_LEVELS and grid_size % 2**levels == 0 and grid_size // 2**levels >= COARSEST_GRID:
        levels += 1
    return levels


def finish_pyramid_args(args):
    i_jepa_only = [flag for flag, on in (("--predictor mlp", args.predictor == "mlp"),
                                         ("--cycle-weight", args.cycle_weight),
                                         ("--target-scale-schedule", args.target_scale_schedule)) if on]
    if i_jepa_only:
        raise UserError(f"{', '.join(i_jepa_only)}: I-JEPA options (train_ijepa.py), not implemented for the "
                        "pyramid; drop them")
    grid = args.image_size // args.patch_size
    args.levels = args.levels or default_levels(grid)
    as_user_error(check_pyramid_levels, grid, args.levels)
    args.level_weights = list(args.level_weights or [1.0] * args.levels)
    if len(args.level_weights) != args.levels:
        raise UserError(f"--level-weights has {len(args.level_weights)} values for {args.levels} levels; "
                        "give one weight per level")


def build_model(args):
    encoder_cfg = encoder_config(args)
    return as_user_error(PyramidIJEPA, encoder_cfg, predictor_config(args, encoder_cfg, levels=args.levels),
                         loss=args.loss, level_weights=args.level_weights, predict_per=args.predict_per,
                         coarse_targets=args.coarse_targets, vicreg_weight=args.vicreg_weight,
                         target_layers=args.target_layers)


def build_mask_sampler(args, grid_size):
    return as_user_error(PyramidMaskSampler, grid_size, levels=args.levels, strategy=args.pyramid_masking,
                         num_targets=args.num_targets,
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

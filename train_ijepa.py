"""Pretrain I-JEPA (Assran et al. 2023) with HF Accelerate: one GPU, several, or the CPU.

    python train_ijepa.py --dataset digits --epochs 2 --out out/demo          # offline CPU demo, ~1 min
    accelerate launch train_ijepa.py --dataset cifar10 --epochs 100 --out out/c10
    accelerate launch train_ijepa.py --config configs/cifar10_vit_tiny.yaml
    python train_ijepa.py --config in1k_vith14_ep300.yaml                    # an official I-JEPA yaml

A context encoder sees a large block of the image with the target blocks removed; a narrow predictor,
given mask tokens at the target positions, predicts the layer-normed representations that the EMA target
encoder gives those targets. The output folder (--out) holds config.json (every setting), model.safetensors
(encoder, target_encoder, predictor), metrics.jsonl and checkpoints/ (Accelerate save_state folders);
`python evaluate_embeddings.py --ckpt OUT` evaluates it. Results: RESULTS.md.

train_pijepa.py runs this same loop with the latent-pyramid objective.
"""

import argparse
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict

import torch
import yaml

from common import (ArgumentParser, as_user_error, atomic_save_safetensors, atomic_write_json, check_out_dir,
                    check_same_model, collapse_metrics, cosine_ramp, exit_on_user_error, latest_checkpoint,
                    linear_ramp, load_checkpoint, MetricsLog, one_line, param_groups, prepare_out_dir,
                    run_bytes_needed, save_checkpoint, set_optimizer_values, warmup_cosine)
from data import (eval_transform, InMemoryBatches, load_split, open_stream, Prefetcher, RandomResizedCropFlip,
                  seeded_sample, step_generator, StreamedBatches, UserError)
from masks import MultiBlockMaskSampler
from models import IJEPA, PredictorConfig, vit_config

# Per-dataset defaults: (image size, patch size).
DATASET_GEOMETRY = {"digits": (32, 4), "cifar10": (32, 4), "cifar100": (32, 4), "tiny-imagenet": (64, 8)}
MASK_SEED_OFFSET = 7_777  # masks and augmentations draw from separate per-step streams


# ----------------------------------------------------------------------------------------------------
# Settings


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser(description=__doc__):
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of settings (flag names, or the official I-JEPA sections)")

    g = add_dataset_arguments(p)
    g.add_argument("--image-size", type=positive_int, help="input size (default: 32 for digits/cifar, "
                   "64 for tiny-imagenet, else 224)")
    g.add_argument("--storage-size", type=positive_int, help="size images are decoded to for folders and hub "
                   "datasets (default: the image size, or 8/7 of it above 64 px)")
    g.add_argument("--max-per-class", type=positive_int, help="train on a seeded class-balanced subset")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.3, 1.0), help="random resized crop area")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flip")
    g.add_argument("--data-on-gpu", action=argparse.BooleanOptionalAction, default=True,
                   help="hold the uint8 split on the device and augment there")
    g.add_argument("--stream", action="store_true", help="imagefolder: decode images from disk in DataLoader "
                   "workers instead of holding the split in memory (datasets too large for memory)")
    g.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="--stream: decoding processes")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="tiny | small | base | large | huge | giant")
    g.add_argument("--patch-size", type=positive_int, help="default: 4 for 32 px, 8 for 64 px, else 16")
    g.add_argument("--depth", type=positive_int, help="override the preset's encoder depth")
    g.add_argument("--heads", type=positive_int, help="override the preset's encoder head count")
    g.add_argument("--patch-embed", default="strided", choices=("strided", "conv"))
    g.add_argument("--pred-dim", type=positive_int, help="predictor width (default: half the encoder's, "
                   "at most 384)")
    g.add_argument("--pred-depth", type=positive_int, default=6)
    g.add_argument("--pred-heads", type=positive_int, help="default: the encoder's head count")
    g.add_argument("--loss", default="smooth_l1", choices=("smooth_l1", "mse"))

    g = p.add_argument_group("masks")
    g.add_argument("--num-targets", type=positive_int, default=4)
    g.add_argument("--target-scale", type=float, nargs=2, default=(0.15, 0.2))
    g.add_argument("--target-aspect", type=float, nargs=2, default=(0.75, 1.5))
    g.add_argument("--context-scale", type=float, nargs=2, default=(0.85, 1.0))
    g.add_argument("--min-keep", type=positive_int, default=10)
    g.add_argument("--num-context", type=positive_int, help="fixed context length (default: 5th percentile)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=100)
    g.add_argument("--batch-size", type=positive_int, default=256, help="per process")
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--lr", type=non_negative_float, default=1e-3, help="peak learning rate")
    g.add_argument("--start-lr", type=non_negative_float, default=2e-4)
    g.add_argument("--final-lr", type=non_negative_float, default=1e-6)
    g.add_argument("--warmup-epochs", type=non_negative_float, default=10)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.04)
    g.add_argument("--final-weight-decay", type=non_negative_float, default=0.4)
    g.add_argument("--ema", type=float, nargs=2, default=(0.996, 1.0), help="EMA momentum start, end")
    g.add_argument("--grad-clip", type=non_negative_float, default=0.0, help="max grad norm (0: off)")
    g.add_argument("--skip-nonfinite", type=non_negative_int, default=0, metavar="N", help="skip up to N updates "
                   "whose loss or gradients are not finite, checked before each optimizer step (one host sync a step); "
                   "0: stop at the first, checked at log time")
    g.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help="default: accelerate's config (bf16 is the fast choice on GPUs)")

    g = add_run_arguments(p, "out/ijepa")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (static shapes: compiles once)")
    g.add_argument("--cuda-graphs", action="store_true", help="torch.compile with CUDA graphs (mode "
                   "reduce-overhead): for small models, where kernel launches dominate; CUDA only")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    return p


def add_dataset_arguments(parser):
    """The "data" flags that name and read a dataset, shared by the training scripts; returns the group."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help="digits | cifar10 | cifar100 | imagefolder:<dir|tar> | "
                   "tiny-imagenet:<dir|tar.gz> | hf:<hub id>")
    g.add_argument("--data-root", default="data", help="where cifar downloads and decoded-image caches go")
    g.add_argument("--image-column", help="hf: image column (default: found by type)")
    g.add_argument("--label-column", help="hf: label column (default: found by type)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images")
    return g


def add_run_arguments(parser, default_out):
    """The "run" flags every training script shares; returns the group for script-specific additions."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=default_out)
    g.add_argument("--resume", action="store_true", help="continue the run in --out (fresh if it has none)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    g.add_argument("--save-every", type=positive_int, default=1, help="epochs between checkpoints")
    g.add_argument("--monitor-size", type=positive_int, default=512, help="held-out images for the "
                   "per-epoch collapse monitor")
    g.add_argument("--max-steps", type=positive_int, help="stop after this many steps (smoke tests)")
    g.add_argument("--log-with", default=None, choices=("tensorboard",), help="an Accelerate tracker")
    return g


def make_accelerator(args, **kwargs):
    """The run's Accelerator. Several processes without CUDA (torch.distributed.run on CPU) need cpu=True
    for Accelerate to use gloo."""
    from accelerate import Accelerator

    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=args.mixed_precision, log_with=args.log_with, project_dir=args.out,
                       cpu=multi_cpu, **kwargs)


# Official I-JEPA yaml (sections data/mask/meta/optimization/logging) -> our flag names.
OFFICIAL_KEYS = {
    ("data", "batch_size"): "batch_size", ("data", "crop_size"): "image_size", ("data", "crop_scale"): "crop_scale",
    ("data", "use_horizontal_flip"): "flip", ("mask", "num_pred_masks"): "num_targets",
    ("mask", "pred_mask_scale"): "target_scale", ("mask", "enc_mask_scale"): "context_scale",
    ("mask", "aspect_ratio"): "target_aspect", ("mask", "min_keep"): "min_keep", ("mask", "patch_size"): "patch_size",
    ("meta", "pred_depth"): "pred_depth", ("meta", "pred_emb_dim"): "pred_dim", ("optimization", "epochs"): "epochs",
    ("optimization", "ema"): "ema", ("optimization", "lr"): "lr", ("optimization", "start_lr"): "start_lr",
    ("optimization", "final_lr"): "final_lr", ("optimization", "warmup"): "warmup_epochs",
    ("optimization", "weight_decay"): "weight_decay", ("optimization", "final_weight_decay"): "final_weight_decay",
    ("logging", "folder"): "out",
}
# Official keys that describe their cluster set-up or features we do differently; read and ignored.
OFFICIAL_IGNORED = {("data", "num_workers"), ("data", "pin_mem"), ("data", "color_jitter_strength"),
                    ("data", "use_color_distortion"), ("data", "use_gaussian_blur"), ("meta", "copy_data"),
                    ("meta", "load_checkpoint"), ("meta", "read_checkpoint"), ("logging", "write_tag"),
                    ("optimization", "ipe_scale"), ("mask", "num_enc_masks"), ("mask", "allow_overlap")}


def official_to_flags(sections):
    flags, unknown = {}, []
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping")
        for key, value in values.items():
            if (section, key) in OFFICIAL_KEYS:
                flags[OFFICIAL_KEYS[section, key]] = value
            elif (section, key) == ("meta", "model_name"):
                flags["model"] = str(value).removeprefix("vit_")
            elif (section, key) == ("meta", "use_bfloat16"):
                flags["mixed_precision"] = "bf16" if value else "no"
            elif (section, key) == ("data", "root_path"):
                flags["dataset"] = "imagefolder:" + os.path.join(str(value), str(values.get("image_folder", "")))
            elif (section, key) == ("mask", "num_enc_masks") and value != 1:
                raise UserError("mask.num_enc_masks must be 1: one context block per image is supported")
            elif (section, key) == ("mask", "allow_overlap") and value:
                raise UserError("mask.allow_overlap: true would let the context see targets; it is not supported")
            elif (section, key) not in OFFICIAL_IGNORED and (section, key) != ("data", "image_folder"):
                unknown.append(f"{section}.{key}")
    if unknown:
        raise UserError(f"unknown keys in the official-format config: {', '.join(unknown)}")
    return flags


def config_defaults(parser, path):
    """Settings from a YAML file, checked against the parser: unknown keys and wrong types are errors."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"cannot read config {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of settings")
    official = {"data", "mask", "meta", "optimization", "logging"}
    flags = official_to_flags(raw) if raw and set(raw) <= official else {k.replace("-", "_"): v for k, v in raw.items()}
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(flags) - set(actions))
    if unknown:
        raise UserError(f"unknown settings in {path}: {', '.join(unknown)}; see --help for the names")
    return {key: check_value(actions[key], value, path) for key, value in flags.items()}


def check_value(action, value, path):
    """Convert a YAML value with the flag's own type, so a config is checked exactly like the CLI."""
    name = "--" + action.dest.replace("_", "-")
    try:
        if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
            if not isinstance(value, bool):
                raise TypeError("expected true or false")
            return value
        if action.nargs is not None:
            count = action.nargs if isinstance(action.nargs, int) else None  # "+" and "*" take any length
            if not isinstance(value, (list, tuple)) or (count is not None and len(value) != count):
                raise TypeError(f"expected a list of {count or 'one or more'} values")
            return tuple(action.type(str(v)) if action.type else v for v in value)
        if value is None:  # null: "not set", for settings that have no default
            if action.default is not None:
                raise TypeError("expected a value, got null")
            return None
        if isinstance(value, (list, dict)):
            raise TypeError("expected a single value")
        converted = action.type(str(value)) if action.type else str(value)
        if action.choices and converted not in action.choices:
            raise TypeError(f"expected one of {', '.join(map(str, action.choices))}")
        return converted
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"config {path}: {name} = {value!r} is invalid ({e})") from None


def parse_args(argv=None, parser=None):
    parser = parser or build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        parser.set_defaults(**config_defaults(parser, args.config))
    args = parser.parse_args(argv)
    finish_args(args)
    return args


def finish_args(args):
    """Fill dataset-dependent defaults and check values argparse cannot."""
    kind = args.dataset.partition(":")[0]
    size, patch = DATASET_GEOMETRY.get(kind, (224, 16))
    args.image_size = args.image_size or size
    args.patch_size = args.patch_size or (patch if args.image_size == size else 16)
    if args.image_size % args.patch_size:
        raise UserError(f"--image-size {args.image_size} is not divisible by --patch-size {args.patch_size}; "
                        "pick sizes such that the patch size divides the image size")
    if args.storage_size is None and kind in ("imagefolder", "hf"):
        args.storage_size = args.image_size if args.image_size <= 64 else round(args.image_size * 8 / 7)
    for name in ("crop_scale", "target_scale", "context_scale"):
        low, high = getattr(args, name)
        if not 0 < low <= high <= 1:
            raise UserError(f"--{name.replace('_', '-')} must satisfy 0 < min <= max <= 1, got {low} {high}")
    if not 0 <= args.ema[0] <= args.ema[1] <= 1:
        raise UserError(f"--ema must satisfy 0 <= start <= end <= 1, got {args.ema[0]} {args.ema[1]}")
    # AdamW's step computes lr / (1 - beta1^t) and lr * weight decay in float32: beyond this they overflow.
    if max(args.lr, args.start_lr, args.final_lr) * max(1.0, args.weight_decay, args.final_weight_decay) > 1e30:
        raise UserError(f"--lr {args.lr} (or --start-lr, --final-lr, times the weight decay) is beyond 1e30; "
                        "AdamW would overflow: use a learning rate near 1e-3")


# ----------------------------------------------------------------------------------------------------
# Model and masks


def encoder_config(args):
    return as_user_error(vit_config, args.model, img_size=args.image_size, patch_size=args.patch_size,
                         depth=args.depth, num_heads=args.heads, patch_embed=args.patch_embed)


def predictor_config(args, encoder_cfg, levels=1):
    pred_dim = args.pred_dim or min(384, encoder_cfg.embed_dim // 2)
    heads = args.pred_heads or encoder_cfg.num_heads
    return as_user_error(PredictorConfig, embed_dim=encoder_cfg.embed_dim, pred_dim=pred_dim, depth=args.pred_depth,
                         num_heads=heads, grid_size=encoder_cfg.grid_size, levels=levels)


def build_model(args):
    encoder_cfg = encoder_config(args)
    return IJEPA(encoder_cfg, predictor_config(args, encoder_cfg), loss=args.loss)


def build_mask_sampler(args, grid_size):
    return as_user_error(MultiBlockMaskSampler, grid_size, num_targets=args.num_targets,
                         target_scale=args.target_scale, target_aspect=args.target_aspect,
                         context_scale=args.context_scale, min_keep=args.min_keep, num_context=args.num_context)


def run_config(args, model, data, script, world_size):
    """Everything config.json records: evaluation rebuilds the models from it alone."""
    return {"script": script, "args": vars(args), "encoder": asdict(model.encoder.cfg),
            "predictor": asdict(model.predictor.cfg), "classes": data.classes, "train_images": len(data),
            "skipped_images": data.skipped, "world_size": world_size, "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------------
# Speed: optimiser, compilation, FLOPs and MFU (bench.py times these same pieces)

# Dense (not sparse) bf16 tensor-core peak in TFLOP/s; the first pattern found in the device name wins.
PEAK_BF16_TFLOPS = ((r"H100.*PCIe", 756.0), (r"H100 NVL", 835.0), (r"H100|H200|GH200", 989.0), (r"B200", 2250.0),
                    (r"A100", 312.0), (r"L40S", 362.0), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0))


def build_optimizer(model, args, device):
    """AdamW on param_groups; fused (one kernel for all parameters) on CUDA."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=device.type == "cuda")


def compile_model(model, cuda_graphs=False):
    """torch.compile with static shapes: batches are full and the context length is fixed; target blocks are
    whole, one block size per batch, so it compiles once per size the mask settings allow (masks.py: 3 on
    8x8, 7 on 14x14, 8 on 16x16; up to ~15 per-level combinations with PI-JEPA). With cuda_graphs, mode
    "reduce-overhead" records the step's kernels as CUDA graphs and replays each with one launch, for small
    models whose steps are bound by kernel launches."""
    # Past the recompile limit (8 by default) torch would run the remaining shapes eagerly, unannounced.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(model, mode="reduce-overhead" if cuda_graphs else "default", dynamic=False)


def check_cuda_graphs(cuda_graphs, device):
    if cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA GPU and this run is on {device.type}; drop it "
                        "(--compile works on any device)")


def peak_tflops(device_name):
    """Dense bf16 peak of a GPU named like torch.cuda.get_device_name(), or None for one not in the table."""
    return next((tflops for pattern, tflops in PEAK_BF16_TFLOPS if re.search(pattern, device_name)), None)


def block_flops(tokens, width, mlp_width):
    """Matmul FLOPs of one transformer block's forward on one sequence: qkv 6LD^2, attention scores and
    values 4L^2D, output projection 2LD^2, MLP 4LDH."""
    return 8 * tokens * width**2 + 4 * tokens * width * mlp_width + 4 * tokens**2 * width


def conv_flops(module, size):
    """Matmul FLOPs of each Conv2d layer in `module` (applied in order) on one size x size image, a list."""
    flops = []
    for conv in (m for m in module.modules() if isinstance(m, torch.nn.Conv2d)):
        size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        flops.append(2 * size**2 * conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size))
    return flops


def ijepa_flops_per_image(model, encoder_tokens, context_tokens, num_targets, target_tokens):
    """Matmul FLOPs of one I-JEPA training step per image, the count MFU divides by:

        F(L, D, H) = 8 L D^2 + 4 L D H + 4 L^2 D          one block's forward on a sequence of L tokens
        target     = E + d F(N, D, H)                     target encoder, forward only, all N patches
        context    = E + d F(Kc, D, H)                    context encoder on its Kc patches
        predictor  = 2 Kc D P + M dp F(Kc + Kt, P, Hp) + 2 M Kt P D
        step       = target + 3 (context + predictor) - E1

    E is the patch embedding on all N patches (2 N C p^2 D when strided), E1 its first convolution (all of
    it when strided); d, D, H the encoder's depth, width and MLP width, dp, P, Hp the predictor's; M target
    blocks of Kt patches. A backward pass costs twice its forward (input and weight gradients), except the
    images' gradient, which is never computed (- E1). This equals torch's FlopCounterMode on a training
    step with the math attention kernel (flash attention's backward also recomputes the scores: not counted).
    Recomputation under --grad-checkpointing is not counted: MFU counts the model's FLOPs, not the GPU's.
    encoder_tokens is Kc for I-JEPA; with PI-JEPA's pyramid the encoder sees only the fine context
    patches, and the predictor reads context_tokens (all levels)."""
    enc, pred = model.encoder.cfg, model.predictor.cfg
    convs = conv_flops(model.encoder.patch_embed, enc.img_size)
    embed = sum(convs)
    mlp, pred_mlp = int(enc.embed_dim * enc.mlp_ratio), int(pred.pred_dim * pred.mlp_ratio)
    target = embed + enc.depth * block_flops(enc.grid_size**2, enc.embed_dim, mlp)
    context = embed + enc.depth * block_flops(encoder_tokens, enc.embed_dim, mlp)
    predictor = (2 * context_tokens * enc.embed_dim * pred.pred_dim
                 + num_targets * pred.depth * block_flops(context_tokens + target_tokens, pred.pred_dim, pred_mlp)
                 + 2 * num_targets * target_tokens * pred.pred_dim * enc.embed_dim)
    return target + 3 * (context + predictor) - convs[0]


def step_flops_per_image(model, masks):
    """ijepa_flops_per_image at the lengths of a batch of masks (Masks, or PI-JEPA's with context_sizes)."""
    inputs = masks.model_inputs()
    context_tokens = inputs["context_idx"].shape[1]
    encoder_tokens = inputs.get("context_sizes", (context_tokens,))[0]
    _, num_targets, target_tokens = inputs["target_idx"].shape
    return ijepa_flops_per_image(model, encoder_tokens, context_tokens, num_targets, target_tokens)


# ----------------------------------------------------------------------------------------------------
# Training loop (shared with train_pijepa.py)


class StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set a flag; the loop saves a checkpoint after the current step
    (several processes: at the next log step, where they agree) and the script exits with status
    128 + signal number, as if the signal had ended it, so a job scheduler sees an unfinished run.
    A second signal exits at once."""

    def __init__(self):
        self.signal, self.exit_code = None, 128 + signal.SIGTERM
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signal is not None:  # a second signal: give up at once
            sys.exit(128 + signum)
        self.signal, self.exit_code = signal.Signals(signum).name, 128 + signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def any_process(accelerator, *flags):
    """Boolean flags (tensors or bools) read in one host synchronisation, each True if set on any process."""
    values = torch.stack([torch.as_tensor(f, device=accelerator.device) for f in flags]).float()
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "max")
    return (values > 0).tolist()


def all_finite(tensors):
    """A boolean 0-d tensor (reading it is the caller's host sync): every element of every tensor is finite."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


class NonFiniteGuard:
    """Non-finite losses and gradients. By default the flag is read at log time only (no extra host
    sync) and the run stops there, naming the last good checkpoint, which predates the bad step.
    With --skip-nonfinite N each update is checked before optimizer.step (one sync a step) and up to
    N bad updates are skipped: no optimizer step, no EMA update."""

    def __init__(self, accelerator, out, allowed_skips, skipped, bar):
        self.accelerator, self.out, self.allowed_skips, self.skipped = accelerator, out, allowed_skips, skipped
        self.bar = bar  # closed before the error, which then prints on a line of its own
        self.flag = torch.zeros((), dtype=torch.bool, device=accelerator.device)

    def observe(self, loss):
        self.flag |= ~torch.isfinite(loss.detach())

    def update_allowed(self, model, step):
        """Called where gradients are complete, before optimizer.step: False when the update is skipped."""
        if not self.allowed_skips:
            return True
        flags = [self.flag]
        if self.accelerator.scaler is None:  # fp16's loss scaler skips its own overflowing steps
            flags.append(~all_finite([p.grad for p in model.parameters() if p.grad is not None]))
        bad = any(any_process(self.accelerator, *flags))
        self.flag.zero_()
        if not bad:
            return True
        self.skipped += 1
        if self.skipped > self.allowed_skips:
            self.stop(step + 1, f"{self.skipped} non-finite updates, more than --skip-nonfinite {self.allowed_skips}")
        self.accelerator.print(f"\nstep {step + 1}: non-finite loss or gradients, update skipped "
                               f"({self.skipped} of --skip-nonfinite {self.allowed_skips})")
        return False

    def stop(self, step, what="non-finite loss"):
        self.bar.close()
        previous = latest_checkpoint(self.out)
        raise UserError(f"{what} at or before step {step}; the last good checkpoint is {previous or 'none yet'} "
                        "(lower --lr, use --mixed-precision bf16 instead of fp16, or --skip-nonfinite N)")


def write_checkpoint(accelerator, out, model, state, guard, metadata, leave_out=()):
    """model.safetensors (less the weights whose names start with one of leave_out) and a resumable
    checkpoint, never with non-finite weights; a failed write is one line naming the intact checkpoint."""
    from safetensors import SafetensorError

    step = state["step"]
    if not all_finite(list(model.parameters())):  # a finite loss can still end in an overflowing update
        guard.stop(step, "non-finite weights")
    weights = {k: v for k, v in accelerator.get_state_dict(model).items() if not k.startswith(tuple(leave_out))}
    try:
        if accelerator.is_main_process:
            atomic_save_safetensors(os.path.join(out, "model.safetensors"), weights,
                                    metadata={"step": str(step), **metadata})
        return save_checkpoint(accelerator, out, state)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap OSErrors
        guard.bar.close()
        raise UserError(f"cannot write the step {step} checkpoint in {out} ({one_line(e)}); the last complete "
                        f"one, {latest_checkpoint(out) or 'none'}, is intact: free some space and continue with "
                        "--resume") from None


@torch.no_grad()
def monitor(accelerator, model, images):
    """Collapse monitor: statistics of the target encoder's mean-pooled features on a fixed batch."""
    encoder = accelerator.unwrap_model(model).target_encoder
    with accelerator.autocast():
        features = torch.cat([encoder(chunk).mean(1) for chunk in images.split(256)])
    return {f"monitor_{k}": v for k, v in collapse_metrics(features).items()}


def train(args, model, sampler, script="train_ijepa"):
    from tqdm.auto import tqdm

    accelerator = make_accelerator(args, gradient_accumulation_steps=args.grad_accum)
    main = accelerator.is_main_process
    if main:  # before the data loads; an old run is only cleared once everything has been checked
        check_out_dir(args.out, args.resume, args.overwrite)
    device = accelerator.device
    check_cuda_graphs(args.cuda_graphs, device)

    # -- data
    augment = RandomResizedCropFlip(args.image_size, scale=args.crop_scale, flip=args.flip)
    rank, processes = accelerator.process_index, accelerator.num_processes
    if args.stream:  # decoded from disk by workers; only the monitor's images are held in memory
        stream_settings = dict(storage_size=args.storage_size, seed=args.seed, skip_bad_images=args.skip_bad_images)
        train_set = open_stream(args.dataset, "train", max_per_class=args.max_per_class, **stream_settings)
        held_out_stream = open_stream(args.dataset, "test", **stream_settings)
        held_out = held_out_stream.load(seeded_sample(len(held_out_stream), args.monitor_size, args.seed))
        loader = StreamedBatches(train_set, args.batch_size, augment, device, args.seed, rank, processes, args.workers)
    else:
        data_settings = dict(data_root=args.data_root, storage_size=args.storage_size, seed=args.seed,
                             skip_bad_images=args.skip_bad_images, image_column=args.image_column,
                             label_column=args.label_column)
        train_set = load_split(args.dataset, "train", max_per_class=args.max_per_class, **data_settings)
        held_out = load_split(args.dataset, "test", **data_settings)
        held_out = held_out.subset(seeded_sample(len(held_out), args.monitor_size, args.seed))
        loader = InMemoryBatches(train_set, args.batch_size, augment, device, args.seed, rank, processes,
                                 data_on_device=args.data_on_gpu)
    # A seeded sample, not the first images: splits sorted by class would give the monitor one class.
    monitor_images = eval_transform(held_out.images.to(device), args.image_size)
    steps_per_epoch = len(loader) // args.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"{len(loader)} batches per epoch cannot make one step of --grad-accum {args.grad_accum}")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    # Mask settings that leave too little context fail in the sampler's redraws: here, not mid-run.
    as_user_error(sampler.sample, args.batch_size, step_generator(args.seed + MASK_SEED_OFFSET, 0))

    # -- model and optimiser
    if args.grad_checkpointing:
        model.encoder.grad_checkpointing = model.predictor.grad_checkpointing = True
    optimizer = build_optimizer(model, args, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The compiled wrapper only runs the step; saving and unwrapping use `model` (no "_orig_mod." in names).
    # Compiled after prepare, so that a DDP wrapper is compiled with the model.
    step_model = compile_model(model, args.cuda_graphs) if args.compile or args.cuda_graphs else model
    config = run_config(args, accelerator.unwrap_model(model), train_set, script, accelerator.num_processes)
    if main:
        needed = run_bytes_needed(accelerator.unwrap_model(model))
        if prepare_out_dir(args.out, args.resume, args.overwrite, needed):
            check_same_model(args.out, config)
    accelerator.wait_for_everyone()
    start_step, skipped_updates = 0, 0
    if args.resume and latest_checkpoint(args.out):
        path = latest_checkpoint(args.out)
        state = load_checkpoint(accelerator, path)
        start_step, skipped_updates = state["step"], state.get("skipped_nonfinite", 0)
        accelerator.print(f"resumed from {path} at step {start_step}")
    if main:  # written once the settings, the data and the checkpoint to resume have all loaded
        atomic_write_json(os.path.join(args.out, "config.json"), config)
        if train_set.skipped:
            accelerator.print(f"skipped {train_set.skipped} unreadable images (--skip-bad-images)")
    if args.log_with:
        accelerator.init_trackers(os.path.basename(os.path.normpath(args.out)), config=vars(args))
    metrics = MetricsLog(os.path.join(args.out, "metrics.jsonl"), main, start_step)  # drops a stale tail

    def schedules(step):
        warmup = round(args.warmup_epochs * steps_per_epoch)
        return (warmup_cosine(step, total_steps, warmup, args.start_lr, args.lr, args.final_lr),
                cosine_ramp(step, total_steps, args.weight_decay, args.final_weight_decay),
                linear_ramp(step, total_steps, *args.ema))

    def checkpoint(step):
        state = {"step": step, "epoch": step / steps_per_epoch, "world_size": accelerator.num_processes,
                 "skipped_nonfinite": guard.skipped}
        return write_checkpoint(accelerator, args.out, model, state, guard, {"script": script})

    # -- loop
    stop = StopRequest()
    bar = tqdm(total=last_step, initial=start_step, disable=not main, dynamic_ncols=True)
    guard = NonFiniteGuard(accelerator, args.out, args.skip_nonfinite, skipped_updates, bar)
    stopping = False
    window_start, window_images, step = time.perf_counter(), 0, start_step
    # Masks are drawn on the CPU a few steps ahead, on a background thread: no host sync in the step. Draw k
    # is a pure function of (seed, rank, k), so a resumed run sees the masks an uninterrupted one would.
    mask_stream = Prefetcher(lambda k: sampler.sample(args.batch_size, step_generator(
        args.seed + MASK_SEED_OFFSET, k, accelerator.process_index)), device)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    model.train()
    while step < last_step:
        epoch, index = divmod(step, steps_per_epoch)
        lr, weight_decay, momentum = schedules(step)
        set_optimizer_values(optimizer, lr, weight_decay)
        for micro in range(args.grad_accum):
            images, _ = loader.batch(epoch, index * args.grad_accum + micro, step * args.grad_accum + micro)
            masks = mask_stream.get(step * args.grad_accum + micro)
            if args.cuda_graphs:  # a new step: the graphs may now overwrite the previous step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            with accelerator.accumulate(model), accelerator.autocast():
                loss, info = step_model(images, **masks.model_inputs())
                accelerator.backward(loss)
                guard.observe(loss)
                update = not accelerator.sync_gradients or guard.update_allowed(model, step)
                if args.grad_clip and accelerator.sync_gradients and update:
                    accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
                if update:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_images += images.shape[0] * accelerator.num_processes
        if update:
            accelerator.unwrap_model(model).update_target(momentum)
        step += 1
        bar.update(1)
        epoch_end = step % steps_per_epoch == 0 or step == last_step
        stopping = stop.signal is not None and accelerator.num_processes == 1  # several agree at log time
        if step % args.log_every == 0 or epoch_end or stopping:
            stopping |= log_time_checks(accelerator, guard, stop, step)
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "epoch": step / steps_per_epoch, "lr": lr, "weight_decay": weight_decay,
                      "momentum": momentum, "images_per_s": window_images / max(elapsed, 1e-9),
                      **{k: float(v) for k, v in info.items()}, **{k: float(v) for k, v in masks.stats().items()}}
            window_start, window_images = time.perf_counter(), 0
            if peak:  # per GPU: model matmul FLOP/s over the dense bf16 peak
                record["mfu"] = (step_flops_per_image(accelerator.unwrap_model(model), masks)
                                 * record["images_per_s"] / accelerator.num_processes / (peak * 1e12))
            if epoch_end:
                record.update(monitor(accelerator, model, monitor_images))
                model.train()
            metrics.write(record)
            accelerator.log(record, step=step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{record['images_per_s']:.0f}")
        if save_when_due(accelerator, args, checkpoint, step, steps_per_epoch, last_step, stopping, stop):
            break
    bar.close()
    mask_stream.close()
    end_run(accelerator, stop, stopping, f"done: {step} steps; model and checkpoint in {args.out}")
    return model


def log_time_checks(accelerator, guard, stop, step):
    """The one host synchronisation of a log step: a non-finite loss on any process stops the run (naming
    the step); a stop signal seen by any process stops them all. Returns whether to stop."""
    nonfinite, stop_seen = any_process(accelerator, guard.flag, stop.signal is not None)
    if nonfinite:
        guard.stop(step)
    return stop_seen


def save_when_due(accelerator, args, checkpoint, step, steps_per_epoch, last_step, stopping, stop):
    """Checkpoint on a stop request (and say where), or after every --save-every-th epoch and the last
    step. Returns True when the loop must stop."""
    if stopping:
        path = checkpoint(step)
        accelerator.print(f"\n{stop.signal or 'stop requested'}: saved a resumable checkpoint at step {step} "
                          f"in {path}; continue with --resume --out {args.out}")
        return True
    epoch_end = step % steps_per_epoch == 0 or step == last_step
    if epoch_end and ((step // steps_per_epoch) % args.save_every == 0 or step == last_step):
        checkpoint(step)
    return False


def end_run(accelerator, stop, stopping, message):
    """Restore the signal handlers and close the trackers; a run stopped by a signal exits 128 + signal."""
    stop.restore()
    accelerator.end_training()
    if stopping:
        sys.exit(stop.exit_code)
    accelerator.print(message)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args)
    train(args, model, build_mask_sampler(args, model.encoder.cfg.grid_size))


if __name__ == "__main__":
    main()

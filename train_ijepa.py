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
import signal
import sys
import time
from dataclasses import asdict

import torch
import yaml

from common import (as_user_error, atomic_save_safetensors, atomic_write_json, collapse_metrics, cosine_ramp,
                    exit_on_user_error, latest_checkpoint, linear_ramp, load_checkpoint, MetricsLog, param_groups,
                    prepare_out_dir, save_checkpoint, set_optimizer_values, warmup_cosine)
from data import eval_transform, InMemoryBatches, load_split, RandomResizedCropFlip, step_generator, UserError
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


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser(description=__doc__):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of settings (flag names, or the official I-JEPA sections)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help="digits | cifar10 | cifar100 | imagefolder:<dir|tar> | "
                   "tiny-imagenet:<dir|tar.gz> | hf:<hub id>")
    g.add_argument("--data-root", default="data", help="where cifar downloads and decoded-image caches go")
    g.add_argument("--image-size", type=positive_int, help="input size (default: 32 for digits/cifar, "
                   "64 for tiny-imagenet, else 224)")
    g.add_argument("--storage-size", type=positive_int, help="size images are decoded to for folders and hub "
                   "datasets (default: the image size, or 8/7 of it above 64 px)")
    g.add_argument("--max-per-class", type=positive_int, help="train on a seeded class-balanced subset")
    g.add_argument("--image-column", help="hf: image column (default: found by type)")
    g.add_argument("--label-column", help="hf: label column (default: found by type)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.3, 1.0), help="random resized crop area")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flip")
    g.add_argument("--data-on-gpu", action=argparse.BooleanOptionalAction, default=True,
                   help="hold the uint8 split on the device and augment there")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="tiny | small | base | large | huge | giant")
    g.add_argument("--patch-size", type=positive_int, help="default: 4 for 32 px, 8 for 64 px, else 16")
    g.add_argument("--depth", type=positive_int, help="override the preset's encoder depth")
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
    g.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help="default: accelerate's config (bf16 is the fast choice on GPUs)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="out/ijepa")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (fresh if it has none)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    g.add_argument("--save-every", type=positive_int, default=1, help="epochs between checkpoints")
    g.add_argument("--monitor-size", type=positive_int, default=512, help="held-out images for the "
                   "per-epoch collapse monitor")
    g.add_argument("--max-steps", type=positive_int, help="stop after this many steps (smoke tests)")
    g.add_argument("--log-with", default=None, choices=("tensorboard",), help="an Accelerate tracker")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    return p


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
            if not isinstance(value, (list, tuple)) or len(value) != action.nargs:
                raise TypeError(f"expected a list of {action.nargs} values")
            return tuple(action.type(str(v)) if action.type else v for v in value)
        if value is None:
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


# ----------------------------------------------------------------------------------------------------
# Model and masks


def encoder_config(args):
    return as_user_error(vit_config, args.model, img_size=args.image_size, patch_size=args.patch_size,
                         depth=args.depth, patch_embed=args.patch_embed)


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
# Training loop (shared with train_pijepa.py)


class StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:  # a second signal: give up at once
            sys.exit(128 + signum)
        self.signal = signal.Signals(signum).name


@torch.no_grad()
def monitor(accelerator, model, images):
    """Collapse monitor: statistics of the target encoder's mean-pooled features on a fixed batch."""
    encoder = accelerator.unwrap_model(model).target_encoder
    with accelerator.autocast():
        features = torch.cat([encoder(chunk).mean(1) for chunk in images.split(256)])
    return {f"monitor_{k}": v for k, v in collapse_metrics(features).items()}


def train(args, model, sampler, script="train_ijepa"):
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
                              log_with=args.log_with, project_dir=args.out)
    main = accelerator.is_main_process
    resume = prepare_out_dir(args.out, args.resume, args.overwrite) if main else None
    accelerator.wait_for_everyone()
    resume = args.resume and latest_checkpoint(args.out) is not None
    device = accelerator.device

    # -- data
    data_settings = dict(data_root=args.data_root, storage_size=args.storage_size, seed=args.seed,
                         skip_bad_images=args.skip_bad_images, image_column=args.image_column,
                         label_column=args.label_column)
    train_set = load_split(args.dataset, "train", max_per_class=args.max_per_class, **data_settings)
    held_out = load_split(args.dataset, "test", **data_settings)
    monitor_images = eval_transform(held_out.images[: args.monitor_size].to(device), args.image_size)
    augment = RandomResizedCropFlip(args.image_size, scale=args.crop_scale, flip=args.flip)
    loader = InMemoryBatches(train_set, args.batch_size, augment, device, args.seed, accelerator.process_index,
                             accelerator.num_processes, data_on_device=args.data_on_gpu)
    steps_per_epoch = len(loader) // args.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"{len(loader)} batches per epoch cannot make one step of --grad-accum {args.grad_accum}")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)

    # -- model and optimiser
    if args.grad_checkpointing:
        model.encoder.grad_checkpointing = model.predictor.grad_checkpointing = True
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=fused)
    if args.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    config = run_config(args, accelerator.unwrap_model(model), train_set, script, accelerator.num_processes)
    if main:
        atomic_write_json(os.path.join(args.out, "config.json"), config)
        if train_set.skipped:
            accelerator.print(f"skipped {train_set.skipped} unreadable images (--skip-bad-images)")
    if args.log_with:
        accelerator.init_trackers(os.path.basename(os.path.normpath(args.out)), config=vars(args))

    start_step = 0
    if resume:
        path = latest_checkpoint(args.out)
        start_step = load_checkpoint(accelerator, path)["step"]
        accelerator.print(f"resumed from {path} at step {start_step}")
    metrics = MetricsLog(os.path.join(args.out, "metrics.jsonl"), main, start_step if resume else None)

    def schedules(step):
        warmup = round(args.warmup_epochs * steps_per_epoch)
        return (warmup_cosine(step, total_steps, warmup, args.start_lr, args.lr, args.final_lr),
                cosine_ramp(step, total_steps, args.weight_decay, args.final_weight_decay),
                linear_ramp(step, total_steps, *args.ema))

    def checkpoint(step):
        state = {"step": step, "epoch": step / steps_per_epoch, "world_size": accelerator.num_processes}
        weights = accelerator.get_state_dict(model)
        if main:
            atomic_save_safetensors(os.path.join(args.out, "model.safetensors"), weights,
                                    metadata={"step": str(step), "script": script})
        return save_checkpoint(accelerator, args.out, state)

    # -- loop
    stop = StopRequest()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(total=last_step, initial=start_step, disable=not main, dynamic_ncols=True)
    window_start, window_images, step = time.perf_counter(), 0, start_step
    model.train()
    while step < last_step:
        epoch, index = divmod(step, steps_per_epoch)
        lr, weight_decay, momentum = schedules(step)
        set_optimizer_values(optimizer, lr, weight_decay)
        for micro in range(args.grad_accum):
            images, _ = loader.batch(epoch, index * args.grad_accum + micro, step * args.grad_accum + micro)
            masks = sampler.sample(images.shape[0], step_generator(
                args.seed + MASK_SEED_OFFSET, step * args.grad_accum + micro, accelerator.process_index, device))
            with accelerator.accumulate(model), accelerator.autocast():
                loss, info = model(images, masks.context_idx, masks.target_idx)
                accelerator.backward(loss)
                if args.grad_clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            nonfinite |= ~torch.isfinite(loss.detach())
            window_images += images.shape[0] * accelerator.num_processes
        accelerator.unwrap_model(model).update_target(momentum)
        step += 1
        bar.update(1)
        epoch_end = step % steps_per_epoch == 0 or step == last_step
        if step % args.log_every == 0 or epoch_end or stop.signal:
            if nonfinite.item():  # the one host synchronisation, at log time only
                previous = latest_checkpoint(args.out)
                raise UserError(f"non-finite loss before step {step}; last good checkpoint: {previous or 'none'} "
                                "(lower --lr, or use --mixed-precision bf16 instead of fp16)")
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "epoch": step / steps_per_epoch, "lr": lr, "weight_decay": weight_decay,
                      "momentum": momentum, "images_per_s": window_images / max(elapsed, 1e-9),
                      **{k: float(v) for k, v in info.items()}, **{k: float(v) for k, v in masks.stats().items()}}
            window_start, window_images = time.perf_counter(), 0
            if epoch_end:
                record.update(monitor(accelerator, model, monitor_images))
                model.train()
            metrics.write(record)
            accelerator.log(record, step=step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", ips=f"{record['images_per_s']:.0f}")
        if stop.signal:
            path = checkpoint(step)
            accelerator.print(f"\n{stop.signal}: saved a resumable checkpoint at step {step} in {path}; "
                              f"continue with --resume --out {args.out}")
            break
        if epoch_end and ((step // steps_per_epoch) % args.save_every == 0 or step == last_step):
            checkpoint(step)
    bar.close()
    accelerator.end_training()
    if main and not stop.signal:
        accelerator.print(f"done: {step} steps; model and checkpoint in {args.out}")
    return model


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args)
    train(args, model, build_mask_sampler(args, model.encoder.cfg.grid_size))


if __name__ == "__main__":
    main()

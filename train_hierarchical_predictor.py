"""Train the hierarchical predictor head on a frozen I-JEPA backbone with cross-view consistency.

    python train_ijepa.py --dataset digits --epochs 2 --out out/demo                      # a backbone, ~1 min
    python train_hierarchical_predictor.py --backbone out/demo --dataset digits --layers -1,-4,-8 \\
        --subset 500 --epochs 5 --out out/demo-head                                        # CPU, ~30 s
    accelerate launch train_hierarchical_predictor.py --backbone IN1K-vit.h.14-300e.pth.tar \\
        --backbone-config in1k_vith14_ep300.yaml --dataset tiny-imagenet:tiny-imagenet-200.tar.gz \\
        --subset 2000 --out out/vith-head                                                  # Meta's weights, GPU
    python evaluate_embeddings.py --ckpt out/demo-head --features head

The backbone (one of our run folders, or a released I-JEPA checkpoint with its yaml) is frozen: eval mode,
no gradients, bf16 on GPUs. Its tokens after several blocks (--layers) are mean-pooled per block,
standardised with fixed statistics of the training images (pooled ViT features share one dominant
direction), and combined, by a learned weighted sum or by concatenation and a projection, into x; the head
x -> x + Linear(GELU(Linear(x))) -> LayerNorm -> Linear gives the features. Two random augmentations of
each image (crop, flip, colour jitter, greyscale) must point the same way: L = 2 - 2 cos(p1, z2),
symmetrised. Alone (--collapse-guard none) this collapses: every image maps to one vector and the loss goes
to zero, as in the study this follows (5-6% linear probe on Tiny-ImageNet). The default guard, ema, takes
the targets z from an EMA copy of the head with stop-gradient and predicts them through a small MLP on the
online branch (BYOL); stopgrad uses the head itself with stop-gradient (SimSiam). RankMe and the feature
std of the head's outputs on held-out images are logged every epoch, so collapse shows in metrics.jsonl.
--jepa-weight adds the masked-target objective through the backbone's I-JEPA predictor: the head's
per-token features of the context must predict the backbone's (layer-normed) target-block features.

The output folder (--out) holds config.json (settings, the head's shape, a pointer to the backbone),
model.safetensors (head.*: the online head that evaluation uses; online_predictor.*, target_head.*),
metrics.jsonl and checkpoints/; --resume continues exactly (with the same backbone, head and objective).
The run is as safe as train_ijepa.py's, with its pieces: SIGTERM/SIGINT save a checkpoint and exit 128 +
signal, non-finite losses stop the run (or --skip-nonfinite N) and non-finite weights are never saved, and
--overwrite clears an old run only once the new settings and data have loaded. Tiny-ImageNet (2,000-image
subset, ViT-tiny backbone of 6 blocks trained 4 epochs on a 2-core CPU): ema keeps RankMe ~12 and the linear probe at 4.3%
(backbone 4.7%), none collapses (loss 0.0003, RankMe 2.0). Results: RESULTS.md.
"""

import argparse
import copy
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (as_user_error, atomic_write_json, check_out_dir, check_same_model, collapse_metrics,
                    exit_on_user_error, latest_checkpoint, linear_ramp, load_checkpoint, MetricsLog, param_groups,
                    prepare_out_dir, run_bytes_needed, set_optimizer_values, start_trackers, warmup_cosine)
from data import (class_balanced_subset, ColourJitter, eval_transform, InMemoryBatches, load_split, normalize,
                  RandomResizedCropFlip, seeded_sample, step_generator, UserError)
from masks import MultiBlockMaskSampler
from models import (gather_tokens, HeadConfig, HierarchicalHead, is_official_checkpoint, layer_features, load_encoder,
                    load_predictor, official_yaml_beside, pooled_layer_features)
from train_ijepa import (add_dataset_arguments, add_run_arguments, config_defaults, end_run, log_time_checks,
                         make_accelerator, MASK_SEED_OFFSET, non_negative_float, non_negative_int, NonFiniteGuard,
                         positive_int, save_when_due, StopRequest, write_checkpoint)

SCRIPT = "train_hierarchical_predictor"


# ----------------------------------------------------------------------------------------------------
# Settings


def layer_list(text):
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices like -1,-4,-8, got {text!r}")
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"block indices repeat in {text!r}")
    return layers


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of settings (flag names)")

    g = p.add_argument_group("backbone (frozen)")
    g.add_argument("--backbone", help="one of our run folders, or an official I-JEPA .pth.tar checkpoint")
    g.add_argument("--backbone-config", help="the official checkpoint's yaml (default: the yaml beside it)")
    g.add_argument("--backbone-encoder", default="target", choices=("target", "context"),
                   help="the EMA target encoder (as the paper evaluates) or the context encoder")
    g.add_argument("--image-size", type=positive_int, help="input size (default: the backbone's; position "
                   "embeddings interpolate for other sizes)")

    g = add_dataset_arguments(p)
    g.add_argument("--storage-size", type=positive_int, help="size images are decoded to for folders and hub "
                   "datasets (default: as stored)")
    g.add_argument("--subset", type=positive_int, help="train on a seeded class-balanced subset of about this many "
                   "images (2000 is the study's scale)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), help="random resized crop area")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flip")
    g.add_argument("--jitter", type=non_negative_float, nargs=4, default=(0.4, 0.4, 0.2, 0.1),
                   metavar=("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"), help="colour jitter strengths")
    g.add_argument("--jitter-prob", type=probability, default=0.8)
    g.add_argument("--grey-prob", type=probability, default=0.2)
    g.add_argument("--data-on-gpu", action=argparse.BooleanOptionalAction, default=True,
                   help="hold the uint8 split on the device and augment there")

    g = p.add_argument_group("head and objective")
    g.add_argument("--layers", type=layer_list, default=(-1, -4, -8), help="backbone blocks to read, "
                   "mean-pooled each (negative counts from the end)")
    g.add_argument("--aggregation", default="weighted-sum", choices=("weighted-sum", "concat"),
                   help="learned softmax-weighted sum of the layers, or concatenation and a linear projection")
    g.add_argument("--hidden", type=positive_int, default=512, help="the head's MLP width")
    g.add_argument("--collapse-guard", default="ema", choices=("ema", "stopgrad", "none"),
                   help="ema: BYOL target head + online predictor; stopgrad: SimSiam; none: the collapsing original")
    g.add_argument("--predictor-hidden", type=positive_int, default=512, help="the online predictor MLP's width")
    g.add_argument("--ema", type=float, nargs=2, default=(0.99, 1.0), help="target-head EMA momentum start, end")
    g.add_argument("--jepa-weight", type=non_negative_float, default=0.0,
                   help="weight of the masked-target objective through the backbone's I-JEPA predictor (0: off)")
    g.add_argument("--num-targets", type=positive_int, default=4, help="target blocks for --jepa-weight")
    g.add_argument("--min-keep", type=positive_int, default=10, help="least context patches for --jepa-weight")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=20)
    g.add_argument("--batch-size", type=positive_int, default=128, help="per process")
    g.add_argument("--lr", type=non_negative_float, default=1e-3, help="peak learning rate")
    g.add_argument("--start-lr", type=non_negative_float, default=1e-4)
    g.add_argument("--final-lr", type=non_negative_float, default=1e-6)
    g.add_argument("--warmup-epochs", type=non_negative_float, default=1)
    g.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    g.add_argument("--skip-nonfinite", type=non_negative_int, default=0, metavar="N", help="skip up to N updates "
                   "whose loss or gradients are not finite (one host sync a step); 0: stop at the first, checked "
                   "at log time")
    g.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help="for the head (the backbone runs in bf16 on GPUs regardless)")

    g = add_run_arguments(p, "out/head")
    g.add_argument("--statistics-size", type=positive_int, default=4096, help="training images (unaugmented) "
                   "that measure the standardisation of the head's inputs")
    return p


def attach_negative_values(argv):
    """argparse takes "-1,-4,-8" for an option name; "--layers=-1,-4,-8" is unambiguous."""
    argv, joined = list(argv), []
    while argv:
        arg = argv.pop(0)
        joined.append(f"{arg}={argv.pop(0)}" if arg == "--layers" and argv and argv[0].startswith("-") else arg)
    return joined


def parse_args(argv=None):
    argv = attach_negative_values(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        parser.set_defaults(**config_defaults(parser, args.config))
    args = parser.parse_args(argv)
    if not args.backbone:
        raise UserError("--backbone is required: one of our run folders or an official I-JEPA .pth.tar")
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        raise UserError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {low} {high}")
    if not 0 <= args.ema[0] <= args.ema[1] <= 1:
        raise UserError(f"--ema must satisfy 0 <= start <= end <= 1, got {args.ema[0]} {args.ema[1]}")
    return args


# ----------------------------------------------------------------------------------------------------
# Backbone, head and objective


def load_backbone(args):
    """(frozen encoder, frozen I-JEPA predictor or None, the pointer config.json records)."""
    path = args.backbone
    yaml_path = args.backbone_config
    try:
        if is_official_checkpoint(path) and yaml_path is None:
            yaml_path = official_yaml_beside(path)
        encoder = load_encoder(path, args.backbone_encoder, yaml_path)
        predictor = load_predictor(path, yaml_path) if args.jepa_weight else None
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"--backbone: {e}") from None
    depth = encoder.cfg.depth
    bad = [i for i in args.layers if not -depth <= i < depth]
    if bad:
        raise UserError(f"--layers {','.join(map(str, bad))} out of range for a backbone of depth {depth}; "
                        f"use indices in [-{depth}, {depth - 1}]")
    out = os.path.abspath(args.out)
    pointer = {"path": os.path.abspath(path), "relative_path": os.path.relpath(os.path.abspath(path), out),
               "config": yaml_path and os.path.abspath(yaml_path),
               "relative_config": yaml_path and os.path.relpath(os.path.abspath(yaml_path), out),
               "which": args.backbone_encoder}
    return encoder.requires_grad_(False), predictor, pointer


def cosine_loss(p, z):
    """2 - 2 cos(p, z) along the last dimension, averaged."""
    return (2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(-1)).mean()


class HeadTrainer(nn.Module):
    """The trained head with its collapse guard, as one module for Accelerate. The frozen I-JEPA predictor
    (for --jepa-weight) rides along so that the whole loss is one forward call."""

    def __init__(self, head_cfg, input_features, guard, predictor_hidden, jepa_predictor=None):
        super().__init__()
        self.guard = guard
        self.head = HierarchicalHead(head_cfg)
        self.head.set_input_statistics(input_features)  # (N, L, D) pooled features of training images
        D = head_cfg.embed_dim
        if guard != "none":
            self.online_predictor = nn.Sequential(nn.Linear(D, predictor_hidden), nn.GELU(),
                                                  nn.Linear(predictor_hidden, D))
        if guard == "ema":
            self.target_head = copy.deepcopy(self.head).requires_grad_(False)
        self.jepa_predictor = jepa_predictor.requires_grad_(False) if jepa_predictor is not None else None

    def forward(self, pooled, jepa=None, jepa_weight=0.0):
        """pooled (2, B, L, D): both views' per-layer features; jepa: the masked-target inputs or None.
        Returns the loss and a dict of detached values to log."""
        z = self.head(pooled)  # (2, B, D)
        if self.guard == "none":
            predictions, targets = z, z.flip(0)  # gradients through both views: nothing stops collapse
        else:
            predictions = self.online_predictor(z)
            if self.guard == "stopgrad":
                targets = z.detach().flip(0)
            else:
                with torch.no_grad():
                    targets = self.target_head(pooled).flip(0)
        consistency = cosine_loss(predictions.float(), targets.float())  # both directions: symmetrised
        loss, info = consistency, {"loss_consistency": consistency.detach()}
        if jepa is not None:
            tokens = self.head(jepa["tokens"])  # (B, Kc, D): the head on every context token
            prediction = self.jepa_predictor(tokens, jepa["context_idx"], jepa["target_idx"])  # (B, M, Kt, D)
            masked = F.smooth_l1_loss(prediction.float(), jepa["targets"].float())
            loss = loss + jepa_weight * masked
            info["loss_jepa"] = masked.detach()
        info["loss"] = loss.detach()
        return loss, info

    @torch.no_grad()
    def update_target(self, momentum):
        if self.guard == "ema":
            torch._foreach_lerp_(list(self.target_head.parameters()), list(self.head.parameters()), 1.0 - momentum)


class TwoViews:
    """Two independent augmentations of a uint8 batch: (2, B, 3, size, size), normalised; the colour
    distortion acts on the crops before normalisation."""

    def __init__(self, args, size):
        self.crop = RandomResizedCropFlip(size, scale=args.crop_scale, flip=args.flip)
        brightness, contrast, saturation, hue = args.jitter
        self.colour = ColourJitter(brightness, contrast, saturation, hue, p=args.jitter_prob, p_grey=args.grey_prob)

    def __call__(self, images, generator):
        views = []
        for _ in range(2):
            boxes, flips = self.crop.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
            views.append(normalize(self.colour(self.crop.resample(images, boxes, flips), generator)))
        return torch.stack(views)


def load_data(args, image_size, device):
    settings = dict(data_root=args.data_root, storage_size=args.storage_size, seed=args.seed,
                    skip_bad_images=args.skip_bad_images, image_column=args.image_column,
                    label_column=args.label_column)
    train_set = load_split(args.dataset, "train", **settings)
    if args.subset:
        classes = len(train_set.labels.unique())
        if args.subset < classes:
            raise UserError(f"--subset {args.subset} is smaller than the {classes} classes; a class-balanced subset "
                            "needs at least one image per class")
        train_set = train_set.subset(class_balanced_subset(train_set.labels, args.subset // classes, args.seed))
    held_out = load_split(args.dataset, "test", **settings)
    sample = seeded_sample(len(held_out), args.monitor_size, args.seed)
    monitor_images = eval_transform(held_out.images[sample].to(device), image_size)
    return train_set, monitor_images


# What --resume must keep: the same backbone, head and objective (their weights are in the checkpoint) on as
# many processes.
SAME_RUN_KEYS = ("script", "backbone", "backbone_encoder", "head", "objective", "world_size")


def run_config(args, pointer, backbone_cfg, head_cfg, image_size, data, world_size):
    """Everything config.json records: evaluation rebuilds the head and finds the backbone from it alone."""
    objective = {"collapse_guard": args.collapse_guard, "predictor_hidden": args.predictor_hidden,
                 "jepa": args.jepa_weight > 0}
    return {"script": SCRIPT, "args": vars(args), "backbone": pointer, "backbone_encoder": asdict(backbone_cfg),
            "head": asdict(head_cfg), "objective": objective, "image_size": image_size, "classes": data.classes,
            "train_images": len(data), "skipped_images": data.skipped, "world_size": world_size,
            "torch": torch.__version__}


# ----------------------------------------------------------------------------------------------------
# Training


def train(args):
    from tqdm.auto import tqdm

    accelerator = make_accelerator(args)
    main = accelerator.is_main_process
    if main:  # before anything loads; an old run is only cleared once everything has been checked
        check_out_dir(args.out, args.resume, args.overwrite)
    device = accelerator.device

    # -- backbone (frozen; bf16 on GPUs) and data
    backbone, jepa_predictor, pointer = load_backbone(args)
    backbone = backbone.to(device).eval()
    backbone_autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    image_size = args.image_size or backbone.cfg.img_size
    layers = args.layers
    train_set, monitor_images = load_data(args, image_size, device)
    loader = InMemoryBatches(train_set, args.batch_size, TwoViews(args, image_size), device, args.seed,
                             accelerator.process_index, accelerator.num_processes, data_on_device=args.data_on_gpu)
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    sampler = None
    if args.jepa_weight:
        if image_size != backbone.cfg.img_size:
            raise UserError(f"--jepa-weight needs --image-size {backbone.cfg.img_size}, the backbone's: its "
                            "predictor's position table is fixed to that grid")
        sampler = as_user_error(MultiBlockMaskSampler, backbone.cfg.grid_size, num_targets=args.num_targets,
                                min_keep=args.min_keep)

    @torch.no_grad()
    def features(images):
        with backbone_autocast:
            return pooled_layer_features(backbone, images, layers).float()  # (B, L, D)

    @torch.no_grad()
    def jepa_inputs(view, step):
        masks = sampler.sample(view.shape[0], step_generator(args.seed + MASK_SEED_OFFSET, step,
                                                             accelerator.process_index, device))
        with backbone_autocast:
            tokens = layer_features(backbone, view, layers, keep=masks.context_idx).float()  # (B, Kc, L, D)
            h = backbone(view).float()
        targets = gather_tokens(F.layer_norm(h, h.shape[-1:]), masks.target_idx)  # (B, M, Kt, D)
        return {"tokens": tokens, "context_idx": masks.context_idx, "target_idx": masks.target_idx,
                "targets": targets}

    # -- head and optimiser
    head_cfg = as_user_error(HeadConfig, embed_dim=backbone.cfg.embed_dim, layers=layers,
                             aggregation=args.aggregation, hidden=args.hidden)
    sample = seeded_sample(len(train_set), args.statistics_size, args.seed)
    input_features = torch.cat([features(eval_transform(chunk.to(device), image_size))
                                for chunk in train_set.images[sample].split(256)])
    trainer = HeadTrainer(head_cfg, input_features, args.collapse_guard, args.predictor_hidden, jepa_predictor)
    optimizer = torch.optim.AdamW(param_groups(trainer, args.weight_decay), lr=args.lr, fused=device.type == "cuda")
    trainer, optimizer = accelerator.prepare(trainer, optimizer)
    config = run_config(args, pointer, backbone.cfg, head_cfg, image_size, train_set, accelerator.num_processes)

    # -- the output folder, once the settings and data have loaded; then the checkpoint to resume
    if main:
        needed = run_bytes_needed(accelerator.unwrap_model(trainer))
        if prepare_out_dir(args.out, args.resume, args.overwrite, needed):
            check_same_model(args.out, config, keys=SAME_RUN_KEYS)
    accelerator.wait_for_everyone()
    start_step, skipped_updates = 0, 0
    if args.resume and latest_checkpoint(args.out):
        path = latest_checkpoint(args.out)
        state = load_checkpoint(accelerator, path)
        start_step, skipped_updates = state["step"], state.get("skipped_nonfinite", 0)
        accelerator.print(f"resumed from {path} at step {start_step}")
    if main:
        atomic_write_json(os.path.join(args.out, "config.json"), config)
        if train_set.skipped:
            accelerator.print(f"skipped {train_set.skipped} unreadable images (--skip-bad-images)")
    start_trackers(accelerator, args)
    # Lines past the resumed step are a killed run's stale tail; a fresh start keeps none (it logs step 0 anew).
    metrics = MetricsLog(os.path.join(args.out, "metrics.jsonl"), main, start_step if start_step else -1)

    # -- collapse monitor: the backbone is frozen, so its features of the held-out images are computed once
    monitor_pooled = torch.cat([features(chunk) for chunk in monitor_images.split(256)])
    with torch.no_grad(), backbone_autocast:
        backbone_pooled = torch.cat([backbone(chunk).mean(1).float() for chunk in monitor_images.split(256)])
    backbone_record = {f"backbone_{k}": v for k, v in collapse_metrics(backbone_pooled).items()}

    @torch.no_grad()
    def monitor():
        head = accelerator.unwrap_model(trainer).head
        with accelerator.autocast():
            outputs = head(monitor_pooled)
        return {**{f"monitor_{k}": v for k, v in collapse_metrics(outputs).items()}, **backbone_record}

    def schedules(step):
        warmup = round(args.warmup_epochs * steps_per_epoch)
        return (warmup_cosine(step, total_steps, warmup, args.start_lr, args.lr, args.final_lr),
                linear_ramp(step, total_steps, *args.ema))

    def checkpoint(step):
        state = {"step": step, "epoch": step / steps_per_epoch, "world_size": accelerator.num_processes,
                 "skipped_nonfinite": guard.skipped}
        return write_checkpoint(accelerator, args.out, trainer, state, guard,
                                {"script": SCRIPT, "backbone": pointer["path"]}, leave_out=("jepa_predictor.",))

    # -- loop (as train_ijepa's: signals stop it with a checkpoint, non-finite values are never saved)
    if start_step == 0:
        metrics.write({"step": 0, "epoch": 0.0, **monitor()})
    stop = StopRequest()
    bar = tqdm(total=last_step, initial=start_step, disable=not main, dynamic_ncols=True)
    guard = NonFiniteGuard(accelerator, args.out, args.skip_nonfinite, skipped_updates, bar)
    stopping = False
    window_start, window_images, step = time.perf_counter(), 0, start_step
    trainer.train()
    while step < last_step:
        epoch, index = divmod(step, steps_per_epoch)
        lr, momentum = schedules(step)
        set_optimizer_values(optimizer, lr, args.weight_decay)
        views, _ = loader.batch(epoch, index, step)  # (2, B, 3, S, S)
        pooled = features(views.flatten(0, 1)).unflatten(0, (2, -1))  # (2, B, L, D)
        jepa = jepa_inputs(views[0], step) if sampler else None
        with accelerator.autocast():
            loss, info = trainer(pooled, jepa, args.jepa_weight)
        accelerator.backward(loss)
        guard.observe(loss)
        update = guard.update_allowed(trainer, step)
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if update:
            accelerator.unwrap_model(trainer).update_target(momentum)
        window_images += views.shape[1] * accelerator.num_processes
        step += 1
        bar.update(1)
        epoch_end = step % steps_per_epoch == 0 or step == last_step
        stopping = stop.signal is not None and accelerator.num_processes == 1  # several agree at log time
        if step % args.log_every == 0 or epoch_end or stopping:
            stopping |= log_time_checks(accelerator, guard, stop, step)
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "epoch": step / steps_per_epoch, "lr": lr, "momentum": momentum,
                      "images_per_s": window_images / max(elapsed, 1e-9), **{k: float(v) for k, v in info.items()}}
            window_start, window_images = time.perf_counter(), 0
            if epoch_end:
                record.update(monitor())
            metrics.write(record)
            accelerator.log(record, step=step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if save_when_due(accelerator, args, checkpoint, step, steps_per_epoch, last_step, stopping, stop):
            break
    bar.close()
    end_run(accelerator, stop, stopping, f"done: {step} steps; head and checkpoint in {args.out}")
    return trainer


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train(args)


if __name__ == "__main__":
    main()

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

train_pijepa.py runs this same loop with the latent-pyramid objective. The run's plumbing (output folder,
resume, checkpoints, signals, non-finite losses, metrics) is run.Run; shared flags and YAML are settings.py.
"""

import argparse
import os
from dataclasses import asdict

import torch

from common import (ArgumentParser, as_user_error, collapse_metrics, cosine_ramp, exit_on_user_error, linear_ramp,
                    MuonAdamW, param_groups, set_optimizer_values, warmup_cosine)
from data import (eval_transform, InMemoryBatches, load_split, MASK_SEED_OFFSET, open_stream, Prefetcher,
                  RandomResizedCropFlip, seeded_sample, step_generator, StreamedBatches, UserError)
from masks import MultiBlockMaskSampler, ScheduledMaskSampler
from models import IJEPA, MLPPredictorConfig, PredictorConfig, resnet_config, vit_config
from run import check_compile, compile_model, Run
from settings import add_dataset_arguments, add_run_arguments, non_negative_float, parse_settings, positive_int

# Per-dataset defaults: (image size, patch size).
DATASET_GEOMETRY = {"digits": (32, 4), "cifar10": (32, 4), "cifar100": (32, 4), "tiny-imagenet": (64, 8)}


# ----------------------------------------------------------------------------------------------------
# Settings


def build_parser(description=__doc__):
    """The flags, in groups; --config FILE gives them from YAML (flag names, or an official I-JEPA yaml)."""
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
    g.add_argument("--encoder", default="vit", choices=("vit", "resnet"), help="resnet: a ResNet-18 whose last "
                   "map is the ViT's patch grid; the context is the image with hidden patches zeroed (README)")
    g.add_argument("--resnet-stem", choices=("cifar", "imagenet"), help="--encoder resnet: the 3x3 CIFAR stem or "
                   "torchvision's 7x7 stride-2 stem and max pool (default: cifar up to 32 px)")
    g.add_argument("--resnet-layers", type=positive_int, nargs="+", help="--encoder resnet: blocks per stage "
                   "(default: 2 2 2 2, ResNet-18)")
    g.add_argument("--resnet-width", type=positive_int, help="--encoder resnet: first stage's channels (default: 64)")
    g.add_argument("--model", default="tiny", help="ViT size: tiny | small | base | large | huge | giant")
    g.add_argument("--patch-size", type=positive_int, help="default: 4 for 32 px, 8 for 64 px, else 16")
    g.add_argument("--depth", type=positive_int, help="override the preset's encoder depth")
    g.add_argument("--heads", type=positive_int, help="override the preset's encoder head count")
    g.add_argument("--patch-embed", default="strided", choices=("strided", "conv"))
    g.add_argument("--predictor", default="transformer", choices=("transformer", "mlp"), help="mlp: each "
                   "target token from the pooled context and its position, no attention (a cheap baseline)")
    g.add_argument("--pred-dim", type=positive_int, help="predictor width (default: half the encoder's, "
                   "at most 384)")
    g.add_argument("--pred-depth", type=positive_int, default=6)
    g.add_argument("--pred-heads", type=positive_int, help="default: the encoder's head count")
    g.add_argument("--loss", default="smooth_l1", choices=("smooth_l1", "mse"))
    g.add_argument("--vicreg-weight", type=non_negative_float, default=0.0, help="weight of VICReg's variance "
                   "and covariance terms on the context encoder's per-image pooled tokens (0: off)")
    g.add_argument("--cycle-weight", type=non_negative_float, default=0.0, help="weight of the cycle term: the "
                   "predictor predicts the context back from its own target predictions (0: off)")
    g.add_argument("--target-layers", type=positive_int, default=1, help="targets: the mean of the target "
                   "encoder's last K blocks' outputs, each layer-normed (data2vec); 1: the last block (I-JEPA)")

    g = p.add_argument_group("masks")
    g.add_argument("--num-targets", type=positive_int, default=4)
    g.add_argument("--target-scale", type=float, nargs=2, default=(0.15, 0.2))
    g.add_argument("--target-scale-schedule", type=float, nargs=2, metavar=("START_MIN", "START_MAX"),
                   help="start with this target scale range and ramp it linearly to --target-scale by the "
                   "last step (mask lengths follow it: --compile compiles each new length once)")
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
    g.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"), help="muon: Muon on the hidden "
                   "matrices, AdamW on the rest, at the same lr and weight decay (common.MuonAdamW)")
    g.add_argument("--muon-momentum", type=float, help="Muon's Nesterov momentum (--optimizer muon; default 0.95)")
    g.add_argument("--grad-clip", type=non_negative_float, default=0.0, help="max grad norm (0: off)")
    g.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help="default: accelerate's config, else bf16 on CPUs with AMX/AVX512-BF16 (bf16 is also the "
                   "fast choice on GPUs)")

    g = add_run_arguments(p, "out/ijepa")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (static shapes: compiles once "
                   "per target block size); 1.35x the images/s on an AMX CPU (README)")
    g.add_argument("--cuda-graphs", action="store_true", help="torch.compile with CUDA graphs (mode "
                   "reduce-overhead): for small models, where kernel launches dominate; CUDA only")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    return p


def parse_args(argv=None, parser=None):
    args = parse_settings(parser or build_parser(), argv)
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
    for name in ("crop_scale", "target_scale", "context_scale", "target_scale_schedule"):
        if getattr(args, name) is None:
            continue
        low, high = getattr(args, name)
        if not 0 < low <= high <= 1:
            raise UserError(f"--{name.replace('_', '-')} must satisfy 0 < min <= max <= 1, got {low} {high}")
    if args.encoder == "resnet" and (args.depth or args.heads or args.patch_embed != "strided"):
        raise UserError("--depth, --heads and --patch-embed set the ViT; --encoder resnet is a ResNet-18: drop them")
    if args.encoder == "vit" and (args.resnet_stem or args.resnet_layers or args.resnet_width):
        raise UserError("--resnet-stem, --resnet-layers and --resnet-width set the ResNet: add --encoder resnet")
    if args.vicreg_weight and args.batch_size < 2:
        raise UserError("--vicreg-weight needs --batch-size >= 2: its variance is measured across the batch")
    if not 0 <= args.ema[0] <= args.ema[1] <= 1:
        raise UserError(f"--ema must satisfy 0 <= start <= end <= 1, got {args.ema[0]} {args.ema[1]}")
    if args.optimizer == "muon":
        args.muon_momentum = 0.95 if args.muon_momentum is None else args.muon_momentum
        if not 0 <= args.muon_momentum < 1:
            raise UserError(f"--muon-momentum must satisfy 0 <= momentum < 1, got {args.muon_momentum}")
    elif args.muon_momentum is not None:
        raise UserError("--muon-momentum sets Muon, which --optimizer adamw does not use: add --optimizer muon")
    # AdamW's step computes lr / (1 - beta1^t) and lr * weight decay in float32: beyond this they overflow.
    if max(args.lr, args.start_lr, args.final_lr) * max(1.0, args.weight_decay, args.final_weight_decay) > 1e30:
        raise UserError(f"--lr {args.lr} (or --start-lr, --final-lr, times the weight decay) is beyond 1e30; "
                        "AdamW would overflow: use a learning rate near 1e-3")


# ----------------------------------------------------------------------------------------------------
# Model, masks, optimiser


def encoder_config(args):
    if args.encoder == "resnet":
        return as_user_error(resnet_config, args.image_size, args.patch_size, stem=args.resnet_stem,
                             layers=args.resnet_layers and tuple(args.resnet_layers), width=args.resnet_width)
    return as_user_error(vit_config, args.model, img_size=args.image_size, patch_size=args.patch_size,
                         depth=args.depth, num_heads=args.heads, patch_embed=args.patch_embed)


def predictor_config(args, encoder_cfg, levels=1):
    if args.predictor == "mlp":
        return as_user_error(MLPPredictorConfig.for_encoder, encoder_cfg, pred_dim=args.pred_dim, depth=args.pred_depth)
    return as_user_error(PredictorConfig.for_encoder, encoder_cfg, pred_dim=args.pred_dim, num_heads=args.pred_heads,
                         depth=args.pred_depth, levels=levels)


def build_model(args):
    encoder_cfg = encoder_config(args)
    return as_user_error(IJEPA, encoder_cfg, predictor_config(args, encoder_cfg), loss=args.loss,
                         vicreg_weight=args.vicreg_weight, cycle_weight=args.cycle_weight,
                         target_layers=args.target_layers)


def build_mask_sampler(args, grid_size):
    return as_user_error(MultiBlockMaskSampler, grid_size, num_targets=args.num_targets,
                         target_scale=args.target_scale, target_aspect=args.target_aspect,
                         context_scale=args.context_scale, min_keep=args.min_keep, num_context=args.num_context)


def build_optimizer(model, args, device):
    """AdamW on param_groups, fused (one kernel for all parameters) on CUDA; or Muon and AdamW in one."""
    if args.optimizer == "muon":
        return MuonAdamW(param_groups(model, args.weight_decay, muon=True), lr=args.lr, momentum=args.muon_momentum)
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, fused=device.type == "cuda")


@torch.no_grad()
def monitor(accelerator, model, images):
    """Collapse monitor: statistics of the target encoder's mean-pooled features on a fixed batch."""
    encoder = accelerator.unwrap_model(model).target_encoder
    with accelerator.autocast():  # the unwrapped encoder: Accelerate's autocast is on the prepared model only
        features = torch.cat([encoder(chunk).mean(1) for chunk in images.split(256)])
    return {f"monitor_{k}": v for k, v in collapse_metrics(features).items()}


# ----------------------------------------------------------------------------------------------------
# Training (train_pijepa.py runs it with its model and sampler)


def train(args, model, sampler, script="train_ijepa"):
    run = Run(args, script, gradient_accumulation_steps=args.grad_accum)  # checks --out before anything loads
    accelerator = run.accelerator
    device, rank, processes = accelerator.device, accelerator.process_index, accelerator.num_processes
    check_compile(args.compile or args.cuda_graphs, args.cuda_graphs, device)

    # -- data: uint8 images on the device, augmented there in batches; masks drawn ahead on a CPU thread
    augment = RandomResizedCropFlip(args.image_size, scale=args.crop_scale, flip=args.flip)
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
    sampler_at = lambda step: sampler  # the mask settings of a step
    if args.target_scale_schedule:  # a pure function of the step, like the other schedules: resume is exact
        sampler_at = as_user_error(ScheduledMaskSampler, sampler, args.target_scale_schedule, total_steps).at
    # Mask settings that leave too little context fail in the sampler's redraws: here, not mid-run.
    for first_or_last in (0, total_steps):
        as_user_error(lambda: sampler_at(first_or_last).sample(args.batch_size,
                                                               step_generator(args.seed + MASK_SEED_OFFSET, 0)))
    # Draw k is a pure function of (seed, rank, k): a resumed run sees the masks an uninterrupted one would.
    mask_stream = Prefetcher(lambda k: sampler_at(k // args.grad_accum).sample(args.batch_size, step_generator(
        args.seed + MASK_SEED_OFFSET, k, rank)), device)

    # -- model and optimiser
    if args.grad_checkpointing:
        model.encoder.grad_checkpointing = model.predictor.grad_checkpointing = True
    if args.optimizer == "muon" and accelerator.distributed_type == "FSDP":  # DistributedType is a str enum
        raise UserError("--optimizer muon orthogonalises whole matrices, which FSDP shards: use --optimizer adamw "
                        "with FSDP (DDP runs Muon)")
    optimizer = build_optimizer(model, args, device)
    model, optimizer = accelerator.prepare(model, optimizer)  # its forward now runs under --mixed-precision
    raw_model = accelerator.unwrap_model(model)  # saving, EMA and FLOPs: parameter names without wrappers
    # Compiled after prepare, so that a DDP wrapper is compiled with the model; the compiled wrapper only
    # runs the step.
    step_model = compile_model(model, args.cuda_graphs) if args.compile or args.cuda_graphs else model
    config = {"script": script, "args": vars(args), "encoder": asdict(raw_model.encoder.cfg),
              "predictor": asdict(raw_model.predictor.cfg), "classes": train_set.classes,
              "train_images": len(train_set), "skipped_images": train_set.skipped, "world_size": processes,
              "torch": torch.__version__}  # evaluation rebuilds the models from config.json alone
    step = run.start(model, config, steps_per_epoch, last_step)  # clears or resumes --out, writes config.json

    # -- loop
    model.train()
    while step < last_step:
        epoch, index = divmod(step, steps_per_epoch)
        warmup = round(args.warmup_epochs * steps_per_epoch)  # schedules: pure functions of the step
        lr = warmup_cosine(step, total_steps, warmup, args.start_lr, args.lr, args.final_lr)
        weight_decay = cosine_ramp(step, total_steps, args.weight_decay, args.final_weight_decay)
        momentum = linear_ramp(step, total_steps, *args.ema)
        set_optimizer_values(optimizer, lr, weight_decay)
        for micro in range(args.grad_accum):
            draw = step * args.grad_accum + micro
            images, _ = loader.batch(epoch, index * args.grad_accum + micro, draw)  # (B, 3, S, S) normalised
            masks = mask_stream.get(draw)  # context_idx (B, Kc), target_idx (B, M, Kt): patch indices
            if args.cuda_graphs:  # a new step: the graphs may now overwrite the previous step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            with accelerator.accumulate(model):
                loss, info = step_model(images, **masks.model_inputs())  # predict the targets' EMA features
                accelerator.backward(loss)
                run.observe(loss, images.shape[0])
                update = not accelerator.sync_gradients or run.update_allowed(step)
                if args.grad_clip and accelerator.sync_gradients and update:
                    accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
                if update:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if update:
            raw_model.update_target(momentum)  # target encoder <- EMA of the context encoder
        step += 1
        if run.log_due(step):
            record = {"step": step, "epoch": step / steps_per_epoch, "lr": lr, "weight_decay": weight_decay,
                      "momentum": momentum, **run.throughput(raw_model.flops_per_image(**masks.model_inputs())),
                      **{k: float(v) for k, v in info.items()}, **{k: float(v) for k, v in masks.stats().items()}}
            record["mask_target_scale_min"], record["mask_target_scale_max"] = sampler_at(step - 1).target_scale
            if run.epoch_end(step):
                record.update(monitor(accelerator, model, monitor_images))
            run.log(record)
        if run.save_if_due(step):
            break

    # -- end
    mask_stream.close()
    run.finish(f"done: {step} steps; model and checkpoint in {args.out}")
    return model


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args)
    train(args, model, build_mask_sampler(args, model.encoder.cfg.grid_size))


if __name__ == "__main__":
    main()

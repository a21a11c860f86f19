"""Time steady-state I-JEPA (and PI-JEPA) training steps, against a plain baseline, and print one JSON line.

    python bench.py --preset cifar_vit_tiny6                     # the CIFAR comparison (ViT 192 x 6), batch 256
    python bench.py --preset cifar_vit_tiny6 --batch-size 1024
    python bench.py --preset vit_small_cifar                     # ViT-S, patch 4, 32 px, batch 512
    python bench.py --preset vitb16_224                          # ViT-B/16, 224 px, predictor 384 x 6, batch 128
    python bench.py --preset vith14_224 --grad-checkpointing     # ViT-H/14, 224 px, predictor 384 x 12, batch 64
    python bench.py --preset cpu_tiny --steps 3                  # CPU smoke test (what the tests run)

Random uint8 images stand in for a dataset: step time does not depend on pixel values. The fast path is the
training loop's (train_ijepa.train): the split on the device as uint8, batched crop and flip on the device,
masks drawn on a CPU thread ahead of time, bf16 autocast, fused AdamW, EMA as one foreach operation, static
shapes and torch.compile (CUDA graphs for the small presets). The baseline is the same model the plain way,
in the same run: a torchvision DataLoader with per-image transforms and the mask sampler in its collate
function (as the official I-JEPA code does), eager fp32, AdamW, a blocking copy of every batch.

Output (one line of JSON): preset, device (the GPU or CPU model), cpu_fast_bf16 (AMX/AVX512-BF16), threads,
matmul_tflops (a 2048^3 matmul in the run's precision, measured on the spot), batch_size, image_size, mode,
precision, gflops_per_image, and
  ijepa:    images_per_s, step_ms, tflops, mfu, matmul_fraction (tflops / matmul_tflops), peak_mem_gib,
            augment_ms, mask_ms, input_share
  baseline: images_per_s, step_ms, tflops, mfu, peak_mem_gib       (null with --no-baseline)
  speedup:  ijepa images/s over baseline images/s
  pijepa:   levels, images_per_s, step_ms, tflops, mfu, peak_mem_gib, step_ratio (over I-JEPA's step), or
            null where train_pijepa.py is missing
tflops counts matmul FLOPs analytically (IJEPA.flops_per_image in models.py, formula in the README); mfu
divides them by the GPU's dense bf16 peak (run.PEAK_BF16_TFLOPS; null on CPU or an unknown GPU).
augment_ms and mask_ms are timed alone; input_share = (augment_ms + mask_ms) / step_ms is an upper bound on
their share of the step, since masks are drawn on another CPU core while the GPU works. A path that runs
out of GPU memory reports {"error": ...} instead of numbers.
"""

import argparse
import copy
import itertools
import json
import os
import platform
import time

import torch

from common import ArgumentParser, cpu_has_fast_bf16, exit_on_user_error, param_groups
from data import (IMAGENET_MEAN, IMAGENET_STD, ImageSet, InMemoryBatches, map_tensors, Prefetcher,
                  MASK_SEED_OFFSET, RandomResizedCropFlip, step_generator, UserError)
from run import check_compile, compile_model, peak_tflops
from train_ijepa import build_mask_sampler, build_model, build_optimizer, build_parser, parse_args

# name: (train_ijepa flags, batch size, mode on CUDA). The comparison shapes.
PRESETS = {
    "cpu_tiny": (["--image-size", "32", "--patch-size", "8", "--depth", "2", "--pred-dim", "48", "--pred-depth", "1",
                  "--num-targets", "2", "--min-keep", "4"], 16, "eager"),
    "cifar_vit_tiny6": (["--model", "tiny", "--depth", "6", "--heads", "6", "--image-size", "32", "--patch-size", "4",
                         "--pred-dim", "96", "--pred-depth", "4"], 256, "cuda-graphs"),
    "vit_small_cifar": (["--model", "small", "--image-size", "32", "--patch-size", "4"], 512, "cuda-graphs"),
    "vitb16_224": (["--model", "base", "--image-size", "224", "--storage-size", "256", "--patch-size", "16",
                    "--pred-dim", "384", "--pred-depth", "6"], 128, "compile"),
    "vith14_224": (["--model", "huge", "--image-size", "224", "--storage-size", "256", "--patch-size", "14",
                    "--pred-dim", "384", "--pred-depth", "12"], 64, "compile"),
}
MODES = ("eager", "compile", "cuda-graphs")


def bench_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar_vit_tiny6", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, help="default: the preset's")
    p.add_argument("--mode", choices=MODES, help="default: the preset's on CUDA, eager on CPU")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on CUDA and on CPUs with "
                   "AMX/AVX512-BF16, else fp32")
    p.add_argument("--steps", type=int, default=30, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the plain eager fp32 DataLoader path")
    p.add_argument("--baseline-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of the baseline")
    p.add_argument("--pijepa", action=argparse.BooleanOptionalAction, default=True,
                   help="also time PI-JEPA (train_pijepa.py, default levels) with the fast path")
    return p


# ----------------------------------------------------------------------------------------------------
# Timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, calls, warmup, device):
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def matmul_tflops(device, precision, size=2048, calls=5):
    """The dense matmul rate measured on the spot (size^3, the run's precision): the ceiling the step is held
    against, on CPUs (where no peak table exists) as on GPUs."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / seconds_per_call(lambda: a @ a, calls, 1, device) / 1e12


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def throughput(batch_size, seconds, flops_per_image, peak):
    """The numbers every path reports, from its seconds per step."""
    tflops = flops_per_image * batch_size / seconds / 1e12
    return {"images_per_s": batch_size / seconds, "step_ms": seconds * 1e3, "tflops": tflops,
            "mfu": tflops / peak if peak else None}


def masked_flops(model, sampler):
    """The model's training FLOPs per image at the sampler's mask lengths (fixed per sampler)."""
    return model.flops_per_image(**sampler.sample(1, torch.Generator().manual_seed(0)).model_inputs())


def guarded(path):
    """Run a timing path; out of GPU memory becomes an {"error": ...} entry, not a crash of the whole bench."""
    try:
        return path()
    except torch.cuda.OutOfMemoryError as e:
        return {"error": f"out of GPU memory ({str(e).splitlines()[0]})"}


# ----------------------------------------------------------------------------------------------------
# The fast path: the training loop's pieces


def update(model, optimizer, loss):
    """The rest of a training step, the same on both paths: backward, optimizer, EMA."""
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_target(0.996)


def fast_path(args, model, sampler, images, device, mode, precision, steps, warmup, peak):
    model = model.to(device)
    optimizer = build_optimizer(model, args, device)
    step_model = model if mode == "eager" else compile_model(model, mode == "cuda-graphs")
    augment = RandomResizedCropFlip(args.image_size, scale=args.crop_scale, flip=args.flip)
    loader = InMemoryBatches(ImageSet(images, torch.zeros(len(images), dtype=torch.long), ["x"]), args.batch_size,
                             augment, device, args.seed)
    draw = lambda k: sampler.sample(args.batch_size, step_generator(args.seed + MASK_SEED_OFFSET, k))
    mask_stream = Prefetcher(draw, device)
    counter = itertools.count()

    def step():
        k = next(counter)
        batch, _ = loader.batch(*divmod(k, len(loader)), k)
        masks = mask_stream.get(k)
        if mode == "cuda-graphs":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = step_model(batch, **masks.model_inputs())
        update(model, optimizer, loss)

    reset_memory(device)
    seconds = seconds_per_call(step, steps, warmup, device)
    mask_stream.close()
    result = throughput(args.batch_size, seconds, masked_flops(model, sampler), peak)
    result["peak_mem_gib"] = peak_memory_gib(device)
    torch.compiler.reset()  # frees the compiled graphs (and CUDA graph memory) before the next path runs
    return result, seconds


def input_costs(args, sampler, images, device, calls, step_seconds):
    """Augmentation (on the device) and mask sampling (on one CPU thread) of one batch, each timed alone."""
    augment = RandomResizedCropFlip(args.image_size, scale=args.crop_scale, flip=args.flip)
    loader = InMemoryBatches(ImageSet(images, torch.zeros(len(images), dtype=torch.long), ["x"]), args.batch_size,
                             augment, device, args.seed)
    counter = itertools.count()
    augment_s = seconds_per_call(lambda: loader.batch(0, next(counter) % len(loader), 0), calls, 1, device)
    mask_s = seconds_per_call(lambda: sampler.sample(args.batch_size, step_generator(0, next(counter))), calls, 1,
                              torch.device("cpu"))
    return {"augment_ms": augment_s * 1e3, "mask_ms": mask_s * 1e3, "input_share": (augment_s + mask_s) / step_seconds}


# ----------------------------------------------------------------------------------------------------
# The baseline: the same model the plain way


class PerImageDataset(torch.utils.data.Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i])


class CollateWithMasks:
    """Stack the images and draw the batch's masks, in the DataLoader's workers (the official collator's way)."""

    def __init__(self, sampler):
        self.sampler, self.calls = sampler, 0

    def __call__(self, batch):
        # Each worker holds its own copy: its seed (torch.initial_seed() differs per worker) and its count.
        self.calls += 1
        generator = torch.Generator().manual_seed(torch.initial_seed() + self.calls)
        return torch.stack(batch), self.sampler.sample(len(batch), generator)


def baseline_path(args, model, sampler, images, device, steps, warmup, workers, peak):
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResizedCrop(args.image_size, scale=args.crop_scale, antialias=True),
                            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(PerImageDataset(images, transform), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers, collate_fn=CollateWithMasks(sampler),
                                         persistent_workers=workers > 0)
    model = model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    batches = (batch for _ in itertools.count() for batch in loader)

    def step():
        batch, masks = next(batches)
        masks = map_tensors(masks, lambda t: t.to(device))
        update(model, optimizer, model(batch.to(device), **masks.model_inputs())[0])

    reset_memory(device)
    seconds = seconds_per_call(step, steps, warmup, device)
    result = throughput(args.batch_size, seconds, masked_flops(model, sampler), peak)
    result["peak_mem_gib"] = peak_memory_gib(device)
    return result


# ----------------------------------------------------------------------------------------------------
# PI-JEPA, when train_pijepa.py exists


def pijepa_parts(flags):
    """(args, model, sampler) of PI-JEPA at its default levels for these flags, or None without train_pijepa."""
    try:
        import train_pijepa
    except ImportError:
        return None
    args = parse_args(flags, train_pijepa.build_pyramid_parser())
    train_pijepa.finish_pyramid_args(args)
    torch.manual_seed(args.seed)
    model = train_pijepa.build_model(args)
    return args, model, train_pijepa.build_mask_sampler(args, model.encoder.cfg.grid_size)


# ----------------------------------------------------------------------------------------------------


def bench(options):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flags, batch_size, cuda_mode = PRESETS[options.preset]
    flags = flags + ["--batch-size", str(options.batch_size or batch_size)]
    mode = options.mode or (cuda_mode if device.type == "cuda" else "eager")
    # bf16 where the hardware computes it (GPUs; CPUs with AMX/AVX512-BF16), fp32 on other CPUs
    precision = options.precision or ("bf16" if device.type == "cuda" or cpu_has_fast_bf16() else "fp32")
    check_compile(mode != "eager", mode == "cuda-graphs", device)
    args = parse_args(flags, build_parser())
    torch.manual_seed(args.seed)
    model = build_model(args)
    sampler = build_mask_sampler(args, model.encoder.cfg.grid_size)
    storage = args.storage_size or args.image_size
    images = torch.randint(0, 256, (max(8 * args.batch_size, 256), 3, storage, storage), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    for m in (model.encoder, model.predictor):
        m.grad_checkpointing = options.grad_checkpointing
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    baseline_model = copy.deepcopy(model) if options.baseline else None
    timing = (options.steps, options.warmup)

    ijepa, step_seconds = fast_path(args, model, sampler, images, device, mode, precision, *timing, peak)
    ijepa.update(input_costs(args, sampler, images, device, max(3, options.steps // 3), step_seconds))
    rate = matmul_tflops(device, precision)
    ijepa["matmul_fraction"] = ijepa["tflops"] / rate
    result = {"preset": options.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else cpu_name(), "cpu_fast_bf16": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
              "matmul_tflops": rate, "batch_size": args.batch_size, "image_size": args.image_size, "mode": mode,
              "precision": precision, "gflops_per_image": masked_flops(model, sampler) / 1e9,
              "ijepa": ijepa, "baseline": None, "speedup": None, "pijepa": None, "torch": torch.__version__}
    del model

    if options.baseline:
        result["baseline"] = guarded(lambda: baseline_path(args, baseline_model, sampler, images, device, *timing,
                                                           options.baseline_workers, peak))
        if "images_per_s" in result["baseline"]:
            result["speedup"] = ijepa["images_per_s"] / result["baseline"]["images_per_s"]
        del baseline_model

    parts = pijepa_parts(flags) if options.pijepa else None
    if parts:
        pi_args, pi_model, pi_sampler = parts
        for m in (pi_model.encoder, pi_model.predictor):
            m.grad_checkpointing = options.grad_checkpointing
        pi = guarded(lambda: fast_path(pi_args, pi_model, pi_sampler, images, device, mode, precision, *timing,
                                       peak)[0])
        if "step_ms" in pi:
            pi["step_ratio"] = pi["step_ms"] / ijepa["step_ms"]
        result["pijepa"] = {"levels": pi_args.levels, **pi}
    return result


@exit_on_user_error
def main(argv=None):
    options = bench_parser().parse_args(argv)
    if options.steps < 1 or options.warmup < 0:
        raise UserError(f"--steps must be at least 1 and --warmup at least 0, got {options.steps} {options.warmup}")
    print(json.dumps(bench(options)))


if __name__ == "__main__":
    main()

"""The GPU suite: what to run first whenever a GPU is at hand, as one command, in about 8 minutes on an H100/H200.

    python scripts/gpu_suite.py --out gpu_out --data .data/cifar10-jpeg.tar.gz    # on the GPU machine
    python scripts/gpu_suite.py --out /tmp/smoke --smoke                           # on any CPU: every item, tiny

Items, in order, each one JSON line appended to OUT/suite.jsonl as soon as it ends (an item that fails or runs
past its time limit writes {"item", "error", "seconds"} and the suite goes on):
  bench:<preset>   bench.py for every preset of the README's performance table (cifar_vit_tiny6 at batch 256
                   and 1024, vit_small_cifar, vitb16_224, vith14_224 with grad checkpointing)
  ijepa, pijepa    a short CIFAR-10 run of configs/cifar10_cpu.yaml (train_ijepa.py / train_pijepa.py), then
                   evaluate_embeddings.py on it: probe, kNN, scale retention, RankMe, train and eval seconds
OUT keeps at most 3 files (suite.jsonl, env.json, suite.log): what comes back from a remote GPU machine is
limited to a few files. The runs themselves go to a scratch folder (--scratch, default a temporary one).

Carrying the data to a GPU machine that has no network (64 MiB per call): copy
../shared/data/cifar10-jpeg.tar.gz (20 MB) to .data/ in the checkout, carry `.data`, and pass
--data .data/cifar10-jpeg.tar.gz; the archive is read directly (no unpacking). The suite needs no `datasets`.
--smoke swaps in the cpu_tiny bench preset and two-step runs on the built-in digits dataset, so the test
suite runs every code path of this script on the CPU.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, bench.py flags): the README's performance table, in the order of its rows.
BENCH = [
    ("cifar_vit_tiny6", ["--preset", "cifar_vit_tiny6"]),
    ("cifar_vit_tiny6_b1024", ["--preset", "cifar_vit_tiny6", "--batch-size", "1024", "--no-baseline"]),
    ("vit_small_cifar", ["--preset", "vit_small_cifar", "--no-baseline"]),
    ("vitb16_224", ["--preset", "vitb16_224", "--no-baseline", "--no-pijepa"]),
    ("vith14_224", ["--preset", "vith14_224", "--grad-checkpointing", "--no-baseline", "--no-pijepa"]),
]
SMOKE_BENCH = [("cpu_tiny", ["--preset", "cpu_tiny", "--steps", "2", "--warmup", "1", "--no-baseline"])]
# Short training runs: the CPU recipe's model, few epochs; the GPU's speed makes them a convergence check. Batch
# 128, not the recipe's 64: the suite's 8-minute budget was planned for its 1,950 steps per run.
RUN_FLAGS = ["--config", "configs/cifar10_cpu.yaml", "--epochs", "5", "--warmup-epochs", "1", "--batch-size", "128",
             "--compile"]
SMOKE_RUN_FLAGS = ["--dataset", "digits", "--depth", "1", "--patch-size", "4", "--pred-dim", "48", "--pred-depth",
                   "1", "--batch-size", "32", "--epochs", "1", "--max-steps", "2", "--monitor-size", "64"]
EVAL_FLAGS = ["--no-tsne", "--no-cache"]
SMOKE_EVAL_FLAGS = ["--no-tsne", "--no-cache", "--max-per-class", "20", "--scales", "2"]


def run_item(name, command, timeout, log):
    """Run one command; returns (seconds, stdout) or raises RuntimeError with the reason in one line."""
    start = time.perf_counter()
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    try:
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name}: past its {timeout} s limit") from None
    log.write(done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit status {done.returncode} (see suite.log)")
    return time.perf_counter() - start, done.stdout


def bench_item(flags, timeout, log):
    seconds, stdout = run_item("bench.py", [sys.executable, "bench.py", *flags], timeout, log)
    return {**json.loads(stdout.strip().splitlines()[-1]), "seconds": seconds}


def train_and_evaluate(script, run_flags, eval_flags, folder, timeout, log):
    train_s, _ = run_item(script, [sys.executable, script, *run_flags, "--out", folder, "--overwrite"], timeout, log)
    eval_s, _ = run_item("evaluate_embeddings.py", [sys.executable, "evaluate_embeddings.py", "--ckpt", folder,
                                                    *eval_flags], timeout, log)
    with open(os.path.join(folder, "eval", "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    return {"train_seconds": train_s, "eval_seconds": eval_s, "steps": last["step"], "final_loss": last["loss"],
            "images_per_s": last.get("images_per_s"), "results": results}


def environment():
    import torch

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "gpus": torch.cuda.device_count(), "cpus": os.cpu_count(), "host": platform.node()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for suite.jsonl, env.json and suite.log")
    p.add_argument("--data", help="CIFAR-10 as an image folder or its .tar.gz (train/ and test/ inside)")
    p.add_argument("--smoke", action="store_true", help="tiny versions of every item, on any CPU")
    p.add_argument("--scratch", help="where the training runs go (default: a temporary folder)")
    p.add_argument("--only", nargs="+", help="run only these items (bench:<name>, ijepa, pijepa)")
    p.add_argument("--item-timeout", type=int, default=240, help="seconds before an item is abandoned")
    args = p.parse_args(argv)
    if not args.smoke and not args.data:
        p.error("--data is required (CIFAR-10 folder or .tar.gz; see the docstring), or --smoke")
    os.makedirs(args.out, exist_ok=True)
    scratch = args.scratch or tempfile.mkdtemp(prefix="gpu_suite_")
    with open(os.path.join(args.out, "env.json"), "w") as f:
        json.dump(environment(), f)

    bench = SMOKE_BENCH if args.smoke else BENCH
    run_flags = SMOKE_RUN_FLAGS if args.smoke else RUN_FLAGS + ["--dataset", f"imagefolder:{os.path.abspath(args.data)}",
                                                                "--data-root", os.path.join(scratch, "cache")]
    eval_flags = SMOKE_EVAL_FLAGS if args.smoke else EVAL_FLAGS
    items = [(f"bench:{name}", lambda flags=flags: bench_item(flags, args.item_timeout, log)) for name, flags in bench]
    for name, script in (("ijepa", "train_ijepa.py"), ("pijepa", "train_pijepa.py")):
        folder = os.path.join(scratch, name)
        items.append((name, lambda s=script, d=folder: train_and_evaluate(s, run_flags, eval_flags, d,
                                                                          args.item_timeout, log)))
    if args.only:
        unknown = set(args.only) - {name for name, _ in items}
        if unknown:
            p.error(f"unknown items {sorted(unknown)}; choose from {[name for name, _ in items]}")
        items = [(name, fn) for name, fn in items if name in args.only]

    with open(os.path.join(args.out, "suite.log"), "a") as log, \
            open(os.path.join(args.out, "suite.jsonl"), "a") as out:
        for name, fn in items:
            start = time.perf_counter()
            try:
                record = {"item": name, **fn()}
            except (RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
                record = {"item": name, "error": str(e), "seconds": time.perf_counter() - start}
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(json.dumps({k: v for k, v in record.items() if k != "results"}), flush=True)


if __name__ == "__main__":
    main()

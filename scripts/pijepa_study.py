"""PI-JEPA's two claims, tested at CPU scale as one command (RESULTS.md, studies 2 and 3).

    python scripts/pijepa_study.py --out out/pijepa_study --epochs 2          # ~2 h on a 2-core CPU
    python scripts/pijepa_study.py --out /tmp/pj --smoke --seeds 0 --strategies coarse_only   # ~1 min

Claim 1, convergence ("10 epochs of PI-JEPA match 50 of I-JEPA"): on a class-balanced subset
(--max-per-class), I-JEPA for E and 5E epochs and every PI-JEPA masking strategy for E epochs, the E-epoch runs
once per --seeds. All runs share --config (default: the CIFAR-10 CPU recipe) apart from the method, so the fine
level's context and target blocks are I-JEPA's. The 5E run's weights are kept every E epochs (RUN/snapshots/),
which draws I-JEPA's probe-vs-epochs curve that the E-epoch points are read against.
Claim 2, scale robustness ("92% of accuracy kept on downsampled representations, against 80%"): every final
run is evaluated with --scales (inputs downsampled then resized back, inputs fed at low resolution, and the
latent pyramid's pooled tokens), and retention = top-1 / full-resolution top-1.

Each run is trained, then evaluated by evaluate_embeddings.py (probe and kNN fitted on the same subset of
train, tested on the whole test split). --workers runs go side by side, each with cores / workers threads: on
a 2-core CPU two one-thread runs do 1.35x the images/s of one two-thread run. A run whose eval/results.json
exists is skipped, so the command resumes after an interruption. Writes OUT/summary.json (every run's
numbers and wall times), OUT/convergence.png and OUT/scale_robustness.png (copied to --figures).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import is_complete  # noqa: E402
from masks import PYRAMID_STRATEGIES  # noqa: E402
import plots  # noqa: E402

SMOKE = ["--dataset", "digits", "--model", "tiny", "--depth", "1", "--pred-depth", "1", "--batch-size", "32",
         "--warmup-epochs", "0", "--log-every", "1", "--monitor-size", "64"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="one folder per run, the summary and the figures")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "cifar10_cpu.yaml"))
    p.add_argument("--epochs", type=int, default=2, help="E: PI-JEPA's epochs; I-JEPA also runs 5E")
    p.add_argument("--long-factor", type=int, default=5, help="I-JEPA's long run is this many times E")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the E-epoch runs")
    p.add_argument("--max-per-class", type=int, default=2000)
    p.add_argument("--strategies", nargs="+", default=list(PYRAMID_STRATEGIES), choices=PYRAMID_STRATEGIES)
    p.add_argument("--workers", type=int, default=2, help="runs at once")
    p.add_argument("--train-flags", default="", help="extra flags for every training run, e.g. '--data-root x'")
    p.add_argument("--figures", help="also copy the two figures here (e.g. docs/), named after E "
                   "(pijepa_study_e2_convergence.png), so studies at other E keep theirs")
    p.add_argument("--smoke", action="store_true", help="digits, 8 images per class, a one-block ViT, E = 1: "
                   "checks the pipeline (the test suite runs it), not PI-JEPA")
    return p


def runs_of(args):
    """(name, script, flags, epochs) for every run; the long I-JEPA run first (it is the longest)."""
    long_epochs = args.long_factor * args.epochs
    runs = [(f"ijepa_{long_epochs}ep_s{args.seeds[0]}", "train_ijepa.py", ["--seed", str(args.seeds[0]),
             "--save-every", str(args.epochs)], long_epochs)]
    for seed in args.seeds:
        runs.append((f"ijepa_{args.epochs}ep_s{seed}", "train_ijepa.py", ["--seed", str(seed)], args.epochs))
        for strategy in args.strategies:
            runs.append((f"pijepa_{strategy}_{args.epochs}ep_s{seed}", "train_pijepa.py",
                         ["--seed", str(seed), "--pyramid-masking", strategy], args.epochs))
    return runs


def keep_snapshots(run_dir, stop):
    """Copy each checkpoint's weights (RUN/checkpoints/step_N/model.safetensors; the trainer keeps the last
    two) to RUN/snapshots/step_N/, with the run's metadata and config.json, so evaluate_embeddings.py reads
    it as a run folder; the wall time since training started goes to wall.json. Scans every 2 s and once
    more after `stop` is set."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    started = time.time()
    checkpoints, snapshots = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "snapshots")

    def scan():
        for name in sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []:
            snapshot, weights = os.path.join(snapshots, name), os.path.join(checkpoints, name, "model.safetensors")
            # Only the trainer's finished checkpoints: a step_N.tmp folder being written has its weights first.
            if not is_complete(checkpoints, name) or os.path.isdir(snapshot):
                continue
            with safe_open(os.path.join(run_dir, "model.safetensors"), "pt") as f:
                metadata = {**f.metadata(), "step": str(int(name.split("_")[1]))}
            os.makedirs(snapshot + ".tmp", exist_ok=True)
            save_file(load_file(weights), os.path.join(snapshot + ".tmp", "model.safetensors"), metadata=metadata)
            shutil.copy(os.path.join(run_dir, "config.json"), snapshot + ".tmp")
            with open(os.path.join(snapshot + ".tmp", "wall.json"), "w") as f:
                json.dump({"train_seconds": time.time() - started}, f)
            os.replace(snapshot + ".tmp", snapshot)

    while not stop.wait(2.0):
        scan()
    scan()


def run_one(args, env, name, script, flags, epochs):
    """Train then evaluate one run; returns its summary record. Output goes to OUT/NAME.log."""
    run_dir = os.path.join(args.out, name)
    results_path = os.path.join(run_dir, "eval", "results.json")
    timing_path = os.path.join(run_dir, "wall.json")
    with open(os.path.join(args.out, f"{name}.log"), "a") as log:
        def call(command):
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)

        if not os.path.isfile(results_path):
            train = [sys.executable, script, "--config", args.config, "--max-per-class", str(args.max_per_class),
                     "--epochs", str(epochs), "--out", run_dir, "--overwrite", *flags, *args.train_flags.split(),
                     *(SMOKE if args.smoke else [])]
            stop = threading.Event()
            watcher = threading.Thread(target=keep_snapshots, args=(run_dir, stop), daemon=True)
            if "--save-every" in flags:
                watcher.start()
            started = time.time()
            call(train)
            train_seconds = time.time() - started
            stop.set()
            if watcher.is_alive():
                watcher.join()
            evaluate = [sys.executable, "evaluate_embeddings.py", "--no-tsne", "--max-per-class",
                        str(args.max_per_class)]
            started = time.time()
            call(evaluate + ["--ckpt", run_dir])
            eval_seconds = time.time() - started
            final_step = read_json(results_path)["checkpoint"]["step"]
            for snapshot in sorted_snapshots(run_dir):  # the curve needs accuracy only
                if snapshot.endswith(f"step_{final_step:09d}"):  # the final weights, evaluated above
                    shutil.rmtree(snapshot)
                else:
                    call(evaluate + ["--scales", "--ckpt", snapshot])
            with open(timing_path, "w") as f:
                json.dump({"train_seconds": train_seconds, "eval_seconds": eval_seconds}, f)
    record = {"name": name, "script": script, "flags": flags, "epochs": epochs, **read_json(timing_path),
              **numbers(read_json(results_path))}
    record["snapshots"] = [{"epoch": read_json(os.path.join(s, "eval", "results.json"))["checkpoint"]["step"],
                            **read_json(os.path.join(s, "wall.json")),
                            **numbers(read_json(os.path.join(s, "eval", "results.json")))}
                           for s in sorted_snapshots(run_dir)]
    steps_per_epoch = record["step"] / epochs
    for snapshot in record["snapshots"]:
        snapshot["epoch"] = round(snapshot["epoch"] / steps_per_epoch, 2)
    print(f"{name}: probe {100 * record['probe']:.1f}%, kNN {100 * record['knn']:.1f}%, "
          f"train {record['train_seconds'] / 60:.1f} min", flush=True)
    return record


def sorted_snapshots(run_dir):
    folder = os.path.join(run_dir, "snapshots")
    return ([os.path.join(folder, s) for s in sorted(os.listdir(folder)) if not s.endswith(".tmp")]
            if os.path.isdir(folder) else [])


def read_json(path):
    with open(path) as f:
        return json.load(f)


def numbers(results):
    """The few numbers the study reads from evaluate_embeddings.py's results.json."""
    return {"step": results["checkpoint"]["step"], "probe": results["linear_probe"]["top1"],
            "knn": results["knn"]["top1"], "rankme": results["collapse"]["rankme"],
            "retention": {k: v["retention"] for k, v in results["scale_robustness"].items()},
            "results": results}


def group_of(name):
    """ijepa_10ep_s0 -> ijepa_10ep: seeds of one setting form a group."""
    return name.rsplit("_s", 1)[0]


def mean(values):
    return sum(values) / len(values)


def plot_convergence(records, path):
    """Probe (solid) and kNN (dashed) top-1 against epochs and against training wall time: the long I-JEPA
    run's snapshots as a curve, each E-epoch setting as its seeds' mean with the seeds as small dots."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    long_run = max(records, key=lambda r: r["epochs"])
    groups = {}
    for r in records:
        if r is not long_run:
            groups.setdefault(group_of(r["name"]), []).append(r)
    for ax, x_key, x_label in ((axes[0], "epoch", "epochs"), (axes[1], "minutes", "training wall time (min)")):
        curve = long_run["snapshots"] + [{**long_run, "epoch": long_run["epochs"]}]
        xs = [p["epoch"] if x_key == "epoch" else p["train_seconds"] / 60 for p in curve]
        for metric, style in (("probe", "-"), ("knn", "--")):
            ax.plot(xs, [100 * p[metric] for p in curve], style, color="black", marker="o", ms=4,
                    label=f"I-JEPA, {long_run['epochs']} epochs ({'probe' if metric == 'probe' else 'kNN'})")
        colours = plt.get_cmap("tab10")
        for i, (group, members) in enumerate(sorted(groups.items())):
            x = [m["epochs"] if x_key == "epoch" else m["train_seconds"] / 60 for m in members]
            for metric, marker in (("probe", "o"), ("knn", "^")):
                ys = [100 * m[metric] for m in members]
                ax.scatter(x, ys, s=10, color=colours(i), alpha=0.5)
                ax.scatter([mean(x)], [mean(ys)], s=60, marker=marker, color=colours(i),
                           label=f"{group} ({metric})" if metric == "probe" else None)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test top-1 (%)  o probe, ^ kNN")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("PI-JEPA convergence at CPU scale: E-epoch runs against I-JEPA's 5E-epoch curve", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def averaged(members):
    """One results.json-shaped record whose accuracies and retentions are the seeds' means (for compare_bars)."""
    first = members[0]["results"]
    return {"linear_probe": {"top1": mean([m["probe"] for m in members])},
            "knn": {"top1": mean([m["knn"] for m in members]), "k": first["knn"]["k"]},
            "scale_robustness": {k: {"retention": mean([m["retention"][k] for m in members])}
                                 for k in first["scale_robustness"]}}


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.max_per_class, args.epochs = min(args.max_per_class, 8), 1
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.workers)))
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_one, args, env, *run) for run in runs_of(args)]
        records = [f.result() for f in futures]

    groups = {}
    for r in records:
        groups.setdefault(group_of(r["name"]), []).append(r)
    summary = {"settings": vars(args), "groups": {}, "runs": [{k: v for k, v in r.items() if k != "results"}
                                                               for r in records]}
    for group, members in groups.items():
        summary["groups"][group] = {"seeds": len(members), **{k: mean([m[k] for m in members]) for k in
                                                              ("probe", "knn", "rankme", "train_seconds")},
                                    "probe_range": [min(m["probe"] for m in members),
                                                    max(m["probe"] for m in members)],
                                    "retention": averaged(members)["scale_robustness"]}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    figures = [os.path.join(args.out, "convergence.png"), os.path.join(args.out, "scale_robustness.png")]
    plot_convergence(records, figures[0])
    plots.compare_bars(list(groups), [averaged(m) for m in groups.values()], figures[1])
    if args.figures:
        os.makedirs(args.figures, exist_ok=True)
        for path in figures:
            shutil.copy(path, os.path.join(args.figures, f"pijepa_study_e{args.epochs}_{os.path.basename(path)}"))
    print(f"{'group':<34} {'seeds':>5} {'probe':>7} {'kNN':>7} {'train min':>9}  retention")
    for group, g in summary["groups"].items():
        retention = " ".join(f"{k} {v['retention']:.2f}" for k, v in g["retention"].items())
        print(f"{group:<34} {g['seeds']:>5} {100 * g['probe']:>6.1f}% {100 * g['knn']:>6.1f}% "
              f"{g['train_seconds'] / 60:>9.1f}  {retention}")
    print(f"wrote {os.path.join(args.out, 'summary.json')} and {', '.join(figures)}")


if __name__ == "__main__":
    main()

"""Pictures: what the masks hide, a run's curves, and accuracy/retention bars across runs.

    python plots.py masks --image-size 64 --out docs/masks_digits.png   # digits, offline
    python plots.py masks --dataset cifar10 --image-size 64 --out docs/masks_cifar10.png
    python plots.py curves --run out/demo                               # writes out/demo/curves.png

`masks` draws one image under I-JEPA's masks and under each PI-JEPA strategy (one row each), every pyramid
level side by side (one column each): the context the predictor gets in blue, each target block in its own
warm colour, what neither sees darkened (every row samples from the same seed; the samplers consume it
differently, so the blocks differ from row to row). `curves` plots metrics.jsonl: loss
(and the per-level losses of PI-JEPA), learning rate, weight decay and EMA momentum per step, the collapse
monitor (RankMe, feature std) per epoch. evaluate_embeddings.py --compare draws its bars with `compare_bars`.
"""

import argparse
import os
import sys
import textwrap

import torch

from common import exit_on_user_error, read_metrics
from data import load_split, UserError
from masks import MultiBlockMaskSampler, PYRAMID_STRATEGIES, PyramidMaskSampler

CONTEXT_COLOUR = (0.12, 0.47, 0.95)  # blue
TARGET_COLOURS = [(0.90, 0.10, 0.10), (1.00, 0.60, 0.00), (0.85, 0.20, 0.80), (1.00, 0.90, 0.10),
                  (0.55, 0.30, 0.05), (1.00, 0.45, 0.60)]  # red, orange, magenta, yellow, brown, pink
HIDDEN_SHADE = 0.25  # brightness of what neither the context nor a target holds


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_small_png(fig, path, dpi):
    """The figure as a 256-colour PNG: photos under tinted masks compress badly in full colour (~3x larger)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


# ----------------------------------------------------------------------------------------------------
# Masks


def mask_levels(masks, grid_size, sample=0):
    """One sample of a sampler's output -> [(context (g, g) bool, targets (M, g, g) bool) per pyramid level],
    g = grid_size / 2^level: the cells the predictor is given as context and the cells of each target block.

    The one place that reads the samplers' output format: Masks (I-JEPA, one level) or PyramidMasks, whose
    context_idx (B, sum Kc_l) and target_idx (B, M, sum Kt_l) hold each level's cells in a fixed-length slice,
    indexed in pyramid order (level 0's G*G cells, then level 1's, ...)."""
    context_sizes = getattr(masks, "context_sizes", (masks.context_idx.shape[1],))
    target_sizes = getattr(masks, "target_sizes", (masks.target_idx.shape[2],))
    context_parts = masks.context_idx[sample].cpu().split(list(context_sizes))  # per level (Kc_l,)
    target_parts = masks.target_idx[sample].cpu().split(list(target_sizes), dim=-1)  # per level (M, Kt_l)
    levels, offset = [], 0
    for level, (context_idx, target_idx) in enumerate(zip(context_parts, target_parts)):
        g = grid_size // 2**level
        context = torch.zeros(g * g, dtype=torch.bool)
        context[context_idx - offset] = True
        targets = torch.zeros(target_idx.shape[0], g * g, dtype=torch.bool)
        targets.scatter_(1, target_idx - offset, True)
        levels.append((context.reshape(g, g), targets.reshape(-1, g, g)))
        offset += g * g
    return levels


def overlay(image, context, targets):
    """image (H, W, 3) float in [0, 1]; context (g, g), targets (M, g, g) bool -> (H, W, 3): the context
    tinted blue, target block m tinted TARGET_COLOURS[m], everything else darkened."""
    H, W, _ = image.shape
    g = context.shape[0]

    def pixels(cells):  # (g, g) bool -> (H, W, 1) bool: every pixel of each set cell
        return cells.repeat_interleave(H // g, 0).repeat_interleave(W // g, 1)[..., None]

    tints = [(CONTEXT_COLOUR, context, 0.45)]
    tints += [(TARGET_COLOURS[m % len(TARGET_COLOURS)], block, 0.65) for m, block in enumerate(targets)]
    out = image * HIDDEN_SHADE
    for colour, cells, strength in tints:  # later blocks paint over earlier ones where they overlap
        out = torch.where(pixels(cells), (1 - strength) * image + strength * torch.tensor(colour), out)
    return out.clamp(0, 1)


def draw_grid(ax, size, g):
    for k in range(1, g):
        at = k * size / g - 0.5
        ax.axhline(at, color="white", lw=0.4, alpha=0.5)
        ax.axvline(at, color="white", lw=0.4, alpha=0.5)


def mask_rows(grid_size, levels, num_targets, seed):
    """[(row title, sampler output or the reason it was refused)] for I-JEPA and each PI-JEPA strategy."""
    rows = [("I-JEPA", MultiBlockMaskSampler(grid_size, num_targets=num_targets))]
    for strategy in PYRAMID_STRATEGIES:
        try:
            rows.append((f"PI-JEPA {strategy}", PyramidMaskSampler(grid_size, levels=levels, strategy=strategy,
                                                                   num_targets=num_targets)))
        except ValueError as e:  # settings this strategy refuses (e.g. resampling hides all of a small grid)
            rows.append((f"PI-JEPA {strategy}", str(e)))
    return [(title, sampler if isinstance(sampler, str) else sampler.sample(1, torch.Generator().manual_seed(seed)))
            for title, sampler in rows]


def plot_masks(image, grid_size, levels, path, num_targets=4, seed=0, caption=""):
    """One row per masking (I-JEPA, then each PI-JEPA strategy), one column per pyramid level, over image
    (3, S, S) uint8. Returns the rows' titles and per-level (context cells, target cells) counts."""
    plt = pyplot()
    picture = image.permute(1, 2, 0).float() / 255  # (S, S, 3)
    rows = mask_rows(grid_size, levels, num_targets, seed)
    fig, axes = plt.subplots(len(rows), levels, figsize=(2.1 * levels + 1.6, 2.1 * len(rows) + 0.6), squeeze=False)
    summary = []
    for r, (title, masks) in enumerate(rows):
        per_level = [] if isinstance(masks, str) else mask_levels(masks, grid_size)
        summary.append((title, [(int(c.sum()), int(t.any(0).sum())) for c, t in per_level]))
        for level, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                g = grid_size // 2**level
                ax.set_title(f"level {level} ({g}x{g})", fontsize=9)
            if level == 0:
                ax.set_ylabel(title.replace("PI-JEPA ", "PI-JEPA\n"), fontsize=9)
            if isinstance(masks, str):  # the sampler's one-line reason, across the row
                ax.axis("off")
                if level == 0:
                    ax.text(0.0, 0.5, "refused by the sampler:\n" + "\n".join(textwrap.wrap(masks, 30 * levels)),
                            va="center", fontsize=7, transform=ax.transAxes)
                continue
            if level >= len(per_level):  # I-JEPA has one level
                ax.axis("off")
                continue
            context, targets = per_level[level]
            ax.imshow(overlay(picture, context, targets).numpy(), interpolation="nearest")
            draw_grid(ax, picture.shape[0], context.shape[0])
            if not targets.any():
                ax.text(0.5, 0.04, "no targets", color="white", ha="center", fontsize=7, transform=ax.transAxes)
    handles = [plt.Rectangle((0, 0), 1, 1, color=CONTEXT_COLOUR, label="context")]
    handles += [plt.Rectangle((0, 0), 1, 1, color=TARGET_COLOURS[m % len(TARGET_COLOURS)], label=f"target {m + 1}")
                for m in range(num_targets)]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=(HIDDEN_SHADE,) * 3, label="neither"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    if caption:
        fig.suptitle(caption, fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97 if caption else 1))
    save_small_png(fig, path, dpi=90)
    plt.close(fig)
    return summary


def masks_command(args):
    image_size = args.image_size
    if image_size % args.patch_size:
        raise UserError(f"--image-size {image_size} is not divisible by --patch-size {args.patch_size}")
    grid_size = image_size // args.patch_size
    levels = args.levels
    data = load_split(args.dataset, "test", data_root=args.data_root, storage_size=image_size, seed=args.seed)
    index = int(torch.randint(len(data), (1,), generator=torch.Generator().manual_seed(args.seed)))
    image = torch.nn.functional.interpolate(data.images[index: index + 1].float(), size=image_size,
                                            mode="bilinear", antialias=True)[0].round().clamp(0, 255).byte()
    kind, _, source = args.dataset.partition(":")
    name = f"{kind}:{os.path.basename(source.rstrip('/'))}" if source else kind
    caption = (f"{name} test image {index} ({data.classes[int(data.labels[index])]}), {image_size} px, "
               f"patch {args.patch_size}: {grid_size}x{grid_size} tokens, {args.num_targets} target blocks, seed "
               f"{args.seed}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    summary = plot_masks(image, grid_size, levels, args.out, args.num_targets, args.seed, caption)
    for title, counts in summary:
        cells = "; ".join(f"level {level}: {c} context, {t} target cells" for level, (c, t) in enumerate(counts))
        print(f"{title}: {cells or 'refused'}")
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------------------------------
# Curves


CURVE_PANELS = [  # (title, metrics keys or a prefix, per epoch)
    ("loss", "loss", False), ("learning rate", ("lr",), False), ("weight decay", ("weight_decay",), False),
    ("EMA momentum", ("momentum",), False), ("RankMe (held-out features)", ("monitor_rankme",), True),
    ("feature std (l2-normalised)", ("monitor_feature_std",), True)]


def plot_curves(records, path, title=""):
    """metrics.jsonl records -> one PNG of six panels; loss_* (loss_l0, loss_l1, ...) join the loss panel.
    Returns the keys plotted."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    plotted = []
    for ax, (name, keys, per_epoch) in zip(axes.flat, CURVE_PANELS):
        if keys == "loss":  # the total and its logged parts (PI-JEPA's per-level loss_l0, loss_l1, ...)
            keys = ("loss", *sorted({k for r in records for k in r if k.startswith("loss_")}))
        x_key = "epoch" if per_epoch else "step"
        for key in keys:
            points = [(r[x_key], r[key]) for r in records if key in r and x_key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if per_epoch else None, ms=3, lw=1.5 if key == "loss" else 1,
                        label=key)
                plotted.append(key)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if name == "loss" and len(keys) > 1:
            ax.legend(fontsize=8)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return plotted


def write_curves(run, path=None):
    """RUN/metrics.jsonl -> path (default RUN/curves.png); returns the path."""
    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UserError(f"{run} has no metrics.jsonl; pass the --out folder of a training run")
    records = read_metrics(metrics)
    if not records:
        raise UserError(f"{metrics} is empty: the run has not logged a step yet")
    path = path or os.path.join(run, "curves.png")
    plot_curves(records, path, f"{os.path.basename(os.path.normpath(run))}: step {records[-1].get('step')}")
    return path


# ----------------------------------------------------------------------------------------------------
# Bars across runs (evaluate_embeddings.py --compare)


def compare_bars(names, results, path):
    """Left: linear-probe and kNN top-1 per run. Right: retention (accuracy / full-resolution accuracy)
    per scale variant, one bar per run; skipped variants have no bar. Returns {scale variant: [retention of
    each run]} (NaN where skipped)."""
    import numpy as np

    plt = pyplot()
    scale_names = list(dict.fromkeys(k for r in results for k in r["scale_robustness"]))
    fig, (ax, ax_ret) = plt.subplots(1, 2, figsize=(max(5, 1.4 * len(names) + 2) + max(5, 0.9 * len(scale_names)), 4),
                                     gridspec_kw={"width_ratios": [max(1, len(names)), max(1, len(scale_names))]})
    at = np.arange(len(names))
    ax.bar(at - 0.2, [100 * r["linear_probe"]["top1"] for r in results], 0.4, label="linear probe")
    ax.bar(at + 0.2, [100 * r["knn"]["top1"] for r in results], 0.4, label=f"kNN (k={results[0]['knn']['k']})")
    ax.set_xticks(at, names, rotation=20, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8)
    width = 0.8 / len(names)
    at = np.arange(len(scale_names))
    retention = {k: [r["scale_robustness"].get(k, {}).get("retention", np.nan) for r in results] for k in scale_names}
    # Not the left panel's colours (these are runs, not metrics); tab20 once Set2's 8 would repeat.
    colours = plt.get_cmap("Set2" if len(names) <= 8 else "tab20")
    for i, name in enumerate(names):
        ax_ret.bar(at - 0.4 + width * (i + 0.5), [retention[k][i] for k in scale_names], width, label=name,
                   color=colours(i % colours.N))
    ax_ret.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_ret.set_xticks(at, [k.replace("_", " ") for k in scale_names], rotation=20, ha="right")
    ax_ret.set_ylabel("retention (top-1 / full-resolution top-1)")
    ax_ret.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return retention


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    parser = argparse.ArgumentParser(prog="plots.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("masks", help="masks over a real image: I-JEPA and each PI-JEPA strategy, every level")
    m.add_argument("--dataset", default="digits", help="digits (offline) | cifar10 | cifar100 | imagefolder:<dir> "
                   "| ... (as the training scripts)")
    m.add_argument("--data-root", default="data")
    m.add_argument("--image-size", type=int, default=32)
    m.add_argument("--patch-size", type=int, default=4)
    m.add_argument("--levels", type=int, default=3, help="pyramid levels (train_pijepa.py's default on 8x8 "
                   "and larger grids)")
    m.add_argument("--num-targets", type=int, default=4)
    m.add_argument("--seed", type=int, default=0, help="picks the image and the masks")
    m.add_argument("--out", default="masks.png")
    c = commands.add_parser("curves", help="a run's curves from its metrics.jsonl")
    c.add_argument("--run", required=True, help="a run folder")
    c.add_argument("--out", help="default: RUN/curves.png")
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "masks":
        masks_command(args)
    else:
        print(f"wrote {write_curves(args.run, args.out)}")


if __name__ == "__main__":
    sys.exit(main())

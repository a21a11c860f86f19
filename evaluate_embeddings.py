"""Judge a checkpoint's frozen features: linear probe, kNN, scale robustness, collapse monitors, t-SNE/PCA.

    python evaluate_embeddings.py --ckpt out/demo                     # dataset taken from the run's config
    python evaluate_embeddings.py --ckpt out/c10 --encoder context --pool last4
    python evaluate_embeddings.py --ckpt out/c10 --dataset imagefolder:data/my_images --no-tsne
    python evaluate_embeddings.py --ckpt out/h --features head        # the hierarchical head's features
    python evaluate_embeddings.py --compare out/a out/b              # one table + accuracy, retention bars

The encoder is rebuilt from the folder alone (config.json + model.safetensors; for a hierarchical-head run,
--features backbone is the frozen backbone its head reads). The dataset, image size and data settings default
to the run's own; the probe and kNN use the whole train split (--max-per-class to subsample). Writes
CKPT/eval/results.json (every number, the settings, the checkpoint's step) and CKPT/eval/embeddings.png, and
prints a short table. Features are extracted once per split and test variant (bf16 on GPUs and AMX CPUs, else fp32)
and cached in CKPT/eval/ under a hash of the weights files (size, time stamp, step), the config and every
setting, so a second evaluation skips the encoder (--no-cache: nothing stored). Evaluating the 2-epoch
`digits` quick-start checkpoint takes about 30 s on a 2-core CPU, 8 s from the cache (t-SNE included).

Protocol
  features      --pool mean: mean over the tokens of the last block (after the final LayerNorm);
                --pool last4: the means of the last four blocks, concatenated (the I-JEPA paper's probe).
  linear probe  features standardised with the train statistics; multinomial logistic regression, mean
                cross-entropy + wd/2 |W|^2, fitted full-batch by L-BFGS (convex: deterministic, no learning
                rate to tune); wd swept over --weight-decays on a seeded 10% validation split of train (ties
                go to the stronger wd), refitted on all of train, top-1 on test. --probe sklearn fits
                LogisticRegression with C = 1 / (wd N), the same objective, chosen the same way.
  kNN           cosine similarity to every train feature, k = 20 neighbours, votes weighted by
                exp(similarity / 0.07) as in DINO; top-1.
  scale         the full-resolution probe, applied to test features of
                (a) resized_Nx: images downsampled N times then resized back to the input size;
                (b) lowres_Nx: images fed at the low resolution (rounded down to whole patches), the
                    position embeddings interpolated to the smaller grid (skipped below one patch);
                (c) pyramid_Nx: the latent pyramid of PI-JEPA's targets, level 0 = the last block's tokens
                    layer-normed without affine, level l = 2x2 average pool of level l-1 layer-normed
                    again; a level's feature is the mean over its cells, and a probe trained on level 0
                    (the main probe's wd) is tested on level log2(N) (N a power of two dividing the grid,
                    else skipped). Mean pooling alone is blind to average pooling; re-normalising divides
                    each coarse cell by its own spread, so (c) asks whether coarse cells stay in the fine
                    tokens' space: agreeing neighbours keep it near 1, while features dominated by one
                    shared direction (typical early in training) fall towards chance.
                Each is reported as top-1 and as retention = top-1 / full-resolution top-1 (level 0's for (c)).
  collapse      RankMe, mean std of l2-normalised features, variance in the top principal components, on
                the test features (common.collapse_metrics: the monitor training logs every epoch).
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import checkpoints
import models
from common import (ArgumentParser, atomic_save_safetensors, atomic_write_json, collapse_metrics,
                    exit_on_user_error, inference_autocast)
from data import class_balanced_subset, eval_transform, holdout_split, load_split, progress, UserError
from plots import compare_bars, write_curves
from settings import non_negative_float, positive_int

CACHE_VERSION = 1
RESULTS_VERSION = 1
EVAL_DIR = "eval"

# ----------------------------------------------------------------------------------------------------
# Settings


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="a training run's --out folder (config.json + model.safetensors)")
    what.add_argument("--compare", nargs="+", metavar="RUN", help="run folders (or results.json files) "
                      "already evaluated: print one table and draw accuracy and retention bars")

    g = p.add_argument_group("data (default: the run's own settings)")
    g.add_argument("--dataset", help="digits | cifar10 | cifar100 | imagefolder:<dir|tar> | "
                   "tiny-imagenet:<dir|tar.gz> | hf:<hub id>")
    g.add_argument("--data-root", help="where cifar downloads and decoded-image caches go")
    g.add_argument("--image-size", type=positive_int, help="input size (position embeddings interpolate)")
    g.add_argument("--storage-size", type=positive_int, help="size images are decoded to (folders, hub)")
    g.add_argument("--max-per-class", type=positive_int, help="probe and kNN on a seeded class-balanced "
                   "subset of train (default: all of it)")
    g.add_argument("--image-column", help="hf: image column")
    g.add_argument("--label-column", help="hf: label column")
    g.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, help="skip unreadable images")

    g = p.add_argument_group("features")
    g.add_argument("--features", default="backbone", choices=("backbone", "head"),
                   help="the encoder's pooled tokens, or the hierarchical head's output")
    g.add_argument("--encoder", default="target", choices=("target", "context"), help="which encoder")
    g.add_argument("--pool", default="mean", choices=("mean", "last4"), help="mean of the last block, or "
                   "the concatenated means of the last four blocks")
    g.add_argument("--batch-size", type=positive_int, default=512)
    g.add_argument("--device", help="default: cuda when available, else cpu")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse and store features in CKPT/eval/")

    g = p.add_argument_group("probe and kNN")
    g.add_argument("--probe", default="torch", choices=("torch", "sklearn"),
                   help="L-BFGS in torch (GPU or CPU), or scikit-learn's LogisticRegression")
    g.add_argument("--weight-decays", type=non_negative_float, nargs="+",
                   default=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6), help="the sweep, strongest first")
    g.add_argument("--val-fraction", type=float, default=0.1, help="of train, for choosing the weight decay")
    g.add_argument("--probe-iters", type=positive_int, default=200, help="L-BFGS iterations per fit (sklearn: "
                   "at least 1000)")
    g.add_argument("--knn-k", type=positive_int, default=20)
    g.add_argument("--knn-temperature", type=float, default=0.07)
    g.add_argument("--seed", type=int, default=0, help="validation split and t-SNE sample (the data split "
                   "itself uses the run's seed, so the test images stay the ones training held out)")

    g = p.add_argument_group("scale robustness and plots")
    g.add_argument("--scales", type=int, nargs="*", default=(2, 4), help="downsampling factors ('--scales' "
                   "alone: none)")
    g.add_argument("--tsne", action=argparse.BooleanOptionalAction, default=True, help="t-SNE beside PCA")
    g.add_argument("--tsne-samples", type=positive_int, default=2000, help="class-balanced test sample")
    g.add_argument("--plot-classes", type=positive_int, default=20, help="classes shown in the plots")
    g.add_argument("--compare-plot", default="compare.png", help="--compare: where the bars go")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if any(f < 2 for f in args.scales):
        raise UserError(f"--scales must be downsampling factors >= 2, got {args.scales}")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must lie between 0 and 1, got {args.val_fraction}")
    if args.knn_temperature <= 0:
        raise UserError(f"--knn-temperature must be positive, got {args.knn_temperature}")
    return args


def data_settings(args, run_config):
    """The data to evaluate on: the run's own unless overridden. The split seed is the run's so that the
    test split holds the images training held out (digits and folders without train/test split)."""
    run_args = run_config.get("args", {})
    same = args.dataset is None or args.dataset == run_args.get("dataset")
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else (
        run_args.get(name) if same else None)
    dataset = args.dataset or run_args.get("dataset")
    image_size = args.image_size or run_config.get("image_size") or run_args.get("image_size")
    if not dataset or not image_size:
        raise UserError(f"{args.ckpt}/config.json names no dataset or image size; pass --dataset and --image-size")
    storage = pick("storage_size")
    if storage is None and dataset.partition(":")[0] in ("imagefolder", "hf"):
        storage = image_size  # whole images are resized to the input size anyway
    return {"dataset": dataset, "image_size": image_size, "storage_size": storage,
            "data_root": args.data_root or run_args.get("data_root", "data"),
            "seed": run_args.get("seed", 0) if same else args.seed,
            "skip_bad_images": bool(pick("skip_bad_images")), "image_column": pick("image_column"),
            "label_column": pick("label_column"), "max_per_class": args.max_per_class}


# ----------------------------------------------------------------------------------------------------
# Checkpoint and features


def read_run(folder):
    """config.json of a run folder, with missing or damaged files as one-line errors."""
    try:
        config = checkpoints.read_run_config(folder)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise UserError(f"{folder} has no model.safetensors: the run has not finished an epoch yet")
    return config


def checkpoint_meta(folder):
    """model.safetensors metadata: {"step": int or None, "script": str or None}."""
    from safetensors import safe_open, SafetensorError

    path = os.path.join(folder, "model.safetensors")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is unreadable ({e}); it is truncated or not a safetensors file") from None
    return {"step": int(meta["step"]) if meta.get("step", "").isdigit() else None, "script": meta.get("script")}


def weights_stats(path):
    """[name, size, time stamp] of a run folder's top-level weights files, or of one checkpoint file."""
    names = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))
                                                  if f.endswith(".safetensors")]
    return [[os.path.basename(n), os.stat(n).st_size, os.stat(n).st_mtime_ns] for n in names]


def checkpoint_fingerprint(folder, run_config):
    """What the features depend on in the folder: its weights files, step and config, and for a head run
    the backbone it points to. Retraining or replacing any of them changes the fingerprint."""
    backbone = run_config.get("backbone", {}).get("path")
    backbone_stats = weights_stats(backbone) if backbone and os.path.exists(backbone) else []
    return {"files": weights_stats(folder), "backbone": backbone_stats, "step": checkpoint_meta(folder)["step"],
            "config": digest(run_config)}


def load_feature_models(args, run_config):
    """(encoder, head or None). A hierarchical-head run's backbone is the frozen encoder its head reads."""
    if args.features == "head" and "head" not in run_config:
        raise UserError(f"{args.ckpt} has no hierarchical head (its config.json has no 'head'); evaluate a "
                        "train_hierarchical_predictor.py folder, or use --features backbone")
    try:
        if args.features == "head" or "head" in run_config:
            head = models.load_hierarchical_head(args.ckpt)
            return head.backbone, head if args.features == "head" else None
        return models.load_encoder(args.ckpt, args.encoder), None
    except (FileNotFoundError, ValueError) as e:  # missing or mismatched weights, no head: the message says
        raise UserError(str(e)) from None


def backbone_feature_fn(encoder, pool, pyramid_levels=0):
    """images -> {"features": (B, D) or (B, 4D) for last4} plus, with pyramid_levels, "pyramid": (B, L, D)."""
    depth = len(encoder.blocks)
    if pool == "last4" and not isinstance(encoder, models.VisionTransformer):
        raise UserError(f"--pool last4 reads four ViT blocks; this encoder is a {type(encoder).__name__} with one "
                        "layer of tokens: use --pool mean")
    if pool == "last4" and depth < 4:
        raise UserError(f"--pool last4 needs an encoder of at least 4 blocks, this one has {depth}; "
                        "use --pool mean")
    blocks = [-4, -3, -2, -1] if pool == "last4" else [-1]

    def feature_fn(images):
        outputs = encoder.forward_intermediates(images, blocks)  # each (B, N, D)
        result = {"features": torch.cat([tokens.mean(1) for tokens in outputs], dim=1)}
        if pyramid_levels:
            grid = images.shape[-1] // encoder.cfg.patch_size
            result["pyramid"] = pyramid_means(outputs[-1], grid, pyramid_levels)
        return result

    return feature_fn


def pyramid_means(tokens, grid, levels):
    """(B, G*G, D) tokens -> (B, levels, D): the mean over the cells of each level of the latent pyramid
    that PI-JEPA predicts (models.pyramid_pool of the tokens layer-normed without affine)."""
    pyramid = models.pyramid_pool(F.layer_norm(tokens.float(), tokens.shape[-1:]), grid, levels)  # (B, P, D)
    offsets = models.pyramid_offsets(grid, levels)
    return torch.stack([pyramid[:, start:end].mean(1) for start, end in zip(offsets, offsets[1:])], dim=1)


@dataclass(frozen=True)
class Variant:
    """How test images reach the encoder: "full", "resized" (down by factor then back up) or "lowres"
    (down by factor, to whole patches, with interpolated position embeddings)."""
    kind: str = "full"
    factor: int = 1

    @property
    def name(self):
        return "full" if self.kind == "full" else f"{self.kind}_{self.factor}x"

    def low_size(self, image_size, patch_size):
        size = image_size // self.factor
        return size // patch_size * patch_size if self.kind == "lowres" else size

    def transform(self, images, image_size, patch_size):
        """uint8 (B, 3, S, S) -> normalised float at the size this variant feeds the encoder."""
        if self.kind == "full":
            return eval_transform(images, image_size)
        low = eval_transform(images, self.low_size(image_size, patch_size))
        if self.kind == "lowres":
            return low
        return F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)


@torch.no_grad()
def extract(feature_fn, images, transform, batch_size, device, desc="features"):
    """uint8 images (N, 3, S, S) -> dict of (N, ...) float32 CPU tensors, one batch at a time."""
    parts = []
    with inference_autocast(device):
        for chunk in progress(images.split(batch_size), desc, unit="batch"):
            out = feature_fn(transform(chunk.to(device, non_blocking=True)))
            parts.append({k: v.float().cpu() for k, v in out.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def data_fingerprint(data):
    """Shape, labels and a strided sample of ~1M pixels: cheap, and any real change of the data shows."""
    flat = data.images.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 1_000_000)].contiguous()
    digest = hashlib.sha256(str(tuple(data.images.shape)).encode())
    digest.update(data.labels.numpy().tobytes())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cached(eval_dir, key, compute, enabled=True):
    """compute() -> dict of tensors, stored in eval_dir under a hash of key (which must hold the checkpoint
    fingerprint under "checkpoint"). Returns (tensors, True if read from the cache). Files of an older
    checkpoint can never match again and are deleted when a new one is written."""
    if not enabled:
        return compute(), False
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    checkpoint_tag = digest(key["checkpoint"])[:8]
    path = os.path.join(eval_dir, f"features-{checkpoint_tag}-{digest([key, CACHE_VERSION])[:16]}.safetensors")
    if os.path.isfile(path):
        try:
            return load_file(path), True
        except (SafetensorError, OSError):  # a damaged cache file is rebuilt, never trusted
            pass
    tensors = compute()
    for name in os.listdir(eval_dir):
        if name.startswith("features-") and not name.startswith(f"features-{checkpoint_tag}-"):
            os.remove(os.path.join(eval_dir, name))
    atomic_save_safetensors(path, tensors)
    return tensors, False


# ----------------------------------------------------------------------------------------------------
# Linear probe and kNN


@dataclass
class LinearProbe:
    mean: torch.Tensor  # (D,) train statistics for standardising
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def logits(self, features):
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def accuracy(self, features, labels):
        return float((self.logits(features).argmax(1) == labels).float().mean())


def standardiser(features):
    return features.mean(0), features.std(0).clamp_min(1e-6)


def fit_lbfgs(features, labels, num_classes, weight_decay, iters):
    """Minimise mean cross-entropy + weight_decay/2 |W|^2 full-batch with L-BFGS from zero weights."""
    mean, std = standardiser(features)
    x = (features - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iters, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def fit_sklearn(features, labels, num_classes, weight_decay, iters):
    """scikit-learn's LogisticRegression on the same objective: C = 1 / (weight_decay * N)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, std = standardiser(features)
    x = ((features - mean) / std).cpu().double().numpy()
    C = 1.0 / max(weight_decay * len(x), 1e-12)
    with warnings.catch_warnings():  # weak decays never converge exactly: the cap is the stopping rule,
        warnings.simplefilter("ignore", ConvergenceWarning)  # as for the torch probe
        model = LogisticRegression(C=C, max_iter=max(iters, 1000)).fit(x, labels.cpu().numpy())
    coef = torch.as_tensor(model.coef_, dtype=torch.float32)
    intercept = torch.as_tensor(model.intercept_, dtype=torch.float32)
    if len(model.classes_) == 2:  # one logit z for class 1: logits (0, z) give the same decisions
        coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros(1), intercept])
    weight = torch.zeros(num_classes, x.shape[1])
    bias = torch.full((num_classes,), -1e9)  # a class absent from train is never predicted
    present = torch.as_tensor(model.classes_)
    weight[present], bias[present] = coef, intercept
    return LinearProbe(mean, std, weight.to(features.device), bias.to(features.device))


PROBES = {"torch": fit_lbfgs, "sklearn": fit_sklearn}


def train_probe(features, labels, num_classes, weight_decays, val_fraction=0.1, seed=0, method="torch",
                iters=200):
    """Choose the weight decay on a seeded per-class validation split of train, refit on all of train.
    Returns (probe, chosen weight decay, {weight decay: validation top-1})."""
    fit = PROBES[method]
    fit_idx, val_idx = (i.to(features.device) for i in holdout_split(labels.cpu(), val_fraction, seed))
    val_top1 = {}
    for wd in progress(weight_decays, "linear probe, weight decays", unit="fit"):
        probe = fit(features[fit_idx], labels[fit_idx], num_classes, wd, iters)
        val_top1[wd] = probe.accuracy(features[val_idx], labels[val_idx])
    best = max(weight_decays, key=val_top1.get)  # the first maximum: the strongest decay among ties
    return fit(features, labels, num_classes, best, iters), best, val_top1


@torch.no_grad()
def knn_predict(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07,
                batch_size=1024):
    """Weighted kNN (DINO): cosine similarity, the k nearest train features vote exp(similarity / T)."""
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    predictions = []
    for chunk in test_features.split(batch_size):
        similarity = F.normalize(chunk.float(), dim=1) @ train.T  # (b, N_train)
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[index], (top / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


# ----------------------------------------------------------------------------------------------------
# Plots


def plot_embeddings(features, labels, classes, path, seed=0, samples=2000, max_classes=20, tsne=True):
    """PCA (and t-SNE) of a seeded class-balanced sample of at most max_classes classes, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(len(classes), max_classes)
    allowed = (labels < shown).nonzero().flatten()
    index = allowed[class_balanced_subset(labels[allowed], max(1, samples // shown), seed)]
    x, y = features[index].float(), labels[index].numpy()
    centred = x - x.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    explained = (singular[:2] ** 2 / (singular**2).sum().clamp_min(1e-12)).tolist()
    panels = [(f"PCA ({100 * explained[0]:.0f}% + {100 * explained[-1]:.0f}% of variance)",
               (centred @ vh[:2].T).numpy())]
    if tsne and len(x) >= 5:
        from sklearn.manifold import TSNE

        embedded = TSNE(perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(
            x.numpy())
        panels.insert(0, (f"t-SNE ({len(x)} test images)", embedded))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2, 6), squeeze=False)
    cmap = plt.get_cmap("tab20" if shown > 10 else "tab10")
    for ax, (title, points) in zip(axes[0], panels):
        for c in range(shown):
            at = y == c
            ax.scatter(points[at, 0], points[at, 1], s=6, color=cmap(c % cmap.N), label=str(classes[c]))
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8,
                       title=f"{shown} of {len(classes)} classes" if shown < len(classes) else None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Evaluation


def scale_variants(scales, features_kind, grid_size):
    """{name: Variant or the reason it is skipped} for each factor: resized, lowres, and the pyramid level."""
    variants = {}
    for factor in scales:
        variants[f"resized_{factor}x"] = Variant("resized", factor)
        if features_kind != "backbone":
            variants[f"lowres_{factor}x"] = variants[f"pyramid_{factor}x"] = "needs --features backbone"
            continue
        low_grid = grid_size // factor
        variants[f"lowres_{factor}x"] = Variant("lowres", factor) if low_grid >= 1 else (
            f"a {grid_size}x{grid_size} token grid downsampled {factor}x is smaller than one patch")
        level = int(math.log2(factor))
        variants[f"pyramid_{factor}x"] = level if 2**level == factor and grid_size % factor == 0 else (
            f"the latent pyramid halves a {grid_size}x{grid_size} grid: {factor}x needs a power of two "
            "dividing the grid")
    return variants


@contextlib.contextmanager
def timed(timings, name):
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


class FeatureSource:
    """The features of one checkpoint under one set of settings, extracted once per (split, variant) and
    cached in eval_dir. The full-resolution pass of a backbone also gives the latent-pyramid means."""

    def __init__(self, args, run_config, settings, eval_dir, device):
        encoder, head = load_feature_models(args, run_config)
        self.encoder, self.head = encoder.to(device), head and head.to(device)
        self.args, self.eval_dir, self.device = args, eval_dir, device
        self.image_size, self.patch = settings["image_size"], encoder.cfg.patch_size
        if self.image_size % self.patch:
            raise UserError(f"--image-size {self.image_size} is not divisible by the encoder's patch size "
                            f"{self.patch}; choose a multiple of {self.patch}")
        self.variants = scale_variants(args.scales, args.features, self.image_size // self.patch)
        self.pyramid_levels = 1 + max([v for v in self.variants.values() if isinstance(v, int)], default=0)
        self.encoder_name = run_config["backbone"]["which"] if "head" in run_config else args.encoder
        self.key = {"checkpoint": checkpoint_fingerprint(args.ckpt, run_config), "features": args.features,
                    "encoder": self.encoder_name, "pool": args.pool, "data": settings}
        self.hits, self.timings = {}, {}

    def levels(self, split, variant):
        """Latent-pyramid levels a pass computes (0: none). They depend on --scales, so they are part of
        the cache key: a cached pass with fewer levels must not answer for one with more."""
        if self.head is not None or variant.kind != "full" or self.pyramid_levels == 1:
            return 0
        return self.pyramid_levels if split == "test" else 1  # the pyramid probe trains on level 0 only

    def feature_fn(self, split, variant):
        if self.head is not None:
            return lambda images: {"features": self.head(images)}
        return backbone_feature_fn(self.encoder, self.args.pool, self.levels(split, variant))

    def get(self, split, data, variant=Variant()):
        """{"features": (N, D)[, "pyramid": (N, L, D)]} of one split's images, on the device."""
        key = dict(self.key, split=split, variant=variant.name, pyramid_levels=self.levels(split, variant),
                   data_fingerprint=data_fingerprint(data))
        transform = lambda x: variant.transform(x, self.image_size, self.patch)
        compute = lambda: extract(self.feature_fn(split, variant), data.images, transform, self.args.batch_size,
                                  self.device, f"features {split} {variant.name}")
        with timed(self.timings, "features_s"):
            tensors, self.hits[f"{split}/{variant.name}"] = cached(self.eval_dir, key, compute, self.args.cache)
        return {k: v.to(self.device) for k, v in tensors.items()}


def scale_robustness(source, test, probe, full_top1, pyramid, pyramid_probe):
    """{name: {"top1", "retention", ...} or {"skipped": reason}} for every scale variant; pyramid: the
    test split's (N, L, D) level means, or None."""
    test_y = test.labels.to(source.device)
    if pyramid_probe is not None:
        level0_top1 = pyramid_probe.accuracy(pyramid[:, 0], test_y)
    scale = {}
    for name, variant in source.variants.items():
        if isinstance(variant, str):
            scale[name] = {"skipped": variant}
        elif isinstance(variant, int):  # a pyramid level
            top1 = pyramid_probe.accuracy(pyramid[:, variant], test_y)
            scale[name] = {"top1": top1, "retention": top1 / max(level0_top1, 1e-12), "level": variant,
                           "level0_top1": level0_top1}
        else:
            top1 = probe.accuracy(source.get("test", test, variant)["features"], test_y)
            scale[name] = {"top1": top1, "retention": top1 / max(full_top1, 1e-12),
                           "input_size": variant.low_size(source.image_size, source.patch)}
    return scale


def evaluate(args, source, train, test):
    """Every number of results.json except the checkpoint and settings blocks, and the test features."""
    train_out, test_out = source.get("train", train), source.get("test", test)
    num_classes, timings = len(test.classes), source.timings
    train_y, test_y = train.labels.to(source.device), test.labels.to(source.device)

    with timed(timings, "probe_s"):
        probe, best_wd, val_top1 = train_probe(train_out["features"], train_y, num_classes, args.weight_decays,
                                               args.val_fraction, args.seed, args.probe, args.probe_iters)
        full_top1 = probe.accuracy(test_out["features"], test_y)
    with timed(timings, "knn_s"):
        knn = knn_predict(train_out["features"], train_y, test_out["features"], num_classes, args.knn_k,
                          args.knn_temperature)
        knn_top1 = float((knn == test_y).float().mean())
    with timed(timings, "scale_s"):
        pyramid_probe = PROBES[args.probe](train_out["pyramid"][:, 0], train_y, num_classes, best_wd,
                                           args.probe_iters) if "pyramid" in train_out else None
        scale = scale_robustness(source, test, probe, full_top1, test_out.get("pyramid"), pyramid_probe)
    results = {
        "linear_probe": {"top1": full_top1, "method": args.probe, "weight_decay": best_wd,
                         "val_top1": {f"{wd:g}": acc for wd, acc in val_top1.items()}},
        "knn": {"top1": knn_top1, "k": args.knn_k, "temperature": args.knn_temperature},
        "scale_robustness": scale,
        "collapse": collapse_metrics(test_out["features"]),
        "feature_dim": int(train_out["features"].shape[1]),
        "cache_hits": source.hits,
        "timings": timings,
    }
    return results, test_out["features"].cpu()


def load_data(settings):
    common = {k: settings[k] for k in ("data_root", "storage_size", "seed", "skip_bad_images", "image_column",
                                       "label_column")}
    train = load_split(settings["dataset"], "train", max_per_class=settings["max_per_class"], **common)
    test = load_split(settings["dataset"], "test", **common)
    if len(train.classes) != len(test.classes):
        raise UserError(f"{settings['dataset']}: train has {len(train.classes)} classes, test "
                        f"{len(test.classes)}; give both splits the same class folders")
    return train, test


def pick_device(name):
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {e}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no GPU is visible; use --device cpu")
    return device


def run_evaluation(args):
    start = time.perf_counter()
    run_config = read_run(args.ckpt)
    meta = checkpoint_meta(args.ckpt)
    settings = data_settings(args, run_config)
    device = pick_device(args.device)
    eval_dir = os.path.join(args.ckpt, EVAL_DIR)
    try:
        os.makedirs(eval_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {eval_dir} ({e.strerror}); check the folder's permissions") from None
    source = FeatureSource(args, run_config, settings, eval_dir, device)
    train, test = load_data(settings)
    numbers, test_features = evaluate(args, source, train, test)

    start_plot = time.perf_counter()
    plot_path = os.path.join(eval_dir, "embeddings.png")
    plot_embeddings(test_features, test.labels, test.classes, plot_path, args.seed, args.tsne_samples,
                    args.plot_classes, args.tsne)
    plots = {"embeddings": os.path.relpath(plot_path, args.ckpt)}
    if os.path.isfile(os.path.join(args.ckpt, "metrics.jsonl")):  # a training run's curves, beside its numbers
        plots["curves"] = os.path.relpath(write_curves(args.ckpt, os.path.join(eval_dir, "curves.png")), args.ckpt)
    numbers["timings"]["plots_s"] = time.perf_counter() - start_plot
    numbers["timings"]["total_s"] = time.perf_counter() - start
    results = {
        "version": RESULTS_VERSION,
        "checkpoint": {"folder": os.path.abspath(args.ckpt), "step": meta["step"], "script": meta["script"]},
        "settings": {**settings, "features": args.features, "encoder": source.encoder_name, "pool": args.pool,
                     "probe": args.probe, "weight_decays": list(args.weight_decays), "seed": args.seed,
                     "val_fraction": args.val_fraction, "scales": list(args.scales), "device": str(device),
                     "train_images": len(train), "test_images": len(test), "classes": test.classes},
        **numbers,
        "plots": plots,
    }
    atomic_write_json(os.path.join(eval_dir, "results.json"), results)
    print(summary_table(results))
    written = [os.path.join(args.ckpt, path) for path in (os.path.join(EVAL_DIR, "results.json"), *plots.values())]
    print(f"wrote {', '.join(written)}")
    return results


# ----------------------------------------------------------------------------------------------------
# Tables


def percent(value):
    return f"{100 * value:.1f}%"


def format_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(results):
    s, c = results["settings"], results["collapse"]
    title = (f"{s['features']} features ({s['encoder']} encoder, {s['pool']} pool) of step "
             f"{results['checkpoint']['step']} on {s['dataset']} at {s['image_size']} px: "
             f"{s['train_images']} train / {s['test_images']} test")
    probe = results["linear_probe"]
    rows = [["linear probe", percent(probe["top1"]), f"{probe['method']}, weight decay {probe['weight_decay']:g}"],
            [f"kNN k={results['knn']['k']}", percent(results["knn"]["top1"]), ""]]
    for name, entry in results["scale_robustness"].items():
        rows.append([name.replace("_", " "), percent(entry["top1"]), f"retention {entry['retention']:.2f}"]
                    if "top1" in entry else [name.replace("_", " "), "-", f"skipped: {entry['skipped']}"])
    collapse = ", ".join(f"{k} {v:.3g}" for k, v in c.items())
    return f"{title}\n{format_table(['metric', 'top-1', 'note'], rows)}\ncollapse: {collapse}"


def read_results(path):
    file = os.path.join(path, EVAL_DIR, "results.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"{path} has no {EVAL_DIR}/results.json; run python evaluate_embeddings.py --ckpt {path} first")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e}); evaluate the run again") from None


def compare(paths, plot_path):
    results = [read_results(p) for p in paths]
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.normpath(p) for p in paths]
    scale_names = list(dict.fromkeys(k for r in results for k in r["scale_robustness"]))
    header = ["run", "step", "probe", "kNN", *[f"{k} ret." for k in scale_names], "rankme"]
    rows = []
    for name, r in zip(names, results):
        scale = [f"{r['scale_robustness'][k]['retention']:.2f}" if "top1" in r["scale_robustness"].get(k, {})
                 else "-" for k in scale_names]
        rows.append([name, r["checkpoint"]["step"], percent(r["linear_probe"]["top1"]), percent(r["knn"]["top1"]),
                     *scale, f"{r['collapse']['rankme']:.1f}"])
    print(format_table(header, rows))
    compare_bars(names, results, plot_path)
    print(f"wrote {plot_path}")
    return rows


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, args.compare_plot)
    return run_evaluation(args)


if __name__ == "__main__":
    main()

"""Plumbing the scripts share: one-line errors, atomic files, run folders, checkpoints, schedules,
parameter groups, metrics and the collapse monitor. No training loop lives here."""

import functools
import json
import math
import os
import shutil
import sys

import torch

from data import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"  # a file in CHECKPOINTS naming the newest complete checkpoint
STATE_FILE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete


def exit_on_user_error(main):
    """Run main(); a UserError becomes one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def as_user_error(fn, *args, **kwargs):
    """Call fn; its ValueError (a bad setting caught by models.py or masks.py) becomes a UserError."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# Atomic files: write a temporary file beside the target, fsync, rename over it, fsync the folder.


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(tmp_path) then atomically move it to path: readers see the old file or the new, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(folder)


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path, tensors, metadata=None):
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ----------------------------------------------------------------------------------------------------
# Run folders


RUN_FILES = ("config.json", "model.safetensors", "metrics.jsonl", CHECKPOINTS)


def prepare_out_dir(out, resume, overwrite, min_free_bytes=0):
    """Check the output folder before any training: writable, enough space, and not a run we would
    overwrite by accident. Returns True when there is a run to resume."""
    existing = os.path.isdir(out) and any(os.path.exists(os.path.join(out, f)) for f in RUN_FILES)
    if existing and not (resume or overwrite):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out} ({e.strerror}); choose another --out") from None
    free = shutil.disk_usage(out).free
    if free < min_free_bytes:
        raise UserError(f"only {free / 2**20:.0f} MiB free in {out}, a checkpoint needs about "
                        f"{min_free_bytes / 2**20:.0f} MiB; free some space or choose another --out")
    if existing and overwrite and not resume:
        for name in RUN_FILES:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
        return False
    return resume and latest_checkpoint(out) is not None


def latest_checkpoint(out):
    """Path of the newest complete checkpoint folder, or None. A folder counts only once its
    trainer_state.json exists (written last), so a crash mid-save never yields a broken 'latest'."""
    root = os.path.join(out, CHECKPOINTS)
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
                      and os.path.isfile(os.path.join(root, d, STATE_FILE))) if os.path.isdir(root) else []
    return os.path.join(root, complete[-1]) if complete else None


def save_checkpoint(accelerator, out, state, keep=2):
    """accelerator.save_state into a temporary folder, then (main process) rename it into place, point
    'latest' at it atomically, and delete older checkpoints beyond `keep`. All processes must call it."""
    root = os.path.join(out, CHECKPOINTS)
    name = f"step_{state['step']:09d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(os.path.join(tmp, STATE_FILE), state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(os.path.join(root, LATEST), name + "\n")
        old = sorted(d for d in os.listdir(root) if d.startswith("step_") and d != name)
        for d in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path):
    """Restore model/optimizer state saved by save_checkpoint; returns the trainer state dict."""
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    if state.get("world_size", accelerator.num_processes) != accelerator.num_processes:
        raise UserError(f"{path} was saved by {state['world_size']} processes, this run has "
                        f"{accelerator.num_processes}; resume with the same number of processes")
    accelerator.load_state(path)
    return state


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended (main process only). On resume, lines past the
    resumed step are dropped so the file reads as one uninterrupted run."""

    def __init__(self, path, enabled=True, resume_step=None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and _step_of(line) <= resume_step]
            atomic_write_text(path, "".join(kept))

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()


def _step_of(line):
    try:
        return json.loads(line).get("step", -1)
    except json.JSONDecodeError:  # a line cut by a crash
        return math.inf


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step, so resuming restores one integer.


def warmup_cosine(step, total, warmup, start, peak, final):
    """Linear warm-up from start to peak over `warmup` steps, then cosine from peak to final at `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_ramp(step, total, start, end):
    """Cosine from start (step 0) to end (step total), e.g. weight decay 0.04 -> 0.4."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_ramp(step, total, start, end):
    """Linear from start to end, e.g. EMA momentum 0.996 -> 1.0."""
    return start + (end - start) * min(1.0, step / max(1, total))


# ----------------------------------------------------------------------------------------------------
# Optimiser parameter groups

NO_DECAY_NAMES = ("pos_embed", "mask_token", "level_embed")


def param_groups(module, weight_decay):
    """Two groups: weight decay on matrices, none on biases, norms, position/level embeddings and
    mask tokens. The groups partition the trainable parameters (asserted)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(decay) + len(no_decay) == len(trainable)
    return [{"params": decay, "weight_decay": weight_decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def set_optimizer_values(optimizer, lr, weight_decay):
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay


# ----------------------------------------------------------------------------------------------------
# Collapse monitor


@torch.no_grad()
def collapse_metrics(features, top_k=10):
    """Signs of representation collapse in an (N, D) feature matrix.

    rankme: effective rank exp(H(p)), p = singular values / their sum (Garrido et al. 2023); near 1 when
        collapsed, up to min(N, D).
    feature_std: mean over dimensions of the std of l2-normalised features; 0 when collapsed, about
        1/sqrt(D) for well-spread features.
    pca_top1 / pca_top{k}: fraction of variance in the first 1 / k principal components."""
    x = features.float()
    singular = torch.linalg.svdvals(x)
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    rankme = torch.exp(-(p * p.log()).sum())
    normed = torch.nn.functional.normalize(x, dim=1)
    centred_singular = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    variance = centred_singular**2
    total = variance.sum().clamp_min(1e-12)
    return {"rankme": float(rankme), "feature_std": float(normed.std(0).mean()),
            "pca_top1": float(variance[:1].sum() / total), f"pca_top{top_k}": float(variance[:top_k].sum() / total)}

"""Plumbing the scripts share: one-line errors, atomic files, run folders, checkpoints, schedules,
parameter groups, metrics and the collapse monitor. No training loop lives here."""

import argparse
import functools
import json
import math
import os
import pickle
import re
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
            print(f"error: {printable(str(e))}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def printable(text):
    """Control characters (a newline in a mistyped key or path the message quotes) escaped: one line stays one."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors look like exit_on_user_error's: one line and exit status 2, not the usage text."""

    def error(self, message):
        print(f"error: {printable(message)}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def as_user_error(fn, *args, **kwargs):
    """Call fn; its ValueError (a bad setting caught by models.py or masks.py) becomes a UserError."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# Experiment trackers (--log-with): Accelerate's own list, and the package each one needs

# (import name, pip name) of a tracker's package where they differ from the tracker's name.
TRACKER_PACKAGES = {"comet_ml": ("comet_ml", "comet-ml")}


def tracker_names():
    """The trackers the installed Accelerate supports (its LOGGER_TYPE_TO_CLASS), for --log-with's choices."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return tuple(sorted(LOGGER_TYPE_TO_CLASS))


def check_tracker(name):
    """Refuse a tracker whose package is missing, in one line naming what to install: Accelerate would
    otherwise drop it silently (a debug-level log line) and the run would log nowhere. Call it before
    creating the Accelerator."""
    import importlib.util

    if name is None:
        return
    module, package = TRACKER_PACKAGES.get(name, (name, name))
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--log-with {name} needs the {package} package, which is not installed: "
                        f"pip install {package}")


def start_trackers(accelerator, args):
    """init_trackers for --log-with, named after the run folder, with the settings as the run's config.
    Settings that are not a number, string or bool (tuples, None) are logged as text: tensorboard's
    hyper-parameter table refuses them. wandb writes its files inside the run folder (offline runs too),
    as tensorboard does (Accelerate gives it project_dir), instead of ./wandb where it was started."""
    if not args.log_with:
        return
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
    try:
        accelerator.init_trackers(os.path.basename(os.path.normpath(args.out)), config=config,
                                  init_kwargs={"wandb": {"dir": args.out}})
    except Exception as e:  # each tracker raises its own types (wandb: UsageError for a missing login)
        hint = ("; without an account or network, run with WANDB_MODE=offline (then wandb sync OUT/wandb/offline-run-*)"
                if args.log_with == "wandb" else "; check its settings, or run without --log-with")
        raise UserError(f"--log-with {args.log_with} could not start ({type(e).__name__}: {one_line(e)}){hint}") from e


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


def check_out_dir(out, resume, overwrite, min_free_bytes=0):
    """Check the output folder before any work: not a run we would replace by accident, writable, and
    with room for the run (min_free_bytes, counting what the run already holds there). Changes nothing."""
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
        raise UserError(f"cannot write to output folder {out} ({e.strerror or e}); choose another --out") from None
    free = shutil.disk_usage(out).free + (folder_bytes(out) if resume or overwrite else 0)
    if free < min_free_bytes:
        raise UserError(f"only {free / 2**20:.0f} MiB free in {out}, the run needs about {min_free_bytes / 2**20:.0f} "
                        "MiB for its checkpoints; free some space or choose another --out")


def prepare_out_dir(out, resume, overwrite, min_free_bytes=0):
    """check_out_dir, then make the folder ready: clear an old run under --overwrite (call this once the
    settings and data have been checked, so a mistyped flag never costs the old run) and delete the
    leftovers of interrupted writes. Returns True when there is a checkpoint to resume."""
    check_out_dir(out, resume, overwrite, min_free_bytes)
    if overwrite and not resume:
        for name in RUN_FILES:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    remove_interrupted_writes(out)
    return resume and latest_checkpoint(out) is not None


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
               if os.path.isfile(os.path.join(root, f)))


def run_bytes_needed(model, keep=2):
    """Disk space a run needs at its peak: model.safetensors and its temporary copy, and keep + 1
    checkpoints (the kept ones and the one being written), each the weights and AdamW's two moments."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 2 * weights + (keep + 1) * (weights + moments)


def remove_interrupted_writes(out):
    """Temporary files and folders that a killed process left behind: atomic_write's (model.safetensors,
    config.json, metrics.jsonl, checkpoints/latest) and save_checkpoint's incomplete folders."""
    root = os.path.join(out, CHECKPOINTS)
    for folder in (out, root) if os.path.isdir(root) else (out,):
        for name in os.listdir(folder):
            if re.fullmatch(r"\..+\.tmp\d+", name) and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("step_") and not is_complete(root, name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def is_complete(root, name):
    return name.startswith("step_") and not name.endswith(".tmp") and os.path.isfile(
        os.path.join(root, name, STATE_FILE))


def latest_checkpoint(out):
    """Path of the newest complete checkpoint folder, or None. A folder counts only once its
    trainer_state.json exists (written last), so a crash mid-save never yields a broken 'latest'."""
    root = os.path.join(out, CHECKPOINTS)
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = os.path.basename(f.read().strip())
        if is_complete(root, name):
            return os.path.join(root, name)
    complete = sorted(d for d in os.listdir(root) if is_complete(root, d)) if os.path.isdir(root) else []
    return os.path.join(root, complete[-1]) if complete else None


def save_checkpoint(accelerator, out, state, keep=2):
    """accelerator.save_state into a temporary folder, then (main process) fsync its files, write the
    state file that marks it complete, rename it into place, point 'latest' at it atomically, and delete
    older checkpoints beyond `keep`. A failure removes the temporary folder and leaves the previous
    checkpoints as they were. All processes must call it."""
    root = os.path.join(out, CHECKPOINTS)
    name = f"step_{state['step']:09d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    main = accelerator.is_main_process
    try:
        if main:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp, safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            for file in os.listdir(tmp):  # on disk before the state file declares the folder complete
                with open(os.path.join(tmp, file), "rb") as f:
                    os.fsync(f.fileno())
            atomic_write_json(os.path.join(tmp, STATE_FILE), state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(root)
            atomic_write_text(os.path.join(root, LATEST), name + "\n")
            remove_interrupted_writes(out)
            complete = sorted(d for d in os.listdir(root) if is_complete(root, d))
            for d in complete[: max(0, len(complete) - keep)]:
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return final


# What a damaged or foreign checkpoint raises while loading: truncated files (safetensors, torch.load),
# pickled code that torch.load(weights_only=True) refuses, state dicts of another model or optimiser.
LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError)


def load_checkpoint(accelerator, path):
    """Restore model/optimizer state saved by save_checkpoint; returns the trainer state dict."""
    from safetensors import SafetensorError

    advice = "delete that folder to resume from the checkpoint before it, or start again with --overwrite"
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        step, world_size = state["step"], state.get("world_size", accelerator.num_processes)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}/{STATE_FILE} is damaged ({one_line(e)}); {advice}") from None
    if not isinstance(step, int):
        raise UserError(f"{path}/{STATE_FILE} is damaged (step {step!r}); {advice}")
    if world_size != accelerator.num_processes:
        raise UserError(f"{path} was saved by {world_size} processes, this run has "
                        f"{accelerator.num_processes}; resume with the same number of processes")
    try:
        accelerator.load_state(path)
    except (*LOAD_ERRORS, SafetensorError) as e:
        raise UserError(f"cannot resume from {path} ({type(e).__name__}: {one_line(e)}); {advice}") from None
    return state


def one_line(error, limit=600):
    """An exception's message on one line (load_state_dict lists keys over many), cut at `limit` chars."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def check_same_model(out, config, keys=("script", "encoder", "predictor", "world_size")):
    """--resume must continue the same model on as many processes (the data order depends on it): compare
    the run's config.json with this run's, before anything overwrites it, and name every difference."""
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot resume: {path} is unreadable ({one_line(e)}); start again with --overwrite") from None
    if not isinstance(previous, dict):
        raise UserError(f"cannot resume: {path} is not a mapping of settings; start again with --overwrite")
    differences = []
    for key in keys:
        old, new = previous.get(key), json.loads(json.dumps(config.get(key)))
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{key}.{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                            if old.get(k) != new.get(k)]
        elif old != new:
            differences.append(f"{key} {old!r} -> {new!r}")
    if differences:
        raise UserError(f"cannot resume {out} with different settings: {', '.join(differences)}; resume with "
                        "the run's model settings and number of processes, or use another --out")


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
# Optimisers

NO_DECAY_NAMES = ("pos_embed", "mask_token", "level_embed")


def param_groups(module, weight_decay, muon=False):
    """Weight decay on matrices, none on biases, norms, position/level embeddings and mask tokens. With
    muon, the hidden matrices (2-D weights inside transformer blocks) get a group of their own, marked for
    MuonAdamW; the input and output maps stay with AdamW, as Muon's authors advise. The groups partition
    the trainable parameters (asserted)."""
    hidden, decay, no_decay = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)
        is_hidden = muon and p.ndim == 2 and "blocks." in name
        (no_decay if skip else hidden if is_hidden else decay).append(p)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(hidden) + len(decay) + len(no_decay) == len(trainable)
    groups = [{"params": decay, "weight_decay": weight_decay, "apply_wd": True},
              {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]
    if muon:
        groups.insert(0, {"params": hidden, "weight_decay": weight_decay, "apply_wd": True, "muon": True})
    return groups


def orthogonalize(matrices, steps=5):
    """The semi-orthogonal matrix nearest each matrix of a (..., rows, cols) stack (U V^T of its SVD),
    approximately: a quintic Newton-Schulz iteration whose coefficients bring every singular value close to
    one (not exactly: speed over precision, which costs Muon nothing) in five steps (Jordan et al. 2024), in
    bf16 where the hardware multiplies it fast. A stack of same-shape matrices costs less than each alone."""
    fast_bf16 = matrices.is_cuda or (matrices.device.type == "cpu" and cpu_has_fast_bf16())
    x = matrices.reshape(-1, *matrices.shape[-2:]).to(torch.bfloat16 if fast_bf16 else torch.float32)
    tall = x.size(1) > x.size(2)
    x = x.mT if tall else x  # iterate on the smaller Gram matrix
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)  # singular values <= 1, where the iteration converges
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return (x.mT if tall else x).reshape(matrices.shape).to(matrices.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) on the groups marked muon=True, AdamW (Loshchilov & Hutter) on the others:
    one optimiser, so that Accelerate, checkpoints and the lr and weight-decay schedules see one object.

    Muon keeps Nesterov momentum of a hidden matrix's gradient and steps along its orthogonalisation: every
    direction of the update gets the same size, where AdamW's follow the gradient's few dominant ones. The
    step is scaled by 0.2 sqrt(max(rows, cols)), which gives it AdamW's typical update size (Liu et al. 2025,
    "Muon is scalable"), so the same lr and decoupled weight decay serve both kinds of parameter."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                                      ns_steps=ns_steps, muon=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = self._muon(params, group) if group["muon"] else [(p, self._adamw(p, group)) for p in params]
            for p, update in updates:
                p.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
        return loss

    def _muon(self, params, group):
        """(parameter, update) pairs: Nesterov momentum, orthogonalised, the matrices of one shape in one batch."""
        beta, by_shape = group["momentum"], {}
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum"] = torch.zeros_like(p)
            state["momentum"].lerp_(p.grad, 1 - beta)
            by_shape.setdefault(p.shape, []).append(p)
        updates = []
        for shape, same in by_shape.items():
            nesterov = torch.stack([p.grad.lerp(self.state[p]["momentum"], beta) for p in same])
            updates += zip(same, orthogonalize(nesterov, group["ns_steps"]) * (0.2 * max(shape) ** 0.5))
        return updates

    def _adamw(self, p, group):
        state, (beta1, beta2) = self.state[p], group["betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(group["eps"])
        return state["exp_avg"] / denom / (1 - beta1 ** state["step"])


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
    if not torch.isfinite(x).all():  # diverged weights: NaN statistics, not an SVD failure (cuSOLVER raises)
        return {"rankme": math.nan, "feature_std": math.nan, "pca_top1": math.nan, f"pca_top{top_k}": math.nan}
    singular = torch.linalg.svdvals(x)
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    rankme = torch.exp(-(p * p.log()).sum())
    normed = torch.nn.functional.normalize(x, dim=1)
    centred_singular = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    variance = centred_singular**2
    total = variance.sum().clamp_min(1e-12)
    return {"rankme": float(rankme), "feature_std": float(normed.std(0).mean()),
            "pca_top1": float(variance[:1].sum() / total), f"pca_top{top_k}": float(variance[:top_k].sum() / total)}


# ----------------------------------------------------------------------------------------------------
# Precision on the CPU


@functools.cache  # the hardware does not change within a process
def cpu_has_fast_bf16():
    """True where the CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16): there, bf16 matmuls run
    several times faster than fp32. Elsewhere oneDNN emulates bf16 with AVX512/AVX2 and it is slower than fp32
    (4x slower on the Ice Lake Xeon of README "Performance"), so fp32 is the fast path."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(check is None for check in checks):  # an older torch: read the flags Linux reports
        try:
            with open("/proc/cpuinfo") as f:
                return bool(set(f.read().split()) & {"amx_bf16", "avx512_bf16"})
        except OSError:
            return False
    return any(check() for check in checks if check is not None)


def default_mixed_precision(requested, cuda_available):
    """--mixed-precision as given, or Accelerate's own setting (`accelerate launch --mixed_precision`, its config
    file), or, with neither, bf16 on a CPU that computes it in hardware (Accelerate's "no" elsewhere)."""
    unset = requested is None and "ACCELERATE_MIXED_PRECISION" not in os.environ
    return "bf16" if unset and not cuda_available and cpu_has_fast_bf16() else requested


def precision_note(accelerator):
    """One log line naming the arithmetic the run uses, so a slow CPU run says why."""
    precision = accelerator.mixed_precision
    if accelerator.device.type != "cpu":
        return f"{accelerator.device.type}: mixed precision {precision}"
    fast = cpu_has_fast_bf16()
    if precision == "bf16":
        return "cpu: bf16 autocast" + ("" if fast else ", but this CPU has no AMX/AVX512-BF16: fp32 is faster here")
    return "cpu: fp32" + (" (this CPU has AMX/AVX512-BF16: --mixed-precision bf16 is faster)" if fast
                          else " (no AMX/AVX512-BF16 on this CPU, where bf16 would be slower)")


def inference_autocast(device):
    """The fast arithmetic for frozen-feature extraction: bf16 on GPUs and on CPUs that compute it in hardware,
    fp32 elsewhere."""
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast)

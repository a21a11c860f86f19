"""One training run's life, shared by train_ijepa.py (and train_pijepa.py) and train_hierarchical_predictor.py:
the Accelerator, the output folder, resuming, config.json, metrics.jsonl and trackers, the progress bar,
stop signals, non-finite losses and checkpoints. A training script reads:

    run = Run(args, "train_ijepa")                      # checks --out before anything loads
    ...                                                 # data, model, optimizer, accelerator.prepare
    step = run.start(model, config, steps_per_epoch, last_step)   # clears or resumes --out, config.json
    while step < last_step:
        loss, info = model(...); run.accelerator.backward(loss); run.observe(loss)
        if run.update_allowed(step): optimizer.step()
        step += 1
        if run.log_due(step): run.log({"step": step, **info, **run.throughput()})
        if run.save_if_due(step): break                 # a checkpoint each --save-every epochs; stop signals
    run.finish("done")

Guarantees: SIGTERM/SIGINT save a resumable checkpoint and exit 128 + signal; a non-finite loss stops the
run naming the last good checkpoint (or --skip-nonfinite N skips up to N bad updates); non-finite weights
are never saved; --overwrite clears an old run only in start(), once the settings and data have loaded.
"""

import os
import re
import signal
import sys
import time

import torch

from common import (atomic_save_safetensors, atomic_write_json, check_out_dir, check_same_model, check_tracker,
                    default_mixed_precision, latest_checkpoint, load_checkpoint, MetricsLog, one_line, precision_note,
                    prepare_out_dir, run_bytes_needed, save_checkpoint, start_trackers)
from data import UserError


def make_accelerator(args, **kwargs):
    """The run's Accelerator. Several processes without CUDA (torch.distributed.run on CPU) need cpu=True
    for Accelerate to use gloo."""
    from accelerate import Accelerator

    check_tracker(args.log_with)  # a missing tracker package: one line, before anything starts
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    precision = default_mixed_precision(args.mixed_precision, torch.cuda.is_available())
    return Accelerator(mixed_precision=precision, log_with=args.log_with, project_dir=args.out, cpu=multi_cpu,
                       **kwargs)


class Run:
    """The state of one run: its folder (args.out), the step count per epoch, the stop request, the
    non-finite flag and skip count, the metrics window. See the module docstring for the calls."""

    def __init__(self, args, script, **accelerator_kwargs):
        self.args, self.out, self.script = args, args.out, script
        self.accelerator = make_accelerator(args, **accelerator_kwargs)
        self.main = self.accelerator.is_main_process
        if self.main:  # before anything loads; an old run is only cleared in start()
            check_out_dir(args.out, args.resume, args.overwrite)

    def start(self, model, config, steps_per_epoch, last_step, same_run_keys=("script", "encoder", "predictor",
              "world_size"), metadata=None, leave_out=()):
        """Make --out ready for the prepared `model` (clear an old run under --overwrite; under --resume
        check that config.json describes the same model, same_run_keys, and load the latest checkpoint),
        write config.json, open metrics.jsonl and the trackers, catch stop signals. Returns the first step.
        Checkpoints hold model.safetensors (less the weights named leave_out*) with `metadata`."""
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        self.model, self.steps_per_epoch, self.last_step = model, steps_per_epoch, last_step
        self.metadata, self.leave_out = {"script": self.script, **(metadata or {})}, tuple(leave_out)
        if self.main:
            needed = run_bytes_needed(accelerator.unwrap_model(model))
            if prepare_out_dir(self.out, args.resume, args.overwrite, needed):
                check_same_model(self.out, config, same_run_keys)
        accelerator.wait_for_everyone()
        step, self.skipped = 0, 0
        accelerator.print(precision_note(accelerator))  # which arithmetic this machine runs, once all is checked
        if args.resume and latest_checkpoint(self.out):
            path = latest_checkpoint(self.out)
            state = load_checkpoint(accelerator, path)
            step, self.skipped = state["step"], state.get("skipped_nonfinite", 0)
            accelerator.print(f"resumed from {path} at step {step}")
        if self.main:  # written once the settings, the data and the checkpoint to resume have all loaded
            atomic_write_json(os.path.join(self.out, "config.json"), config)
            if config.get("skipped_images"):
                accelerator.print(f"skipped {config['skipped_images']} unreadable images (--skip-bad-images)")
        start_trackers(accelerator, args)
        # Lines past the resumed step are a killed run's stale tail; a fresh start keeps none.
        self.metrics = MetricsLog(os.path.join(self.out, "metrics.jsonl"), self.main, step if step else -1)
        self.stop = StopRequest()
        self.stopping = False
        self.bar = tqdm(total=last_step, initial=step, disable=not self.main, dynamic_ncols=True)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        device = accelerator.device
        self.peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.window_start, self.window_images = time.perf_counter(), 0
        return step

    def epoch_end(self, step):
        return step % self.steps_per_epoch == 0 or step == self.last_step

    # -- non-finite losses and gradients. By default the flag is read at log time only (no extra host sync)
    # and the run stops there, naming the last good checkpoint, which predates the bad step. With
    # --skip-nonfinite N each update is checked before optimizer.step (one sync a step) and up to N bad
    # updates are skipped: no optimizer step, no EMA update.

    def observe(self, loss, images=0):
        """After each backward: note a non-finite loss, count the images (of this process) for images/s."""
        self.nonfinite |= ~torch.isfinite(loss.detach())
        self.window_images += images * self.accelerator.num_processes

    def update_allowed(self, step):
        """Called where gradients are complete, before optimizer.step: False when the update is skipped."""
        allowed_skips = self.args.skip_nonfinite
        if not allowed_skips:
            return True
        flags = [self.nonfinite]
        if self.accelerator.scaler is None:  # fp16's loss scaler skips its own overflowing steps
            flags.append(~all_finite([p.grad for p in self.model.parameters() if p.grad is not None]))
        bad = any(any_process(self.accelerator, *flags))
        self.nonfinite.zero_()
        if not bad:
            return True
        self.skipped += 1
        if self.skipped > allowed_skips:
            self.fail(step + 1, f"{self.skipped} non-finite updates, more than --skip-nonfinite {allowed_skips}")
        self.accelerator.print(f"\nstep {step + 1}: non-finite loss or gradients, update skipped "
                               f"({self.skipped} of --skip-nonfinite {allowed_skips})")
        return False

    def fail(self, step, what="non-finite loss"):
        self.bar.close()  # the error then prints on a line of its own
        previous = latest_checkpoint(self.out)
        raise UserError(f"{what} at or before step {step}; the last good checkpoint is {previous or 'none yet'} "
                        "(lower --lr, use --mixed-precision bf16 instead of fp16, or --skip-nonfinite N)")

    # -- logging

    def log_due(self, step):
        """Called after every step (it advances the progress bar): True when `step` logs (every --log-every
        steps, at epoch ends, on a stop request). A log step is the loop's one host synchronisation: a
        non-finite loss on any process stops the run; a stop signal seen by any process stops them all."""
        self.bar.update(1)
        self.stopping = self.stop.signal is not None and self.accelerator.num_processes == 1  # several: agree here
        if not (step % self.args.log_every == 0 or self.epoch_end(step) or self.stopping):
            return False
        nonfinite, stop_seen = any_process(self.accelerator, self.nonfinite, self.stop.signal is not None)
        if nonfinite:
            self.fail(step)
        self.stopping |= stop_seen
        return True

    def throughput(self, flops_per_image=None):
        """{"images_per_s"[, "mfu"]} since the last call: all processes' images; MFU per GPU, the model's
        matmul FLOP/s over the GPU's dense bf16 peak (on GPUs in PEAK_BF16_TFLOPS)."""
        images_per_s = self.window_images / max(time.perf_counter() - self.window_start, 1e-9)
        self.window_start, self.window_images = time.perf_counter(), 0
        record = {"images_per_s": images_per_s}
        if self.peak and flops_per_image:
            record["mfu"] = flops_per_image * images_per_s / self.accelerator.num_processes / (self.peak * 1e12)
        return record

    def log(self, record):
        """One record (with "step", "loss", "lr") to metrics.jsonl, the trackers and the progress bar."""
        self.metrics.write(record)
        self.accelerator.log(record, step=record["step"])
        postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
        if "images_per_s" in record:
            postfix["ips"] = f"{record['images_per_s']:.0f}"
        self.bar.set_postfix(**postfix)

    # -- checkpoints and the end

    def save_if_due(self, step):
        """Checkpoint on a stop request (and say where), or after every --save-every-th epoch and the last
        step. Returns True when the loop must stop."""
        if self.stopping:
            path = self.checkpoint(step)
            self.accelerator.print(f"\n{self.stop.signal or 'stop requested'}: saved a resumable checkpoint at step "
                                   f"{step} in {path}; continue with --resume --out {self.out}")
            return True
        if self.epoch_end(step) and ((step // self.steps_per_epoch) % self.args.save_every == 0
                                     or step == self.last_step):
            self.checkpoint(step)
        return False

    def checkpoint(self, step):
        """model.safetensors and a resumable checkpoint, never with non-finite weights; a failed write is one
        line naming the intact checkpoint. Returns the checkpoint folder."""
        from safetensors import SafetensorError

        accelerator, model = self.accelerator, self.model
        if not all_finite(list(model.parameters())):  # a finite loss can still end in an overflowing update
            self.fail(step, "non-finite weights")
        state = {"step": step, "epoch": step / self.steps_per_epoch, "world_size": accelerator.num_processes,
                 "skipped_nonfinite": self.skipped}
        weights = {k: v for k, v in accelerator.get_state_dict(model).items() if not k.startswith(self.leave_out)}
        try:
            if self.main:
                atomic_save_safetensors(os.path.join(self.out, "model.safetensors"), weights,
                                        metadata={"step": str(step), **self.metadata})
            return save_checkpoint(accelerator, self.out, state)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap OSErrors
            self.bar.close()
            raise UserError(f"cannot write the step {step} checkpoint in {self.out} ({one_line(e)}); the last "
                            f"complete one, {latest_checkpoint(self.out) or 'none'}, is intact: free some space "
                            "and continue with --resume") from None

    def finish(self, message):
        """Close the bar and trackers, restore the signal handlers; a run stopped by a signal exits 128 +
        signal (a job scheduler sees an unfinished run), a finished one prints `message`."""
        self.bar.close()
        self.stop.restore()
        self.accelerator.end_training()
        if self.stopping:
            sys.exit(self.stop.exit_code)
        self.accelerator.print(message)


class StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set a flag; the loop saves a checkpoint after the current step
    (several processes: at the next log step, where they agree). A second signal exits at once."""

    def __init__(self):
        self.signal, self.exit_code = None, 128 + signal.SIGTERM
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signal is not None:  # a second signal: give up at once
            sys.exit(128 + signum)
        self.signal, self.exit_code = signal.Signals(signum).name, 128 + signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def any_process(accelerator, *flags):
    """Boolean flags (tensors or bools) read in one host synchronisation, each True if set on any process."""
    values = torch.stack([torch.as_tensor(f, device=accelerator.device) for f in flags]).float()
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "max")
    return (values > 0).tolist()


def all_finite(tensors):
    """A boolean 0-d tensor (reading it is the caller's host sync): every element of every tensor is finite."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


# ----------------------------------------------------------------------------------------------------
# Speed: compilation and the GPU peak MFU divides by (bench.py uses the same)

# Dense (not sparse) bf16 tensor-core peak in TFLOP/s; the first pattern found in the device name wins.
PEAK_BF16_TFLOPS = ((r"H100.*PCIe", 756.0), (r"H100 NVL", 835.0), (r"H100|H200|GH200", 989.0), (r"B200", 2250.0),
                    (r"A100", 312.0), (r"L40S", 362.0), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0))


def peak_tflops(device_name):
    """Dense bf16 peak of a GPU named like torch.cuda.get_device_name(), or None for one not in the table."""
    return next((tflops for pattern, tflops in PEAK_BF16_TFLOPS if re.search(pattern, device_name)), None)


def compile_model(model, cuda_graphs=False):
    """torch.compile with static shapes: batches are full and the context length is fixed; target blocks are
    whole, one block size per batch, so it compiles once per size the mask settings allow (masks.py: 3 on
    8x8, 7 on 14x14, 8 on 16x16; up to ~15 per-level combinations with PI-JEPA). With cuda_graphs, mode
    "reduce-overhead" records the step's kernels as CUDA graphs and replays each with one launch, for small
    models whose steps are bound by kernel launches."""
    # Past the recompile limit (8 by default) torch would run the remaining shapes eagerly, unannounced.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(model, mode="reduce-overhead" if cuda_graphs else "default", dynamic=False)


def check_compile(compiling, cuda_graphs, device):
    """Start-up checks of --compile and --cuda-graphs, so that a setting that cannot work is refused before data
    loads, not at the first step."""
    if cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA GPU and this run is on {device.type}; drop it "
                        "(--compile works on any device)")
    if compiling and device.type == "cpu":  # inductor builds CPU kernels with a C++ compiler
        from torch._inductor import cpp_builder
        try:
            cpp_builder.get_cpp_compiler()
        except Exception as error:  # torch's InvalidCxxCompiler, whose module has moved between releases
            raise UserError(f"--compile on the CPU needs a C++ compiler and torch found none "
                            f"({type(error).__name__}); install g++ (or point CXX at one) or drop --compile") from None

"""Fault injection for the training loop: SIGKILL at random moments, SIGTERM and SIGINT, non-finite losses
and gradients, a full disk, an unwritable folder, two processes. After every fault the newest checkpoint is
complete, and a resumed run ends with exactly the weights of an uninterrupted one (CPU runs are
deterministic)."""

import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from common import (CHECKPOINTS, check_out_dir, collapse_metrics, latest_checkpoint, prepare_out_dir,
                    read_metrics, STATE_FILE)
from conftest import ROOT, TINY_TRAIN, run_script
from data import load_split, UserError

# Eight epochs of five steps with a checkpoint after each and a log line every step, so that kills land in
# steps, in the collapse monitor (at each epoch's end) and in checkpoint writes.
LONG_RUN = [*TINY_TRAIN, "--epochs", "8", "--log-every", "1"]
STEPS_PER_EPOCH = 5
ENV = dict(os.environ, OMP_NUM_THREADS="1")
KILLS = 15  # with 2 + 2 in the other scripts and 1 on two processes: 20 in the suite
SCRIPT = os.path.join(ROOT, "train_ijepa.py")


def launch(out, *extra, args=LONG_RUN, command=(sys.executable, SCRIPT), **popen):
    """Start a training run in the background, its output appended to OUT.log."""
    with open(f"{out}.log", "a") as log:
        return subprocess.Popen([*command, *args, "--out", str(out), *map(str, extra)], cwd=ROOT, env=ENV,
                                stdout=log, stderr=subprocess.STDOUT, **popen)


def output_of(out):
    with open(f"{out}.log") as f:
        return f.read()


def logged_steps(out):
    """Steps logged so far; a line cut by a kill, or being written, is left out."""
    steps = []
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                try:
                    steps.append(json.loads(line)["step"])
                except (json.JSONDecodeError, KeyError):
                    pass
    except FileNotFoundError:
        pass
    return steps


def checkpoint_step(out):
    path = latest_checkpoint(str(out))
    return int(path.rsplit("_", 1)[1]) if path else 0


def writing_checkpoint(out):
    """True while a checkpoint is being written: its temporary folder, or model.safetensors' temporary file."""
    root = os.path.join(out, CHECKPOINTS)
    folders = os.listdir(root) if os.path.isdir(root) else []
    files = os.listdir(out) if os.path.isdir(out) else []
    return any(n.endswith(".tmp") for n in folders) or any(n.startswith(".model.safetensors.tmp") for n in files)


def wait_for(condition, proc, timeout=120):
    """Poll until condition() holds (True) or the process has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError(f"nothing happened in {timeout} s")


def logged_since(out, launched_ns, step):
    """A condition: this run (not the killed one before it) has logged a step past `step`."""
    path = os.path.join(out, "metrics.jsonl")

    def condition():  # the run rewrites metrics.jsonl on start-up, so a newer file is this run's
        return (os.path.exists(path) and os.stat(path).st_mtime_ns > launched_ns
                and any(s > step for s in logged_steps(out)))

    return condition


def kill_at_random_moment(out, moment, epochs_on, rng):
    """Resume the run in out and SIGKILL it at a random moment of the given kind, after letting `epochs_on`
    epochs finish (so the run moves on); False if it finished first."""
    resumed_step, launched_ns = checkpoint_step(out), time.time_ns()
    proc = launch(out, "--resume")
    try:
        if moment == "step":
            reached = wait_for(logged_since(out, launched_ns, resumed_step + STEPS_PER_EPOCH * epochs_on), proc)
            time.sleep(rng.uniform(0, 0.3))
        elif moment == "monitor":  # it runs after an epoch's last step, before that step's log line
            epoch_end = resumed_step + STEPS_PER_EPOCH * (epochs_on + 1)
            reached = wait_for(logged_since(out, launched_ns, epoch_end - 2), proc)  # the step before is logged
            time.sleep(rng.uniform(0.03, 0.15))
        else:
            reached = (wait_for(lambda: checkpoint_step(out) >= resumed_step + STEPS_PER_EPOCH * epochs_on, proc)
                       and wait_for(lambda: writing_checkpoint(out), proc))
            time.sleep(rng.uniform(0, 0.01))
        if not reached or proc.poll() is not None:
            return False
    finally:
        proc.kill()
        proc.wait()
    return True


def assert_complete_checkpoint(out):
    """The checkpoint that --resume would pick is whole: state, weights and optimiser all load."""
    path = latest_checkpoint(str(out))
    if path is None:  # killed before the first checkpoint: --resume starts afresh
        return
    with open(os.path.join(path, STATE_FILE)) as f:
        assert json.load(f)["step"] == int(path.rsplit("_", 1)[1])
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    optimizer = torch.load(os.path.join(path, "optimizer.bin"), weights_only=True)
    assert len(optimizer["state"]) > 0


def assert_same_run(out, reference):
    """Same final weights, bit for bit, and the same logged losses at every step."""
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(reference, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda path: [(m["step"], m.get("loss")) for m in read_metrics(os.path.join(path, "metrics.jsonl"))]
    assert losses(out) == losses(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """LONG_RUN without interruption."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_script("train_ijepa.py", *LONG_RUN, "--out", out)
    return out


# ----------------------------------------------------------------------------------------------------
# SIGKILL, SIGTERM, SIGINT


def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_weights(tmp_path, reference):
    out, rng = tmp_path / "killed", random.Random(8)
    moments = ["step", "monitor", "checkpoint"]
    kills, mid_write, resumed_from = 0, 0, []
    for attempt in range(KILLS):
        resumed_from.append(checkpoint_step(out))
        epochs_on = int(attempt % 5 == 4 and resumed_from[-1] < 15)  # mostly killed in the epoch it resumed in
        if not kill_at_random_moment(out, moments[attempt % 3], epochs_on, rng):
            break  # finished before the kill
        kills += 1
        mid_write += writing_checkpoint(out)  # what the kill interrupted is still on disk
        assert_complete_checkpoint(out)
    proc = launch(out, "--resume")
    assert proc.wait() == 0, output_of(out)[-3000:]
    assert kills == KILLS, f"only {kills} kills before the run finished; resumed from {resumed_from}"
    assert mid_write >= 1, "no kill landed in a checkpoint write"
    assert len(set(resumed_from)) >= 3, f"the run never got far: resumed from {resumed_from}"
    assert_same_run(out, reference)
    assert not writing_checkpoint(out)  # leftovers of the killed writes are gone
    assert sorted(os.listdir(out / CHECKPOINTS)) == ["latest", "step_000000035", "step_000000040"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_a_signal_saves_a_resumable_checkpoint_and_says_where(tmp_path, reference, sig):
    out = tmp_path / "stopped"
    proc = launch(out)
    assert wait_for(logged_since(out, 0, 6), proc), output_of(out)[-3000:]  # inside epoch 2
    proc.send_signal(sig)
    assert proc.wait() == 128 + sig  # as if the signal had ended it: a scheduler sees an unfinished run
    match = re.search(r"(SIGTERM|SIGINT): saved a resumable checkpoint at step (\d+) in (\S+);", output_of(out))
    assert match and match[1] == sig.name and match[3] == latest_checkpoint(str(out))
    assert 7 <= int(match[2]) < 40
    assert_complete_checkpoint(out)
    run_script("train_ijepa.py", *LONG_RUN, "--out", out, "--resume")
    assert_same_run(out, reference)


# ----------------------------------------------------------------------------------------------------
# Non-finite losses and gradients

# Trains through the public API with gradients that overflow at chosen backward passes while the loss
# stays finite (as a bf16 blow-up does): argv[1] lists the passes, the rest are train_ijepa.py flags.
OVERFLOWING_GRADIENTS = """
import sys
sys.path.insert(0, {root!r})
import train_ijepa
from common import exit_on_user_error

bad_passes = {{int(k) for k in sys.argv[1].split(",")}}
args = train_ijepa.parse_args(sys.argv[2:])
model = train_ijepa.build_model(args)
passes = [0]

def overflow(grad):
    passes[0] += 1
    return grad * float("inf") if passes[0] in bad_passes else grad

model.predictor.mask_token.register_hook(overflow)
sampler = train_ijepa.build_mask_sampler(args, model.encoder.cfg.grid_size)
exit_on_user_error(train_ijepa.train)(args, model, sampler)
"""


def train_with_overflows(tmp_path, out, bad_passes, *flags):
    driver = tmp_path / "overflowing_gradients.py"
    driver.write_text(OVERFLOWING_GRADIENTS.format(root=ROOT))
    return subprocess.run([sys.executable, str(driver), ",".join(map(str, bad_passes)), *TINY_TRAIN, "--epochs", "2",
                           "--out", str(out), *flags], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def last_line(text):
    return text.strip().splitlines()[-1]


def test_nonfinite_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "blows_up"
    run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "1", "--out", out)
    good = load_file(out / "model.safetensors")
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "2", "--lr", "1e30", "--start-lr", "1e30",
                      "--out", out, "--resume", check=False)
    assert proc.returncode == 2
    assert re.fullmatch(r"error: non-finite loss at or before step [6-9]; the last good checkpoint is "
                        rf"{re.escape(str(out))}/checkpoints/step_000000005 \(lower --lr.*\)", last_line(proc.stderr))
    assert sorted(os.listdir(out / CHECKPOINTS)) == ["latest", "step_000000005"]  # nothing written over it
    now = load_file(out / "model.safetensors")
    assert all(torch.equal(now[k], good[k]) for k in good)


def test_an_overflowing_update_with_a_finite_loss_is_never_saved(tmp_path):
    out = tmp_path / "overflow"
    proc = train_with_overflows(tmp_path, out, [5])  # step 5 ends epoch 1: its checkpoint would hold NaNs
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith("error: non-finite weights at or before step 5; the last good "
                                             "checkpoint is none yet")
    assert not (out / CHECKPOINTS).exists() and not (out / "model.safetensors").exists()


def test_the_collapse_monitor_reports_diverged_features_as_nan():
    features = torch.randn(16, 8)
    features[3, 2] = float("inf")
    assert all(math.isnan(v) for v in collapse_metrics(features).values())  # no SVD of non-finite values


def test_skip_nonfinite_skips_bad_updates_and_stops_past_its_budget(tmp_path):
    out = tmp_path / "skipping"
    proc = train_with_overflows(tmp_path, out, [3, 7], "--skip-nonfinite", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: non-finite loss or gradients, update skipped (1 of --skip-nonfinite 2)" in proc.stdout
    assert "step 7: non-finite loss or gradients, update skipped (2 of --skip-nonfinite 2)" in proc.stdout
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    with open(os.path.join(latest_checkpoint(str(out)), STATE_FILE)) as f:
        assert json.load(f)["skipped_nonfinite"] == 2  # the budget survives a resume

    proc = train_with_overflows(tmp_path, tmp_path / "over_budget", [3, 7], "--skip-nonfinite", "1")
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith("error: 2 non-finite updates, more than --skip-nonfinite 1 at or "
                                             "before step 7; the last good checkpoint is ")
    assert last_line(proc.stderr).split("checkpoint is ")[1].startswith(str(tmp_path / "over_budget"))


# ----------------------------------------------------------------------------------------------------
# Full disk, unwritable folder


def limit_file_size(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_write_failing_mid_run_leaves_the_last_checkpoint_intact(tmp_path):
    out = tmp_path / "full"
    run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "1", "--out", out)
    good = load_file(out / "model.safetensors")
    # Files may not grow past 1 MiB (as on a full disk): the next checkpoint (7 MiB of weights) fails.
    proc = subprocess.run([sys.executable, SCRIPT, *TINY_TRAIN, "--epochs", "2", "--out", str(out), "--resume"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size(2**20))
    assert proc.returncode == 2
    assert re.fullmatch(r"error: cannot write the step 10 checkpoint in \S+ \(.*File too large.*\); the last "
                        r"complete one, \S+/step_000000005, is intact: free some space and continue with --resume",
                        last_line(proc.stderr))
    assert sorted(os.listdir(out / CHECKPOINTS)) == ["latest", "step_000000005"]
    assert not writing_checkpoint(out)
    now = load_file(out / "model.safetensors")
    assert all(torch.equal(now[k], good[k]) for k in good)
    run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "2", "--out", out, "--resume")
    assert checkpoint_step(out) == 10


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "1", "--out", blocker / "run", check=False)
    assert proc.returncode == 2 and proc.stdout == ""  # refused before any training
    assert last_line(proc.stderr).startswith(f"error: cannot write to output folder {blocker / 'run'} (")


def test_a_read_only_output_folder_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders; the test above covers unwritable paths")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        proc = run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "1", "--out", folder, check=False)
    finally:
        folder.chmod(0o700)
    assert proc.returncode == 2 and "cannot write to output folder" in last_line(proc.stderr)


def test_resume_clears_what_interrupted_writes_left_and_picks_the_newest_complete_checkpoint(tmp_path):
    out, root = tmp_path / "run", tmp_path / "run" / CHECKPOINTS
    for name, complete in (("step_000000005", True), ("step_000000010", True), ("step_000000015.tmp", True),
                           ("step_000000015", False)):
        (root / name).mkdir(parents=True)
        if complete:  # a .tmp folder with its state file: killed between writing it and the rename
            (root / name / STATE_FILE).write_text('{"step": %d}' % int(name[5:14]))
    (root / "latest").write_text("step_000000015\n")  # killed after the pointer moved... to a folder now gone
    for leftover in (out / ".model.safetensors.tmp4242", out / ".metrics.jsonl.tmp7", root / ".latest.tmp99"):
        leftover.write_text("half")
    (out / ".notes.tmp").write_text("not ours")
    assert prepare_out_dir(str(out), resume=True, overwrite=False) is True
    assert sorted(os.listdir(root)) == ["latest", "step_000000005", "step_000000010"]
    assert sorted(os.listdir(out)) == [".notes.tmp", CHECKPOINTS]
    assert latest_checkpoint(str(out)) == str(root / "step_000000010")


def test_too_little_free_space_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"only \d+ MiB free in .*, the run needs about \d+ MiB"):
        check_out_dir(str(tmp_path / "run"), resume=False, overwrite=False, min_free_bytes=2**62)


# ----------------------------------------------------------------------------------------------------
# Two processes

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT)
TWO_PROCESS_RUN = [*TINY_TRAIN, "--epochs", "3", "--log-every", "1"]  # 2 steps an epoch on each process


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "reference"
    assert launch(out, args=TWO_PROCESS_RUN, command=TORCHRUN).wait() == 0, output_of(out)[-3000:]
    return out


def test_two_processes_write_once_and_a_killed_run_resumes_on_two_only(tmp_path, two_process_reference):
    with open(two_process_reference / "config.json") as f:
        assert json.load(f)["world_size"] == 2
    steps = [m["step"] for m in read_metrics(two_process_reference / "metrics.jsonl")]
    assert steps == list(range(1, 7))  # one line a step: only the main process writes
    assert sorted(os.listdir(two_process_reference)) == ["checkpoints", "config.json", "metrics.jsonl",
                                                         "model.safetensors"]

    out = tmp_path / "killed"
    proc = launch(out, args=TWO_PROCESS_RUN, command=TORCHRUN, start_new_session=True)
    assert wait_for(lambda: checkpoint_step(out) >= 2, proc), output_of(out)[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers at once
    proc.wait()
    assert_complete_checkpoint(out)

    proc = run_script("train_ijepa.py", *TWO_PROCESS_RUN, "--out", out, "--resume", check=False)
    assert proc.returncode == 2
    assert last_line(proc.stderr).startswith(f"error: cannot resume {out} with different settings: world_size 2 -> 1;")
    with open(out / "config.json") as f:
        assert json.load(f)["world_size"] == 2  # untouched by the refused run

    assert launch(out, "--resume", args=TWO_PROCESS_RUN, command=TORCHRUN).wait() == 0, output_of(out)[-3000:]
    assert_same_run(out, two_process_reference)


def test_sigterm_to_the_launcher_stops_both_processes_at_one_step(tmp_path, two_process_reference):
    out = tmp_path / "preempted"
    proc = launch(out, args=TWO_PROCESS_RUN, command=TORCHRUN)
    assert wait_for(logged_since(out, 0, 1), proc), output_of(out)[-3000:]
    proc.send_signal(signal.SIGTERM)  # the launcher passes it on to both workers
    assert proc.wait() != 0
    match = re.search(r"SIGTERM: saved a resumable checkpoint at step (\d+) in (\S+);", output_of(out))
    assert match and match[2] == latest_checkpoint(str(out)), output_of(out)[-3000:]
    assert_complete_checkpoint(out)
    assert launch(out, "--resume", args=TWO_PROCESS_RUN, command=TORCHRUN).wait() == 0, output_of(out)[-3000:]
    assert_same_run(out, two_process_reference)


# ----------------------------------------------------------------------------------------------------
# The other training scripts: killed while writing a checkpoint, resumed, same weights

OTHER_SCRIPTS = {
    "train_pijepa.py": [*TINY_TRAIN, "--epochs", "3", "--levels", "2"],
    "train_hierarchical_predictor.py": ["--dataset", "digits", "--layers", "-1,-2", "--batch-size", "64", "--subset",
                                        "320", "--monitor-size", "64", "--statistics-size", "256", "--epochs", "4",
                                        "--warmup-epochs", "0", "--hidden", "64", "--predictor-hidden", "64"],
}


@pytest.mark.parametrize("script", sorted(OTHER_SCRIPTS))
def test_other_scripts_killed_mid_checkpoint_resume_to_the_same_weights(tmp_path, trained_run, script):
    args = [*OTHER_SCRIPTS[script], "--data-root", str(tmp_path)]
    if script == "train_hierarchical_predictor.py":
        args += ["--backbone", str(trained_run)]
    command = (sys.executable, os.path.join(ROOT, script))
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert launch(reference, args=args, command=command).wait() == 0, output_of(reference)[-3000:]
    for kill in range(2):  # in the second and then the third checkpoint write
        proc = launch(out, "--resume", args=args, command=command)
        resumed_step = checkpoint_step(out)
        assert wait_for(lambda: checkpoint_step(out) > resumed_step, proc), output_of(out)[-3000:]
        assert wait_for(lambda: writing_checkpoint(out), proc), output_of(out)[-3000:]
        proc.kill()
        proc.wait()
        assert_complete_checkpoint(out)
    assert launch(out, "--resume", args=args, command=command).wait() == 0, output_of(out)[-3000:]
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# train_hierarchical_predictor.py: the same guarantees as train_ijepa.py's loop

HEAD = os.path.join(ROOT, "train_hierarchical_predictor.py")
# Five steps an epoch (320 images, batches of 64), a log line every step.
HEAD_RUN = [*OTHER_SCRIPTS["train_hierarchical_predictor.py"], "--log-every", "1"]


def head_args(trained_run, data_root, *extra):
    return [*HEAD_RUN, "--backbone", str(trained_run), "--data-root", str(data_root), *map(str, extra)]


def test_head_overwrite_keeps_the_old_run_until_the_new_settings_load(tmp_path, trained_run):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"the": "old run"}\n')
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    for bad in (["--layers=-1,-9"], ["--dataset", f"imagefolder:{tmp_path / 'missing'}"]):
        proc = run_script("train_hierarchical_predictor.py", *head_args(trained_run, tmp_path, *bad), "--overwrite",
                          "--out", out, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert (out / "config.json").read_text() == '{"the": "old run"}\n' and (out / "metrics.jsonl").exists()


def test_head_fresh_restart_drops_the_stale_metrics_of_a_killed_run(tmp_path, trained_run):
    out = tmp_path / "run"
    out.mkdir()  # killed before its first checkpoint: metrics but nothing to resume
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 7.0}\n{"step": 3, "loss": 7.0}\n{"step": 4, "lo')
    run_script("train_hierarchical_predictor.py", *head_args(trained_run, tmp_path, "--epochs", "1"), "--resume",
               "--out", out)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5] and all(r.get("loss") != 7.0 for r in records)


# Trains the head with gradients that overflow at chosen backward passes while the loss stays finite:
# argv[1] lists the passes, the rest are train_hierarchical_predictor.py flags.
OVERFLOWING_HEAD = """
import sys
sys.path.insert(0, {root!r})
import train_hierarchical_predictor as script

bad_passes = {{int(k) for k in sys.argv[1].split(",")}}
passes = [0]

def overflow(grad):
    passes[0] += 1
    return grad * float("inf") if passes[0] in bad_passes else grad

class Overflowing(script.HeadTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head.out.weight.register_hook(overflow)

script.HeadTrainer = Overflowing
script.main(sys.argv[2:])
"""


def train_head_with_overflows(tmp_path, trained_run, out, bad_passes, *flags):
    driver = tmp_path / "overflowing_head.py"
    driver.write_text(OVERFLOWING_HEAD.format(root=ROOT))
    return subprocess.run([sys.executable, str(driver), ",".join(map(str, bad_passes)),
                           *head_args(trained_run, tmp_path, "--epochs", "2", *flags), "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_head_nonfinite_weights_and_losses_are_never_saved(tmp_path, trained_run):
    out = tmp_path / "overflow"
    proc = train_head_with_overflows(tmp_path, trained_run, out, [5])  # step 5 ends epoch 1: NaN weights
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr).startswith("error: non-finite weights at or before step 5; the last good "
                                             "checkpoint is none yet")
    assert not (out / CHECKPOINTS).exists() and not (out / "model.safetensors").exists()

    out = tmp_path / "blows_up"  # NaN weights after step 7: the loss of step 8 is NaN, caught at its log line
    proc = train_head_with_overflows(tmp_path, trained_run, out, [7])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.fullmatch(r"error: non-finite loss at or before step 8; the last good checkpoint is "
                        rf"{re.escape(str(out))}/checkpoints/step_000000005 \(lower --lr.*\)", last_line(proc.stderr))
    assert sorted(os.listdir(out / CHECKPOINTS)) == ["latest", "step_000000005"]
    assert all(torch.isfinite(w).all() for w in load_file(out / "model.safetensors").values())

    out = tmp_path / "skips"  # --skip-nonfinite: the bad update is skipped and the run finishes
    proc = train_head_with_overflows(tmp_path, trained_run, out, [7], "--skip-nonfinite", "1")
    assert proc.returncode == 0 and "step 7: non-finite loss or gradients, update skipped" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def head_reference(tmp_path_factory, trained_run):
    out = tmp_path_factory.mktemp("head_reference") / "run"
    run_script("train_hierarchical_predictor.py", *head_args(trained_run, out.parent), "--out", out)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_head_signal_saves_a_checkpoint_exits_unfinished_and_resumes_exactly(tmp_path, trained_run, head_reference,
                                                                            sig):
    out, args = tmp_path / "stopped", head_args(trained_run, head_reference.parent)
    proc = launch(out, args=args, command=(sys.executable, HEAD))
    assert wait_for(logged_since(out, 0, 6), proc), output_of(out)[-3000:]  # inside epoch 2
    proc.send_signal(sig)
    assert proc.wait() == 128 + sig, output_of(out)[-3000:]
    match = re.search(r"(SIGTERM|SIGINT): saved a resumable checkpoint at step (\d+) in (\S+);", output_of(out))
    assert match and match[1] == sig.name and match[3] == latest_checkpoint(str(out))
    assert 7 <= int(match[2]) < 20
    assert_complete_checkpoint(out)
    run_script("train_hierarchical_predictor.py", *args, "--out", out, "--resume")
    assert_same_run(out, head_reference)


def test_head_resume_with_other_settings_is_refused_before_config_json_changes(tmp_path, trained_run):
    out = tmp_path / "run"
    args = head_args(trained_run, tmp_path, "--epochs", "1")
    run_script("train_hierarchical_predictor.py", *args, "--out", out)
    config = (out / "config.json").read_text()
    proc = run_script("train_hierarchical_predictor.py", *args, "--hidden", "32", "--collapse-guard", "stopgrad",
                      "--epochs", "2", "--out", out, "--resume", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert re.search(r"cannot resume \S+ with different settings: head\.hidden 64 -> 32, objective\.collapse_guard "
                     r"'ema' -> 'stopgrad';", proc.stderr), proc.stderr
    assert (out / "config.json").read_text() == config
    run_script("train_hierarchical_predictor.py", *args, "--epochs", "2", "--out", out, "--resume")
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 10


# ----------------------------------------------------------------------------------------------------
# Datasets: damaged tiny-imagenet text files, a decoded-image cache that follows edits inside class folders


def test_unreadable_tiny_imagenet_text_files_are_one_line_errors(tmp_path):
    from test_data import make_tiny_imagenet

    root = make_tiny_imagenet(tmp_path / "tin")
    wnids = root / "tiny-imagenet-200" / "wnids.txt"
    wnids.unlink()
    wnids.symlink_to(tmp_path / "nowhere")  # a broken link: listed, not readable
    with pytest.raises(UserError, match=r"cannot read tiny-imagenet-200/wnids.txt in .*; the dataset is damaged"):
        load_split(f"tiny-imagenet:{root}", "train", cache=False)
    wnids.unlink()
    wnids.write_bytes(b"n01\xff\xfe\n")
    with pytest.raises(UserError, match="cannot read tiny-imagenet-200/wnids.txt"):
        load_split(f"tiny-imagenet:{root}", "train", cache=False)


def test_the_decoded_image_cache_follows_a_file_replaced_inside_a_class_folder(tmp_path):
    from test_data import make_imagefolder, save_image

    root = make_imagefolder(tmp_path / "pets")
    spec, settings = f"imagefolder:{root}", dict(data_root=str(tmp_path), storage_size=8)
    first = load_split(spec, "train", **settings)
    top_mtime = os.stat(root).st_mtime_ns
    save_image(root / "train" / "cat" / "1.png", size=(16, 16), color=(0, 0, 255))  # same name, new pixels
    assert os.stat(root).st_mtime_ns == top_mtime  # the top folder cannot tell
    again = load_split(spec, "train", **settings)
    changed = (again.images != first.images).flatten(1).any(1)
    assert changed.sum() == 1 and again.images[changed][0, 2].min() == 255
    assert torch.equal(load_split(spec, "train", **settings).images, again.images)
    assert len(os.listdir(tmp_path / "cache")) == 2

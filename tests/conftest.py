"""Shared test helpers: tiny settings, running the scripts as subprocesses, and a small trained run."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A model and data small enough for a 2-core CPU: 32 px digits, patch 8 (4x4 grid), 2 blocks.
TINY_TRAIN = ["--dataset", "digits", "--model", "tiny", "--depth", "2", "--patch-size", "8",
              "--pred-depth", "1", "--pred-dim", "48", "--batch-size", "32", "--max-per-class", "16",
              "--monitor-size", "64", "--num-targets", "2", "--min-keep", "4", "--log-every", "2",
              "--warmup-epochs", "1"]


def run_script(script, *args, check=True, env=None, timeout=600):
    """Run one of the project's scripts in a subprocess; returns the CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same global seed: unseeded draws cannot make a test flaky."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished two-epoch I-JEPA run on digits, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "ijepa"
    data_root = tmp_path_factory.mktemp("data")
    run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "2", "--out", out, "--data-root", data_root)
    return out

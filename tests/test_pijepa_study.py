"""scripts/pijepa_study.py end to end in its smoke mode: every run trained and evaluated, the long run's
per-epoch snapshots evaluated, the summary and both figures written, and a second call resumes (no rerun)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import pijepa_study  # noqa: E402


def train_commands(out):
    return sum(line.startswith("$ ") and ("train_ijepa.py" in line or "train_pijepa.py" in line)
               for name in os.listdir(out) if name.endswith(".log") for line in open(os.path.join(out, name)))


def test_smoke_study_trains_evaluates_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "study")
    argv = ["--out", out, "--smoke", "--seeds", "0", "--strategies", "coarse_only", "--long-factor", "2",
            "--workers", "1", "--figures", str(tmp_path / "docs")]
    pijepa_study.main(argv)

    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["groups"]) == {"ijepa_2ep", "ijepa_1ep", "pijepa_coarse_only_1ep"}
    runs = {r["name"]: r for r in summary["runs"]}
    long_run = runs["ijepa_2ep_s0"]
    # digits, 8 images per class, batch 32: 2 steps per epoch; the snapshot after epoch 1 (step 2) is
    # evaluated, the one at the final step is the final weights and is not kept twice
    assert [s["epoch"] for s in long_run["snapshots"]] == [1.0]
    assert long_run["step"] == 4 and runs["ijepa_1ep_s0"]["step"] == 2
    for r in [long_run, *long_run["snapshots"]]:
        assert 0.0 <= r["probe"] <= 1.0 and 0.0 <= r["knn"] <= 1.0 and r["train_seconds"] > 0
    assert "pyramid_2x" in runs["pijepa_coarse_only_1ep_s0"]["retention"]
    assert long_run["snapshots"][0]["retention"] == {}  # the curve's points skip the scale variants
    for name in ("pijepa_study_e1_convergence.png", "pijepa_study_e1_scale_robustness.png"):
        assert os.path.getsize(tmp_path / "docs" / name) > 1000

    commands = train_commands(out)
    assert commands == 3
    pijepa_study.main(argv)  # every run has its results: nothing is trained again
    assert train_commands(out) == commands
    assert "pijepa_coarse_only_1ep" in capsys.readouterr().out

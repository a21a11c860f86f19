"""The GPU suite's smoke mode runs every item on the CPU, so the suite works the first time it meets a GPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_suite_writes_one_line_per_item(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "scripts/gpu_suite.py", "--smoke", "--out", str(out), "--scratch",
                    str(tmp_path / "runs")], cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in (out / "suite.jsonl").read_text().splitlines()]
    assert [r["item"] for r in records] == ["bench:cpu_tiny", "ijepa", "pijepa"]
    assert not [r for r in records if "error" in r], records
    assert records[0]["ijepa"]["images_per_s"] > 0 and records[0]["pijepa"]["step_ratio"] > 0
    for run in records[1:]:
        assert run["steps"] == 2 and 0 <= run["results"]["linear_probe"]["top1"] <= 1
    assert sorted(os.listdir(out)) == ["env.json", "suite.jsonl", "suite.log"]  # a remote machine returns few files


def test_a_failing_item_is_recorded_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "scripts/gpu_suite.py", "--out", str(out), "--data", str(tmp_path / "none"),
                           "--scratch", str(tmp_path / "runs"), "--only", "ijepa", "pijepa"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "suite.jsonl").read_text().splitlines()]
    assert [r["item"] for r in records] == ["ijepa", "pijepa"] and all("error" in r for r in records)

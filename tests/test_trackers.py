"""--log-with: Accelerate's tracker list, one line for a missing package, and a real tensorboard run."""

import glob
import importlib.util
import os

import pytest

from common import check_tracker, tracker_names, TRACKER_PACKAGES
from conftest import TINY_TRAIN, run_script
from data import UserError
from train_ijepa import build_parser


def test_log_with_offers_every_tracker_accelerate_supports():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    choices = next(a.choices for a in build_parser()._actions if a.dest == "log_with")
    assert set(choices) == set(LOGGER_TYPE_TO_CLASS) and "tensorboard" in choices and "wandb" in choices


def missing_tracker():
    for name in tracker_names():
        module, package = TRACKER_PACKAGES.get(name, (name, name))
        if importlib.util.find_spec(module) is None:
            return name, package
    pytest.skip("every tracker package is installed here")


def test_a_tracker_without_its_package_is_one_line_naming_the_package(tmp_path):
    name, package = missing_tracker()
    with pytest.raises(UserError, match=f"pip install {package}$"):
        check_tracker(name)
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "1", "--out", tmp_path / "run", "--data-root",
                      tmp_path, "--log-with", name, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --log-with {name} needs the {package} package, which is "
                                                f"not installed: pip install {package}"]
    assert not (tmp_path / "run" / "config.json").exists()  # refused before any work


def test_tensorboard_run_writes_event_files_with_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "1", "--out", out, "--data-root", tmp_path,
               "--log-with", "tensorboard")
    events = glob.glob(os.path.join(out, "tb", "events.out.tfevents.*"))
    assert events, os.listdir(out)
    scalars = set()
    for path in events:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"loss", "lr", "momentum", "monitor_rankme"} <= scalars


class RefusingAccelerator:
    """Stands in for an Accelerator whose tracker fails to start, as wandb does without a login."""

    def init_trackers(self, name, config=None, init_kwargs=None):
        self.seen = (name, config, init_kwargs)
        raise RuntimeError("No API key configured.\nUse `wandb login` to log in.")


def test_a_tracker_that_cannot_start_is_one_line_with_the_offline_hint(tmp_path):
    from argparse import Namespace

    from common import start_trackers

    accelerator = RefusingAccelerator()
    args = Namespace(log_with="wandb", out=str(tmp_path / "run"), crop_scale=(0.3, 1.0), depth=None, lr=1e-3)
    with pytest.raises(UserError) as error:
        start_trackers(accelerator, args)
    message = str(error.value)
    assert "\n" not in message and "No API key configured" in message and "WANDB_MODE=offline" in message
    name, config, init_kwargs = accelerator.seen
    assert name == "run" and init_kwargs == {"wandb": {"dir": str(tmp_path / "run")}}
    assert config == {"log_with": "wandb", "out": str(tmp_path / "run"), "crop_scale": "(0.3, 1.0)",
                      "depth": "None", "lr": 1e-3}  # tensorboard's hparams take numbers, strings and bools only
    start_trackers(accelerator, Namespace(log_with=None))  # no tracker: nothing to start

"""Settings the training scripts share: argparse value types, the data and run flag groups, and YAML
configs, which become command-line flags so that argparse checks a file exactly as it checks a command
line (one place for types, choices and unknown names). The command line wins over the file:

    python train_ijepa.py --config configs/cifar10_vit_tiny.yaml --epochs 3
    python train_ijepa.py --config in1k_vith14_ep300.yaml      # an official I-JEPA yaml (checkpoints.official_flags)
"""

import argparse
import math
import sys

from common import printable, tracker_names
from data import UserError
from checkpoints import official_flags

OFFICIAL_SECTIONS = {"data", "mask", "meta", "optimization", "logging"}


# ----------------------------------------------------------------------------------------------------
# Value types: a bad value is argparse's one-line error naming the flag


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


# ----------------------------------------------------------------------------------------------------
# Flag groups both training scripts have


def add_dataset_arguments(parser):
    """The "data" flags that name and read a dataset; returns the group for script-specific additions."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help="digits | cifar10 | cifar100 | imagefolder:<dir|tar> | "
                   "tiny-imagenet:<dir|tar.gz> | hf:<hub id>")
    g.add_argument("--data-root", default="data", help="where cifar downloads and decoded-image caches go")
    g.add_argument("--image-column", help="hf: image column (default: found by type)")
    g.add_argument("--label-column", help="hf: label column (default: found by type)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip (and count) unreadable images")
    return g


def add_run_arguments(parser, default_out):
    """The "run" flags (run.Run reads them); returns the group for script-specific additions."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=default_out)
    g.add_argument("--resume", action="store_true", help="continue the run in --out (fresh if it has none)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or stopped run in --out")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    g.add_argument("--save-every", type=positive_int, default=1, help="epochs between checkpoints")
    g.add_argument("--monitor-size", type=positive_int, default=512, help="held-out images for the "
                   "per-epoch collapse monitor")
    g.add_argument("--max-steps", type=positive_int, help="stop after this many steps (smoke tests)")
    g.add_argument("--skip-nonfinite", type=non_negative_int, default=0, metavar="N", help="skip up to N updates "
                   "whose loss or gradients are not finite, checked before each optimizer step (one host sync a "
                   "step); 0: stop at the first, checked at log time")
    g.add_argument("--log-with", default=None, choices=tracker_names(), help="an Accelerate tracker "
                   "(tensorboard and wandb write inside --out; without network: WANDB_MODE=offline)")
    return g


# ----------------------------------------------------------------------------------------------------
# Parsing: the command line, with a YAML file's settings in front of it


def parse_settings(parser, argv=None):
    """parser.parse_args(argv), where --config FILE adds the file's settings as flags before argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        config_argv = config_flags(parser, known.config)
        parse_config(parser, config_argv, known.config)  # the file's own errors name the file
        argv = config_argv + argv
    return parser.parse_args(argv)


def parse_config(parser, argv, path):
    """Parse a config's flags alone, so that argparse's error about a bad value names the file."""
    error = parser.error
    parser.error = lambda message: error(f"config {path}: {message}")
    try:
        parser.parse_args(argv)
    finally:
        parser.error = error


def config_flags(parser, path):
    """A YAML file's settings as command-line flags (`lr: 1e-3` -> `--lr=0.001`); flag names or, for an
    official I-JEPA yaml (sections data/mask/meta/optimization/logging), its keys read as flags."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"cannot read config {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of settings")
    if raw and set(raw) <= OFFICIAL_SECTIONS:
        settings = official_training_flags(raw, path)
    else:
        settings = {str(key).replace("-", "_"): value for key, value in raw.items()}
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        raise UserError(f"unknown settings in {path}: {', '.join(map(printable, unknown))}; see --help for the names")
    return [flag for key, value in settings.items() for flag in as_flags(actions[key], value, path)]


def official_training_flags(raw, path):
    mask = raw.get("mask") if isinstance(raw.get("mask"), dict) else {}
    if mask.get("num_enc_masks", 1) != 1:
        raise UserError("mask.num_enc_masks must be 1: one context block per image is supported")
    if mask.get("allow_overlap"):
        raise UserError("mask.allow_overlap: true would let the context see targets; it is not supported")
    try:
        flags, unknown = official_flags(raw, f"config {path}")
    except ValueError as e:
        raise UserError(str(e)) from None
    if unknown:
        raise UserError(f"unknown keys in the official-format config: {', '.join(map(printable, unknown))}")
    return flags


def as_flags(action, value, path):
    """One setting as argv entries for its flag; argparse then checks the values. YAML's own types are
    checked here only where argv would lose them (true/false, lists, null)."""
    name = action.option_strings[0]

    def invalid(expected):
        return UserError(f"config {path}: {name} = {value!r} is invalid ({expected})")

    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        if not isinstance(value, bool):
            raise invalid("expected true or false")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [name if value else "--no-" + name[2:]]
        return [name] if value else []
    if value is None:  # null: "not set", for settings that have no default
        if action.default is not None:
            raise invalid("expected a value, got null")
        return []
    if action.nargs is not None:
        count = action.nargs if isinstance(action.nargs, int) else None  # "+" and "*" take any length
        if not isinstance(value, (list, tuple)) or (count is not None and len(value) != count):
            raise invalid(f"expected a list of {count or 'one or more'} values")
        if any(isinstance(v, (list, dict)) for v in value):
            raise invalid("expected a list of single values")
        return [name, *map(str, value)]
    if isinstance(value, (list, dict)):
        raise invalid("expected a single value")
    return [f"{name}={value}"]  # "=": a value like "-1,-4" is not taken for a flag

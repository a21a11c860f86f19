"""Hostile and wrong inputs: each gives one line naming the problem, a non-zero exit, and writes nothing.
Flags and settings, dataset paths, damaged and odd image files, damaged or foreign checkpoints and run
folders, and pickles that would run code (refused, never run: a marker file they would create stays absent)."""

import io
import json
import os
import pickle
import re
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import evaluate_embeddings
import train_ijepa
import train_pijepa
from common import CHECKPOINTS, latest_checkpoint, RUN_FILES
from conftest import TINY_TRAIN, run_script
from data import decode_image, load_split, open_stream, UserError
from checkpoints import read_official_checkpoint
from models import load_encoder


def one_line_error(main, argv, capsys):
    """Run a script's main in this process; it must exit 2 with exactly one line, 'error: ...'."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def assert_nothing_written(out):
    assert not any(os.path.exists(os.path.join(out, name)) for name in RUN_FILES)


# ----------------------------------------------------------------------------------------------------
# Flags and settings


@pytest.mark.parametrize("flags, message", [
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--epochs", "-1"], "argument --epochs: must be a positive integer, got -1"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--batch-size", "many"], "argument --batch-size: invalid positive_int value: 'many'"),
    (["--image-size", "36"], "--image-size 36 is not divisible by --patch-size 8"),
    (["--target-scale", "0.2", "1.5"], "--target-scale must satisfy 0 < min <= max <= 1, got 0.2 1.5"),
    (["--context-scale", "0", "1"], "--context-scale must satisfy"),
    (["--crop-scale", "nan", "1"], "--crop-scale must satisfy"),
    (["--target-aspect", "0", "1"], "target_aspect must satisfy"),
    (["--ema", "0.9", "1.1"], "--ema must satisfy"),
    (["--optimizer", "muon", "--muon-momentum", "1"], "--muon-momentum must satisfy 0 <= momentum < 1, got 1.0"),
    (["--muon-momentum", "0.9"], "--muon-momentum sets Muon, which --optimizer adamw does not use"),
    (["--lr", "nan"], "argument --lr: must be a finite number >= 0, got nan"),
    (["--lr=-1e-3"], "argument --lr: must be a finite number >= 0"),
    (["--lr", "1e38"], "AdamW would overflow"),
    (["--skip-nonfinite", "-1"], "argument --skip-nonfinite: must be an integer >= 0"),
    (["--num-targets", "0"], "argument --num-targets: must be a positive integer"),
    (["--model", "enormous"], "unknown model 'enormous'"),
    (["--pred-dim", "50"], "pred_dim 50 is not divisible by num_heads 3"),
    (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
    (["--min-keep", "16"], "mask settings leave fewer than 16 context patches too often (grid 4x4)"),
    (["--target-scale", "0.9", "1", "--num-targets", "4"], "mask settings leave fewer than"),
    (["--grad-accum", "100"], "batches per epoch cannot make one step of --grad-accum 100"),
    (["--batch-size", "1000"], "batch size 1000 is larger than the"),
    (["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
    (["--dataset", "cifar10:/somewhere"], "--dataset cifar10 takes no path"),
    (["--dataset", "imagefolder:"], "--dataset imagefolder needs a path"),
    (["--dataset", "imagefolder:/no/such/folder"], "imagefolder path /no/such/folder does not exist"),
    (["--config", "/no/such/config.yaml"], "cannot read config /no/such/config.yaml"),
])
def test_bad_flags_and_values(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    argv = [*TINY_TRAIN, "--epochs", "1", "--out", out, "--data-root", tmp_path, *flags]
    assert message in one_line_error(train_ijepa.main, argv, capsys)
    assert_nothing_written(out)


@pytest.mark.parametrize("flags, message", [
    (["--levels", "4"], "cannot make 4 pyramid levels"),  # a 4x4 grid has levels 4x4, 2x2, 1x1 at most
    (["--levels", "2", "--level-weights", "1"], "--level-weights has 1 values for 2 levels"),
    (["--coarse-targets", "mean"], "invalid choice: 'mean'"),
])
def test_bad_pyramid_settings(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    argv = [*TINY_TRAIN, "--epochs", "1", "--out", out, "--data-root", tmp_path, *flags]
    assert message in one_line_error(train_pijepa.main, argv, capsys)
    assert_nothing_written(out)


@pytest.mark.parametrize("text, message", [
    ("epochs: 2\nepoch: 3\n", "unknown settings in"),
    ("batch_size: [32]\n", "--batch-size = [32] is invalid"),
    ("lr: fast\n", "argument --lr: invalid non_negative_float value: 'fast'"),
    ("epochs: 0\n", "run.yaml: argument --epochs: must be a positive integer, got 0"),
    ("target_scale: 0.2\n", "--target-scale = 0.2 is invalid (expected a list of 2 values)"),
    ("- a\n- b\n", "must be a mapping of settings"),
    ("meta: {model_name: vit_tiny, colour: blue}\n", "unknown keys in the official-format config: meta.colour"),
    ("flip: 1\n", "--flip = 1 is invalid (expected true or false)"),
    ("target_scale: {low: 0.1}\n", "--target-scale = {'low': 0.1} is invalid"),
    ("epochs: [1, 2\n", "is not valid YAML"),
    ("just a string\n", "must be a mapping of settings"),
    ("meta: {model_name: vit_tiny}\nmask: {num_enc_masks: 2}\n", "mask.num_enc_masks must be 1"),
])
def test_bad_yaml_configs(tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert message in one_line_error(train_ijepa.main, ["--config", config, "--out", tmp_path / "out"], capsys)
    assert_nothing_written(tmp_path / "out")


def test_an_existing_run_is_refused_and_a_failed_overwrite_keeps_it(tmp_path, capsys, trained_run):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = {name: os.path.getmtime(out / name) for name in ("config.json", "model.safetensors")}
    argv = [*TINY_TRAIN, "--epochs", "1", "--out", out, "--data-root", tmp_path]
    assert "already holds a run; pass --resume" in one_line_error(train_ijepa.main, argv, capsys)
    # --overwrite with a mistyped dataset: the old run must survive the error
    assert "does not exist" in one_line_error(train_ijepa.main, [*argv, "--overwrite", "--dataset",
                                                                 "imagefolder:/no/such/folder"], capsys)
    assert before == {name: os.path.getmtime(out / name) for name in before}
    assert latest_checkpoint(str(out)).endswith("step_000000010")


# ----------------------------------------------------------------------------------------------------
# Dataset paths and image files


def encode(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def image_folder(root, per_class=24, size=32):
    """Two classes of random RGB PNGs: root/<class>/<i>.png."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            (root / cls / f"{i:02d}.png").write_bytes(encode(Image.fromarray(pixels)))
    return root


def make_bad_file(folder, kind):
    """One damaged entry of the given kind in folder; returns its name."""
    good = encode(Image.fromarray(np.full((32, 32, 3), 90, np.uint8)), "JPEG")
    name = {"zero-byte": "empty.png", "truncated": "cut.jpg", "not-an-image": "notes.jpg",
            "broken-link": "gone.png", "pipe": "pipe.png"}[kind]
    path = folder / name
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "not-an-image":
        path.write_text("these are my notes, not a picture")
    elif kind == "broken-link":
        path.symlink_to(folder / "no_such_target.png")
    else:  # a named pipe: reading it would wait forever
        os.mkfifo(path)
    return name


def within(seconds, fn, *args, **kwargs):
    """fn on a thread, so that a read that blocks fails the test instead of hanging it: {"value": ...} or
    {"error": the UserError}."""
    result = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except UserError as e:
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} blocked for {seconds} s"
    return result


BAD_KINDS = ["zero-byte", "truncated", "not-an-image", "broken-link", "pipe"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_a_bad_image_file_is_named(tmp_path, kind):
    root = image_folder(tmp_path / "images", per_class=3)
    name = make_bad_file(root / "dog", kind)
    result = within(60, load_split, f"imagefolder:{root}", "train", data_root=tmp_path, storage_size=32, cache=False)
    message = str(result["error"])
    assert message.startswith(f"cannot read image dog/{name} (") and message.endswith("pass --skip-bad-images")


def test_bad_image_files_are_skipped_and_counted(tmp_path):
    root = image_folder(tmp_path / "images", per_class=10)
    for kind in BAD_KINDS:
        make_bad_file(root / ("cat" if kind in BAD_KINDS[:2] else "dog"), kind)
    splits = [within(60, load_split, f"imagefolder:{root}", split, data_root=tmp_path, storage_size=32,
                     skip_bad_images=True, cache=False)["value"] for split in ("train", "test")]
    assert [s.skipped for s in splits] == [5, 5]
    assert sum(len(s) for s in splits) == 20 and splits[0].images.shape[1:] == (3, 32, 32)


def test_streamed_folders_treat_unreadable_files_as_bad_images(tmp_path):
    root = image_folder(tmp_path / "images", per_class=4)
    names = [make_bad_file(root / "dog", kind) for kind in ("broken-link", "pipe", "zero-byte")]
    errors = []
    for split in ("train", "test"):
        data = open_stream(f"imagefolder:{root}", split, 32)
        errors += [within(60, data.__getitem__, i)["value"][2] for i in range(len(data))]
    named = sorted(e.split(" (")[0] for e in errors if e)
    assert named == [f"cannot read image dog/{name}" for name in sorted(names)]


def test_odd_image_modes_and_sizes_decode_to_rgb(tmp_path):
    root = tmp_path / "odd"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    grey16 = Image.fromarray(np.full((20, 30), 65535, np.uint16))  # 16-bit white
    clear = Image.new("RGBA", (37, 23), (0, 0, 0, 0))  # fully transparent: white background
    palette = Image.new("P", (40, 40), 3)
    palette.info["transparency"] = 3
    images = {"a/grey.png": Image.new("L", (33, 17), 128), "a/grey16.png": grey16, "a/rgba.png": clear,
              "a/palette.gif": palette, "b/cmyk.jpg": Image.new("CMYK", (64, 20), (0, 0, 0, 0)),
              "b/bilevel.png": Image.new("1", (9, 50), 1), "b/grey_alpha.png": Image.new("LA", (16, 16), (10, 255)),
              "b/rgb.png": Image.new("RGB", (32, 32), (1, 2, 3))}
    for name, image in images.items():
        fmt = {"gif": "GIF", "jpg": "JPEG"}.get(name.rsplit(".", 1)[1], "PNG")
        (root / name).write_bytes(encode(image, fmt))
    with pytest.raises(UserError, match=r"images have different sizes .*; pass --storage-size"):
        load_split(f"imagefolder:{root}", "train", data_root=tmp_path, cache=False, seed=1)

    data = decoded_by_name(root)
    assert all(v.shape == (3, 16, 16) and v.dtype == torch.uint8 for v in data.values())
    assert (data["a/grey.png"] == 128).all() and (data["a/grey16.png"] == 255).all()
    assert (data["a/rgba.png"] == 255).all() and (data["b/cmyk.jpg"] >= 250).all()
    assert (data["b/grey_alpha.png"] == 10).all() and data["b/rgb.png"][:, 0, 0].tolist() == [1, 2, 3]


def decoded_by_name(root):
    """Every image of a small folder decoded at storage size 16, by relative path."""
    return {f"{cls}/{name}": decode_image((root / cls / name).read_bytes(), name, 16)
            for cls in sorted(os.listdir(root)) for name in sorted(os.listdir(root / cls))}


@pytest.mark.parametrize("what, message", [
    ("empty-folder", "no images for split 'train'"),
    ("regular-file", "is a file but not a tar archive"),
    ("truncated-tar", "cannot read archive"),
    ("only-bad-images", "all 1 images are unreadable (e.g. cat/empty.png); check the dataset path"),
])
def test_missing_empty_and_unreadable_dataset_paths(tmp_path, capsys, what, message):
    path = tmp_path / "dataset"
    if what == "empty-folder":
        path.mkdir()
    elif what == "regular-file":
        path.write_text("not images")
    elif what == "truncated-tar":
        image_folder(tmp_path / "images", per_class=2)
        with tarfile.open(tmp_path / "full.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "images", arcname="images")
        data = (tmp_path / "full.tar.gz").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        (path / "cat").mkdir(parents=True)
        make_bad_file(path / "cat", "zero-byte")
    out = tmp_path / "out"
    argv = [*TINY_TRAIN, "--epochs", "1", "--out", out, "--data-root", tmp_path, "--dataset", f"imagefolder:{path}",
            "--skip-bad-images"]
    assert message in one_line_error(train_ijepa.main, argv, capsys)
    assert_nothing_written(out)


def test_an_unlistable_folder_is_named(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root lists folders without read permission; the broken link and pipe cases cover unreadable "
                    "entries")
    root = image_folder(tmp_path / "images", per_class=2)
    (root / "dog").chmod(0)
    try:
        with pytest.raises(UserError, match="cannot list folder .*dog"):
            load_split(f"imagefolder:{root}", "train", data_root=tmp_path, storage_size=32, cache=False)
    finally:
        (root / "dog").chmod(0o700)


def test_training_on_a_folder_with_bad_files(tmp_path):
    root = image_folder(tmp_path / "images", per_class=20)
    make_bad_file(root / "cat", "truncated")
    make_bad_file(root / "dog", "not-an-image")
    out = tmp_path / "run"
    flags = [*TINY_TRAIN, "--dataset", f"imagefolder:{root}", "--epochs", "1", "--data-root", tmp_path, "--out", out]
    proc = run_script("train_ijepa.py", *flags, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: cannot read image cat/cut.jpg (") and lines[0].endswith("--skip-bad-images")
    assert_nothing_written(out)
    proc = run_script("train_ijepa.py", *flags, "--skip-bad-images")
    assert "skipped 2 unreadable images (--skip-bad-images)" in proc.stdout
    with open(out / "config.json") as f:
        assert json.load(f)["skipped_images"] == 2


# ----------------------------------------------------------------------------------------------------
# Damaged and foreign checkpoints and run folders


class RunsCode:
    """Unpickling this calls open(marker, "w"): code that runs, leaving a file behind if it ever does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def code_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state": RunsCode(marker)}, f, protocol=2)


@pytest.fixture
def run_copy(tmp_path, trained_run):
    """A private copy of the shared two-epoch run (checkpoints at steps 5 and 10)."""
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out


def resume_error(out, capsys, *flags):
    argv = [*TINY_TRAIN, "--epochs", "2", "--out", out, "--data-root", out.parent, "--resume", *flags]
    config = (out / "config.json").read_text()
    message = one_line_error(train_ijepa.main, argv, capsys)
    assert (out / "config.json").read_text() == config  # a refused resume rewrites nothing
    return message


@pytest.mark.parametrize("damage, message", [
    ("truncate model.safetensors", r"\(SafetensorError: .*\); delete that folder"),
    ("empty model.safetensors", r"\(SafetensorError: .*\); delete that folder"),
    ("truncate optimizer.bin", r"cannot resume from .*step_000000010 \(.*\); delete that folder"),
    ("empty trainer_state.json", r"trainer_state.json is damaged \(.*\); delete that folder"),
    ("code optimizer.bin", r"cannot resume from .*step_000000010 \(UnpicklingError: Weights only load failed"),
])
def test_a_damaged_checkpoint_is_refused_by_resume(run_copy, capsys, tmp_path, damage, message):
    action, name = damage.split()
    path = run_copy / CHECKPOINTS / "step_000000010" / name
    marker = tmp_path / "code_ran"
    if action == "code":
        code_pickle(path, marker)
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if action == "truncate" else b"")
    assert re.search(message, resume_error(run_copy, capsys))
    assert not marker.exists()
    shutil.rmtree(run_copy / CHECKPOINTS / "step_000000010")  # as the message advises: the one before works
    assert latest_checkpoint(str(run_copy)).endswith("step_000000005")


def test_a_checkpoint_of_another_architecture_lists_the_mismatched_keys(run_copy, capsys):
    path = run_copy / CHECKPOINTS / "step_000000010" / "model.safetensors"
    weights = load_file(path)
    weights["encoder.blocks.2.attn.qkv.weight"] = weights.pop("encoder.blocks.1.attn.qkv.weight")
    save_file(weights, path)
    message = resume_error(run_copy, capsys)
    assert "cannot resume from" in message and "encoder.blocks.1.attn.qkv.weight" in message
    assert "encoder.blocks.2.attn.qkv.weight" in message


def test_resuming_with_other_model_settings_names_them(run_copy, capsys):
    message = resume_error(run_copy, capsys, "--depth", "3", "--pred-dim", "96")
    assert "encoder.depth 2 -> 3" in message and "predictor.pred_dim 48 -> 96" in message


def test_random_states_holding_code_are_never_run(run_copy, capsys, tmp_path):
    marker = tmp_path / "code_ran"
    code_pickle(run_copy / CHECKPOINTS / "step_000000005" / "random_states_0.pkl", marker)
    shutil.rmtree(run_copy / CHECKPOINTS / "step_000000010")
    train_ijepa.main([*TINY_TRAIN, "--epochs", "2", "--out", str(run_copy), "--data-root", str(tmp_path),
                      "--resume"])  # our randomness is a function of the step: the unreadable states are not needed
    assert not marker.exists() and latest_checkpoint(str(run_copy)).endswith("step_000000010")


@pytest.mark.parametrize("damage, message", [
    ("truncate", "model.safetensors is unreadable"),
    ("empty", "model.safetensors is unreadable"),
    ("code", "model.safetensors is unreadable"),
    ("unknown key", "unknown ViTConfig keys ['colour']"),
    ("wrong type", "ViTConfig.depth = '2' is not a valid int"),
    ("not json", "config.json is not valid JSON"),
    ("a list", "config.json is not a mapping of settings"),
    ("deeper", "weights do not match the encoder architecture: missing ['blocks.2.attn.proj.bias'"),
])
def test_a_damaged_run_folder_is_refused_by_load_encoder_and_evaluation(run_copy, capsys, tmp_path, damage, message):
    weights, config_path = run_copy / "model.safetensors", run_copy / "config.json"
    config = json.loads(config_path.read_text())
    marker = tmp_path / "code_ran"
    if damage in ("truncate", "empty"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    elif damage == "code":
        code_pickle(weights, marker)
    elif damage == "not json":
        config_path.write_text("{'encoder': ")
    elif damage == "a list":
        config_path.write_text("[1, 2]")
    else:
        config["encoder"].update({"unknown key": {"colour": "blue"}, "wrong type": {"depth": "2"},
                                  "deeper": {"depth": 3}}[damage])
        config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_encoder(str(run_copy))
    assert message in str(error.value) and "\n" not in str(error.value)
    argv = ["--ckpt", run_copy, "--data-root", tmp_path]
    assert message in one_line_error(evaluate_embeddings.main, argv, capsys)
    assert not marker.exists()


def test_an_official_checkpoint_holding_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save({"encoder": {"w": torch.zeros(1)}, "extra": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load .* could run code"):
        read_official_checkpoint(str(path))
    assert not marker.exists()


def test_a_cifar_batch_holding_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        code_pickle(folder / name, marker)
    with pytest.raises(UserError, match="refusing to unpickle .*open from a dataset file"):
        load_split("cifar10", "train", data_root=str(tmp_path))
    assert not marker.exists()

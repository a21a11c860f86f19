"""train_ijepa.py end to end on digits, exact resume, two processes, configs, schedules, bad inputs."""

import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from common import (cosine_ramp, latest_checkpoint, linear_ramp, param_groups, read_metrics, warmup_cosine)
from conftest import ROOT, TINY_TRAIN, run_script
from models import load_encoder, load_predictor
from train_ijepa import build_model, parse_args


def assert_same_weights(a, b):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_two_epochs_write_a_complete_folder(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["script"] == "train_ijepa" and config["world_size"] == 1
    assert config["encoder"]["depth"] == 2 and config["args"]["epochs"] == 2 and len(config["classes"]) == 10
    weights = load_file(trained_run / "model.safetensors")
    assert {k.split(".")[0] for k in weights} == {"encoder", "target_encoder", "predictor"}
    metrics = read_metrics(trained_run / "metrics.jsonl")
    assert metrics[-1]["step"] == 10 and metrics[-1]["epoch"] == 2.0
    for key in ("loss", "lr", "weight_decay", "momentum", "images_per_s", "mask_context", "mask_target",
                "monitor_rankme", "monitor_feature_std"):
        assert key in metrics[-1] and math.isfinite(metrics[-1][key]), key
    assert latest_checkpoint(str(trained_run)).endswith("step_000000010")
    encoder = load_encoder(str(trained_run))
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 16, 192)
    torch.testing.assert_close(encoder.state_dict()["norm.weight"], weights["target_encoder.norm.weight"])
    assert load_predictor(str(trained_run)).cfg.pred_dim == 48


def test_loss_falls_on_digits(tmp_path):
    out = tmp_path / "longer"
    run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "6", "--max-per-class", "32", "--out", out,
               "--data-root", tmp_path)
    losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl")]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_resume_after_epoch_one_equals_an_uninterrupted_run(tmp_path, trained_run):
    out = tmp_path / "resumed"
    run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "2", "--max-steps", "5", "--out", out,
               "--data-root", tmp_path)
    assert latest_checkpoint(str(out)).endswith("step_000000005")
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "2", "--out", out, "--data-root", tmp_path,
                      "--resume")
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_weights(out, trained_run)
    steps = [m["step"] for m in read_metrics(out / "metrics.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_two_process_cpu_run(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(ROOT, "train_ijepa.py"), *TINY_TRAIN, "--epochs", "1", "--out", str(out),
           "--data-root", str(tmp_path)]
    import subprocess

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    metrics = read_metrics(out / "metrics.jsonl")
    assert metrics[-1]["step"] == 2  # 160 images / 2 processes / batch 32 = 2 steps, logged once each
    assert len(metrics) == len({m["step"] for m in metrics})  # only the main process writes


def test_official_yaml_sections_are_accepted(tmp_path):
    path = tmp_path / "official.yaml"
    path.write_text("""
data: {batch_size: 64, crop_size: 224, crop_scale: [0.3, 1.0], use_horizontal_flip: false,
       root_path: /datasets/, image_folder: imagenet_full_size/061417/, num_workers: 10, pin_mem: true}
logging: {folder: /tmp/ijepa-in1k, write_tag: jepa}
mask: {allow_overlap: false, aspect_ratio: [0.75, 1.5], enc_mask_scale: [0.85, 1.0], min_keep: 10,
       num_enc_masks: 1, num_pred_masks: 4, patch_size: 14, pred_mask_scale: [0.15, 0.2]}
meta: {copy_data: false, load_checkpoint: false, model_name: vit_huge, pred_depth: 12, pred_emb_dim: 384,
       read_checkpoint: null, use_bfloat16: true}
optimization: {ema: [0.996, 1.0], epochs: 300, final_lr: 1.0e-06, final_weight_decay: 0.4, ipe_scale: 1.0,
               lr: 0.001, start_lr: 0.0002, warmup: 40, weight_decay: 0.04}
""")
    args = parse_args(["--config", str(path), "--epochs", "3"])  # the command line wins over the file
    assert args.model == "huge" and args.patch_size == 14 and args.image_size == 224 and args.pred_depth == 12
    assert args.epochs == 3 and args.warmup_epochs == 40 and args.mixed_precision == "bf16" and not args.flip
    assert args.dataset == "imagefolder:/datasets/imagenet_full_size/061417/" and args.out == "/tmp/ijepa-in1k"


def test_flat_yaml_config_and_committed_configs_parse(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: digits\nepochs: 3\ntarget-scale: [0.1, 0.2]\nflip: false\n")
    args = parse_args(["--config", str(path)])
    assert args.epochs == 3 and args.target_scale == [0.1, 0.2] and args.flip is False  # as from the command line
    configs = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(configs)):
        if name.endswith(".yaml") and not name.startswith("accelerate"):
            parse_args(["--config", os.path.join(configs, name)])


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "must be a positive integer"),
    (["--batch-size", "0"], "must be a positive integer"),
    (["--image-size", "30"], "not divisible by --patch-size"),
    (["--target-scale", "0.2", "1.5"], "--target-scale must satisfy"),
    (["--dataset", "nosuch"], "unknown dataset"),
    (["--dataset", "imagefolder:/no/such/path"], "does not exist"),
    (["--model", "enormous"], "unknown model"),
    (["--bogus-flag"], "unrecognized arguments"),
])
def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, flags, message):
    out = tmp_path / "bad"
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "1", "--out", out, "--data-root", tmp_path, *flags,
                      check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "model.safetensors").exists() and not (out / "checkpoints").exists()


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, trained_run):
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--epochs", "1", "--out", trained_run, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr and "--overwrite" in proc.stderr


def test_schedules_are_pure_functions_of_the_step():
    assert warmup_cosine(0, 100, 10, 2e-4, 1e-3, 1e-6) == pytest.approx(2e-4)
    assert warmup_cosine(10, 100, 10, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert warmup_cosine(55, 100, 10, 2e-4, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)
    assert warmup_cosine(100, 100, 10, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert cosine_ramp(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_ramp(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_ramp(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert linear_ramp(0, 100, 0.996, 1.0) == 0.996 and linear_ramp(100, 100, 0.996, 1.0) == 1.0
    assert linear_ramp(25, 100, 0.996, 1.0) == pytest.approx(0.997)


def test_parameter_groups_partition_and_exempt_norms_biases_and_tokens():
    args = parse_args(TINY_TRAIN)
    model = build_model(args)
    decay, no_decay = param_groups(model, 0.04)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "predictor.mask_token" in no_decay_names and "encoder.norm.weight" in no_decay_names
    assert "encoder.blocks.0.attn.qkv.bias" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and "encoder.blocks.0.attn.qkv.weight" not in no_decay_names
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]} == trainable
    assert not any(names[id(p)].startswith("target_encoder") for p in decay["params"] + no_decay["params"])


def test_step_leaves_autocast_and_train_mode_to_the_prepared_model(tmp_path, monkeypatch):
    """accelerator.prepare already runs the model's forward under autocast, and the monitor (the one place
    that autocasts, on the unwrapped target encoder) never leaves train mode: the loop enters autocast once
    per epoch, for the monitor, not once per step, and sets train mode once."""
    import accelerate

    import models
    import train_ijepa

    calls = {"autocast": 0, "train": 0}
    autocast, train = accelerate.Accelerator.autocast, models.IJEPA.train

    def counting_autocast(self, *args, **kwargs):
        calls["autocast"] += 1
        return autocast(self, *args, **kwargs)

    def counting_train(self, mode=True):
        calls["train"] += 1
        return train(self, mode)

    monkeypatch.setattr(accelerate.Accelerator, "autocast", counting_autocast)
    monkeypatch.setattr(models.IJEPA, "train", counting_train)
    out = tmp_path / "run"
    train_ijepa.main([*TINY_TRAIN, "--epochs", "2", "--out", str(out), "--data-root", str(tmp_path)])
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == 10
    assert calls == {"autocast": 2, "train": 1}

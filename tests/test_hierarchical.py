"""The hierarchical predictor head: shapes and layer aggregation, the two-view augmentation, the collapse
guard against the unguarded objective, and train_hierarchical_predictor.py end to end with an exact resume."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from common import read_metrics
from conftest import run_script
from data import ColourJitter, eval_transform, load_split, luminance
from models import (HeadConfig, HierarchicalHead, load_encoder, load_hierarchical_head, pooled_layer_features,
                    VisionTransformer, vit_config)
from train_hierarchical_predictor import TwoViews

D = 192


def test_head_maps_layers_to_features_for_pooled_and_token_inputs():
    for aggregation in ("weighted-sum", "concat"):
        head = HierarchicalHead(HeadConfig(embed_dim=D, layers=(-1, -2, -3), aggregation=aggregation, hidden=64))
        assert head(torch.randn(5, 3, D)).shape == (5, D)
        tokens = torch.randn(2, 7, 3, D)  # (B, K, L, D): the head on every token
        out = head(tokens)
        assert out.shape == (2, 7, D)
        torch.testing.assert_close(out[1, 4], head(tokens[1, 4]))


def test_weighted_sum_starts_as_the_mean_and_learns_which_layer_counts():
    head = HierarchicalHead(HeadConfig(embed_dim=D, layers=(-1, -2, -3), hidden=64))
    features = torch.randn(4, 3, D)
    torch.testing.assert_close(head.aggregate(features), features.mean(1))
    with torch.no_grad():
        head.layer_logits.copy_(torch.tensor([0.0, 30.0, 0.0]))
    torch.testing.assert_close(head.aggregate(features), features[:, 1], atol=1e-6, rtol=0)
    concat = HierarchicalHead(HeadConfig(embed_dim=D, layers=(-1, -2), aggregation="concat", hidden=64))
    assert concat.layer_proj.in_features == 2 * D
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        HeadConfig(aggregation="max")


def test_input_standardisation_uses_the_measured_statistics():
    head = HierarchicalHead(HeadConfig(embed_dim=D, layers=(-1, -2), hidden=64))
    generator = torch.Generator().manual_seed(0)
    scale = 0.5 + 5 * torch.rand(2, D, generator=generator)  # away from 0: a constant dimension has no std
    features = torch.randn(256, 2, D, generator=generator) * scale + 3 * torch.randn(2, D, generator=generator)
    head.set_input_statistics(features)
    with torch.no_grad():
        head.layer_logits.copy_(torch.tensor([30.0, 0.0]))  # read layer 0 alone
        standardised = head.aggregate(features)
    torch.testing.assert_close(standardised.mean(0), torch.zeros(D), atol=1e-3, rtol=0)
    torch.testing.assert_close(standardised.std(0), torch.ones(D), atol=1e-3, rtol=0)


def test_jepa_path_standardises_tokens_with_token_statistics(trained_run):
    """--jepa-weight feeds the head per-token features, which spread far more than image means: standardised
    with the pooled statistics they came out many times too large (31-33 on the quick-start checkpoint)."""
    from masks import MultiBlockMaskSampler
    from models import gather_tokens, layer_features, load_predictor, token_statistics
    from train_hierarchical_predictor import HeadTrainer

    backbone, layers = load_encoder(str(trained_run)), (-1,)
    images = eval_transform(load_split("digits", "train").images[:256], 32)  # (N, 3, 32, 32)
    with torch.no_grad():
        pooled = pooled_layer_features(backbone, images, layers)  # (N, L, D)
        statistics = token_statistics(backbone, images.split(64), layers)
        trainer = HeadTrainer(HeadConfig(embed_dim=D, layers=layers, hidden=64), pooled, "ema", 64,
                              load_predictor(str(trained_run)), statistics)
        head_inputs = []  # what the head's MLP reads: the standardised layer (one layer: no mixing)
        trainer.head.fc1.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
        masks = MultiBlockMaskSampler(backbone.cfg.grid_size, num_targets=2, min_keep=4).sample(
            64, torch.Generator().manual_seed(0))
        view = images[:64]
        h = backbone(view)
        jepa = {"tokens": layer_features(backbone, view, layers, keep=masks.context_idx),
                "context_idx": masks.context_idx, "target_idx": masks.target_idx,
                "targets": gather_tokens(torch.nn.functional.layer_norm(h, h.shape[-1:]), masks.target_idx)}
        trainer(pooled[:64].expand(2, -1, -1, -1), jepa, 1.0)
    pooled_inputs, token_inputs = head_inputs  # the consistency path, then the JEPA path
    assert 0.5 < pooled_inputs.flatten(0, -2).std(0).mean() < 2
    assert 0.5 < token_inputs.flatten(0, -2).std(0).mean() < 2
    assert token_inputs.flatten(0, -2).mean(0).abs().mean() < 0.5
    # the same tokens standardised as image means: the scale the review measured
    assert trainer.head.aggregate(jepa["tokens"]).flatten(0, -2).std(0).mean() > 3


def test_pooled_layer_features_of_the_last_layer_are_the_pooled_encoder_output():
    encoder = VisionTransformer(vit_config("tiny", depth=3, img_size=32, patch_size=8)).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = pooled_layer_features(encoder, images, (-1, 0))
        torch.testing.assert_close(pooled[:, 0], encoder(images).mean(1))
    assert pooled.shape == (2, 2, D) and not torch.allclose(pooled[:, 0], pooled[:, 1])


def test_colour_jitter_and_greyscale_per_image():
    x = torch.rand(64, 3, 8, 8)
    generator = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(ColourJitter(p=0.0, p_grey=0.0)(x, generator()), x)
    grey = ColourJitter(p=0.0, p_grey=1.0)(x, generator())
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    torch.testing.assert_close(grey[:, :1], luminance(x))
    jittered = ColourJitter(p=1.0, p_grey=0.0)(x, generator())
    assert jittered.min() >= 0 and jittered.max() <= 1
    changed = (jittered - x).abs().flatten(1).amax(1) > 1e-3
    assert changed.all()
    ratios = (jittered.mean((1, 2, 3)) / x.mean((1, 2, 3)))
    assert ratios.std() > 0.05  # each image its own factors


def test_two_views_are_independent_augmentations():
    args = SimpleNamespace(crop_scale=(0.2, 1.0), flip=True, jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8,
                           grey_prob=0.2)
    images = load_split("digits", "test").images[:16]
    views = TwoViews(args, 24)(images, torch.Generator().manual_seed(0))
    assert views.shape == (2, 16, 3, 24, 24)
    assert not torch.allclose(views[0], views[1])
    again = TwoViews(args, 24)(images, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)  # a pure function of the generator: resumable


# ----------------------------------------------------------------------------------------------------
# The script

HEAD_TRAIN = ["--dataset", "digits", "--layers", "-1,-2", "--batch-size", "64", "--subset", "640",
              "--monitor-size", "128", "--statistics-size", "512", "--warmup-epochs", "0"]


def monitor_records(out):
    return [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "monitor_feature_std" in r]


def test_collapse_guard_keeps_features_spread_where_none_collapses(trained_run, tmp_path):
    runs = {}
    for guard in ("ema", "none"):
        out = tmp_path / guard
        run_script("train_hierarchical_predictor.py", "--backbone", trained_run, *HEAD_TRAIN, "--epochs", "6",
                   "--collapse-guard", guard, "--out", out, "--data-root", tmp_path / "data")
        runs[guard] = monitor_records(out)
    initial = runs["ema"][0]["monitor_feature_std"]
    assert runs["none"][0]["monitor_feature_std"] == initial  # same seed, same head before training
    assert runs["ema"][-1]["monitor_feature_std"] > 0.3 * initial
    assert runs["none"][-1]["monitor_feature_std"] < 0.2 * initial
    assert runs["none"][-1]["loss"] < 0.05 < 0.3 < runs["ema"][-1]["loss"]  # zero loss: the collapsed solution
    assert runs["ema"][-1]["monitor_rankme"] > 2 * runs["none"][-1]["monitor_rankme"]


def test_end_to_end_with_exact_resume_and_the_head_loader(trained_run, tmp_path):
    settings = ["--backbone", trained_run, *HEAD_TRAIN, "--batch-size", "32", "--subset", "320", "--epochs", "2",
                "--aggregation", "concat", "--jepa-weight", "0.5", "--num-targets", "2", "--min-keep", "4",
                "--data-root", tmp_path / "data", "--log-every", "5"]
    full, split = tmp_path / "full", tmp_path / "split"
    run_script("train_hierarchical_predictor.py", *settings, "--out", full)
    run_script("train_hierarchical_predictor.py", *settings, "--out", split, "--max-steps", "13")
    proc = run_script("train_hierarchical_predictor.py", *settings, "--out", split, "--resume")
    assert "resumed from" in proc.stdout + proc.stderr

    weights, resumed = load_file(full / "model.safetensors"), load_file(split / "model.safetensors")
    # the frozen I-JEPA predictor is left out; token_mean/std standardise the JEPA path's per-token inputs
    assert {k.split(".")[0] for k in weights} == {"head", "online_predictor", "target_head", "token_mean", "token_std"}
    assert weights.keys() == resumed.keys() and all(torch.equal(weights[k], resumed[k]) for k in weights)
    records = read_metrics(full / "metrics.jsonl")
    split_records = {r["step"]: r for r in read_metrics(split / "metrics.jsonl")}
    assert sorted(split_records) == [0, 5, 10, 13, 15, 20]  # 13: the stop at --max-steps
    assert all(split_records[r["step"]]["loss"] == r["loss"] for r in records[1:])
    assert records[-1]["step"] == 20 and records[-1]["loss_jepa"] > 0 and "monitor_rankme" in records[-1]

    config = json.loads((full / "config.json").read_text())
    assert config["backbone"]["path"] == os.path.abspath(trained_run) and config["head"]["layers"] == [-1, -2]
    model = load_hierarchical_head(str(full))
    images = eval_transform(load_split("digits", "test", data_root=tmp_path / "data").images[:8], model.image_size)
    with torch.no_grad():
        features = model(images)
        backbone = load_encoder(str(trained_run))
        expected = model.head(pooled_layer_features(backbone, images, (-1, -2)))
        assert torch.equal(model.backbone_features(images), backbone(images).mean(1))
    assert features.shape == (8, D)
    torch.testing.assert_close(features, expected)
    assert torch.equal(model.head.layer_proj.weight, weights["head.layer_proj.weight"])


def test_bad_settings_give_one_line(trained_run, tmp_path):
    for args, message in ((["--backbone", trained_run, "--layers", "-1,-5"], "--layers -5 out of range for a backbone "
                           "of depth 2"), ([], "--backbone is required"),
                          (["--backbone", tmp_path / "nothing"], "does not exist"),
                          (["--backbone", trained_run, "--jitter-prob", "2"], "argument --jitter-prob: must lie in")):
        proc = run_script("train_hierarchical_predictor.py", *args, "--out", tmp_path / "bad", check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_an_official_checkpoint_as_backbone(trained_run, tmp_path):
    exported = tmp_path / "official" / "run.pth.tar"
    run_script("models.py", "export-official", trained_run, exported)
    out = tmp_path / "head"
    run_script("train_hierarchical_predictor.py", "--backbone", exported, *HEAD_TRAIN, "--subset", "160",
               "--epochs", "1", "--backbone-encoder", "context", "--out", out, "--data-root", tmp_path / "data")
    pointer = json.loads((out / "config.json").read_text())["backbone"]
    assert pointer["config"] == str(tmp_path / "official" / "run.yaml") and pointer["which"] == "context"
    model = load_hierarchical_head(str(out))
    ours = load_encoder(str(trained_run), "context")
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in ours.state_dict().items())


def test_run_folders_missing_a_config_section_are_one_line_errors(trained_run, tmp_path):
    from dataclasses import asdict

    from models import load_predictor

    folder = tmp_path / "no_predictor"
    folder.mkdir()
    config = json.loads((trained_run / "config.json").read_text())
    del config["predictor"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(trained_run / "model.safetensors")
    with pytest.raises(ValueError, match="PredictorConfig settings must be a mapping, got None"):
        load_predictor(str(folder))

    head = tmp_path / "damaged_head"
    head.mkdir()
    pointer = {"path": str(trained_run), "relative_path": "x", "config": None, "relative_config": None,
               "which": "target"}
    for damage in ({"image_size": None}, {"backbone": {k: v for k, v in pointer.items() if k != "which"}},
                   {"backbone": "elsewhere"}):
        config = {"head": asdict(HeadConfig(embed_dim=D, layers=(-1, -2), hidden=64)), "backbone": pointer,
                  "image_size": 32, **damage}
        (head / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=r"config.json is damaged: it needs 'image_size' and a 'backbone'"):
            load_hierarchical_head(str(head))
    config["head"] = None
    (head / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="HeadConfig settings must be a mapping, got None"):
        load_hierarchical_head(str(head))

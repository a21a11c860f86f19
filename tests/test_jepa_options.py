"""The optional recipe pieces: ResNet encoder, MLP predictor, VICReg and cycle terms, target-scale schedule,
multi-layer targets.

Masking of the ResNet (no hidden pixel reaches the context), torchvision parity, gradients, the VICReg
terms against their definition, the schedule as a pure function of the step, and end to end: exact
resume with every option on, load_encoder and evaluate_embeddings on a ResNet run, clear refusals."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script, TINY_TRAIN
from masks import MultiBlockMaskSampler, ScheduledMaskSampler, scheduled_target_scale
from models import (IJEPA, MLPPredictor, MLPPredictorConfig, PredictorConfig, ResNetConfig, ResNetEncoder,
                    gather_tokens, load_encoder, load_predictor, resnet_config, resnet_stage_strides, vicreg_terms,
                    vit_config)
from test_train import assert_same_weights

SMALL_RESNET = ["--encoder", "resnet", "--resnet-width", "16", "--resnet-layers", "1", "1", "1", "1"]
EVERY_OPTION = ["--predictor", "mlp", "--vicreg-weight", "0.5", "--cycle-weight", "0.5",
                "--target-scale-schedule", "0.05", "0.1"]
DEPTH = TINY_TRAIN.index("--depth")
TINY_TRAIN_RESNET = TINY_TRAIN[:DEPTH] + TINY_TRAIN[DEPTH + 2:]  # --depth sets the ViT


def small_resnet(img_size=32, patch_size=8, **overrides):
    return ResNetEncoder(resnet_config(img_size, patch_size, width=16, layers=(1, 1, 1, 1), **overrides))


# ----------------------------------------------------------------------------------------------------
# ResNet encoder


def hidden_pixels(keep, grid, patch):
    """(B, 1, H, W) bool: the pixels of patches not in keep (B, K)."""
    visible = torch.zeros(keep.shape[0], grid * grid, dtype=torch.bool).scatter_(1, keep, True)
    return ~visible.reshape(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def test_resnet_context_never_sees_a_hidden_patch_in_training_mode():
    """Perturbing every hidden pixel of every image (by large values, inf included) leaves every context
    token of the batch bit-identical; perturbing one visible pixel does not (the test can fail)."""
    encoder = small_resnet().train()  # training mode: a BatchNorm would mix samples here
    images = torch.randn(4, 3, 32, 32)
    keep = MultiBlockMaskSampler(4, num_targets=2, min_keep=4).sample(4, torch.Generator().manual_seed(0)).context_idx
    hidden = hidden_pixels(keep, 4, 8).expand_as(images)
    context = encoder(images, keep=keep)  # (B, K, D)
    perturbed = torch.where(hidden, torch.randn_like(images) * 1e3, images)
    perturbed[hidden & (torch.rand_like(images) < 0.01)] = math.inf
    assert torch.equal(encoder(perturbed, keep=keep), context)
    visible = images.clone()
    visible[0][~hidden[0]] += 1.0
    changed = (encoder(visible, keep=keep) - context).abs().amax((1, 2))
    assert changed[0] > 1e-3 and torch.equal(changed[1:], torch.zeros(3))  # GroupNorm: samples stay separate


@pytest.mark.parametrize("img_size, patch_size, stem, grid", [
    (32, 4, "cifar", 8), (32, 8, "cifar", 4), (64, 8, "imagenet", 8), (224, 16, "imagenet", 14)])
def test_resnet_gives_the_token_grid_of_the_vit(img_size, patch_size, stem, grid):
    cfg = resnet_config(img_size, patch_size)
    assert cfg.stem == stem and cfg.grid_size == grid == vit_config("tiny", img_size=img_size,
                                                                    patch_size=patch_size).grid_size
    strides = [s for s, _ in resnet_stage_strides(cfg)]
    assert math.prod(strides) * {"cifar": 1, "imagenet": 4}[stem] == patch_size
    encoder = ResNetEncoder(resnet_config(img_size, patch_size, width=8, layers=(1, 1, 1, 1)))
    assert encoder(torch.randn(1, 3, img_size, img_size)).shape == (1, grid * grid, 64)


def test_resnet_equals_torchvision_resnet18_with_the_same_weights():
    torchvision = pytest.importorskip("torchvision")
    ours = ResNetEncoder(ResNetConfig(img_size=64, patch_size=32, stem="imagenet")).eval()
    reference = torchvision.models.resnet18(norm_layer=lambda c: torch.nn.GroupNorm(math.gcd(32, c), c, eps=1e-6))
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("norm.")}
    reference.load_state_dict({**reference.state_dict(), **state}, strict=True)
    assert set(state) == {k for k in reference.state_dict() if not k.startswith("fc.")}
    reference.eval()
    images = torch.randn(2, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(reference.children())[:-2])  # up to layer4
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_map(images), trunk(images))


def test_resnet_refuses_a_patch_size_it_cannot_reach_and_multi_layer_reads():
    with pytest.raises(ValueError, match="reaches patch sizes"):
        resnet_config(32, 16)  # the CIFAR stem and three halvings reach 8 at most
    with pytest.raises(ValueError, match="only its last stage"):
        small_resnet().forward_intermediates(torch.randn(1, 3, 32, 32), [-4, -1])


# ----------------------------------------------------------------------------------------------------
# MLP predictor


def test_mlp_predictor_reads_the_pooled_context_and_the_target_position():
    predictor = MLPPredictor(MLPPredictorConfig(embed_dim=32, pred_dim=16, depth=2, grid_size=4))
    context, context_idx = torch.randn(2, 5, 32), torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    target_idx = torch.tensor([[[10, 11], [12, 13]], [[14, 15], [10, 11]]])
    pred = predictor(context, context_idx, target_idx)
    assert pred.shape == (2, 2, 2, 32)
    order = torch.tensor([4, 2, 0, 1, 3])  # pooled: the context's order does not matter
    torch.testing.assert_close(predictor(context[:, order], context_idx[:, order], target_idx), pred)
    assert not torch.allclose(pred[0, 0, 0], pred[0, 0, 1])  # two positions, two predictions
    torch.testing.assert_close(predictor(context, context_idx, target_idx[:, 1:])[:, 0], pred[:, 1])  # per token


# ----------------------------------------------------------------------------------------------------
# Gradients with every option


@pytest.mark.parametrize("encoder_kind, predictor_kind", [("resnet", "transformer"), ("vit", "mlp"),
                                                          ("resnet", "mlp")])
def test_gradients_reach_every_trainable_parameter_and_never_the_target(encoder_kind, predictor_kind):
    if encoder_kind == "resnet":
        enc = resnet_config(32, 8, width=16, layers=(1, 1, 1, 1))
    else:
        enc = vit_config("tiny", img_size=32, patch_size=8, depth=2)
    if predictor_kind == "mlp":
        pred = MLPPredictorConfig(embed_dim=enc.embed_dim, pred_dim=32, depth=2, grid_size=4)
    else:
        pred = PredictorConfig(embed_dim=enc.embed_dim, pred_dim=32, depth=2, num_heads=2, grid_size=4)
    model = IJEPA(enc, pred, vicreg_weight=1.0, cycle_weight=1.0)
    masks = MultiBlockMaskSampler(4, num_targets=2, min_keep=4).sample(4, torch.Generator().manual_seed(1))
    loss, info = model(torch.randn(4, 3, 32, 32), **masks.model_inputs())
    loss.backward()
    assert {"loss", "loss_prediction", "vicreg_variance", "vicreg_covariance", "loss_cycle"} <= set(info)
    expected = info["loss_prediction"] + info["vicreg_variance"] + info["vicreg_covariance"] / 25 + info["loss_cycle"]
    torch.testing.assert_close(info["loss"], expected)
    for name, p in model.named_parameters():
        if name.startswith("target_encoder."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_the_optional_terms_are_off_by_default_and_leave_the_loss_alone():
    enc = vit_config("tiny", img_size=32, patch_size=8, depth=1)
    pred = PredictorConfig(embed_dim=enc.embed_dim, pred_dim=48, depth=1, num_heads=3, grid_size=4)
    model = IJEPA(enc, pred)
    masks = MultiBlockMaskSampler(4, num_targets=2, min_keep=4).sample(2, torch.Generator().manual_seed(2))
    loss, info = model(torch.randn(2, 3, 32, 32), **masks.model_inputs())
    assert set(info) == {"loss", "loss_prediction"} and torch.equal(loss.detach(), info["loss_prediction"])


# ----------------------------------------------------------------------------------------------------
# Multi-layer targets


def test_target_layers_average_the_last_blocks_as_defined():
    """target_layers K: the mean of the last K blocks' outputs, each through the final LayerNorm and
    layer-normed, layer-normed again; K = 1 is I-JEPA's target, bit for bit."""
    torch.manual_seed(0)
    enc = vit_config("tiny", img_size=32, patch_size=8, depth=3)
    pred = PredictorConfig(embed_dim=enc.embed_dim, pred_dim=48, depth=1, num_heads=3, grid_size=4)
    one, two = IJEPA(enc, pred), IJEPA(enc, pred, target_layers=2)
    two.load_state_dict(one.state_dict())
    images = torch.randn(2, 3, 32, 32)
    target = one.target_encoder
    assert torch.equal(one.target_tokens(images), F.layer_norm(target(images), (enc.embed_dim,)))
    x, outputs = target.embed(images), []
    for block in target.blocks:
        x = block(x)
        outputs.append(F.layer_norm(target.norm(x), (enc.embed_dim,)))
    expected = F.layer_norm((outputs[-2] + outputs[-1]) / 2, (enc.embed_dim,))
    torch.testing.assert_close(two.target_tokens(images), expected, rtol=1e-5, atol=1e-5)
    assert (two.target_tokens(images) - one.target_tokens(images)).abs().mean() > 0.005  # ~0.02 at init
    idx = MultiBlockMaskSampler(4, num_targets=2, min_keep=4).sample(2, torch.Generator().manual_seed(0)).target_idx
    assert torch.equal(two.targets(images, idx), gather_tokens(two.target_tokens(images), idx))
    with pytest.raises(ValueError, match="--target-layers 4: the encoder has 3 block"):
        IJEPA(enc, pred, target_layers=4)


# ----------------------------------------------------------------------------------------------------
# VICReg


def vicreg_reference(x, eps=1e-4):
    """The definitions, one dimension and one pair at a time."""
    n, d = x.shape
    x = x.double()
    centred = [x[:, i] - x[:, i].mean() for i in range(d)]
    variance = sum(max(0.0, 1 - math.sqrt(float((c * c).sum()) / (n - 1) + eps)) for c in centred) / d
    covariance = sum(float((centred[i] * centred[j]).sum() / (n - 1)) ** 2
                     for i in range(d) for j in range(d) if i != j) / d
    return variance, covariance


def test_vicreg_terms_match_their_definition():
    x = torch.randn(12, 5) * torch.tensor([0.1, 0.5, 1.0, 2.0, 0.01]) + 3.0
    x[:, 1] += 0.8 * x[:, 0] * 5  # a correlated pair
    variance, covariance = vicreg_terms(x)
    expected = vicreg_reference(x)
    assert float(variance) == pytest.approx(expected[0], rel=1e-5)
    assert float(covariance) == pytest.approx(expected[1], rel=1e-4)


def test_vicreg_is_zero_for_whitened_features_and_positive_for_collapsed_ones():
    n, d = 256, 16
    x = torch.randn(n, d, dtype=torch.float64)
    x = x - x.mean(0)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / (n - 1))).T  # exactly whitened: covariance I
    variance, covariance = vicreg_terms(x.float() * 2.0 + 5.0)  # std 2 > 1 and any mean: still no penalty
    assert float(variance) == 0.0 and float(covariance) < 1e-8
    collapsed = torch.randn(n, 1) * torch.randn(1, d)  # one shared direction: rank one
    variance, covariance = vicreg_terms(collapsed * 0.1)
    assert float(variance) > 0.5 and float(covariance) > 1e-3
    variance, covariance = vicreg_terms(torch.ones(n, d))  # complete collapse: every std 0
    assert float(variance) == pytest.approx(1 - math.sqrt(1e-4)) and float(covariance) == 0.0
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_terms(torch.randn(1, d))


# ----------------------------------------------------------------------------------------------------
# Target-scale schedule


def test_target_scale_schedule_is_a_pure_function_of_the_step():
    assert scheduled_target_scale(0, 100, (0.05, 0.1), (0.15, 0.2)) == (0.05, 0.1)
    assert scheduled_target_scale(50, 100, (0.05, 0.1), (0.15, 0.2)) == pytest.approx((0.1, 0.15))
    assert scheduled_target_scale(100, 100, (0.05, 0.1), (0.15, 0.2)) == pytest.approx((0.15, 0.2))
    assert scheduled_target_scale(150, 100, (0.05, 0.1), (0.15, 0.2)) == pytest.approx((0.15, 0.2))
    final = MultiBlockMaskSampler(8, min_keep=4)
    schedule = ScheduledMaskSampler(final, (0.02, 0.04), 100)
    first, last = schedule.at(0), schedule.at(100)
    assert first.target_scale == (0.02, 0.04) and last.target_scale == pytest.approx(final.target_scale)
    block_lengths = lambda sampler: {sampler.sample(2, torch.Generator().manual_seed(seed)).target_idx.shape[-1]
                                     for seed in range(8)}  # whole blocks: one size per batch
    assert max(block_lengths(first)) < min(block_lengths(last))  # the blocks grow, and the lengths with them
    assert first.num_context > last.num_context
    draw = lambda sampler: sampler.sample(4, torch.Generator().manual_seed(3))
    later = [schedule.at(step) for step in (0, 37, 100)]  # visiting other steps first changes nothing
    fresh = ScheduledMaskSampler(final, (0.02, 0.04), 100)
    for step, sampler in zip((0, 37, 100), later):
        a, b = draw(sampler), draw(fresh.at(step))
        assert torch.equal(a.context_idx, b.context_idx) and torch.equal(a.target_idx, b.target_idx)
    with pytest.raises(ValueError, match="multi-block masks"):
        from masks import PyramidMaskSampler
        ScheduledMaskSampler(PyramidMaskSampler(8, levels=2, min_keep=4), (0.05, 0.1), 10)


# ----------------------------------------------------------------------------------------------------
# End to end: exact resume with each option on, loading and evaluating a ResNet run


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A finished two-epoch run with every option on: ResNet, MLP predictor, VICReg, cycle, schedule."""
    out = tmp_path_factory.mktemp("runs") / "resnet"
    run_script("train_ijepa.py", *TINY_TRAIN_RESNET, *SMALL_RESNET, *EVERY_OPTION, "--epochs", "2", "--out", out,
               "--data-root", tmp_path_factory.mktemp("data"))
    return out


@pytest.mark.parametrize("encoder", ["resnet", "vit"])
def test_resume_is_bit_identical_with_every_option_on(tmp_path, resnet_run, encoder):
    """Stopped after step 5 and resumed: the same weights as the uninterrupted run, for the ResNet with the
    MLP predictor and for the ViT with the transformer predictor, VICReg, cycle and schedule on in both
    (and two-layer targets and Muon in the ViT's)."""
    base = [*TINY_TRAIN_RESNET, *SMALL_RESNET, *EVERY_OPTION] if encoder == "resnet" else [
        *TINY_TRAIN, *EVERY_OPTION[2:], "--target-layers", "2", "--optimizer", "muon"]
    reference = resnet_run
    if encoder == "vit":
        reference = tmp_path / "uninterrupted"
        run_script("train_ijepa.py", *base, "--epochs", "2", "--out", reference, "--data-root", tmp_path)
    out = tmp_path / "resumed"
    run_script("train_ijepa.py", *base, "--epochs", "2", "--max-steps", "5", "--out", out, "--data-root", tmp_path)
    run_script("train_ijepa.py", *base, "--epochs", "2", "--out", out, "--data-root", tmp_path, "--resume")
    assert_same_weights(out, reference)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_prediction", "vicreg_variance", "vicreg_covariance", "loss_cycle"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    scales = [m["mask_target_scale_min"] for m in metrics]
    assert scales == sorted(scales) and scales[0] < 0.1 < scales[-1]  # ramping from 0.05 to 0.15


def test_a_resnet_run_loads_and_evaluates(resnet_run, tmp_path):
    config = json.loads((resnet_run / "config.json").read_text())
    assert config["encoder"]["kind"] == "resnet" and config["predictor"]["kind"] == "mlp"
    encoder, predictor = load_encoder(str(resnet_run)), load_predictor(str(resnet_run))
    assert isinstance(encoder, ResNetEncoder) and isinstance(predictor, MLPPredictor)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 16, 128)
    proc = run_script("evaluate_embeddings.py", "--ckpt", resnet_run, "--no-tsne", "--data-root", tmp_path)
    results = json.loads((resnet_run / "eval" / "results.json").read_text())
    assert "linear probe" in proc.stdout and results["linear_probe"]["top1"] > 0.3  # 10 digit classes: chance 0.1
    assert results["feature_dim"] == 128


def test_unsupported_combinations_are_one_line_errors(resnet_run, tmp_path):
    proc = run_script("evaluate_embeddings.py", "--ckpt", resnet_run, "--pool", "last4", "--no-tsne",
                      "--data-root", tmp_path, check=False)
    assert proc.returncode == 2 and "use --pool mean" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("train_hierarchical_predictor.py", "--backbone", resnet_run, "--dataset", "digits",
                      "--epochs", "1", "--out", tmp_path / "head", "--data-root", tmp_path, check=False)
    assert proc.returncode == 2 and "needs a ViT backbone" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("train_pijepa.py", *TINY_TRAIN, "--cycle-weight", "1", "--out", tmp_path / "pi",
                      "--data-root", tmp_path, check=False)
    assert proc.returncode == 2 and "--cycle-weight: I-JEPA options" in proc.stderr
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--encoder", "resnet", "--out", tmp_path / "r",
                      "--data-root", tmp_path, check=False)
    assert proc.returncode == 2 and "--depth, --heads and --patch-embed set the ViT" in proc.stderr
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--target-layers", "3", "--out", tmp_path / "t",
                      "--data-root", tmp_path, check=False)
    assert proc.returncode == 2 and "--target-layers 3: the encoder has 2 block(s)" in proc.stderr

"""PI-JEPA: coarse levels encode the downsampled image, scale-space masks (four strategies), what crosses
scales and what does not, gradients per level, I-JEPA equivalence at one level, and end-to-end runs of
train_pijepa.py (each masking strategy, resume)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import train_ijepa
import train_pijepa
from common import read_metrics
from conftest import run_script, TINY_TRAIN
from masks import MultiBlockMaskSampler, PYRAMID_STRATEGIES, PyramidMaskSampler, rescale_corners
from models import (load_encoder, load_predictor, Predictor, PredictorConfig, pyramid_cell_centres, pyramid_offsets,
                    pyramid_parents, pyramid_pool, PyramidIJEPA, sincos_embed_2d, vit_config)

# Tiny runs on an 8x8 grid (patch 4), so the default pyramid has 2 levels (8x8, 4x4).
PYRAMID_TRAIN = [*TINY_TRAIN, "--patch-size", "4"]
CARRYING = {"full_downsampling": (0, 1), "full_resampling": (0, 1), "coarse_only": (1,), "fine_only": (0,)}
GRIDS = {8: 2, 14: 2, 16: 3}  # grid: its default levels


def tiny_model(levels=2, grid=8, predict_per="block", coarse_targets="encoded"):
    torch.manual_seed(0)
    enc = vit_config("tiny", img_size=4 * grid, patch_size=4, depth=2)
    pred = PredictorConfig(embed_dim=enc.embed_dim, pred_dim=48, depth=1, num_heads=3, grid_size=grid, levels=levels)
    return PyramidIJEPA(enc, pred, predict_per=predict_per, coarse_targets=coarse_targets).eval()


def sampler(strategy, grid=8, levels=2):
    return PyramidMaskSampler(grid, levels, strategy)  # the defaults of train_pijepa.py


def level_part(idx, sizes, level):
    """The level-l slice of a pyramid index tensor (..., sum K_l)."""
    start = sum(sizes[:level])
    return idx[..., start:start + sizes[level]]


def fine_patches_under(cells, grid, levels):
    """(B, K) pyramid cell indices -> (B, G*G) bool: fine patches inside any of those cells."""
    parents = pyramid_parents(grid, levels)  # (L, N)
    return (parents[None, :, :, None] == cells[:, None, None, :]).any(-1).any(1)


def pixels_of(patches, patch_size=4, grid=8):
    """(B, G*G) bool patches -> (B, 1, H, W) bool pixels."""
    cells = patches.reshape(-1, 1, grid, grid).float()
    return F.interpolate(cells, scale_factor=patch_size, mode="nearest").bool()


# ----------------------------------------------------------------------------------------------------
# The pyramid's tokens


def test_pyramid_pool_matches_loop():
    B, G, D, L = 2, 8, 6, 3
    tokens = torch.randn(B, G * G, D)
    levels, grid = [tokens.reshape(B, G, G, D)], G
    for _ in range(1, L):  # slow reference: every cell is the mean of its 4 children, then layer norm
        prev, grid = levels[-1], grid // 2
        cell = torch.empty(B, grid, grid, D)
        for r in range(grid):
            for c in range(grid):
                mean = (prev[:, 2 * r, 2 * c] + prev[:, 2 * r, 2 * c + 1] + prev[:, 2 * r + 1, 2 * c]
                        + prev[:, 2 * r + 1, 2 * c + 1]) / 4
                cell[:, r, c] = (mean - mean.mean(-1, keepdim=True)) / torch.sqrt(
                    mean.var(-1, unbiased=False, keepdim=True) + 1e-5)
        levels.append(cell)
    expected = torch.cat([x.reshape(B, -1, D) for x in levels], dim=1)
    assert pyramid_pool(tokens, G, L).shape == (B, pyramid_offsets(G, L)[-1], D)
    torch.testing.assert_close(pyramid_pool(tokens, G, L), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("coarse_targets", ["encoded", "pooled"])
def test_coarse_tokens_encode_the_downsampled_image(coarse_targets):
    """Level l's context and targets are the encoders on the image averaged over 2^l x 2^l pixel squares
    (a slow reference: explicit loops), on that level's own grid; pooled targets are pyramid_pool's."""
    model = tiny_model(levels=3, coarse_targets=coarse_targets)
    masks = sampler("full_resampling", levels=3).sample(2, torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 32, 32)
    small = torch.zeros(2, 3, 8, 8)  # level 2 by hand: each pixel the mean of a 4 x 4 square
    for r in range(8):
        for c in range(8):
            small[:, :, r, c] = images[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].mean((-2, -1))
    offsets = pyramid_offsets(8, 3)
    with torch.no_grad():
        context = model.context(images, masks.context_idx, masks.context_sizes)
        targets = model.targets(images, masks.target_idx, masks.target_sizes)
        local = level_part(masks.context_idx, masks.context_sizes, 2) - offsets[2]
        expected = model.encoder(small, keep=local)  # (2, Kc_2, D) on a 2x2 grid
        start = sum(masks.context_sizes[:2])
        torch.testing.assert_close(context[:, start:], expected, atol=1e-5, rtol=1e-5)
        assert model.encoder(small).shape[1] == 4
        fine = model.target_encoder(images)
        if coarse_targets == "pooled":
            pyramid = pyramid_pool(F.layer_norm(fine, fine.shape[-1:]), 8, 3)
        else:
            whole = model.target_encoder(small)
            pyramid = torch.cat([F.layer_norm(fine, fine.shape[-1:]), torch.zeros(2, 16, fine.shape[-1]),
                                 F.layer_norm(whole, whole.shape[-1:])], 1)
        for level in (0, 2):
            idx = level_part(masks.target_idx, masks.target_sizes, level)  # (2, M, Kt_l)
            start = sum(masks.target_sizes[:level])
            got = targets[:, :, start:start + masks.target_sizes[level]]  # (2, M, Kt_l, D)
            want = torch.stack([pyramid[b][idx[b]] for b in range(2)])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("strategy", PYRAMID_STRATEGIES)
def test_pyramid_mask_rules(strategy, grid):
    """Defaults run on 8x8, 14x14 and 16x16 grids; each level in its own slice; whole target blocks;
    within a level no context cell is a target cell; the fine level's sizes are I-JEPA's; and the
    strategy's cross-scale rule."""
    levels = GRIDS[grid]
    s = sampler(strategy, grid, levels)
    masks = s.sample(32, torch.Generator().manual_seed(3))
    offsets, B, M = pyramid_offsets(grid, levels), 32, 4
    carrying = tuple(level for level, k in enumerate(masks.target_sizes) if k)
    assert carrying == {"coarse_only": tuple(range(1, levels)), "fine_only": (0,)}.get(strategy, tuple(range(levels)))
    assert all(k > 0 for k in masks.context_sizes[:2])  # the coarsest may show none under full_downsampling
    assert all(k > 0 for k in masks.context_sizes) or strategy == "full_downsampling"
    assert s.acceptance > 0.8  # few rejected draws: where targets land is (nearly) I-JEPA's
    ijepa = MultiBlockMaskSampler(grid)
    assert masks.context_sizes[0] == ijepa.num_context
    if 0 in carrying:  # the same fine block size as I-JEPA's from the same generator state
        assert masks.target_sizes[0] == ijepa.sample(2, torch.Generator().manual_seed(3)).target_idx.shape[2]
    for idx, sizes in ((masks.context_idx, masks.context_sizes), (masks.target_idx, masks.target_sizes)):
        for level in range(levels):
            part = level_part(idx, sizes, level)
            assert ((part >= offsets[level]) & (part < offsets[level + 1])).all()
            assert (part.diff(dim=-1) > 0).all()
        assert sum(sizes) == idx.shape[-1]
    for level in range(levels):
        g = grid >> level
        context = level_part(masks.context_idx, masks.context_sizes, level)
        targets = level_part(masks.target_idx, masks.target_sizes, level)
        assert not (context[:, None, :, None] == targets[:, :, None, :]).any(), "a context cell is a target"
        if masks.target_sizes[level]:  # whole h x w rectangles
            cells = torch.zeros(B, M, g * g, dtype=torch.bool).scatter_(-1, targets - offsets[level], True)
            cells = cells.reshape(B, M, g, g)
            assert torch.equal(cells.sum((-2, -1)), cells.any(-1).sum(-1) * cells.any(-2).sum(-1))
    fine_context = masks.context_idx[:, :masks.context_sizes[0]]
    seen = torch.zeros(B, grid * grid, dtype=torch.bool).scatter_(1, fine_context, True)
    coarse_context = masks.context_idx[:, masks.context_sizes[0]:]
    under_coarse_targets = fine_patches_under(masks.target_idx[..., masks.target_sizes[0]:].flatten(1), grid, levels)
    if strategy == "full_downsampling":  # hidden at every scale; the coarse view shows only fine context
        assert not fine_patches_under(masks.target_idx.flatten(1), grid, levels).gather(1, fine_context).any()
        for cell in coarse_context.T:
            assert not (fine_patches_under(cell[:, None], grid, levels) & ~seen).any()
    if strategy == "coarse_only":  # coarse context avoids every coarse target at every coarse level
        for cell in coarse_context.T:
            assert not (fine_patches_under(cell[:, None], grid, levels) & under_coarse_targets).any()
    if strategy == "fine_only":  # the whole coarse view is context
        assert masks.context_sizes[1:] == tuple((grid >> level) ** 2 for level in range(1, levels))
    assert (masks.context_visible >= masks.context_sizes[0]).all()


def test_rescaled_blocks_break_ties_at_random():
    """A 4-row block starting on an odd row sits exactly between two 2-row positions on level 1: both are
    chosen, about equally; coarse targets cover the four quadrants of the image evenly."""
    top = torch.ones(4000, dtype=torch.long)
    corner, _ = rescale_corners(top, top, 4, 4, 1, 8, torch.Generator().manual_seed(0))
    assert set(corner.tolist()) == {0, 1} and abs(corner.float().mean() - 0.5) < 0.05
    assert torch.equal(rescale_corners(top * 0, top * 0, 3, 3, 1, 8, torch.Generator().manual_seed(0))[0], top * 0)
    masks = sampler("full_downsampling").sample(4096, torch.Generator().manual_seed(0))
    cells = level_part(masks.target_idx, masks.target_sizes, 1) - 64  # (B, M, Kt_1) on the 4x4 grid
    rows, cols = cells // 4, cells % 4
    top_left, bottom_right = ((rows < 2) & (cols < 2)).float().mean(), ((rows >= 2) & (cols >= 2)).float().mean()
    assert abs(top_left - bottom_right) < 0.02


# ----------------------------------------------------------------------------------------------------
# What crosses scales: perturb pixels, read the predictions


def predictions(model, masks, images):
    with torch.no_grad():
        context = model.context(images, masks.context_idx, masks.context_sizes)
        return model.predict(context, masks.context_idx, masks.target_idx)


def shown_pixels(masks, grid=8, levels=2):
    """(B, 1, H, W) bool: pixels some context token (of any level) is computed from."""
    return pixels_of(fine_patches_under(masks.context_idx, grid, levels))


@pytest.mark.parametrize("strategy,predict_per", [*((s, "block") for s in PYRAMID_STRATEGIES),
                                                  ("full_downsampling", "sample")])
def test_no_leak_at_any_level(strategy, predict_per):
    """Changing every pixel no context token of any level is computed from leaves every prediction
    unchanged; changing pixels under one context patch changes them (so the test can fail)."""
    model = tiny_model(predict_per=predict_per)
    masks = sampler(strategy).sample(4, torch.Generator().manual_seed(7))
    images = torch.randn(4, 3, 32, 32)
    hidden = ~shown_pixels(masks)
    assert hidden.any() or strategy == "fine_only"  # fine_only shows the whole image at coarse scale
    perturbed = torch.where(hidden, torch.randn_like(images) * 5, images)
    assert torch.equal(predictions(model, masks, images), predictions(model, masks, perturbed))
    one_context_patch = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, masks.context_idx[:, :1], True)
    changed = torch.where(pixels_of(one_context_patch), images + 1, images)
    assert not torch.allclose(predictions(model, masks, images), predictions(model, masks, changed))


@pytest.mark.parametrize("strategy", ["full_downsampling", "full_resampling", "fine_only"])
def test_coarse_only_pixels_reach_fine_predictions_by_strategy(strategy):
    """Pixels that only the coarse view shows (under a coarse context cell, outside every fine context
    patch) change the fine-level predictions under fine_only and full_resampling (coarse-to-fine crosses
    scales); under full_downsampling there are none, and changing every pixel outside the fine context
    changes no fine prediction."""
    model = tiny_model()
    masks = sampler(strategy).sample(8, torch.Generator().manual_seed(5))
    images = torch.randn(8, 3, 32, 32)
    fine_shown = pixels_of(fine_patches_under(masks.context_idx[:, :masks.context_sizes[0]], 8, 2))
    coarse_only = shown_pixels(masks) & ~fine_shown
    kt0 = masks.target_sizes[0]
    before = predictions(model, masks, images)[:, :, :kt0]
    if strategy == "full_downsampling":
        assert not coarse_only.any()
        after = predictions(model, masks, torch.where(fine_shown, images, torch.randn_like(images) * 5))
        assert torch.equal(before, after[:, :, :kt0])
        return
    assert coarse_only.any(-1).any(-1).all(), "every sample's coarse view shows pixels the fine one does not"
    after = predictions(model, masks, torch.where(coarse_only, images + 3 * torch.randn_like(images), images))
    changed = (before - after[:, :, :kt0]).abs().amax((1, 2, 3))  # per sample
    # without a path the predictions are bitwise equal (the full_downsampling branch); at initialisation
    # the predictor's attention is near uniform, so the change is small but well above rounding
    assert (changed > 1e-6).all()
    if strategy == "fine_only":  # fine targets themselves are shown at coarse scale
        targets = pixels_of(fine_patches_under(masks.target_idx[..., :kt0].flatten(1), 8, 2))
        assert (coarse_only & targets).any()


# ----------------------------------------------------------------------------------------------------
# Gradients, embeddings, equivalence with I-JEPA


@pytest.mark.parametrize("strategy", ["full_downsampling", "full_resampling", "coarse_only"])
def test_every_level_loss_trains_the_encoder_and_not_the_target_encoder(strategy):
    model = tiny_model(levels=3, grid=8).train()
    masks = sampler(strategy, levels=3).sample(4, torch.Generator().manual_seed(2))
    images = torch.randn(4, 3, 32, 32)
    pred = model.predict(model.context(images, masks.context_idx, masks.context_sizes), masks.context_idx,
                         masks.target_idx)
    losses = model.level_losses(pred, model.targets(images, masks.target_idx, masks.target_sizes), masks.target_sizes)
    assert set(losses) == {level for level, k in enumerate(masks.target_sizes) if k}
    for level, loss in losses.items():
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        grads = {name: p.grad for name, p in model.encoder.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), f"level {level}"
        assert grads["patch_embed.proj.weight"].abs().sum() > 0 and grads["blocks.0.attn.qkv.weight"].abs().sum() > 0
        assert all(p.grad is None for p in model.target_encoder.parameters())
        assert not any(p.requires_grad for p in model.target_encoder.parameters())


@pytest.mark.parametrize("strategy", PYRAMID_STRATEGIES)
@pytest.mark.parametrize("coarse_targets,predict_per", [("pooled", "block"), ("encoded", "sample")])
def test_flop_formula_counts_every_level_like_torch_flop_counter(strategy, coarse_targets, predict_per):
    """MFU's numerator for PI-JEPA: the analytic count equals torch's counter on a forward and backward,
    coarse levels' encoder passes included (math attention, as for IJEPA in test_speed.py)."""
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(levels=3, grid=8, predict_per=predict_per, coarse_targets=coarse_targets).train()
    masks = sampler(strategy, levels=3).sample(4, torch.Generator().manual_seed(2))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = model(torch.randn(4, 3, 32, 32), **masks.model_inputs())
        loss.backward()
    assert counter.get_total_flops() == 4 * model.flops_per_image(**masks.model_inputs())


def test_level_and_position_embeddings_distinct_per_level():
    predictor = Predictor(PredictorConfig(embed_dim=192, pred_dim=48, depth=1, num_heads=3, grid_size=8, levels=3))
    table = predictor.position_table()
    assert table.shape == (64 + 16 + 4, 48)
    assert torch.cdist(table, table).add(torch.eye(len(table))).min() > 0, "two cells share an embedding"
    level_embed = predictor.level_embed.detach()
    assert torch.cdist(level_embed, level_embed).add(torch.eye(3)).min() > 0
    rows, cols = pyramid_cell_centres(8, 3)
    offsets = pyramid_offsets(8, 3)
    position = sincos_embed_2d(48, rows, cols)
    for level in range(3):
        part = slice(offsets[level], offsets[level + 1])
        torch.testing.assert_close(table[part] - position[part], level_embed[level].expand(offsets[level + 1] -
                                                                                           offsets[level], -1))
    # a level-1 cell's centre is the mean of its four fine patches' centres
    parents = pyramid_parents(8, 3)
    for cell in range(64, 80):
        children = (parents[1] == cell).nonzero().flatten()
        assert (rows[children].mean(), cols[children].mean()) == (rows[cell], cols[cell])


VICREG_KEYS = {"vicreg_variance", "vicreg_covariance"}


@pytest.mark.parametrize("term_flags,term_keys", [([], set()), (["--vicreg-weight", "1"], VICREG_KEYS)])
def test_one_level_computes_ijepa_loss(term_flags, term_keys):
    argv = [*TINY_TRAIN, "--seed", "3", *term_flags]
    ijepa_args = train_ijepa.parse_args(argv)
    pi_args = train_ijepa.parse_args([*argv, "--levels", "1"], train_pijepa.build_pyramid_parser())
    train_pijepa.finish_pyramid_args(pi_args)
    torch.manual_seed(3)
    ijepa = train_ijepa.build_model(ijepa_args)
    torch.manual_seed(3)
    pijepa = train_pijepa.build_model(pi_args)
    assert type(pijepa) is PyramidIJEPA
    assert ijepa.state_dict().keys() == pijepa.state_dict().keys()
    assert all(torch.equal(v, pijepa.state_dict()[k]) for k, v in ijepa.state_dict().items())
    grid = ijepa.encoder.cfg.grid_size
    masks_i = train_ijepa.build_mask_sampler(ijepa_args, grid).sample(8, torch.Generator().manual_seed(11))
    masks_p = train_pijepa.build_mask_sampler(pi_args, grid).sample(8, torch.Generator().manual_seed(11))
    assert torch.equal(masks_i.context_idx, masks_p.context_idx)
    assert torch.equal(masks_i.target_idx, masks_p.target_idx)
    images = torch.randn(8, 3, 32, 32)
    loss_i, _ = ijepa(images, **masks_i.model_inputs())
    loss_p, info = pijepa(images, **masks_p.model_inputs())
    torch.testing.assert_close(loss_p, loss_i, rtol=1e-6, atol=0)
    assert set(info) == {"loss", "loss_l0", *term_keys}


def test_levels_not_dividing_the_grid_is_one_line_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # patch 8 on 32 px: a 4x4 grid, 2^(3-1) = 4 divides, 2^3 not
        train_pijepa.main([*TINY_TRAIN, "--levels", "4", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "--levels" in err and "divisible" in err
    assert [train_pijepa.default_levels(g) for g in (2, 4, 7, 8, 14, 16, 64)] == [1, 1, 1, 2, 2, 3, 3]


# ----------------------------------------------------------------------------------------------------
# End-to-end runs


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory):
    """One finished two-epoch run on digits per masking strategy (2 levels on an 8x8 grid)."""
    root, data_root = tmp_path_factory.mktemp("pijepa"), tmp_path_factory.mktemp("data")
    runs = {}
    for strategy in PYRAMID_STRATEGIES:
        runs[strategy] = root / strategy
        run_script("train_pijepa.py", *PYRAMID_TRAIN, "--epochs", "2", "--pyramid-masking", strategy,
                   "--out", runs[strategy], "--data-root", data_root)
    return runs, data_root


@pytest.mark.parametrize("strategy", PYRAMID_STRATEGIES)
def test_train_each_strategy_writes_loadable_folder(strategy_runs, strategy):
    out = strategy_runs[0][strategy]
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == "train_pijepa" and config["args"]["levels"] == 2
    assert config["predictor"]["levels"] == 2
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert records[-1]["step"] == 10
    level_keys = {k for k in records[0] if k.startswith("loss_l")}
    assert level_keys == {f"loss_l{level}" for level in CARRYING[strategy]}
    for key in level_keys:  # per-level losses fall over the two epochs
        assert records[-1][key] < records[0][key]
    encoder = load_encoder(str(out))
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 64, 192)
    assert load_predictor(str(out)).cfg.levels == 2
    for level in range(2):  # per-level mask sizes are logged, the fine level's equal to I-JEPA's settings
        assert f"mask_context_l{level}" in records[-1] and f"mask_target_l{level}" in records[-1]


def test_resume_matches_uninterrupted_run(strategy_runs, tmp_path):
    from safetensors.torch import load_file

    runs, data_root = strategy_runs
    out = tmp_path / "resumed"
    common = [*PYRAMID_TRAIN, "--epochs", "2", "--out", out, "--data-root", data_root]
    run_script("train_pijepa.py", *common, "--max-steps", "5")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000005"
    run_script("train_pijepa.py", *common, "--resume")
    resumed = load_file(os.path.join(out, "model.safetensors"))
    uninterrupted = load_file(os.path.join(runs["full_downsampling"], "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert [r["loss"] for r in read_metrics(out / "metrics.jsonl")] == \
        [r["loss"] for r in read_metrics(runs["full_downsampling"] / "metrics.jsonl")]


def test_one_level_run_matches_ijepa_run(trained_run, tmp_path):
    """train_pijepa.py --levels 1 writes the same losses and weights as train_ijepa.py (same flags)."""
    from safetensors.torch import load_file

    out = tmp_path / "pi1"
    run_script("train_pijepa.py", *TINY_TRAIN, "--epochs", "2", "--levels", "1", "--out", out,
               "--data-root", tmp_path / "data")
    ours, theirs = read_metrics(out / "metrics.jsonl"), read_metrics(trained_run / "metrics.jsonl")
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    assert [r["loss_l0"] for r in ours] == [r["loss"] for r in theirs]
    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(trained_run, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)

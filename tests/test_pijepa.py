"""PI-JEPA: latent pyramid, pyramid masks, no leak at any level, I-JEPA equivalence at one level, and
end-to-end runs of train_pijepa.py (each masking strategy, resume)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import train_ijepa
import train_pijepa
from common import read_metrics
from conftest import run_script, TINY_TRAIN
from masks import downsample_blocks, PYRAMID_STRATEGIES, PyramidMaskSampler
from models import (load_encoder, load_predictor, Predictor, PredictorConfig, pyramid_cell_centres, pyramid_offsets,
                    pyramid_parents, pyramid_pool, PyramidIJEPA, sincos_embed_2d, vit_config)

# Tiny runs on an 8x8 grid (patch 4), so the default pyramid has 3 levels (8x8, 4x4, 2x2).
PYRAMID_TRAIN = [*TINY_TRAIN, "--patch-size", "4"]
CARRYING = {"full_downsampling": (0, 1, 2), "full_resampling": (0, 1, 2), "coarse_only": (1, 2), "fine_only": (0,)}


def tiny_model(levels=3, grid=8, predict_per="block"):
    torch.manual_seed(0)
    enc = vit_config("tiny", img_size=4 * grid, patch_size=4, depth=2)
    pred = PredictorConfig(embed_dim=enc.embed_dim, pred_dim=48, depth=1, num_heads=3, grid_size=grid, levels=levels)
    return PyramidIJEPA(enc, pred, predict_per=predict_per).eval()


def sampler(strategy, grid=8, levels=3):
    return PyramidMaskSampler(grid, levels, strategy, num_targets=2, min_keep=4)


# ----------------------------------------------------------------------------------------------------
# Pyramid pooling


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


def test_coarse_context_is_mean_of_seen_fine_patches():
    model = tiny_model()
    masks = sampler("full_downsampling").sample(3, torch.Generator().manual_seed(1))
    images = torch.randn(3, 3, 32, 32)
    kc0 = masks.context_sizes[0]
    with torch.no_grad():
        context = model.context(images, masks.context_idx, kc0)
        fine = model.encoder(images, keep=masks.context_idx[:, :kc0])
    parents = pyramid_parents(8, 3)
    for b in range(3):
        fine_idx = masks.context_idx[b, :kc0]
        torch.testing.assert_close(context[b, :kc0], fine[b])
        for j, cell in enumerate(masks.context_idx[b, kc0:].tolist(), start=kc0):
            inside = [i for i, patch in enumerate(fine_idx.tolist()) if cell in parents[:, patch].tolist()]
            assert inside, "a coarse context cell holds no seen fine patch"
            torch.testing.assert_close(context[b, j], fine[b, inside].mean(0))


# ----------------------------------------------------------------------------------------------------
# Masks


def fine_patches_under(cells, grid, levels):
    """(B, K) pyramid cell indices -> (B, G*G) bool: fine patches inside any of those cells."""
    parents = pyramid_parents(grid, levels)  # (L, N)
    return (parents[None, :, :, None] == cells[:, None, None, :]).any(-1).any(1)


@pytest.mark.parametrize("strategy", PYRAMID_STRATEGIES)
def test_pyramid_mask_rules(strategy):
    s = sampler(strategy)
    masks = s.sample(64, torch.Generator().manual_seed(3))
    offsets = pyramid_offsets(8, 3)
    assert tuple(level for level, k in enumerate(masks.target_sizes) if k) == CARRYING[strategy]
    assert all(k > 0 for k in masks.context_sizes)
    # every level's slice holds distinct cells of that level only
    for idx, sizes in ((masks.context_idx, masks.context_sizes), (masks.target_idx, masks.target_sizes)):
        start = 0
        for level, k in enumerate(sizes):
            part = idx[..., start:start + k]
            assert ((part >= offsets[level]) & (part < offsets[level + 1])).all()
            assert (part.sort(-1).values.diff(dim=-1) > 0).all()
            start += k
        assert start == idx.shape[-1]
    # no fine patch under any target cell of any level is in the context, and every coarse context cell
    # holds at least one context patch
    fine_context = masks.context_idx[:, :masks.context_sizes[0]]
    hidden = fine_patches_under(masks.target_idx.flatten(1), 8, 3)
    assert not hidden.gather(1, fine_context).any()
    seen = torch.zeros(64, 64, dtype=torch.bool).scatter_(1, fine_context, True)
    for cell in masks.context_idx[:, masks.context_sizes[0]:].T:
        assert (fine_patches_under(cell[:, None], 8, 3) & seen).any(1).all()
    assert (masks.context_visible >= masks.context_sizes[0]).all()


@pytest.mark.parametrize("strategy", PYRAMID_STRATEGIES)
def test_target_cells_per_level(strategy):
    """The full (uncut) target cells: threshold rule, or independent blocks for full_resampling."""
    s = sampler(strategy)
    context, targets = s._draw(128, torch.Generator().manual_seed(5))
    assert [level for level, t in enumerate(targets) if t is not None] == list(CARRYING[strategy])
    fine = s._draw_blocks((128, 2), s.target_scale, s.target_aspect, torch.Generator().manual_seed(5))
    if strategy in ("full_downsampling", "fine_only"):
        assert torch.equal(targets[0], fine)
    for level in (1, 2):
        if targets[level] is None:
            continue
        cells = targets[level].reshape(128, 2, 8 >> level, 8 >> level)
        assert cells.flatten(2).any(-1).all(), "every block has a cell at every target level"
        if strategy == "full_resampling":  # a rectangle on the level's grid, not the fine block pooled
            rows, cols = cells.any(-1), cells.any(-2)
            assert torch.equal(cells, rows[..., :, None] & cols[..., None, :])
            assert not torch.equal(targets[level], downsample_blocks(fine, 8, level, 0.5))
            continue
        size = 2**level
        for b in range(4):
            for m in range(2):
                block = fine[b, m].reshape(8, 8)
                counts = torch.tensor([[int(block[r * size:(r + 1) * size, c * size:(c + 1) * size].sum())
                                        for c in range(8 // size)] for r in range(8 // size)])
                expected = counts >= 0.5 * size * size
                if not expected.any():
                    expected = torch.zeros_like(expected).flatten().scatter_(0, counts.flatten().argmax()[None], True)
                assert torch.equal(cells[b, m], expected.reshape(cells[b, m].shape))
    assert not (context & s.hidden(targets)).any()


def test_pyramid_sampler_runs_on_generator_device_and_rejects_bad_settings():
    with pytest.raises(ValueError, match="divisible"):
        PyramidMaskSampler(12, levels=4)
    with pytest.raises(ValueError, match="coarse_only"):
        PyramidMaskSampler(8, levels=1, strategy="coarse_only")
    with pytest.raises(ValueError, match="visible patches"):  # 4 independent blocks at each of 3 levels
        PyramidMaskSampler(8, levels=3, strategy="full_resampling")
    a = sampler("full_downsampling").sample(16, torch.Generator().manual_seed(0))
    b = sampler("full_downsampling").sample(16, torch.Generator().manual_seed(0))
    assert torch.equal(a.context_idx, b.context_idx) and torch.equal(a.target_idx, b.target_idx)


# ----------------------------------------------------------------------------------------------------
# No leak, embeddings, equivalence with I-JEPA


def pixels_of(patches, patch_size=4, grid=8):
    """(B, G*G) bool patches -> (B, 1, H, W) bool pixels."""
    cells = patches.reshape(-1, 1, grid, grid).float()
    return F.interpolate(cells, scale_factor=patch_size, mode="nearest").bool()


@pytest.mark.parametrize("strategy,predict_per", [*((s, "block") for s in PYRAMID_STRATEGIES),
                                                  ("full_downsampling", "sample")])
def test_no_leak_at_any_level(strategy, predict_per):
    """Changing the pixels under every target cell of every level leaves every prediction unchanged;
    changing pixels under one context patch changes them (so the test can fail)."""
    model = tiny_model(predict_per=predict_per)
    masks = sampler(strategy).sample(4, torch.Generator().manual_seed(7))
    inputs = masks.model_inputs()

    def predict(images):
        with torch.no_grad():
            context = model.context(images, inputs["context_idx"], inputs["context_sizes"][0])
            groups = inputs["target_idx"] if predict_per == "block" else inputs["target_idx"].flatten(1)[:, None]
            return model.predictor(context, inputs["context_idx"], groups)

    images = torch.randn(4, 3, 32, 32)
    hidden = pixels_of(fine_patches_under(masks.target_idx.flatten(1), 8, 3))
    assert hidden.any()
    perturbed = torch.where(hidden, torch.randn_like(images) * 5, images)
    assert torch.equal(predict(images), predict(perturbed))
    one_context_patch = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, masks.context_idx[:, :1], True)
    changed = torch.where(pixels_of(one_context_patch), images + 1, images)
    assert not torch.allclose(predict(images), predict(changed))


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


def test_one_level_computes_ijepa_loss():
    argv = [*TINY_TRAIN, "--seed", "3"]
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
    assert set(info) == {"loss", "loss_l0"}


def test_levels_not_dividing_the_grid_is_one_line_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # patch 8 on 32 px: a 4x4 grid, 2^(3-1) = 4 divides, 2^3 not
        train_pijepa.main([*TINY_TRAIN, "--levels", "4", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "--levels" in err and "divisible" in err
    assert [train_pijepa.default_levels(g) for g in (2, 4, 7, 8, 14, 16, 64)] == [1, 2, 1, 3, 2, 3, 3]


# ----------------------------------------------------------------------------------------------------
# End-to-end runs


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory):
    """One finished two-epoch run on digits per masking strategy (3 levels on an 8x8 grid)."""
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
    assert config["script"] == "train_pijepa" and config["args"]["levels"] == 3
    assert config["predictor"]["levels"] == 3
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert records[-1]["step"] == 10
    level_keys = {k for k in records[0] if k.startswith("loss_l")}
    assert level_keys == {f"loss_l{level}" for level in CARRYING[strategy]}
    for key in level_keys:  # per-level losses fall over the two epochs
        assert records[-1][key] < records[0][key]
    encoder = load_encoder(str(out))
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 64, 192)
    assert load_predictor(str(out)).cfg.levels == 3


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

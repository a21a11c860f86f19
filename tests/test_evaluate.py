"""evaluate_embeddings.py: probe, kNN, collapse monitor, scale variants, feature cache, end to end, bad input."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import evaluate_embeddings as ev
from common import atomic_save_safetensors, collapse_metrics
from conftest import run_script, TINY_TRAIN
from data import eval_transform, UserError
from models import interpolate_pos_embed, sincos_grid_embed, vit_config, VisionTransformer

# ----------------------------------------------------------------------------------------------------
# Linear probe


def clusters(n, dim, classes, separation, generator):
    centres = torch.randn(classes, dim, generator=generator) * separation
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


@pytest.mark.parametrize("method", ["torch", "sklearn"])
def test_probe_reaches_100_percent_on_separable_features(method):
    x, y = clusters(900, 16, 5, 4.0, torch.Generator().manual_seed(1))  # one set of centres for both splits
    train_x, train_y, test_x, test_y = x[:600], y[:600], x[600:], y[600:]
    probe, wd, val = ev.train_probe(train_x, train_y, 5, [1e-2, 1e-4], method=method, iters=100)
    assert probe.accuracy(test_x, test_y) >= 0.99
    assert set(val) == {1e-2, 1e-4} and wd in val


def test_probe_fits_labels_of_a_linear_rule_exactly():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(800, 12, generator=g)
    y = (x @ torch.randn(12, 4, generator=g)).argmax(1)  # linearly separable by construction
    probe = ev.fit_lbfgs(x, y, 4, weight_decay=1e-6, iters=300)
    assert probe.accuracy(x, y) >= 0.99


def test_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 32, generator=g)
    y = torch.randint(0, 10, (3000,), generator=g)
    probe, _, _ = ev.train_probe(x[:2000], y[:2000], 10, [1e-1, 1e-3], iters=50)
    assert abs(probe.accuracy(x[2000:], y[2000:]) - 0.1) < 0.05


def test_probe_is_deterministic_under_seed():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    a, wd_a, val_a = ev.train_probe(x, y, 3, [1e-2, 1e-3], seed=7, iters=50)
    b, wd_b, val_b = ev.train_probe(x, y, 3, [1e-2, 1e-3], seed=7, iters=50)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and (wd_a, val_a) == (wd_b, val_b)


def test_sklearn_and_torch_probes_agree():
    x, y = clusters(400, 8, 3, 1.0, torch.Generator().manual_seed(5))
    torch_probe = ev.fit_lbfgs(x, y, 3, 1e-2, iters=300)
    sk_probe = ev.fit_sklearn(x, y, 3, 1e-2, iters=300)
    # the same convex objective: the same solution up to the softmax's shift invariance
    centred = lambda p: p.logits(x) - p.logits(x).mean(1, keepdim=True)
    assert torch.allclose(centred(torch_probe), centred(sk_probe), atol=2e-2)


# ----------------------------------------------------------------------------------------------------
# kNN


def knn_reference(train_x, train_y, test_x, num_classes, k, temperature):
    predictions = []
    for query in test_x:
        sims = [float(F.cosine_similarity(query, t, dim=0)) for t in train_x]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(predictions)


@pytest.mark.parametrize("k", [1, 20, 500])
def test_knn_matches_brute_force(k):
    g = torch.Generator().manual_seed(6)
    train_x, train_y = torch.randn(120, 6, generator=g), torch.randint(0, 4, (120,), generator=g)
    test_x = torch.randn(37, 6, generator=g)
    fast = ev.knn_predict(train_x, train_y, test_x, 4, k=k, temperature=0.07, batch_size=8)
    assert torch.equal(fast, knn_reference(train_x, train_y, test_x, 4, min(k, 120), 0.07))


# ----------------------------------------------------------------------------------------------------
# Collapse monitor


def test_rankme_of_a_rank_r_matrix_is_r():
    g = torch.Generator().manual_seed(7)
    for r in (1, 5, 20):
        u, _ = torch.linalg.qr(torch.randn(400, r, generator=g))
        v, _ = torch.linalg.qr(torch.randn(64, r, generator=g))
        equal_spectrum = collapse_metrics(u @ v.T * 3.0)
        assert equal_spectrum["rankme"] == pytest.approx(r, rel=1e-3)
        gaussian = collapse_metrics(torch.randn(400, r, generator=g) @ torch.randn(r, 64, generator=g))
        assert 0.7 * r <= gaussian["rankme"] <= r + 1e-3


def test_collapsed_features_are_flagged():
    collapsed = collapse_metrics(torch.ones(100, 32) + 1e-4 * torch.randn(100, 32))
    spread = collapse_metrics(torch.randn(100, 32))
    assert collapsed["feature_std"] < 1e-3 < spread["feature_std"]
    assert collapsed["rankme"] < 1.1 and spread["rankme"] > 20


# ----------------------------------------------------------------------------------------------------
# Scale robustness


def test_pos_embed_interpolation_is_identity_at_the_original_size():
    pos = sincos_grid_embed(32, 6)[None]
    assert interpolate_pos_embed(pos, 6) is pos
    assert interpolate_pos_embed(pos, 3).shape == (1, 9, 32)


def test_lowres_variant_feeds_a_smaller_grid_with_interpolated_positions():
    torch.manual_seed(0)
    encoder = VisionTransformer(vit_config("tiny", img_size=32, patch_size=8, depth=1)).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    low = ev.Variant("lowres", 2).transform(images, 32, 8)
    assert low.shape == (3, 3, 16, 16)
    with torch.no_grad():
        tokens = encoder(low)
        by_hand = encoder.patch_embed(low) + interpolate_pos_embed(encoder.pos_embed, 2)
        by_hand = encoder.norm(encoder.blocks[0](by_hand))
    assert tokens.shape == (3, 4, 192) and torch.allclose(tokens, by_hand, atol=1e-5)
    resized = ev.Variant("resized", 4).transform(images, 32, 8)
    expected = F.interpolate(eval_transform(images, 8), size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.equal(resized, expected)
    assert ev.Variant("lowres", 3).low_size(32, 8) == 8  # 32 / 3 rounded down to whole patches


def test_scale_variants_skip_what_cannot_be_computed():
    variants = ev.scale_variants([2, 3, 8], "backbone", grid_size=4)
    assert variants["lowres_2x"] == ev.Variant("lowres", 2) and variants["pyramid_2x"] == 1
    assert isinstance(variants["pyramid_3x"], str) and "power of two" in variants["pyramid_3x"]
    assert isinstance(variants["lowres_8x"], str) and "smaller than one patch" in variants["lowres_8x"]
    head = ev.scale_variants([2], "head", grid_size=4)
    assert head["resized_2x"] == ev.Variant("resized", 2) and isinstance(head["pyramid_2x"], str)


def pyramid_reference(tokens, grid, levels):
    """Cell by cell: level 0 = LN(token), a level-l cell = LN(mean of its four level-(l-1) children)."""
    def ln(v):
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    B = tokens.shape[0]
    out = torch.zeros(B, levels, tokens.shape[-1])
    for b in range(B):
        cells = {(r, c): ln(tokens[b, r * grid + c]) for r in range(grid) for c in range(grid)}
        size = grid
        for level in range(levels):
            if level:
                size //= 2
                cells = {(r, c): ln(sum(cells[2 * r + i, 2 * c + j] for i in (0, 1) for j in (0, 1)) / 4)
                         for r in range(size) for c in range(size)}
            out[b, level] = sum(cells.values()) / len(cells)
    return out


def test_pyramid_means_match_a_cell_by_cell_reference():
    tokens = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(8)) * 3 + 1
    fast = ev.pyramid_means(tokens, 4, 3)
    assert torch.allclose(fast, pyramid_reference(tokens, 4, 3), atol=1e-5)
    assert not torch.allclose(fast[:, 1], fast[:, 0], atol=1e-2)  # re-normalising makes levels differ


def test_last4_pool_concatenates_the_last_four_blocks():
    torch.manual_seed(0)
    encoder = VisionTransformer(vit_config("tiny", img_size=16, patch_size=8, depth=5)).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        last4 = ev.backbone_feature_fn(encoder, "last4")(images)["features"]
        mean = ev.backbone_feature_fn(encoder, "mean")(images)["features"]
    assert last4.shape == (2, 4 * 192) and torch.allclose(last4[:, -192:], mean)
    assert torch.allclose(mean, encoder(images).mean(1))
    shallow = VisionTransformer(vit_config("tiny", img_size=16, patch_size=8, depth=2))
    with pytest.raises(UserError, match="at least 4 blocks"):
        ev.backbone_feature_fn(shallow, "last4")


# ----------------------------------------------------------------------------------------------------
# Feature cache


def test_cache_invalidates_when_checkpoint_or_settings_change(tmp_path):
    folder, eval_dir = tmp_path / "run", tmp_path / "run" / "eval"
    os.makedirs(eval_dir)
    weights = folder / "model.safetensors"
    atomic_save_safetensors(str(weights), {"w": torch.zeros(2)}, metadata={"step": "5"})
    calls = []

    def compute():
        calls.append(1)
        return {"features": torch.full((3, 2), float(len(calls)))}

    def get(**settings):
        key = {"checkpoint": ev.checkpoint_fingerprint(str(folder), {"args": {}}), "pool": "mean", **settings}
        return ev.cached(str(eval_dir), key, compute)

    first, hit = get()
    assert not hit and len(calls) == 1
    again, hit = get()
    assert hit and len(calls) == 1 and torch.equal(again["features"], first["features"])
    _, hit = get(pool="last4")  # another setting: another entry
    assert not hit and len(calls) == 2
    assert get(pool="last4")[1]

    atomic_save_safetensors(str(weights), {"w": torch.ones(2)}, metadata={"step": "6"})  # retrained
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh, hit = get()
    assert not hit and len(calls) == 3 and fresh["features"][0, 0] == 3
    assert len(os.listdir(eval_dir)) == 1  # the old checkpoint's files are gone

    backbone = tmp_path / "backbone.safetensors"  # a head run's features also depend on its backbone
    atomic_save_safetensors(str(backbone), {"w": torch.zeros(1)})
    head_config = {"args": {}, "backbone": {"path": str(backbone)}}
    before = ev.checkpoint_fingerprint(str(folder), head_config)
    atomic_save_safetensors(str(backbone), {"w": torch.zeros(3)})
    assert ev.checkpoint_fingerprint(str(folder), head_config) != before

    cache_file = eval_dir / os.listdir(eval_dir)[0]
    cache_file.write_bytes(b"damaged")
    _, hit = get()
    assert not hit and len(calls) == 4


# ----------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """The shared trained run's config and weights in a private folder (evaluation writes into it)."""
    folder = tmp_path / "run"
    os.makedirs(folder)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(trained_run / name, folder / name)
    return folder


def test_end_to_end_results_plots_cache_and_compare(run_copy, tmp_path, capsys):
    proc = run_script("evaluate_embeddings.py", "--ckpt", run_copy, "--tsne-samples", "200")
    assert "linear probe" in proc.stdout and "pyramid 2x" in proc.stdout
    results = json.loads((run_copy / "eval" / "results.json").read_text())
    assert set(results) >= {"version", "checkpoint", "settings", "linear_probe", "knn", "scale_robustness",
                            "collapse", "feature_dim", "timings", "plots", "cache_hits"}
    assert results["checkpoint"]["step"] == 10 and results["checkpoint"]["script"] == "train_ijepa"
    assert results["settings"]["dataset"] == "digits" and results["settings"]["image_size"] == 32
    assert results["settings"]["test_images"] == 359 and results["feature_dim"] == 192
    assert results["linear_probe"]["top1"] > 0.5 and results["knn"]["top1"] > 0.2  # chance is 0.1
    assert results["linear_probe"]["weight_decay"] in results["settings"]["weight_decays"]
    assert set(results["scale_robustness"]) == {f"{kind}_{f}x" for kind in ("resized", "lowres", "pyramid")
                                                for f in (2, 4)}
    for entry in results["scale_robustness"].values():
        assert 0 <= entry["top1"] <= 1 and entry["retention"] == pytest.approx(
            entry["top1"] / entry.get("level0_top1", results["linear_probe"]["top1"]))
    assert results["scale_robustness"]["lowres_4x"]["input_size"] == 8
    assert set(results["collapse"]) == {"rankme", "feature_std", "pca_top1", "pca_top10"}
    assert not any(results["cache_hits"].values())
    png = run_copy / results["plots"]["embeddings"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same process settings as the first run (run_script fixes the thread count): the probe's float sums
    # depend on the number of threads, the cache must not change anything else.
    proc = run_script("evaluate_embeddings.py", "--ckpt", run_copy, "--no-tsne")
    second = json.loads((run_copy / "eval" / "results.json").read_text())
    assert all(second["cache_hits"].values()) and second["linear_probe"] == results["linear_probe"]
    assert second["scale_robustness"] == results["scale_robustness"]
    assert "linear probe" in proc.stdout

    other = tmp_path / "other" / "eval"
    os.makedirs(other)
    shutil.copy(run_copy / "eval" / "results.json", other / "results.json")
    plot = tmp_path / "bars.png"
    ev.main(["--compare", str(run_copy), str(other.parent), "--compare-plot", str(plot)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("run", "other"))]
    assert len(rows) == 3 and "resized_2x ret." in rows[0] and plot.read_bytes()[:4] == b"\x89PNG"


def evaluate_quietly(capsys, *argv):
    """In-process evaluation on a small train subset with one probe fit (the full protocol runs above)."""
    results = ev.main(["--no-tsne", "--max-per-class", "40", "--weight-decays", "1e-3", *map(str, argv)])
    assert "linear probe" in capsys.readouterr().out
    return results


def test_cache_of_fewer_pyramid_levels_does_not_answer_for_more(run_copy, capsys):
    """--scales 2 caches the test split with 2 pyramid levels; --scales 2 4 then needs 3 (a 4x4 grid)."""
    first = evaluate_quietly(capsys, "--ckpt", run_copy, "--scales", "2")
    assert first["scale_robustness"]["pyramid_2x"]["level"] == 1
    second = evaluate_quietly(capsys, "--ckpt", run_copy, "--scales", "2", "4")
    assert second["scale_robustness"]["pyramid_4x"]["level"] == 2
    assert second["scale_robustness"]["pyramid_2x"] == first["scale_robustness"]["pyramid_2x"]
    assert second["cache_hits"]["train/full"] and not second["cache_hits"]["test/full"]


def test_end_to_end_pijepa_checkpoint(tmp_path, capsys):
    out = tmp_path / "pi"
    run_script("train_pijepa.py", *TINY_TRAIN, "--patch-size", "4", "--epochs", "1", "--levels", "3",
               "--out", out, "--data-root", tmp_path / "data")
    results = evaluate_quietly(capsys, "--ckpt", out, "--scales", "2", "4")
    assert results["checkpoint"]["script"] == "train_pijepa"
    for factor, level in ((2, 1), (4, 2)):  # an 8x8 grid: both pyramid levels exist
        assert results["scale_robustness"][f"pyramid_{factor}x"]["level"] == level
    assert results["linear_probe"]["top1"] > 0.3


def test_end_to_end_hierarchical_head(run_copy, tmp_path, capsys):
    head_run = tmp_path / "head"
    run_script("train_hierarchical_predictor.py", "--backbone", run_copy, "--dataset", "digits", "--layers",
               "-1,-2", "--epochs", "1", "--batch-size", "32", "--subset", "200", "--monitor-size", "64",
               "--out", head_run, "--data-root", tmp_path / "data")
    head = evaluate_quietly(capsys, "--ckpt", head_run, "--features", "head", "--scales", "2")
    assert head["settings"]["features"] == "head" and head["feature_dim"] == 192
    assert "top1" in head["scale_robustness"]["resized_2x"]
    assert "backbone" in head["scale_robustness"]["lowres_2x"]["skipped"]
    # the head run's backbone features are exactly the backbone run's own
    via_head = evaluate_quietly(capsys, "--ckpt", head_run, "--scales")
    direct = evaluate_quietly(capsys, "--ckpt", run_copy, "--scales")
    assert via_head["linear_probe"] == direct["linear_probe"] and via_head["knn"] == direct["knn"]


# ----------------------------------------------------------------------------------------------------
# Bad input: one line each


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    return err


def test_folder_without_config_or_weights(tmp_path, capsys, run_copy):
    assert "has no config.json" in one_line_error(capsys, ["--ckpt", str(tmp_path / "empty")])
    no_weights = tmp_path / "no_weights"
    os.makedirs(no_weights)
    shutil.copy(run_copy / "config.json", no_weights / "config.json")
    assert "has no model.safetensors" in one_line_error(capsys, ["--ckpt", str(no_weights)])


def test_weights_that_do_not_match_the_config(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["encoder"]["depth"] = 3
    (run_copy / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["--ckpt", str(run_copy)])
    assert "do not match" in err and "blocks.2" in err


def test_unknown_dataset_and_missing_head(run_copy, capsys):
    assert "unknown dataset" in one_line_error(capsys, ["--ckpt", str(run_copy), "--dataset", "nope"])
    assert "has no hierarchical head" in one_line_error(capsys, ["--ckpt", str(run_copy), "--features", "head"])
    assert "has no eval/results.json" in one_line_error(capsys, ["--compare", str(run_copy)])

"""plots.py: the mask adapter against the samplers' outputs, the colours, the masks/curves commands, and
the retention bars of evaluate_embeddings.py --compare."""

import json
import os
import shutil

import pytest
import torch

import evaluate_embeddings as ev
import plots
from common import read_metrics
from masks import MultiBlockMaskSampler, PyramidMaskSampler, unpool_cells

PNG = b"\x89PNG\r\n\x1a\n"


def test_mask_levels_reads_ijepa_masks():
    sampler = MultiBlockMaskSampler(8, num_targets=3)
    masks = sampler.sample(2, torch.Generator().manual_seed(1))
    for sample in range(2):
        [(context, targets)] = plots.mask_levels(masks, 8, sample)
        assert context.shape == (8, 8) and targets.shape == (3, 8, 8)
        assert int(context.sum()) == sampler.num_context
        assert targets.flatten(1).sum(1).tolist() == [masks.target_idx.shape[-1]] * 3  # whole blocks, one size
        assert not (context & targets.any(0)).any()  # the context never holds a target patch
        assert set(context.flatten().nonzero().flatten().tolist()) == set(masks.context_idx[sample].tolist())


@pytest.mark.parametrize("strategy", ["full_downsampling", "full_resampling", "coarse_only", "fine_only"])
def test_mask_levels_reads_every_pyramid_strategy(strategy):
    sampler = PyramidMaskSampler(16, levels=3, strategy=strategy, num_targets=2)
    masks = sampler.sample(1, torch.Generator().manual_seed(2))
    levels = plots.mask_levels(masks, 16)
    assert [c.shape[0] for c, _ in levels] == [16, 8, 4]
    assert [int(c.sum()) for c, _ in levels] == list(masks.context_sizes)
    hidden = torch.zeros(256, dtype=torch.bool)
    for level, ((context, targets), kt) in enumerate(zip(levels, masks.target_sizes)):
        assert targets.flatten(1).sum(1).tolist() == [kt] * 2  # Kt_l cells of each block, 0 without targets
        assert not (context & targets.any(0)).any()  # within a level, no context cell is a target cell
        hidden |= unpool_cells(targets.any(0).flatten(), 16, level)
    if strategy == "full_downsampling":  # a target region is hidden at every scale: none shows in the fine context
        assert not (levels[0][0].flatten() & hidden).any()


def test_overlay_gives_context_and_targets_their_own_colours():
    image = torch.ones(8, 8, 3)  # white, 2x2 cells of 4x4 pixels
    context = torch.tensor([[True, False], [False, False]])
    targets = torch.tensor([[[False, True], [False, False]], [[False, False], [True, False]]])
    out = plots.overlay(image, context, targets)
    blue, red, orange, dark = out[0, 0], out[0, 4], out[4, 0], out[4, 4]
    assert blue[2] > blue[0] + 0.3 and red[0] > red[1] + 0.3 and red[0] > red[2] + 0.3
    assert orange[0] > orange[2] + 0.3 and orange[1] > red[1] + 0.1  # target 2 differs from target 1
    assert torch.allclose(dark, torch.full((3,), plots.HIDDEN_SHADE))


def test_masks_command_draws_every_strategy_in_a_small_png(tmp_path, capsys):
    out = tmp_path / "masks.png"
    plots.main(["masks", "--image-size", "64", "--data-root", str(tmp_path), "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["I-JEPA", "PI-JEPA full_downsampling",
                                                            "PI-JEPA full_resampling", "PI-JEPA coarse_only",
                                                            "PI-JEPA fine_only"]
    assert "refused" not in "".join(lines) and "level 2: " in lines[1]
    assert out.read_bytes()[:8] == PNG and out.stat().st_size < 200_000

    plots.main(["masks", "--data-root", str(tmp_path), "--out", str(out)])  # 32 px, 8x8: every strategy draws too
    assert "refused" not in capsys.readouterr().out


def test_curves_of_a_run_and_of_a_pyramid_run(trained_run, tmp_path, capsys):
    plots.main(["curves", "--run", str(trained_run), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    plotted = plots.plot_curves(read_metrics(trained_run / "metrics.jsonl"), tmp_path / "again.png")
    assert set(plotted) == {"loss", "loss_prediction", "lr", "weight_decay", "momentum", "monitor_rankme",
                            "monitor_feature_std"}  # loss_prediction: the I-JEPA term, logged beside the total
    records = [{"step": s, "epoch": s / 2, "loss": 1.0 / s, "loss_l0": 0.6 / s, "loss_l1": 0.4 / s, "lr": 1e-3}
               for s in range(1, 5)]
    assert plots.plot_curves(records, tmp_path / "pyramid.png")[:3] == ["loss", "loss_l0", "loss_l1"]
    with pytest.raises(SystemExit):
        plots.main(["curves", "--run", str(tmp_path)])
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_evaluation_writes_the_curves_and_compare_draws_retention_bars(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run)
    for name in ("config.json", "model.safetensors", "metrics.jsonl"):
        shutil.copy2(trained_run / name, run / name)
    results = ev.main(["--ckpt", str(run), "--no-tsne", "--max-per-class", "40", "--weight-decays", "1e-3"])
    assert results["plots"]["curves"] == os.path.join("eval", "curves.png")
    assert (run / "eval" / "curves.png").read_bytes()[:8] == PNG
    assert "eval/curves.png" in capsys.readouterr().out
    other = tmp_path / "other"
    other_results = json.loads((run / "eval" / "results.json").read_text())
    other_results["scale_robustness"]["resized_2x"]["retention"] = 0.5
    os.makedirs(other / "eval")
    (other / "eval" / "results.json").write_text(json.dumps(other_results))
    ev.main(["--compare", str(run), str(other), "--compare-plot", str(tmp_path / "bars.png")])
    assert (tmp_path / "bars.png").read_bytes()[:8] == PNG
    retention = plots.compare_bars(["run", "other"], [results, other_results], tmp_path / "bars2.png")
    assert set(retention) == set(results["scale_robustness"])
    assert retention["resized_2x"] == [results["scale_robustness"]["resized_2x"]["retention"], 0.5]

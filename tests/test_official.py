"""Official I-JEPA checkpoints: loading Meta's layout, parity with Meta's model code, export round trip,
strict checks and refusing pickles that would run code.

The reference model below is a minimal re-implementation of the official src/models/vision_transformer.py
(and apply_masks / repeat_interleave_batch) written for these tests: attention computed by hand as
softmax(q k^T * scale) v, the predictor fed masks as lists of (B, K) index tensors, its output ordered
mask-major, exactly as the official predictor returns it."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from conftest import ROOT, run_script
from checkpoints import official_configs, official_settings
from models import load_encoder, load_predictor, PredictorConfig, sincos_grid_embed, vit_config

# A tiny official-style run: vit_tiny (width 192, 12 blocks, 3 heads) on 32 px images, patch 8.
OFFICIAL_YAML = {
    "data": {"batch_size": 128, "crop_size": 32, "crop_scale": [0.3, 1.0], "use_horizontal_flip": False},
    "mask": {"patch_size": 8, "num_pred_masks": 4, "min_keep": 10, "aspect_ratio": [0.75, 1.5]},
    "meta": {"model_name": "vit_tiny", "pred_depth": 2, "pred_emb_dim": 48, "use_bfloat16": True},
    "optimization": {"epochs": 300, "lr": 0.001, "ema": [0.996, 1.0]},
}
WIDTH, DEPTH, HEADS, IMG, PATCH, PRED_DIM, PRED_DEPTH = 192, 12, 3, 32, 8, 48, 2
GRID = IMG // PATCH


# ----------------------------------------------------------------------------------------------------
# Reference: Meta's model code, re-implemented minimally


def ref_sincos(dim, grid):
    """numpy, as the official get_2d_sincos_pos_embed: meshgrid(w, h), first half of the channels from
    the w coordinate, each half [sin, cos] with frequencies 1 / 10000^(k / (d/2))."""
    w_coord, h_coord = np.meshgrid(np.arange(grid, dtype=float), np.arange(grid, dtype=float))

    def one_axis(d, pos):
        freq = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        angles = np.outer(pos.reshape(-1), freq)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(dim // 2, w_coord), one_axis(dim // 2, h_coord)], axis=1)


def ref_apply_masks(x, masks):
    """x (B, N, D), masks: list of (B, K) -> (len(masks) * B, K, D), mask-major."""
    return torch.cat([torch.gather(x, 1, m[..., None].expand(-1, -1, x.shape[-1])) for m in masks])


def ref_repeat_interleave_batch(x, batch, repeat):
    chunks = [x[i * batch:(i + 1) * batch] for i in range(len(x) // batch)]
    return torch.cat([chunk for chunk in chunks for _ in range(repeat)])


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, N, D))


class RefMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, stride=PATCH)


class RefVisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = RefPatchEmbed(WIDTH)
        self.pos_embed = nn.Parameter(torch.from_numpy(ref_sincos(WIDTH, GRID)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(WIDTH, HEADS) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)

    def forward(self, images, masks=None):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed
        if masks is not None:
            x = ref_apply_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class RefPredictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.predictor_embed = nn.Linear(WIDTH, PRED_DIM)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, PRED_DIM))
        self.predictor_pos_embed = nn.Parameter(torch.from_numpy(ref_sincos(PRED_DIM, GRID)).float()[None],
                                                requires_grad=False)
        self.predictor_blocks = nn.ModuleList(RefBlock(PRED_DIM, HEADS) for _ in range(PRED_DEPTH))
        self.predictor_norm = nn.LayerNorm(PRED_DIM, eps=1e-6)
        self.predictor_proj = nn.Linear(PRED_DIM, WIDTH)

    def forward(self, x, masks_x, masks):
        batch = len(x) // len(masks_x)
        x = self.predictor_embed(x) + ref_apply_masks(self.predictor_pos_embed.repeat(batch, 1, 1), masks_x)
        n_context = x.shape[1]
        positions = ref_apply_masks(self.predictor_pos_embed.repeat(batch, 1, 1), masks)
        positions = ref_repeat_interleave_batch(positions, batch, repeat=len(masks_x))
        queries = self.mask_token.repeat(positions.shape[0], positions.shape[1], 1) + positions
        x = torch.cat([x.repeat(len(masks), 1, 1), queries], dim=1)
        for block in self.predictor_blocks:
            x = block(x)
        return self.predictor_proj(self.predictor_norm(x)[:, n_context:])  # (M * B, Kt, D), mask-major


def randomised(module, seed):
    """Default init plus random LayerNorm affines and mask token, so that no parameter has a trivial value."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    if hasattr(module, "mask_token"):
        nn.init.normal_(module.mask_token, std=0.5)
    return module.eval()


def ddp_state(module):
    return {"module." + k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny checkpoint in the official layout, its yaml beside it, and the reference models."""
    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    encoder, target, predictor = (randomised(RefVisionTransformer(), 1), randomised(RefVisionTransformer(), 2),
                                  randomised(RefPredictor(), 3))
    path = str(folder / "IN1K-vit.t.8-300e.pth.tar")
    torch.save({"encoder": ddp_state(encoder), "predictor": ddp_state(predictor), "target_encoder": ddp_state(target),
                "opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                        "param_groups": [{"lr": 1e-3, "weight_decay": 0.04, "params": [0]}]},
                "scaler": None, "epoch": 300, "loss": 0.123, "batch_size": 128, "world_size": 16, "lr": 1e-3}, path)
    yaml_path = str(folder / "in1k_vitt8_ep300.yaml")
    with open(yaml_path, "w") as f:
        yaml.safe_dump(OFFICIAL_YAML, f)
    return {"path": path, "yaml": yaml_path, "encoder": encoder, "target": target, "predictor": predictor}


# ----------------------------------------------------------------------------------------------------
# Loading


def test_our_sincos_tables_equal_the_official_ones():
    for dim, grid in ((WIDTH, GRID), (PRED_DIM, 7)):
        assert torch.allclose(sincos_grid_embed(dim, grid), torch.from_numpy(ref_sincos(dim, grid)).float(), atol=1e-6)


def test_official_layout_loads_exactly_the_weights(official):
    for which, ref in (("target", official["target"]), ("context", official["encoder"])):
        ours = load_encoder(official["path"], which, config=official["yaml"]).state_dict()
        theirs = ref.state_dict()
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), which
    ours = load_predictor(official["path"], config=official["yaml"]).state_dict()
    assert set(ours) == set(official["predictor"].state_dict())
    assert all(torch.equal(ours[k], v) for k, v in official["predictor"].state_dict().items())


def test_encoder_matches_meta_model_code(official):
    encoder = load_encoder(official["path"], "target", config=official["yaml"])
    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    keep = torch.stack([torch.randperm(GRID * GRID)[:7].sort().values for _ in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), official["target"](images), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(encoder(images, keep=keep), official["target"](images, masks=[keep]),
                                   atol=2e-5, rtol=1e-4)


def test_predictor_matches_meta_model_code(official):
    predictor = load_predictor(official["path"], config=official["yaml"])
    generator = torch.Generator().manual_seed(1)
    B, M, Kc, Kt = 3, 2, 6, 4
    order = torch.stack([torch.randperm(GRID * GRID, generator=generator) for _ in range(B)])
    context_idx = order[:, :Kc].sort(1).values  # (B, Kc)
    target_idx = torch.stack([order[:, Kc + m * Kt: Kc + (m + 1) * Kt].sort(1).values for m in range(M)], 1)
    context = torch.randn(B, Kc, WIDTH, generator=generator)
    with torch.no_grad():
        ours = predictor(context, context_idx, target_idx)  # (B, M, Kt, D)
        theirs = official["predictor"](context, [context_idx], [target_idx[:, m] for m in range(M)])
    torch.testing.assert_close(ours.transpose(0, 1).reshape(M * B, Kt, WIDTH), theirs, atol=2e-5, rtol=1e-4)


def test_yaml_is_found_beside_the_checkpoint(official, tmp_path):
    encoder = load_encoder(official["path"])  # the one yaml in the folder
    assert encoder.cfg.depth == DEPTH and encoder.cfg.img_size == IMG
    lonely = tmp_path / "lonely.pth.tar"
    lonely.write_bytes(open(official["path"], "rb").read())
    with pytest.raises(ValueError, match="no yaml beside it: pass its run's yaml"):
        load_encoder(str(lonely))
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(yaml.safe_dump(OFFICIAL_YAML))
    with pytest.raises(ValueError, match=r"several yaml files beside it \(a.yaml, b.yaml\)"):
        load_encoder(str(lonely))


def write_yaml(path, **meta):
    settings = {**OFFICIAL_YAML, "meta": {**OFFICIAL_YAML["meta"], **meta}}
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_strict_check_names_the_keys_that_differ(official, tmp_path):
    deeper = write_yaml(tmp_path / "deeper.yaml", pred_depth=3)
    with pytest.raises(ValueError, match=r"missing \[.*'predictor_blocks\.2\.attn\.proj\.bias'"):
        load_predictor(official["path"], config=deeper)
    wider = write_yaml(tmp_path / "small.yaml", model_name="vit_small")
    with pytest.raises(ValueError, match=r"shape mismatch \[.*'blocks\.0\.attn\.proj\.bias: \(192,\) vs \(384,\)"):
        load_encoder(official["path"], config=wider)
    unknown = write_yaml(tmp_path / "unknown.yaml", model_name="vit_enormous")
    with pytest.raises(ValueError, match="vit_enormous.*use one of vit_tiny"):
        load_encoder(official["path"], config=unknown)
    renamed = torch.load(official["path"], weights_only=True)
    renamed["target_encoder"]["module.final_norm.weight"] = renamed["target_encoder"].pop("module.norm.weight")
    path = str(tmp_path / "renamed.pth.tar")
    torch.save(renamed, path)
    with pytest.raises(ValueError) as error:
        load_encoder(path, config=official["yaml"])
    assert "missing ['norm.weight']" in str(error.value) and "unexpected ['final_norm.weight']" in str(error.value)


class CreatesAFile:
    """Unpickling this calls open(marker, "w"): any code could run in its place."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_weights_only_loading_refuses_a_pickle_that_runs_code(official, tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth.tar")
    torch.save({"encoder": {}, "target_encoder": CreatesAFile(str(marker)), "predictor": {}}, path)
    with pytest.raises(ValueError) as error:
        load_encoder(path, config=official["yaml"])
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"refusing to load {path}") and "open" in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load really runs the code
    assert marker.exists()


# ----------------------------------------------------------------------------------------------------
# Export


def test_export_import_round_trip(trained_run, tmp_path):
    path = tmp_path / "exported" / "run.pth.tar"
    proc = run_script("checkpoints.py", "export-official", trained_run, path)
    assert "run.yaml" in proc.stdout
    checkpoint = torch.load(path, weights_only=True)
    assert {"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss", "batch_size", "world_size",
            "lr"} <= set(checkpoint)
    assert all(k.startswith("module.") for key in ("encoder", "predictor", "target_encoder") for k in checkpoint[key])
    assert checkpoint["epoch"] == 2 and checkpoint["batch_size"] == 32
    settings = yaml.safe_load((tmp_path / "exported" / "run.yaml").read_text())
    assert settings["meta"]["model_name"] == "vit_tiny" and settings["meta"]["architecture"] == {"depth": 2}

    images = torch.randn(2, 3, 32, 32)
    for which in ("target", "context"):
        ours, exported = load_encoder(str(trained_run), which), load_encoder(str(path), which)
        assert ours.cfg == exported.cfg
        assert all(torch.equal(v, exported.state_dict()[k]) for k, v in ours.state_dict().items())
        with torch.no_grad():
            assert torch.equal(ours(images), exported(images))
    ours, exported = load_predictor(str(trained_run)), load_predictor(str(path))
    assert ours.cfg == exported.cfg
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in ours.state_dict().items())


def test_official_settings_invert_official_configs():
    for encoder, pred_heads in ((vit_config("huge", img_size=224, patch_size=14), 16),
                                (vit_config("small", img_size=64, patch_size=8, depth=6, num_heads=4), 2)):
        predictor = PredictorConfig(embed_dim=encoder.embed_dim, pred_dim=96, depth=3, num_heads=pred_heads,
                                    grid_size=encoder.grid_size)
        assert official_configs(official_settings(encoder, predictor)) == (encoder, predictor)
    settings = official_settings(vit_config("huge", img_size=224, patch_size=14),
                                 PredictorConfig(embed_dim=1280, pred_dim=384, depth=12, num_heads=16, grid_size=16))
    assert settings == {"meta": {"model_name": "vit_huge", "pred_depth": 12, "pred_emb_dim": 384},
                        "mask": {"patch_size": 14}, "data": {"crop_size": 224}}  # exactly the official keys


def test_export_refuses_what_the_official_layout_cannot_hold(tmp_path):
    encoder = vit_config("tiny", img_size=32, patch_size=4, patch_embed="conv")
    predictor = PredictorConfig(embed_dim=192, pred_dim=96, depth=2, num_heads=3, grid_size=8, levels=3)
    with pytest.raises(ValueError, match="a conv patch stem; a 3-level PI-JEPA predictor"):
        official_settings(encoder, predictor)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "checkpoints.py"), "export-official", str(tmp_path / "none"),
                           str(tmp_path / "x.pth.tar")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "has no config.json" in proc.stderr
    assert not (tmp_path / "x.pth.tar").exists()
    with pytest.raises(ValueError, match="only for official .pth.tar checkpoints"):
        load_encoder(str(tmp_path), config="x.yaml")

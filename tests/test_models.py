"""models.py: encoder and predictor shapes, keep semantics, batching, gradients, EMA, init, loading."""

import math

import pytest
import torch

from models import (IJEPA, PredictorConfig, Predictor, VIT_PRESETS, VisionTransformer, ViTConfig, gather_tokens,
                    interpolate_pos_embed, sincos_grid_embed, vit_config)


def tiny_ijepa(grid=4, depth=2, loss="smooth_l1"):
    enc = vit_config("tiny", img_size=grid * 8, patch_size=8, depth=depth)
    pred = PredictorConfig(embed_dim=enc.embed_dim, pred_dim=48, depth=2, num_heads=3, grid_size=grid)
    return IJEPA(enc, pred, loss=loss)


@pytest.mark.parametrize("preset", list(VIT_PRESETS))
def test_every_preset_builds_and_keeps_its_width(preset):
    width, depth, heads, mlp_ratio = VIT_PRESETS[preset]
    cfg = vit_config(preset, img_size=16, patch_size=8, depth=1)  # depth 1 keeps giant cheap
    model = VisionTransformer(cfg)
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 4, width)
    assert model.blocks[0].attn.num_heads == heads
    assert model.blocks[0].mlp.fc1.out_features == int(width * mlp_ratio)


def test_parameter_names_follow_the_official_layout():
    names = set(VisionTransformer(vit_config("tiny", img_size=16, patch_size=8, depth=1)).state_dict())
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
                "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc2.weight", "norm.weight"):
        assert key in names
    pred = Predictor(PredictorConfig(embed_dim=192, pred_dim=48, depth=1, num_heads=3, grid_size=2))
    for key in ("predictor_embed.weight", "mask_token", "predictor_pos_embed", "predictor_blocks.0.attn.qkv.weight",
                "predictor_norm.weight", "predictor_proj.weight"):
        assert key in pred.state_dict()


def test_sincos_embedding_matches_the_official_formula():
    dim, grid = 8, 3
    emb = sincos_grid_embed(dim, grid)
    # Official order: first half encodes the column (w), second half the row (h); each half [sin, cos].
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                              torch.sin(row * omega), torch.cos(row * omega)]).float()
        torch.testing.assert_close(emb[index], expected)


def test_keep_listing_every_token_equals_the_plain_forward():
    model = VisionTransformer(vit_config("tiny", img_size=32, patch_size=8, depth=2)).eval()
    images = torch.randn(3, 3, 32, 32)
    keep = torch.arange(16).expand(3, 16)
    torch.testing.assert_close(model(images, keep=keep), model(images), atol=1e-5, rtol=1e-5)


def test_permuting_keep_permutes_the_output():
    model = VisionTransformer(vit_config("tiny", img_size=32, patch_size=8, depth=2)).eval()
    images = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 3, 5, 9, 15], [1, 2, 4, 8, 14]])
    perm = torch.tensor([4, 0, 2, 1, 3])
    torch.testing.assert_close(model(images, keep=keep[:, perm]), model(images, keep=keep)[:, perm],
                               atol=1e-5, rtol=1e-5)


def test_dropped_tokens_do_not_influence_kept_ones():
    model = VisionTransformer(vit_config("tiny", img_size=32, patch_size=8, depth=2)).eval()
    images = torch.randn(1, 3, 32, 32)
    keep = torch.tensor([[0, 1, 4, 5]])  # the top-left 2x2 patches = pixels [0:16, 0:16]
    changed = images.clone()
    changed[..., 16:, :] = torch.randn_like(changed[..., 16:, :])
    torch.testing.assert_close(model(changed, keep=keep), model(images, keep=keep))


def test_forward_intermediates_last_block_equals_forward():
    model = VisionTransformer(vit_config("tiny", img_size=32, patch_size=8, depth=3)).eval()
    images = torch.randn(2, 3, 32, 32)
    last, first = model.forward_intermediates(images, [-1, 0])
    torch.testing.assert_close(last, model(images))
    assert first.shape == last.shape and not torch.allclose(first, last)


@pytest.mark.parametrize("patch_embed", ["strided", "conv"])
def test_a_token_sees_only_its_own_patch(patch_embed):
    model = VisionTransformer(vit_config("tiny", img_size=32, patch_size=8, depth=1, patch_embed=patch_embed))
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[..., :8, 8:16] += 1.0  # patch 1 only
    tokens, changed_tokens = model.patch_embed(images), model.patch_embed(changed)
    differs = (tokens - changed_tokens).abs().amax(-1)[0] > 0
    assert differs.tolist() == [i == 1 for i in range(16)]


def test_conv_stem_patch_embedding():
    model = VisionTransformer(vit_config("tiny", img_size=32, patch_size=4, depth=1, patch_embed="conv"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64, 192)
    # The stem passes the image on at the strided embedding's scale (at the ViT's init it was ~150x smaller,
    # and I-JEPA collapsed onto the position embeddings).
    strided = VisionTransformer(vit_config("tiny", img_size=32, patch_size=4, depth=1))
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ratio = model.patch_embed(images).std() / strided.patch_embed(images).std()
    assert 0.5 < ratio < 2
    with pytest.raises(ValueError, match="power-of-two"):
        VisionTransformer(vit_config("tiny", img_size=36, patch_size=6, depth=1, patch_embed="conv"))


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        ViTConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown model"):
        vit_config("enormous")


def test_other_image_sizes_interpolate_position_embeddings():
    model = VisionTransformer(vit_config("tiny", img_size=32, patch_size=8, depth=1))
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 4, 192)
    pos = model.pos_embed
    assert interpolate_pos_embed(pos, 4) is pos


def test_init_is_truncated_normal_with_depth_scaled_residual_projections():
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("small", img_size=32, patch_size=4, depth=4))
    qkv = model.blocks[3].attn.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.002 and abs(qkv.mean().item()) < 0.001
    for layer_id, block in enumerate(model.blocks, start=1):
        expected = 0.02 / math.sqrt(2 * layer_id)
        assert abs(block.attn.proj.weight.std().item() - expected) < 0.15 * expected
        assert abs(block.mlp.fc2.weight.std().item() - expected) < 0.15 * expected
    assert torch.all(model.blocks[0].attn.qkv.bias == 0) and torch.all(model.norm.weight == 1)


def test_batched_prediction_equals_one_call_per_block():
    torch.manual_seed(0)
    model = tiny_ijepa().eval()
    context = torch.randn(2, 5, 192)
    context_idx = torch.tensor([[0, 1, 2, 4, 8], [3, 5, 6, 7, 9]])
    target_idx = torch.tensor([[[10, 11, 14], [12, 13, 15]], [[0, 1, 2], [12, 14, 15]]])
    batched = model.predictor(context, context_idx, target_idx)
    for block in range(2):
        single = model.predictor(context, context_idx, target_idx[:, block: block + 1])
        torch.testing.assert_close(batched[:, block: block + 1], single, atol=1e-5, rtol=1e-5)


def test_gradients_reach_context_encoder_and_predictor_never_the_target_encoder():
    torch.manual_seed(0)
    model = tiny_ijepa()
    images = torch.randn(2, 3, 32, 32)
    context_idx = torch.tensor([[0, 1, 2, 3, 4, 5], [2, 3, 6, 7, 8, 9]])
    target_idx = torch.tensor([[[10, 11], [14, 15]], [[12, 13], [0, 1]]])
    loss, info = model(images, context_idx, target_idx)
    loss.backward()
    assert torch.isfinite(loss) and info["loss"] == loss.detach()
    for name, p in list(model.encoder.named_parameters()) + list(model.predictor.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())


def test_targets_are_layer_normed_target_encoder_outputs_at_target_positions():
    model = tiny_ijepa()
    images = torch.randn(2, 3, 32, 32)
    target_idx = torch.tensor([[[3, 7]], [[0, 15]]])
    full = model.target_encoder(images)
    expected = torch.nn.functional.layer_norm(full, (192,))
    got = model.targets(images, target_idx)
    torch.testing.assert_close(got[0, 0], expected[0, [3, 7]])
    torch.testing.assert_close(got[1, 0], expected[1, [0, 15]])
    torch.testing.assert_close(got.mean(-1), torch.zeros(2, 1, 2), atol=1e-5, rtol=0)


def test_ema_update_is_a_lerp_towards_the_online_encoder():
    model = tiny_ijepa()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for old, online, new in zip(before, model.encoder.parameters(), model.target_encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)


def test_mse_loss_option():
    model = tiny_ijepa(loss="mse")
    context_idx = torch.arange(6).expand(2, 6)
    target_idx = torch.tensor([[[10, 11]], [[12, 13]]])
    loss, _ = model(torch.randn(2, 3, 32, 32), context_idx, target_idx)
    assert loss > 0
    with pytest.raises(ValueError, match="unknown loss"):
        tiny_ijepa(loss="l3")


def test_gather_tokens():
    x = torch.arange(2 * 5 * 3).reshape(2, 5, 3).float()
    idx = torch.tensor([[[4, 0]], [[1, 1]]])
    out = gather_tokens(x, idx)
    assert out.shape == (2, 1, 2, 3)
    torch.testing.assert_close(out[0, 0, 0], x[0, 4])
    torch.testing.assert_close(out[1, 0, 1], x[1, 1])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny_ijepa()
    images = torch.randn(2, 3, 32, 32)
    context_idx = torch.arange(8).expand(2, 8)
    target_idx = torch.tensor([[[10, 11]], [[12, 13]]])
    model(images, context_idx, target_idx)[0].backward()
    reference = [p.grad.clone() for p in model.encoder.parameters()]
    model.zero_grad()
    model.encoder.grad_checkpointing = model.predictor.grad_checkpointing = True
    model(images, context_idx, target_idx)[0].backward()
    for ref, p in zip(reference, model.encoder.parameters()):
        torch.testing.assert_close(p.grad, ref)


def test_predictor_config_for_encoder_fits_any_preset():
    """PredictorConfig.for_encoder derives the width min(384, D / 2), the encoder's heads and grid, so a
    model built from models.py alone fits the encoder (the plain defaults only fit ViT-tiny at 32 px)."""
    for preset, (width, _, heads, _) in VIT_PRESETS.items():
        encoder = vit_config(preset, img_size=64, patch_size=16)
        cfg = PredictorConfig.for_encoder(encoder, depth=2)
        assert (cfg.embed_dim, cfg.pred_dim, cfg.num_heads, cfg.grid_size, cfg.depth) == (
            width, min(384, width // 2), heads, 4, 2)
    encoder = vit_config("small", img_size=32, patch_size=8, depth=1)
    model = IJEPA(encoder, PredictorConfig.for_encoder(encoder, depth=1, pred_dim=96, num_heads=2))
    assert model.predictor.cfg.pred_dim == 96 and model.predictor.cfg.num_heads == 2
    context_idx = torch.arange(8).expand(2, -1)
    target_idx = torch.arange(10, 14).expand(2, 1, -1)
    loss, _ = model(torch.randn(2, 3, 32, 32), context_idx, target_idx)
    assert loss.isfinite()
    with pytest.raises(ValueError, match="does not fit the encoder.*PredictorConfig.for_encoder"):
        IJEPA(encoder, PredictorConfig())  # ViT-tiny's width at 32 px: not this encoder's

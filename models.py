"""Models for I-JEPA and PI-JEPA: ViT encoder, narrow predictor, the I-JEPA objective.

Self-contained on purpose: this file imports torch and the standard library only (safetensors is
imported inside the loader that needs it), so it can be copied alone into other research code.

    enc = VisionTransformer(vit_config("tiny", img_size=32, patch_size=4))
    tokens = enc(images)                      # (B, N, D), N = (32 / 4) ** 2
    tokens = enc(images, keep=context_idx)    # (B, K, D): only the kept tokens are computed
    encoder = load_encoder("out/c10")         # a trained encoder from one of our output folders

Parameter names follow the official I-JEPA / timm layout (`patch_embed.proj`, `pos_embed`,
`blocks.{i}.attn.qkv`, `blocks.{i}.mlp.fc1`, `norm`, `predictor_embed`, `mask_token`, ...), so Meta's
released checkpoints load by name.
"""

import copy
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------
# Configurations

# The I-JEPA paper's encoder sizes: (width, depth, heads, mlp ratio).
VIT_PRESETS = {
    "tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
}


@dataclass
class ViTConfig:
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_embed: str = "strided"  # "strided": one strided convolution; "conv": a small convolutional stem
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}; "
                             "choose an image size that is a multiple of the patch size")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.patch_embed not in ("strided", "conv"):
            raise ValueError(f"unknown patch_embed {self.patch_embed!r}; use 'strided' or 'conv'")

    @property
    def grid_size(self):
        return self.img_size // self.patch_size


@dataclass
class PredictorConfig:
    embed_dim: int = 192  # the encoder's width: what the predictor reads and predicts
    pred_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    grid_size: int = 8  # the encoder's fine token grid (G x G)
    levels: int = 1  # pyramid levels (PI-JEPA); 1 is I-JEPA
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.pred_dim % self.num_heads:
            raise ValueError(f"pred_dim {self.pred_dim} is not divisible by num_heads {self.num_heads}")
        check_pyramid_levels(self.grid_size, self.levels)


def vit_config(preset="tiny", **overrides):
    """A ViTConfig from a preset name in VIT_PRESETS, any field overridable."""
    if preset not in VIT_PRESETS:
        raise ValueError(f"unknown model {preset!r}; choose one of {', '.join(VIT_PRESETS)}")
    width, depth, heads, mlp_ratio = VIT_PRESETS[preset]
    values = dict(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ViTConfig(**values)


def config_from_dict(cls, values):
    """Build a config dataclass from a dict, refusing unknown keys (typos must not pass silently)."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} settings must be a mapping, got {values!r:.80}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
    for f in fields(cls):  # a damaged or hand-edited config.json: name the field, not a failure deep in a layer
        value = values.get(f.name, f.default)
        if not _fits_type(value, f.type):
            raise ValueError(f"{cls.__name__}.{f.name} = {value!r} is not a valid {f.type.__name__}")
        if f.type is int and value < 1:  # every int of a config is a size or a count
            raise ValueError(f"{cls.__name__}.{f.name} = {value!r} must be a positive integer")
    return cls(**values)


def _fits_type(value, kind):
    if isinstance(value, bool) or kind is bool:  # bool is an int subclass: True is no depth
        return isinstance(value, bool) and kind is bool
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, str) if kind is str else True


# ----------------------------------------------------------------------------------------------------
# Position embeddings


def sincos_embed_1d(dim, positions):
    """(P,) float positions -> (P, dim) as [sin(p * w_k), cos(p * w_k)], w_k = 10000^(-k / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_embed_2d(dim, rows, cols):
    """Fixed 2-D sine-cosine embedding of points at float (row, col) coordinates: (P,) x 2 -> (P, dim).

    Half the channels encode the column and half the row, in the order of the official I-JEPA / MAE
    code, so an embedding built here equals the `pos_embed` stored in Meta's checkpoints."""
    if dim % 4:
        raise ValueError(f"sine-cosine position embeddings need a width divisible by 4, got {dim}")
    return torch.cat([sincos_embed_1d(dim // 2, cols), sincos_embed_1d(dim // 2, rows)], dim=1).float()


def sincos_grid_embed(dim, grid_size):
    """(G*G, dim) embedding of a G x G grid in raster order."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return sincos_embed_2d(dim, rows.flatten(), cols.flatten())


def interpolate_pos_embed(pos_embed, grid_size):
    """Resize a (1, G*G, D) position embedding to (1, g*g, D) by bicubic interpolation on the grid.

    Returns the input unchanged when the grid already has the requested size (no CLS token here)."""
    old = math.isqrt(pos_embed.shape[1])
    if old == grid_size:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, G, G)
    grid = F.interpolate(grid.float(), size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim).to(pos_embed.dtype)


# ----------------------------------------------------------------------------------------------------
# Pyramid geometry (PI-JEPA). Level l has (G / 2^l)^2 cells; cells of all levels share one index space:
# level 0 first (so I-JEPA's indices are the level-0 indices), then level 1, and so on.


def check_pyramid_levels(grid_size, levels):
    if levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    if grid_size % 2 ** (levels - 1):
        raise ValueError(f"a {grid_size}x{grid_size} token grid cannot make {levels} pyramid levels: the grid "
                         f"must be divisible by 2^(levels-1) = {2 ** (levels - 1)}; use fewer --levels")


def pyramid_grid_sizes(grid_size, levels):
    check_pyramid_levels(grid_size, levels)
    return [grid_size // 2**level for level in range(levels)]


def pyramid_offsets(grid_size, levels):
    """Start of each level's cells in the shared pyramid index space, plus the total count at the end."""
    offsets = [0]
    for size in pyramid_grid_sizes(grid_size, levels):
        offsets.append(offsets[-1] + size * size)
    return offsets


def pyramid_cell_centres(grid_size, levels):
    """(rows, cols) of every pyramid cell's centre in fine-grid coordinates, in pyramid index order."""
    all_rows, all_cols = [], []
    for level, size in enumerate(pyramid_grid_sizes(grid_size, levels)):
        scale = 2**level
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        all_rows.append(rows.flatten() * scale + (scale - 1) / 2)
        all_cols.append(cols.flatten() * scale + (scale - 1) / 2)
    return torch.cat(all_rows), torch.cat(all_cols)


# ----------------------------------------------------------------------------------------------------
# Building blocks


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias=True, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks, x, grad_checkpointing=False):
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def init_transformer_weights(module, blocks, std=0.02):
    """The one init: truncated normal for Linear/Conv weights, zero biases, unit LayerNorms, then the
    residual output projections of block i (1-based) divided by sqrt(2 i), as in the official code's
    `fix_init_weight`, and never overwritten afterwards. The truncation bounds are +-2 in absolute value,
    as in the official and timm code: at std 0.02 that is a plain normal in practice."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer_id, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class PatchEmbed(nn.Module):
    """Images (B, C, H, W) -> tokens (B, N, D) by a strided convolution, optionally after a conv stem.

    The stem ("conv") halves the resolution log2(patch) times with 2x2 stride-2 convolutions and GELUs,
    then `proj` is a 1x1 convolution; it needs a power-of-two patch size. Its kernels never straddle a
    patch border, so a token sees only its own patch's pixels: with overlapping (3x3) kernels a context
    token would see into the neighbouring target patches, and the masking would leak."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.patch_embed == "strided":
            self.stem = nn.Identity()
            self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
            return
        steps = int(math.log2(cfg.patch_size))
        if 2**steps != cfg.patch_size:
            raise ValueError(f"--patch-embed conv needs a power-of-two patch size, got {cfg.patch_size}")
        layers, channels = [], cfg.in_chans
        for step in range(steps):
            width = max(cfg.embed_dim // 2 ** (steps - step), 16)
            layers += [nn.Conv2d(channels, width, 2, stride=2), nn.GELU()]
            channels = width
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, cfg.embed_dim, 1)

    def forward(self, images):
        return self.proj(self.stem(images)).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# Encoder


def gather_tokens(x, idx):
    """x (B, N, D), idx (B, ...) token indices -> (B, ..., D)."""
    B, D = x.shape[0], x.shape[-1]
    flat = idx.reshape(B, -1, 1).expand(-1, -1, D)
    return x.gather(1, flat).reshape(*idx.shape, D)


class VisionTransformer(nn.Module):
    """ViT without CLS token, with fixed sine-cosine position embeddings and a final LayerNorm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.register_buffer("pos_embed", sincos_grid_embed(cfg.embed_dim, cfg.grid_size)[None])  # (1, N, D)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layer_norm_eps)
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.grad_checkpointing = False
        init_transformer_weights(self, self.blocks)

    def embed(self, images, keep=None):
        """Patch tokens plus position embeddings, then keep only `keep` (B, K) if given."""
        x = self.patch_embed(images)  # (B, N, D)
        grid = images.shape[-1] // self.cfg.patch_size
        if images.shape[-2] != images.shape[-1]:
            raise ValueError(f"square images expected, got {tuple(images.shape[-2:])}")
        x = x + interpolate_pos_embed(self.pos_embed, grid).to(x.dtype)
        return x if keep is None else gather_tokens(x, keep)  # (B, K, D)

    def forward(self, images, keep=None):
        x = run_blocks(self.blocks, self.embed(images, keep), self.grad_checkpointing)
        return self.norm(x)

    def forward_intermediates(self, images, indices, keep=None, norm=True):
        """Outputs of the blocks in `indices` (negative counts from the end), each (B, K, D).

        With norm=True each output goes through the final LayerNorm, so the last block's equals forward()."""
        depth = len(self.blocks)
        wanted = sorted({i % depth for i in indices})
        if any(not -depth <= i < depth for i in indices):
            raise ValueError(f"block indices {list(indices)} out of range for depth {depth}")
        x, outputs = self.embed(images, keep), {}
        for i, block in enumerate(self.blocks[: wanted[-1] + 1]):
            x = run_blocks([block], x, self.grad_checkpointing)
            if i in wanted:
                outputs[i] = self.norm(x) if norm else x
        return [outputs[i % depth] for i in indices]


# ----------------------------------------------------------------------------------------------------
# Predictor


class Predictor(nn.Module):
    """Narrow ViT that predicts target-token representations from context tokens.

    Tokens live in the pyramid index space (level 0 = the encoder's G x G grid). Each token's position
    embedding is the sine-cosine embedding of its cell centre in fine-grid coordinates, plus a learned
    level embedding when levels > 1 (none with levels = 1, which is exactly I-JEPA's predictor).
    """

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.predictor_embed = nn.Linear(cfg.embed_dim, cfg.pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.pred_dim))
        self.register_buffer("predictor_pos_embed", sincos_grid_embed(cfg.pred_dim, cfg.grid_size)[None])
        if cfg.levels > 1:
            rows, cols = pyramid_cell_centres(cfg.grid_size, cfg.levels)
            fine = cfg.grid_size**2
            self.register_buffer("coarse_pos_embed", sincos_embed_2d(cfg.pred_dim, rows[fine:], cols[fine:]))
            self.level_embed = nn.Parameter(torch.zeros(cfg.levels, cfg.pred_dim))
            sizes = [s * s for s in pyramid_grid_sizes(cfg.grid_size, cfg.levels)]
            self.register_buffer("cell_level", torch.repeat_interleave(torch.arange(cfg.levels),
                                                                       torch.tensor(sizes)), persistent=False)
        self.predictor_blocks = nn.ModuleList(
            Block(cfg.pred_dim, cfg.num_heads, cfg.mlp_ratio, True, cfg.layer_norm_eps) for _ in range(cfg.depth))
        self.predictor_norm = nn.LayerNorm(cfg.pred_dim, eps=cfg.layer_norm_eps)
        self.predictor_proj = nn.Linear(cfg.pred_dim, cfg.embed_dim)
        self.grad_checkpointing = False
        init_transformer_weights(self, self.predictor_blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if cfg.levels > 1:
            nn.init.trunc_normal_(self.level_embed, std=0.02)

    def position_table(self):
        """(number of pyramid cells, pred_dim): position (+ level) embedding of every cell."""
        table = self.predictor_pos_embed[0]
        if self.cfg.levels == 1:
            return table
        return torch.cat([table, self.coarse_pos_embed]) + self.level_embed[self.cell_level]

    def forward(self, context, context_idx, target_idx):
        """context (B, Kc, D) encoder tokens at pyramid cells context_idx (B, Kc); target_idx (B, M, Kt).

        Each of the M target groups is predicted in its own sequence [context tokens, Kt mask tokens], all
        B*M sequences in one batched call. Returns (B, M, Kt, D) predictions in the encoder's width."""
        B, M, Kt = target_idx.shape
        table = self.position_table()
        ctx = self.predictor_embed(context) + table[context_idx].to(context.dtype)  # (B, Kc, Dp)
        ctx = ctx.repeat_interleave(M, dim=0)  # (B*M, Kc, Dp)
        queries = self.mask_token + table[target_idx.reshape(B * M, Kt)].to(ctx.dtype)  # (B*M, Kt, Dp)
        x = run_blocks(self.predictor_blocks, torch.cat([ctx, queries], dim=1), self.grad_checkpointing)
        x = self.predictor_proj(self.predictor_norm(x[:, -Kt:]))  # (B*M, Kt, D)
        return x.reshape(B, M, Kt, -1)


# ----------------------------------------------------------------------------------------------------
# The I-JEPA objective


class IJEPA(nn.Module):
    """Context encoder, EMA target encoder and predictor, with the loss in representation space.

    Subclasses (PI-JEPA) change `targets` and `context` to work on the latent pyramid; the predictor and
    loss are shared, so with one level the two objectives are the same computation."""

    def __init__(self, encoder_cfg: ViTConfig, predictor_cfg: PredictorConfig, loss="smooth_l1"):
        super().__init__()
        if loss not in ("smooth_l1", "mse"):
            raise ValueError(f"unknown loss {loss!r}; use 'smooth_l1' or 'mse'")
        self.loss_name = loss
        self.encoder = VisionTransformer(encoder_cfg)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = Predictor(predictor_cfg)

    @torch.no_grad()
    def targets(self, images, target_idx):
        """Layer-normed (no affine) target-encoder tokens at target_idx: (B, M, Kt, D), no gradient."""
        h = self.target_encoder(images)
        h = F.layer_norm(h, h.shape[-1:])
        return gather_tokens(h, target_idx)

    def context(self, images, context_idx):
        """Context tokens (B, Kc, D) at pyramid cells context_idx; the encoder sees only those patches."""
        return self.encoder(images, keep=context_idx)

    def prediction_loss(self, pred, target):
        loss = F.smooth_l1_loss if self.loss_name == "smooth_l1" else F.mse_loss
        return loss(pred.float(), target.float())

    def forward(self, images, context_idx, target_idx):
        """Returns the scalar loss and a dict of detached tensors to log."""
        target = self.targets(images, target_idx)
        pred = self.predictor(self.context(images, context_idx), context_idx, target_idx)
        loss = self.prediction_loss(pred, target)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def update_target(self, momentum):
        """target <- momentum * target + (1 - momentum) * online, as one foreach operation."""
        online = list(self.encoder.parameters())
        target = list(self.target_encoder.parameters())
        torch._foreach_lerp_(target, online, 1.0 - momentum)


# ----------------------------------------------------------------------------------------------------
# PI-JEPA: the latent pyramid and cross-scale prediction
#
#   image ──avgpool 2^l──> image_l (H / 2^l px) ──encoder──> level l tokens, a (G/2^l)^2 grid
#
#   level 2   (G/4)^2 cells   encoder(image / 4)            2x2 cells on an 8x8 grid
#   level 1   (G/2)^2 cells   encoder(image / 2)            4x4
#   level 0   G x G patches   encoder(image), I-JEPA's      8x8
# Context: the context encoder on each level's image, seeing only that level's context cells. Targets: the
# 2x2 mean pool of the level below, layer-normed ("pooled", pyramid_pool, the default), or the EMA target
# encoder on each level's image ("encoded"). One predictor sequence per target group: [context tokens of
# every level | mask tokens of group m at every target level], each token at its cell centre (fine-grid
# coordinates) plus its level embedding. A level-l cell covers exactly the pixels of its 2^l x 2^l fine
# patches.

COARSE_TARGETS = ("pooled", "encoded")


def pyramid_pool(tokens, grid_size, levels):
    """(B, G*G, D) fine tokens -> (B, P, D) latent pyramid in pyramid index order: level 0 is the input,
    level l the 2 x 2 average pool of level l-1 on the grid, layer-normed (no affine) again."""
    B, _, D = tokens.shape
    out, x = [tokens], tokens
    for level in range(1, levels):
        g = grid_size // 2 ** (level - 1)
        grid = x.transpose(1, 2).reshape(B, D, g, g)  # (B, D, g, g)
        x = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (B, (g/2)^2, D)
        x = F.layer_norm(x, (D,))
        out.append(x)
    return torch.cat(out, dim=1)


def pyramid_parents(grid_size, levels):
    """(L, G*G) long: the pyramid index of the level-l cell holding each fine patch (row 0: the patch)."""
    offsets = pyramid_offsets(grid_size, levels)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return torch.stack([offsets[level] + (rows >> level) * (grid_size >> level) + (cols >> level)
                        for level in range(levels)])


def level_slices(sizes):
    """Per-level lengths (K_0, K_1, ...) -> [(level, slice of that level's part)] for levels with K_l > 0."""
    starts = [sum(sizes[:level]) for level in range(len(sizes))]
    return [(level, slice(start, start + size)) for level, (start, size) in enumerate(zip(starts, sizes)) if size]


class PyramidIJEPA(IJEPA):
    """PI-JEPA: I-JEPA's encoders and predictor on a latent pyramid of L levels (Predictor levels = L).

    Level l is the image average-pooled 2^l times, encoded by the same (shared) encoder on its own
    (G/2^l)^2 token grid, with the encoder's position embedding resized to that grid (as at any other
    resolution). Context: the context encoder runs once per level on that level's context cells only
    (masks.PyramidMaskSampler decides which cells each level shows). Targets: coarse_targets="pooled" (the
    default, measured in the README) 2x2-pools the layer-normed fine target tokens level by level
    (pyramid_pool); "encoded" runs the EMA target encoder on every target level's image. Prediction: target
    group m (block m at every target level) is one predictor sequence holding the context of every level,
    so with L = 1 this is exactly IJEPA; predict_per="sample" puts all M groups of a sample in one sequence.
    Loss: sum over target levels of level_weights[l] * loss_l, each loss_l logged as "loss_l{l}".
    """

    def __init__(self, encoder_cfg: ViTConfig, predictor_cfg: PredictorConfig, loss="smooth_l1",
                 level_weights=None, predict_per="block", coarse_targets="pooled"):
        super().__init__(encoder_cfg, predictor_cfg, loss)
        levels = predictor_cfg.levels
        if predictor_cfg.grid_size != encoder_cfg.grid_size:
            raise ValueError(f"predictor grid {predictor_cfg.grid_size} differs from the encoder's "
                             f"{encoder_cfg.grid_size}")
        self.level_weights = tuple(level_weights or [1.0] * levels)
        if len(self.level_weights) != levels:
            raise ValueError(f"{len(self.level_weights)} level weights for {levels} levels; give one per level")
        if predict_per not in ("block", "sample"):
            raise ValueError(f"predict_per must be 'block' or 'sample', got {predict_per!r}")
        if coarse_targets not in COARSE_TARGETS:
            raise ValueError(f"coarse_targets must be one of {', '.join(COARSE_TARGETS)}, got {coarse_targets!r}")
        self.predict_per, self.coarse_targets = predict_per, coarse_targets
        self.offsets = pyramid_offsets(encoder_cfg.grid_size, levels)

    @property
    def levels(self):
        return self.predictor.cfg.levels

    def level_image(self, images, level):
        """(B, C, H, W) -> (B, C, H / 2^l, W / 2^l): the image level l encodes (each pixel the mean of a
        2^l x 2^l square, so a level-l patch holds exactly the pixels of its 2^l x 2^l fine patches)."""
        return images if level == 0 else F.avg_pool2d(images, 2**level)

    @torch.no_grad()
    def targets(self, images, target_idx, target_sizes=None):
        """Layer-normed target tokens at pyramid cells target_idx (B, M, sum Kt_l): (B, M, Kt, D), no gradient."""
        target_sizes = target_sizes or (target_idx.shape[-1],)
        if self.coarse_targets == "pooled":
            h = self.target_encoder(images)
            h = pyramid_pool(F.layer_norm(h, h.shape[-1:]), self.encoder.cfg.grid_size, self.levels)
            return gather_tokens(h, target_idx)
        parts = []
        for level, part in level_slices(target_sizes):
            h = self.target_encoder(self.level_image(images, level))  # (B, (G/2^l)^2, D)
            parts.append(gather_tokens(F.layer_norm(h, h.shape[-1:]), target_idx[..., part] - self.offsets[level]))
        return torch.cat(parts, dim=2)

    def context(self, images, context_idx, context_sizes=None):
        """(B, sum Kc_l, D) context tokens at pyramid cells context_idx: level l's part is the encoder's
        output on level l's image, computed from those cells alone."""
        context_sizes = context_sizes or (context_idx.shape[1],)
        return torch.cat([self.encoder(self.level_image(images, level), keep=context_idx[:, part] -
                                       self.offsets[level]) for level, part in level_slices(context_sizes)], dim=1)

    def predict(self, images, context_idx, target_idx, context_sizes):
        """(B, M, sum Kt_l, D) predictions of every target cell."""
        B, M, Kt = target_idx.shape
        context = self.context(images, context_idx, context_sizes)  # (B, sum Kc_l, D)
        groups = target_idx if self.predict_per == "block" else target_idx.reshape(B, 1, M * Kt)
        return self.predictor(context, context_idx, groups).reshape(B, M, Kt, -1)

    def level_losses(self, images, context_idx, target_idx, context_sizes, target_sizes):
        """{level: loss_l} (tensors with their graphs) for the levels carrying targets."""
        target = self.targets(images, target_idx, target_sizes)  # (B, M, Kt, D)
        pred = self.predict(images, context_idx, target_idx, context_sizes)
        return {level: self.prediction_loss(pred[:, :, part], target[:, :, part])
                for level, part in level_slices(target_sizes)}

    def forward(self, images, context_idx, target_idx, context_sizes, target_sizes):
        """context_idx (B, sum Kc_l), target_idx (B, M, sum Kt_l) in pyramid index space, each level in a
        fixed-length slice (sizes per level; see masks.PyramidMasks). Returns the loss and a log dict."""
        losses = self.level_losses(images, context_idx, target_idx, context_sizes, target_sizes)
        loss = sum(self.level_weights[level] * level_loss for level, level_loss in losses.items())
        return loss, {"loss": loss.detach(), **{f"loss_l{level}": v.detach() for level, v in losses.items()}}


# ----------------------------------------------------------------------------------------------------
# Loading our own output folders (config.json + model.safetensors)


def read_run_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json: pass the --out folder of a training run")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a mapping of settings; the run folder is damaged")
    return config


def read_weights(folder):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no model.safetensors: the run has not finished an epoch yet")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); it is truncated or not a safetensors file") from None


def load_state_strict(module, state, what):
    """load_state_dict with one readable error listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{name} {keys[:8]}{' ...' if len(keys) > 8 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if keys]
        raise ValueError(f"weights do not match the {what} architecture: " + "; ".join(parts))
    module.load_state_dict(state)
    return module


def split_state(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def encoder_config_of(run_config):
    return config_from_dict(ViTConfig, run_config.get("encoder"))


def check_checkpoint_path(path, config):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass a run folder or an official .pth.tar checkpoint")
    if config is not None and not is_official_checkpoint(path):
        raise ValueError(f"a config ({config}) is only for official .pth.tar checkpoints; {path} is a run folder, "
                         "whose config.json describes it")


def load_encoder(path, which="target", config=None):
    """An encoder (eval mode) from one of our output folders, or from an official I-JEPA checkpoint file
    (`config`: its yaml, by default the one beside it). `which`: "target" (the EMA encoder, which the paper
    evaluates) or "context"."""
    if which not in ("target", "context"):
        raise ValueError(f"which must be 'target' or 'context', got {which!r}")
    check_checkpoint_path(path, config)
    if is_official_checkpoint(path):
        return load_official_encoder(path, which, config)
    encoder = VisionTransformer(encoder_config_of(read_run_config(path)))
    prefix = "target_encoder." if which == "target" else "encoder."
    return load_state_strict(encoder, split_state(read_weights(path), prefix), "encoder").eval()


def load_predictor(path, config=None):
    """The predictor (eval mode) from one of our output folders or an official I-JEPA checkpoint file."""
    check_checkpoint_path(path, config)
    if is_official_checkpoint(path):
        return load_official_predictor(path, config)
    predictor = Predictor(config_from_dict(PredictorConfig, read_run_config(path).get("predictor")))
    return load_state_strict(predictor, split_state(read_weights(path), "predictor."), "predictor").eval()


# ----------------------------------------------------------------------------------------------------
# Official I-JEPA checkpoints (facebookresearch/ijepa)
#
# A released file (e.g. IN1K-vit.h.14-300e.pth.tar) is a torch.save'd dict: "encoder", "predictor" and
# "target_encoder" state dicts saved under DistributedDataParallel (every key starts with "module."), plus
# training state ("opt", "scaler", "epoch", "loss", "batch_size", "world_size", "lr"). The architecture is
# in the run's yaml (meta.model_name, mask.patch_size, data.crop_size, meta.pred_depth, meta.pred_emb_dim).
# Parameter and buffer names equal ours, so loading is: read without unpickling code, strip the prefix,
# rebuild the configs from the yaml, load strictly.

OFFICIAL_PREFIX = "module."
OFFICIAL_ENCODER_KEYS = {"target": "target_encoder", "context": "encoder"}
OFFICIAL_PREDICTOR_MLP_RATIO = 4.0  # fixed in the official vit_predictor
OFFICIAL_LAYER_NORM_EPS = 1e-6
# Our addition under the yaml's `meta`, written only for shapes the official keys cannot name (a depth or
# head count other than the preset's); Meta's code reads keys by name and ignores it.
ARCHITECTURE_OVERRIDES = ("depth", "num_heads", "mlp_ratio", "pred_num_heads", "pred_mlp_ratio")
CHECKPOINT_SUFFIXES = (".pth.tar", ".pth", ".pt", ".tar")


def is_official_checkpoint(path):
    """Official checkpoints are single files; our runs are folders."""
    return os.path.isfile(path)


def official_yaml_beside(path):
    """The yaml of an official checkpoint when none is given: FILE.yaml beside FILE.pth.tar (what
    export_official writes), else the only .yaml/.yml file in the same folder."""
    stem = checkpoint_stem(path)
    for candidate in (stem + ".yaml", stem + ".yml"):
        if os.path.isfile(candidate):
            return candidate
    folder = os.path.dirname(os.path.abspath(path))
    found = sorted(f for f in os.listdir(folder) if f.endswith((".yaml", ".yml")))
    if len(found) == 1:
        return os.path.join(folder, found[0])
    problem = f"several yaml files beside it ({', '.join(found)})" if found else "no yaml beside it"
    raise ValueError(f"{path} is an official checkpoint with {problem}: pass its run's yaml "
                     "(config=..., --backbone-config), e.g. configs/in1k_vith14_ep300.yaml from facebookresearch/ijepa")


def import_yaml():
    try:
        import yaml
    except ImportError:
        raise ValueError("official I-JEPA yaml files need PyYAML: pip install pyyaml") from None
    return yaml


def read_official_yaml(path):
    yaml = import_yaml()
    try:
        with open(path) as f:
            settings = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path} ({e.strerror}); check the config path") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("meta"), dict):
        raise ValueError(f"{path} is not an official I-JEPA yaml: it has no `meta:` section with model_name")
    return settings


def official_configs(settings, source="the yaml"):
    """(ViTConfig, PredictorConfig) from official yaml settings, with the official init_model's defaults.
    The predictor has the encoder's head count and an MLP ratio of 4, as in the official code."""
    section = lambda name: settings.get(name) or {}
    name = section("meta").get("model_name")
    preset = str(name).removeprefix("vit_")
    if preset not in VIT_PRESETS:
        raise ValueError(f"{source}: meta.model_name {name!r} is not an official model; use one of "
                         f"{', '.join('vit_' + p for p in VIT_PRESETS)}")
    overrides = dict(section("meta").get("architecture") or {})
    unknown = sorted(set(overrides) - set(ARCHITECTURE_OVERRIDES))
    if unknown:
        raise ValueError(f"{source}: unknown meta.architecture keys {unknown}; known: {list(ARCHITECTURE_OVERRIDES)}")
    encoder = vit_config(preset, img_size=section("data").get("crop_size", 224),
                         patch_size=section("mask").get("patch_size", 16), depth=overrides.get("depth"),
                         num_heads=overrides.get("num_heads"), mlp_ratio=overrides.get("mlp_ratio"),
                         layer_norm_eps=OFFICIAL_LAYER_NORM_EPS)
    predictor = PredictorConfig(
        embed_dim=encoder.embed_dim, pred_dim=section("meta").get("pred_emb_dim", 384),
        depth=section("meta").get("pred_depth", 6), num_heads=overrides.get("pred_num_heads", encoder.num_heads),
        mlp_ratio=overrides.get("pred_mlp_ratio", OFFICIAL_PREDICTOR_MLP_RATIO), grid_size=encoder.grid_size,
        layer_norm_eps=OFFICIAL_LAYER_NORM_EPS)
    return encoder, predictor


def official_settings(encoder, predictor):
    """The inverse of official_configs: the yaml settings that rebuild these configs."""
    preset = next((p for p, (width, *_) in VIT_PRESETS.items() if width == encoder.embed_dim), None)
    problems = [text for bad, text in (
        (preset is None, f"width {encoder.embed_dim} is none of the official widths "
                         f"{[w for w, *_ in VIT_PRESETS.values()]}"),
        (encoder.patch_embed != "strided", "a conv patch stem"), (not encoder.qkv_bias, "no qkv bias"),
        (encoder.in_chans != 3, f"{encoder.in_chans} input channels"),
        (predictor.levels != 1, f"a {predictor.levels}-level PI-JEPA predictor"),
        ({encoder.layer_norm_eps, predictor.layer_norm_eps} != {OFFICIAL_LAYER_NORM_EPS},
         "a LayerNorm eps other than 1e-6")) if bad]
    if problems:
        raise ValueError(f"the official layout cannot hold this model ({'; '.join(problems)}); "
                         "export a strided-patch, single-level model of an official width")
    _, depth, heads, mlp_ratio = VIT_PRESETS[preset]
    architecture = {key: value for key, value, official in (
        ("depth", encoder.depth, depth), ("num_heads", encoder.num_heads, heads),
        ("mlp_ratio", encoder.mlp_ratio, mlp_ratio), ("pred_num_heads", predictor.num_heads, encoder.num_heads),
        ("pred_mlp_ratio", predictor.mlp_ratio, OFFICIAL_PREDICTOR_MLP_RATIO)) if value != official}
    meta = {"model_name": "vit_" + preset, "pred_depth": predictor.depth, "pred_emb_dim": predictor.pred_dim}
    if architecture:
        meta["architecture"] = architecture
    return {"meta": meta, "mask": {"patch_size": encoder.patch_size}, "data": {"crop_size": encoder.img_size}}


def read_official_checkpoint(path):
    """The checkpoint dict, read with weights_only=True: tensors and plain containers only, so a file that
    would run code when unpickled is refused, never executed. Zip-format files are memory-mapped."""
    import pickle
    import zipfile

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = str(e).partition("WeightsUnpickler error: ")[2].split(". ")[0] or str(e).splitlines()[0]
        raise ValueError(f"refusing to load {path}: it holds pickled objects that are not weights and could run "
                         f"code ({reason}); use a checkpoint from the official release or export_official") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is unreadable ({str(e).splitlines()[0]}); it is truncated or not a torch "
                         "checkpoint") from None
    if not isinstance(checkpoint, dict) or not set(OFFICIAL_ENCODER_KEYS.values()) & set(checkpoint):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not an official I-JEPA checkpoint: expected 'encoder', 'predictor' and "
                         f"'target_encoder' state dicts, found {found}")
    return checkpoint


def official_state(checkpoint, key, path):
    """One state dict of an official checkpoint, with the DistributedDataParallel prefix removed."""
    if not isinstance(checkpoint.get(key), dict):
        raise ValueError(f"{path} has no {key!r} weights (it has {sorted(checkpoint)}); "
                         "choose another encoder (which=..., --backbone-encoder)")
    return {k.removeprefix(OFFICIAL_PREFIX): v for k, v in checkpoint[key].items()}


def official_setup(path, config):
    """(encoder config, predictor config, a name for messages) of an official checkpoint."""
    config = config or official_yaml_beside(path)
    encoder_cfg, predictor_cfg = official_configs(read_official_yaml(config), config)
    return encoder_cfg, predictor_cfg, f"official {os.path.basename(path)} (architecture from {config})"


def load_official_encoder(path, which="target", config=None):
    encoder_cfg, _, name = official_setup(path, config)
    state = official_state(read_official_checkpoint(path), OFFICIAL_ENCODER_KEYS[which], path)
    return load_state_strict(VisionTransformer(encoder_cfg), state, f"{name} encoder").eval()


def load_official_predictor(path, config=None):
    _, predictor_cfg, name = official_setup(path, config)
    state = official_state(read_official_checkpoint(path), "predictor", path)
    return load_state_strict(Predictor(predictor_cfg), state, f"{name} predictor").eval()


def last_metrics(folder):
    """The last record of a run's metrics.jsonl ({} when there is none)."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:  # a line cut by a crash
        return {}


def export_official(folder, path):
    """Write one of our runs as an official I-JEPA checkpoint at `path` (e.g. out.pth.tar) and its yaml
    beside it (out.yaml); returns the yaml's path. Weights and run facts only: the optimiser state stays in
    the run's checkpoints/ ("opt" and "scaler" are None: Meta's training code loads the weights, logs that it
    cannot load the optimiser, and starts it afresh)."""
    yaml = import_yaml()
    config = read_run_config(folder)
    if "encoder" not in config or "predictor" not in config:
        raise ValueError(f"{folder} is not an I-JEPA run (its config.json has no encoder and predictor); export "
                         "the --out folder of train_ijepa.py")
    encoder_cfg = encoder_config_of(config)
    settings = official_settings(encoder_cfg, config_from_dict(PredictorConfig, config["predictor"]))
    weights = read_weights(folder)
    checkpoint = {key: {OFFICIAL_PREFIX + k: v for k, v in split_state(weights, key + ".").items()}
                  for key in ("encoder", "predictor", "target_encoder")}
    last = last_metrics(folder)
    checkpoint.update(opt=None, scaler=None, epoch=int(last.get("epoch", 0)), loss=last.get("loss"),
                      batch_size=config.get("args", {}).get("batch_size"), world_size=config.get("world_size", 1),
                      lr=last.get("lr"))
    yaml_path = checkpoint_stem(path) + ".yaml"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_file(path, lambda f: torch.save(checkpoint, f))
    replace_file(yaml_path, lambda f: f.write(yaml.safe_dump(settings).encode()))
    return yaml_path


def checkpoint_stem(path):
    """FILE for FILE.pth.tar (or .pth, .pt, .tar)."""
    return next((path[: -len(s)] for s in CHECKPOINT_SUFFIXES if path.endswith(s)), path)


def replace_file(path, write):
    """write(binary file) into a temporary file, then rename it over path: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------
# Hierarchical head (train_hierarchical_predictor.py): a small head on a frozen backbone's features from
# several depths. Each depth's tokens are mean-pooled (or kept per token), the depths are combined by a
# learned weighted sum or by concatenation and a projection, then the study's head maps
# x -> x + Linear(GELU(Linear(x))) -> LayerNorm -> Linear.

HEAD_AGGREGATIONS = ("weighted-sum", "concat")


@dataclass
class HeadConfig:
    embed_dim: int = 192  # the backbone's width D: the head maps (..., L, D) -> (..., D)
    layers: tuple = (-1, -4, -8)  # backbone blocks read (negative counts from the end)
    aggregation: str = "weighted-sum"
    hidden: int = 512

    def __post_init__(self):
        self.layers = tuple(self.layers)  # a list when read back from config.json
        if not self.layers:
            raise ValueError("the head needs at least one backbone layer (--layers)")
        if self.aggregation not in HEAD_AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; use one of {', '.join(HEAD_AGGREGATIONS)}")


class HierarchicalHead(nn.Module):
    """(..., L, D) backbone features -> (..., D). Each layer's features are first standardised with fixed
    per-dimension statistics of the training images (`set_input_statistics`): mean-pooled ViT features
    share one dominant direction (mean cosine between two images' last-layer features: 0.84 for a small
    Tiny-ImageNet backbone, 0.99 on digits), which leaves a cosine objective little to learn from."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        D, L = cfg.embed_dim, len(cfg.layers)
        self.register_buffer("input_mean", torch.zeros(L, D))
        self.register_buffer("input_std", torch.ones(L, D))
        if cfg.aggregation == "weighted-sum":
            self.layer_logits = nn.Parameter(torch.zeros(L))  # softmax weights, uniform at the start
        else:
            self.layer_proj = nn.Linear(L * D, D)
        self.fc1 = nn.Linear(D, cfg.hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.hidden, D)
        self.norm = nn.LayerNorm(D)
        self.out = nn.Linear(D, D)
        init_transformer_weights(self, blocks=[])

    @torch.no_grad()
    def set_input_statistics(self, features):
        """Measure the standardisation from (N, L, D) pooled features of training images."""
        self.input_mean.copy_(features.mean(0))
        self.input_std.copy_(features.std(0).clamp_min(1e-6))

    def aggregate(self, features):
        """(..., L, D) features of L backbone depths -> (..., D)."""
        features = (features - self.input_mean.to(features.dtype)) / self.input_std.to(features.dtype)
        if self.cfg.aggregation == "weighted-sum":
            return torch.einsum("...ld,l->...d", features, self.layer_logits.softmax(0).to(features.dtype))
        return self.layer_proj(features.flatten(-2))

    def forward(self, features):
        x = self.aggregate(features)
        x = x + self.fc2(self.act(self.fc1(x)))
        return self.out(self.norm(x))


def layer_features(backbone, images, layers, keep=None):
    """(B, K, L, D): the backbone's tokens after each block in `layers` (through its final LayerNorm)."""
    return torch.stack(backbone.forward_intermediates(images, layers, keep=keep), dim=2)


def pooled_layer_features(backbone, images, layers):
    """(B, L, D): each layer's tokens mean-pooled over the image."""
    return torch.stack([t.mean(1) for t in backbone.forward_intermediates(images, layers)], dim=1)


class HeadFeatures(nn.Module):
    """Normalised images (B, 3, H, W) -> head features (B, D), through the frozen backbone and the head.
    `backbone_features` gives the backbone's own mean-pooled last-layer features, for comparison."""

    def __init__(self, backbone, head, image_size):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = head
        self.image_size = image_size

    def forward(self, images):
        return self.head(pooled_layer_features(self.backbone, images, self.head.cfg.layers))

    def backbone_features(self, images):
        return self.backbone(images).mean(1)


def resolve_pointer(folder, absolute, relative):
    """A file a head run points to: at its absolute path, or at the same place relative to the run when
    the run and the file moved together."""
    for candidate in (absolute, os.path.join(folder, relative)):
        if os.path.exists(candidate):
            return os.path.normpath(candidate)
    raise FileNotFoundError(f"{folder} points to {absolute}, which is missing; put it back or retrain the head "
                            "with --backbone")


def load_hierarchical_head(folder):
    """HeadFeatures (eval mode) from a train_hierarchical_predictor.py output folder: its head weights
    (`head.*` in model.safetensors, the online head) on the backbone its config.json points to."""
    config = read_run_config(folder)
    if "head" not in config or "backbone" not in config:
        raise ValueError(f"{folder} is not a hierarchical-head run (config.json has no 'head'); pass a folder "
                         "written by train_hierarchical_predictor.py")
    head = HierarchicalHead(config_from_dict(HeadConfig, config["head"]))
    pointer, image_size = config["backbone"], config.get("image_size")
    keys = ("path", "relative_path", "config", "relative_config", "which")
    if not isinstance(pointer, dict) or any(key not in pointer for key in keys) or not isinstance(image_size, int):
        raise ValueError(f"{folder}/config.json is damaged: it needs 'image_size' and a 'backbone' with {keys}; "
                         "retrain the head with train_hierarchical_predictor.py")
    yaml_path = None
    if pointer["config"]:
        yaml_path = resolve_pointer(folder, pointer["config"], pointer["relative_config"])
    backbone = load_encoder(resolve_pointer(folder, pointer["path"], pointer["relative_path"]), pointer["which"],
                            yaml_path)
    load_state_strict(head, split_state(read_weights(folder), "head."), "head")
    return HeadFeatures(backbone, head, image_size).eval()


# ----------------------------------------------------------------------------------------------------
# Command line: python models.py export-official OUT_FOLDER FILE.pth.tar


def main(argv=None):
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="models.py", description="Model file utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export-official", help="write a run folder as an official I-JEPA checkpoint "
                                 "(FILE.pth.tar) with its yaml beside it (FILE.yaml)")
    export.add_argument("folder", help="a run folder (config.json + model.safetensors)")
    export.add_argument("file", help="the .pth.tar file to write")
    args = parser.parse_args(argv)
    try:
        yaml_path = export_official(args.folder, args.file)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.file} and {yaml_path}")


if __name__ == "__main__":
    main()

"""Models for I-JEPA and PI-JEPA: ViT encoder, narrow predictor, the I-JEPA and PI-JEPA objectives, the
hierarchical head, and one-call loaders.

Self-contained on purpose: the modules need torch and the standard library only, so this file (with
masks.py for the masks) can be copied alone into other research code; the loaders also need checkpoints.py,
which reads the files.

    enc = VisionTransformer(vit_config("tiny", img_size=32, patch_size=4))
    tokens = enc(images)                      # (B, N, D), N = (32 / 4) ** 2
    tokens = enc(images, keep=context_idx)    # (B, K, D): only the kept tokens are computed
    model = IJEPA(enc.cfg, PredictorConfig.for_encoder(enc.cfg))   # the predictor that fits the encoder
    loss, info = model(images, context_idx, target_idx)            # indices from masks.MultiBlockMaskSampler
    encoder = load_encoder("out/c10")         # a trained encoder from one of our output folders
    enc = ResNetEncoder(resnet_config(32, 4)) # a ResNet-18 whose final map is the same 8 x 8 token grid

Parameter names follow the official I-JEPA / timm layout (`patch_embed.proj`, `pos_embed`,
`blocks.{i}.attn.qkv`, `blocks.{i}.mlp.fc1`, `norm`, `predictor_embed`, `mask_token`, ...), so Meta's
released checkpoints load by name.
"""

import copy
import math
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

    @classmethod
    def for_encoder(cls, encoder: "ViTConfig", pred_dim=None, num_heads=None, **fields):
        """The predictor that fits `encoder`: its width and grid, I-JEPA's width min(384, D / 2) and the
        encoder's head count unless given; other fields (depth, levels, ...) as given or the defaults."""
        pred_dim = pred_dim or min(384, encoder.embed_dim // 2)
        # A ResNet has no head count to copy: heads of 64 channels, the ViT presets' head width.
        num_heads = num_heads or getattr(encoder, "num_heads", max(1, pred_dim // 64))
        return cls(embed_dim=encoder.embed_dim, grid_size=encoder.grid_size, pred_dim=pred_dim, num_heads=num_heads,
                   **fields)


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
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if x.is_cuda:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H), flash / memory-efficient kernels
        else:
            x = attention_math(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def attention_math(q, k, v):
    """softmax(q k^T / sqrt(d)) v as three plain ops, for the CPU. With the short sequences of JEPA
    training (<= 256 tokens) the attention matrix is small, and this is faster than the CPU's fused SDPA
    kernel, forward and backward (1.0-1.5x in fp32 on a 2-core Xeon, see README "Performance"); under bf16
    autocast both matmuls run in bf16 (AMX), where the fused kernel's backward ran at 60% of the step."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
    return attn.softmax(dim=-1) @ v


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
    `fix_init_weight`, and never overwritten afterwards (only a conv patch stem's convolutions are, by
    PatchEmbed.init_stem). The truncation bounds are +-2 in absolute value, as in the official and timm
    code: at std 0.02 that is a plain normal in practice."""
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

    def init_stem(self):
        """He (fan-in) init for the stem's convolutions, called after the ViT's init: the image then reaches
        `proj` at about its own scale, and the tokens at the strided embedding's. At the ViT's std 0.02 the
        stem shrinks the image ~150x below the strided embedding (~1e-3 against position embeddings of 0.5):
        the encoder sees little but positions, and I-JEPA collapses within 200 steps (RESULTS.md, study 1)."""
        for conv in self.stem.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)

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
        self.patch_embed.init_stem()

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
    loss are shared, so with one level the two objectives are the same computation.

    Optional terms (0: off), added to the prediction loss:
      vicreg_weight  VICReg's variance and covariance terms (vicreg_terms) of the context encoder's tokens
                     mean-pooled per image, weighted variance + VICREG_COVARIANCE_RATIO x covariance. On the
                     context encoder because that is where collapse starts (the target is its EMA, and a
                     predictor could spread its outputs while the encoder stays collapsed); per image
                     because that is what collapses (RankMe and the probe read pooled features) and an
                     image's tokens are not independent samples: their spread across positions could meet
                     a token-level variance target while the images share one direction.
      cycle_weight   cycle consistency: the predictor, given its own predictions at the target positions
                     as context, predicts the context patches back; the loss compares that with the target
                     encoder's tokens there (the space the predictor predicts into, no gradient).

    target_layers K > 1 makes the targets the mean of the target encoder's last K blocks' outputs (each through
    the final LayerNorm and layer-normed, then the mean layer-normed again), data2vec's targets; 1 is I-JEPA's."""

    def __init__(self, encoder_cfg: ViTConfig, predictor_cfg: PredictorConfig, loss="smooth_l1",
                 vicreg_weight=0.0, cycle_weight=0.0, target_layers=1):
        super().__init__()
        if loss not in ("smooth_l1", "mse"):
            raise ValueError(f"unknown loss {loss!r}; use 'smooth_l1' or 'mse'")
        if (predictor_cfg.embed_dim, predictor_cfg.grid_size) != (encoder_cfg.embed_dim, encoder_cfg.grid_size):
            raise ValueError(f"the predictor (embed_dim {predictor_cfg.embed_dim}, grid {predictor_cfg.grid_size}) does "
                             f"not fit the encoder (embed_dim {encoder_cfg.embed_dim}, grid {encoder_cfg.grid_size}); "
                             "build it with PredictorConfig.for_encoder(encoder_cfg)")
        if not (vicreg_weight >= 0 and cycle_weight >= 0):
            raise ValueError(f"the VICReg and cycle weights must be >= 0, got {vicreg_weight} and {cycle_weight}")
        blocks = getattr(encoder_cfg, "depth", 1)  # a ResNet gives its last stage only
        if not 1 <= target_layers <= blocks:
            raise ValueError(f"--target-layers {target_layers}: the encoder has {blocks} block(s) to average; "
                             f"use 1 to {blocks}")
        self.loss_name = loss
        self.vicreg_weight, self.cycle_weight, self.target_layers = vicreg_weight, cycle_weight, target_layers
        self.encoder = make_encoder(encoder_cfg)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = make_predictor(predictor_cfg)

    @torch.no_grad()
    def target_tokens(self, images):
        """Layer-normed (no affine) target-encoder tokens of the whole image (B, N, D), no gradient: the last
        block's, or the mean of the last target_layers blocks' (see the class docstring)."""
        if self.target_layers == 1:
            h = self.target_encoder(images)
            return F.layer_norm(h, h.shape[-1:])
        layers = self.target_encoder.forward_intermediates(images, range(-self.target_layers, 0))
        h = torch.stack([F.layer_norm(h, h.shape[-1:]) for h in layers]).mean(0)
        return F.layer_norm(h, h.shape[-1:])

    def targets(self, images, target_idx):
        """Target tokens at target_idx: (B, M, Kt, D), no gradient."""
        return gather_tokens(self.target_tokens(images), target_idx)

    def context(self, images, context_idx):
        """Context tokens (B, Kc, D) at pyramid cells context_idx; the encoder sees only those patches."""
        return self.encoder(images, keep=context_idx)

    def prediction_loss(self, pred, target):
        loss = F.smooth_l1_loss if self.loss_name == "smooth_l1" else F.mse_loss
        return loss(pred.float(), target.float())

    def forward(self, images, context_idx, target_idx):
        """Returns the scalar loss and a dict of detached tensors to log."""
        B, M, Kt = target_idx.shape
        if self.cycle_weight:  # one target-encoder pass gives the targets and the cycle's context targets
            both = self.targets(images, torch.cat([target_idx.reshape(B, M * Kt), context_idx], dim=1))
            target, context_target = both[:, :M * Kt].reshape(B, M, Kt, -1), both[:, M * Kt:]  # (B, Kc, D)
        else:
            target = self.targets(images, target_idx)  # (B, M, Kt, D)
        context = self.context(images, context_idx)  # (B, Kc, D)
        pred = self.predictor(context, context_idx, target_idx)  # (B, M, Kt, D)
        prediction = self.prediction_loss(pred, target)
        loss, info = prediction, {"loss_prediction": prediction.detach()}
        if self.vicreg_weight:
            vicreg, vicreg_info = self.vicreg(context)
            loss = loss + vicreg
            info.update(vicreg_info)
        if self.cycle_weight:  # the M*Kt predictions as the context, the context patches as one target group
            back = self.predictor(pred.reshape(B, M * Kt, -1), target_idx.reshape(B, M * Kt), context_idx[:, None])
            cycle = self.prediction_loss(back[:, 0], context_target)  # (B, Kc, D) both
            loss = loss + self.cycle_weight * cycle
            info["loss_cycle"] = cycle.detach()
        return loss, {"loss": loss.detach(), **info}

    def vicreg(self, context):
        """vicreg_weight x VICReg's terms of the context tokens (B, Kc, D) mean-pooled per image, and their
        log entries."""
        variance, covariance = vicreg_terms(context.mean(1))  # (B, D)
        return (self.vicreg_weight * (variance + VICREG_COVARIANCE_RATIO * covariance),
                {"vicreg_variance": variance.detach(), "vicreg_covariance": covariance.detach()})

    @torch.no_grad()
    def update_target(self, momentum):
        """target <- momentum * target + (1 - momentum) * online, as one foreach operation."""
        online = list(self.encoder.parameters())
        target = list(self.target_encoder.parameters())
        torch._foreach_lerp_(target, online, 1.0 - momentum)

    def flops_per_image(self, context_idx, target_idx, context_sizes=None, target_sizes=None):
        """Matmul FLOPs of one training step per image, at the lengths of a batch of masks (the forward's
        index arguments; only their shapes are read). The count MFU divides by:

            F(L, D, H) = 8 L D^2 + 4 L D H + 4 L^2 D          one block's forward on a sequence of L tokens
            target     = E + d F(N, D, H)                     target encoder, forward only, all N patches
            context    = E + d F(Kc_0, D, H)                  context encoder on its Kc_0 patches
            predictor  = 2 Kc D P + M dp F(Kc + Kt, P, Hp) + 2 M Kt P D
            step       = target + 3 (context + predictor) - E1

        E is the patch embedding on all N patches (2 N C p^2 D when strided), E1 its first convolution (all
        of it when strided); d, D, H the encoder's depth, width and MLP width, dp, P, Hp the predictor's; M
        target blocks of Kt cells; Kc context tokens, of which the encoder sees the Kc_0 fine patches (all
        of them for I-JEPA; PyramidIJEPA adds its coarse levels' passes). A backward pass costs
        twice its forward (input and weight gradients), except the images' gradient, which is never
        computed (- E1). This equals torch's FlopCounterMode on a training step with the math attention
        kernel (flash attention's backward also recomputes the scores: not counted). Recomputation under
        grad checkpointing is not counted: MFU counts the model's FLOPs, not the GPU's."""
        enc, pred = self.encoder.cfg, self.predictor.cfg
        if not isinstance(enc, ViTConfig) or not isinstance(pred, PredictorConfig):
            return None  # the ResNet encoder and the MLP predictor: the formula does not describe them
        context_tokens = context_idx.shape[1]
        encoder_tokens = context_tokens if context_sizes is None else context_sizes[0]
        _, num_targets, target_tokens = target_idx.shape
        convs = conv_flops(self.encoder.patch_embed, enc.img_size)
        embed = sum(convs)
        mlp = int(enc.embed_dim * enc.mlp_ratio)
        target = embed + enc.depth * block_flops(enc.grid_size**2, enc.embed_dim, mlp)
        context = embed + enc.depth * block_flops(encoder_tokens, enc.embed_dim, mlp)
        return target + 3 * (context + self.predictor_flops(context_tokens, num_targets, target_tokens)) - convs[0]

    def predictor_flops(self, context_tokens, num_targets, target_tokens):
        """The predictor's forward matmul FLOPs per image: M sequences of Kc context and Kt target tokens."""
        enc, pred = self.encoder.cfg, self.predictor.cfg
        pred_mlp = int(pred.pred_dim * pred.mlp_ratio)
        return (2 * context_tokens * enc.embed_dim * pred.pred_dim
                + num_targets * pred.depth * block_flops(context_tokens + target_tokens, pred.pred_dim, pred_mlp)
                + 2 * num_targets * target_tokens * pred.pred_dim * enc.embed_dim)


def block_flops(tokens, width, mlp_width):
    """Matmul FLOPs of one transformer block's forward on one sequence: qkv 6LD^2, attention scores and
    values 4L^2D, output projection 2LD^2, MLP 4LDH."""
    return 8 * tokens * width**2 + 4 * tokens * width * mlp_width + 4 * tokens**2 * width


def conv_flops(module, size):
    """Matmul FLOPs of each Conv2d layer in `module` (applied in order) on one size x size image, a list."""
    flops = []
    for conv in (m for m in module.modules() if isinstance(m, nn.Conv2d)):
        size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        flops.append(2 * size**2 * conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size))
    return flops


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
    Loss: sum over target levels of level_weights[l] * loss_l, each loss_l logged as "loss_l{l}", plus
    IJEPA's VICReg terms (vicreg_weight) on the context tokens of every level pooled together per image.
    """

    def __init__(self, encoder_cfg: ViTConfig, predictor_cfg: PredictorConfig, loss="smooth_l1",
                 level_weights=None, predict_per="block", coarse_targets="pooled", vicreg_weight=0.0,
                 target_layers=1):
        if not isinstance(predictor_cfg, PredictorConfig):
            raise ValueError("PI-JEPA needs the transformer predictor (it embeds pyramid levels), not "
                             f"{type(predictor_cfg).__name__}; drop --predictor mlp")
        super().__init__(encoder_cfg, predictor_cfg, loss, vicreg_weight=vicreg_weight, target_layers=target_layers)
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
            h = pyramid_pool(self.target_tokens(images), self.encoder.cfg.grid_size, self.levels)
            return gather_tokens(h, target_idx)
        parts = []
        for level, part in level_slices(target_sizes):
            h = self.target_tokens(self.level_image(images, level))  # (B, (G/2^l)^2, D)
            parts.append(gather_tokens(h, target_idx[..., part] - self.offsets[level]))
        return torch.cat(parts, dim=2)

    def context(self, images, context_idx, context_sizes=None):
        """(B, sum Kc_l, D) context tokens at pyramid cells context_idx: level l's part is the encoder's
        output on level l's image, computed from those cells alone."""
        context_sizes = context_sizes or (context_idx.shape[1],)
        return torch.cat([self.encoder(self.level_image(images, level), keep=context_idx[:, part] -
                                       self.offsets[level]) for level, part in level_slices(context_sizes)], dim=1)

    def predict(self, context, context_idx, target_idx):
        """(B, M, sum Kt_l, D) predictions of every target cell from the context tokens (B, sum Kc_l, D)."""
        B, M, Kt = target_idx.shape
        groups = target_idx if self.predict_per == "block" else target_idx.reshape(B, 1, M * Kt)
        return self.predictor(context, context_idx, groups).reshape(B, M, Kt, -1)

    def level_losses(self, pred, target, target_sizes):
        """{level: loss_l} for the levels carrying targets (pred and target: (B, M, sum Kt_l, D))."""
        return {level: self.prediction_loss(pred[:, :, part], target[:, :, part])
                for level, part in level_slices(target_sizes)}

    def flops_per_image(self, context_idx, target_idx, context_sizes=None, target_sizes=None):
        """IJEPA.flops_per_image for the pyramid: the context encoder once per level on that level's Kc_l
        cells (its patch embedding on the whole level image, whose input gradient is never computed); the
        target encoder on the fine image (pooled coarse targets) or on each target level's image (encoded);
        the predictor on every level's context and target cells (one sequence per sample with
        predict_per="sample")."""
        enc = self.encoder.cfg
        context_sizes = context_sizes or (context_idx.shape[1],)
        target_sizes = target_sizes or (target_idx.shape[-1],)
        mlp = int(enc.embed_dim * enc.mlp_ratio)

        def encoder_pass(level, tokens):  # forward FLOPs, and those of the first convolution
            convs = conv_flops(self.encoder.patch_embed, enc.img_size // 2**level)
            return sum(convs) + enc.depth * block_flops(tokens, enc.embed_dim, mlp), convs[0]

        target_levels = [0] if self.coarse_targets == "pooled" else [level for level, _ in level_slices(target_sizes)]
        target = sum(encoder_pass(level, (enc.grid_size // 2**level) ** 2)[0] for level in target_levels)
        context = 0
        for level, _ in level_slices(context_sizes):
            forward, first_conv = encoder_pass(level, context_sizes[level])
            context += 3 * forward - first_conv
        B, M, Kt = target_idx.shape
        groups, group_tokens = (M, Kt) if self.predict_per == "block" else (1, M * Kt)
        return target + context + 3 * self.predictor_flops(context_idx.shape[1], groups, group_tokens)

    def forward(self, images, context_idx, target_idx, context_sizes, target_sizes):
        """context_idx (B, sum Kc_l), target_idx (B, M, sum Kt_l) in pyramid index space, each level in a
        fixed-length slice (sizes per level; see masks.PyramidMasks). Returns the loss and a log dict."""
        target = self.targets(images, target_idx, target_sizes)  # (B, M, Kt, D)
        context = self.context(images, context_idx, context_sizes)  # (B, sum Kc_l, D)
        losses = self.level_losses(self.predict(context, context_idx, target_idx), target, target_sizes)
        loss = sum(self.level_weights[level] * level_loss for level, level_loss in losses.items())
        info = {f"loss_l{level}": v.detach() for level, v in losses.items()}
        if self.vicreg_weight:  # on every level's context tokens pooled together: IJEPA's term at L = 1
            vicreg, vicreg_info = self.vicreg(context)
            loss = loss + vicreg
            info.update(vicreg_info)
        return loss, {"loss": loss.detach(), **info}

# ----------------------------------------------------------------------------------------------------
# Alternatives to the ViT recipe: a ResNet encoder, an MLP predictor, the VICReg terms
#
# Each is chosen by one flag of train_ijepa.py (--encoder resnet, --predictor mlp, --vicreg-weight) and
# keeps the interface of what it replaces: ResNetEncoder(images, keep) -> (B, K, D) tokens on the ViT's
# G x G patch grid, MLPPredictor(context, context_idx, target_idx) -> (B, M, Kt, D). Their configs carry a
# `kind` field, so config.json tells load_encoder / load_predictor which class to rebuild.


@dataclass
class ResNetConfig:
    kind: str = "resnet"  # what config.json readers dispatch on (ViTConfig has no kind: the default)
    img_size: int = 32
    patch_size: int = 4  # the network's total stride: its last feature map is the (img / patch)^2 token grid
    in_chans: int = 3
    layers: tuple = (2, 2, 2, 2)  # BasicBlocks per stage: ResNet-18; (3, 4, 6, 3) is ResNet-34
    width: int = 64  # the first stage's channels; stage s has width * 2^s, the tokens width * 2^(stages-1)
    stem: str = "cifar"  # "cifar": one 3x3 stride-1 conv; "imagenet": torchvision's 7x7 stride 2 + 3x3 max pool
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        self.layers = tuple(self.layers)  # a list when read back from config.json
        if self.kind != "resnet":
            raise ValueError(f"ResNetConfig.kind must be 'resnet', got {self.kind!r}")
        if self.stem not in RESNET_STEM_STRIDE:
            raise ValueError(f"unknown ResNet stem {self.stem!r}; use one of {', '.join(RESNET_STEM_STRIDE)}")
        if not self.layers or any(not isinstance(n, int) or n < 1 for n in self.layers):
            raise ValueError(f"ResNet layers must be positive block counts per stage, got {self.layers}")
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}; "
                             "choose an image size that is a multiple of the patch size")
        resnet_stage_strides(self)  # refuses a patch size the stem and stages cannot reach

    @property
    def grid_size(self):
        return self.img_size // self.patch_size

    @property
    def embed_dim(self):
        return self.width * 2 ** (len(self.layers) - 1)

    @property
    def depth(self):
        return len(self.layers)


RESNET_STEM_STRIDE = {"cifar": 1, "imagenet": 4}


def resnet_config(img_size, patch_size, stem=None, **overrides):
    """A ResNet-18 config whose token grid is the ViT's: the CIFAR stem up to 32 px, torchvision's above."""
    stem = stem or ("cifar" if img_size <= 32 else "imagenet")
    return ResNetConfig(img_size=img_size, patch_size=patch_size, stem=stem,
                        **{k: v for k, v in overrides.items() if v is not None})


def resnet_stage_strides(cfg):
    """(stride, dilation) of each stage so that stem stride x stage strides = patch_size. As in torchvision,
    stage 0 keeps the resolution and each later stage halves it, until the patch size is reached; the
    remaining stages keep the resolution and dilate their convolutions instead (torchvision's
    replace_stride_with_dilation), so their receptive fields still grow."""
    stride = RESNET_STEM_STRIDE[cfg.stem]
    halvings = math.log2(cfg.patch_size / stride) if cfg.patch_size >= stride else -1
    if halvings != int(halvings) or not 0 <= halvings <= len(cfg.layers) - 1:
        reachable = [stride * 2**k for k in range(len(cfg.layers))]
        raise ValueError(f"a ResNet with the {cfg.stem} stem reaches patch sizes {reachable}, not {cfg.patch_size}; "
                         f"choose one of those --patch-size values (or the other --resnet-stem)")
    plan, dilation = [(1, 1)], 1
    for stage in range(1, len(cfg.layers)):
        if stage <= halvings:
            plan.append((2, dilation))
        else:
            dilation *= 2
            plan.append((1, dilation))
    return plan


def group_norm(channels, eps):
    """GroupNorm with 32 groups (Wu & He 2018), fewer when the channels do not divide into 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (same parameter names), with GroupNorm and optional dilation."""

    def __init__(self, inplanes, planes, stride, dilation, eps, first_dilation=None):
        super().__init__()
        first = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=first, dilation=first, bias=False)
        self.bn1 = group_norm(planes, eps)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = group_norm(planes, eps)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), group_norm(planes, eps))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNetEncoder(nn.Module):
    """A ResNet whose last feature map is the token grid of the ViT with the same image and patch size.

    Parameter names are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer4.1.downsample.0`); the
    `bn*` modules hold GroupNorm. With the imagenet stem and patch 32 it is torchvision's resnet18 up to
    layer4 (tests/test_resnet.py checks this with the same weights); smaller patch sizes dilate the last
    stages instead of striding, so the final map has G x G cells, and a LayerNorm over the channels (`norm`,
    like the ViT's final norm) makes each cell a token: (B, G*G, embed_dim). Token (r, c) is output cell
    (r, c); as in any torchvision ResNet, its receptive field is centred up to half a patch above and left
    of the patch centre (3x3 stride-2 convolutions with padding 1), and GroupNorm's per-image statistics
    let every token depend a little on the whole visible image.

    Masking (`keep`): a convolution cannot skip patches, so every pixel of a patch not in `keep` is set to 0
    (the dataset mean after normalisation) before the network runs, and the tokens at `keep` are returned.
    A kept token's receptive field covers neighbouring hidden patches, but it reads zeros there whatever
    the hidden pixels are: the context never sees a hidden patch. The price is that the context costs a
    full-image forward (no token dropping, unlike the ViT).

    Why GroupNorm and not BatchNorm: BatchNorm in training mode normalises each sample with statistics of
    the whole batch, so one image's context features would depend on the other images (a channel for
    information between samples, and the masked context and full-image target would be normalised with
    different statistics); its running statistics are buffers, which the EMA target (a parameter lerp)
    would never update; and eval-mode BatchNorm at training time normalises with statistics nothing
    estimates. GroupNorm normalises each sample on its own, identically in training and evaluation.
    """

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        eps = cfg.layer_norm_eps
        if cfg.stem == "cifar":
            self.conv1 = nn.Conv2d(cfg.in_chans, cfg.width, 3, 1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(cfg.in_chans, cfg.width, 7, 2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.bn1 = group_norm(cfg.width, eps)
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes, dilation = [], cfg.width, 1
        for index, (blocks, (stride, new_dilation)) in enumerate(zip(cfg.layers, resnet_stage_strides(cfg))):
            planes = cfg.width * 2**index
            layer = [BasicBlock(inplanes, planes, stride, new_dilation, eps, first_dilation=dilation)]
            layer += [BasicBlock(planes, planes, 1, new_dilation, eps) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
            self.add_module(f"layer{index + 1}", stages[-1])  # torchvision's names: layer1 ... layer4
            inplanes, dilation = planes, new_dilation
        self.stages = stages  # a plain list: the modules are registered once, under their layerN names
        self.norm = nn.LayerNorm(self.embed_dim, eps=eps)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self):
        """torchvision's default init: Kaiming-normal fan-out convolutions, unit-weight zero-bias norms."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def blocks(self):
        """The stages, for code that counts an encoder's depth (len(encoder.blocks))."""
        return self.stages

    def hide(self, images, keep):
        """images (B, C, H, W) with every pixel of the patches not in keep (B, K) set to 0."""
        B, _, H, W = images.shape
        p = self.cfg.patch_size
        visible = torch.zeros(B, (H // p) * (W // p), dtype=torch.bool, device=images.device)
        visible.scatter_(1, keep, True)
        visible = visible.reshape(B, 1, H // p, W // p).repeat_interleave(p, 2).repeat_interleave(p, 3)
        return torch.where(visible, images, torch.zeros((), dtype=images.dtype, device=images.device))

    def forward_map(self, images):
        """(B, C, H, W) -> (B, embed_dim, H / patch, W / patch), before the token LayerNorm."""
        p = self.cfg.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {p}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return run_blocks(self.stages, x, self.grad_checkpointing)

    def forward(self, images, keep=None):
        """(B, N, D) tokens of the whole image, or (B, K, D) at keep (B, K) with every other patch hidden."""
        if keep is not None:
            images = self.hide(images, keep)
        x = self.norm(self.forward_map(images).flatten(2).transpose(1, 2))  # (B, N, D)
        return x if keep is None else gather_tokens(x, keep)

    def forward_intermediates(self, images, indices, keep=None, norm=True):
        """Only the last stage's tokens (index -1): the earlier stages have other widths and grids."""
        depth = len(self.stages)
        if any(i % depth != depth - 1 or not -depth <= i < depth for i in indices):
            raise ValueError(f"a ResNet encoder gives only its last stage's tokens (index -1), not {list(indices)}; "
                             "use a ViT for multi-layer features (--pool last4, hierarchical heads)")
        if not norm:
            raise ValueError("a ResNet encoder's tokens are its final map through `norm`; pass norm=True")
        return [self(images, keep) for _ in indices]


@dataclass
class MLPPredictorConfig:
    kind: str = "mlp"  # what config.json readers dispatch on (PredictorConfig has no kind: the default)
    embed_dim: int = 192  # the encoder's width: what the predictor reads and predicts
    pred_dim: int = 96
    depth: int = 6  # residual MLP blocks
    mlp_ratio: float = 4.0
    grid_size: int = 8
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.kind != "mlp":
            raise ValueError(f"MLPPredictorConfig.kind must be 'mlp', got {self.kind!r}")

    @classmethod
    def for_encoder(cls, encoder, pred_dim=None, **fields):
        """The MLP predictor that fits `encoder` (its width and grid; width min(384, D / 2) unless given)."""
        return cls(embed_dim=encoder.embed_dim, grid_size=encoder.grid_size,
                   pred_dim=pred_dim or min(384, encoder.embed_dim // 2), **fields)


class ResidualMLP(nn.Module):
    def __init__(self, dim, hidden, eps):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class MLPPredictor(nn.Module):
    """A cheap baseline for the transformer predictor: each target token is predicted on its own from the
    pooled context and its position, with no attention.

        pooled = mean_k (predictor_embed(context_k) + pos(context_idx_k))    (B, P)
        x      = pooled + pos(target)                                          (B, M, Kt, P)
        pred   = predictor_proj(predictor_norm(residual MLP blocks(x)))        (B, M, Kt, D)

    pos is the fixed sine-cosine embedding of the patch grid (as in Predictor), so the pooled context still
    knows which patches it saw. Same call as Predictor: (context, context_idx, target_idx)."""

    def __init__(self, cfg: MLPPredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.predictor_embed = nn.Linear(cfg.embed_dim, cfg.pred_dim)
        self.register_buffer("predictor_pos_embed", sincos_grid_embed(cfg.pred_dim, cfg.grid_size)[None])
        self.predictor_blocks = nn.ModuleList(ResidualMLP(cfg.pred_dim, int(cfg.pred_dim * cfg.mlp_ratio),
                                                          cfg.layer_norm_eps) for _ in range(cfg.depth))
        self.predictor_norm = nn.LayerNorm(cfg.pred_dim, eps=cfg.layer_norm_eps)
        self.predictor_proj = nn.Linear(cfg.pred_dim, cfg.embed_dim)
        self.grad_checkpointing = False
        init_transformer_weights(self, blocks=[])
        with torch.no_grad():  # the same depth rescaling of the residual outputs as the transformer's
            for layer_id, block in enumerate(self.predictor_blocks, start=1):
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def forward(self, context, context_idx, target_idx):
        """context (B, Kc, D) at patches context_idx (B, Kc); target_idx (B, M, Kt) -> (B, M, Kt, D)."""
        B, M, Kt = target_idx.shape
        table = self.predictor_pos_embed[0]
        pooled = (self.predictor_embed(context) + table[context_idx].to(context.dtype)).mean(1)  # (B, P)
        x = pooled[:, None] + table[target_idx.reshape(B, M * Kt)].to(pooled.dtype)  # (B, M*Kt, P)
        x = run_blocks(self.predictor_blocks, x, self.grad_checkpointing)
        return self.predictor_proj(self.predictor_norm(x)).reshape(B, M, Kt, -1)


def make_encoder(cfg):
    """The encoder a config describes: ResNetEncoder for a ResNetConfig, else the ViT."""
    if isinstance(cfg, ResNetConfig):
        return ResNetEncoder(cfg)
    return VisionTransformer(cfg)


def make_predictor(cfg):
    """The predictor a config describes: MLPPredictor for an MLPPredictorConfig, else the transformer."""
    if isinstance(cfg, MLPPredictorConfig):
        return MLPPredictor(cfg)
    return Predictor(cfg)


VICREG_COVARIANCE_RATIO = 1 / 25  # VICReg's covariance weight over its variance weight (nu = 1, mu = 25)


def vicreg_terms(features, eps=1e-4):
    """VICReg's variance and covariance terms (Bardes et al. 2022) of (N, D) features, computed in float32:

        variance   = mean_d max(0, 1 - sqrt(Var(x_d) + eps))      hinge on each dimension's std
        covariance = sum_{i != j} C_ij^2 / D                      C: the (D, D) covariance matrix

    Both are 0 for whitened features (unit variances, no correlations); collapsed features (one shared
    direction) make both positive."""
    N, D = features.shape
    if N < 2:
        raise ValueError(f"the VICReg terms need at least 2 samples to estimate a variance, got {N}")
    x = features.float()
    x = x - x.mean(0)
    variance = F.relu(1.0 - torch.sqrt(x.var(0) + eps)).mean()
    cov = x.T @ x / (N - 1)  # (D, D)
    covariance = (cov.square().sum() - cov.diagonal().square().sum()) / D
    return variance, covariance


# ----------------------------------------------------------------------------------------------------
# Loading: the one-call loaders (the file formats they read, official checkpoints and export: checkpoints.py)


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


def load_encoder(path, which="target", config=None):
    """An encoder (eval mode) from one of our output folders, or from an official I-JEPA checkpoint file
    (`config`: its yaml, by default the one beside it). `which`: "target" (the EMA encoder, which the paper
    evaluates) or "context"."""
    import checkpoints  # the file formats: our run folders, official checkpoints

    if which not in ("target", "context"):
        raise ValueError(f"which must be 'target' or 'context', got {which!r}")
    checkpoints.check_checkpoint_path(path, config)
    if checkpoints.is_official_checkpoint(path):
        return checkpoints.load_official_encoder(path, which, config)
    encoder = make_encoder(checkpoints.encoder_config_of(checkpoints.read_run_config(path)))
    prefix = "target_encoder." if which == "target" else "encoder."
    return load_state_strict(encoder, split_state(checkpoints.read_weights(path), prefix), "encoder").eval()


def load_predictor(path, config=None):
    """The predictor (eval mode) from one of our output folders or an official I-JEPA checkpoint file."""
    import checkpoints

    checkpoints.check_checkpoint_path(path, config)
    if checkpoints.is_official_checkpoint(path):
        return checkpoints.load_official_predictor(path, config)
    predictor = make_predictor(checkpoints.predictor_config_of(checkpoints.read_run_config(path)))
    return load_state_strict(predictor, split_state(checkpoints.read_weights(path), "predictor."), "predictor").eval()


# ----------------------------------------------------------------------------------------------------
# timm: our encoder is timm's VisionTransformer without a class token, parameter names included
# (checkpoints.export_timm writes a folder timm.create_model loads).

def timm_vit_kwargs(cfg: ViTConfig):
    """Keyword arguments of timm.models.vision_transformer.VisionTransformer for an encoder of this config:
    our state_dict loads into it with no missing or unexpected key, its forward_features equals our
    forward (B, N, D) and its pre-logits the mean of our tokens (global_pool="avg", no fc_norm, so the
    final LayerNorm is timm's `norm`). num_classes=0: no head; timm's reset_classifier(n) adds one."""
    problems = [text for bad, text in (
        (cfg.patch_embed != "strided", "a conv patch stem (timm's patch embedding is one strided convolution)"),
        (cfg.layer_norm_eps != 1e-6, f"LayerNorm eps {cfg.layer_norm_eps} (timm's ViT uses 1e-6)")) if bad]
    if problems:
        raise ValueError(f"timm's VisionTransformer cannot hold this encoder: {'; '.join(problems)}")
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                class_token=False, no_embed_class=True, global_pool="avg", fc_norm=False, num_classes=0)


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

    def aggregate(self, features, statistics=None):
        """(..., L, D) features of L backbone depths -> (..., D), each layer standardised with `statistics`
        (mean, std), each (L, D): by default those of mean-pooled features (set_input_statistics); per-token
        features have another scale (token_statistics) and need their own."""
        mean, std = statistics if statistics is not None else (self.input_mean, self.input_std)
        features = (features - mean.to(features.dtype)) / std.to(features.dtype)
        if self.cfg.aggregation == "weighted-sum":
            return torch.einsum("...ld,l->...d", features, self.layer_logits.softmax(0).to(features.dtype))
        return self.layer_proj(features.flatten(-2))

    def forward(self, features, statistics=None):
        x = self.aggregate(features, statistics)
        x = x + self.fc2(self.act(self.fc1(x)))
        return self.out(self.norm(x))


def layer_features(backbone, images, layers, keep=None):
    """(B, K, L, D): the backbone's tokens after each block in `layers` (through its final LayerNorm)."""
    return torch.stack(backbone.forward_intermediates(images, layers, keep=keep), dim=2)


def pooled_layer_features(backbone, images, layers):
    """(B, L, D): each layer's tokens mean-pooled over the image."""
    return torch.stack([t.mean(1) for t in backbone.forward_intermediates(images, layers)], dim=1)


@torch.no_grad()
def token_statistics(backbone, batches, layers):
    """(mean, std), each (L, D): per-dimension statistics over every token of the images in `batches` (an
    iterable of (B, 3, H, W) tensors) at each layer, accumulated in float64. Tokens spread far more than their image means (about 30x
    for an I-JEPA backbone), so the head standardises per-token inputs with these, not the pooled ones."""
    total = squares = 0.0
    count = 0
    for images in batches:
        tokens = layer_features(backbone, images, layers).flatten(0, 1).double()  # (B N, L, D)
        total, squares, count = total + tokens.sum(0), squares + tokens.square().sum(0), count + tokens.shape[0]
    mean = total / count
    variance = (squares - count * mean.square()).clamp_min(0) / max(count - 1, 1)
    return mean.float(), variance.sqrt().float().clamp_min(1e-6)


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


def load_hierarchical_head(folder):
    """HeadFeatures (eval mode) from a train_hierarchical_predictor.py output folder: its head weights
    (`head.*` in model.safetensors, the online head) on the backbone its config.json points to."""
    import checkpoints

    config = checkpoints.read_run_config(folder)
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
        yaml_path = checkpoints.resolve_pointer(folder, pointer["config"], pointer["relative_config"])
    backbone = load_encoder(checkpoints.resolve_pointer(folder, pointer["path"], pointer["relative_path"]),
                            pointer["which"], yaml_path)
    load_state_strict(head, split_state(checkpoints.read_weights(folder), "head."), "head")
    return HeadFeatures(backbone, head, image_size).eval()


if __name__ == "__main__":  # `python models.py export-official ...` still works; the command is checkpoints.py's
    import checkpoints

    checkpoints.main()

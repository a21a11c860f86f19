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
from dataclasses import asdict, dataclass, field, fields

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
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
    return cls(**values)


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
    `fix_init_weight`, and never overwritten afterwards."""
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

    The stem ("conv") halves the resolution log2(patch) times with 3x3 stride-2 convolutions and GELUs,
    then `proj` is a 1x1 convolution; it needs a power-of-two patch size."""

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
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GELU()]
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
# Loading our own output folders (config.json + model.safetensors)


def read_run_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json: pass the --out folder of a training run")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None


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
    return config_from_dict(ViTConfig, run_config["encoder"])


def load_encoder(path, which="target"):
    """An encoder (eval mode) from one of our output folders; `which` is "target" or "context"."""
    if which not in ("target", "context"):
        raise ValueError(f"which must be 'target' or 'context', got {which!r}")
    encoder = VisionTransformer(encoder_config_of(read_run_config(path)))
    prefix = "target_encoder." if which == "target" else "encoder."
    return load_state_strict(encoder, split_state(read_weights(path), prefix), "encoder").eval()


def load_predictor(path):
    """The predictor from one of our output folders."""
    predictor = Predictor(config_from_dict(PredictorConfig, read_run_config(path)["predictor"]))
    return load_state_strict(predictor, split_state(read_weights(path), "predictor."), "predictor").eval()

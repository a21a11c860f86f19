"""Multi-block masking for I-JEPA, batched, on any device.

Self-contained: torch and the standard library only, so it can be copied alone into other code.

    sampler = MultiBlockMaskSampler(grid_size=14)          # the paper's settings
    masks = sampler.sample(256, torch.Generator().manual_seed(0))
    masks.context_idx   # (B, Kc) long, sorted patch indices the context encoder sees
    masks.target_idx    # (B, M, Kt) long, sorted patch indices of each of the M target blocks

Steps of `sample` (all samples of the batch at once, every random draw from the given generator):
  1. For each of the M target blocks of each sample, draw a scale s ~ U(target_scale) and, independently,
     an aspect ratio a ~ logU(target_aspect); the block is h x w = round(sqrt(s N a)) x round(sqrt(s N / a))
     patches (clamped to the grid), with its top-left corner uniform over every position where it fits,
     the last row and column included.
  2. Draw the context block the same way (scale context_scale, aspect context_aspect) and remove every
     patch that lies in any target block: the context never sees a target patch.
  3. Samples whose context keeps fewer than `num_context` patches are redrawn (steps 1-2 again).
  4. Lengths are fixed per sampler so shapes are static across steps and ranks: each context is cut to
     `num_context` patches and each target block to `num_target` patches by choosing that many of its
     patches uniformly at random (never by cutting the tail of a raster-ordered list, which would always
     drop the bottom of the image). `num_target` is the smallest block the scale/aspect ranges produce;
     `num_context` defaults to the 5th percentile of the context size under these settings.

The official sampler draws scale and aspect from one random number (they are correlated), never places a
block on the last row or column, and trims every sample to the batch's smallest mask; none of that here.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class Masks:
    context_idx: torch.Tensor  # (B, Kc) long
    target_idx: torch.Tensor  # (B, M, Kt) long
    context_visible: torch.Tensor  # (B,) patches the context block kept before it was cut to Kc
    target_union: torch.Tensor  # (B,) patches covered by the union of the M target blocks

    def stats(self):
        """Mask sizes to log (tensors: reading them is the caller's choice of when to synchronise)."""
        return {"mask_context": float(self.context_idx.shape[1]), "mask_target": float(self.target_idx.shape[2]),
                "mask_context_visible": self.context_visible.float().mean(),
                "mask_target_union": self.target_union.float().mean()}


def _check_range(name, pair, low, high):
    a, b = pair
    if not (low < a <= b <= high):
        raise ValueError(f"{name} must satisfy {low} < min <= max <= {high}, got ({a}, {b})")


def block_sizes(scale, aspect, grid_h, grid_w):
    """Heights and widths (long tensors) of blocks with the given scales and aspect ratios (h / w)."""
    area = scale * grid_h * grid_w
    h = torch.round(torch.sqrt(area * aspect)).long().clamp(1, grid_h)
    w = torch.round(torch.sqrt(area / aspect)).long().clamp(1, grid_w)
    return h, w


class MultiBlockMaskSampler:
    def __init__(self, grid_size, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                 context_scale=(0.85, 1.0), context_aspect=(1.0, 1.0), min_keep=10, num_context=None,
                 num_target=None, max_redraws=100):
        self.grid_h, self.grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        self.num_patches = self.grid_h * self.grid_w
        if num_targets < 1:
            raise ValueError(f"num_targets must be at least 1, got {num_targets}")
        _check_range("target_scale", target_scale, 0.0, 1.0)
        _check_range("context_scale", context_scale, 0.0, 1.0)
        _check_range("target_aspect", target_aspect, 0.0, math.inf)
        _check_range("context_aspect", context_aspect, 0.0, math.inf)
        self.num_targets = num_targets
        self.target_scale, self.target_aspect = tuple(target_scale), tuple(target_aspect)
        self.context_scale, self.context_aspect = tuple(context_scale), tuple(context_aspect)
        self.max_redraws = max_redraws
        self.num_target = num_target or self.smallest_block(self.target_scale, self.target_aspect)
        self.min_keep = min_keep
        self.num_context = num_context or max(min_keep, self.context_size_quantile(0.05))
        if not 1 <= self.num_context <= self.num_patches:
            raise ValueError(f"num_context {self.num_context} must lie in [1, {self.num_patches}]")
        if not 1 <= self.num_target <= self.num_patches:
            raise ValueError(f"num_target {self.num_target} must lie in [1, {self.num_patches}]")

    # -- sizes -----------------------------------------------------------------------------------------

    def smallest_block(self, scale, aspect, steps=64):
        """Smallest block area the ranges can produce (scanned densely; rarer smaller ones are redrawn)."""
        s = torch.linspace(scale[0], scale[1], steps)[:, None]
        a = torch.exp(torch.linspace(math.log(aspect[0]), math.log(aspect[1]), steps))[None, :]
        h, w = block_sizes(s, a, self.grid_h, self.grid_w)
        return int((h * w).min())

    def context_size_quantile(self, q, samples=1024):
        """The q-quantile of the context size (before cutting), from a fixed-seed draw of these settings."""
        generator = torch.Generator().manual_seed(0)
        targets = self._draw_blocks((samples, self.num_targets), self.target_scale, self.target_aspect, generator)
        context = self._draw_blocks((samples,), self.context_scale, self.context_aspect, generator)
        visible = (context & ~targets.any(1)).sum(-1).float()
        return int(torch.quantile(visible, q))

    # -- drawing ---------------------------------------------------------------------------------------

    def _draw_blocks(self, shape, scale, aspect, generator):
        """Boolean block masks of `shape` + (N,), flattened raster order."""
        device = generator.device
        u = torch.rand((3, *shape), generator=generator, device=device)
        s = scale[0] + u[0] * (scale[1] - scale[0])
        log_a = math.log(aspect[0]) + torch.rand(shape, generator=generator, device=device) * (
            math.log(aspect[1]) - math.log(aspect[0]))
        h, w = block_sizes(s, log_a.exp(), self.grid_h, self.grid_w)
        top = (u[1] * (self.grid_h - h + 1)).long()  # uniform over 0 .. grid_h - h inclusive
        left = (u[2] * (self.grid_w - w + 1)).long()
        rows = torch.arange(self.grid_h, device=device)
        cols = torch.arange(self.grid_w, device=device)
        in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # (..., grid_h)
        in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (..., grid_w)
        return (in_rows[..., :, None] & in_cols[..., None, :]).flatten(-2)

    def sample_boolean(self, batch_size, generator):
        """Boolean masks: context (B, N) and targets (B, M, N), with every sample valid."""
        targets = self._draw_blocks((batch_size, self.num_targets), self.target_scale, self.target_aspect,
                                    generator)
        context = self._draw_blocks((batch_size,), self.context_scale, self.context_aspect, generator)
        context &= ~targets.any(1)
        for _ in range(self.max_redraws):
            bad = (context.sum(-1) < self.num_context) | (targets.sum(-1) < self.num_target).any(-1)
            if not bad.any():
                return context, targets
            n = int(bad.sum())
            new_targets = self._draw_blocks((n, self.num_targets), self.target_scale, self.target_aspect, generator)
            new_context = self._draw_blocks((n,), self.context_scale, self.context_aspect, generator)
            targets[bad] = new_targets
            context[bad] = new_context & ~new_targets.any(1)
        raise ValueError(f"mask settings leave fewer than {self.num_context} context patches too often "
                         f"(grid {self.grid_h}x{self.grid_w}); lower the target scale or number of targets, "
                         "or set a smaller num_context")

    def sample(self, batch_size, generator=None):
        """Index tensors for a batch; the device is the generator's (CPU when none is given)."""
        generator = generator or torch.Generator().manual_seed(torch.seed() % 2**63)
        context, targets = self.sample_boolean(batch_size, generator)
        return Masks(context_idx=random_subset(context, self.num_context, generator),
                     target_idx=random_subset(targets, self.num_target, generator),
                     context_visible=context.sum(-1), target_union=targets.any(1).sum(-1))


def random_subset(mask, k, generator):
    """(..., N) boolean with at least k True per row -> (..., k) sorted indices of k of them, at random."""
    scores = torch.rand(mask.shape, generator=generator, device=mask.device)
    scores = torch.where(mask, scores, -1.0)  # a masked-out patch is never chosen while k fit
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values

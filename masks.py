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

ScheduledMaskSampler(sampler, start, total_steps).at(step) is the sampler of one step when the target scale
range ramps from `start` to the sampler's over training (train_ijepa.py --target-scale-schedule).

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

    def model_inputs(self):
        """Keyword arguments of the model's forward (IJEPA.forward); subclasses add their own."""
        return {"context_idx": self.context_idx, "target_idx": self.target_idx}

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
        self.settings = dict(grid_size=grid_size, num_targets=num_targets, target_scale=target_scale,
                             target_aspect=target_aspect, context_scale=context_scale, context_aspect=context_aspect,
                             min_keep=min_keep, num_context=num_context, num_target=num_target,
                             max_redraws=max_redraws)  # what ScheduledMaskSampler rebuilds it from
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

    def sample(self, batch_size, generator):
        """Index tensors for a batch, every draw from `generator` (a torch.Generator, on the device the
        indices go to): the caller's seed alone fixes the masks, and no global random state is touched."""
        context, targets = self.sample_boolean(batch_size, generator)
        return Masks(context_idx=random_subset(context, self.num_context, generator),
                     target_idx=random_subset(targets, self.num_target, generator),
                     context_visible=context.sum(-1), target_union=targets.any(1).sum(-1))


def scheduled_target_scale(step, total_steps, start, end):
    """The target scale range (min, max) at `step`: each bound moves linearly from start (step 0) to end
    (step total_steps) and stays there, a pure function of the step like the other schedules."""
    progress = min(1.0, step / max(1, total_steps))
    return tuple(a + (b - a) * progress for a, b in zip(start, end))


class ScheduledMaskSampler:
    """Multi-block masks whose target scale range ramps from `start` to the sampler's own target_scale
    over total_steps (scheduled_target_scale): `at(step)` is the MultiBlockMaskSampler of that step, with
    every other setting of `sampler`. Lengths follow the range: the step's num_target is the smallest
    block its range gives and num_context its context's 5th percentile (unless the sampler fixed them), so
    shapes change as the blocks grow. Each draw is a function of (step, generator): a resumed run sees
    the masks of an uninterrupted one."""

    def __init__(self, sampler, start, total_steps):
        if type(sampler) is not MultiBlockMaskSampler:
            raise ValueError(f"the target-scale schedule is for I-JEPA's multi-block masks, not "
                             f"{type(sampler).__name__}; drop --target-scale-schedule")
        _check_range("target scale schedule start", start, 0.0, 1.0)
        self.sampler, self.start, self.total_steps = sampler, tuple(start), total_steps
        self.cache = (None, None)  # (step, its sampler): micro-batches share a step; one assignment, so
        # the mask-drawing thread and the loop's logging never see a step paired with another's sampler

    def at(self, step):
        cached_step, cached = self.cache
        if step == cached_step:
            return cached
        scale = scheduled_target_scale(step, self.total_steps, self.start, self.sampler.target_scale)
        sampler = MultiBlockMaskSampler(**{**self.sampler.settings, "target_scale": scale})
        self.cache = (step, sampler)
        return sampler


def random_subset(mask, k, generator):
    """(..., N) boolean with at least k True per row -> (..., k) sorted indices of k of them, at random."""
    scores = torch.rand(mask.shape, generator=generator, device=mask.device)
    scores = torch.where(mask, scores, -1.0)  # a masked-out patch is never chosen while k fit
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


# ----------------------------------------------------------------------------------------------------
# PI-JEPA: masks on the latent pyramid
#
# Pyramid index space (as in models.py): level l is a (G / 2^l)^2 grid of cells, each covering 2^l x 2^l
# fine patches; level 0's cells come first (so I-JEPA's indices are level-0 indices), then level 1's, ...

PYRAMID_STRATEGIES = ("full_downsampling", "full_resampling", "coarse_only", "fine_only")


@dataclass
class PyramidMasks(Masks):
    """Pyramid-index masks, each level in a fixed-length slice (static shapes):
    context_idx (B, sum Kc_l) = [Kc_0 fine patches the encoder sees | Kc_1 level-1 cells | ...] and
    target_idx (B, M, sum Kt_l), group m = [Kt_0 cells of block m at level 0 | Kt_1 at level 1 | ...];
    Kt_l = 0 at a level without targets. target_union counts the fine patches hidden from the context."""

    context_sizes: tuple  # (Kc_0, ..., Kc_{L-1})
    target_sizes: tuple  # (Kt_0, ..., Kt_{L-1})

    def model_inputs(self):
        """Keyword arguments of PyramidIJEPA.forward."""
        return {**super().model_inputs(), "context_sizes": self.context_sizes, "target_sizes": self.target_sizes}

    def stats(self):
        stats = super().stats()
        for level, (kc, kt) in enumerate(zip(self.context_sizes, self.target_sizes)):
            stats[f"mask_context_l{level}"] = float(kc)
            stats[f"mask_target_l{level}"] = float(kt)
        return stats


def pool_cells(mask, grid_size, level):
    """(..., G*G) fine mask -> (..., (G/2^l)^2) long: how many fine patches of each level-l cell are set."""
    s = 2**level
    g = grid_size // s
    return mask.long().reshape(*mask.shape[:-1], g, s, g, s).sum((-3, -1)).flatten(-2)


def unpool_cells(cells, grid_size, level):
    """(..., (G/2^l)^2) cell mask -> (..., G*G): every fine patch takes the value of its level-l cell."""
    s = 2**level
    g = grid_size // s
    lead = cells.shape[:-1]
    return cells.reshape(*lead, g, 1, g, 1).expand(*lead, g, s, g, s).reshape(*lead, grid_size * grid_size)


def downsample_blocks(blocks, grid_size, level, threshold):
    """(..., G*G) fine block masks -> (..., (G/2^l)^2) bool: the level-l cells with at least `threshold`
    of their 4^l fine patches in the block. A block with no such cell (small blocks on coarse grids) takes
    its most-covered cell (the first in raster order on ties), so every block has a cell at every level."""
    counts = pool_cells(blocks, grid_size, level)  # (..., C)
    cells = counts >= threshold * 4**level
    most = torch.zeros_like(cells).scatter_(-1, counts.argmax(-1, keepdim=True), True)
    return torch.where(cells.any(-1, keepdim=True), cells, most)


class PyramidMaskSampler(MultiBlockMaskSampler):
    """Multi-block masks on an L-level pyramid of a G x G patch grid, batched, on the generator's device.

    Steps of `sample`, every draw from the given generator (with levels=1, `sample` is MultiBlockMaskSampler's:
    PI-JEPA with one level sees I-JEPA's masks from the same draws):
      1. Draw the M fine target blocks and the context block as I-JEPA does (steps 1-2 there).
      2. Target cells per level, by `strategy`:
           full_downsampling  every level: level 0 is the fine blocks; at level l >= 1 block m's cells are
                              those with >= pool_threshold of their fine patches in block m (at least its
                              most-covered cell), so targets agree across scales;
           full_resampling    level 0 is the fine blocks; at each level l >= 1, M new blocks drawn
                              independently on that level's grid with the same relative scale and aspect
                              (at least one cell each, which matters on small grids);
           coarse_only        levels >= 1 as in full_downsampling, none at level 0;
           fine_only          level 0 only (I-JEPA's targets); coarse levels give context only.
      3. No leak: the visible fine set is the context block minus every fine patch under any target cell
         of any level.
      4. The encoder's context: Kc_0 visible fine patches chosen uniformly at random.
      5. Coarse context: a level-l cell is available when at least one of those Kc_0 patches lies in it
         (the model averages the encoder's outputs over them).
      A sample is valid when it has at least Kc_0 visible patches, every block at least Kt_l cells at
      every target level and at least Kc_l available cells at every coarse level. Steps 1-5 run on rounds
      of candidates, each sized for the expected acceptance rate, and the first valid candidates are kept
      (rejection sampling, as I-JEPA's redraws, in fewer rounds).
      6. Kc_l of the available cells at each coarse level, and Kt_l of each block's cells at each target
         level, are chosen uniformly at random.
    Fixed lengths (static shapes): Kt_0 is I-JEPA's smallest block; Kt_l (l >= 1) is the fewest cells
    any block size and position yields (exact); Kc_0 as in I-JEPA (5th percentile of the visible count,
    at least min_keep) and Kc_l the 5th percentile of available cells, both from a fixed-seed simulation.
    Padding with an attention mask would keep every cell but needs a masked attention path in the
    predictor and spends compute on padding; a random subset keeps the predictor's plain attention.
    """

    def __init__(self, grid_size, levels=3, strategy="full_downsampling", pool_threshold=0.5, num_targets=4,
                 target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0),
                 context_aspect=(1.0, 1.0), min_keep=10, num_context=None, num_target=None, max_redraws=100):
        if not isinstance(grid_size, int):
            raise ValueError(f"the pyramid needs a square grid given as one int, got {grid_size!r}")
        if levels < 1 or grid_size % 2 ** (levels - 1):
            raise ValueError(f"a {grid_size}x{grid_size} token grid cannot make {levels} pyramid levels: the grid "
                             f"must be divisible by 2^(levels-1) = {2 ** (levels - 1)}; use fewer --levels")
        if strategy not in PYRAMID_STRATEGIES:
            raise ValueError(f"unknown pyramid masking {strategy!r}; choose one of {', '.join(PYRAMID_STRATEGIES)}")
        if strategy == "coarse_only" and levels < 2:
            raise ValueError("coarse_only masking needs at least 2 levels")
        if not 0 < pool_threshold <= 1:
            raise ValueError(f"pool_threshold must lie in (0, 1], got {pool_threshold}")
        self.levels, self.strategy, self.pool_threshold = levels, strategy, pool_threshold
        self.grid_size = grid_size
        self.target_levels = {"full_downsampling": range(levels), "full_resampling": range(levels),
                              "coarse_only": range(1, levels), "fine_only": range(1)}[strategy]
        # The base class sets Kt_0 and Kc_0, the latter through context_size_quantile (overridden below).
        self.level_samplers = [None]  # per coarse level, for full_resampling's draws on that level's grid
        for level in range(1, levels):
            self.level_samplers.append(MultiBlockMaskSampler(
                grid_size // 2**level, num_targets, target_scale, target_aspect, context_scale, context_aspect,
                min_keep=1, num_context=1, num_target=1))
        super().__init__(grid_size, num_targets, target_scale, target_aspect, context_scale, context_aspect,
                         min_keep, num_context, num_target, max_redraws)
        self.target_sizes = tuple(self.level_target_size(level) if level in self.target_levels else 0
                                  for level in range(levels))
        self.context_sizes = (self.num_context, *self.coarse_context_sizes())

    # -- sizes -----------------------------------------------------------------------------------------

    def level_target_size(self, level):
        """Kt_l: the fewest cells a block can have at this level (exact, over every size and position)."""
        if level == 0:
            return self.num_target
        if self.strategy == "full_resampling":
            sampler = self.level_samplers[level]
            return sampler.smallest_block(sampler.target_scale, sampler.target_aspect)
        steps = 64  # the block sizes smallest_block scans
        s = torch.linspace(self.target_scale[0], self.target_scale[1], steps)[:, None]
        a = torch.exp(torch.linspace(math.log(self.target_aspect[0]), math.log(self.target_aspect[1]), steps))
        h, w = block_sizes(s, a[None, :], self.grid_h, self.grid_w)
        g = self.grid_size
        rows = torch.arange(g)
        fewest = self.num_patches
        for bh, bw in sorted(set(zip(h.flatten().tolist(), w.flatten().tolist()))):
            top, left = torch.meshgrid(torch.arange(g - bh + 1), torch.arange(g - bw + 1), indexing="ij")
            top, left = top.flatten()[:, None], left.flatten()[:, None]
            in_rows = (rows >= top) & (rows < top + bh)
            in_cols = (rows >= left) & (rows < left + bw)
            blocks = (in_rows[:, :, None] & in_cols[:, None, :]).flatten(-2)  # (positions, N)
            cells = downsample_blocks(blocks, g, level, self.pool_threshold).sum(-1)
            fewest = min(fewest, int(cells.min()))
        return fewest

    def context_size_quantile(self, q, samples=1024):
        """Kc_0 default: the q-quantile of the visible fine count under the pyramid's no-leak rule."""
        context, _ = self._draw(samples, torch.Generator().manual_seed(0))
        return int(torch.quantile(context.sum(-1).float(), q))

    def coarse_context_sizes(self, q=0.05, samples=1024):
        """Kc_l (l >= 1): the q-quantile of available cells over simulated samples that keep Kc_0 patches;
        also sets `acceptance`, the fraction of draws that are valid (it sizes each round of draws)."""
        self.acceptance = 1.0
        if self.levels == 1:
            return ()
        generator = torch.Generator().manual_seed(0)
        context, targets = self._draw(samples, generator)
        context_idx = random_subset(context, self.num_context, generator)
        fine_ok = self._fine_valid(context, targets)
        if fine_ok.float().mean() < 0.5:
            raise ValueError(
                f"mask settings leave fewer than {self.num_context} visible patches in most samples (grid "
                f"{self.grid_size}x{self.grid_size}, {self.levels} levels, {self.strategy}): every fine patch under "
                "a target cell of any level is hidden; use fewer --levels or --num-targets, a smaller "
                "--target-scale, or a smaller --num-context")
        available = [cells[fine_ok] for cells in self.available_cells(context_idx)]
        sizes = tuple(max(1, int(torch.quantile(a.sum(-1).float(), q))) for a in available)
        self.acceptance = float(self._valid(context, targets, context_idx, sizes).float().mean())
        return sizes

    # -- drawing ---------------------------------------------------------------------------------------

    def _draw(self, n, generator):
        """Steps 1-3 without redraws: visible fine context (n, N) and per-level target cells, each
        (n, M, (G/2^l)^2) bool or None at a level without targets."""
        fine = self._draw_blocks((n, self.num_targets), self.target_scale, self.target_aspect, generator)
        context = self._draw_blocks((n,), self.context_scale, self.context_aspect, generator)
        targets = []
        for level in range(self.levels):
            if level not in self.target_levels:
                targets.append(None)
            elif level == 0:
                targets.append(fine)
            elif self.strategy == "full_resampling":
                sampler = self.level_samplers[level]
                targets.append(sampler._draw_blocks((n, self.num_targets), self.target_scale, self.target_aspect,
                                                    generator))
            else:
                targets.append(downsample_blocks(fine, self.grid_size, level, self.pool_threshold))
        context &= ~self.hidden(targets)
        return context, targets

    def hidden(self, targets):
        """(n, N) bool: the fine patches under any target cell of any level."""
        hidden = None
        for level, cells in enumerate(targets):
            if cells is not None:
                under = unpool_cells(cells.any(1), self.grid_size, level)
                hidden = under if hidden is None else hidden | under
        return hidden

    def available_cells(self, context_idx):
        """(B, Kc_0) fine indices -> per coarse level (B, (G/2^l)^2) bool: cells holding one of them."""
        seen = torch.zeros(context_idx.shape[0], self.num_patches, dtype=torch.bool, device=context_idx.device)
        seen.scatter_(1, context_idx, True)
        return [pool_cells(seen, self.grid_size, level) > 0 for level in range(1, self.levels)]

    def _fine_valid(self, context, targets):
        """(n,) bool: enough visible fine patches and enough cells in every block at every target level."""
        ok = context.sum(-1) >= self.num_context
        for level, cells in enumerate(targets):
            if cells is not None:
                ok &= (cells.sum(-1) >= self.target_sizes[level]).all(-1)
        return ok

    def _valid(self, context, targets, context_idx, coarse_sizes):
        ok = self._fine_valid(context, targets)
        for cells, k in zip(self.available_cells(context_idx), coarse_sizes):
            ok &= cells.sum(-1) >= k
        return ok

    def sample(self, batch_size, generator):
        """PyramidMasks for a batch, every draw from `generator` (on the device the indices go to)."""
        if self.levels == 1:  # one level is I-JEPA: the same masks from the same draws
            masks = super().sample(batch_size, generator)
            return PyramidMasks(**vars(masks), context_sizes=self.context_sizes, target_sizes=self.target_sizes)
        rounds, missing = [], batch_size
        for _ in range(self.max_redraws):  # steps 1-5 for a round of candidates; keep the valid ones in order
            n = math.ceil(1.1 * missing / max(self.acceptance, 0.05)) + 8
            context, targets = self._draw(n, generator)
            context_idx = random_subset(context, self.num_context, generator)
            keep = self._valid(context, targets, context_idx, self.context_sizes[1:]).nonzero()[:missing, 0]
            rounds.append((context[keep], [t if t is None else t[keep] for t in targets], context_idx[keep]))
            missing -= len(keep)
            if missing == 0:
                break
        else:
            raise ValueError(f"mask settings leave fewer than {self.num_context} visible patches too often (grid "
                             f"{self.grid_size}x{self.grid_size}, {self.levels} levels, {self.strategy}); use fewer "
                             "--levels or --num-targets, a smaller --target-scale, or a smaller --num-context")
        context = torch.cat([r[0] for r in rounds])
        targets = [None if t is None else torch.cat([r[1][level] for r in rounds]) for level, t in enumerate(targets)]
        context_idx = torch.cat([r[2] for r in rounds])
        offsets = [0]
        for level in range(self.levels):
            offsets.append(offsets[-1] + (self.grid_size // 2**level) ** 2)
        coarse = [random_subset(cells, k, generator) + offsets[level] for level, (cells, k) in
                  enumerate(zip(self.available_cells(context_idx), self.context_sizes[1:]), start=1)]
        target_parts = [random_subset(cells, k, generator) + offsets[level]
                        for level, (cells, k) in enumerate(zip(targets, self.target_sizes)) if cells is not None]
        return PyramidMasks(context_idx=torch.cat([context_idx, *coarse], 1), target_idx=torch.cat(target_parts, -1),
                            context_visible=context.sum(-1), target_union=self.hidden(targets).sum(-1),
                            context_sizes=self.context_sizes, target_sizes=self.target_sizes)

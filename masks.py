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
  4. Target blocks are whole: one block size (h, w) is drawn per batch and shared by every block of every
     sample (as Meta's sampler does), so every patch of every block is predicted and target_idx is
     (B, M, h*w) without cutting; the few sizes the scale/aspect ranges allow are the only shapes
     `--compile` sees. Each context is cut to `num_context` patches by choosing that many of its patches
     uniformly at random (never by cutting the tail of a raster-ordered list, which would always drop the
     bottom of the image); `num_context` defaults to the 5th percentile of the context size under these
     settings. (Before, every block was cut to the smallest size the ranges allow: ~27% of each block
     was never predicted, 12.8% of a 14x14 image per block against 17.9% now.)

ScheduledMaskSampler(sampler, start, total_steps).at(step) is the sampler of one step when the target scale
range ramps from `start` to the sampler's over training (train_ijepa.py --target-scale-schedule).

The official sampler draws scale and aspect from one random number (they are correlated), never places a
block on the last row or column, and trims every context to the batch's smallest; none of that here.
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
    num_patches: int  # N, the fine grid's patch count (for the predicted share)

    def model_inputs(self):
        """Keyword arguments of the model's forward (IJEPA.forward); subclasses add their own."""
        return {"context_idx": self.context_idx, "target_idx": self.target_idx}

    def stats(self):
        """Mask sizes to log (tensors: reading them is the caller's choice of when to synchronise).
        mask_target_share: the share of the image one target block covers, every patch of it predicted."""
        return {"mask_context": float(self.context_idx.shape[1]), "mask_target": float(self.target_idx.shape[2]),
                "mask_target_share": self.target_idx.shape[2] / max(self.num_patches, 1),
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


def rectangles(top, left, h, w, grid_h, grid_w):
    """Boolean (..., grid_h * grid_w) masks of the h x w rectangles at (top, left) (long tensors of one shape;
    h and w tensors or ints), flattened raster order."""
    rows = torch.arange(grid_h, device=top.device)
    cols = torch.arange(grid_w, device=top.device)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # (..., grid_h)
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (..., grid_w)
    return (in_rows[..., :, None] & in_cols[..., None, :]).flatten(-2)


def rectangle_indices(top, left, h, w, grid_w):
    """(...,) top-left corners of h x w rectangles (ints h, w) -> (..., h*w) sorted raster indices."""
    rows = torch.arange(h, device=top.device).repeat_interleave(w)
    cols = torch.arange(w, device=top.device).repeat(h)
    return (top[..., None] + rows) * grid_w + left[..., None] + cols


class MultiBlockMaskSampler:
    def __init__(self, grid_size, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                 context_scale=(0.85, 1.0), context_aspect=(1.0, 1.0), min_keep=10, num_context=None,
                 max_redraws=100):
        self.settings = dict(grid_size=grid_size, num_targets=num_targets, target_scale=target_scale,
                             target_aspect=target_aspect, context_scale=context_scale, context_aspect=context_aspect,
                             min_keep=min_keep, num_context=num_context,
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
        self.min_keep = min_keep
        self.num_context = num_context or max(min_keep, self.context_size_quantile(0.05))
        if not 1 <= self.num_context <= self.num_patches:
            raise ValueError(f"num_context {self.num_context} must lie in [1, {self.num_patches}]")

    # -- sizes -----------------------------------------------------------------------------------------

    def context_size_quantile(self, q, batches=64, batch_size=16):
        """The q-quantile of the context size (before cutting), from a fixed-seed draw of these settings."""
        generator = torch.Generator().manual_seed(0)
        visible = []
        for _ in range(batches):
            h, w = self.block_size(generator)
            targets, _ = self._place_targets(batch_size, h, w, generator)
            context = self._draw_blocks((batch_size,), self.context_scale, self.context_aspect, generator)
            visible.append((context & ~targets.any(1)).sum(-1))
        return int(torch.quantile(torch.cat(visible).float(), q))

    # -- drawing ---------------------------------------------------------------------------------------

    def block_size(self, generator, grids=None):
        """One target block size (h, w) in patches for a whole batch (Python ints): scale ~ U(target_scale)
        and, independently, aspect ~ logU(target_aspect). With `grids` (a list of (grid_h, grid_w)), the
        sizes of a block of that one relative scale and aspect on each of those grids instead."""
        u = torch.rand(2, generator=generator, device=generator.device).tolist()
        s = self.target_scale[0] + u[0] * (self.target_scale[1] - self.target_scale[0])
        log_a = math.log(self.target_aspect[0]) + u[1] * (math.log(self.target_aspect[1]) -
                                                            math.log(self.target_aspect[0]))
        sizes = [tuple(int(x) for x in block_sizes(torch.tensor(s), torch.tensor(log_a).exp(), gh, gw))
                 for gh, gw in grids or [(self.grid_h, self.grid_w)]]
        return sizes if grids else sizes[0]

    def _place_targets(self, n, h, w, generator):
        """n samples of M h x w blocks at uniform positions (the last row and column included):
        boolean (n, M, N) and corners (top, left), each (n, M) long."""
        u = torch.rand((2, n, self.num_targets), generator=generator, device=generator.device)
        top = (u[0] * (self.grid_h - h + 1)).long()  # uniform over 0 .. grid_h - h inclusive
        left = (u[1] * (self.grid_w - w + 1)).long()
        return rectangles(top, left, h, w, self.grid_h, self.grid_w), (top, left)

    def _draw_blocks(self, shape, scale, aspect, generator):
        """Boolean block masks of `shape` + (N,), each with its own scale and aspect (the context block)."""
        device = generator.device
        u = torch.rand((3, *shape), generator=generator, device=device)
        s = scale[0] + u[0] * (scale[1] - scale[0])
        log_a = math.log(aspect[0]) + torch.rand(shape, generator=generator, device=device) * (
            math.log(aspect[1]) - math.log(aspect[0]))
        h, w = block_sizes(s, log_a.exp(), self.grid_h, self.grid_w)
        top = (u[1] * (self.grid_h - h + 1)).long()
        left = (u[2] * (self.grid_w - w + 1)).long()
        return rectangles(top, left, h, w, self.grid_h, self.grid_w)

    def sample_boolean(self, batch_size, generator, size=None):
        """Context (B, N) bool, targets (B, M, N) bool of one block size (h, w) (drawn unless given) and the
        targets' corners (top, left), each (B, M), with every sample keeping num_context patches."""
        h, w = size or self.block_size(generator)
        targets, (top, left) = self._place_targets(batch_size, h, w, generator)
        context = self._draw_blocks((batch_size,), self.context_scale, self.context_aspect, generator)
        context &= ~targets.any(1)
        for _ in range(self.max_redraws):
            bad = context.sum(-1) < self.num_context
            if not bad.any():
                return context, targets, (top, left)
            n = int(bad.sum())
            new_targets, (new_top, new_left) = self._place_targets(n, h, w, generator)
            new_context = self._draw_blocks((n,), self.context_scale, self.context_aspect, generator)
            targets[bad], top[bad], left[bad] = new_targets, new_top, new_left
            context[bad] = new_context & ~new_targets.any(1)
        raise ValueError(f"mask settings leave fewer than {self.num_context} context patches too often "
                         f"(grid {self.grid_h}x{self.grid_w}); lower the target scale or number of targets, "
                         "or set a smaller num_context")

    def sample(self, batch_size, generator):
        """Index tensors for a batch, every draw from `generator` (a torch.Generator, on the device the
        indices go to): the caller's seed alone fixes the masks, and no global random state is touched."""
        h, w = self.block_size(generator)
        context, targets, (top, left) = self.sample_boolean(batch_size, generator, (h, w))
        return Masks(context_idx=random_subset(context, self.num_context, generator),
                     target_idx=rectangle_indices(top, left, h, w, self.grid_w),
                     context_visible=context.sum(-1), target_union=targets.any(1).sum(-1),
                     num_patches=self.num_patches)


def scheduled_target_scale(step, total_steps, start, end):
    """The target scale range (min, max) at `step`: each bound moves linearly from start (step 0) to end
    (step total_steps) and stays there, a pure function of the step like the other schedules."""
    progress = min(1.0, step / max(1, total_steps))
    return tuple(a + (b - a) * progress for a, b in zip(start, end))


class ScheduledMaskSampler:
    """Multi-block masks whose target scale range ramps from `start` to the sampler's own target_scale
    over total_steps (scheduled_target_scale): `at(step)` is the MultiBlockMaskSampler of that step, with
    every other setting of `sampler`. Lengths follow the range: a batch's target blocks are whole, of one size
    drawn from the step's range, and num_context is the context's 5th percentile (unless the sampler fixed
    it), so shapes change as the blocks grow. Each draw is a function of (step, generator): a resumed run sees
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


def random_subset(mask, k, generator, priority=None):
    """(..., N) boolean with at least k True per row -> (..., k) sorted indices of k of them, at random
    (among those of highest `priority`, a (..., N) float in [0, inf), first, when given)."""
    scores = torch.rand(mask.shape, generator=generator, device=mask.device)
    if priority is not None:
        scores = scores + priority
    scores = torch.where(mask, scores, -1.0)  # a masked-out patch is never chosen while k fit
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


# ----------------------------------------------------------------------------------------------------
# PI-JEPA: masks on the latent pyramid
#
# Pyramid index space (as in models.py): level l is a (G / 2^l)^2 grid of cells, each covering 2^l x 2^l
# fine patches and seen by the encoder as one patch of the image downsampled 2^l times; level 0's cells
# come first (so I-JEPA's indices are level-0 indices), then level 1's, ...

PYRAMID_STRATEGIES = ("full_downsampling", "full_resampling", "coarse_only", "fine_only")


@dataclass
class PyramidMasks(Masks):
    """Pyramid-index masks, each level in a fixed-length slice (static shapes):
    context_idx (B, sum Kc_l) = [Kc_0 fine patches | Kc_1 level-1 cells | ...] and
    target_idx (B, M, sum Kt_l), group m = [the Kt_0 cells of block m at level 0 | its Kt_1 at level 1 | ...];
    Kt_l = h_l * w_l (whole blocks), 0 at a level without targets. target_union counts the fine patches
    under a target of any level."""

    context_sizes: tuple  # (Kc_0, ..., Kc_{L-1})
    target_sizes: tuple  # (Kt_0, ..., Kt_{L-1})

    def model_inputs(self):
        """Keyword arguments of PyramidIJEPA.forward."""
        return {**super().model_inputs(), "context_sizes": self.context_sizes, "target_sizes": self.target_sizes}

    def stats(self):
        stats = super().stats()
        stats["mask_target_share"] = self.target_sizes[0] / self.num_patches  # fine level (0 under coarse_only)
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
    """(..., (G/2^l)^2) cell values -> (..., G*G): every fine patch takes the value of its level-l cell."""
    s = 2**level
    g = grid_size // s
    lead = cells.shape[:-1]
    return cells.reshape(*lead, g, 1, g, 1).expand(*lead, g, s, g, s).reshape(*lead, grid_size * grid_size)


def rescale_size(h, w, level):
    """A fine h x w block's size on level l: sides h / 2^l and w / 2^l rounded down, at least one cell (a 7x7
    block is 3x3 cells on level 1 and one cell on level 2): the rescaled block stays (nearly) inside the
    fine one, so hiding it at the fine level costs few context patches."""
    s = 2**level
    return max(1, h // s), max(1, w // s)


def rescale_corners(top, left, h, w, level, grid_size, generator):
    """Corners (top, left), each (...,) long, of fine h x w blocks -> corners of their rescale_size blocks on
    level l, centred on the fine block's centre: the corner is rounded to the nearest cell, a tie (exactly
    halfway) broken at random, never towards a fixed side of the image."""
    h_l, w_l = rescale_size(h, w, level)
    s, g = 2**level, grid_size // 2**level
    coins = torch.rand((2, *top.shape), generator=generator, device=top.device) < 0.5

    def nearest(start, size, size_l, coin):
        x = (start.float() + size / 2) / s - size_l / 2  # exact in float: s is a power of two
        low = x.floor()
        up = (x - low > 0.5) | ((x - low == 0.5) & coin)
        return (low + up.float()).long().clamp(0, g - size_l)

    return nearest(top, h, h_l, coins[0]), nearest(left, w, w_l, coins[1])


def choose(mask, scores, k):
    """(..., N) bool and float scores -> (..., k) sorted indices of the k allowed entries scoring highest."""
    return torch.where(mask, scores, -1.0).topk(k, dim=-1).indices.sort(dim=-1).values


class PyramidMaskSampler(MultiBlockMaskSampler):
    """Multi-block masks on an L-level pyramid of a G x G patch grid, batched, on the generator's device.

    Level l's cells are the patches of the image downsampled 2^l times. Steps of `sample`, every draw from
    the given generator (with levels = 1 this is MultiBlockMaskSampler.sample: the same masks from the same
    draws, so PI-JEPA with one level is I-JEPA):
      1. One fine block size (h, w) for the batch; M fine blocks and a context block per sample, as I-JEPA.
      2. Targets and the context each level may use, by `strategy` (T_l targets, A_l allowed context):
           full_downsampling  T_0 = the fine blocks; T_l = each block rescaled to level l (rescale_size,
                              centred, ties at random). Hidden at every scale: the fine context is the
                              context block minus every patch under a target of any level, and a coarse
                              context cell must have all its patches in the chosen fine context, so the
                              coarse view shows no pixel the fine context does not (no cross-scale path).
           full_resampling    T_0, A_0 as I-JEPA; at each level l >= 1 its own M blocks and context block
                              drawn on that level's grid with the same relative scale and aspect. Nothing
                              is hidden across levels: each scale may show what another hides.
           coarse_only        T_l (l >= 1) as full_downsampling, none at level 0; the fine level is not
                              masked (A_0 = the context block), coarse context avoids every coarse target
                              of any coarse level: coarse targets are predicted partly from fine content.
           fine_only          T_0, A_0 as I-JEPA; the whole coarse view is context (A_l = every cell):
                              fine targets are predicted from coarse content plus fine context.
         Within a level no context cell is a target cell, under every strategy.
      3. Fixed lengths: Kc_0 fine context patches (I-JEPA's num_context under the same settings, so the
         fine level matches an I-JEPA run's sizes), chosen at random from A_0 (full_downsampling: patches
         of cells whole at a coarser level first, whole cells together, so coarse context exists); Kc_l of
         A_l at each coarse level (all cells under fine_only; else the 5th percentile of |A_l| from a
         fixed-seed simulation, at least 1 except under full_downsampling); targets are whole blocks,
         Kt_l = h_l * w_l.
      A sample is valid when |A_0| >= Kc_0 and |A_l| >= Kc_l; rounds of candidates, each sized for the
      simulated acceptance rate, are drawn until the batch is full (rejection sampling, as I-JEPA's redraws).
    """

    def __init__(self, grid_size, levels=2, strategy="full_downsampling", num_targets=4, target_scale=(0.15, 0.2),
                 target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), context_aspect=(1.0, 1.0), min_keep=10,
                 num_context=None, max_redraws=100):
        if not isinstance(grid_size, int):
            raise ValueError(f"the pyramid needs a square grid given as one int, got {grid_size!r}")
        if levels < 1 or grid_size % 2 ** (levels - 1):
            raise ValueError(f"a {grid_size}x{grid_size} token grid cannot make {levels} pyramid levels: the grid "
                             f"must be divisible by 2^(levels-1) = {2 ** (levels - 1)}; use fewer --levels")
        if strategy not in PYRAMID_STRATEGIES:
            raise ValueError(f"unknown pyramid masking {strategy!r}; choose one of {', '.join(PYRAMID_STRATEGIES)}")
        if strategy == "coarse_only" and levels < 2:
            raise ValueError("coarse_only masking needs at least 2 levels")
        # I-JEPA's sampler on the fine grid: block sizes and Kc_0 (its num_context under these settings).
        super().__init__(grid_size, num_targets, target_scale, target_aspect, context_scale, context_aspect,
                         min_keep, num_context, max_redraws)
        self.levels, self.strategy, self.grid_size = levels, strategy, grid_size
        self.level_grids = [grid_size // 2**level for level in range(levels)]
        self.offsets = [sum(g * g for g in self.level_grids[:level]) for level in range(levels + 1)]
        self.target_levels = {"full_downsampling": range(levels), "full_resampling": range(levels),
                              "coarse_only": range(1, levels), "fine_only": range(1)}[strategy]
        self.level_samplers = [None] + [  # full_resampling's draws on each coarse level's own grid
            MultiBlockMaskSampler(g, num_targets, target_scale, target_aspect, context_scale, context_aspect,
                                  min_keep=1, num_context=1) for g in self.level_grids[1:]]
        self.context_sizes, self.acceptance = (self.num_context,), 1.0
        if levels > 1:
            self.context_sizes, self.acceptance = self.simulate_coarse_context()

    # -- sizes -----------------------------------------------------------------------------------------

    def simulate_coarse_context(self, q=0.05, batches=64, batch_size=16):
        """(Kc_0, Kc_1, ...) and the share of valid draws, from a fixed-seed simulation of these settings."""
        generator = torch.Generator().manual_seed(0)
        draws = [self._draw(batch_size, self.level_block_sizes(generator), generator) for _ in range(batches)]
        fine_ok = torch.cat([d["fine_allowed"].sum(-1) >= self.num_context for d in draws])
        if fine_ok.float().mean() < 0.2:
            raise ValueError(
                f"mask settings leave fewer than {self.num_context} visible patches in most samples (grid "
                f"{self.grid_size}x{self.grid_size}, {self.levels} levels, {self.strategy}); use fewer --levels or "
                "--num-targets, a smaller --target-scale, or a smaller --num-context")
        sizes = [self.num_context]
        for level in range(1, self.levels):
            available = torch.cat([d["allowed"][level].sum(-1) for d in draws])[fine_ok]
            cells = self.level_grids[level] ** 2
            quantile = int(torch.quantile(available.float(), q))
            # full_downsampling's coarse view repeats fine context, and a level where whole cells are rare
            # (the coarsest of 3 on 16x16) may show none rather than reject a third of the draws
            fewest = 0 if self.strategy == "full_downsampling" else 1
            sizes.append(cells if self.strategy == "fine_only" else max(fewest, quantile))
        valid = torch.cat([self._valid(d, sizes) for d in draws])
        return tuple(sizes), float(valid.float().mean())

    def level_block_sizes(self, generator):
        """The batch's fine block size and, per level, its target block size (h_l, w_l) or None. Sizes are
        functions of one (scale, aspect) draw, so a run sees few shapes (for --compile)."""
        sizes = self.block_size(generator, [(g, g) for g in self.level_grids])  # full_resampling's, per level
        h, w = sizes[0]
        for level in range(self.levels):
            if level not in self.target_levels:
                sizes[level] = None
            elif level > 0 and self.strategy != "full_resampling":
                sizes[level] = rescale_size(h, w, level)
        return (h, w), sizes

    # -- drawing ---------------------------------------------------------------------------------------

    def _draw(self, n, block_sizes_, generator):
        """Steps 1-3 for n candidates without redraws: a dict of
        corners    per level (top, left) of the M target blocks, each (n, M), or None without targets
        targets    per level (n, M, C_l) bool target cells, or None
        fine_allowed (n, N) bool A_0, context_idx (n, Kc_0) the chosen fine context,
        allowed    per level (n, C_l) bool A_l (None at level 0), under_targets (n,) fine patches under a
                   target of any level."""
        (h, w), sizes = block_sizes_
        G = self.grid_size
        fine, (top, left) = self._place_targets(n, h, w, generator)  # (n, M, N)
        context = self._draw_blocks((n,), self.context_scale, self.context_aspect, generator)  # (n, N)
        corners, targets = [None] * self.levels, [None] * self.levels
        for level in self.target_levels:
            g = self.level_grids[level]
            if level == 0:
                corners[0], targets[0] = (top, left), fine
                continue
            if self.strategy == "full_resampling":
                targets[level], corners[level] = self.level_samplers[level]._place_targets(n, *sizes[level],
                                                                                           generator)
            else:
                corners[level] = rescale_corners(top, left, h, w, level, G, generator)
                targets[level] = rectangles(*corners[level], *sizes[level], g, g)
        coarse_hidden = torch.zeros_like(context)  # fine patches under any coarse target
        for level in range(1, self.levels):
            if targets[level] is not None:
                coarse_hidden |= unpool_cells(targets[level].any(1), G, level).bool()
        under_targets = coarse_hidden | fine.any(1) if 0 in self.target_levels else coarse_hidden
        allowed = [None] * self.levels
        if self.strategy in ("fine_only", "full_resampling"):
            fine_allowed = context & ~fine.any(1)  # full_resampling: coarse targets are not hidden here
            context_idx = random_subset(fine_allowed, self.num_context, generator)
            for level in range(1, self.levels):
                cells = self.level_grids[level] ** 2
                if self.strategy == "fine_only":
                    allowed[level] = torch.ones(n, cells, dtype=torch.bool, device=context.device)
                else:
                    sampler = self.level_samplers[level]
                    allowed[level] = sampler._draw_blocks((n,), self.context_scale, self.context_aspect,
                                                          generator) & ~targets[level].any(1)
        elif self.strategy == "coarse_only":
            fine_allowed = context
            context_idx = random_subset(fine_allowed, self.num_context, generator)
            for level in range(1, self.levels):
                allowed[level] = pool_cells(coarse_hidden, G, level) == 0
        else:  # full_downsampling
            fine_allowed = context & ~under_targets
            # Keep whole coarse cells together: patches of cells whole in A_0 at more levels first, the
            # cells in random order, so the chosen fine context holds whole cells a coarse level can show.
            whole = sum(unpool_cells(pool_cells(fine_allowed, G, level) == 4**level, G, level).long()
                        for level in range(1, self.levels))  # (n, N)
            cell_order = unpool_cells(torch.rand(n, self.level_grids[1] ** 2, generator=generator,
                                                 device=context.device), G, 1)
            patch_order = torch.rand(n, self.num_patches, generator=generator, device=context.device)
            scores = whole + torch.where(whole > 0, 0.999 * cell_order + 1e-4 * patch_order, patch_order)
            context_idx = choose(fine_allowed, scores, self.num_context)
            chosen = torch.zeros_like(context).scatter_(1, context_idx, True) & fine_allowed
            for level in range(1, self.levels):
                allowed[level] = pool_cells(chosen, G, level) == 4**level
        return {"corners": corners, "targets": targets, "fine_allowed": fine_allowed, "context_idx": context_idx,
                "allowed": allowed, "under_targets": under_targets.sum(-1)}

    def _valid(self, draw, context_sizes):
        ok = draw["fine_allowed"].sum(-1) >= context_sizes[0]
        for level in range(1, self.levels):
            ok &= draw["allowed"][level].sum(-1) >= context_sizes[level]
        return ok

    def sample(self, batch_size, generator):
        """PyramidMasks for a batch, every draw from `generator` (on the device the indices go to)."""
        if self.levels == 1:  # one level is I-JEPA: the same masks from the same draws
            masks = super().sample(batch_size, generator)
            return PyramidMasks(**vars(masks), context_sizes=(self.num_context,),
                                target_sizes=(masks.target_idx.shape[2],))
        block_sizes_ = self.level_block_sizes(generator)
        kept, missing = [], batch_size
        for _ in range(self.max_redraws):  # rounds of candidates; keep the valid ones in order
            n = math.ceil(1.1 * missing / max(self.acceptance, 0.05)) + 8
            draw = self._draw(n, block_sizes_, generator)
            keep = self._valid(draw, self.context_sizes).nonzero()[:missing, 0]
            kept.append(map_nested(draw, lambda t: t[keep]))
            missing -= len(keep)
            if missing == 0:
                break
        else:
            raise ValueError(f"mask settings leave fewer than {self.context_sizes} context cells per level too "
                             f"often (grid {self.grid_size}x{self.grid_size}, {self.levels} levels, "
                             f"{self.strategy}); use fewer --levels or "
                             "--num-targets, a smaller --target-scale, or a smaller --num-context")
        draw = {key: concat([d[key] for d in kept]) for key in kept[0]}
        context_parts, target_parts, target_sizes = [draw["context_idx"]], [], []
        for level in range(1, self.levels):
            k = self.context_sizes[level]
            context_parts.append(random_subset(draw["allowed"][level], k, generator) + self.offsets[level])
        for level, size in enumerate(block_sizes_[1]):
            if size is None:
                target_sizes.append(0)
                continue
            top, left = draw["corners"][level]
            target_parts.append(rectangle_indices(top, left, *size, self.level_grids[level]) + self.offsets[level])
            target_sizes.append(size[0] * size[1])
        return PyramidMasks(context_idx=torch.cat(context_parts, 1), target_idx=torch.cat(target_parts, -1),
                            context_visible=draw["fine_allowed"].sum(-1), target_union=draw["under_targets"],
                            num_patches=self.num_patches, context_sizes=self.context_sizes,
                            target_sizes=tuple(target_sizes))


def map_nested(value, fn):
    """Apply fn to every tensor in nested lists, tuples and dicts (None and other values pass through)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_nested(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_nested(v, fn) for v in value)
    return value


def concat(parts):
    """Concatenate along dim 0 the matching tensors of several map_nested-shaped values."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (list, tuple)):
        return type(first)(concat([p[i] for p in parts]) for i in range(len(first)))
    return first

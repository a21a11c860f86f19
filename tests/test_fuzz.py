"""Property-based fuzzing (hypothesis): the mask samplers over random grids, scales, aspect ratios and batch
sizes keep their invariants or raise one of their documented errors; the settings parsers (flags, YAML
configs, config.json sections) turn any input into settings or one UserError line, never a traceback."""

import contextlib
import io
import os
import re
import tempfile

import pytest
import torch
import yaml
from hypothesis import given, HealthCheck, settings, strategies as st

import train_ijepa
import train_pijepa
from common import as_user_error, exit_on_user_error
from masks import MultiBlockMaskSampler, PyramidMaskSampler
from checkpoints import OFFICIAL_FLAGS
from models import config_from_dict, PredictorConfig, pyramid_offsets, ViTConfig

# What the samplers document raising; anything else, or another message, is a bug.
SAMPLER_ERRORS = re.compile(r"must satisfy|must be at least 1|must lie in|mask settings leave fewer than|"
                            r"cannot make \d+ pyramid levels|coarse_only masking needs")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mostly(valid, invalid, odds=9):
    """valid values `odds` times as often as invalid ones (hypothesis would otherwise favour the simplest)."""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda ok: valid if ok else invalid)


def ranges(low, high, valid_low, valid_high):
    """(min, max) pairs, mostly valid, sometimes out of range or reversed."""
    valid = st.tuples(st.floats(valid_low, valid_high), st.floats(valid_low, valid_high)).map(sorted).map(tuple)
    return mostly(valid, st.tuples(st.floats(low, high), st.floats(low, high)))


sampler_settings = st.fixed_dictionaries({
    "num_targets": mostly(st.integers(1, 6), st.integers(-1, 0)),
    "target_scale": ranges(-0.5, 1.5, 0.02, 0.5),
    "target_aspect": ranges(-1.0, 5.0, 0.2, 4.0),
    "context_scale": ranges(-0.5, 1.5, 0.3, 1.0),
    "min_keep": st.integers(1, 12),
    "num_context": st.one_of(st.none(), st.integers(-2, 40)),
})


def check_indices(idx, low, high):
    """idx (..., K): inside [low, high), and sorted and unique along the last dimension."""
    assert idx.dtype == torch.long and bool(((idx >= low) & (idx < high)).all())
    assert bool((idx[..., 1:] > idx[..., :-1]).all())


def no_overlap(context_idx, target_idx):
    return all(not set(c.tolist()) & set(t.flatten().tolist()) for c, t in zip(context_idx, target_idx))


@FUZZ
@given(grid=st.one_of(st.integers(1, 14), st.tuples(st.integers(1, 14), st.integers(1, 14))),
       batch=st.integers(1, 9), seed=st.integers(0, 2**32), options=sampler_settings)
def test_multiblock_sampler_invariants(grid, batch, seed, options):
    try:
        sampler = MultiBlockMaskSampler(grid, **options)
        masks = sampler.sample(batch, torch.Generator().manual_seed(seed))
    except ValueError as e:
        assert SAMPLER_ERRORS.search(str(e)), str(e)
        return
    n = sampler.num_patches
    assert masks.context_idx.shape == (batch, sampler.num_context)
    assert masks.target_idx.shape[:2] == (batch, max(options["num_targets"], 1))
    check_indices(masks.context_idx, 0, n)
    check_indices(masks.target_idx, 0, n)
    blocks = torch.zeros(*masks.target_idx.shape[:2], n, dtype=torch.bool).scatter_(-1, masks.target_idx, True)
    grids = blocks.reshape(*blocks.shape[:2], sampler.grid_h, sampler.grid_w)  # whole rectangles of one size
    assert torch.equal(grids.sum((-2, -1)), grids.any(-1).sum(-1) * grids.any(-2).sum(-1))
    assert no_overlap(masks.context_idx, masks.target_idx)  # the context never sees a target patch
    assert bool((masks.context_visible >= sampler.num_context).all())


@FUZZ
@given(grid=st.sampled_from([1, 2, 3, 4, 6, 8, 12]), levels=mostly(st.integers(1, 3), st.integers(0, 5)),
       strategy=st.sampled_from(["full_downsampling", "full_resampling", "coarse_only", "fine_only"]),
       batch=st.integers(1, 6), seed=st.integers(0, 2**32), options=sampler_settings)
def test_pyramid_sampler_invariants(grid, levels, strategy, batch, seed, options):
    try:
        sampler = PyramidMaskSampler(grid, levels=levels, strategy=strategy, **options)
        masks = sampler.sample(batch, torch.Generator().manual_seed(seed))
    except ValueError as e:
        assert SAMPLER_ERRORS.search(str(e)), str(e)
        return
    offsets = pyramid_offsets(grid, levels)
    assert masks.context_idx.shape == (batch, sum(masks.context_sizes))
    assert masks.target_idx.shape == (batch, max(options["num_targets"], 1), sum(masks.target_sizes))
    for level, (start, end) in enumerate(zip(offsets, offsets[1:])):  # each level in its own slice and cells
        c0, t0 = sum(masks.context_sizes[:level]), sum(masks.target_sizes[:level])
        check_indices(masks.context_idx[:, c0: c0 + masks.context_sizes[level]], start, end)
        check_indices(masks.target_idx[..., t0: t0 + masks.target_sizes[level]], start, end)
    fine_context = masks.context_idx[:, : masks.context_sizes[0]]
    assert no_overlap(fine_context, masks.target_idx[..., : masks.target_sizes[0]])


# ----------------------------------------------------------------------------------------------------
# Settings parsers

PARSER = train_ijepa.build_parser()
FLAGS = sorted(a.dest for a in PARSER._actions if a.dest not in ("help", "config"))
OFFICIAL = sorted({section for section, _ in OFFICIAL_FLAGS} | {"meta", "mask"})
OFFICIAL_KEYS = sorted({key for _, key in OFFICIAL_FLAGS} | {"model_name", "use_bfloat16", "root_path",
                                                                         "num_enc_masks", "allow_overlap"})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True),
                    st.text(max_size=10), st.sampled_from(["digits", "tiny", "0.5", "1e-3", "true", "vit_tiny"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=2), max_leaves=4)
flat_configs = st.dictionaries(st.one_of(st.sampled_from(FLAGS), st.text(max_size=8)), values, max_size=6)
official_configs = st.dictionaries(st.sampled_from(OFFICIAL), st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(OFFICIAL_KEYS), st.text(max_size=6)), values, max_size=4), values),
    min_size=1, max_size=3)


def settle(parse):
    """parse() as a script runs it (exit_on_user_error): the settings, or exit 2 after one line on stderr."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return exit_on_user_error(parse)()
    except SystemExit as e:
        lines = stderr.getvalue().splitlines()
        assert e.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr.getvalue()
    return None


def build_everything(args, script):
    """Model configs and, for grids small enough to sample quickly, the mask sampler and a draw."""
    encoder_cfg = train_ijepa.encoder_config(args)
    levels = getattr(args, "levels", 1)
    train_ijepa.predictor_config(args, encoder_cfg, levels)
    if encoder_cfg.grid_size <= 16 and args.num_targets <= 8:
        sampler = script.build_mask_sampler(args, encoder_cfg.grid_size)
        as_user_error(sampler.sample, 2, torch.Generator().manual_seed(0))


@settings(max_examples=300, deadline=None)
@given(config=st.one_of(flat_configs, official_configs), pyramid=st.booleans())
def test_any_yaml_config_gives_settings_or_one_line(config, pyramid):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        script = train_pijepa if pyramid else train_ijepa
        parser = train_pijepa.build_pyramid_parser() if pyramid else train_ijepa.build_parser()

        def parse():
            args = train_ijepa.parse_args(["--config", path], parser)
            if pyramid:
                train_pijepa.finish_pyramid_args(args)
            build_everything(args, script)
            return args

        settle(parse)


tokens = st.one_of(st.sampled_from([f"--{name.replace('_', '-')}" for name in FLAGS] + ["--no-flip", "--bogus"]),
                   st.text(max_size=6), st.integers(-5, 300).map(str), st.floats(allow_nan=True).map(str))


@settings(max_examples=300, deadline=None)
@given(argv=st.lists(tokens, max_size=8))
def test_any_command_line_gives_settings_or_one_line(argv):
    def parse():
        args = train_ijepa.parse_args(argv, train_ijepa.build_parser())
        build_everything(args, train_ijepa)
        return args

    settle(parse)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.one_of(st.sampled_from(
    ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "patch_embed",
     "pred_dim", "grid_size", "levels", "layer_norm_eps"]), st.text(max_size=6)), values, max_size=5))
def test_any_config_json_section_gives_a_config_or_a_value_error(values):
    for cls in (ViTConfig, PredictorConfig):
        try:
            config_from_dict(cls, values)
        except ValueError as e:
            assert "\n" not in str(e)


@pytest.mark.parametrize("values, message", [
    ({"patch_size": 0}, "ViTConfig.patch_size = 0 must be a positive"),
    ({"depth": -1}, "ViTConfig.depth = -1 must be a positive"),
    ({"num_heads": 0}, "PredictorConfig.num_heads = 0 must be a positive"),
])
def test_zero_and_negative_sizes_in_config_json_are_refused(values, message):
    cls = PredictorConfig if "num_heads" in values else ViTConfig
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict(cls, values)

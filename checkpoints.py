"""File formats around models.py: our run folders (config.json + model.safetensors), Meta's official
I-JEPA checkpoints and yaml files (read, and written by export_official), and the pointers a
hierarchical-head run keeps to its backbone. models.load_encoder / load_predictor / load_hierarchical_head
are the one-call loaders built on these.

    python checkpoints.py export-official out/c10 c10.pth.tar     # a run as an official checkpoint + yaml
"""

import json
import os

import torch

from models import (config_from_dict, load_state_strict, MLPPredictorConfig, Predictor, PredictorConfig, ResNetConfig,
                    split_state, VIT_PRESETS,
                    vit_config, VisionTransformer, ViTConfig)

# ----------------------------------------------------------------------------------------------------
# Our own output folders (config.json + model.safetensors)


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


def encoder_config_of(run_config):
    """ViTConfig or ResNetConfig (its `kind` says so) of a run's config.json."""
    values = run_config.get("encoder")
    if isinstance(values, dict) and values.get("kind") == "resnet":
        return config_from_dict(ResNetConfig, values)
    return config_from_dict(ViTConfig, values)


def predictor_config_of(run_config):
    """PredictorConfig or MLPPredictorConfig (its `kind` says so) of a run's config.json."""
    values = run_config.get("predictor")
    if isinstance(values, dict) and values.get("kind") == "mlp":
        return config_from_dict(MLPPredictorConfig, values)
    return config_from_dict(PredictorConfig, values)


def check_checkpoint_path(path, config):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass a run folder or an official .pth.tar checkpoint")
    if config is not None and not is_official_checkpoint(path):
        raise ValueError(f"a config ({config}) is only for official .pth.tar checkpoints; {path} is a run folder, "
                         "whose config.json describes it")


def resolve_pointer(folder, absolute, relative):
    """A file a head run points to: at its absolute path, or at the same place relative to the run when
    the run and the file moved together."""
    for candidate in (absolute, os.path.join(folder, relative)):
        if os.path.exists(candidate):
            return os.path.normpath(candidate)
    raise FileNotFoundError(f"{folder} points to {absolute}, which is missing; put it back or retrain the head "
                            "with --backbone")


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
# Each is read as the flag it names.
ARCHITECTURE_FLAGS = {"depth": "depth", "num_heads": "heads", "mlp_ratio": "mlp_ratio", "pred_num_heads": "pred_heads",
                      "pred_mlp_ratio": "pred_mlp_ratio"}
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


# The official yaml's keys -> our flag names: the one reading of that format, by train_ijepa.py --config
# (every setting) and by official_configs (the architecture).
OFFICIAL_FLAGS = {
    ("data", "batch_size"): "batch_size", ("data", "crop_size"): "image_size", ("data", "crop_scale"): "crop_scale",
    ("data", "use_horizontal_flip"): "flip", ("mask", "num_pred_masks"): "num_targets",
    ("mask", "pred_mask_scale"): "target_scale", ("mask", "enc_mask_scale"): "context_scale",
    ("mask", "aspect_ratio"): "target_aspect", ("mask", "min_keep"): "min_keep", ("mask", "patch_size"): "patch_size",
    ("meta", "pred_depth"): "pred_depth", ("meta", "pred_emb_dim"): "pred_dim", ("optimization", "epochs"): "epochs",
    ("optimization", "ema"): "ema", ("optimization", "lr"): "lr", ("optimization", "start_lr"): "start_lr",
    ("optimization", "final_lr"): "final_lr", ("optimization", "warmup"): "warmup_epochs",
    ("optimization", "weight_decay"): "weight_decay", ("optimization", "final_weight_decay"): "final_weight_decay",
    ("logging", "folder"): "out",
}
# Keys that describe their cluster set-up or features done differently here: read and ignored.
OFFICIAL_IGNORED = {("data", "num_workers"), ("data", "pin_mem"), ("data", "color_jitter_strength"),
                    ("data", "use_color_distortion"), ("data", "use_gaussian_blur"), ("data", "image_folder"),
                    ("meta", "copy_data"), ("meta", "load_checkpoint"), ("meta", "read_checkpoint"),
                    ("logging", "write_tag"), ("optimization", "ipe_scale"), ("mask", "num_enc_masks"),
                    ("mask", "allow_overlap")}


def official_flags(settings, source="the yaml"):
    """(flags, unknown): official yaml settings as our flag names and values, and the section.key names
    this reading does not know (training refuses them; loading a checkpoint reads only the architecture)."""
    flags, unknown = {}, []
    for section, values in settings.items():
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        for key, value in values.items():
            if (section, key) in OFFICIAL_FLAGS:
                flags[OFFICIAL_FLAGS[section, key]] = value
            elif (section, key) == ("meta", "model_name"):
                flags["model"] = str(value).removeprefix("vit_")
            elif (section, key) == ("meta", "use_bfloat16"):
                flags["mixed_precision"] = "bf16" if value else "no"
            elif (section, key) == ("data", "root_path"):
                flags["dataset"] = "imagefolder:" + os.path.join(str(value), str(values.get("image_folder", "")))
            elif (section, key) == ("meta", "architecture"):
                if not isinstance(value or {}, dict):
                    raise ValueError(f"{source}: meta.architecture must be a mapping of {list(ARCHITECTURE_FLAGS)}")
                overrides = dict(value or {})
                unknown_overrides = sorted(set(overrides) - set(ARCHITECTURE_FLAGS))
                if unknown_overrides:
                    raise ValueError(f"{source}: unknown meta.architecture keys {unknown_overrides}; known: "
                                     f"{list(ARCHITECTURE_FLAGS)}")
                flags.update({ARCHITECTURE_FLAGS[k]: v for k, v in overrides.items()})
            elif (section, key) not in OFFICIAL_IGNORED:
                unknown.append(f"{section}.{key}")
    return flags, unknown


def official_configs(settings, source="the yaml"):
    """(ViTConfig, PredictorConfig) from official yaml settings, with the official init_model's defaults.
    The predictor has the encoder's head count and an MLP ratio of 4, as in the official code."""
    flags, _ = official_flags(settings, source)
    preset = flags.get("model")
    if preset not in VIT_PRESETS:
        raise ValueError(f"{source}: meta.model_name {(settings.get('meta') or {}).get('model_name')!r} is not an "
                         f"official model; use one of {', '.join('vit_' + p for p in VIT_PRESETS)}")
    encoder = vit_config(preset, img_size=flags.get("image_size", 224), patch_size=flags.get("patch_size", 16),
                         depth=flags.get("depth"), num_heads=flags.get("heads"), mlp_ratio=flags.get("mlp_ratio"),
                         layer_norm_eps=OFFICIAL_LAYER_NORM_EPS)
    predictor = PredictorConfig(
        embed_dim=encoder.embed_dim, pred_dim=flags.get("pred_dim", 384), depth=flags.get("pred_depth", 6),
        num_heads=flags.get("pred_heads", encoder.num_heads),
        mlp_ratio=flags.get("pred_mlp_ratio", OFFICIAL_PREDICTOR_MLP_RATIO), grid_size=encoder.grid_size,
        layer_norm_eps=OFFICIAL_LAYER_NORM_EPS)
    return encoder, predictor


def official_settings(encoder, predictor):
    """The inverse of official_configs: the yaml settings that rebuild these configs."""
    if not isinstance(encoder, ViTConfig) or not isinstance(predictor, PredictorConfig):
        raise ValueError("the official layout holds a ViT encoder and a transformer predictor, not a "
                         f"{type(encoder).__name__} and {type(predictor).__name__}; export a ViT run")
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
    settings = official_settings(encoder_cfg, predictor_config_of(config))
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
# Command line: python checkpoints.py export-official OUT_FOLDER FILE.pth.tar


# timm model folders (Meta's checkpoints load through load_encoder first, so both reach timm the same way)

TIMM_ARCHITECTURES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                      1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224", 1408: "vit_giant_patch14_224"}


def export_timm(source, folder, which="target", config=None):
    """Write an encoder (a run folder or an official checkpoint, as load_encoder reads them) as a timm
    model folder: model.safetensors with timm's parameter names and timm's config.json (architecture,
    model_args, pretrained_cfg with the ImageNet normalisation of data.normalize), the layout of a timm model
    on the Hugging Face hub, which `timm.create_model("local-dir:FOLDER", pretrained=True)` loads. The
    architecture name is the preset's timm ViT of that width; model_args override all of its shape."""
    from models import load_encoder, timm_vit_kwargs

    encoder = load_encoder(source, which, config)
    kwargs = timm_vit_kwargs(encoder.cfg)
    architecture = TIMM_ARCHITECTURES.get(encoder.cfg.embed_dim, "vit_base_patch16_224")  # model_args set the rest
    timm_config = {"architecture": architecture, "num_classes": 0, "num_features": encoder.cfg.embed_dim,
                   "global_pool": "avg", "model_args": kwargs,
                   "pretrained_cfg": {"input_size": [encoder.cfg.in_chans, encoder.cfg.img_size, encoder.cfg.img_size],
                                      "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0,
                                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                      "num_classes": 0, "classifier": "head"}}
    from safetensors.torch import save

    os.makedirs(folder, exist_ok=True)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    replace_file(os.path.join(folder, "model.safetensors"), lambda f: f.write(save(state)))
    replace_file(os.path.join(folder, "config.json"),
                 lambda f: f.write((json.dumps(timm_config, indent=2) + "\n").encode()))
    return kwargs



def main(argv=None):
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="checkpoints.py", description="Checkpoint file utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export-official", help="write a run folder as an official I-JEPA checkpoint "
                                 "(FILE.pth.tar) with its yaml beside it (FILE.yaml)")
    export.add_argument("folder", help="a run folder (config.json + model.safetensors)")
    export.add_argument("file", help="the .pth.tar file to write")
    to_timm = commands.add_parser("export-timm", help="write an encoder as a timm model folder (model.safetensors "
                                  "+ config.json) for timm.create_model('local-dir:FOLDER', pretrained=True)")
    to_timm.add_argument("source", help="a run folder, or an official I-JEPA .pth.tar checkpoint")
    to_timm.add_argument("folder", help="the timm folder to write")
    to_timm.add_argument("--encoder", default="target", choices=("target", "context"))
    to_timm.add_argument("--config", help="an official checkpoint's yaml (default: the one beside it)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export-official":
            yaml_path = export_official(args.folder, args.file)
            print(f"wrote {args.file} and {yaml_path}")
        else:
            kwargs = export_timm(args.source, args.folder, args.encoder, args.config)
            print(f"wrote {args.folder}/model.safetensors and {args.folder}/config.json; in Python: "
                  f"timm.create_model('local-dir:{args.folder}', pretrained=True), or "
                  f"VisionTransformer(**{kwargs}) and load_state_dict of the safetensors file")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""timm interop: a run folder's and an official checkpoint's encoder in timm's VisionTransformer give our
tokens; the README's snippet runs as written; export-timm writes a folder timm.create_model loads."""

import os
import re
import shutil

import pytest
import torch

from conftest import ROOT, run_script
from models import load_encoder, timm_vit_kwargs, vit_config, VisionTransformer
from test_official import official  # noqa: F401  (the fixture: a tiny checkpoint in Meta's layout)

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402


def assert_same_outputs(ours, theirs, image_size):
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = ours(images)  # (B, N, D)
        torch.testing.assert_close(theirs.forward_features(images), tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(images), tokens.mean(1), atol=1e-5, rtol=1e-5)  # (B, D) pre-logits


def timm_from(encoder):
    vit = TimmViT(**timm_vit_kwargs(encoder.cfg)).eval()
    missing, unexpected = vit.load_state_dict(encoder.state_dict(), strict=True)
    assert not missing and not unexpected
    return vit


def test_a_run_folders_encoder_in_timm_gives_the_same_tokens(trained_run):
    for which in ("target", "context"):
        encoder = load_encoder(str(trained_run), which)
        assert_same_outputs(encoder, timm_from(encoder), 32)


def test_an_official_checkpoint_through_our_loader_in_timm_gives_meta_models_tokens(official):  # noqa: F811
    encoder = load_encoder(official["path"], "target", config=official["yaml"])
    vit = timm_from(encoder)
    assert_same_outputs(official["target"], vit, 32)  # the reference re-implementation of Meta's code


def test_wider_presets_map_too():
    encoder = VisionTransformer(vit_config("small", img_size=48, patch_size=16, depth=2)).eval()
    assert_same_outputs(encoder, timm_from(encoder), 48)


def test_what_timm_cannot_hold_is_refused_by_name():
    with pytest.raises(ValueError, match="conv patch stem"):
        timm_vit_kwargs(vit_config("tiny", patch_embed="conv"))


def readme_snippet(marker):
    """The README's python block that contains `marker`."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one README python block with {marker!r}"
    return found[0]


@pytest.fixture(scope="module")
def quick_start_run(tmp_path_factory):
    """The quick start's model (tiny preset, 32 px, patch 4: the numbers in the README's snippet), one step."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    run_script("train_ijepa.py", "--dataset", "digits", "--epochs", "1", "--max-steps", "1", "--batch-size", "16",
               "--max-per-class", "4", "--monitor-size", "16", "--out", out, "--data-root", out.parent)
    return out


def test_the_readme_timm_snippet_runs_as_written(quick_start_run, tmp_path, monkeypatch):
    shutil.copytree(quick_start_run, tmp_path / "out" / "demo")  # where the snippet reads it
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(ROOT)
    scope = {}
    exec(readme_snippet('load_file("out/demo/model.safetensors")'), scope)
    vit = scope["vit"]
    assert vit.num_classes == 10  # the snippet adds a fresh 10-class head for fine-tuning
    encoder = load_encoder(str(quick_start_run))
    vit.reset_classifier(0)
    assert_same_outputs(encoder, vit.eval(), 32)


def test_the_readme_snippet_for_metas_checkpoints_runs_as_written(official, tmp_path, monkeypatch):  # noqa: F811
    shutil.copy(official["path"], tmp_path / "IN1K-vit.h.14-300e.pth.tar")  # the fake under the README's names
    shutil.copy(official["yaml"], tmp_path / "in1k_vith14_ep300.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(ROOT)
    scope = {}
    exec(readme_snippet("timm_vit_kwargs(encoder.cfg)"), scope)
    assert_same_outputs(official["target"], scope["vit"].eval(), 32)


def test_export_timm_writes_a_folder_timm_create_model_loads(trained_run, official, tmp_path):  # noqa: F811
    for source, reference, extra in ((trained_run, load_encoder(str(trained_run)), ()),
                                     (official["path"], official["target"], ("--config", official["yaml"]))):
        folder = tmp_path / os.path.basename(str(source)).split(".")[0]
        proc = run_script("models.py", "export-timm", source, folder, *extra)
        assert f"local-dir:{folder}" in proc.stdout
        vit = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert_same_outputs(reference, vit, 32)
        assert timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=10).num_classes == 10

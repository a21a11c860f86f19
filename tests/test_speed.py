"""The fast input pipeline and step: batched crop/flip against torchvision, prefetched masks against direct
sampling, streamed batches against in-memory ones, compiled against eager, the FLOP count against torch's
counter, and bench.py's JSON line."""

import copy
import json
import shutil
import threading
import time

import pytest
import torch
from PIL import Image
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.utils.flop_counter import FlopCounterMode

from conftest import run_script, TINY_TRAIN
from data import (InMemoryBatches, load_split, normalize, open_stream, Prefetcher, RandomResizedCropFlip,
                  step_generator, StreamedBatches, UserError)
from masks import MultiBlockMaskSampler, PyramidMaskSampler
from models import IJEPA, PredictorConfig, vit_config
from test_masks import check_invariants
from run import check_compile, compile_model, peak_tflops


def tiny_ijepa(patch_embed="strided", img_size=16, depth=1):
    torch.manual_seed(0)
    encoder = vit_config("tiny", img_size=img_size, patch_size=4, depth=depth, patch_embed=patch_embed)
    predictor = PredictorConfig(embed_dim=192, pred_dim=48, depth=depth, num_heads=3, grid_size=img_size // 4)
    return IJEPA(encoder, predictor)


# ----------------------------------------------------------------------------------------------------
# Batched augmentation


def test_batched_crop_flip_matches_torchvision_per_image():
    """Each image of the batch against torchvision's resized_crop (+ hflip), bilinear without antialias, on
    the same integer boxes. Both sample output pixel j of a crop [left, left + w) at source column
    left + (j + 0.5) w / size - 0.5; torchvision clamps that position to the crop, grid_sample to the image,
    so the two differ only where it falls outside the crop (within half a source pixel of its edge, when the
    crop is enlarged). Everywhere else they must agree to float rounding."""
    from torchvision.transforms.v2 import functional as TF

    size, B = 16, 6
    images = torch.randint(0, 256, (B, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 24, 24], [3, 5, 10, 12], [8, 2, 16, 7], [0, 11, 24, 13], [5, 5, 6, 6],
                          [1, 0, 20, 22]], dtype=torch.float)
    flips = torch.tensor([False, True, False, True, True, False])
    out = RandomResizedCropFlip(size).apply(images, boxes, flips)
    compared = 0
    for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
        reference = TF.resized_crop(images[i].float(), top, left, h, w, [size, size],
                                    interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        valid = inside_crop(h, size)[:, None] & inside_crop(w, size)[None, :]
        if flips[i]:
            reference, valid = TF.hflip(reference), valid.flip(-1)
        torch.testing.assert_close(out[i][:, valid], normalize(reference[None] / 255.0)[0][:, valid],
                                   atol=1e-4, rtol=1e-4)
        compared += int(valid.sum())
    assert compared > 0.8 * B * size * size  # the comparison covers most pixels, not a sliver


def inside_crop(extent, size):
    """Which of `size` output pixels sample a crop of `extent` source pixels at positions within it."""
    position = (torch.arange(size) + 0.5) * extent / size - 0.5
    return (position >= 0) & (position <= extent - 1)


# ----------------------------------------------------------------------------------------------------
# Masks prefetched on a background thread


@pytest.mark.parametrize("sampler", [MultiBlockMaskSampler(8, min_keep=4), MultiBlockMaskSampler(14),
                                     PyramidMaskSampler(8, levels=2)], ids=["8x8", "14x14", "pyramid"])
def test_prefetched_masks_equal_direct_sampling_and_restart_anywhere(sampler):
    draw = lambda k: sampler.sample(16, step_generator(11, k, rank=1))
    stream = Prefetcher(draw, "cpu", depth=2)
    for k in [0, 1, 2, 3, 4, 2, 3, 9, 10]:  # in order, then a jump back and one forward, as a resumed run does
        got, want = stream.get(k), draw(k)
        assert vars(got).keys() == vars(want).keys()
        for name, value in vars(want).items():
            mine = getattr(got, name)
            assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, (k, name)
        if type(sampler) is MultiBlockMaskSampler:
            check_invariants(got, sampler, 16)
    stream.close()
    assert not torch.equal(draw(0).context_idx, draw(1).context_idx)  # the draws differ from step to step


def test_prefetcher_raises_the_producers_error_where_it_is_read_and_stops_its_thread():
    def make(k):
        if k == 2:
            raise ValueError("mask settings leave too few patches")
        return torch.full((2,), k)

    before = threading.active_count()
    stream = Prefetcher(make, "cpu")
    assert stream.get(0).tolist() == [0, 0] and stream.get(1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="too few patches"):
        stream.get(2)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


# ----------------------------------------------------------------------------------------------------
# Streaming from disk


def write_image_folder(root, classes=3, per_class=12, size=12):
    generator = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size + i % 3, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(root / f"class{c}" / f"{i:02d}.png")


def test_streamed_batches_equal_in_memory_batches(tmp_path):
    write_image_folder(tmp_path / "images")
    spec = f"imagefolder:{tmp_path / 'images'}"
    augment = RandomResizedCropFlip(8)
    in_memory = InMemoryBatches(load_split(spec, "train", storage_size=16, seed=5, cache=False), 4, augment, "cpu",
                                seed=3)
    streamed = StreamedBatches(open_stream(spec, "train", 16, seed=5), 4, augment, "cpu", seed=3, workers=1)
    assert len(streamed) == len(in_memory) == 8  # 36 images, 10% of each class held out, batches of 4
    for epoch, index, step in [(0, 0, 0), (0, 1, 1), (0, 7, 7), (1, 0, 8), (1, 5, 13), (1, 6, 14), (0, 2, 2)]:
        (a, labels_a), (b, labels_b) = in_memory.batch(epoch, index, step), streamed.batch(epoch, index, step)
        assert torch.equal(a, b) and torch.equal(labels_a, labels_b), (epoch, index)
    stream = open_stream(spec, "test", 16, seed=5)
    held_out = stream.load(range(len(stream)))
    in_memory_test = load_split(spec, "test", storage_size=16, seed=5, cache=False)
    assert torch.equal(held_out.images, in_memory_test.images)
    picked = stream.load([2, 0])
    assert torch.equal(picked.images, in_memory_test.images[[2, 0]])
    assert torch.equal(picked.labels, in_memory_test.labels[[2, 0]])


def test_streaming_bad_images_and_specs_are_one_line_errors(tmp_path):
    write_image_folder(tmp_path / "images", classes=2, per_class=8)
    (tmp_path / "images" / "class0" / "00.png").write_bytes(b"not an image")
    spec = f"imagefolder:{tmp_path / 'images'}"
    strict = StreamedBatches(open_stream(spec, "train", 16), 14, lambda x, g: x, "cpu", workers=0)
    with pytest.raises(UserError, match="00.png") as error:
        strict.batch(0, 0, 0)
    assert "\n" not in str(error.value)
    tolerant = StreamedBatches(open_stream(spec, "train", 16, skip_bad_images=True), 14, lambda x, g: x, "cpu",
                               workers=0)
    images, labels = tolerant.batch(0, 0, 0)
    assert images.shape == (14, 3, 16, 16) and (labels >= 0).all()
    with pytest.raises(UserError, match="imagefolder"):
        open_stream("cifar10", "train", 32)


def test_train_streams_an_image_folder(tmp_path):
    write_image_folder(tmp_path / "images", per_class=20)
    out = tmp_path / "run"
    run_script("train_ijepa.py", *TINY_TRAIN, "--dataset", f"imagefolder:{tmp_path / 'images'}", "--image-size", "32",
               "--stream", "--workers", "1", "--epochs", "2", "--out", out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "mfu" not in records[-1]  # MFU is logged on CUDA only


# ----------------------------------------------------------------------------------------------------
# Compiled step, CUDA graphs, FLOPs


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_step_gives_the_eager_loss_and_gradients():
    eager = tiny_ijepa()
    compiled_source = copy.deepcopy(eager)
    compiled = compile_model(compiled_source)
    masks = MultiBlockMaskSampler(4, min_keep=4, num_targets=2).sample(4, torch.Generator().manual_seed(0))
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        loss, _ = model(images, **masks.model_inputs())
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_source.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cuda_graphs_are_refused_off_cuda_with_one_line(tmp_path):
    with pytest.raises(UserError, match="--cuda-graphs needs a CUDA GPU"):
        check_compile(True, True, torch.device("cpu"))
    check_compile(False, False, torch.device("cpu"))
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--cuda-graphs", "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--cuda-graphs" in proc.stderr


def test_compile_without_a_cpu_compiler_is_refused_with_one_line(tmp_path):
    """Inductor reads CXX when it imports; a compiler that does not exist leaves it none to build CPU kernels."""
    proc = run_script("train_ijepa.py", *TINY_TRAIN, "--compile", "--out", tmp_path / "run", check=False,
                      env={"CXX": str(tmp_path / "no-such-c++")})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "needs a C++ compiler" in proc.stderr and "drop --compile" in proc.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("patch_embed", ["strided", "conv"])
def test_flop_formula_equals_torch_flop_counter(patch_embed):
    """The analytic count against torch's counter on a real forward and backward (math attention, which
    the counter sees as matrix products and whose backward does not recompute the scores)."""
    model = tiny_ijepa(patch_embed, img_size=32, depth=2)
    masks = MultiBlockMaskSampler(8).sample(4, torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = model(torch.randn(4, 3, 32, 32), **masks.model_inputs())
        loss.backward()
    assert counter.get_total_flops() == 4 * model.flops_per_image(**masks.model_inputs())


def test_peak_table_matches_gpu_names():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA A10") == 125.0 and peak_tflops("NVIDIA A10G") is None
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None


# ----------------------------------------------------------------------------------------------------
# bench.py


def test_bench_prints_one_json_line_with_the_documented_keys():
    proc = run_script("bench.py", "--preset", "cpu_tiny", "--steps", "2", "--warmup", "1", "--baseline-workers", "1")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"preset", "device", "cpu_fast_bf16", "threads", "matmul_tflops", "batch_size", "image_size", "mode",
            "precision", "gflops_per_image", "ijepa", "baseline", "speedup", "pijepa", "torch"} <= result.keys()
    assert result["mode"] == "eager" and result["gflops_per_image"] > 0 and result["matmul_tflops"] > 0
    assert result["precision"] == ("bf16" if result["cpu_fast_bf16"] else "fp32")  # the CPU's fast path
    assert result["ijepa"]["matmul_fraction"] == pytest.approx(result["ijepa"]["tflops"] / result["matmul_tflops"])
    paths = [result["ijepa"], result["baseline"]] + ([result["pijepa"]] if result["pijepa"] is not None else [])
    for path in paths:
        assert {"images_per_s", "step_ms", "tflops", "mfu", "peak_mem_gib"} <= path.keys()
        assert path["images_per_s"] > 0 and path["step_ms"] > 0 and path["tflops"] > 0 and path["mfu"] is None
        assert path["images_per_s"] == pytest.approx(16 / (path["step_ms"] / 1e3))
    assert {"augment_ms", "mask_ms", "input_share"} <= result["ijepa"].keys() and result["ijepa"]["input_share"] > 0
    assert result["speedup"] == pytest.approx(result["ijepa"]["images_per_s"] / result["baseline"]["images_per_s"])
    if result["pijepa"] is not None:
        assert result["pijepa"]["levels"] >= 1 and result["pijepa"]["step_ratio"] > 0

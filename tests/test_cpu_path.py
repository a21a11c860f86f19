"""The CPU path: plain-op attention equals SDPA, and the precision default follows the hardware."""

import pytest
import torch
import torch.nn.functional as F

import common
from models import attention_math


@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (4, 6, 64, 32)])
def test_attention_math_equals_sdpa_forward_and_backward(shape):
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=torch.float64)
    ours = torch.autograd.grad(attention_math(q, k, v), (q, k, v), grad)
    reference = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), grad)
    torch.testing.assert_close(attention_math(q, k, v), F.scaled_dot_product_attention(q, k, v))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def test_precision_default_follows_the_cpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    assert common.default_mixed_precision(None, cuda_available=False) == "bf16"
    assert common.default_mixed_precision("no", cuda_available=False) == "no"  # the flag wins
    assert common.default_mixed_precision(None, cuda_available=True) is None  # GPUs: Accelerate's setting
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch --mixed_precision no
    assert common.default_mixed_precision(None, cuda_available=False) is None
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: False)
    assert common.default_mixed_precision(None, cuda_available=False) is None
    with common.inference_autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")  # frozen features in fp32 too
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    with common.inference_autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_cpu_detection_agrees_with_the_flags_linux_reports():
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert common.cpu_has_fast_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})

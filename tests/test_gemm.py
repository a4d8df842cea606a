"""The fp32-result GEMM helpers: exact float32 products of half inputs, and errors that surface."""

import pytest
import torch

from ngrpo_kernels.ops import gemm


def test_half_inputs_give_float32_products(gen):
    a = torch.randn(5, 7, generator=gen).bfloat16()
    b = torch.randn(7, 3, generator=gen).bfloat16()
    out = torch.empty(5, 3)
    want = a.double() @ b.double()
    torch.testing.assert_close(gemm.mm_fp32(a, b, out).double(), want, rtol=1e-2, atol=1e-2)
    acc = torch.ones(5, 3)
    torch.testing.assert_close(gemm.addmm_fp32(acc, a, b).double(), want + 1, rtol=1e-2, atol=1e-2)
    assert isinstance(gemm._has_out_dtype("cpu"), bool)  # decided once, never raises


def test_out_of_memory_is_not_retried(monkeypatch):
    """An error inside the out_dtype GEMM (out of memory, say) propagates: no silent retry with rounded
    logits and twice the memory."""
    monkeypatch.setattr(gemm, "_fp32_output", lambda a: True)

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(torch, "mm", oom)
    monkeypatch.setattr(torch, "addmm", oom)
    a = torch.ones(2, 2, dtype=torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError):
        gemm.mm_fp32(a, a, torch.empty(2, 2))
    with pytest.raises(torch.OutOfMemoryError):
        gemm.addmm_fp32(torch.zeros(2, 2), a, a)


def test_fp16_grad_scale_puts_the_largest_factor_in_one_to_two():
    """S is a power of two with max |g| * S in [1, 2): the largest factor keeps fp16's full precision and no
    factor can overflow (a ceil instead of the floor gave [0.5, 1)); a missing factor is skipped, all zeros give 1."""
    for values, want in (([3.0, -0.1], 0.5), ([1.0], 1.0), ([-0.75, 1e-3], 2.0), ([1e-6], 2.0 ** 20),
                         ([6e4], 2.0 ** -15), ([0.0, 0.0], 1.0)):
        s = gemm.fp16_grad_scale(torch.tensor(values), None)
        assert s.dtype == torch.float32 and s.dim() == 0 and float(s) == want, (values, float(s))
    g_lp, g_h = torch.tensor([1e-5, -3e-5]), torch.tensor([2e-6, 0.0])
    inverse = gemm.scale_fp16_grads(torch.float16, g_lp, g_h)
    assert 1.0 <= g_lp.abs().max().item() < 2.0 and float(inverse) == 2.0 ** -16  # in place, exactly
    assert gemm.scale_fp16_grads(torch.bfloat16, g_lp) is None

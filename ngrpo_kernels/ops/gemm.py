"""GEMMs with float32 results for any input dtype, shared by the chunked CPU schedules and the cuBLAS
path of the GPU schedule.

On CUDA, bf16 / fp16 inputs use torch's ``out_dtype=torch.float32`` (cuBLAS accumulates in fp32 and
writes fp32: no rounding of logits or of the dW accumulator to half precision). Whether this torch has
that argument is decided once per device type, on a 1x1 product, not by catching errors in the hot path
(an out-of-memory error there must surface, not trigger a retry with twice the memory); without it the
half-precision product is widened after the fact. float32 inputs go straight through.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _has_out_dtype(device_type: str) -> bool:
    a = torch.ones(1, 1, dtype=torch.bfloat16, device=device_type)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # no such argument, or not for this device
        return False
    return True


def _fp32_output(a: torch.Tensor) -> bool:
    return a.is_cuda and _has_out_dtype("cuda")


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (float32) = a @ b."""
    if a.dtype == torch.float32 or b.dtype == torch.float32:
        return torch.matmul(a.to(b.dtype), b, out=out)
    if _fp32_output(a):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return out.copy_(a @ b)


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (float32) += a @ b."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if _fp32_output(a):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.add_(a @ b)


def fp16_grad_scale(*grads: torch.Tensor | None) -> torch.Tensor:
    """A power of two S with max |g| * S in [1, 2) over the given per-token gradient factors, as a 0-dim float32
    tensor on their device (no sync; 1 when they are all 0).

    fp16 has 5 exponent bits: a dZ = g (onehot - p) whose factor g carries a 1/N mean falls below fp16's
    smallest normal (6e-5) or subnormal (6e-8) number at a few thousand tokens, and the -g p terms vanish
    (at the 7B head every p below ~1e-3). The fp16 schedules form dZ from S * g, chunk by chunk, and multiply
    the chunk's GEMM products by 1 / S before adding them up; a power of two makes both steps exact. S comes
    from the chunk's own largest factor, so dZ never overflows either. bf16 and float32 share float32's
    exponent range and need no scale."""
    m = torch.stack([g.detach().abs().amax().float() for g in grads if g is not None]).amax()
    e = torch.floor(torch.log2(m)).clamp(-126, 126)
    return torch.where(m > 0, torch.exp2(-e), 1.0)


def scale_fp16_grads(dtype: torch.dtype, *grads: torch.Tensor | None) -> torch.Tensor | None:
    """For fp16: multiplies the per-token factors in place by ``fp16_grad_scale`` and returns its inverse (what
    the GEMM products are multiplied by); for other dtypes None and nothing changes."""
    if dtype != torch.float16:
        return None
    s = fp16_grad_scale(*grads)
    for g in grads:
        if g is not None:
            g.mul_(s)
    return s.reciprocal()

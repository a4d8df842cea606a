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

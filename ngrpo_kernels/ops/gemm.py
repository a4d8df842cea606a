"""GEMMs with float32 results for any input dtype, shared by the chunked schedules.

On CUDA, bf16 / fp16 inputs use torch's ``out_dtype=torch.float32`` (cuBLAS accumulates in fp32 and
writes fp32: no rounding of logits or of the dW accumulator to half precision); where torch lacks it,
the half-precision product is widened after the fact. float32 inputs go straight through.
"""

from __future__ import annotations

import torch


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (float32) = a @ b."""
    if a.dtype == torch.float32 or b.dtype == torch.float32:
        return torch.matmul(a.to(b.dtype), b, out=out)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError):  # older torch: no out_dtype
            pass
    return out.copy_(a @ b)


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (float32) += a @ b."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError):
            pass
    return acc.add_(a @ b)

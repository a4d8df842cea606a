"""The fused loss's backward on the TRITON backend: ``(g * scale).to(dtype)`` streamed by one kernel, 4 bytes
read and 2 written per element (3.3 GB for the Qwen2.5-7B head's float32 dW, ~0.9 ms at 3.7 TB/s), where
torch's ``mul(g, scale, out=<bf16 tensor>)`` takes a mixed-dtype path that an H200 ran at ~1.4 TB/s
(2.34 ms, docs/kernels.md). ``scale`` is the upstream gradient, a 0-dim device tensor: read by the
kernel, never by the host."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import cdiv
from ..launcher import direct

BLOCK = 4096


@triton.jit
def _scaled_cast_kernel(SRC, SCALE, DST, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(SCALE).to(tl.float32)
    x = tl.load(SRC + offs, mask=mask, other=0.0)
    tl.store(DST + offs, (x * scale).to(DST.dtype.element_ty), mask=mask)


def scaled_cast_(g: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = (g * scale) rounded to out's dtype; g and out contiguous, of one shape, scale 0-dim."""
    n = g.numel()
    if n:
        direct(_scaled_cast_kernel)[(cdiv(n, BLOCK),)](g, scale, out, n, BLOCK=BLOCK, num_warps=4 if g.is_cuda else 1)
    return out

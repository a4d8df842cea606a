"""Group advantages, Triton: one segmented-statistics kernel.

Launch: grid ``(B,)``. Program ``p`` looks at sorted position ``p``; only the first position of a
segment (a group) does work, the others run zero-trip loops. The segment owner makes three passes over
its members, ``BLOCK`` at a time: the sum, the sum of squared deviations about the calibrated mean
(two-pass, so no catastrophic cancellation), then the per-sample output written back to the original
positions. The statistics are float64, as in the PyTorch path: a group of two close rewards has a tiny
std, and float32 rounding of ``r - mu`` divided by it gave errors of 5e-6 on an H200 (the output is
rounded to float32 once, at the end). The virtual samples enter the statistics analytically (``M * r_max`` in the sum,
``M * (r_max - mu)^2`` in the deviations); they have no storage.

Traffic: each reward read three times and each output written once (12 B + 4 B per sample plus the
int64 ids/order/end); O(B) work, no atomics, deterministic. The batch is [B] scalars, so this kernel is
never the bottleneck; its point is that trainers keep the whole step on the device without a sync.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ...variants import Estimator
from ..launcher import direct
from .segments import segments_by_id



# r_max_bits unspecialised: Triton makes an integer argument equal to 1 a constant (the bits of r_max = 5e-324)
@triton.jit(do_not_specialize=["r_max_bits"])
def _group_advantages_kernel(
    R, ORDER, SORTED_IDS, SEG_END, OUT,
    r_max_bits, num_virtual, eps,
    UNBIASED: tl.constexpr, USE_STD: tl.constexpr, BLOCK: tl.constexpr,
):
    # r_max arrives as the bits of a float64: a Python float argument is passed as float32, and a rounded
    # r_max gives an all-correct group of float64 rewards a std of ~1e-8 and advantages of ~1e-3, not 0.
    r_max = r_max_bits.to(tl.int64).to(tl.float64, bitcast=True)
    p = tl.program_id(0)
    gid = tl.load(SORTED_IDS + p)
    prev = tl.load(SORTED_IDS + p - 1, mask=p > 0, other=0)
    is_start = (p == 0) | (prev != gid)
    end = tl.where(is_start, tl.load(SEG_END + p), p)  # non-owners loop zero times

    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for lo in range(p, end, BLOCK):
        idx = lo + offs
        live = idx < end
        src = tl.load(ORDER + idx, mask=live, other=0)
        acc += tl.load(R + src, mask=live, other=0.0).to(tl.float64)
    count = (end - p).to(tl.float64)
    grouped = count >= 2.0
    M = tl.where(grouped, num_virtual, 0.0).to(tl.float64)
    N = count + M
    mu = tl.where(grouped, (tl.sum(acc, axis=0) + M * r_max) / tl.maximum(N, 1.0), 0.0)

    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for lo in range(p, end, BLOCK):
        idx = lo + offs
        live = idx < end
        src = tl.load(ORDER + idx, mask=live, other=0)
        d = tl.load(R + src, mask=live, other=0.0).to(tl.float64) - mu
        acc += tl.where(live, d * d, 0.0)
    squared_dev = tl.sum(acc, axis=0) + M * (r_max - mu) * (r_max - mu)
    if UNBIASED:
        dof = N - 1.0
    else:
        dof = N
    sigma = tl.where(grouped, tl.sqrt(squared_dev / tl.maximum(dof, 1.0)), 1.0)

    for lo in range(p, end, BLOCK):
        idx = lo + offs
        live = idx < end
        src = tl.load(ORDER + idx, mask=live, other=0)
        a = tl.load(R + src, mask=live, other=0.0).to(tl.float64) - mu
        if USE_STD:
            a = a / (sigma + eps)
        tl.store(OUT + src, a.to(tl.float32), mask=live)


def _float64_bits(x: float) -> int:
    """The IEEE-754 bits of ``x`` as a signed integer (Triton passes a Python int exactly, as int32 or int64)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def group_stats_advantages_triton(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, estimator: Estimator, r_max: float,
    num_virtual: int, eps: float, unbiased: bool, block: int = 32,
) -> torch.Tensor:
    """NGRPO / GRPO / Dr. GRPO advantages as float32 [B] (rewards contiguous, any float dtype)."""
    seg = segments_by_id(group_ids)
    B = rewards.numel()
    out = torch.empty(B, dtype=torch.float32, device=rewards.device)
    direct(_group_advantages_kernel)[(B,)](
        rewards.contiguous(), seg.order, seg.sorted_ids, seg.end, out,
        _float64_bits(r_max), float(num_virtual if estimator == Estimator.NGRPO else 0), float(eps),
        UNBIASED=bool(unbiased), USE_STD=estimator != Estimator.DR_GRPO, BLOCK=block,
    )
    return out

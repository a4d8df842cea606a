"""Group advantages, vectorised PyTorch (the CPU path without the Triton interpreter).

Segmented sums with ``index_add_`` over the sorted order, in float64 (the batch is small: [B]), then
the per-sample output. Same statistics as ``naive.py``; no loop over groups.
"""

from __future__ import annotations

import torch

from ...variants import Estimator
from .segments import segments_by_id


def group_stats_advantages_torch(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, estimator: Estimator, r_max: float,
    num_virtual: int, eps: float, unbiased: bool,
) -> torch.Tensor:
    """NGRPO / GRPO / Dr. GRPO advantages as float32 [B]."""
    seg = segments_by_id(group_ids)
    r = rewards.to(torch.float64)[seg.order]
    count = (seg.end - seg.start).to(torch.float64)
    grouped = count >= 2  # singletons: mean 0, std 1, no virtual sample
    # float64 like the rest (a float32 M would round M * r_max: an all-correct group of float64 rewards 0.7 then
    # had a std of ~1e-8 and advantages of 2e-3 instead of 0)
    M = grouped.to(torch.float64) * float(num_virtual if estimator == Estimator.NGRPO else 0)
    N = count + M

    sums = torch.zeros_like(r).index_add_(0, seg.start, r)[seg.start]
    mu = torch.where(grouped, (sums + M * r_max) / N, 0.0)
    squared_dev = torch.zeros_like(r).index_add_(0, seg.start, (r - mu) ** 2)[seg.start]
    squared_dev = squared_dev + M * (r_max - mu) ** 2
    dof = N - 1 if unbiased else N
    sigma = torch.where(grouped, torch.sqrt(squared_dev / dof.clamp_min(1)), 1.0)

    adv_sorted = r - mu if estimator == Estimator.DR_GRPO else (r - mu) / (sigma + eps)
    out = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    out[seg.order] = adv_sorted.to(torch.float32)
    return out

"""Group advantages (docs/algorithm.md §2): ``naive.py`` is the spec, ``torch_impl.py`` and ``triton_impl.py`` the
fast paths. ``compute`` dispatches among them; inputs arrive validated from ``ngrpo_kernels.functional``.
"""

from __future__ import annotations

import torch

from ...backend import Backend
from ...variants import Estimator
from .naive import group_advantages_naive


def compute(
    backend: Backend, rewards: torch.Tensor, group_ids: torch.Tensor, *, estimator: Estimator,
    r_max: float, num_virtual: int, eps: float, unbiased: bool, w_lambda: float, correct_threshold: float,
) -> torch.Tensor:
    if estimator == Estimator.W_REINFORCE:
        # Elementwise, no group statistics: one torch op on every backend. Compared in float64, as r_max is used:
        # PyTorch would round the threshold to the rewards' dtype (0.502 is 0.50390625 in bf16).
        return torch.where(rewards.double() > correct_threshold, w_lambda, -1.0).to(torch.float32)
    options = dict(estimator=estimator, r_max=r_max, num_virtual=num_virtual, eps=eps, unbiased=unbiased)
    if backend == Backend.TRITON:
        from .triton_impl import group_stats_advantages_triton

        return group_stats_advantages_triton(rewards, group_ids, **options)
    if backend in (Backend.TORCH, Backend.CPP):  # no C++ kernel for this op
        from .torch_impl import group_stats_advantages_torch

        return group_stats_advantages_torch(rewards, group_ids, **options)
    return group_advantages_naive(rewards.to(torch.float64), group_ids, **options).to(torch.float32)

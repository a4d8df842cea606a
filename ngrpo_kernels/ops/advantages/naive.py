"""Group advantages in plain PyTorch: the readable specification (docs/algorithm.md §2).

A Python loop over groups, in the dtype of the rewards (pass float64 for the ground truth). The fast
paths in this folder are tested against it; it is not used on the hot path.
"""

from __future__ import annotations

import torch

from ...variants import Estimator


def group_advantages_naive(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    estimator: Estimator = Estimator.NGRPO,
    r_max: float = 1.0,
    num_virtual: int = 1,
    eps: float = 1e-6,
    unbiased: bool = True,
    w_lambda: float = 0.1,
    correct_threshold: float = 0.5,
) -> torch.Tensor:
    if estimator == Estimator.W_REINFORCE:
        correct = rewards.double() > correct_threshold  # in float64: the threshold is not rounded to the rewards' dtype
        return torch.where(correct, torch.full_like(rewards, w_lambda), torch.full_like(rewards, -1.0))

    advantages = torch.empty_like(rewards)
    for gid in torch.unique(group_ids):
        members = group_ids == gid
        r = rewards[members]
        G = r.numel()
        if G == 1:
            # A lone response has no group to compare with: mean 0, std 1, no virtual sample.
            mu, sigma = r.new_zeros(()), r.new_ones(())
        else:
            M = num_virtual if estimator == Estimator.NGRPO else 0
            N = G + M
            mu = (r.sum() + M * r_max) / N
            squared_dev = ((r - mu) ** 2).sum() + M * (r_max - mu) ** 2
            sigma = torch.sqrt(squared_dev / (N - 1 if unbiased else N))
        if estimator == Estimator.DR_GRPO:
            advantages[members] = r - mu
        else:
            advantages[members] = (r - mu) / (sigma + eps)
    return advantages


def ngrpo_advantages_naive(rewards, group_ids, *, r_max=1.0, num_virtual=1, eps=1e-6, unbiased=True):
    """NGRPO advantage calibration with ``num_virtual`` virtual samples of reward ``r_max``."""
    return group_advantages_naive(
        rewards, group_ids, estimator=Estimator.NGRPO, r_max=r_max, num_virtual=num_virtual,
        eps=eps, unbiased=unbiased,
    )

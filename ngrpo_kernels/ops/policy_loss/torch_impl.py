"""The fused policy-loss pass in vectorised PyTorch (CPU fallback; same contract as the Triton kernel).

One pass over [B, T] computes the per-token loss, its closed-form gradient with respect to the
log-prob (and entropy), and the metric sums. See ``triton_impl.py`` for the contract.
"""

from __future__ import annotations

import torch

from ...variants import NUM_STATS, Stat


def policy_loss_fused_torch(
    logprobs, old_logprobs, advantages, valid, row_scale, ref_logprobs, entropy, rollout_is_weights, *,
    eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, grad_logprobs, grad_entropy,
):
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    def load(x):
        return torch.where(valid, x.to(dtype), zero)

    lp, old = load(logprobs), load(old_logprobs)
    A = load(advantages if advantages.dim() == 2 else advantages[:, None].expand_as(valid))
    w = torch.where(valid, row_scale.to(dtype)[:, None], zero)

    ratio = torch.exp(lp - old)
    pg_unclipped = -A * ratio
    pg_clipped = -A * ratio.clamp(1.0 - eps_neg, 1.0 + eps_pos)
    clipped = pg_clipped > pg_unclipped
    loss = torch.maximum(pg_unclipped, pg_clipped)
    dloss = torch.where(clipped, zero, -A * ratio)
    stats = torch.zeros(1, NUM_STATS, dtype=dtype, device=lp.device)
    if clip_ratio_c is not None:
        bound = -A * clip_ratio_c
        dual = (A < 0) & (bound < loss)
        loss = torch.where(dual, bound, loss)
        dloss = torch.where(dual, zero, dloss)
        stats[0, Stat.DUAL_CLIPPED] = dual.sum()
    if rollout_is_weights is not None:
        isw = load(rollout_is_weights)
        loss, dloss = loss * isw, dloss * isw
    if ref_logprobs is not None:
        log_r = load(ref_logprobs) - lp
        e = torch.exp(log_r)
        k3 = e - log_r - 1.0
        loss = loss + beta * k3
        dloss = dloss + beta * (1.0 - e)
        stats[0, Stat.KL_REF] = torch.where(valid, k3, zero).sum()
    if entropy is not None:
        H = load(entropy)
        loss = loss - entropy_coef * H
        stats[0, Stat.ENTROPY] = H.sum()

    stats[0, Stat.LOSS] = (w * loss).sum()
    stats[0, Stat.CLIPPED] = (clipped & valid).sum()
    stats[0, Stat.LOG_RATIO] = (old - lp).sum()
    stats[0, Stat.ADV] = A.sum()
    g_logprobs = w * dloss if grad_logprobs else None
    g_entropy = -entropy_coef * w if grad_entropy else None
    return stats, g_logprobs, g_entropy

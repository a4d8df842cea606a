"""The fused policy-loss pass in vectorised PyTorch (CPU fallback; same contract as the Triton kernel).

``token_terms`` is the per-token math on flat tokens with aggregation weights ``w``; the fused
linear -> loss op reuses it on each chunk of tokens. See ``triton_impl.py`` for the contract.
"""

from __future__ import annotations

import torch

from ...variants import NUM_STATS, Stat


def token_terms(lp, old, A, valid, w, ref, H, isw, *, eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef,
                grad_logprobs, grad_entropy):
    """Per-token loss terms. All inputs the same shape, already zero where not ``valid``; ``w`` is the
    aggregation weight (0 where not valid). Returns (stats [1, NUM_STATS], g_lp, g_H)."""
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    # A = 0: the term is 0 even where the ratio overflows to inf (0 * inf would be NaN); 0 * log_ratio keeps a
    # NaN input NaN.
    pg_unclipped = torch.where(A == 0, 0 * log_ratio, -A * ratio)
    pg_clipped = -A * ratio.clamp(1.0 - eps_neg, 1.0 + eps_pos)
    clipped = pg_clipped > pg_unclipped
    loss = torch.maximum(pg_unclipped, pg_clipped)
    dloss = torch.where(clipped, zero, pg_unclipped)
    stats = torch.zeros(1, NUM_STATS, dtype=lp.dtype, device=lp.device)
    if clip_ratio_c is not None:
        bound = -A * clip_ratio_c
        dual = (A < 0) & (bound < loss)
        loss = torch.where(dual, bound, loss)
        dloss = torch.where(dual, zero, dloss)
        stats[0, Stat.DUAL_CLIPPED] = dual.sum()
    # A weight of 0 (a token the rollout correction masks out) or beta = 0 (a KL only logged) gives 0, also where
    # the ratio or exp(log_r) overflows to inf (0 * inf would be NaN).
    if isw is not None:
        loss, dloss = torch.where(isw == 0, zero, loss * isw), torch.where(isw == 0, zero, dloss * isw)
    if ref is not None:
        log_r = ref - lp
        e = torch.exp(log_r)
        k3 = e - log_r - 1.0
        if beta != 0:
            loss = loss + beta * k3
            dloss = dloss + beta * (1.0 - e)
        stats[0, Stat.KL_REF] = torch.where(valid, k3, zero).sum()
    if H is not None:
        loss = loss - entropy_coef * H
        stats[0, Stat.ENTROPY] = H.sum()
    # A NaN or inf input (possible only with validate=False) gives a NaN loss and d loss / d logp, never the finite
    # value a clip bound or the A = 0 rule would make of it (d loss / d entropy stays -entropy_coef * w).
    ok = torch.isfinite(lp) & torch.isfinite(old) & torch.isfinite(A)
    for x in (ref, H, isw):
        if x is not None:
            ok &= torch.isfinite(x)
    loss, dloss = torch.where(ok, loss, torch.nan), torch.where(ok, dloss, torch.nan)
    stats[0, Stat.LOSS] = (w * loss).sum()
    stats[0, Stat.CLIPPED] = (clipped & valid).sum()
    stats[0, Stat.LOG_RATIO] = (old - lp).sum()
    stats[0, Stat.ADV] = A.sum()
    stats[0, Stat.LOGPROB] = lp.sum()
    g_lp = w * dloss if grad_logprobs else None
    g_H = -entropy_coef * w if grad_entropy else None
    return stats, g_lp, g_H


def policy_loss_fused_torch(
    logprobs, old_logprobs, advantages, valid, row_scale, ref_logprobs, entropy, rollout_is_weights, *,
    eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, grad_logprobs, grad_entropy,
):
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    def load(x):
        return None if x is None else torch.where(valid, x.to(dtype), zero)

    A = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(valid)
    w = torch.where(valid, row_scale.to(dtype)[:, None], zero)
    return token_terms(
        load(logprobs), load(old_logprobs), load(A), valid, w, load(ref_logprobs), load(entropy),
        load(rollout_is_weights), eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, beta=beta,
        entropy_coef=entropy_coef, grad_logprobs=grad_logprobs, grad_entropy=grad_entropy,
    )

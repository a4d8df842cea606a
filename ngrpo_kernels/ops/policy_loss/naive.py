"""The NGRPO policy loss in plain PyTorch: the readable specification (docs/algorithm.md §3, §4).

Gradients come from autograd through ``max``/``clamp``/``min``, independently of the closed-form
gradients the fused paths compute. Runs in the dtype of ``logprobs`` (pass float64 for the ground
truth). Values at masked positions are never read into the result (padding may hold garbage).
"""

from __future__ import annotations

import torch

from ...variants import AggMode


def aggregate_naive(per_token, valid, mode: AggMode, normalizer=None, length_budget=None):
    """docs/algorithm.md §4 / ``AggMode``: one scalar from per-token losses [B, T] and a bool mask [B, T]."""
    m = valid.to(per_token.dtype)
    n_b = m.sum(-1)
    token_sums = (per_token * m).sum(-1)
    if mode == AggMode.TOKEN_MEAN:
        numerator, denominator = token_sums.sum(), n_b.sum()
    elif mode == AggMode.SEQ_MEAN_TOKEN_MEAN:
        numerator, denominator = (token_sums / n_b.clamp_min(1)).sum(), (n_b > 0).sum()
    elif mode == AggMode.SEQ_MEAN_TOKEN_SUM:
        numerator, denominator = token_sums.sum(), (n_b > 0).sum()
    else:  # SEQ_MEAN_TOKEN_SUM_NORM
        budget = per_token.shape[-1] if length_budget is None else length_budget
        numerator, denominator = token_sums.sum() / budget, torch.ones((), dtype=per_token.dtype)
    if normalizer is not None:  # as given: 0 gives inf / NaN, inf gives NaN (bad input is never a silent 0)
        normalizer = torch.as_tensor(normalizer, dtype=per_token.dtype)
        return numerator / normalizer + normalizer * 0
    if denominator == 0:  # nothing valid: numerator is an exact 0 that still carries a (zero) gradient
        return numerator * 0.0
    return numerator / denominator


def policy_loss_naive(
    logprobs, old_logprobs, advantages, mask, *, eps_neg=0.16, eps_pos=0.24, clip_ratio_c=None,
    ref_logprobs=None, beta=0.0, entropy=None, entropy_coef=0.0, loss_agg_mode=AggMode.TOKEN_MEAN,
    normalizer=None, length_budget=None, rollout_is_weights=None,
):
    valid = mask != 0
    def masked(x):  # padding may hold NaN/inf: select, never multiply
        return torch.where(valid, x, torch.zeros_like(x))

    A = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logprobs)
    A = masked(A.to(logprobs.dtype))
    logp, old_logp = masked(logprobs), masked(old_logprobs.to(logprobs.dtype))

    def clipped_term(ratio):
        """(loss_t = -min(rho*A, clip(rho)*A), then at most -c*A where A < 0; clipped; dual-clipped)"""
        pg_unclipped = torch.where(A == 0, 0.0, -A * ratio)  # 0, not 0 * inf, where the ratio overflows
        pg_clipped = -A * torch.clamp(ratio, 1.0 - eps_neg, 1.0 + eps_pos)
        pg = torch.maximum(pg_unclipped, pg_clipped)
        dual = torch.zeros_like(valid)
        if clip_ratio_c is not None:  # dual clip: a negative-advantage token's loss is at most -c*A
            bound = -A * clip_ratio_c
            dual = (A < 0) & (bound < pg)
            pg = torch.where(A < 0, torch.minimum(pg, bound), pg)
        return pg, pg_clipped > pg_unclipped, dual

    log_ratio = logp - old_logp  # rho_t = exp(log_ratio), no clamp on the log-ratio
    with torch.no_grad():  # tokens whose term does not depend on logp: A = 0, or a clip binds
        _, clipped, dual_clipped = clipped_term(torch.exp(log_ratio))
    # Where the term is constant, exp's (zero) gradient is not taken: with an overflowing ratio it would be
    # 0 * inf = NaN.
    # A token the rollout correction weighs 0 contributes 0, whatever its ratio.
    w_is = None if rollout_is_weights is None else masked(rollout_is_weights.to(logprobs.dtype))
    constant = (A == 0) | clipped | dual_clipped | (False if w_is is None else w_is == 0)
    pg, _, _ = clipped_term(torch.exp(torch.where(constant, log_ratio.detach(), log_ratio)))
    if w_is is not None:
        pg = torch.where(w_is == 0, 0.0, pg * w_is)
    per_token = pg

    metrics = {}
    def token_mean(x):
        n = valid.sum()
        return (x * valid).sum() / n if n > 0 else (x * valid).sum() * 0.0

    if ref_logprobs is not None:
        log_r = masked(ref_logprobs.to(logprobs.dtype)) - logp
        k3 = torch.exp(log_r) - log_r - 1.0  # k3 estimator of KL(pi || pi_ref)
        if beta != 0:  # with beta = 0 the KL is only reported (an overflowing k3 must not make 0 * inf)
            per_token = per_token + beta * k3
        metrics["kl"] = token_mean(k3.detach())
    if entropy is not None:
        H = masked(entropy.to(logprobs.dtype))
        per_token = per_token - entropy_coef * H
        metrics["entropy"] = token_mean(H.detach())

    # A NaN or inf input at a valid position (possible only with validate=False) gives a NaN loss and gradient.
    finite = torch.isfinite(logp) & torch.isfinite(old_logp) & torch.isfinite(A)
    for x in (ref_logprobs, entropy, rollout_is_weights):
        if x is not None:
            finite &= torch.isfinite(masked(x.to(logprobs.dtype)))
    per_token = per_token + logp * torch.where(finite, 0.0, torch.nan)
    loss = aggregate_naive(per_token, valid, loss_agg_mode, normalizer, length_budget)
    metrics["clip_frac"] = token_mean(clipped.to(logprobs.dtype))
    metrics["approx_kl"] = token_mean((old_logp - logp).detach())
    metrics["adv_mean"] = token_mean(A)
    if clip_ratio_c is not None:
        metrics["dual_clip_frac"] = token_mean(dual_clipped.to(logprobs.dtype))
    return loss, metrics

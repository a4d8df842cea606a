"""The NGRPO policy loss (docs/algorithm.md §3-§4): ``naive.py`` is the spec; ``torch_impl.py`` and
``triton_impl.py`` are one fused pass that computes the loss and its gradient together.

``forward`` turns the aggregation mode into per-row weights that carry the global denominator (device
tensors, no host sync) and runs the backend's fused pass; ``ngrpo_kernels._library`` wraps it as the
custom op ``ngrpo::policy_loss`` with its autograd formula, and builds the metrics with
``metrics_from_stats``. Inputs arrive validated from ``ngrpo_kernels.functional``.
"""

from __future__ import annotations

import torch

from ...backend import Backend
from ...variants import AggMode, Stat
from .naive import policy_loss_naive

__all__ = ["forward", "metrics_from_stats", "policy_loss_naive", "grad_dtype"]


def _safe_inverse(x: torch.Tensor) -> torch.Tensor:
    # A fully masked batch has denominator 0 and numerator exactly 0: its loss is 0, never NaN (1/0 = inf
    # is formed and not selected; no gradient flows through here).
    return torch.where(x > 0, x.reciprocal(), 0.0)


def _row_scale_and_inverse(valid, mode: AggMode, normalizer, length_budget, dtype=torch.float32):
    """Per-row aggregation factor [B], the inverse of the aggregation's denominator and the valid-token count,
    in ``dtype`` (float64 for float64 inputs on the PyTorch backends: the weights must not be the loss's
    weakest link). A denominator counted from the mask is 0 only for a fully masked batch, whose loss is 0;
    a ``normalizer`` is inverted as given, so a NaN, inf, 0 or negative one passed with ``validate=False``
    shows in the loss (NaN, NaN, inf or NaN, the sign) as in the reference, never as a silent 0."""
    n_b = valid.sum(-1, dtype=dtype)
    n_tokens = n_b.sum()
    ones = torch.ones_like(n_b)
    if mode == AggMode.TOKEN_MEAN:
        row_scale, denominator = ones, n_tokens
    elif mode == AggMode.SEQ_MEAN_TOKEN_MEAN:
        row_scale, denominator = _safe_inverse(n_b), (n_b > 0).sum(dtype=dtype)
    elif mode == AggMode.SEQ_MEAN_TOKEN_SUM:
        row_scale, denominator = ones, (n_b > 0).sum(dtype=dtype)
    else:  # SEQ_MEAN_TOKEN_SUM_NORM
        budget = valid.shape[-1] if length_budget is None else length_budget
        row_scale, denominator = ones / budget, ones.new_ones(())
    if normalizer is None:
        inverse = _safe_inverse(denominator)
    else:
        # A number stays a CPU scalar: multiplying device tensors by it copies nothing to the device
        # (torch.as_tensor(..., device="cuda") would, on every call: a host synchronisation).
        normalizer = normalizer.to(dtype) if isinstance(normalizer, torch.Tensor) else torch.tensor(
            float(normalizer), dtype=dtype)
        inverse = normalizer.reciprocal() + normalizer * 0  # + NaN for an infinite one (1 / inf is 0)
    return row_scale, inverse, n_tokens.to(torch.float32)  # the count stays float32 (exact to 2**24)


def grad_dtype(backend: Backend, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Stat sums and per-token gradients ``forward`` returns for inputs of ``dtype``."""
    return torch.float32 if backend == Backend.TRITON else torch.promote_types(dtype, torch.float32)


def forward(
    backend: Backend, logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, rollout_is_weights, *,
    eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, loss_agg_mode: AggMode, normalizer, length_budget,
    grad_logprobs: bool, grad_entropy: bool,
):
    """The fused pass of the TORCH / CPP / TRITON backends. Returns ``(stats [NUM_STATS], n_tokens, g_lp, g_ent)``:
    the Stat sums (``stats[Stat.LOSS]`` is the loss itself: the aggregation's denominator is folded into the
    per-row weights), the number of valid tokens, and the loss's gradients with respect to ``logprobs`` and
    ``entropy`` ([B, T], ``grad_dtype``; None when not asked for)."""
    if backend == Backend.TRITON:
        from .triton_impl import policy_loss_fused_triton as fused_pass
    else:
        from .torch_impl import policy_loss_fused_torch as fused_pass

    valid = mask if mask.dtype == torch.bool else mask != 0
    row_scale, inverse, n_tokens = _row_scale_and_inverse(valid, loss_agg_mode, normalizer, length_budget,
                                                          grad_dtype(backend, logprobs.dtype))
    stats, g_lp, g_ent = fused_pass(
        logprobs, old_logprobs, advantages, valid, row_scale * inverse, ref_logprobs, entropy,
        rollout_is_weights, eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, beta=beta,
        entropy_coef=entropy_coef, grad_logprobs=grad_logprobs, grad_entropy=grad_entropy,
    )
    return stats[0], n_tokens, g_lp, g_ent


def metrics_from_stats(stats, n_tokens, *, entropy: bool, kl: bool, dual_clip: bool, logprob: bool = False):
    """Metric means over valid tokens from the ``Stat`` sums (0-dim device tensors, no sync). Detached: a
    logged metric must not keep the step's autograd graph (and its saved gradients) alive."""
    stats = stats.detach()
    per_token = _safe_inverse(n_tokens.detach() if isinstance(n_tokens, torch.Tensor) else n_tokens)
    names = {"clip_frac": Stat.CLIPPED, "approx_kl": Stat.LOG_RATIO, "adv_mean": Stat.ADV}
    optional = {"entropy": (entropy, Stat.ENTROPY), "logprob_mean": (logprob, Stat.LOGPROB),
                "kl": (kl, Stat.KL_REF), "dual_clip_frac": (dual_clip, Stat.DUAL_CLIPPED)}
    names.update({name: col for name, (wanted, col) in optional.items() if wanted})
    return {name: stats[col] * per_token for name, col in names.items()}

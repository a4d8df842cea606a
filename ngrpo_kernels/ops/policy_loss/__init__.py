"""The NGRPO policy loss (docs/algorithm.md §3-§4): ``naive.py`` is the spec; ``torch_impl.py`` and
``triton_impl.py`` are one fused pass that computes the loss and its gradient together.

``compute`` turns the aggregation mode into a per-row scale and a global denominator (device tensors,
no host sync), runs the backend's fused pass inside ``FusedPolicyLoss`` and builds the metrics.
Inputs arrive validated from ``ngrpo_kernels.functional``.
"""

from __future__ import annotations

import torch

from ..._autograd import first_order
from ...backend import Backend
from ...variants import AggMode, Stat
from .naive import policy_loss_naive


class FusedPolicyLoss(torch.autograd.Function):
    """Forward runs the fused pass (gradients included); backward only rescales them."""

    @staticmethod
    def forward(ctx, logprobs, entropy, inv_denominator, fused_pass, kwargs):
        stats, g_lp, g_ent = fused_pass(
            logprobs=logprobs.detach(), entropy=None if entropy is None else entropy.detach(),
            grad_logprobs=ctx.needs_input_grad[0], grad_entropy=ctx.needs_input_grad[1], **kwargs,
        )
        loss = stats[0, Stat.LOSS] * inv_denominator
        ctx.save_for_backward(g_lp, g_ent, inv_denominator)
        ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @first_order
    def backward(ctx, grad_loss, _grad_stats):
        g_lp, g_ent, inv_denominator = ctx.saved_tensors
        scale = grad_loss * inv_denominator
        grad_lp = None if g_lp is None else (g_lp * scale).to(ctx.dtypes[0])
        grad_ent = None if g_ent is None else (g_ent * scale).to(ctx.dtypes[1])
        return grad_lp, grad_ent, None, None, None


def _safe_inverse(x: torch.Tensor) -> torch.Tensor:
    # A fully masked batch has denominator 0 and numerator exactly 0: its loss is 0, never NaN.
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, 1.0), 0.0)


def _row_scale_and_denominator(valid, mode: AggMode, normalizer, length_budget):
    n_b = valid.sum(-1, dtype=torch.float32)
    ones = torch.ones_like(n_b)
    if mode == AggMode.TOKEN_MEAN:
        row_scale, denominator = ones, n_b.sum()
    elif mode == AggMode.SEQ_MEAN_TOKEN_MEAN:
        row_scale, denominator = _safe_inverse(n_b), (n_b > 0).sum(dtype=torch.float32)
    elif mode == AggMode.SEQ_MEAN_TOKEN_SUM:
        row_scale, denominator = ones, (n_b > 0).sum(dtype=torch.float32)
    else:  # SEQ_MEAN_TOKEN_SUM_NORM
        budget = valid.shape[-1] if length_budget is None else length_budget
        row_scale, denominator = ones / budget, ones.new_ones(())
    if isinstance(normalizer, torch.Tensor):
        denominator = normalizer.to(torch.float32)
    elif normalizer is not None:
        # A number stays a CPU scalar: multiplying device tensors by it copies nothing to the device
        # (torch.as_tensor(..., device="cuda") would, on every call: a host synchronisation).
        denominator = torch.tensor(float(normalizer), dtype=torch.float32)
    return row_scale, denominator, n_b.sum()


def compute(
    backend: Backend, logprobs, old_logprobs, advantages, mask, *, eps_neg, eps_pos, clip_ratio_c,
    ref_logprobs, beta, entropy, entropy_coef, loss_agg_mode: AggMode, normalizer, length_budget,
    rollout_is_weights,
):
    options = dict(eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, beta=beta,
                   entropy_coef=entropy_coef)
    if backend == Backend.REFERENCE:
        return policy_loss_naive(
            logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, entropy=entropy,
            loss_agg_mode=loss_agg_mode, normalizer=normalizer, length_budget=length_budget,
            rollout_is_weights=rollout_is_weights, **options,
        )
    if backend == Backend.TRITON:
        from .triton_impl import policy_loss_fused_triton as fused_pass
    else:
        from .torch_impl import policy_loss_fused_torch as fused_pass

    valid = mask if mask.dtype == torch.bool else mask != 0
    row_scale, denominator, n_tokens = _row_scale_and_denominator(valid, loss_agg_mode, normalizer,
                                                                  length_budget)
    kwargs = dict(old_logprobs=old_logprobs, advantages=advantages, valid=valid, row_scale=row_scale,
                  ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights, **options)
    loss, stats = FusedPolicyLoss.apply(logprobs, entropy, _safe_inverse(denominator), fused_pass, kwargs)

    return loss, metrics_from_stats(stats[0], n_tokens, entropy=entropy is not None,
                                    kl=ref_logprobs is not None, dual_clip=clip_ratio_c is not None)


def metrics_from_stats(stats, n_tokens, *, entropy: bool, kl: bool, dual_clip: bool, logprob: bool = False):
    """Metric means over valid tokens from the ``Stat`` sums (0-dim device tensors, no sync)."""
    per_token = _safe_inverse(n_tokens)
    names = {"clip_frac": Stat.CLIPPED, "approx_kl": Stat.LOG_RATIO, "adv_mean": Stat.ADV}
    optional = {"entropy": (entropy, Stat.ENTROPY), "logprob_mean": (logprob, Stat.LOGPROB),
                "kl": (kl, Stat.KL_REF), "dual_clip_frac": (dual_clip, Stat.DUAL_CLIPPED)}
    names.update({name: col for name, (wanted, col) in optional.items() if wanted})
    return {name: stats[col] * per_token for name, col in names.items()}

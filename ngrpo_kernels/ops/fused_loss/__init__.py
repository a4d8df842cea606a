"""Fused linear -> NGRPO loss (docs/algorithm.md §2-§5): hidden states in, loss and both gradients out, in bounded
memory. ``naive.py`` is the spec (composition of the reference ops); ``triton_schedule.py`` the GPU
schedule (persistent head GEMM with a statistics epilogue, over the compacted valid tokens);
``schedule.py`` the chunked CPU schedule with its row kernel per backend (``row_cpp.py``, ``row_torch.py``).
Inputs arrive validated from ``ngrpo_kernels.functional``.
"""

from __future__ import annotations

import functools

import torch

from ..._autograd import first_order
from ...backend import Backend
from ...variants import Stat
from ..policy_loss import _row_scale_and_denominator, _safe_inverse, metrics_from_stats
from . import schedule
from .naive import fused_linear_ngrpo_loss_naive


def _row_op(backend: Backend):
    if backend == Backend.CPP:
        from .row_cpp import loss_rows_cpp

        return loss_rows_cpp
    from .row_torch import loss_rows_torch

    return loss_rows_torch


class FusedLinearNGRPOLoss(torch.autograd.Function):
    """Forward runs the whole schedule, gradients included; backward only rescales them."""

    @staticmethod
    def forward(ctx, x, weight, bias, run):
        stats, dx, dw, db = run(need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
                                need_db=ctx.needs_input_grad[2])
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(stats)
        return stats[Stat.LOSS], stats

    @staticmethod
    @first_order
    def backward(ctx, grad_loss, _grad_stats):
        dx, dw, db = ctx.saved_tensors
        scale = grad_loss
        grads = [None if g is None else _scaled_cast(g, scale, dtype) for g, dtype in zip((dx, dw, db), ctx.dtypes)]
        return (*grads, None, None)


def _scaled_cast(g: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(g * scale).to(dtype) in one pass (the product is rounded straight into the output): the float32
    [V, H] dW never gets a float32 twin (2.2 GB at the Qwen2.5-7B head), and the saved gradient is not
    modified (backward may run twice with retain_graph=True)."""
    return torch.mul(g, scale, out=torch.empty(g.shape, dtype=dtype, device=g.device))


def _per_token(x, valid, fill=0.0):
    """[B, T] (or [B] broadcast) -> contiguous float32 [N], zero where not valid."""
    if x.dim() == 1:
        x = x[:, None].expand(valid.shape)
    return torch.where(valid, x.to(torch.float32), fill).reshape(-1).contiguous()


def compute(backend: Backend, hidden, weight, targets, mask, old_logprobs, advantages, *, bias, temperature,
            eps_neg, eps_pos, clip_ratio_c, ref_logprobs, beta, entropy_coef, loss_agg_mode, normalizer,
            length_budget, rollout_is_weights, workspace_bytes, skip_zero_advantage=False):
    options = dict(eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, beta=beta, entropy_coef=entropy_coef,
                   loss_agg_mode=loss_agg_mode, normalizer=normalizer, length_budget=length_budget,
                   ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights)
    if backend == Backend.REFERENCE:  # the specification computes every token (skip_zero_advantage is moot)
        return fused_linear_ngrpo_loss_naive(hidden, weight, targets, mask, old_logprobs, advantages=advantages,
                                             bias=bias, temperature=temperature, **options)

    B, T, H = hidden.shape
    valid = mask if mask.dtype == torch.bool else mask != 0
    row_scale, denominator, n_tokens = _row_scale_and_denominator(valid, loss_agg_mode, normalizer, length_budget)
    computed_frac = None
    if skip_zero_advantage:  # the aggregation keeps every valid token; only the computation skips some
        nonzero = (advantages[:, None] if advantages.dim() == 1 else advantages) != 0
        valid = valid & nonzero
        computed = valid.sum(dtype=torch.float32)
        computed_frac = computed * _safe_inverse(n_tokens)
        n_tokens = computed
    on_policy = old_logprobs is None
    flat_valid = valid.reshape(-1).contiguous()
    per_token = dict(
        target=torch.where(valid, targets, 0).reshape(-1).to(torch.int64).contiguous(),
        valid=flat_valid,
        # The aggregation's denominator is folded into the per-token weights: the kernels then form the
        # gradient of the loss itself, not of its unnormalised sum (which overflows fp16 dZ at a few
        # thousand tokens).
        w=_per_token(row_scale * _safe_inverse(denominator), valid),
        adv=_per_token(advantages, valid),
        old=flat_valid.new_zeros(flat_valid.shape, dtype=torch.float32) if on_policy else _per_token(old_logprobs, valid),
        ref=None if ref_logprobs is None else _per_token(ref_logprobs, valid),
        isw=None if rollout_is_weights is None else _per_token(rollout_is_weights, valid),
    )
    row_options = dict(inv_temp=1.0 / temperature, eps_neg=eps_neg, eps_pos=eps_pos, clip_c=clip_ratio_c, beta=beta,
                       entropy_coef=entropy_coef, on_policy=on_policy)
    x = hidden.reshape(B * T, H).contiguous()
    w_ = weight.contiguous()
    b_ = None if bias is None else bias.contiguous()
    if backend == Backend.TRITON:
        from . import triton_schedule

        run = functools.partial(triton_schedule.run, x, w_, b_, **per_token, row_options=row_options,
                                workspace_bytes=workspace_bytes)
    else:
        if workspace_bytes is None:
            workspace_bytes = schedule.default_workspace_bytes(x.device)
        run = functools.partial(schedule.run, x, w_, b_, **per_token, row_op=_row_op(backend),
                                row_options=row_options, workspace_bytes=workspace_bytes)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        loss, stats = FusedLinearNGRPOLoss.apply(x, w_, b_, run)
    else:
        stats, _, _, _ = run(need_dx=False, need_dw=False, need_db=False)
        loss = stats[Stat.LOSS]

    metrics = metrics_from_stats(stats, n_tokens, entropy=True, logprob=True, kl=ref_logprobs is not None,
                                 dual_clip=clip_ratio_c is not None)
    if computed_frac is not None:
        metrics["computed_frac"] = computed_frac
    return loss, metrics

"""Fused linear -> NGRPO loss (docs/algorithm.md §2-§5): hidden states in, loss and both gradients out, in bounded
memory. ``naive.py`` is the spec (composition of the reference ops); ``triton_schedule.py`` the GPU
schedule (persistent head GEMM with a statistics epilogue, over the compacted valid tokens);
``schedule.py`` the chunked CPU schedule with its row kernel per backend (``row_cpp.py``, ``row_torch.py``).
Inputs arrive validated from ``ngrpo_kernels.functional``.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from ..._checks import flag
from ...backend import Backend
from ...variants import Stat
from ..policy_loss import _row_scale_and_inverse, _safe_inverse
from . import schedule
from .naive import fused_linear_ngrpo_loss_naive

__all__ = ["deferring", "forward", "fused_linear_ngrpo_loss_naive", "gradients_in_forward", "scaled_cast"]

_DEFERRED: contextvars.ContextVar[list | None] = contextvars.ContextVar("ngrpo_deferred_gradients", default=None)
_in_forward_always = False


def gradients_in_forward(enabled: bool = True) -> bool:
    """Process-wide: with ``enabled``, ``fused_linear_ngrpo_loss`` forms its gradients in the forward at any
    size and its backward never reads the lm_head weight (``deferring`` has no effect). For frameworks that
    free or re-partition the weight between forward and backward outside the head module's own hooks
    (DeepSpeed parameters are recognised per call without it: ``_defers``). A process-wide setting, not a
    context: a recomputing backward (activation checkpointing, CUDA's autograd thread) must take the same
    schedule as the forward did. Returns the previous setting. Exported as
    ``ngrpo_kernels.gradients_in_forward``."""
    global _in_forward_always
    previous, _in_forward_always = _in_forward_always, flag("enabled", enabled)
    return previous


def _defers(weight: torch.Tensor) -> list | None:
    """The slot a TRITON forward leaves its gradient GEMMs in, or None to form them itself: None outside
    ``deferring``, with ``gradients_in_forward`` on, and for a DeepSpeed parameter (``ds_id``: ZeRO-3
    re-partitions it when the gather context exits, before backward; the same answer on a recompute)."""
    if _in_forward_always or hasattr(weight, "ds_id"):
        return None
    return _DEFERRED.get()


@contextlib.contextmanager
def deferring():
    """Within this context a TRITON ``forward`` whose schedule is one chunk through our GEMMs and forms dW
    (and whose weight ``_defers`` allows) leaves its gradient GEMMs undone (dX, dW, db come back None) and appends the tensors its backward needs
    (``HeadSchedule.defer``: weight, dZ, gathered rows, order, count, fp16 scale) to the list yielded here,
    for autograd to save and for the backward to run with the loss's upstream gradient
    (``head_schedule.deferred_backprop``): the gradients then come out of the GEMMs in the inputs' dtypes,
    with no float32 dW held from forward to backward and no cast pass. The eager autograd route uses it
    (``_library``); the custom op, whose outputs must be tensors, does not."""
    slot: list = []
    token = _DEFERRED.set(slot)
    try:
        yield slot
    finally:
        _DEFERRED.reset(token)


def _row_op(backend: Backend):
    if backend == Backend.CPP:
        from .row_cpp import loss_rows_cpp

        return loss_rows_cpp
    from .row_torch import loss_rows_torch

    return loss_rows_torch


def scaled_cast(g: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, backend: Backend) -> torch.Tensor:
    """The backward of the fused loss: ``(g * scale).to(dtype)`` rounded once, into a fresh tensor. The float32
    [V, H] dW never gets a float32 twin (2.2 GB at the Qwen2.5-7B head), and the saved gradient is not modified
    (backward may run twice with retain_graph=True). ``scale`` is a 0-dim tensor on g's device (no sync)."""
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    if backend == Backend.TRITON and g.is_contiguous() and scale.device == g.device:
        from .triton_cast import scaled_cast_

        return scaled_cast_(g, scale, out)
    return torch.mul(g, scale, out=out)


def _per_token(x, valid, zero_invalid: bool):
    """[B, T] (or [B] broadcast) -> contiguous float32 [N]; with ``zero_invalid``, 0 where not valid. The
    Triton schedule compacts the valid tokens first and never reads the others (they may hold NaN): it
    skips the zeroing, which saves a launch per array before the first GEMM."""
    if x.dim() == 1:
        x = x[:, None].expand(valid.shape)
    x = x.to(torch.float32)
    if zero_invalid:
        x = torch.where(valid, x, 0.0)
    return x.reshape(-1).contiguous()


def _token_inputs(backend: Backend, valid, computed, targets, old_logprobs, advantages, ref_logprobs,
                  rollout_is_weights, *, loss_agg_mode, normalizer, length_budget, skip_zero_advantage):
    """The per-token [N] arrays of the row kernels (target, w, adv, old, ref, isw; ``w`` carries the
    aggregation and its denominator) and the counts: ``(arrays, n_tokens, computed_frac)``. ``valid`` is
    the loss's mask, ``computed`` the tokens actually computed (fewer with ``skip_zero_advantage``)."""
    row_scale, inverse, n_tokens = _row_scale_and_inverse(valid, loss_agg_mode, normalizer, length_budget)
    computed_frac = None
    if skip_zero_advantage:  # the aggregation keeps every valid token; only the computation skips some
        n_computed = computed.sum(dtype=torch.float32)
        computed_frac = n_computed * _safe_inverse(n_tokens)
        n_tokens = n_computed
    zero = backend != Backend.TRITON  # the CPU schedules read every token
    target = targets.reshape(-1).to(torch.int64)
    if old_logprobs is not None:
        old = _per_token(old_logprobs, computed, zero)
    elif zero:  # the CPU row kernels read an old log-prob for every token
        old = computed.new_zeros(computed.numel(), dtype=torch.float32)
    else:  # the Triton token kernel takes its own log-prob (ON_POLICY)
        old = None
    arrays = dict(
        target=(torch.where(computed.reshape(-1), target, 0) if zero else target).contiguous(),
        # The aggregation's denominator is folded into the per-token weights: the kernels then form the
        # gradient of the loss itself, not of its unnormalised sum (which overflows fp16 dZ at a few
        # thousand tokens).
        w=_per_token(row_scale * inverse, computed, zero),
        adv=_per_token(advantages, computed, zero),
        old=old,
        ref=None if ref_logprobs is None else _per_token(ref_logprobs, computed, zero),
        isw=None if rollout_is_weights is None else _per_token(rollout_is_weights, computed, zero),
    )
    return arrays, n_tokens, computed_frac


def forward(backend: Backend, hidden, weight, targets, mask, old_logprobs, advantages, *, bias, temperature,
            eps_neg, eps_pos, clip_ratio_c, ref_logprobs, beta, entropy_coef, loss_agg_mode, normalizer,
            length_budget, rollout_is_weights, workspace_bytes, skip_zero_advantage, need_dx, need_dw, need_db):
    """The whole schedule on the TORCH / CPP / TRITON backends, gradients included. Returns
    ``(stats [NUM_STATS], n_tokens, computed_frac, dx, dw, db)``: the Stat sums (``stats[Stat.LOSS]`` is the
    loss), the valid-token count the metrics divide by, the computed share of valid tokens (None unless
    ``skip_zero_advantage``), and the loss's gradients (dX [B*T, H] in hidden's dtype, dW [V, H] and db [V]
    in float32; None when not asked for)."""
    B, T, H = hidden.shape
    valid = mask if mask.dtype == torch.bool else mask != 0
    computed = valid
    if skip_zero_advantage:
        computed = valid & ((advantages[:, None] if advantages.dim() == 1 else advantages) != 0)
    flat_computed = computed.reshape(-1).contiguous()
    counts = {}

    def token_inputs():
        arrays, counts["n_tokens"], counts["computed_frac"] = _token_inputs(
            backend, valid, computed, targets, old_logprobs, advantages, ref_logprobs, rollout_is_weights,
            loss_agg_mode=loss_agg_mode, normalizer=normalizer, length_budget=length_budget,
            skip_zero_advantage=skip_zero_advantage)
        return arrays

    row_options = dict(inv_temp=1.0 / temperature, eps_neg=eps_neg, eps_pos=eps_pos, clip_c=clip_ratio_c, beta=beta,
                       entropy_coef=entropy_coef, on_policy=old_logprobs is None)
    x = hidden.reshape(B * T, H).contiguous()
    w_ = weight.contiguous()
    b_ = None if bias is None else bias.contiguous()
    needs = dict(need_dx=need_dx, need_dw=need_dw, need_db=need_db)
    if backend == Backend.TRITON:
        from . import triton_schedule

        # The per-token arrays are formed once the first GEMM is queued (``token_inputs`` is called
        # there): an isolated call then has only the compaction and one gather ahead of that GEMM.
        stats, dx, dw, db = triton_schedule.run(x, w_, b_, flat_computed, token_inputs, row_options=row_options,
                                                workspace_bytes=workspace_bytes, deferred=_defers(weight), **needs)
    else:
        if workspace_bytes is None:
            workspace_bytes = schedule.default_workspace_bytes(x.device)
        stats, dx, dw, db = schedule.run(x, w_, b_, valid=flat_computed, **token_inputs(), row_op=_row_op(backend),
                                         row_options=row_options, workspace_bytes=workspace_bytes, **needs)
    if skip_zero_advantage:
        stats[Stat.LOSS] += _skipped_poison(hidden, valid & ~computed, old_logprobs, ref_logprobs, rollout_is_weights)
    return stats, counts["n_tokens"], counts["computed_frac"], dx, dw, db


def _skipped_poison(hidden, skipped, *per_token):
    """0, or NaN when a token the computation skipped (valid, advantage 0) holds a non-finite hidden state,
    old / reference log-prob or IS weight: without the skip its loss term would be NaN, so the loss is NaN
    here too (never a finite loss from bad input, as with every other token). One read of the hidden
    states, queued after the GEMMs; skipped tokens still cost no FLOPs."""
    x = hidden.sum(-1, dtype=torch.float32)  # [B, T]: a NaN / inf in a row stays in its sum
    for t in per_token:
        if t is not None:
            x = x + t.float()
    return torch.where(skipped, x * 0, 0.0).sum()

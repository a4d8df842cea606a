"""Fused linear -> log-prob (+ entropy) (docs/algorithm.md §5): ``naive.py`` is the spec (full logits);
``triton_impl.py`` (GPU, or CPU under the interpreter) and ``torch_impl.py`` (chunked CPU fallback)
never hold more than a bounded chunk of logits. ``compute`` dispatches; inputs arrive validated.
"""

from __future__ import annotations

import torch

from ..._autograd import first_order
from ...backend import Backend
from .naive import linear_logprobs_naive


def _impl(backend: Backend):
    if backend == Backend.TRITON:
        from . import triton_impl as impl
    else:
        from . import torch_impl as impl
    return impl


class LinearLogprobs(torch.autograd.Function):
    """Forward keeps only O(N) statistics (logsumexp, E[z]); backward recomputes the logits."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, impl, inv_temp, ignore_index, entropy, options):
        logprobs, ent, lse = impl.forward(x, weight, bias, targets, inv_temp=inv_temp, ignore_index=ignore_index,
                                          entropy=entropy, workspace_bytes=options["workspace_bytes"])
        ctx.save_for_backward(x, weight, bias, targets, lse, ent)
        ctx.impl, ctx.inv_temp, ctx.ignore_index, ctx.options = impl, inv_temp, ignore_index, options
        if ent is None:
            return logprobs
        return logprobs, ent

    @staticmethod
    @first_order
    def backward(ctx, g_lp, g_ent=None):
        x, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        dx, dw, db = ctx.impl.backward(
            x, weight, bias, targets, lse, ent, g_lp, g_ent, inv_temp=ctx.inv_temp,
            ignore_index=ctx.ignore_index, need_x=need_x, need_w=need_w, need_b=need_b, **ctx.options,
        )
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dx, dw, db, None, None, None, None, None, None


def compute(backend: Backend, hidden, weight, targets, *, bias, temperature, ignore_index, return_entropy,
            deterministic, workspace_bytes):
    lead = targets.shape
    if backend == Backend.REFERENCE:
        lp, ent = linear_logprobs_naive(hidden, weight, targets, bias=bias, temperature=temperature,
                                        ignore_index=ignore_index)
        lp, ent = lp.float(), ent.float()
        return (lp, ent) if return_entropy else lp
    x = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    impl = _impl(backend)
    needs_grad = torch.is_grad_enabled() and any(
        a is not None and a.requires_grad for a in (hidden, weight, bias))
    if needs_grad:
        options = dict(deterministic=deterministic, workspace_bytes=workspace_bytes)
        out = LinearLogprobs.apply(x, w, b, t, impl, 1.0 / temperature, ignore_index, return_entropy, options)
        lp, ent = out if return_entropy else (out, None)
    else:  # no-grad pass (old / reference policy): nothing is kept for a backward
        lp, ent, _ = impl.forward(x, w, b, t, inv_temp=1.0 / temperature, ignore_index=ignore_index,
                                  entropy=return_entropy, workspace_bytes=workspace_bytes)
    lp = lp.reshape(lead)
    return (lp, ent.reshape(lead)) if return_entropy else lp

"""Fused linear -> log-prob, chunked PyTorch (CPU without the Triton interpreter).

Same schedule as the Triton path, in plain torch: the positions that count gathered first (ignored ones
cost no FLOPs), then tokens in chunks whose logits fit a bounded workspace (never [N, V] at once);
backward recomputes each chunk's logits. GEMMs run in the inputs'
dtype when it is float32; bf16 / fp16 inputs are multiplied in float32 (the weight upcast once per
call: CPUs have no half-precision GEMM with a float32 output, and rounding every logit and dZ to half
precision would cost accuracy for no speed). Everything after the GEMM is float32.
"""

from __future__ import annotations

import torch

CPU_WORKSPACE_BYTES = 64 * 2**20


def _chunk_rows(V: int, workspace_bytes: int | None, buffers: int = 3) -> int:
    budget = CPU_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    return max(1, budget // (V * 4 * buffers))  # logits, log-softmax / probabilities, dZ in float32


def _gemm_weight(weight):
    return weight if weight.dtype == torch.float32 else weight.float()


def _logits(x, weight, bias, inv_temp):
    z = x.to(weight.dtype) @ weight.T
    if bias is not None:
        z = z + bias.float()
    return z if inv_temp == 1.0 else z * inv_temp


def _valid_rows(x, targets, ignore_index):
    """The positions that count, when some do not (on the CPU, where reading their count syncs with
    nothing): ignored positions then cost no GEMM FLOPs, as on the GPU. None: compute every row."""
    if x.device.type != "cpu":
        return None
    keep = (targets != ignore_index).nonzero().squeeze(1)
    return keep if keep.numel() < targets.numel() else None


def _scatter(values, keep, N):
    if values is None:
        return None
    out = values.new_zeros((N, *values.shape[1:]))
    return out.index_copy_(0, keep, values)


def forward(x, weight, bias, targets, *, inv_temp, ignore_index, entropy, workspace_bytes=None):
    keep = _valid_rows(x, targets, ignore_index)
    if keep is not None:
        outs = _forward(x.index_select(0, keep), weight, bias, targets.index_select(0, keep), inv_temp=inv_temp,
                        ignore_index=ignore_index, entropy=entropy, workspace_bytes=workspace_bytes)
        return tuple(_scatter(o, keep, x.shape[0]) for o in outs)
    return _forward(x, weight, bias, targets, inv_temp=inv_temp, ignore_index=ignore_index, entropy=entropy,
                    workspace_bytes=workspace_bytes)


def _forward(x, weight, bias, targets, *, inv_temp, ignore_index, entropy, workspace_bytes=None):
    N = x.shape[0]
    row_stats = torch.empty(N, 2, dtype=torch.float32, device=x.device)  # (max, log s): lse = max + log s
    logprobs = torch.empty(N, dtype=torch.float32, device=x.device)
    ent = torch.empty(N, dtype=torch.float32, device=x.device) if entropy else None
    step = _chunk_rows(weight.shape[0], workspace_bytes, buffers=2)
    weight = _gemm_weight(weight)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        z = _logits(x[lo:hi], weight, bias, inv_temp)
        t = targets[lo:hi]
        t = torch.where(t == ignore_index, 0, t)[:, None]
        log_p = torch.log_softmax(z, dim=-1)  # one fused pass; cheaper than logsumexp on CPU
        logprobs[lo:hi] = log_p.gather(1, t)[:, 0]
        # log s = -log p at the row's largest logit, where log p is in [-log V, 0] (at the target, z - log p
        # cancels: a target 1e4 below the logsumexp lost 2.5e-4 of the gradient's precision); kept apart from
        # the max, so that backward forms log p = (z - max) - log s, as log_softmax does (z - lse put the ulp
        # of lse into a confident token's 1 - p)
        top, arg = z.max(dim=-1, keepdim=True)
        row_stats[lo:hi, 0] = top[:, 0]
        row_stats[lo:hi, 1] = -log_p.gather(1, arg)[:, 0]
        if entropy:  # -E_p[log p]: no cancellation between lse and E_p[z] when every logit is large
            ent[lo:hi] = -log_p.exp().mul_(log_p).sum(-1)  # one [chunk, V] temporary, as the budget assumes
    valid = targets != ignore_index
    logprobs = torch.where(valid, logprobs, 0.0)
    ent = torch.where(valid, ent.clamp_min(0.0), 0.0) if entropy else None
    return logprobs, ent, torch.where(valid[:, None], row_stats, 0.0)


def backward(x, weight, bias, targets, row_stats, entropy, g_lp, g_ent, *, inv_temp, ignore_index,
             need_x, need_w, need_b, workspace_bytes=None, deterministic=True):
    keep = _valid_rows(x, targets, ignore_index)
    if keep is not None:
        def pick(t):  # per-position arrays; an absent one may come as an empty placeholder
            return t if t is None or t.shape[0] != x.shape[0] else t.index_select(0, keep)
        dx, dw, db = _backward(pick(x), weight, bias, pick(targets), pick(row_stats), pick(entropy), pick(g_lp),
                               pick(g_ent), inv_temp=inv_temp, ignore_index=ignore_index, need_x=need_x, need_w=need_w,
                               need_b=need_b, workspace_bytes=workspace_bytes)
        return _scatter(dx, keep, x.shape[0]), dw, db
    return _backward(x, weight, bias, targets, row_stats, entropy, g_lp, g_ent, inv_temp=inv_temp,
                     ignore_index=ignore_index, need_x=need_x, need_w=need_w, need_b=need_b,
                     workspace_bytes=workspace_bytes)


def _backward(x, weight, bias, targets, row_stats, entropy, g_lp, g_ent, *, inv_temp, ignore_index,
              need_x, need_w, need_b, workspace_bytes=None):
    N, V = x.shape[0], weight.shape[0]
    dx = torch.empty_like(x) if need_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
    db = torch.zeros(V, dtype=torch.float32, device=x.device) if need_b else None
    valid = targets != ignore_index
    g_lp = torch.where(valid, g_lp, 0.0)
    g_ent = None if g_ent is None else torch.where(valid, g_ent, 0.0)
    step = _chunk_rows(V, workspace_bytes)
    w32 = _gemm_weight(weight)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        ok = valid[lo:hi, None]
        xc = torch.where(ok, x[lo:hi], 0)  # ignored rows may hold anything, NaN included
        z = _logits(xc, w32, bias, inv_temp)
        # relative to this chunk's own row max: the forward's max came from a GEMM of other row blocks, whose sums
        # may differ by ulps, and a top target's 1 - p must see exactly -log s (the normalisation then moves by
        # those ulps, relatively: harmless)
        log_p = (z - z.amax(dim=-1, keepdim=True)) - row_stats[lo:hi, 1:2]
        p = torch.where(ok, torch.exp(log_p), 0.0)
        dz = -g_lp[lo:hi, None] * p
        t = targets[lo:hi]
        dz.scatter_add_(1, torch.where(t == ignore_index, 0, t)[:, None], g_lp[lo:hi, None])
        if g_ent is not None:  # dH/dz = -p (z - E[z]) = -p (log p + H)
            dz -= g_ent[lo:hi, None] * p * (log_p + entropy[lo:hi, None])
        dz *= inv_temp
        if need_x:
            dx[lo:hi] = dz @ w32
        if need_w:
            dw += dz.T @ xc.float()
        if need_b:
            db += dz.sum(0)
    return dx, dw, db

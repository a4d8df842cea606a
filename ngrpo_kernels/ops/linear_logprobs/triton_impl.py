"""Fused linear -> log-prob (+ entropy), Triton. Full-vocab logits never exist in memory.

Forward (``forward``), per chunk of compacted tokens (ignored ones are skipped on the device):
1. the persistent head GEMM ``z = (x W^T + b) / T`` whose epilogue reduces each [128, 128] slice of
   the fp32 accumulator to per-row max / sum-exp / exp-weighted sum and writes no logits
   (``ops/persistent_gemm``; 2*N*H*V FLOPs, reads X and W, writes 12 bytes per token and slice);
2. ``_logprobs_kernel``: combines the partials into logsumexp and E_p[z], takes the target's logit as a
   float32 dot product with its weight row, and scatters log-prob / entropy / logsumexp back.

Backward (``backward``), per chunk (the logits are recomputed: 6*N*H*V more FLOPs, 8*N*H*V in all):
1. the same GEMM with the shift epilogue stores ``z - m`` (m the row max) in fp16 into the workspace;
2. ``_dlogits_kernel`` turns it into dZ in place (one read, one write, 2 bytes each), with log p =
   (z - m) - log s: taken as z - lse, a confident token's 1 - p carried the ulp of lse;
3. dX = dZ W and dW += dZ^T X (``ops/head_schedule.py``; one chunk: dW written in the weight's dtype).

The bound on memory is the workspace (``workspace_bytes``, default 1.25 GiB on a GPU) plus O(chunk * H)
buffers and the fp32 dW accumulator. ``docs/kernels.md`` has the cost model and the measurements.
Under ``TRITON_INTERPRET=1`` the same kernels run with tiny tiles (``persistent_gemm/configs.py``).
"""

from __future__ import annotations

import torch

from .. import persistent_gemm as pg
from ..gemm import scale_fp16_grads
from ..head_schedule import HeadSchedule
from .triton_rows import dlogits_, logprobs_finish


def _partials(schedule: HeadSchedule, entropy: bool):
    slices = pg.num_vocab_tiles(schedule.V, schedule.x.dtype, schedule.x.device, stored=False)
    buf = torch.empty(3 if entropy else 2, slices, schedule.chunk, dtype=torch.float32, device=schedule.x.device)
    return buf


def forward(x, weight, bias, targets, *, inv_temp, ignore_index, entropy, workspace_bytes=None):
    """x [N, H], weight [V, H], bias [V] or None, targets [N] int64; all contiguous.
    Returns logprobs [N], entropy [N] or None, row_stats [N, 2] (the row max and log s, logsumexp = max + log s,
    kept apart for backward; float32; 0 at ignored positions)."""
    N = x.shape[0]
    schedule = HeadSchedule(x, weight, bias, targets, ignore_index, workspace_bytes=workspace_bytes,
                            need_logits=False)
    buf = _partials(schedule, entropy)
    targets_c = None
    for row0, n, xc in schedule.chunks():
        parts = [p[:, :n] for p in buf] + ([] if entropy else [buf[0][:, :n]])
        pg.logits(xc, weight, bias=bias, inv_temp=inv_temp, count=schedule.count, row0=row0, partials=parts,
                  entropy=entropy)
        if targets_c is None:  # after the first GEMM is queued: nothing small ahead of it (host time included)
            targets_c = targets.index_select(0, schedule.order)
            lp = torch.empty(N, dtype=torch.float32, device=x.device)
            ent = torch.empty(N, dtype=torch.float32, device=x.device) if entropy else None
            row_stats = torch.empty(N, 2, dtype=torch.float32, device=x.device)
        logprobs_finish(xc, weight, bias, targets_c, schedule.order, schedule.count, parts, row0=row0,
                        inv_temp=inv_temp, lp=lp, ent=ent, row_stats=row_stats)
    return lp, ent, row_stats


def backward(x, weight, bias, targets, row_stats, entropy, g_lp, g_ent, *, inv_temp, ignore_index, need_x, need_w,
             need_b, workspace_bytes=None, deterministic=True):
    """Gradients (dX in x's dtype, db in float32, dW in float32 or, when the pass is one chunk, already in
    the weight's dtype) for upstream g_lp [N] and g_ent [N] or None.
    ``entropy`` is the forward's entropy (needed with g_ent). Always deterministic (fixed chunk order,
    no atomics); ``deterministic`` is accepted for compatibility. fp16: each chunk's dZ is formed from its
    upstream gradients times a power of two that keeps it inside fp16's range, undone in the GEMMs
    (``gemm.scale_fp16_grads``)."""
    schedule = HeadSchedule(x, weight, bias, targets, ignore_index, workspace_bytes=workspace_bytes, need_logits=True,
                            need_dx=need_x, need_dw=need_w, need_db=need_b, dw_dtype=weight.dtype)
    order = schedule.order
    if x.dtype == torch.float16:  # ignored positions' upstream gradients (anything) must not set the fp16 scale
        keep = targets != ignore_index
        g_lp = torch.where(keep, g_lp, 0.0)
        g_ent = None if g_ent is None else torch.where(keep, g_ent, 0.0)
    targets_c = targets.index_select(0, order)
    stats_c, g_lp_c = row_stats.index_select(0, order), g_lp.index_select(0, order)
    m_c, log_s_c = stats_c[:, 0].contiguous(), stats_c[:, 1].contiguous()
    g_ent_c = None if g_ent is None else g_ent.index_select(0, order)
    h_c = None if g_ent is None else entropy.index_select(0, order)
    for row0, n, xc in schedule.chunks():
        rows = slice(row0, row0 + n)
        z = schedule.logits[:n]
        pg.logits(xc, weight, bias=bias, inv_temp=inv_temp, count=schedule.count, row0=row0, shift=m_c[rows],
                  out=z)
        g_lp_r, g_ent_r = g_lp_c[rows], None if g_ent_c is None else g_ent_c[rows]
        scale = scale_fp16_grads(x.dtype, g_lp_r, g_ent_r)
        dz = dlogits_(z, count=schedule.count, row0=row0, inv_temp=inv_temp, g_lp=g_lp_r, log_s=log_s_c[rows],
                      targets=targets_c[rows], h=None if h_c is None else h_c[rows], g_h=g_ent_r,
                      zero_tail=schedule.zero_tail, out_dtype=x.dtype)
        schedule.backprop(dz, row0, xc, scale=scale)
    return schedule.dx, schedule.dw, schedule.db

"""The fused linear -> NGRPO loss on Triton: 6*N*H*V FLOPs over the tokens that count, bounded memory.

Per chunk of compacted tokens (``ops/head_schedule.py``; masked tokens are never read nor computed):

1. the persistent head GEMM stores the logits shifted by each [row, 128-column slice]'s max, in fp16,
   into the workspace, and writes the slices' max / sum-exp / exp-weighted sums from the fp32
   accumulator (``ops/persistent_gemm``): the log-probs and entropy come from exact fp32 statistics,
   not from the rounded logits;
2. ``_token_kernel``: per token, logsumexp and entropy from the partials, the target logit (fp32 dot
   product), log-prob, entropy, the NGRPO loss terms (``policy_loss.triton_impl.token_loss``, shared
   with the standalone policy loss), dl/dlogp and the metric sums;
3. ``linear_logprobs.triton_rows._dlogits_kernel`` overwrites the stored logits with dZ (bf16/fp16),
   one read and one write of 2 bytes per logit;
4. dX = dZ W, dW += dZ^T X, db (``HeadSchedule.backprop``); when the whole pass is one chunk and the
   caller asks for it (``deferred``: the eager autograd route), in the autograd backward instead, with the
   upstream gradient folded into the GEMMs' epilogues (``head_schedule.deferred_backprop``).

Without gradients, steps 1 (statistics only, nothing stored) and 2 run: 2*N*H*V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...variants import NUM_STATS
from .. import cdiv
from .. import persistent_gemm as pg
from ..gemm import scale_fp16_grads
from ..head_schedule import HeadSchedule
from ..launcher import direct
from ..linear_logprobs.triton_rows import BLOCK_H, BLOCK_SLICES, block_rows, combine_partials, dlogits_, target_logit
from ..persistent_gemm.kernel import row_limit
from ..policy_loss.triton_impl import stat_constexprs, store_stat_sums, token_loss


@triton.jit
def _token_kernel(
    XC, W, BIAS, COUNT, M_PART, S_PART, U_PART, TGT, W_TOK, ADV, OLD, REF, ISW,
    M_OUT, LOG_S_OUT, H_OUT, G_LP, G_H, STATS,
    n, H, V, row0, ld_part, n_slices, inv_temp, eps_neg, eps_pos, clip_c, beta, entropy_coef,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_ISW: tl.constexpr, DUAL_CLIP: tl.constexpr,
    ON_POLICY: tl.constexpr, NUM_STATS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    S_LOSS: tl.constexpr, S_CLIPPED: tl.constexpr, S_LOG_RATIO: tl.constexpr, S_ADV: tl.constexpr,
    S_ENTROPY: tl.constexpr, S_KL_REF: tl.constexpr, S_DUAL: tl.constexpr, S_LOGPROB: tl.constexpr,
):
    """Per-token inputs (TGT .. ISW) are compacted [N] arrays read at row0 + rows; outputs chunk-local [n]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < row_limit(COUNT, row0, n)
    tok = row0 + rows
    m, log_s, ent = combine_partials(M_PART, S_PART, U_PART, ld_part, n_slices, rows, row_ok, True, BLOCK_R, BLOCK_T)
    tgt = tl.load(TGT + tok, mask=row_ok, other=0)
    zt = target_logit(XC, W, BIAS, tgt, rows, row_ok, H, V, inv_temp, HAS_BIAS, BLOCK_R, BLOCK_H)
    lp = tl.where(row_ok, (zt - m) - log_s, 0.0)  # relative to the max, as dZ's log p (triton_rows)
    A = tl.load(ADV + tok, mask=row_ok, other=0.0)
    w = tl.load(W_TOK + tok, mask=row_ok, other=0.0)
    if ON_POLICY:
        old = lp
    else:
        old = tl.load(OLD + tok, mask=row_ok, other=0.0)
    ref = lp
    if HAS_REF:
        ref = tl.load(REF + tok, mask=row_ok, other=0.0)
    isw = lp
    if HAS_ISW:
        isw = tl.load(ISW + tok, mask=row_ok, other=0.0)
    loss, dloss, clipped, dual, k3 = token_loss(lp, old, A, row_ok, ref, ent, isw, eps_neg, eps_pos, clip_c, beta,
                                                entropy_coef, HAS_REF, True, HAS_ISW, DUAL_CLIP)
    in_chunk = rows < n
    tl.store(M_OUT + rows, m, mask=in_chunk)
    tl.store(LOG_S_OUT + rows, log_s, mask=in_chunk)
    tl.store(H_OUT + rows, ent, mask=in_chunk)
    tl.store(G_LP + rows, w * dloss, mask=in_chunk)
    tl.store(G_H + rows, -entropy_coef * w, mask=in_chunk)

    store_stat_sums(STATS + pid.to(tl.int64) * NUM_STATS, tl.where(row_ok, w * loss, 0.0), clipped, old - lp, A, ent,
                    k3, dual, lp, S_LOSS, S_CLIPPED, S_LOG_RATIO, S_ADV, S_ENTROPY, S_KL_REF, S_DUAL, S_LOGPROB)


def run(x, weight, bias, valid, token_inputs, *, row_options, workspace_bytes, need_dx, need_dw, need_db,
        deferred=None):
    """Same contract as ``schedule.run``: (stats [NUM_STATS], dX or None, dW float32 or None, db or None);
    the per-token weights carry the aggregation and its denominator. ``valid`` [N] are the tokens computed;
    ``token_inputs()`` returns the per-token arrays (target, w, adv, old, ref, isw): it is called once the
    first GEMM is queued, so that nothing small waits ahead of that GEMM.

    ``deferred`` (a list): when the pass is one chunk through our GEMMs and forms dW, its dX / dW / db GEMMs
    are not run here; ``deferred`` receives the tensors they need instead (``HeadSchedule.defer``), for the
    autograd backward to run ``head_schedule.deferred_backprop`` with the loss's upstream gradient (no
    float32 dW, no cast pass), and the gradients returned here are None."""
    need_grad = need_dx or need_dw or need_db
    sch = HeadSchedule(x, weight, bias, valid, workspace_bytes=workspace_bytes, need_logits=need_grad,
                       need_dx=need_dx, need_dw=need_dw, need_db=need_db, defer=deferred is not None)
    on_policy = row_options["on_policy"]
    dev = x.device
    slices = pg.num_vocab_tiles(sch.V, x.dtype, dev, stored=need_grad)
    parts = torch.empty(3, slices, sch.chunk, dtype=torch.float32, device=dev)
    rows_out = torch.empty(5, sch.chunk, dtype=torch.float32, device=dev)  # max, log s, H, g_lp, g_H
    br = block_rows(dev)
    n_prog = cdiv(sch.chunk, br)
    stats = None  # the chunks' sums (N >= 1 is validated)
    chunk_stats = torch.empty(n_prog, NUM_STATS, dtype=torch.float32, device=dev)
    inv_temp = row_options["inv_temp"]
    clip_c = row_options["clip_c"]
    per_token = None
    for row0, n, xc in sch.chunks():
        p = [t[:, :n] for t in parts]
        z = sch.logits[:n] if need_grad else None
        pg.logits(xc, weight, bias=bias, inv_temp=inv_temp, count=sch.count, row0=row0, partials=p, out=z,
                  entropy=True)
        if per_token is None:
            inputs = token_inputs()
            per_token = [None if inputs[k] is None else inputs[k].index_select(0, sch.order)
                         for k in ("target", "w", "adv", "old", "ref", "isw")]
            tgt_c, w_c, adv_c, old_c, ref_c, isw_c = per_token
        m_row, log_s, h, g_lp, g_h = (t[:n] for t in rows_out)
        grid = cdiv(n, br)
        direct(_token_kernel)[(grid,)](
            xc, weight, xc if bias is None else bias, sch.count, *p, tgt_c, w_c, adv_c,
            w_c if on_policy else old_c, w_c if ref_c is None else ref_c, w_c if isw_c is None else isw_c,
            m_row, log_s, h, g_lp, g_h, chunk_stats,
            n, x.shape[1], sch.V, row0, p[0].stride(0), slices, inv_temp, row_options["eps_neg"],
            row_options["eps_pos"], float(clip_c or 0.0), row_options["beta"], row_options["entropy_coef"],
            HAS_BIAS=bias is not None, HAS_REF=ref_c is not None, HAS_ISW=isw_c is not None,
            DUAL_CLIP=clip_c is not None, ON_POLICY=on_policy, NUM_STATS=NUM_STATS, BLOCK_R=br,
            BLOCK_T=BLOCK_SLICES, BLOCK_H=BLOCK_H, num_warps=4 if x.is_cuda else 1, **stat_constexprs(),
        )
        chunk_sum = chunk_stats[:grid].sum(0)
        stats = chunk_sum if stats is None else stats + chunk_sum
        if need_grad:
            g_h = g_h if row_options["entropy_coef"] != 0 else None
            scale = scale_fp16_grads(x.dtype, g_lp, g_h)  # fp16: dZ kept inside its range, chunk by chunk
            dz = dlogits_(z, count=sch.count, row0=row0, inv_temp=inv_temp, g_lp=g_lp,
                          targets=tgt_c[row0:row0 + n], h=h, g_h=g_h, m_part=p[0], m_row=m_row, log_s=log_s,
                          zero_tail=sch.zero_tail, out_dtype=x.dtype)
            if sch.deferred:  # the only chunk: dZ and the gathered rows wait for the upstream gradient
                deferred.append(sch.defer(dz, xc, scale))
            else:
                sch.backprop(dz, row0, xc, scale=scale)
    return stats, sch.dx, sch.dw, sch.db

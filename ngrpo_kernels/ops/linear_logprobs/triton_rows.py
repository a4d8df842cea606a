"""Row kernels around the persistent head GEMM (``ops/persistent_gemm``): everything per token or per
logit that is not a matrix product. Rows are *compacted* tokens (``ops/compaction.py``): row ``r`` of a
chunk starting at ``row0`` exists only while ``row0 + r < count`` (a device scalar), so padded tokens
are neither read nor computed.

- ``combine_partials`` (helper): per row, the GEMM epilogue's per-slice max / sum-exp / exp-weighted
  sum become the row max m, log s (logsumexp = m + log s) and the entropy, online over the slices
  (float32 throughout).
- ``target_logit`` (helper): ``z[target] = (x . W[target] + b[target]) / T`` as a float32 dot
  product, one weight row per token (H * 2 bytes), cheaper than comparing every logit of the tile
  with the target in the GEMM epilogue.
- ``_logprobs_kernel``: the log-prob pass' finish: log-prob, entropy and the softmax statistics kept for
  backward (row max and log s, logsumexp = max + log s), scattered back to the tokens' original positions
  (0 for ignored ones).
- ``_dlogits_kernel``: in place over the logits workspace, ``dZ = (g_lp (onehot - p) - g_H p (z - E_p z)) / T``
  from the stored shifted logits, one read and one write of 2 bytes per logit for half inputs.
  The stored value plus a per-row (and, for slice-shifted logits, per-slice) offset is log p, so
  ``p = exp(stored + offset)`` and ``z - E_p z = log p + H``. The slice-shifted offset is
  ``(m_slice - m) - log s``, never ``m_slice - lse``: lse = m + log s carries an absolute error of
  ulp(m), which for a confident token (1 - p = 1e-5 at logits ~20) is a relative error of tens of
  percent in its gradient g (1 - p).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import cdiv
from .. import persistent_gemm as pg
from ..launcher import direct
from ..persistent_gemm.kernel import row_limit

BLOCK_ROWS = 16        # tokens per program of the per-token kernels (256 programs per 4k-token chunk)
BLOCK_SLICES = 64      # partial slices combined per step
BLOCK_H = 128          # hidden units per step of the target dot product
INTERPRETER_BLOCK_ROWS = 8


@triton.jit
def combine_partials(M_PART, S_PART, U_PART, ld_part, n_slices, rows, row_ok, ENTROPY: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """(m, log s, entropy) of each row from its per-slice partials, online over the slices: the row max, the log
    of s = sum exp(z - m) (logsumexp = m + log s, kept apart for the precision of log p near 0), and the entropy
    (rows not ok: (0, 0, 0); without ENTROPY the entropy is 0). A slice's partials are m_t, s_t = sum exp(z - m_t) and
    u_t = sum exp(z - m_t) (z - m_t); with the running max m, u = sum exp(z - m) (z - m) and
    H = log s - u / s = -E_p[log p]: every term is relative to a max, so no large numbers cancel."""
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    u = tl.zeros([BLOCK_R], dtype=tl.float32)
    for t0 in range(0, n_slices, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        ok = (ts < n_slices)[:, None] & row_ok[None, :]
        off = ts[:, None].to(tl.int64) * ld_part + rows[None, :]
        m_t = tl.load(M_PART + off, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(m_t, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        keep = tl.exp(m - m_safe)
        e = tl.exp(m_t - m_safe[None, :])
        s_t = tl.load(S_PART + off, mask=ok, other=0.0)
        if ENTROPY:  # re-centre on the new max: sum p (z - m_new) = sum p (z - m_t) + (m_t - m_new) sum p
            u_t = tl.load(U_PART + off, mask=ok, other=0.0) + tl.where(ok, m_t - m_safe[None, :], 0.0) * s_t
            u = (u + tl.where(s > 0, m - m_safe, 0.0) * s) * keep + tl.sum(u_t * e, axis=0)
        s = s * keep + tl.sum(s_t * e, axis=0)
        m = m_new
    s = tl.where(row_ok, s, 1.0)
    log_s = tl.log(s)
    ent = tl.zeros([BLOCK_R], dtype=tl.float32)
    if ENTROPY:
        # Rounding can leave it a hair below 0 for a near one-hot softmax: entropy is >= 0; NaN stays NaN.
        ent = tl.where(row_ok, tl.maximum(log_s - u / s, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
    return tl.where(row_ok, m, 0.0), log_s, ent


@triton.jit
def target_logit(X, W, BIAS, tgt, rows, row_ok, H, V, inv_temp, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """(X[rows] . W[tgt] + b[tgt]) * inv_temp in float32; X is [n, H] row-major. A target outside [0, V)
    (possible only with validate=False) reads nothing and gives NaN, so the log-prob and loss say so."""
    tgt_ok = row_ok & (tgt >= 0) & (tgt < V)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    x_row = X + rows.to(tl.int64)[:, None] * H
    w_row = W + tgt.to(tl.int64)[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        ok = tgt_ok[:, None] & (hs < H)[None, :]
        x = tl.load(x_row + hs[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_row + hs[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(x * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(BIAS + tgt, mask=tgt_ok, other=0.0).to(tl.float32)
    return tl.where(tgt_ok | ~row_ok, acc * inv_temp, float("nan"))


@triton.jit
def _logprobs_kernel(
    XC, W, BIAS, TGT_C, ORDER, COUNT, M_PART, S_PART, U_PART, LP, ENT, ROW_STATS,
    n, H, V, row0, ld_part, n_slices, inv_temp,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_chunk = rows < n
    row_ok = rows < row_limit(COUNT, row0, n)
    m, log_s, ent = combine_partials(M_PART, S_PART, U_PART, ld_part, n_slices, rows, row_ok, ENTROPY, BLOCK_R,
                                     BLOCK_T)
    tgt = tl.load(TGT_C + row0 + rows, mask=row_ok, other=0)
    zt = target_logit(XC, W, BIAS, tgt, rows, row_ok, H, V, inv_temp, HAS_BIAS, BLOCK_R, BLOCK_H)
    dest = tl.load(ORDER + row0 + rows, mask=in_chunk, other=0)
    tl.store(LP + dest, tl.where(row_ok, (zt - m) - log_s, 0.0), mask=in_chunk)
    tl.store(ROW_STATS + 2 * dest, m, mask=in_chunk)  # [N, 2]: (max, log s); 0 where not ok
    tl.store(ROW_STATS + 2 * dest + 1, tl.where(row_ok, log_s, 0.0), mask=in_chunk)
    if ENTROPY:
        tl.store(ENT + dest, ent, mask=in_chunk)


@triton.jit
def _dlogits_kernel(
    Z, DZ, M_PART, M_ROW, LOG_S, H_ROW, G_LP, G_H, TGT, COUNT,
    n, V, ldz, ld_part, row0, inv_temp,
    SLICE_SHIFT: tl.constexpr, HAS_G_H: tl.constexpr, ZERO_TAIL: tl.constexpr,
    BLOCK_R: tl.constexpr, SLICE: tl.constexpr,
):
    """Grid (cdiv(n, BLOCK_R), cdiv(V, SLICE)); per-row vectors are chunk-local [n]. DZ is Z's memory
    (each element is read, then overwritten by the same thread), viewed in the gradient's dtype. LOG_S is the rows'
    log s; M_ROW, their max, is read only for slice-shifted logits."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pid_v = tl.program_id(1)
    cols = pid_v * SLICE + tl.arange(0, SLICE)
    col_ok = cols < V
    in_chunk = rows < n
    row_ok = rows < row_limit(COUNT, row0, n)
    ptr = Z + rows.to(tl.int64)[:, None] * ldz + cols[None, :]
    stored = tl.load(ptr, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if SLICE_SHIFT:  # stored = z - m_slice: log p = stored + (m_slice - m) - log s
        offset = ((tl.load(M_PART + pid_v.to(tl.int64) * ld_part + rows, mask=row_ok, other=0.0)
                   - tl.load(M_ROW + rows, mask=row_ok, other=0.0))
                  - tl.load(LOG_S + rows, mask=row_ok, other=0.0))
        logp = stored + offset[:, None]
    else:  # stored = z - m (the shift GEMM): log p = stored - log s
        logp = stored - tl.load(LOG_S + rows, mask=row_ok, other=0.0)[:, None]
    p = tl.exp(logp)
    g_lp = tl.load(G_LP + rows, mask=row_ok, other=0.0)
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    d = g_lp[:, None] * ((cols[None, :] == tgt[:, None]).to(tl.float32) - p)
    if HAS_G_H:
        g_h = tl.load(G_H + rows, mask=row_ok, other=0.0)
        h = tl.load(H_ROW + rows, mask=row_ok, other=0.0)
        # A logit far below its slice's max (a banning bias) is stored as fp16 -inf: p = 0, and its entropy
        # term must be 0, not 0 * -inf.
        d -= g_h[:, None] * p * (tl.maximum(logp, -1e30) + h[:, None])
    d = tl.where(row_ok[:, None], d * inv_temp, 0.0)
    if ZERO_TAIL:
        write = in_chunk
    else:
        write = row_ok
    tl.store(DZ + rows.to(tl.int64)[:, None] * ldz + cols[None, :], d.to(DZ.dtype.element_ty),
             mask=write[:, None] & col_ok[None, :])


@triton.jit
def _dx_finish_kernel(PART, DX, ORDER, COUNT, n, H, row0, ld_split,
                      SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dX[order[row0 + r]] = sum_s PART[s, r] in dX's dtype (0 for rows past the count): the split-K
    partials of dZ W summed, rounded once and scattered to the tokens' positions in one pass."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_chunk = rows < n
    row_ok = rows < row_limit(COUNT, row0, n)
    ok = row_ok[:, None] & (cols < H)[None, :]
    src = PART + rows.to(tl.int64)[:, None] * H + cols[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(src + s * ld_split, mask=ok, other=0.0)
    dest = tl.load(ORDER + row0 + rows, mask=in_chunk, other=0)
    tl.store(DX + dest.to(tl.int64)[:, None] * H + cols[None, :], acc.to(DX.dtype.element_ty),
             mask=in_chunk[:, None] & (cols < H)[None, :])


def dx_finish(partials, dx, order, count, *, row0):
    """Sum the split-K partials [splits, n, H] of one chunk into ``dx`` rows ``order[row0 : row0 + n]``."""
    splits, n, H = partials.shape
    br, bc = (16, 256) if dx.is_cuda else (8, 16)
    direct(_dx_finish_kernel)[(cdiv(n, br), cdiv(H, bc))](
        partials, dx, order, count, n, H, row0, partials.stride(0), SPLITS=splits, BLOCK_R=br, BLOCK_C=bc,
        num_warps=4 if dx.is_cuda else 1,
    )


def block_rows(device: torch.device) -> int:
    return BLOCK_ROWS if device.type == "cuda" else INTERPRETER_BLOCK_ROWS


def logprobs_finish(xc, weight, bias, targets_c, order, count, partials, *, row0, inv_temp, lp, ent, row_stats):
    """Log-probs (and entropy, the [N, 2] softmax statistics (max, log s)) of one chunk of compacted tokens,
    scattered to ``lp``/``ent``/``row_stats`` at the tokens' original positions."""
    n, H = xc.shape
    br = block_rows(xc.device)
    m_part, s_part, u_part = partials
    direct(_logprobs_kernel)[(cdiv(n, br),)](
        xc, weight, xc if bias is None else bias, targets_c, order, count, m_part, s_part, u_part, lp,
        lp if ent is None else ent, row_stats, n, H, weight.shape[0], row0, m_part.stride(0), m_part.shape[0], inv_temp,
        HAS_BIAS=bias is not None, ENTROPY=ent is not None, BLOCK_R=br, BLOCK_T=BLOCK_SLICES, BLOCK_H=BLOCK_H,
        num_warps=4 if xc.is_cuda else 1,
    )


def dlogits_(z, *, count, row0, inv_temp, g_lp, targets, h=None, g_h=None, m_part=None, m_row=None, log_s=None,
             zero_tail=False, out_dtype, tile_rows=None, num_warps=None):
    """Turns the stored logits of a chunk ``z`` [n, V] into dZ in place; returns dZ viewed as ``out_dtype``.
    ``log_s``: the rows' log s (``combine_partials``). ``m_part`` given: ``z`` holds slice-shifted logits (the
    fused loss), with the rows' max ``m_row``; else ``z - m_row`` (log-probs: the shift GEMM).
    Per-row vectors are chunk-local [n] float32; rows past the count are left alone, or zeroed with
    ``zero_tail`` (when a consumer reads the whole chunk: cuBLAS GEMMs, the bias gradient).
    ``tile_rows`` / ``num_warps``: the launch's tile, for ``benchmarks/gpu_head.py --gemms`` to time
    alternatives (default: ``block_rows``, 4 warps)."""
    n, V = z.shape
    dz = z.view(out_dtype)
    if m_part is not None:  # one program per slice of the logits GEMM's partials
        slice_width = pg.stats_width(out_dtype, z.device)
    else:
        slice_width = 128 if z.is_cuda else 32
    br = tile_rows or block_rows(z.device)
    direct(_dlogits_kernel)[(cdiv(n, br), cdiv(V, slice_width))](
        z, dz, g_lp if m_part is None else m_part, g_lp if m_row is None else m_row, g_lp if log_s is None else log_s,
        g_lp if h is None else h, g_lp, g_lp if g_h is None else g_h,
        targets, count, n, V, z.stride(0), 0 if m_part is None else m_part.stride(0), row0, inv_temp,
        SLICE_SHIFT=m_part is not None, HAS_G_H=g_h is not None, ZERO_TAIL=zero_tail, BLOCK_R=br,
        SLICE=slice_width, num_warps=num_warps or (4 if z.is_cuda else 1),
    )
    return dz

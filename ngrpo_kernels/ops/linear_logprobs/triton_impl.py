"""Fused linear -> log-prob (+ entropy), Triton. Full-vocab logits never exist in memory.

Forward, ``_lse_forward_kernel``: grid ``(cdiv(N, BLOCK_N), splits)``. A program owns BLOCK_N tokens and
one vocab slice; for each BLOCK_V block of its slice it computes the logit tile
``z = (x W^T + b) / temperature`` with ``tl.dot`` over H in BLOCK_H steps (fp32 accumulation), then
updates an online max ``m``, sum of exponentials ``s`` and exp-weighted logit sum ``u`` (for the
entropy), and picks the target logit when it falls in the tile. Each program writes 4 floats per
token; a few torch ops combine the ``splits`` partials (O(N * splits) memory, never O(N * V)).
FLOPs 2*N*H*V; traffic: X read once per vocab slice, W once per token tile.

Backward, ``_dlogits_kernel``: grid ``(cdiv(N, BLOCK_N), cdiv(V, BLOCK_V))``. Recomputes its logit tile,
forms ``dZ = g_lp (onehot - p) - g_ent p (z - E[z])``, scaled by 1/temperature, in registers. Then either
- deterministic (the default): stores dZ into a bounded workspace of ``chunk`` tokens x V, and the
  host runs ``dX = dZ W`` and ``dW += dZ^T X`` as cuBLAS GEMMs in a fixed order (fp32 dW accumulator), or
- ``deterministic=False``: multiplies in-kernel and ``atomic_add``s fp32 partial dX / dW / db tiles
  (one kernel, no workspace, run-to-run bit differences from the atomics' order).
Both cost 8*N*H*V FLOPs in total with the forward (logits recomputed once in backward).

Tile choice for the H100 (sm_90a: 228 KB shared memory per SM, wgmma on 64-row warpgroup tiles):
BLOCK_N = BLOCK_V = 128 gives a 128x128 fp32 accumulator (64 KB of registers over 8 warps, 64 per
thread); BLOCK_H = 64 bf16 gives two 16 KB operand tiles per pipeline stage, so 3 stages hold 96 KB of
shared memory (160 KB for the atomic backward, which also stages W and X tiles for dX / dW); a
128x128x64 step is 2 MFLOP per 32 KB loaded, enough arithmetic intensity to feed the tensor cores.
The online-softmax epilogue keeps several 128x128 fp32 tiles live, which is what bounds the tile size:
the forward compiles to 254-255 registers per thread with no spills, 128x256 spills.
``python -m ngrpo_kernels.hopper_report`` compiles these configs for sm_90a and checks wgmma (HGMMA),
spills and shared memory, assuming 16-byte aligned pointers and H, V multiples of 16 (true of the
Qwen2.5 and Llama heads; other sizes still run, with narrower loads). float32 inputs use exact fp32
dots (``input_precision="ieee"``, no tensor cores), to match torch's fp32 matmul.

Under ``TRITON_INTERPRET=1`` dot operands are upcast to float32 (the interpreter multiplies bf16 bit
patterns as integers; see ENGINEERING.md), selected by the DOT_FP32 constexpr.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...backend import interpreter_enabled
from ..gemm import addmm_fp32


@dataclass(frozen=True)
class TileConfig:
    block_n: int = 128
    block_v: int = 128
    block_h: int = 64
    num_warps: int = 8
    num_stages: int = 3


# The shipped configurations (hopper_report compiles each one for sm_90a).
FORWARD_CONFIG = TileConfig()
BACKWARD_CONFIG = TileConfig(block_n=128, block_v=128, block_h=64, num_warps=8, num_stages=3)
# Small tiles for the interpreter: tests then cover many tiles, splits and ragged edges at tiny shapes.
INTERPRETER_CONFIG = TileConfig(block_n=16, block_v=32, block_h=16, num_warps=1, num_stages=1)

GPU_WORKSPACE_BYTES = 512 * 2**20


@triton.jit
def _logits_tile(X, W, BIAS, rows, cols, row_ok, col_ok, H, inv_temp,
                 HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z[BLOCK_N, BLOCK_V] = (X[rows] @ W[cols]^T + b[cols]) * inv_temp, fp32. X, W row-major, stride H."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    x_ptr = X + rows.to(tl.int64)[:, None] * H
    w_ptr = W + cols.to(tl.int64)[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        x = tl.load(x_ptr + hs[None, :], mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptr + hs[None, :], mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _lse_forward_kernel(
    X, W, BIAS, TGT, M_OUT, S_OUT, U_OUT, ZT_OUT,
    N, V, H, cols_per_split, inv_temp,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    v_lo = split * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_N], dtype=tl.float32)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(X, W, BIAS, rows, cols, row_ok, col_ok, H, inv_temp, HAS_BIAS, DOT_FP32, PRECISION,
                         BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, axis=1)
        if ENTROPY:
            u = u * alpha + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(S_OUT + out, s, mask=row_ok)
    tl.store(ZT_OUT + out, zt, mask=row_ok)
    if ENTROPY:
        tl.store(U_OUT + out, u, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    X, W, BIAS, TGT, LSE, MEAN_Z, G_LP, G_ENT, DZ, DX, DW, DB,
    N, V, H, inv_temp, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_G_ENT: tl.constexpr, ATOMIC: tl.constexpr, NEED_DX: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    tgt = tl.load(TGT + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)

    z = _logits_tile(X, W, BIAS, rows, cols, row_ok, col_ok, H, inv_temp, HAS_BIAS, DOT_FP32, PRECISION,
                     BLOCK_N, BLOCK_V, BLOCK_H)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    g = tl.load(G_LP + rows, mask=valid, other=0.0)
    dz = g[:, None] * ((cols[None, :] == tgt[:, None]).to(tl.float32) - p)
    if HAS_G_ENT:
        ge = tl.load(G_ENT + rows, mask=valid, other=0.0)
        mean_z = tl.load(MEAN_Z + rows, mask=valid, other=0.0)
        dz -= ge[:, None] * p * (z - mean_z[:, None])
    dz = tl.where(valid[:, None] & col_ok[None, :], dz * inv_temp, 0.0)

    if ATOMIC:
        if DOT_FP32:
            dz_op = dz
        else:
            dz_op = dz.to(X.dtype.element_ty)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < H
            if NEED_DX:
                w = tl.load(W + cols.to(tl.int64)[:, None] * H + hs[None, :],
                            mask=col_ok[:, None] & h_ok[None, :], other=0.0)
                if DOT_FP32:
                    w = w.to(tl.float32)
                dx = tl.dot(dz_op, w, input_precision=PRECISION)
                tl.atomic_add(DX + rows.to(tl.int64)[:, None] * H + hs[None, :], dx,
                              mask=row_ok[:, None] & h_ok[None, :])
            if NEED_DW:
                x = tl.load(X + rows.to(tl.int64)[:, None] * H + hs[None, :],
                            mask=row_ok[:, None] & h_ok[None, :], other=0.0)
                if DOT_FP32:
                    x = x.to(tl.float32)
                dw = tl.dot(tl.trans(dz_op), x, input_precision=PRECISION)
                tl.atomic_add(DW + cols.to(tl.int64)[:, None] * H + hs[None, :], dw,
                              mask=col_ok[:, None] & h_ok[None, :])
    else:
        tl.store(DZ + rows.to(tl.int64)[:, None] * V + cols[None, :], dz.to(DZ.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DB:
        tl.atomic_add(DB + cols, tl.sum(dz, axis=0), mask=col_ok)


def _config(backward: bool) -> TileConfig:
    if interpreter_enabled():
        return INTERPRETER_CONFIG
    return BACKWARD_CONFIG if backward else FORWARD_CONFIG


def _flags(x: torch.Tensor) -> dict:
    return dict(DOT_FP32=interpreter_enabled(),
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


def _num_splits(N: int, V: int, cfg: TileConfig, device: torch.device) -> int:
    tiles = triton.cdiv(N, cfg.block_n)
    vblocks = triton.cdiv(V, cfg.block_v)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: exercise the split-and-combine path
    return max(1, min(vblocks, triton.cdiv(target, tiles)))


def forward(x, weight, bias, targets, *, inv_temp, ignore_index, entropy, splits=None):
    """x [N, H], weight [V, H], bias [V] or None, targets [N] int64; all contiguous.
    Returns logprobs [N], entropy [N] or None, lse [N], mean_z [N] or None (float32)."""
    N, H = x.shape
    V = weight.shape[0]
    cfg = _config(backward=False)
    splits = _num_splits(N, V, cfg, x.device) if splits is None else splits
    # Whole vocab blocks per split, and no split left empty.
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(V, cols_per_split)
    part = torch.empty(4, splits, N, dtype=torch.float32, device=x.device)
    m, s, u, zt = part.unbind(0)
    grid = (triton.cdiv(N, cfg.block_n), splits)
    _lse_forward_kernel[grid](
        x, weight, x if bias is None else bias, targets, m, s, u, zt,
        N, V, H, cols_per_split, inv_temp,
        HAS_BIAS=bias is not None, ENTROPY=entropy, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v,
        BLOCK_H=cfg.block_h, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(x),
    )
    m_all = m.max(0).values
    scale = torch.exp(m - m_all)
    sum_exp = (s * scale).sum(0)
    lse = m_all + torch.log(sum_exp)
    valid = targets != ignore_index
    logprobs = torch.where(valid, zt.sum(0) - lse, 0.0)
    if not entropy:
        return logprobs, None, lse, None
    mean_z = (u * scale).sum(0) / sum_exp
    return logprobs, torch.where(valid, lse - mean_z, 0.0), lse, mean_z


def backward(x, weight, bias, targets, lse, mean_z, g_lp, g_ent, *, inv_temp, ignore_index,
             need_x, need_w, need_b, workspace_bytes=None, deterministic=True):
    """Gradients (dX in x's dtype, dW and db in float32) for upstream g_lp [N] and g_ent [N] or None."""
    N, H = x.shape
    V = weight.shape[0]
    cfg = _config(backward=True)
    dw = torch.zeros(V, H, dtype=torch.float32, device=x.device) if need_w else None
    db = torch.zeros(V, dtype=torch.float32, device=x.device) if need_b else None
    common = dict(HAS_BIAS=bias is not None, HAS_G_ENT=g_ent is not None, NEED_DB=need_b,
                  BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_flags(x))
    bias_arg = x if bias is None else bias
    g_ent_arg = g_lp if g_ent is None else g_ent
    mean_z_arg = lse if mean_z is None else mean_z

    if not deterministic:
        dx = torch.zeros(N, H, dtype=torch.float32, device=x.device) if need_x else None
        grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(V, cfg.block_v))
        _dlogits_kernel[grid](
            x, weight, bias_arg, targets, lse, mean_z_arg, g_lp, g_ent_arg, lse,
            lse if dx is None else dx, lse if dw is None else dw, lse if db is None else db,
            N, V, H, inv_temp, ignore_index, ATOMIC=True, NEED_DX=need_x, NEED_DW=need_w, **common,
        )
        return (None if dx is None else dx.to(x.dtype)), dw, db

    # Deterministic: dZ tiles into a bounded workspace, then GEMMs in a fixed order.
    dx = torch.empty_like(x) if need_x else None
    budget = GPU_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    chunk = max(cfg.block_n, budget // (V * x.element_size()) // cfg.block_n * cfg.block_n)
    chunk = min(chunk, N)
    dz = torch.empty(chunk, V, dtype=x.dtype, device=x.device)
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        n = hi - lo
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(V, cfg.block_v))
        _dlogits_kernel[grid](
            x[lo:hi], weight, bias_arg, targets[lo:hi], lse[lo:hi], mean_z_arg[lo:hi],
            g_lp[lo:hi], g_ent_arg[lo:hi], dz, lse, lse, lse,
            n, V, H, inv_temp, ignore_index, ATOMIC=False, NEED_DX=False, NEED_DW=False,
            **{**common, "NEED_DB": False},
        )
        if need_x:
            torch.matmul(dz[:n], weight, out=dx[lo:hi])
        if need_w:
            addmm_fp32(dw, dz[:n].T, x[lo:hi])
        if need_b:
            db += dz[:n].float().sum(0)
    return dx, dw, db

"""The 6*N*H*V schedule of the fused linear -> NGRPO loss on the CPU (C++ or PyTorch row kernel), with a
bounded workspace. The GPU runs ``triton_schedule.py`` instead.

The gradient of the loss with respect to a token's logits is known as soon as that token's logsumexp
is, so every chunk of tokens is finished in one visit:

1. ``Z = X_c W^T`` into a float32 workspace of ``chunk x V`` (the only logits that ever exist);
2. the row kernel: logsumexp, log-prob, entropy, NGRPO loss terms and metric sums, dZ written over Z
   (or, for bf16 inputs, into a bf16 buffer beside it; fp16 has too few exponent bits for dZ);
3. ``dX_c = dZ W`` and ``dW += dZ^T X_c`` (float32 accumulator), ``db += sum dZ``.

Row-kernel contract (``row_cpp.py`` / the C++ ``loss_rows``, ``row_torch.py``). Inputs for a chunk of
``n`` tokens: ``z`` [n, V] float32 raw logits ``x W^T`` (bias and temperature are applied by the row
kernel), per-token ``target`` (int64, 0 where not valid), ``valid`` (bool), ``w`` (aggregation weight, 0
where not valid), ``adv``, ``old``, optional ``ref`` / ``isw`` (float32, [n]). For each valid row, with
``zz = (z + b) / T``: ``lse = logsumexp(zz)``, ``logp = zz[y] - lse``, ``H = lse - E_p[zz]``, the NGRPO
per-token loss minus ``entropy_coef * H``, and ``dZ = (g_lp (onehot(y) - p) - g_H p (zz - E_p[zz])) / T``
with ``g_lp = w dl/dlogp``, ``g_H = -entropy_coef w``, written to ``dz`` (float32 in place over ``z``,
or a separate bf16 buffer); rows that are not valid get dZ = 0. Returns the NUM_STATS sums
(``variants.Stat``) over the chunk.

On the CPU the valid tokens are gathered first, so padding costs no FLOPs there either. GEMMs go through
torch.matmul (cuBLAS on GPU, with float32 outputs for bf16 inputs where torch offers ``out_dtype``); the
chunk order is fixed, so the result is deterministic. Without gradients (the
no-grad pass, 2*N*H*V) step 3 and the dZ writes are skipped.
"""

from __future__ import annotations

import torch

from ...variants import NUM_STATS
from ..gemm import addmm_fp32, mm_fp32

CPU_WORKSPACE_BYTES = 32 * 2**20


def default_workspace_bytes(device: torch.device) -> int:
    if device.type == "cuda":  # a CPU backend forced onto GPU tensors: the GPU default
        from ..head_schedule import default_workspace_bytes as gpu_default

        return gpu_default(device)
    return CPU_WORKSPACE_BYTES


def _bf16_dz(dtype: torch.dtype, need_grad: bool) -> bool:
    """dZ in a bf16 buffer beside the float32 logits for bf16 inputs; float32, over the logits, otherwise. fp16
    has too few exponent bits for dZ: with a 1/N mean in g, g p falls below its smallest normal number at a
    few thousand tokens (``gemm.fp16_grad_scale``), so fp16 inputs get float32 dZ and float32 GEMMs here."""
    return need_grad and dtype == torch.bfloat16


def bytes_per_row(V: int, dtype: torch.dtype, need_grad: bool) -> int:
    return V * (4 + (2 if _bf16_dz(dtype, need_grad) else 0))


def run(x, weight, bias, target, valid, w, adv, old, ref, isw, *, row_op, row_options, workspace_bytes,
        need_dx, need_dw, need_db):
    """x [N, H], weight [V, H]; per-token target/valid/w/adv/old/ref/isw [N]. Returns
    (stats [NUM_STATS] float32, dX [N, H] in x's dtype or None, dW [V, H] float32 or None, db [V] or None).
    The per-token weights ``w`` carry the aggregation and its denominator, so ``stats[LOSS]`` is the loss
    and the gradients are the loss's (the autograd backward only multiplies them by the upstream grad)."""
    N, H = x.shape
    V = weight.shape[0]
    if x.device.type == "cpu":
        # Padding costs nothing here either: the valid tokens are gathered first (on the CPU, reading their
        # count synchronises with nothing), so masked rows cost no GEMM FLOPs and are never read.
        keep = valid.nonzero().squeeze(1)
        if keep.numel() < N:
            def pick(t):
                return None if t is None else t.index_select(0, keep)
            stats, dx_c, dw, db = run(pick(x), weight, bias, pick(target), pick(valid), pick(w), pick(adv), pick(old),
                                      pick(ref), pick(isw), row_op=row_op, row_options=row_options,
                                      workspace_bytes=workspace_bytes, need_dx=need_dx, need_dw=need_dw,
                                      need_db=need_db)
            dx = None
            if need_dx:
                dx = torch.zeros_like(x)
                dx.index_copy_(0, keep, dx_c)
            return stats, dx, dw, db
    need_grad = need_dx or need_dw or need_db
    chunk = max(1, min(N, workspace_bytes // bytes_per_row(V, x.dtype, need_grad)))
    z_buf = torch.empty(chunk, V, dtype=torch.float32, device=x.device)
    dz_buf = None
    if need_grad:
        dz_buf = torch.empty(chunk, V, dtype=x.dtype, device=x.device) if _bf16_dz(x.dtype, need_grad) else z_buf
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=x.device) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=x.device) if need_db else None
    stats = torch.zeros(NUM_STATS, dtype=torch.float32, device=x.device)
    w_t = weight.T
    if x.dtype != torch.float32 and not x.is_cuda:
        # CPUs have no bf16 GEMM with a float32 output: upcast the weight once (V x H floats) rather
        # than round every logit to bf16.
        w_t = weight.float().T
    # dX = dZ W in dZ's dtype: the weight itself, or float32 for fp16 inputs (float32 dZ)
    w_dx = weight if dz_buf is None or dz_buf.dtype == weight.dtype else w_t.T.float()
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        n = hi - lo
        # Masked rows may hold anything (NaN included): zeroed, so that 0 * NaN never reaches dW.
        xc, z = torch.where(valid[lo:hi, None], x[lo:hi], 0), z_buf[:n]
        mm_fp32(xc, w_t, z)
        d = dz_buf[:n] if need_grad else None
        per_token = (target[lo:hi], valid[lo:hi], w[lo:hi], adv[lo:hi], old[lo:hi],
                     None if ref is None else ref[lo:hi], None if isw is None else isw[lo:hi])
        stats += row_op(z, d, bias, *per_token, need_grad=need_grad, **row_options)
        if need_dx:
            if d.dtype == x.dtype:
                torch.matmul(d, w_dx, out=dx[lo:hi])
            else:  # fp16 inputs: float32 dZ times the float32 weight, rounded once into dX
                dx[lo:hi] = d @ w_dx
        if need_dw:
            addmm_fp32(dw, d.T, xc if xc.dtype == d.dtype else xc.float())
        if need_db:
            db += d.sum(0, dtype=torch.float32)
    return stats, dx, dw, db

"""The persistent GEMM behind every head pass (``kernel.py``), and its launchers.

``logits(...)`` computes a chunk of head logits with the statistics or shift epilogue, ``matmul(...)``
is dX = dZ W (split-K partials), ``accumulate_t(...)`` is dW (+)= dZ^T X.
All take an optional device-side token count (``count``, an int32 [1] tensor; rows ``row0 + i`` with
``row0 + i >= count`` do not exist), so padded tokens, compacted to the end, cost no FLOPs and no host
synchronisation.
"""

from __future__ import annotations

import torch
import triton

from ...backend import interpreter_enabled
from .. import cdiv
from ..launcher import direct
from . import configs
from .kernel import ACCUMULATE, LOGITS_SHIFTED, LOGITS_STATS, persistent_gemm_kernel

__all__ = ["accumulate_t", "logits", "logits_role", "matmul", "num_vocab_tiles", "stats_width"]


def _ensure_allocator():
    """Device-side TMA descriptors need a small global scratch buffer per launch; install a torch
    allocator unless the application has set one already."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch(epilogue, a, b, c, M, N, K, *, role, a_t, b_t, count, row0, limit_m=False, limit_k=False, init=False,
            bias=None, shift=None, partials=None, inv_temp=1.0, entropy=False, store_z=False, split_k=1, scale=None):
    cfg = configs.config_for(role, a.dtype, a.device)
    stored = epilogue == LOGITS_SHIFTED or store_z
    # TMA where every operand it touches allows it, and no tile box is larger than the matrix (tiny
    # shapes take the pointer path).
    use_tma = (configs.tma_ok(cfg, a, b, *((c,) if stored and cfg.tma_store else ()))
               and K >= cfg.block_k and N >= cfg.block_n and (M >= cfg.block_m or a_t is False))
    # Warp-specialised configs take the whole tile in their epilogue (FULL_TILE); the float32 accumulation
    # of dX / dW then goes through a descriptor too (C_TMA, one split only), and the loop is specialised
    # only where every access is TMA (the pass needs it, docs/kernels.md).
    full_tile = cfg.warp_specialize
    c_tma = full_tile and epilogue == ACCUMULATE and use_tma and split_k == 1 and configs.tma_ok_any(c)
    warp_spec = full_tile and use_tma and (epilogue != ACCUMULATE or c_tma) and not interpreter_enabled()
    tma_store = cfg.tma_store if not stored else configs.stores_logits_by_tma(
        cfg, specialised=warp_spec, with_statistics=epilogue == LOGITS_STATS)
    # unspecialised, a whole 256x128 tile in 4 warps would hold 256 accumulator registers a thread: twice the
    # warps (small or unaligned shapes only)
    num_warps = cfg.num_warps * 2 if full_tile and not warp_spec and a.is_cuda else cfg.num_warps
    if use_tma and a.is_cuda:
        _ensure_allocator()
    sms = configs.num_sms(a.device)
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n) * split_k
    dummy = a
    m_part, s_part, u_part = partials if partials is not None else (dummy, dummy, dummy)
    direct(persistent_gemm_kernel)[(max(1, min(sms, tiles)),)](
        a, b, c, dummy if bias is None else bias, shift if shift is not None else (dummy if scale is None else scale),
        m_part, s_part, u_part,
        dummy if count is None else count,
        M, N, K, row0, a.stride(0), b.stride(-2), c.stride(-2), m_part.stride(0) if partials is not None else M,
        c.stride(0) if split_k > 1 else 0, inv_temp,
        EPILOGUE=epilogue, A_T=a_t, B_T=b_t, LIMIT_M=limit_m and count is not None,
        LIMIT_K=limit_k and count is not None, INIT=init, STORE_Z=store_z, HAS_BIAS=bias is not None,
        ENTROPY=entropy, USE_TMA=use_tma, DOT_FP32=interpreter_enabled(), PRECISION=_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, NUM_SMS=sms,
        SPLIT_K=split_k, FLATTEN=cfg.flatten, TMA_STORE=tma_store, SCALED=scale is not None,
        STORE_HALF=cfg.store_halves, FULL_TILE=full_tile, C_TMA=c_tma, WARP_SPEC=warp_spec,
        num_warps=num_warps, num_stages=cfg.num_stages,
    )
    return cfg


def logits_role(stored: bool) -> str:
    """The config role of a statistics launch of the logits GEMM: ``logits`` when it also stores the logits,
    ``stats`` when it writes the statistics only (configs.py)."""
    return "logits" if stored else "stats"


def stats_width(dtype: torch.dtype, device: torch.device, stored: bool = True) -> int:
    """Columns per row of one statistics partial of a statistics launch that stores the logits (``stored``)
    or not: half an output tile of the logits GEMM, or a whole one under a warp-specialised config
    (``GemmConfig.warp_specialize``)."""
    cfg = configs.config_for(logits_role(stored), dtype, device)
    return cfg.block_n if cfg.warp_specialize else cfg.block_n // 2


def num_vocab_tiles(V: int, dtype: torch.dtype, device: torch.device, stored: bool = True) -> int:
    """How many slices of ``stats_width`` columns the logits GEMM cuts the vocabulary into."""
    return cdiv(V, stats_width(dtype, device, stored))


def logits(x, weight, *, bias, inv_temp, count=None, row0=0, partials=None, out=None, shift=None, entropy=False):
    """One chunk of head logits ``z = (x W^T + b) * inv_temp``, x [n, H], weight [V, H].

    - ``shift is None`` (statistics): per (vocab slice of ``stats_width`` columns, row) max / sum-exp / exp-weighted sum into
      ``partials`` (three float32 [num_vocab_tiles, n]); with ``out`` [n, V] also the slice-shifted
      logits ``z - max``. Without ``out`` the launch takes the ``stats`` role's config, with it ``logits``'s
      (``num_vocab_tiles(..., stored=out is not None)``).
    - ``shift`` [n] given: ``out`` = ``z - shift`` (the log-prob backward shifts by the row max).
    """
    n, H = x.shape
    V = weight.shape[0]
    if shift is None:
        return _launch(LOGITS_STATS, x, weight, x if out is None else out, n, V, H, role=logits_role(out is not None),
                       a_t=False, b_t=True, count=count, row0=row0, limit_m=True, bias=bias, partials=partials,
                       inv_temp=inv_temp, entropy=entropy, store_z=out is not None)
    return _launch(LOGITS_SHIFTED, x, weight, out, n, V, H, role="logits", a_t=False, b_t=True, count=count,
                   row0=row0, limit_m=True, bias=bias, shift=shift, inv_temp=inv_temp)


def matmul(dz, weight, out, *, count=None, row0=0, scale=None):
    """Split-K dZ W: ``out`` float32 [splits, n, H], ``out[s]`` = dz [n, V_s] @ weight [V_s, H] over the s-th
    part of V (the caller sums the parts), times ``scale`` (a float32 [1] device tensor) when given; rows past
    the count are not written."""
    n, V = dz.shape
    return _launch(ACCUMULATE, dz, weight, out, n, weight.shape[1], V, role="dx", a_t=False, b_t=False,
                   count=count, row0=row0, limit_m=True, init=True, split_k=out.shape[0], scale=scale)


def accumulate_t(acc, dz, x, *, init, count=None, row0=0, scale=None):
    """acc [V, H] (+)= dz[n, V]^T @ x[n, H] (times ``scale``, a float32 [1] device tensor, when given), summed
    in fp32 and stored in acc's dtype: float32 to add chunks up; with ``init`` (overwrite instead of adding)
    any float dtype, rounded once."""
    if not init and acc.dtype != torch.float32:
        raise ValueError(f"accumulate_t: adding into {acc.dtype} would round every chunk; use float32")
    n, V = dz.shape
    return _launch(ACCUMULATE, dz, x, acc, V, x.shape[1], n, role="dw", a_t=True, b_t=False, count=count,
                   row0=row0, limit_k=True, init=init, scale=scale)

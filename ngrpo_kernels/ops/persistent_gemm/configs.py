"""Tile configurations of the persistent GEMM, chosen once per (device, dtype, role).

Roles: ``logits`` (X W^T with a statistics epilogue that also stores the logits, or the shift epilogue,
K = H), ``stats`` (X W^T with the statistics only: the no-grad pass and the log-prob forward; an override
of ``logits`` covers it unless ``stats`` is named too), ``dx`` (dZ W, K = V), ``dw`` (dZ^T X accumulated in
fp32, K = chunk of tokens).

- Hopper and newer (compute capability >= 9), bf16/fp16: TMA operands, 128x256x64 tiles, 8 warps
  (two consumer warpgroups, a 64x256 fp32 accumulator each), 3 stages (3 x 48 KB of operands plus a
  64 KB tile for the TMA store stays under the 227 KB an SM offers), GROUP_M = 8. The H200 probe behind
  issue #10 measured exactly this shape at 1.04x cuBLAS with the statistics epilogue, and 1.16x with
  128x128 tiles; docs/kernels.md and benchmarks/RESULTS_gpu.md hold this project's own measurements.
- Ampere / Ada (no TMA), bf16/fp16: pointer loads, 128x128x32, 8 warps, 4 stages (64 KB of shared
  memory, under the 99 KB of an RTX 4090 and the 163 KB of an A100). Not measured here.
- float32 inputs: exact fp32 products (``input_precision="ieee"``, no tensor cores), 64x64x32: a
  correctness path, never the fast one.
- The Triton interpreter (CPU tests): tiny tiles, so that tests at small shapes cross many tiles,
  ragged edges and persistent-loop iterations; TMA there when the shapes allow it (the interpreter
  emulates device-side descriptors), unless a test forces the pointer variant.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch

from ...backend import interpreter_enabled

ROLES = ("logits", "stats", "dx", "dw", "dense")


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool
    flatten: bool = True  # tile loop flattened into the K loop (next tile's loads under this epilogue)
    # With TMA, also store the logits through it. Triton 3.6 stages each quarter tile in one shared buffer
    # and, before refilling it, waits for the previous store to have read it, between CTA barriers (four
    # waits a tile, in the epilogue); pointer stores need no such wait. On an H200 (2026-11-28) the
    # stats+store GEMM took 1.054 / 1.068x cuBLAS with pointer stores against 1.090 / 1.083x (4k / 8k
    # tokens), the fused loss end to end 1.114 against 1.120x at 16k: within the noise of one run.
    tma_store: bool = True
    # The shifted logits leave a [BLOCK_M, BLOCK_N / 2] slice per store instead of a quarter tile: two
    # stores a tile, each staged in its own 32 KB of shared memory (the PTX of triton 3.6 and 3.9: the wait
    # before a refill then follows the next slice's exponentials instead of a quarter's). On an H200
    # (2026-11-28, one run): the stats+store GEMM 1.050 / 1.025x cuBLAS against 1.090 / 1.083x at 4k / 8k
    # tokens, the fused loss 0.992 / 0.990x the default's time at 16k / 4k. The next candidate for the
    # default, once a GPU has run tests/test_persistent_gemm.py::test_statistics_at_tma_shapes with it.
    store_halves: bool = False
    # Hopper warp specialisation (``tl.range(..., warp_specialize=True)``; triton >= 3.4 on sm_90): one
    # producer warpgroup issues the TMA loads, two consumer warpgroups (``num_warps`` = 4 each, 384
    # threads) split each tile's rows and run the MMAs and the epilogue, registers moved to them with
    # setmaxnreg. The pass cannot partition a reshape or split of the accumulator, so the epilogue takes the
    # whole tile (``kernel._stats_tile``: a statistics slice is then BLOCK_N wide), and the loop must not be
    # flattened. Timed on an H200 (docs/kernels.md "Warp specialisation"): the statistics-only logits GEMM
    # is faster (HOPPER_WS_STATS, the "stats" role's default), dX and dW slower.
    warp_specialize: bool = False

    def label(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} "
                f"s{self.num_stages} {'tma' if self.tma else 'ptr'}{'' if self.flatten else ' unflattened'}"
                f"{' ptr-store' if self.tma and not self.tma_store else ''}"
                f"{' store-halves' if self.store_halves else ''}{' ws' if self.warp_specialize else ''}")


HOPPER = GemmConfig(128, 256, 64, 8, 8, 3, tma=True)
# The logits GEMM walks 32 row tiles (4096 tokens) per weight tile: each [256, H] slice of the weight
# is read from DRAM once per 4096 tokens instead of once per 1024 (measured 1.4-5.7 % faster than
# GROUP_M = 8 on an H200 at 8192-token chunks, ~1 % at 4096, docs/kernels.md).
HOPPER_LOGITS = GemmConfig(128, 256, 64, 32, 8, 3, tma=True)
# Warp-specialised configs (GemmConfig.warp_specialize); of these only HOPPER_WS_STATS is a default (the
# others measured slower or no faster on an H200, docs/kernels.md): 256x128 tiles for the logits (each
# consumer a 128x128 accumulator, one statistics slice per tile; 3 x 48 KB of operands and a 64 KB fp16
# staging tile), 128x128 for dX and dW (4 x 32 KB of operands and the 64 KB float32 tile that the accumulation
# reads and writes through TMA). GROUP_M 16 keeps the logits' 4096 rows per weight tile of HOPPER_LOGITS.
# sm_90a, triton 3.6 and 3.9: specialised, no spills (tests/test_codegen.py).
HOPPER_WS_LOGITS = GemmConfig(256, 128, 64, 16, 4, 3, tma=True, flatten=False, warp_specialize=True)
# The statistics-only logits GEMM on Hopper (role "stats"): HOPPER_WS_LOGITS with a fourth stage, which fits
# once no logits are staged for a store (198 KB). Measured on an H200 (2026-11-28, triton 3.6, gpu_head.py
# --tune --gemms): 1.010 / 1.016x cuBLAS per 4k / 8k-token GEMM against 1.047 / 1.028x for HOPPER_LOGITS,
# and the no-grad log-probs at N = 16,384 1.031x one cuBLAS GEMM against 1.071x (docs/kernels.md).
HOPPER_WS_STATS = GemmConfig(256, 128, 64, 16, 4, 4, tma=True, flatten=False, warp_specialize=True)
HOPPER_WS_DENSE = GemmConfig(128, 128, 64, 8, 4, 4, tma=True, flatten=False, warp_specialize=True)
AMPERE = GemmConfig(128, 128, 32, 8, 8, 4, tma=False)
FLOAT32 = GemmConfig(64, 64, 32, 8, 4, 2, tma=False)
INTERPRETER = GemmConfig(16, 32, 16, 2, 1, 1, tma=True)
INTERPRETER_SMS = 3  # programs of a persistent launch under the interpreter: several tiles each

# Which GEMMs form dX = dZ W and dW += dZ^T X: "triton" (the persistent kernel, which stops at the
# device-side token count, so padding costs nothing) or "torch" (cuBLAS over whole chunks; padded rows
# are zeros). Hopper: see docs/kernels.md for the measurement behind the choice. Elsewhere cuBLAS,
# which no pointer-load Triton GEMM of ours has been measured to match; float32 always cuBLAS.
DENSE_HOPPER = "triton"
DENSE_OTHER = "torch"
# dX = dZ W is split in two along V (K) when it has fewer than DX_SPLIT_BELOW_WAVES waves of output
# tiles: a 4k-token chunk has only 32 x 14 tiles of 128 x 256, 3.4 waves of 132 SMs; two splits give
# 6.8 (measured on an H200: 0.93-0.96x cuBLAS split, 1.07x unsplit; at 8k tokens unsplit is better).
DX_SPLIT_K = 2
DX_SPLIT_BELOW_WAVES = 4

# Tests and benchmarks may pin a config (e.g. the pointer variant under the interpreter, or a sweep
# on a GPU); None means "the table above".
_override: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ngrpo_gemm_config", default=None)


@contextlib.contextmanager
def override(**configs):
    """``with override(logits=cfg, dx=..., dw=..., dense="torch")``: use these configs (and this dense
    GEMM backend) for the roles named, in forward and in backward. On a GPU autograd runs backward on its
    own device thread, which does not see this thread's context variables (the log-prob backward's
    logits GEMM would take the default config): backward runs on the calling thread meanwhile."""
    unknown = set(configs) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown GEMM roles {sorted(unknown)}; roles are {ROLES}")
    token = _override.set({**(_override.get() or {}), **configs})
    try:
        with torch.autograd.set_multithreading_enabled(False):
            yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_for(role: str, dtype: torch.dtype, device: torch.device) -> GemmConfig:
    forced = _override.get() or {}
    pinned = forced.get(role, forced.get("logits") if role == "stats" else None)
    if pinned is not None:
        return pinned
    if interpreter_enabled() or device.type != "cuda":
        return INTERPRETER
    if dtype == torch.float32:
        return FLOAT32
    major, _ = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if major >= 9:
        # the warp-specialised statistics GEMM on Hopper only: on Blackwell (10+) triton's specialisation
        # pass is another one (tensor memory, tcgen05), neither compiled nor timed here; the statistics
        # there take the logits config, as before
        if role == "stats" and major == 9:
            return HOPPER_WS_STATS
        return HOPPER_LOGITS if role in ("logits", "stats") else HOPPER
    return AMPERE


def stores_logits_by_tma(cfg: GemmConfig, *, specialised: bool, with_statistics: bool) -> bool:
    """Whether a launch that stores logits stores them through TMA: as ``cfg.tma_store`` says, except in a
    warp-specialised launch that also writes statistics. There triton's pass (3.6 measured on an H200, 3.9
    read in its PTX) gives the second consumer warpgroup's partial rows its row offset twice when the tile's
    row offset is also a TMA store's coordinate: rows 256-383 of the tile instead of 128-255, which stay
    unwritten while the next tile's first rows are written twice. Stored from registers they are right
    (docs/kernels.md "Warp specialisation")."""
    return cfg.tma_store and not (specialised and with_statistics)


def tma_ok(cfg: GemmConfig, *tensors: torch.Tensor) -> bool:
    """The operands' TMA: 16-bit elements here, and descriptors over each (``tma_ok_any``)."""
    return cfg.tma and all(t.element_size() == 2 and tma_ok_any(t) for t in tensors)


def tma_ok_any(t: torch.Tensor) -> bool:
    """A descriptor over ``t`` of any element size: 16-byte aligned base and leading stride, unit last stride."""
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and (t.dim() < 2 or (t.stride(-2) * t.element_size()) % 16 == 0))


def dense_backend(dtype: torch.dtype, device: torch.device) -> str:
    forced = (_override.get() or {}).get("dense")
    if forced is not None:
        return forced
    if interpreter_enabled() or device.type != "cuda":
        return "triton"
    if dtype == torch.float32:
        return "torch"
    major, _ = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return DENSE_HOPPER if major >= 9 else DENSE_OTHER


def dx_splits(rows: int, H: int, dtype: torch.dtype, device: torch.device) -> int:
    cfg = config_for("dx", dtype, device)
    if cfg.warp_specialize:  # one split: its float32 tile goes through a descriptor (128x128: 6.8 waves at 4k)
        return 1
    tiles = -(-rows // cfg.block_m) * -(-H // cfg.block_n)
    return DX_SPLIT_K if tiles < DX_SPLIT_BELOW_WAVES * num_sms(device) else 1

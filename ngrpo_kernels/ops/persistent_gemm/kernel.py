"""One persistent GEMM kernel, ``C = A @ B`` with fp32 accumulation, and the four epilogues the head needs.

Schedule: grid = number of SMs; program ``p`` walks output tiles ``p, p + NUM_SMS, ...`` in grouped order
(``GROUP_M`` row tiles share each column tile, so a column tile of the weight is read from DRAM once per
group and served from L2 to the rest). The tile loop is flattened into the K loop so that the compiler
pipelines loads of the next tile under the epilogue of the current one. On Hopper the operands come
through device-side TMA descriptors (``USE_TMA``; the stored logits too unless ``TMA_STORE`` is off:
then they leave the registers through pointer stores); elsewhere (Ampere, Ada, unaligned shapes, the
interpreter's pointer variant) through masked pointer loads. Measured reasons for the configs are in
``configs.py`` and docs/kernels.md.

Operands: ``A`` is [M, K] row-major, or stored [K, M] (``A_T``, used by dW = dZ^T X); ``B`` is stored
[N, K] (``B_T``, the weight in the head GEMM) or [K, N]. Leading dimensions ``lda``/``ldb``/``ldc``.

Device-side limits (no host synchronisation): with ``LIMIT_M`` only the first
``clamp(*COUNT - row0, 0, M)`` rows of A and C exist, with ``LIMIT_K`` only that many of K. Tiles past
the limit are never visited; TMA zero-fills the ragged edge, pointer loads mask it. This is how padded
tokens (compacted to the end) cost no FLOPs.

Warp-specialised configs (``GemmConfig.warp_specialize``; the default for statistics-only launches on Hopper):
``WARP_SPEC`` marks the tile loop for Hopper's warp-specialisation pass (a producer warpgroup for the TMA
loads, two consumer warpgroups splitting each tile's rows); that pass cannot partition the reshape / split
of the halves below, so ``FULL_TILE`` runs each epilogue on the whole tile (a statistics slice is then
BLOCK_N wide), and ``C_TMA`` reads and writes the float32 accumulation through a descriptor.

Epilogues (``EPILOGUE``), all on the fp32 accumulator tile in registers:
- ``LOGITS_STATS``: ``z = (acc + b) * inv_temp``; per row and per half tile (a "vocab slice" of
  BLOCK_N / 2 columns) its max ``m``, ``sum exp(z - m)`` and (``ENTROPY``) ``sum exp(z - m) z`` go to
  ``[slice, row]`` of the partials. With ``STORE_Z`` the shifted logits ``z - m`` are stored in C's
  dtype (fp16 for half inputs: 11 significant bits where ``exp`` is large, since the shift puts the
  slice's largest logits at 0). The target's logit is not picked here: comparing every column with
  the target costs ~40 registers a thread at 128x256 and made the epilogue spill; a separate indexed
  dot product (``linear_logprobs.triton_rows``) reads one weight row per token instead.
- ``LOGITS_SHIFTED``: stores ``z - SHIFT[row]`` (backward of the log-probs, SHIFT = the row max: the
  row kernel subtracts log s from it, never z - logsumexp, whose ulp would swamp a confident 1 - p).
- ``ACCUMULATE``: ``C += acc`` in fp32, or ``C = acc`` with ``INIT`` (dW, chunk by chunk), stored in C's
  dtype (a one-chunk log-prob backward writes dW in the weight's dtype: no fp32 copy, no cast pass). With
  ``SPLIT_K > 1`` (only with ``INIT``) split ``s`` writes its partial product over the ``s``-th part of K
  to ``C + s * ld_split``: dX = dZ W has K = V but only ~450 output tiles per 4k-token chunk, 3.4 waves
  of 132 SMs; two splits make 6.8 waves and the caller sums the two partials. With ``SCALED`` the product
  is first multiplied by the float32 scalar at ``SHIFT`` (fp16 dZ is formed times a power of two that
  keeps it inside fp16's range: ``gemm.fp16_grad_scale``; this undoes it before anything is summed).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOGITS_STATS = tl.constexpr(0)
LOGITS_SHIFTED = tl.constexpr(1)
ACCUMULATE = tl.constexpr(2)


@triton.jit
def tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles walk each column tile together (L2 reuse of B)."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile_id // per_group) * GROUP_M
    # >= 1 also for a tile id past the last tile (the pipeline computes one ahead): no modulo by zero
    group_m = tl.maximum(tl.minimum(num_pid_m - first_m, GROUP_M), 1)
    pid_m = first_m + (tile_id % per_group) % group_m
    pid_n = (tile_id % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def row_limit(COUNT, row0, size):
    """How many of a launch's ``size`` rows exist: the device-side count of compacted tokens minus the
    launch's first row, clamped to [0, size]. Shared by every kernel that stops at the count."""
    return tl.minimum(tl.maximum(tl.load(COUNT).to(tl.int32) - row0, 0), size)


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """[BLOCK_M, WIDTH] -> its left and right [BLOCK_M, WIDTH / 2] halves (register views, no copy)."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, WIDTH // 2)), (0, 2, 1)))


@triton.jit
def _logits(acc, BIAS, cols, col_ok, inv_temp, HAS_BIAS: tl.constexpr):
    """Scaled logits of one half tile."""
    z = acc
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return z * inv_temp


@triton.jit
def _store(C, c_desc, out, off_m, off_n, rows, cols, row_ok, col_ok, ldc, USE_TMA: tl.constexpr):
    out = out.to(C.dtype.element_ty)
    if USE_TMA:
        c_desc.store([off_m, off_n], out)
    else:
        tl.store(C + rows[:, None].to(tl.int64) * ldc + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _stats_half(acc, C, c_desc, BIAS, M_PART, S_PART, U_PART, rows, row_ok, off_m, off_h, tile, N,
                ld_part, ldc, inv_temp, HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, STORE_Z: tl.constexpr,
                USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, HALF: tl.constexpr, STORE_HALF: tl.constexpr):
    """Statistics of one [BLOCK_M, HALF] logit slice (one "vocab tile" of the partials), and with
    STORE_Z the slice shifted by its row max. The slice is finished before the other half of the tile
    is touched, and its exponentials are taken a quarter tile at a time: the fewest live registers
    (no spills at 128x256 with 8 warps). Columns past the vocabulary get a finite -1e30 (not -inf):
    exp gives 0 and 0 * z stays 0 in the entropy sum. The shifted logits leave a quarter tile at a time,
    or with STORE_HALF the whole slice in one store (``GemmConfig.store_halves``)."""
    QUARTER: tl.constexpr = HALF // 2
    acc_a, acc_b = _halves(acc, BLOCK_M, HALF)
    cols_a = off_h + tl.arange(0, QUARTER)
    cols_b = cols_a + QUARTER
    ok_a = cols_a < N
    ok_b = cols_b < N
    z_a = tl.where(ok_a[None, :], _logits(acc_a, BIAS, cols_a, ok_a, inv_temp, HAS_BIAS), -1e30)
    z_b = tl.where(ok_b[None, :], _logits(acc_b, BIAS, cols_b, ok_b, inv_temp, HAS_BIAS), -1e30)
    m = tl.maximum(tl.max(z_a, axis=1), tl.max(z_b, axis=1))
    s_a, u_a = _quarter_sums(z_a, m, ENTROPY)
    if STORE_Z and not STORE_HALF:
        _store(C, c_desc, z_a - m[:, None], off_m, off_h, rows, cols_a, row_ok, ok_a, ldc, USE_TMA)
    s_b, u_b = _quarter_sums(z_b, m, ENTROPY)
    if STORE_Z and not STORE_HALF:
        _store(C, c_desc, z_b - m[:, None], off_m, off_h + QUARTER, rows, cols_b, row_ok, ok_b, ldc, USE_TMA)
    if STORE_Z and STORE_HALF:  # the slice in one store: [BLOCK_M, HALF] from its two quarters
        zh = tl.reshape(tl.permute(tl.join(z_a - m[:, None], z_b - m[:, None]), (0, 2, 1)), (BLOCK_M, HALF))
        cols = off_h + tl.arange(0, HALF)
        _store(C, c_desc, zh, off_m, off_h, rows, cols, row_ok, cols < N, ldc, USE_TMA)
    part = tile.to(tl.int64) * ld_part + rows
    ok = row_ok & (rows * 0 + off_h < N)  # a slice wholly past the vocabulary has no partials
    tl.store(M_PART + part, m, mask=ok)
    tl.store(S_PART + part, s_a + s_b, mask=ok)
    if ENTROPY:
        tl.store(U_PART + part, u_a + u_b, mask=ok)


@triton.jit
def _quarter_sums(z, m, ENTROPY: tl.constexpr):
    """Sum of exp(z - m) and, for the entropy, of exp(z - m) * (z - m): relative to the slice max, so that
    logits that are all large (a big bias) do not cancel in the entropy (``combine_partials``)."""
    d = z - m[:, None]
    p = tl.exp(d)
    s = tl.sum(p, axis=1)
    u = s
    if ENTROPY:
        u = tl.sum(p * d, axis=1)
    return s, u


@triton.jit
def _accumulate_half(C, acc, rows, row_ok, off_h, N, ldc, INIT: tl.constexpr, BLOCK_M: tl.constexpr,
                     HALF: tl.constexpr):
    """C[rows, off_h : off_h + HALF] (+)= acc, a quarter tile at a time (the loaded fp32 tile and the
    accumulator are live together: quarters keep that under the register budget). The sum is stored in
    C's dtype: float32 when chunks add up, the weight's dtype when one chunk writes dW once (``INIT``)."""
    QUARTER: tl.constexpr = HALF // 2
    acc_a, acc_b = _halves(acc, BLOCK_M, HALF)
    cols = off_h + tl.arange(0, QUARTER)
    ptr = C + rows[:, None].to(tl.int64) * ldc + cols[None, :]
    ok_a = row_ok[:, None] & (cols < N)[None, :]
    ok_b = row_ok[:, None] & (cols + QUARTER < N)[None, :]
    if not INIT:
        acc_a += tl.load(ptr, mask=ok_a, other=0.0)
        acc_b += tl.load(ptr + QUARTER, mask=ok_b, other=0.0)
    tl.store(ptr, acc_a.to(C.dtype.element_ty), mask=ok_a)
    tl.store(ptr + QUARTER, acc_b.to(C.dtype.element_ty), mask=ok_b)


@triton.jit
def _stats_tile(acc, C, c_desc, BIAS, M_PART, S_PART, U_PART, rows, row_ok, off_m, off_n, tile, N, ld_part, ldc,
                inv_temp, HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, STORE_Z: tl.constexpr, USE_TMA: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """``_stats_half`` on a whole [BLOCK_M, BLOCK_N] tile, which is then one statistics slice
    (``FULL_TILE``): no reshape, permute or split of the accumulator, which Hopper's warp-specialisation
    pass cannot partition between its consumer warpgroups."""
    cols = off_n + tl.arange(0, BLOCK_N)
    ok = cols < N
    z = tl.where(ok[None, :], _logits(acc, BIAS, cols, ok, inv_temp, HAS_BIAS), -1e30)
    m = tl.max(z, axis=1)
    s, u = _quarter_sums(z, m, ENTROPY)
    if STORE_Z:
        _store(C, c_desc, z - m[:, None], off_m, off_n, rows, cols, row_ok, ok, ldc, USE_TMA)
    part = tile.to(tl.int64) * ld_part + rows
    tl.store(M_PART + part, m, mask=row_ok)
    tl.store(S_PART + part, s, mask=row_ok)
    if ENTROPY:
        tl.store(U_PART + part, u, mask=row_ok)


@triton.jit
def _accumulate_tile(C, c_desc, acc, rows, row_ok, off_m, off_n, N, ldc, INIT: tl.constexpr, C_TMA: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """``_accumulate_half`` on a whole tile (``FULL_TILE``); with ``C_TMA`` the float32 tile is read and
    written through a tensor descriptor (the descriptor clips rows past the count and columns past N)."""
    if C_TMA:
        if not INIT:
            acc += c_desc.load([off_m, off_n])
        c_desc.store([off_m, off_n], acc.to(C.dtype.element_ty))
    else:
        cols = off_n + tl.arange(0, BLOCK_N)
        ptr = C + rows[:, None].to(tl.int64) * ldc + cols[None, :]
        ok = row_ok[:, None] & (cols < N)[None, :]
        if not INIT:
            acc += tl.load(ptr, mask=ok, other=0.0)
        tl.store(ptr, acc.to(C.dtype.element_ty), mask=ok)


@triton.jit
def persistent_gemm_kernel(
    A, B, C, BIAS, SHIFT, M_PART, S_PART, U_PART, COUNT,
    M, N, K, row0, lda, ldb, ldc, ld_part, ld_split, inv_temp,
    EPILOGUE: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr, LIMIT_M: tl.constexpr, LIMIT_K: tl.constexpr,
    INIT: tl.constexpr, STORE_Z: tl.constexpr, HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr, SPLIT_K: tl.constexpr = 1, FLATTEN: tl.constexpr = True, TMA_STORE: tl.constexpr = True,
    SCALED: tl.constexpr = False, STORE_HALF: tl.constexpr = False, FULL_TILE: tl.constexpr = False,
    C_TMA: tl.constexpr = False, WARP_SPEC: tl.constexpr = False,
):
    start = tl.program_id(0)
    m_lim = M
    if LIMIT_M:
        m_lim = row_limit(COUNT, row0, M)
    k_lim = K
    if LIMIT_K:
        k_lim = row_limit(COUNT, row0, K)
    num_tiles = tl.cdiv(m_lim, BLOCK_M) * tl.cdiv(N, BLOCK_N) * SPLIT_K
    # Tile coordinates are computed with at least one row tile: the pipelined loop evaluates the
    # addresses of a first tile even when there is none (m_lim = 0 past the count), and a modulo by
    # zero there gave garbage column indices whose masked-in loads read outside B (seen on an H200,
    # compute-sanitizer). With these, every speculative address stays inside its matrix.
    num_pid_m = tl.maximum(tl.cdiv(m_lim, BLOCK_M), 1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_split = num_pid_m * num_pid_n
    if EPILOGUE == ACCUMULATE:
        if not INIT:
            num_tiles = tl.where(k_lim > 0, num_tiles, 0)  # nothing to add
    # Every split runs the same number of K steps (the last one reads zeros past k_lim): a uniform
    # trip count keeps the flattened loop pipelined.
    # At least one step, so that a tile whose K is empty (dW of a chunk with no valid token, INIT) still
    # reaches its epilogue in the flattened loop; the step reads zeros.
    k_tiles = tl.maximum(tl.cdiv(tl.cdiv(k_lim, BLOCK_K), SPLIT_K), 1)

    # Output tiles are stored in halves, the logits' in quarters unless STORE_HALF (see _stats_half).
    C_BLOCK_N: tl.constexpr = BLOCK_N if FULL_TILE else (
        BLOCK_N // 4 if EPILOGUE == LOGITS_STATS and not STORE_HALF else BLOCK_N // 2)
    c_desc = C  # replaced by a descriptor where TMA stores the output tiles
    if USE_TMA:
        # A tensor map may not have an empty dimension: past the count there are no tiles to load, so a
        # one-row (one-column) extent is as good as none.
        m_desc = tl.maximum(m_lim, 1)
        k_desc = tl.maximum(k_lim, 1)
        if A_T:
            a_desc = tl.make_tensor_descriptor(A, shape=[k_desc, M], strides=[lda, 1], block_shape=[BLOCK_K, BLOCK_M])
        else:
            a_desc = tl.make_tensor_descriptor(A, shape=[m_desc, k_desc], strides=[lda, 1],
                                               block_shape=[BLOCK_M, BLOCK_K])
        if B_T:
            b_desc = tl.make_tensor_descriptor(B, shape=[N, k_desc], strides=[ldb, 1], block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_desc = tl.make_tensor_descriptor(B, shape=[k_desc, N], strides=[ldb, 1], block_shape=[BLOCK_K, BLOCK_N])
        if ((EPILOGUE == LOGITS_SHIFTED) or STORE_Z) and TMA_STORE:
            c_desc = tl.make_tensor_descriptor(C, shape=[m_desc, N], strides=[ldc, 1],
                                               block_shape=[BLOCK_M, C_BLOCK_N])
        if C_TMA:  # FULL_TILE accumulation (one split): rows past the count are clipped by the shape
            c_desc = tl.make_tensor_descriptor(C, shape=[m_desc, N], strides=[ldc, 1],
                                               block_shape=[BLOCK_M, BLOCK_N])

    # With no K at all (dW of a chunk past the count, INIT), the one step taken must read zeros: TMA
    # coordinates are pushed past the one-row descriptor (pointer loads are masked by k_lim already).
    # Done on the coordinates, not by zeroing the accumulator afterwards: that select miscompiled in
    # the pointer variant on triton 3.6 (dW came out all zeros on an H200).
    k_skip = (k_lim == 0).to(tl.int32) * BLOCK_K
    tile_c = start - NUM_SMS
    for tile_id in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = tile_coords(tile_id % tiles_per_split, num_pid_m, num_pid_n, GROUP_M)
        k_start = (tile_id // tiles_per_split) * k_tiles * BLOCK_K
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows_a = off_m + tl.arange(0, BLOCK_M)  # pointer variant only
        cols_b = off_n + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = k_start + ki * BLOCK_K
            if USE_TMA:
                k_tma = off_k + k_skip
                if A_T:
                    a = a_desc.load([k_tma, off_m]).T
                else:
                    a = a_desc.load([off_m, k_tma])
                if B_T:
                    b = b_desc.load([off_n, k_tma]).T
                else:
                    b = b_desc.load([k_tma, off_n])
            else:
                ks = off_k + tl.arange(0, BLOCK_K)
                a_ok = (rows_a < m_lim)[:, None] & (ks < k_lim)[None, :]
                b_ok = (ks < k_lim)[:, None] & (cols_b < N)[None, :]
                if A_T:
                    a = tl.load(A + ks[None, :].to(tl.int64) * lda + rows_a[:, None], mask=a_ok, other=0.0)
                else:
                    a = tl.load(A + rows_a[:, None].to(tl.int64) * lda + ks[None, :], mask=a_ok, other=0.0)
                if B_T:
                    b = tl.load(B + cols_b[None, :].to(tl.int64) * ldb + ks[:, None], mask=b_ok, other=0.0)
                else:
                    b = tl.load(B + ks[:, None].to(tl.int64) * ldb + cols_b[None, :], mask=b_ok, other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)

        # Recompute the tile's coordinates from a counter of its own (the flattened pipeline may have
        # advanced tile_id's values already; the tutorial's persistent matmul does the same).
        tile_c += NUM_SMS
        pid_m, pid_n = tile_coords(tile_c % tiles_per_split, num_pid_m, num_pid_n, GROUP_M)
        split = tile_c // tiles_per_split
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m + tl.arange(0, BLOCK_M)
        row_ok = rows < m_lim
        if FULL_TILE:  # the whole tile at once (warp-specialised configs: BLOCK_N = one statistics slice)
            if EPILOGUE == ACCUMULATE:
                if SCALED:
                    acc = acc * tl.load(SHIFT)
                c_split = C + split.to(tl.int64) * ld_split  # split-K (pointer stores only, not C_TMA)
                _accumulate_tile(c_split, c_desc, acc, rows, row_ok, off_m, off_n, N, ldc, INIT, C_TMA, BLOCK_N)
            elif EPILOGUE == LOGITS_STATS:
                _stats_tile(acc, C, c_desc, BIAS, M_PART, S_PART, U_PART, rows, row_ok, off_m, off_n, pid_n, N,
                            ld_part, ldc, inv_temp, HAS_BIAS, ENTROPY, STORE_Z, USE_TMA and TMA_STORE, BLOCK_N)
            else:  # LOGITS_SHIFTED
                cols = off_n + tl.arange(0, BLOCK_N)
                ok = cols < N
                shift = tl.load(SHIFT + rows, mask=row_ok, other=0.0)[:, None]
                z = _logits(acc, BIAS, cols, ok, inv_temp, HAS_BIAS)
                _store(C, c_desc, z - shift, off_m, off_n, rows, cols, row_ok, ok, ldc, USE_TMA and TMA_STORE)
        else:
            _epilogue_halves(acc, C, c_desc, BIAS, SHIFT, M_PART, S_PART, U_PART, rows, row_ok, off_m, off_n, pid_n,
                             split, N, ldc, ld_part, ld_split, inv_temp, EPILOGUE, INIT, STORE_Z, HAS_BIAS, ENTROPY,
                             USE_TMA and TMA_STORE, SCALED, STORE_HALF, BLOCK_M, BLOCK_N)


@triton.jit
def _epilogue_halves(acc, C, c_desc, BIAS, SHIFT, M_PART, S_PART, U_PART, rows, row_ok, off_m, off_n, pid_n, split,
                     N, ldc, ld_part, ld_split, inv_temp, EPILOGUE: tl.constexpr, INIT: tl.constexpr,
                     STORE_Z: tl.constexpr, HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, TMA_STORE: tl.constexpr,
                     SCALED: tl.constexpr, STORE_HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The epilogue on two [BLOCK_M, BLOCK_N / 2] halves of the accumulator: half the live registers and
    half the shared-memory staging of a full tile (no spills at 128x256 with 8 warps)."""
    HALF: tl.constexpr = BLOCK_N // 2
    acc0, acc1 = _halves(acc, BLOCK_M, BLOCK_N)
    cols0 = off_n + tl.arange(0, HALF)
    cols1 = cols0 + HALF
    ok0 = cols0 < N
    ok1 = cols1 < N
    if EPILOGUE == ACCUMULATE:
        if SCALED:
            alpha = tl.load(SHIFT)
            acc0 = acc0 * alpha
            acc1 = acc1 * alpha
        c_split = C + split.to(tl.int64) * ld_split  # split-K: one fp32 partial per split
        _accumulate_half(c_split, acc0, rows, row_ok, off_n, N, ldc, INIT, BLOCK_M, HALF)
        _accumulate_half(c_split, acc1, rows, row_ok, off_n + HALF, N, ldc, INIT, BLOCK_M, HALF)
    elif EPILOGUE == LOGITS_STATS:
        _stats_half(acc0, C, c_desc, BIAS, M_PART, S_PART, U_PART, rows, row_ok, off_m, off_n, 2 * pid_n,
                    N, ld_part, ldc, inv_temp, HAS_BIAS, ENTROPY, STORE_Z, TMA_STORE, BLOCK_M, HALF, STORE_HALF)
        _stats_half(acc1, C, c_desc, BIAS, M_PART, S_PART, U_PART, rows, row_ok, off_m, off_n + HALF,
                    2 * pid_n + 1, N, ld_part, ldc, inv_temp, HAS_BIAS, ENTROPY, STORE_Z, TMA_STORE, BLOCK_M, HALF,
                    STORE_HALF)
    else:  # LOGITS_SHIFTED
        shift = tl.load(SHIFT + rows, mask=row_ok, other=0.0)[:, None]
        z0 = _logits(acc0, BIAS, cols0, ok0, inv_temp, HAS_BIAS)
        _store(C, c_desc, z0 - shift, off_m, off_n, rows, cols0, row_ok, ok0, ldc, TMA_STORE)
        z1 = _logits(acc1, BIAS, cols1, ok1, inv_temp, HAS_BIAS)
        _store(C, c_desc, z1 - shift, off_m, off_n + HALF, rows, cols1, row_ok, ok1, ldc, TMA_STORE)

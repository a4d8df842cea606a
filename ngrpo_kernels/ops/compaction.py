"""Device-side compaction of the tokens that count, with no host synchronisation.

``compact(values, ignore)`` returns ``order`` (int64 [N]: the indices of the tokens whose value is not
``ignore``, in their original order, then the others) and ``count`` (int32 [1], on the device). ``values``
is a mask (bool or numeric, ``ignore=0``) or the targets themselves (``ignore=ignore_index``): the
predicate is taken inside the kernel, not by a separate launch. The Triton schedules gather hidden rows
in this order chunk by chunk and hand ``count`` to their kernels, which stop at it: padded and ignored
tokens cost no GEMM FLOPs and are never read, so they may hold anything, NaN included.

It runs before the first GEMM of every head pass, so its host cost is paid in full by an isolated call
(the PyTorch composition it replaces, ``compact_torch``, kept as the reference, was eleven launches with
the predicate). Up to ``ONE_PASS_MAX_TOKENS`` it is **one launch**: each block of 1,024 tokens counts the
tokens of the blocks before it and the total itself (a re-read of at most a few hundred KB, from L2),
then ranks its own. Above that, two launches (``_block_counts``, then ``_compact_from_counts`` reading them).
GPU time: microseconds.

``compact_and_gather(values, ignore, x, out)`` is the same one launch with a grid of (block, 256 hidden
columns) that also copies the first chunk's hidden rows into the schedule's buffer (``out[i] = x[order[i]]``
for i < ``out.shape[0]``): the schedules' gather of that chunk was a launch of its own (``index_select``)
ahead of the first GEMM. Each program re-counts the blocks before its own as above and ranks its block 32
tokens at a time, copying their columns as it goes; only the programs of the first column slice write the
order. Above ``ONE_PASS_MAX_TOKENS`` it falls back to ``compact`` and the caller gathers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv
from .launcher import direct

BLOCK = 1024
SCAN = 4096  # tokens counted per step of the one-pass kernel's re-read
ONE_PASS_MAX_TOKENS = 64 * BLOCK


@triton.jit
def _kept(VALUES, offs, N, ignore):
    """1 where the token exists and its value is not ``ignore``, else 0 (int32)."""
    inside = offs < N
    v = tl.load(VALUES + offs, mask=inside)
    return ((v != ignore) & inside).to(tl.int32)


@triton.jit
def _rank_block(VALUES, ORDER, COUNT, N, ignore, pid, earlier, total, BLOCK: tl.constexpr):
    """Block ``pid`` ranks its kept tokens after the ``earlier`` kept ones of the blocks before it, and its
    others after all ``total`` kept tokens."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = _kept(VALUES, offs, N, ignore)
    kept_before = earlier + tl.cumsum(v, axis=0) - v  # kept tokens before each token (exclusive)
    dest = tl.where(v != 0, kept_before, total + offs - kept_before)
    tl.store(ORDER + dest, offs.to(tl.int64), mask=offs < N)
    if pid == 0:
        tl.store(COUNT, total)


@triton.jit
def _kept_before_and_total(VALUES, N, ignore, start, SCAN: tl.constexpr):
    """Kept tokens before ``start`` and in all, counted SCAN tokens at a time (a re-read from L2)."""
    earlier = 0
    total = 0
    for s in range(0, N, SCAN):
        offs = s + tl.arange(0, SCAN)
        v = _kept(VALUES, offs, N, ignore)
        total += tl.sum(v, axis=0)
        earlier += tl.sum(tl.where(offs < start, v, 0), axis=0)
    return earlier, total


@triton.jit
def _compact_one_pass(VALUES, ORDER, COUNT, N, ignore, BLOCK: tl.constexpr, SCAN: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * BLOCK
    earlier, total = _kept_before_and_total(VALUES, N, ignore, start, SCAN)
    _rank_block(VALUES, ORDER, COUNT, N, ignore, pid, earlier, total, BLOCK)


@triton.jit
def _compact_gather_one_pass(VALUES, ORDER, COUNT, X, OUT, N, H, ldx, ignore, rows_out, BLOCK: tl.constexpr,
                             SCAN: tl.constexpr, SUB: tl.constexpr, BLOCK_H: tl.constexpr):
    """``_compact_one_pass`` that also copies the hidden rows of the first ``rows_out`` compacted tokens into
    ``OUT`` [rows_out, H] (the first chunk's gathered rows): program (block, column slice) ranks its block
    SUB tokens at a time and copies their BLOCK_H columns; the slice-0 programs write the order."""
    pid = tl.program_id(0)
    hid = tl.program_id(1)
    start = pid * BLOCK
    earlier, total = _kept_before_and_total(VALUES, N, ignore, start, SCAN)
    cols = hid * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    for s in range(0, tl.minimum(BLOCK, N - start), SUB):
        offs = start + s + tl.arange(0, SUB)
        inside = offs < N
        v = _kept(VALUES, offs, N, ignore)
        kept_before = earlier + tl.cumsum(v, axis=0) - v
        dest = tl.where(v != 0, kept_before, total + offs - kept_before)
        earlier += tl.sum(v, axis=0)
        if hid == 0:
            tl.store(ORDER + dest, offs.to(tl.int64), mask=inside)
        ok = (inside & (dest < rows_out))[:, None] & col_ok[None, :]
        rows = tl.load(X + offs[:, None].to(tl.int64) * ldx + cols[None, :], mask=ok)
        tl.store(OUT + dest[:, None].to(tl.int64) * H + cols[None, :], rows, mask=ok)
    if (pid == 0) & (hid == 0):
        tl.store(COUNT, total)


@triton.jit
def _block_counts(VALUES, COUNTS, N, ignore, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    v = _kept(VALUES, pid * BLOCK + tl.arange(0, BLOCK), N, ignore)
    tl.store(COUNTS + pid, tl.sum(v, axis=0))


@triton.jit
def _compact_from_counts(VALUES, COUNTS, ORDER, COUNT, N, ignore, n_blocks, BLOCK: tl.constexpr,
                         MAX_BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.arange(0, MAX_BLOCKS)
    per_block = tl.load(COUNTS + b, mask=b < n_blocks, other=0)
    total = tl.sum(per_block, axis=0)
    earlier = tl.sum(tl.where(b < pid, per_block, 0), axis=0)
    _rank_block(VALUES, ORDER, COUNT, N, ignore, pid, earlier, total, BLOCK)


def compact(values: torch.Tensor, ignore: int = 0, *,
            one_pass_max: int = ONE_PASS_MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """``values``: any shape (flattened), at least one token (the public ops reject empty batches); a token
    counts where ``values != ignore``."""
    v = values.reshape(-1).contiguous()
    n = v.numel()
    n_blocks = cdiv(n, BLOCK)
    order = torch.empty(n, dtype=torch.int64, device=v.device)
    count = torch.empty(1, dtype=torch.int32, device=v.device)
    if n <= one_pass_max:
        direct(_compact_one_pass)[(n_blocks,)](v, order, count, n, ignore, BLOCK=BLOCK, SCAN=SCAN, num_warps=4)
        return order, count
    counts = torch.empty(n_blocks, dtype=torch.int32, device=v.device)
    direct(_block_counts)[(n_blocks,)](v, counts, n, ignore, BLOCK=BLOCK, num_warps=4)
    direct(_compact_from_counts)[(n_blocks,)](v, counts, order, count, n, ignore, n_blocks, BLOCK=BLOCK,
                                              MAX_BLOCKS=max(16, triton.next_power_of_2(n_blocks)), num_warps=4)
    return order, count


GATHER_SUB = 32  # tokens ranked and copied per step of the gathering compaction
GATHER_COLUMNS = 256  # hidden columns per program of the gathering compaction


def compact_and_gather(values: torch.Tensor, ignore: int, x: torch.Tensor, out: torch.Tensor, *,
                       one_pass_max: int = ONE_PASS_MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``compact(values, ignore)``, and, where it runs in one launch, ``out[i] = x[order[i]]`` for the first
    ``out.shape[0]`` compacted tokens in the same launch (x [N, H] with unit column stride, out contiguous):
    the first chunk's hidden rows, gathered without a launch of their own ahead of the first GEMM.
    Returns (order, count, gathered); gathered False: the caller gathers (the two-launch compaction)."""
    v = values.reshape(-1).contiguous()
    n = v.numel()
    H = x.shape[1]
    if n > one_pass_max or x.stride(1) != 1 or not out.is_contiguous() or H == 0:
        return (*compact(v, ignore, one_pass_max=one_pass_max), False)
    order = torch.empty(n, dtype=torch.int64, device=v.device)
    count = torch.empty(1, dtype=torch.int32, device=v.device)
    grid = (cdiv(n, BLOCK), cdiv(H, GATHER_COLUMNS))
    direct(_compact_gather_one_pass)[grid](v, order, count, x, out, n, H, x.stride(0), ignore, out.shape[0],
                                           BLOCK=BLOCK, SCAN=SCAN, SUB=GATHER_SUB, BLOCK_H=GATHER_COLUMNS,
                                           num_warps=4)
    return order, count, True


def compact_torch(values: torch.Tensor, ignore: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same contract in PyTorch operations (the reference for ``compact``)."""
    v = values.reshape(-1) != ignore
    n = v.numel()
    positions = torch.arange(n, device=v.device, dtype=torch.int64)
    before_valid = torch.cumsum(v, 0, dtype=torch.int64)      # valid tokens up to and including i
    count = before_valid[-1:]
    dest = torch.where(v, before_valid - 1, count + positions - before_valid)
    order = torch.empty_like(positions).scatter_(0, dest, positions)
    return order, count.to(torch.int32)

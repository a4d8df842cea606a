"""The chunked schedule shared by the Triton log-prob backward and the Triton fused loss.

Tokens are compacted (``compaction.py``: the ones that count first, the device-side ``count`` after
them) and visited in chunks of ``chunk`` rows. For each chunk the hidden rows are gathered into a
[chunk, H] buffer; the caller runs the logits GEMM and its row kernels into the logits workspace
[chunk, V] (2 bytes a logit for half inputs, 4 for float32) and hands back dZ; ``backprop`` then forms

    dX[rows] = dZ W          (bf16/fp16/fp32, scattered back to the tokens' positions)
    dW      += dZ^T X_chunk  (float32 accumulator; the first chunk writes instead of adding; a one-chunk
                              pass may write dW in the weight's dtype directly: ``dw_dtype``)
    db      += sum_rows dZ

with the persistent Triton GEMM (stops at the count) or cuBLAS (whole chunks), per
``persistent_gemm.configs.dense_backend``. Chunks run in a fixed order: deterministic.

Memory: the workspace (``workspace_bytes``), two [chunk, H] buffers, the dW accumulator [V, H]
float32 and dX. Chunk count is balanced (``N = 16384`` in a 1.25 GiB workspace at V = 152064 gives
4 chunks of 4096, not 3 of 4413 and a ragged fourth).
"""

from __future__ import annotations

import torch

from .._checks import weight_kept
from . import cdiv
from . import persistent_gemm as pg
from .compaction import compact_and_gather
from .gemm import addmm_fp32, mm_fp32
from .linear_logprobs.triton_rows import dx_finish

GPU_WORKSPACE_BYTES = 5 * 2**28  # 1.25 GiB: chunks of ~4k tokens at V = 152k (docs/kernels.md)
CPU_WORKSPACE_BYTES = 32 * 2**20
ROW_ALIGN = 128  # chunk sizes are multiples of the GEMM's row tile where possible


def default_workspace_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return min(GPU_WORKSPACE_BYTES, torch.cuda.get_device_properties(device).total_memory // 16)
    return CPU_WORKSPACE_BYTES


def logit_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the logits workspace: fp16 (shifted logits, 11 significant bits) for half inputs."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def row_bytes(V: int, H: int, dtype: torch.dtype, device: torch.device, need_logits: bool) -> int:
    """Workspace bytes one token of a chunk takes: its row of logits when they are stored (gradients);
    otherwise (no-grad passes) its statistics partials and its gathered hidden row. A no-grad pass then
    runs as one GEMM launch up to ~60k tokens in the default workspace at the 7B head. Measured on an H200
    at 16k tokens against 4k-token launches: 0.7 ms less host time per call, GPU time within the noise
    (benchmarks/RESULTS_gpu.md)."""
    if need_logits:
        return V * logit_dtype(dtype).itemsize
    stats = 3 * 4 * pg.num_vocab_tiles(V, dtype, device, stored=False)
    return stats + H * dtype.itemsize


def chunk_rows(N: int, per_row: int, workspace_bytes: int) -> int:
    cap = max(1, workspace_bytes // per_row)
    chunks = cdiv(N, cap)
    rows = cdiv(N, chunks)
    aligned = cdiv(rows, ROW_ALIGN) * ROW_ALIGN
    return min(N, aligned if aligned <= cap else rows)


class HeadSchedule:
    """Buffers and per-chunk gradient GEMMs for x [N, H], weight [V, H] over the tokens where
    ``values [N] != ignore`` (a mask, or the targets and their ignore index: ``compaction.compact``)."""

    def __init__(self, x, weight, bias, values, ignore=0, *, workspace_bytes, need_logits, need_dx=False,
                 need_dw=False, need_db=False, dw_dtype=torch.float32, defer=False):
        self.x, self.weight, self.bias = x, weight, bias
        N, H = x.shape
        V = weight.shape[0]
        self.N, self.H, self.V, self.dtype, self.device = N, H, V, x.dtype, x.device
        if workspace_bytes is None:
            workspace_bytes = default_workspace_bytes(x.device)
        self.chunk = chunk_rows(N, row_bytes(V, H, x.dtype, x.device, need_logits), workspace_bytes)
        dev = x.device
        self.x_buf = torch.empty(self.chunk, H, dtype=x.dtype, device=dev)
        # the first chunk's rows are gathered by the compaction's own launch where it takes one
        self.order, self.count, self._first_gathered = compact_and_gather(values, ignore, x, self.x_buf)
        self.logits = torch.empty(self.chunk, V, dtype=logit_dtype(x.dtype), device=dev) if need_logits else None
        self.need_dx, self.need_dw, self.need_db = need_dx, need_dw, need_db
        self.dense = pg.configs.dense_backend(x.dtype, dev)
        self.one_pass = self.dense == "triton" and self.chunk >= N
        # ``defer``: a one-pass schedule that forms dW leaves its gradient GEMMs to ``deferred_backprop`` (the
        # autograd backward, which knows the upstream gradient); nothing is allocated for them here. Without
        # dW (a frozen head) there is no float32 [V, H] to save, and dZ would be held for nothing.
        self.deferred = defer and self.one_pass and need_dw
        self.dx = self.dx_buf = self.dw = self.db = None
        self._dw_chunk = None  # fp16 on the cuBLAS path: one chunk's scaled dW product (``backprop``)
        if not self.deferred:
            self._allocate_grads(dw_dtype)

    def _allocate_grads(self, dw_dtype):
        N, H, V, dev = self.N, self.H, self.V, self.device
        if self.need_dx:
            self.dx = torch.empty(N, H, dtype=self.dtype, device=dev)
        if self.need_dx and self.dense == "triton":  # split-K partials of dZ W, summed by dx_finish
            splits = pg.configs.dx_splits(self.chunk, H, self.dtype, dev)
            self.dx_buf = torch.empty(splits, self.chunk, H, dtype=torch.float32, device=dev)
        elif self.need_dx:
            self.dx_buf = torch.empty(self.chunk, H, dtype=self.dtype, device=dev)
        # ``dw_dtype`` other than float32 (the log-prob backward asks for the weight's dtype): a pass of one
        # chunk forms dW in that dtype straight from the GEMM, with no float32 [V, H] (2.2 GB at the 7B
        # head) and no cast pass; longer passes accumulate in float32 and the caller casts.
        if self.need_dw:
            self.dw = torch.empty(V, H, dtype=dw_dtype if self.one_pass else torch.float32, device=dev)
        if self.need_db:
            self.db = torch.zeros(V, dtype=torch.float32, device=dev)

    @property
    def zero_tail(self) -> bool:
        """Must dZ rows past the count be zeros? (consumers that read whole chunks)"""
        return self.need_db or self.dense == "torch"

    def chunks(self):
        """Yields (row0, n, x_chunk): x_chunk [n, H] holds the compacted tokens row0 .. row0 + n - 1."""
        zero_padding = self.dense == "torch" and self.need_dw
        rows = torch.arange(self.chunk, device=self.x.device, dtype=torch.int32) if zero_padding else None
        for row0 in range(0, self.N, self.chunk):
            n = min(self.chunk, self.N - row0)
            xc = self.x_buf[:n]
            if row0 or not self._first_gathered:
                torch.index_select(self.x, 0, self.order[row0:row0 + n], out=xc)
            self._first_gathered = False  # a later walk over the chunks gathers every one
            if zero_padding:
                # cuBLAS reads the whole chunk: rows past the count (padding, maybe NaN) must be zeros,
                # or 0 * NaN poisons dW. A device-side mask: no host synchronisation.
                xc.masked_fill_((rows[:n] + row0 >= self.count)[:, None], 0)
            yield row0, n, xc

    def backprop(self, dz, row0, xc, scale=None):
        """dX, dW, db contributions of one chunk's dZ [n, V] (in x's dtype). ``scale`` (a float32 0-dim device
        tensor): dZ was formed times 1 / scale (fp16, ``gemm.fp16_grad_scale``); every product is multiplied
        by it before it is added up."""
        n = dz.shape[0]
        triton_gemms = self.dense == "triton"
        if self.need_dx and triton_gemms:
            part = self.dx_buf[:, :n]
            pg.matmul(dz, self.weight, part, count=self.count, row0=row0, scale=scale)
            dx_finish(part, self.dx, self.order, self.count, row0=row0)
        elif self.need_dx:
            out = self.dx_buf[:n]
            torch.matmul(dz, self.weight, out=out)
            if scale is not None:  # in float32 (CUDA would take a 0-dim scale as fp16), rounded once
                out.copy_(out.float().mul_(scale))
            self.dx.index_copy_(0, self.order[row0:row0 + n], out)
        if self.need_dw:
            if triton_gemms:  # one chunk with dw_dtype: the GEMM writes dW in that dtype (init)
                pg.accumulate_t(self.dw, dz, xc, init=row0 == 0, count=self.count, row0=row0, scale=scale)
            elif scale is not None:  # cuBLAS takes no device-side alpha: the chunk's product in a float32 buffer
                if self._dw_chunk is None:
                    self._dw_chunk = torch.empty_like(self.dw)
                mm_fp32(dz.T, xc, self._dw_chunk)
                if row0 == 0:
                    torch.mul(self._dw_chunk, scale, out=self.dw)
                else:
                    self.dw.addcmul_(self._dw_chunk, scale)
            elif row0 == 0:
                mm_fp32(dz.T, xc, self.dw)
            else:
                addmm_fp32(self.dw, dz.T, xc)
        if self.need_db:
            if scale is None:
                self.db += dz.sum(0, dtype=torch.float32)
            else:
                self.db.addcmul_(dz.sum(0, dtype=torch.float32), scale)

    def defer(self, dz, xc, scale=None):
        """End the forward of a ``deferred`` schedule: returns what its backward needs, (weight, dZ, gathered
        rows, order, count, fp16 scale or None), for the caller to hand to autograd (``save_for_backward``:
        freed after backward, seen by saved-tensor hooks and checkpointing) and then to ``deferred_backprop``;
        the schedule drops its own references."""
        assert self.deferred
        saved = (self.weight, dz, xc, self.order, self.count, scale)
        self.x = self.weight = self.bias = self.logits = self.x_buf = self.order = self.count = None
        return saved

    @classmethod
    def _for_backward(cls, weight, order, count, n, H, dtype, *, need_dx, need_db):
        """A one-pass schedule over our GEMMs with no forward state: what ``backprop`` reads."""
        self = cls.__new__(cls)
        self.weight, self.order, self.count = weight, order, count
        self.N = self.chunk = n
        self.H, self.V, self.dtype, self.device = H, weight.shape[0], dtype, weight.device
        self.dense, self.one_pass = "triton", True
        self.need_dx, self.need_dw, self.need_db = need_dx, True, need_db
        self.dx = self.dx_buf = self.dw = self.db = self._dw_chunk = None
        return self


def deferred_backprop(upstream, weight, dz, xc, order, count, scale=None, *, need_dx, need_db):
    """The gradient GEMMs of a deferred one-chunk fused loss (``HeadSchedule.defer``), run in the autograd
    backward once the loss's upstream gradient (``upstream``, a 0-dim float32 device tensor) is known: the
    GEMMs' epilogues multiply by it (times ``scale``, the fp16 chunk factor, when given), so dX [n, H] and dW
    come out in the inputs' dtypes, rounded once, with no float32 [V, H] and no cast pass; db in float32.
    Every call builds its own buffers (a retained graph may run backward twice, even from two threads); dZ
    and the gathered rows are only read."""
    n, V = dz.shape
    H = xc.shape[1]
    weight_kept(weight, weight.shape == (V, H),
                "fused_linear_ngrpo_loss: a call whose tokens fit one workspace chunk runs its dX = dZ W in backward",
                "Frameworks that free parameters after the forward outside the head module's own hooks (FSDP units, "
                "DeepSpeed ZeRO-3) need the gradients formed in the forward: call "
                "`ngrpo_kernels.gradients_in_forward(True)` once before training (DeepSpeed parameters are "
                "recognised without it).")
    total = upstream.detach().float().reshape(())
    if scale is not None:
        total = total * scale
    sch = HeadSchedule._for_backward(weight, order, count, n, H, xc.dtype, need_dx=need_dx, need_db=need_db)
    sch._allocate_grads(weight.dtype)
    sch.backprop(dz, 0, xc, scale=total)
    return sch.dx, sch.dw, sch.db

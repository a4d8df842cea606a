"""The persistent head GEMM and its epilogues against plain float64 matmuls, at odd shapes, with the
device-side token count cutting rows (or K) anywhere, TMA and pointer loads, split-K. Outputs are
poisoned with NaN first: rows past the count must stay untouched, everything else must be written."""

from dataclasses import replace

import pytest
import torch

from ngrpo_kernels.backend import interpreter_enabled
from ngrpo_kernels.ops import persistent_gemm as pg
from ngrpo_kernels.ops.compaction import compact, compact_and_gather, compact_torch
from ngrpo_kernels.ops.persistent_gemm import configs

pytestmark = pytest.mark.skipif(not (interpreter_enabled() or torch.cuda.is_available()),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _configs(tma):
    """tma: True (TMA loads and stores), False (pointer loads and stores), "ptr-store" (TMA loads, the
    logits stored from registers: ``GemmConfig.tma_store``), "halves" (TMA, the logits stored a
    statistics slice at a time: ``GemmConfig.store_halves``) or "ws" (the warp-specialised configs: the
    whole tile in the epilogue, float32 accumulation through descriptors; specialised on a GPU only)."""
    if DEV == "cuda":  # the shipped configs (TMA where the shapes allow it)
        if tma == "ws":
            return dict(logits=configs.HOPPER_WS_LOGITS, dx=configs.HOPPER_WS_DENSE, dw=configs.HOPPER_WS_DENSE)
        if tma not in ("ptr-store", "halves"):
            return {}
        shipped = configs.config_for("logits", torch.bfloat16, torch.device(DEV))
        return dict(logits=replace(shipped, tma_store=tma != "ptr-store", store_halves=tma == "halves"))
    cfg = configs.GemmConfig(16, 32, 16, 2, 1, 1, tma=bool(tma), tma_store=tma in (True, "halves", "ws"),
                             store_halves=tma == "halves", flatten=tma != "ws", warp_specialize=tma == "ws")
    return dict(logits=cfg, dx=cfg, dw=cfg)


def _inputs(n, H, V, dtype, gen):
    x = torch.randn(n, H, generator=gen).to(dtype)
    w = (torch.randn(V, H, generator=gen) * H ** -0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype)
    return x.to(DEV), w.to(DEV), b.to(DEV)


def _count(c):
    return torch.tensor([c], dtype=torch.int32, device=DEV)


# Ragged everywhere; aligned (TMA-eligible); tiny; one token (Triton compiles K = 1 as a constant: the
# dW GEMM of a one-token chunk once came out all zeros on an H200 that way).
SHAPES = [(37, 40, 203), (20, 48, 64), (5, 16, 97), (1, 16, 10)]


@pytest.mark.parametrize("tma,stored", [(True, True), (False, True), ("ptr-store", True), ("halves", True),
                                        ("ws", True), (True, False), ("ws", False)])
@pytest.mark.parametrize("n,H,V", SHAPES)
@pytest.mark.parametrize("count,row0", [(None, 0), (30, 0), (30, 11), (0, 0), (3, 5)])
def test_logits_statistics_and_stored_logits(tma, stored, n, H, V, count, row0, gen):
    """``stored``: the statistics launch also stores the shifted logits (role ``logits``) or writes the
    statistics only (role ``stats``: on a GPU the shipped config of each role)."""
    x, w, b = _inputs(n, H, V, torch.bfloat16, gen)
    inv_temp = 1 / 0.7
    lim = n if count is None else max(0, min(count - row0, n))
    with configs.override(**_configs(tma)):
        slices = pg.num_vocab_tiles(V, x.dtype, x.device, stored)
        width = pg.stats_width(x.dtype, x.device, stored)
        parts = torch.full((3, slices, n), float("nan"), device=DEV)
        out = torch.full((n, V), float("nan"), dtype=torch.float16, device=DEV)
        pg.logits(x, w, bias=b, inv_temp=inv_temp, count=None if count is None else _count(count), row0=row0,
                  partials=list(parts.unbind(0)), out=out if stored else None, entropy=True)
    z = ((x.double() @ w.double().T) + b.double()) * inv_temp
    z = z[:lim].cpu()
    parts, out = parts.cpu(), out.cpu()
    assert out[lim:].isnan().all() and parts[:, :, lim:].isnan().all(), "rows past the count were written"
    if lim == 0:
        return
    pad = torch.full((lim, slices * width - V), float("-inf"), dtype=z.dtype)
    zs = torch.cat([z, pad], 1).view(lim, slices, width)
    m = zs.max(-1).values.T
    torch.testing.assert_close(parts[0, :, :lim].double(), m, rtol=0, atol=1e-5)
    p = torch.exp(zs - m.T[..., None])
    torch.testing.assert_close(parts[1, :, :lim].double(), p.sum(-1).T, rtol=1e-5, atol=1e-5)
    u = torch.where(p > 0, p * (zs - m.T[..., None]), 0.0).sum(-1).T  # relative to the slice max
    torch.testing.assert_close(parts[2, :, :lim].double(), u, rtol=1e-4, atol=1e-4)
    shifted = (zs - m.T[..., None]).reshape(lim, -1)[:, :V]
    if stored:
        torch.testing.assert_close(out[:lim].double(), shifted, rtol=2e-3, atol=4e-3)  # fp16 storage
    else:
        assert out.isnan().all()


@pytest.mark.parametrize("tma", [True, False, "ptr-store", "ws"])
@pytest.mark.parametrize("n,H,V", SHAPES)
def test_shifted_logits(tma, n, H, V, gen):
    x, w, b = _inputs(n, H, V, torch.float16, gen)
    shift = torch.randn(n, generator=gen).to(DEV)
    out = torch.full((n, V), float("nan"), dtype=torch.float16, device=DEV)
    lim = max(n - 2, 1)
    with configs.override(**_configs(tma)):
        pg.logits(x, w, bias=b, inv_temp=2.0, count=_count(lim), shift=shift, out=out)
    want = ((x.double() @ w.double().T) + b.double()) * 2.0 - shift.double()[:, None]
    torch.testing.assert_close(out[:lim].double(), want[:lim], rtol=2e-3, atol=4e-3)
    assert out[lim:].isnan().all()


@pytest.mark.parametrize("tma", [True, False, "ws"])
@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("n,H,V", SHAPES)
def test_split_k_dx(tma, splits, n, H, V, gen):
    _, w, _ = _inputs(n, H, V, torch.bfloat16, gen)
    dz = torch.randn(n, V, generator=gen).to(torch.bfloat16).to(DEV)
    out = torch.full((splits, n, H), float("nan"), device=DEV)
    lim = max(n - 3, 1)
    with configs.override(**_configs(tma)):
        pg.matmul(dz, w, out, count=_count(lim))
    torch.testing.assert_close(out[:, :lim].sum(0).double(), dz[:lim].double() @ w.double(), rtol=1e-5, atol=1e-4)
    assert out[:, lim:].isnan().all()


@pytest.mark.parametrize("tma", [True, False, "ws"])
@pytest.mark.parametrize("n,H,V", SHAPES)
@pytest.mark.parametrize("count", [None, 0, 1, 9])
def test_dw_accumulation_over_chunks(tma, n, H, V, count, gen):
    """Two chunks of one batch: the first initialises the fp32 accumulator, the second adds; K stops at
    the count (a chunk past it adds nothing, a first chunk past it writes zeros)."""
    x, _, _ = _inputs(2 * n, H, V, torch.bfloat16, gen)
    dz = torch.randn(2 * n, V, generator=gen).to(torch.bfloat16).to(DEV)
    acc = torch.full((V, H), float("nan"), device=DEV)
    c = None if count is None else _count(count)
    with configs.override(**_configs(tma)):
        pg.accumulate_t(acc, dz[:n], x[:n], init=True, count=c, row0=0)
        pg.accumulate_t(acc, dz[n:], x[n:], init=False, count=c, row0=n)
    k = 2 * n if count is None else count
    want = dz[:k].double().T @ x[:k].double()
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tma", [True, False, "ws"])
@pytest.mark.parametrize("n,H,V", SHAPES[:2])
def test_scaled_products_for_fp16(tma, n, H, V, gen):
    """fp16 dZ comes scaled by a power of two; the dX and dW GEMMs multiply their products back by the device
    scalar they are given (per chunk: the two dW chunks here carry different scales)."""
    x, w, _ = _inputs(2 * n, H, V, torch.float16, gen)
    dz = torch.randn(2 * n, V, generator=gen).to(torch.float16).to(DEV)
    s1, s2 = torch.tensor(2.0 ** -20, device=DEV), torch.tensor(2.0 ** -7, device=DEV)
    out = torch.full((2, n, H), float("nan"), device=DEV)
    acc = torch.full((V, H), float("nan"), device=DEV)
    with configs.override(**_configs(tma)):
        pg.matmul(dz[:n], w, out, scale=s1)
        pg.accumulate_t(acc, dz[:n], x[:n], init=True, scale=s1)
        pg.accumulate_t(acc, dz[n:], x[n:], init=False, scale=s2)
    torch.testing.assert_close(out.sum(0).double(), dz[:n].double() @ w.double() * 2.0 ** -20, rtol=1e-5, atol=1e-10)
    want = dz[:n].double().T @ x[:n].double() * 2.0 ** -20 + dz[n:].double().T @ x[n:].double() * 2.0 ** -7
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("tma", [True, False, "ws"])
@pytest.mark.parametrize("n,H,V", SHAPES)
@pytest.mark.parametrize("count", [None, 0, 1, 9])
def test_dw_written_once_in_the_weight_dtype(tma, n, H, V, count, gen):
    """A one-chunk pass writes dW straight into a bf16 [V, H] (summed in fp32, rounded once); past the count
    it is zeros. Adding into bf16 (rounding every chunk) is refused."""
    x, _, _ = _inputs(n, H, V, torch.bfloat16, gen)
    dz = torch.randn(n, V, generator=gen).to(torch.bfloat16).to(DEV)
    dw = torch.full((V, H), float("nan"), dtype=torch.bfloat16, device=DEV)
    with configs.override(**_configs(tma)):
        pg.accumulate_t(dw, dz, x, init=True, count=None if count is None else _count(count), row0=0)
    k = n if count is None else min(count, n)
    want = dz[:k].double().T @ x[:k].double()
    torch.testing.assert_close(dw.double(), want, rtol=8e-3, atol=1e-3)  # one bf16 rounding of the fp32 sum
    with pytest.raises(ValueError, match="float32"):
        pg.accumulate_t(dw, dz, x, init=False)


@pytest.mark.parametrize("impl", [compact, compact_torch])
def test_compaction_orders_valid_tokens_first_stably(impl):
    valid = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool, device=DEV)
    order, count = impl(valid)
    assert order.tolist() == [1, 2, 4, 7, 0, 3, 5, 6] and count.tolist() == [4] and count.dtype == torch.int32
    order, count = impl(torch.zeros(5, dtype=torch.bool, device=DEV))
    assert order.tolist() == [0, 1, 2, 3, 4] and count.item() == 0
    order, count = impl(torch.ones(3, dtype=torch.bool, device=DEV))
    assert order.tolist() == [0, 1, 2] and count.item() == 3


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("n,frac", [(1, 0.5), (1023, 0.3), (1024, 1.0), (1025, 0.0), (5000, 0.6), (17000, 0.05)])
def test_compaction_kernel_matches_the_reference_across_blocks(n, frac, one_pass, gen):
    """The Triton compaction ranks tokens block by block (1,024 a block), in one launch (every block
    re-counts the blocks before it) or two (block counts first): sizes around and across block
    boundaries, validity from none to all, against the PyTorch composition."""
    valid = (torch.rand(n, generator=gen) < frac).to(DEV)
    want_order, want_count = compact_torch(valid)
    # any leading shape: tokens are flattened
    order, count = compact(valid.reshape(1, n), one_pass_max=n if one_pass else 0)
    assert torch.equal(order, want_order) and torch.equal(count, want_count)
    assert sorted(order.tolist()) == list(range(n))


@pytest.mark.parametrize("one_pass", [True, False])
def test_compaction_takes_the_predicate_itself(one_pass, gen):
    """Targets with an ignore index, and numeric masks, are compacted without a separate comparison."""
    n = 3000
    targets = torch.randint(0, 50, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.4] = -100
    targets = targets.to(DEV)
    order, count = compact(targets, -100, one_pass_max=n if one_pass else 0)
    want_order, want_count = compact_torch(targets != -100)
    assert torch.equal(order, want_order) and torch.equal(count, want_count)
    mask = (torch.rand(n, generator=gen) < 0.5).float().to(DEV)
    order, count = compact(mask, one_pass_max=n if one_pass else 0)
    want_order, want_count = compact_torch(mask.bool())
    assert torch.equal(order, want_order) and torch.equal(count, want_count)


def _persistent_gemm_warps():
    """num_warps of every compiled specialisation of the persistent GEMM (a warp-specialised one has 12:
    one producer and two consumer warpgroups of 4)."""
    from ngrpo_kernels.ops.persistent_gemm.kernel import persistent_gemm_kernel

    return {k.metadata.num_warps for cache in persistent_gemm_kernel.device_caches.values()
            for k in cache[0].values()}


def test_head_ops_with_warp_specialised_configs(gen):
    """Log-probs with entropy (forward and backward, two chunks) and the fused loss through the
    warp-specialised configs against the default configs: the same results to rounding, with NaN hidden
    states at the ignored positions. On a GPU the shapes are large enough for every GEMM to take the TMA
    path, and the loop must have been specialised there."""
    import ngrpo_kernels as nk

    cuda = DEV == "cuda"
    n, H, V = (600, 256, 1096) if cuda else (40, 48, 70)  # on a GPU: TMA-aligned leading dimensions
    x, w, b = _inputs(n, H, V, torch.bfloat16, gen)
    t = torch.randint(0, V, (n,), generator=gen).to(DEV)
    t[::7] = -100
    x[t == -100] = float("nan")  # never read by either route (compacted past the count)
    g_lp, g_ent = torch.randn(n, generator=gen).to(DEV), torch.randn(n, generator=gen).to(DEV)
    mask = t != -100
    B = 4  # the fused loss takes [B, T] batches
    old = (torch.randn(n, generator=gen).to(DEV) * 0.1 - 3).view(B, -1)
    adv = torch.randn(B, generator=gen).to(DEV)

    def run():
        leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
        lp, ent = nk.fused_linear_logprobs(leaves[0], leaves[1], t, bias=leaves[2], return_entropy=True,
                                           workspace_bytes=(n // 2 + 1) * V * 2)  # two chunks in backward
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        out = [lp.detach(), ent.detach(), *(a.grad for a in leaves)]
        leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
        loss, _ = nk.fused_linear_ngrpo_loss(leaves[0].view(B, -1, H), leaves[1], t.clamp(min=0).view(B, -1),
                                             mask.view(B, -1), old, advantages=adv,
                                             bias=leaves[2], workspace_bytes=(n // 2 + 1) * V * 2)
        loss.backward()
        return out + [loss.detach(), *(a.grad for a in leaves)]

    with nk.use_backend("triton"):
        want = run()
        with configs.override(**_configs("ws")):
            got = run()
    names = ["logprobs", "entropy", "dx", "dw", "db", "loss", "loss dx", "loss dw", "loss db"]
    for name, g, r in zip(names, got, want):
        assert torch.isfinite(g).all(), name
        rel = ((g.double() - r.double()).norm() / r.double().norm()).item()
        assert rel < (1e-5 if name in ("logprobs", "entropy", "loss") else 1e-2), (name, rel)  # half-precision dZ
    if cuda:
        assert 12 in _persistent_gemm_warps(), "no warp-specialised launch"
@pytest.mark.parametrize("n,H,rows_out,frac", [(1, 3, 1, 1.0), (37, 40, 37, 0.6), (1025, 300, 600, 0.5),
                                               (3000, 16, 3000, 0.3), (2100, 260, 1, 0.0), (700, 513, 300, 1.0)])
def test_compaction_gathers_the_first_chunk(n, H, rows_out, frac, gen):
    """The one-launch compaction also copies the hidden rows of the first ``rows_out`` compacted tokens (the
    first chunk), padding rows (NaN here) included where the chunk reaches them, and writes nothing past
    them; above the one-launch size it leaves the gather to the caller."""
    valid = torch.rand(n, generator=gen) < frac
    x = torch.randn(n, H + 3, generator=gen).to(torch.bfloat16)[:, :H]  # a leading stride of its own
    x[~valid] = float("nan")
    valid, x = valid.to(DEV), x.to(DEV)
    out = torch.full((rows_out + 2, H), 7.0, dtype=torch.bfloat16, device=DEV)
    order, count, gathered = compact_and_gather(valid, 0, x, out[:rows_out])
    want_order, want_count = compact_torch(valid)
    assert gathered and torch.equal(order, want_order) and torch.equal(count, want_count)
    torch.testing.assert_close(out[:rows_out], x[want_order[:rows_out]], rtol=0, atol=0, equal_nan=True)
    assert (out[rows_out:] == 7.0).all()
    order, count, gathered = compact_and_gather(valid, 0, x, out[:rows_out], one_pass_max=0)
    assert not gathered and torch.equal(order, want_order)


def test_the_statistics_role_follows_a_logits_override(monkeypatch):
    """Statistics-only launches take the ``stats`` role: on Hopper its own warp-specialised config; under an
    override of ``logits`` alone that one (tests and sweeps that pin the logits GEMM pin both), unless
    ``stats`` is named too."""
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    pinned = replace(configs.INTERPRETER, num_stages=2)
    with configs.override(logits=pinned):
        assert configs.config_for("stats", bf16, cpu) is pinned
        with configs.override(stats=configs.FLOAT32):
            assert configs.config_for("stats", bf16, cpu) is configs.FLOAT32
            assert configs.config_for("logits", bf16, cpu) is pinned
    monkeypatch.setattr(configs, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(configs, "_capability", lambda index: (9, 0))
    hopper = torch.device("cuda", 0)
    assert configs.config_for("stats", bf16, hopper) is configs.HOPPER_WS_STATS
    assert configs.config_for("logits", bf16, hopper) is configs.HOPPER_LOGITS
    monkeypatch.setattr(configs, "_capability", lambda index: (10, 0))  # Blackwell: not specialised (untimed)
    assert configs.config_for("stats", bf16, hopper) is configs.HOPPER_LOGITS
    monkeypatch.setattr(configs, "_capability", lambda index: (9, 0))
    # both cut the vocabulary into slices of the same width (the fused loss's no-grad pass and its
    # gradient pass size their partials alike)
    assert pg.stats_width(bf16, hopper, stored=False) == pg.stats_width(bf16, hopper, stored=True) == 128


AT_TMA_SHAPES = {  # the Hopper logits configs a launch may take (shipped, or timed as candidates)
    "128x256": configs.HOPPER_LOGITS, "128x256 ptr-store": replace(configs.HOPPER_LOGITS, tma_store=False),
    "128x256 store-halves": replace(configs.HOPPER_LOGITS, store_halves=True),
    "ws 256x128": configs.HOPPER_WS_LOGITS, "ws 256x128 s4": configs.HOPPER_WS_STATS,
}


@pytest.mark.parametrize("name", list(AT_TMA_SHAPES))
@pytest.mark.parametrize("stored", [True, False])
@pytest.mark.parametrize("count", [None, 213])
def test_statistics_at_tma_shapes(name, stored, count, gen):
    """The Hopper statistics GEMMs at a shape where every operand takes TMA (on a GPU the warp-specialised
    loop is specialised there): every row's partials, including a warp-specialised tile's second consumer
    warpgroup's rows 128-255. With the logits also stored through TMA, triton 3.6 left exactly those
    unwritten on an H200 (2026-11-28); the launcher stores them from registers in a specialised launch,
    and this test holds it. Also the stored-logit variants timed as candidates (ptr-store, store-halves)."""
    cfg = AT_TMA_SHAPES[name]  # stored, the specialised 4-stage config fits: the logits leave from registers
    n, H, V = 600, 256, 1096
    x, w, b = _inputs(n, H, V, torch.bfloat16, gen)
    lim = n if count is None else count
    x[lim:] = float("nan")  # past the count: never read into a stored row
    with configs.override(logits=cfg):
        slices, width = pg.num_vocab_tiles(V, x.dtype, x.device, stored), pg.stats_width(x.dtype, x.device, stored)
        parts = torch.full((3, slices, n), float("nan"), device=DEV)
        out = torch.full((n, V), float("nan"), dtype=torch.float16, device=DEV)
        pg.logits(x, w, bias=b, inv_temp=1.0, count=None if count is None else _count(count),
                  partials=list(parts.unbind(0)), out=out if stored else None, entropy=True)
    z = (x[:lim].double() @ w.double().T + b.double()).cpu()
    zs = torch.cat([z, torch.full((lim, slices * width - V), float("-inf"), dtype=z.dtype)], 1)
    zs = zs.view(lim, slices, width)
    m = zs.max(-1).values
    parts, out = parts.cpu(), out.cpu()
    assert parts[:, :, lim:].isnan().all() and out[lim:].isnan().all(), "rows past the count were written"
    torch.testing.assert_close(parts[0, :, :lim].T.double(), m, rtol=0, atol=1e-4)
    torch.testing.assert_close(parts[1, :, :lim].T.double(), torch.exp(zs - m[..., None]).sum(-1),
                               rtol=1e-4, atol=1e-4)
    if stored:
        shifted = (zs - m[..., None]).reshape(lim, -1)[:, :V]
        torch.testing.assert_close(out[:lim].double(), shifted, rtol=2e-3, atol=8e-3)
    else:
        assert out.isnan().all()

"""The fused policy loss: every backend against the float64 reference, hand-computed cases, the
aggregation modes, micro-batching with a global normaliser, masked batches and host syncs."""

import math
import sys

import pytest
import torch

import ngrpo_kernels as nk
from ngrpo_kernels.backend import interpreter_enabled
from ngrpo_kernels.ops.policy_loss.naive import policy_loss_naive

MODES = [m.value for m in nk.AggMode]


def _inputs(B, T, gen, *, masked_rows=(), per_token_adv=False, garbage_padding=True):
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.25  # ratios well beyond the clip
    adv_shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(*adv_shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) < 0.75
    mask[:, 0] = True
    for r in masked_rows:
        mask[r] = False
    ref = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    ent = torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    isw = torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    if garbage_padding:  # padding holds anything; it must never reach the loss or the gradients
        for x in (logp, old, ref, ent, isw):
            x.masked_fill_(~mask, float("nan"))
    return dict(logp=logp, old=old, adv=adv, mask=mask, ref=ref, ent=ent, isw=isw)


def _call(backend, device, x, dtype=torch.float32, **options):
    logp = x["logp"].to(device, dtype).requires_grad_()
    ent = x["ent"].to(device, dtype).requires_grad_() if "entropy" in options else None
    kwargs = dict(options)
    if kwargs.pop("entropy", None) is not None:
        kwargs["entropy"] = ent
    for key, name in (("ref_logprobs", "ref"), ("rollout_is_weights", "isw")):
        if kwargs.get(key) is not None:
            kwargs[key] = x[name].to(device, dtype)
    with nk.use_backend(backend):
        loss, metrics = nk.ngrpo_policy_loss(logp, x["old"].to(device, dtype), x["adv"].to(device, dtype),
                                             x["mask"].to(device), **kwargs)
    loss.backward()
    return loss, metrics, logp.grad, (ent.grad if ent is not None else None)


def _reference(x, **options):
    logp = x["logp"].clone().requires_grad_()
    ent = x["ent"].clone().requires_grad_() if "entropy" in options else None
    kwargs = dict(options)
    if kwargs.pop("entropy", None) is not None:
        kwargs["entropy"] = ent
    for key, name in (("ref_logprobs", "ref"), ("rollout_is_weights", "isw")):
        if kwargs.get(key) is not None:
            kwargs[key] = x[name]
    loss, metrics = policy_loss_naive(logp, x["old"], x["adv"], x["mask"],
                                      loss_agg_mode=nk.AggMode(kwargs.pop("loss_agg_mode", "token-mean")),
                                      **kwargs)
    loss.backward()
    grad_ent = ent.grad if ent is not None else None
    return loss, metrics, torch.nan_to_num(logp.grad), grad_ent


OPTION_SETS = [
    {},
    {"clip_ratio_c": 3.0},
    {"ref_logprobs": True, "beta": 0.04},
    {"entropy": True, "entropy_coef": 0.001},
    {"rollout_is_weights": True},
    {"clip_ratio_c": 1.5, "ref_logprobs": True, "beta": 0.1, "entropy": True, "entropy_coef": -0.02,
     "rollout_is_weights": True, "eps_neg": 0.2, "eps_pos": 0.28},
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("B,T,per_token_adv", [(1, 1, False), (3, 7, True), (5, 33, False), (2, 1500, True)])
def test_against_float64_reference(mode, options, B, T, per_token_adv, device, backend, gen):
    x = _inputs(B, T, gen, masked_rows=(1,) if B > 2 else (), per_token_adv=per_token_adv)
    options = dict(options, loss_agg_mode=mode)
    loss, metrics, g_lp, g_ent = _call(backend, device, x, **options)
    want_loss, want_metrics, want_g_lp, want_g_ent = _reference(x, **options)

    assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss.detach().cpu().double(), want_loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(want_metrics)
    for k in metrics:
        assert metrics[k].dim() == 0
        torch.testing.assert_close(metrics[k].cpu().double(), want_metrics[k].double(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"metric {k}: {m}")
    assert torch.isfinite(g_lp).all()  # padding held NaN: it must not leak
    torch.testing.assert_close(g_lp.cpu().double(), want_g_lp, rtol=1e-5, atol=1e-7)
    if want_g_ent is not None:
        torch.testing.assert_close(g_ent.cpu().double(), want_g_ent, rtol=1e-5, atol=1e-7)


def _one_token(logp, old, adv, backend, device, **options):
    lp = torch.tensor([[logp]], dtype=torch.float64, device=device, requires_grad=True)
    with nk.use_backend(backend):
        loss, metrics = nk.ngrpo_policy_loss(lp, torch.tensor([[old]], dtype=torch.float64, device=device),
                                             torch.tensor([adv], dtype=torch.float64, device=device),
                                             torch.ones(1, 1, dtype=torch.bool, device=device), **options)
    loss.backward()
    return float(loss.detach()), float(lp.grad), float(metrics["clip_frac"])


@pytest.mark.parametrize("rho,adv,clipped", [
    (1.0, 2.0, False),    # on-policy: loss = -A, gradient -A
    (1.2, 1.0, False),    # inside the upper bound 1.24 (a symmetric 0.2 clip would cut here)
    (1.3, 1.0, True),     # A > 0 above 1 + eps_pos: clipped, no gradient
    (0.7, 1.0, False),    # A > 0 below 1 - eps_neg: the lower bound does not bind for A > 0
    (0.8, -1.0, True),    # A < 0 below 1 - eps_neg = 0.84: clipped
    (0.86, -1.0, False),  # A < 0 inside the lower bound (0.8 would be cut by a symmetric 0.2)
    (1.5, -1.0, False),   # A < 0 above 1 + eps_pos: the upper bound does not bind for A < 0
])
def test_asymmetric_clip_by_hand(rho, adv, clipped, device, backend):
    loss, grad, clip_frac = _one_token(math.log(rho), 0.0, adv, backend, device)
    clip_rho = min(max(rho, 0.84), 1.24)
    assert loss == pytest.approx(-min(rho * adv, clip_rho * adv), rel=1e-6)
    assert grad == pytest.approx(0.0 if clipped else -adv * rho, rel=1e-6, abs=1e-12)
    assert clip_frac == (1.0 if clipped else 0.0)


def test_upper_bound_may_exceed_a_ratio_of_two(device, backend):
    """eps_pos is any positive number (verl configs set clip_ratio_high >= 1 to widen the upper clip)."""
    loss, grad, clip_frac = _one_token(math.log(2.2), 0.0, 1.0, backend, device, eps_pos=1.5)
    assert (loss, grad, clip_frac) == (pytest.approx(-2.2), pytest.approx(-2.2), 0.0)
    loss, grad, clip_frac = _one_token(math.log(3.0), 0.0, 1.0, backend, device, eps_pos=1.5)
    assert (loss, grad, clip_frac) == (pytest.approx(-2.5), 0.0, 1.0)


def test_dual_clip_by_hand(device, backend):
    # A = -1, rho = 5 > c = 3: the loss is bounded at -c * A = 3 with no gradient.
    loss, grad, _ = _one_token(math.log(5.0), 0.0, -1.0, backend, device, clip_ratio_c=3.0)
    assert (loss, grad) == (pytest.approx(3.0), 0.0)
    loss, grad, _ = _one_token(math.log(2.0), 0.0, -1.0, backend, device, clip_ratio_c=3.0)
    assert (loss, grad) == (pytest.approx(2.0), pytest.approx(2.0))


def test_kl_and_entropy_terms_by_hand(device, backend):
    lp = torch.tensor([[-1.0]], dtype=torch.float64, device=device, requires_grad=True)
    H = torch.tensor([[2.0]], dtype=torch.float64, device=device, requires_grad=True)
    ref = torch.tensor([[-1.5]], dtype=torch.float64, device=device)
    with nk.use_backend(backend):
        loss, m = nk.ngrpo_policy_loss(lp, lp.detach(), torch.tensor([0.5], dtype=torch.float64, device=device),
                                       torch.ones(1, 1, device=device), ref_logprobs=ref, beta=0.1,
                                       entropy=H, entropy_coef=0.01)
    loss.backward()
    k3 = math.exp(-0.5) + 0.5 - 1.0
    assert float(loss) == pytest.approx(-0.5 + 0.1 * k3 - 0.01 * 2.0, rel=1e-6)
    assert float(lp.grad) == pytest.approx(-0.5 + 0.1 * (1 - math.exp(-0.5)), rel=1e-6)
    assert float(H.grad) == pytest.approx(-0.01, rel=1e-6)
    assert float(m["kl"]) == pytest.approx(k3, rel=1e-6) and float(m["entropy"]) == pytest.approx(2.0)


def test_aggregation_modes_by_hand(device, backend):
    """Two sequences: 1 valid token with loss 1, and 3 valid tokens with loss 2 each (rho = 1, so
    l = -A), plus a fully masked third sequence."""
    lp = torch.zeros(3, 4, dtype=torch.float64, device=device)
    adv = torch.tensor([-1.0, -2.0, 5.0], dtype=torch.float64, device=device)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], device=device)
    want = {"token-mean": (1 + 6) / 4, "seq-mean-token-mean": (1 + 2) / 2, "seq-mean-token-sum": (1 + 6) / 2,
            "seq-mean-token-sum-norm": (1 + 6) / 4}
    for mode, value in want.items():
        with nk.use_backend(backend):
            loss, _ = nk.ngrpo_policy_loss(lp, lp, adv, mask, loss_agg_mode=mode)
        assert float(loss) == pytest.approx(value, rel=1e-6), mode
    with nk.use_backend(backend):
        loss, _ = nk.ngrpo_policy_loss(lp, lp, adv, mask, loss_agg_mode="seq-mean-token-sum-norm",
                                       length_budget=10)
        assert float(loss) == pytest.approx(0.7, rel=1e-6)
        loss, _ = nk.ngrpo_policy_loss(lp, lp, adv, mask, normalizer=14)
        assert float(loss) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_the_batch(mode, device, backend, gen):
    """Splitting a batch with the whole batch's normaliser gives the whole batch's loss and gradient."""
    x = _inputs(6, 9, gen, masked_rows=(4,), garbage_padding=False)
    mask = x["mask"]
    if mode == "token-mean":
        normalizer = mask.sum().item()
    elif mode == "seq-mean-token-sum-norm":
        normalizer = None  # already a plain sum: micro-batches add up without one
    else:
        normalizer = (mask.sum(-1) > 0).sum().item()
    logp = x["logp"].float().to(device).requires_grad_()
    args = (x["old"].float().to(device), x["adv"].float().to(device), mask.to(device))
    with nk.use_backend(backend):
        whole, _ = nk.ngrpo_policy_loss(logp, *args, loss_agg_mode=mode)
        (g_whole,) = torch.autograd.grad(whole, logp)
        parts = []
        for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
            part, _ = nk.ngrpo_policy_loss(logp[rows], *(a[rows] for a in args), loss_agg_mode=mode,
                                           normalizer=normalizer, length_budget=None)
            parts.append(part)
        total = sum(parts)
        (g_parts,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-5, atol=1e-7)


def test_fully_masked_batch(device, backend):
    nan = torch.full((2, 3), float("nan"), device=device)
    logp = nan.clone().requires_grad_()
    H = nan.clone().requires_grad_()
    for mode in MODES:
        with nk.use_backend(backend):
            loss, metrics = nk.ngrpo_policy_loss(logp, nan, torch.zeros(2, device=device),
                                                 torch.zeros(2, 3, dtype=torch.bool, device=device),
                                                 entropy=H, entropy_coef=0.1, ref_logprobs=nan, beta=0.1,
                                                 loss_agg_mode=mode)
        g_lp, g_H = torch.autograd.grad(loss, (logp, H))
        assert float(loss) == 0.0
        assert torch.equal(g_lp, torch.zeros_like(g_lp)) and torch.equal(g_H, torch.zeros_like(g_H))
        assert all(float(v) == 0.0 for v in metrics.values())


@pytest.mark.parametrize("mode", MODES)
def test_float64_inputs_keep_float64_precision(mode, gen):
    """The PyTorch backends compute in float64 for float64 inputs, aggregation weights included (they were float32,
    which left the loss 1e-7 from the float64 truth)."""
    B, T = 5, 33
    lp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) < 0.7
    want, _ = policy_loss_naive(lp, old, adv, mask, loss_agg_mode=nk.AggMode(mode))
    with nk.use_backend("torch"):
        loss, _ = nk.ngrpo_policy_loss(lp, old, adv, mask, loss_agg_mode=mode)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_backend_computes_half_inputs_in_float32(dtype, gen):
    """The REFERENCE backend is the specification: half-precision inputs are computed in float32, as the
    kernels compute them, not in bf16 / fp16 arithmetic (which moves ratios across the clip bounds)."""
    x = _inputs(4, 64, gen, garbage_padding=False)
    x = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in x.items()}

    def run(widen):
        t = {k: (v.float() if widen and v.is_floating_point() else v) for k, v in x.items()}
        lp, ent = t["logp"].clone().requires_grad_(), t["ent"].clone().requires_grad_()
        with nk.use_backend("reference"):
            loss, metrics = nk.ngrpo_policy_loss(lp, t["old"], t["adv"], t["mask"], entropy=ent, entropy_coef=0.05,
                                                 ref_logprobs=t["ref"], beta=0.1, rollout_is_weights=t["isw"])
        loss.backward()
        return loss, metrics["clip_frac"], lp.grad, ent.grad

    got, want = run(False), run(True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert got[1] == want[1]
    assert got[2].dtype == dtype and torch.equal(got[2], want[2].to(dtype)) and torch.equal(got[3], want[3].to(dtype))


def test_upstream_gradient_and_dtypes(device, backend, gen):
    x = _inputs(3, 5, gen, garbage_padding=False)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        logp = x["logp"].to(device, dtype).requires_grad_()
        with nk.use_backend(backend):
            loss, _ = nk.ngrpo_policy_loss(logp, x["old"].to(device, dtype), x["adv"].to(device), x["mask"].to(device))
        (2.5 * loss).backward()
        assert logp.grad.dtype == dtype
        _, _, want, _ = _reference({k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in x.items()})
        torch.testing.assert_close(logp.grad.cpu().double(), 2.5 * want, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend_name", ["torch", "cpp", "triton", "reference"])
def test_zero_weights_never_multiply_an_overflow(backend_name, device):
    """Two factors of 0 meet an overflowing exponential: a token the rollout correction weighs 0 whose ratio
    overflows (log-ratio 95, A < 0, no dual clip: its clipped term is +inf), and ref_logprobs passed with
    beta = 0 (the KL only logged) where k3 overflows. Each contributes exactly 0 (0 * inf was a NaN loss);
    verl, which clamps the log-ratio, gives the same loss and gradient here. The fused head loss too."""
    if backend_name in ("cpp", "torch") and device.type != "cpu" or backend_name == "cpp" and not nk.cpp_available():
        pytest.skip("a CPU backend")
    if backend_name == "triton" and device.type == "cpu" and not interpreter_enabled():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    mask = torch.ones(1, 2, dtype=torch.bool, device=device)
    old, adv = torch.tensor([[-100.0, -1.1]], device=device), torch.tensor([-1.0], device=device)
    weights = torch.tensor([[0.0, 1.0]], device=device)
    with nk.use_backend(backend_name):
        lp = torch.tensor([[-5.0, -1.0]], device=device, requires_grad=True)
        loss, _ = nk.ngrpo_policy_loss(lp, old, adv, mask, rollout_is_weights=weights)
        loss.backward()
        want = 0.5 * math.exp(0.1)  # the second token's -A * ratio over 2 tokens
        assert loss.item() == pytest.approx(want, rel=1e-6)
        assert lp.grad[0].tolist() == pytest.approx([0.0, want], rel=1e-6)

        lp = torch.tensor([[-95.0, -1.0]], device=device, requires_grad=True)
        loss, metrics = nk.ngrpo_policy_loss(lp, lp.detach(), torch.tensor([1.0], device=device), mask,
                                             ref_logprobs=torch.tensor([[0.0, -1.0]], device=device), beta=0.0)
        loss.backward()
        assert loss.item() == -1.0 and lp.grad.tolist() == [[-0.5, -0.5]] and metrics["kl"].item() == math.inf

    # The fused head loss, against the reference backend on the same inputs (whose gradients are autograd's):
    # the weighed-out overflowing token, and a reference given with beta = 0 whose k3 overflows.
    g = torch.Generator().manual_seed(0)
    hidden0, weight0 = torch.randn(1, 2, 8, generator=g).to(device), torch.randn(11, 8, generator=g).to(device)
    targets = torch.tensor([[3, 4]], device=device)
    results = {}
    for name in (backend_name, "reference"):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        with nk.use_backend(name):
            a, _ = nk.fused_linear_ngrpo_loss(hidden, weight, targets, mask, old, advantages=adv,
                                              rollout_is_weights=weights)
            b, metrics = nk.fused_linear_ngrpo_loss(hidden, weight, targets, mask, None, advantages=adv,
                                                    ref_logprobs=torch.tensor([[90.0, -1.0]], device=device))
        (a + b).backward()
        assert metrics["kl"].item() == math.inf
        results[name] = (a.detach(), b.detach(), hidden.grad, weight.grad)
    assert hidden.grad[0, 0].abs().max() > 0  # (the second loss's first token does count)
    for got, want in zip(results[backend_name], results["reference"]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_no_grad_and_frozen_inputs(device, backend, gen):
    x = _inputs(2, 4, gen, garbage_padding=False)
    with nk.use_backend(backend), torch.no_grad():
        loss, metrics = nk.ngrpo_policy_loss(x["logp"].to(device), x["old"].to(device), x["adv"].to(device),
                                             x["mask"].to(device))
    want, _ = policy_loss_naive(x["logp"], x["old"], x["adv"], x["mask"])
    assert not loss.requires_grad
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def _every_op(device, backend, gen):
    """Each public op and adapter, forward and backward, as the hot loop of a trainer calls it."""
    import ngrpo_kernels.integrations.liger as liger_adapter

    x = _inputs(4, 6, gen, garbage_padding=False)
    logp = x["logp"].float().to(device).requires_grad_()
    old, adv, mask = (t.to(device) for t in (x["old"].float(), x["adv"].float(), x["mask"]))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], device=device)
    ids = torch.tensor([0, 0, 1, 1], device=device)
    hidden = torch.randn(4, 6, 16, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(40, 16, generator=gen) * 0.3).to(device).requires_grad_()
    targets = torch.randint(0, 40, (4, 6), generator=gen).to(device)
    normalizers = [None, 7, torch.tensor(7.0), torch.tensor(7.0, device=device)]  # made before the checks
    item_counts = [37, torch.tensor(37, device=device)]  # (a host-to-device copy is a synchronisation)
    adapter = liger_adapter.LigerFusedLinearNGRPOLoss(loss_type="dapo")
    module = nk.NGRPOLoss(entropy_coef=0.01, validate=False)

    def policy_losses():
        for mode in MODES:
            for normalizer in normalizers:
                nk.ngrpo_policy_loss(logp, old, adv, mask, loss_agg_mode=mode, normalizer=normalizer,
                                     validate=False)[0].backward()

    def fused_losses():
        for normalizer in normalizers:
            nk.fused_linear_ngrpo_loss(hidden, weight, targets, mask, old, advantages=adv, normalizer=normalizer,
                                       entropy_coef=0.01, validate=False)[0].backward()
        nk.fused_linear_ngrpo_loss(hidden, weight, targets, mask, None, rewards=rewards, group_ids=ids,
                                   validate=False)[0].backward()
        module(hidden, weight, targets, mask, old, advantages=adv)[0].backward()
        for items in item_counts:
            adapter(hidden.reshape(-1, 16), weight, targets, mask.long(), adv, old_per_token_logps=old,
                    num_items_in_batch=items)[0].backward()

    def logprobs():
        lp, ent = nk.fused_linear_logprobs(hidden, weight, targets, return_entropy=True, validate=False)
        (lp.sum() + ent.sum()).backward()
        with torch.no_grad():
            nk.fused_linear_logprobs(hidden, weight, targets, validate=False)

    def advantages():
        nk.ngrpo_advantages(rewards, ids, validate=False)

    return {"policy_loss": policy_losses, "fused_loss": fused_losses, "logprobs": logprobs,
            "advantages": advantages}


def test_no_host_sync_without_validation(device, backend, gen, monkeypatch):
    """validate=False: no public op or adapter reads a tensor value back to the host, whatever form the
    normaliser takes. CUDA: torch's sync debug mode raises on any synchronising call. CPU: every way
    a tensor value reaches Python is patched to raise (the Triton interpreter itself reads its launch
    arguments on the host, so it is checked for the pure-PyTorch ops only)."""
    with nk.use_backend(backend):
        ops = _every_op(device, backend, gen)
        for op in ops.values():  # compile / warm up first
            op()

    from ngrpo_kernels import _library

    real_tolist = torch.Tensor.tolist

    def forbidden(*_a, **_k):
        raise AssertionError("host synchronisation in the loss path")

    def tolist(t):  # the one allowed read: the ops' float options, a CPU tensor built on the host by our wrapper
        if sys._getframe(1).f_code is _library._unpack.__code__ and t.device.type == "cpu":
            return real_tolist(t)
        return forbidden()

    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    else:
        for name in ("__bool__", "item", "__float__", "__int__", "__index__", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, forbidden)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    backends = [backend] + (["cpp"] if backend == "torch" and nk.cpp_available() else [])
    try:
        for b in backends:  # cpp: the CPU default of the fused loss
            with nk.use_backend(b):
                for name, op in ops.items():
                    if device.type == "cpu" and b == "triton" and name != "policy_loss":
                        continue
                    op()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)

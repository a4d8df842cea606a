"""The fused ops are differentiable once: any first-order use is exact (the loss squared, a product with
other terms), a second-order request (create_graph=True) raises instead of returning a graph-less
gradient."""

import contextlib

import pytest
import torch

import ngrpo_kernels as nk
from ngrpo_kernels.ops.fused_loss.naive import fused_linear_ngrpo_loss_naive
from ngrpo_kernels.ops.linear_logprobs.naive import linear_logprobs_naive
from ngrpo_kernels.ops.policy_loss.naive import policy_loss_naive


def _batch(gen, dtype=torch.float32):
    B, T, H, V = 3, 4, 16, 30
    return dict(x=torch.randn(B, T, H, generator=gen, dtype=dtype), w=torch.randn(V, H, generator=gen, dtype=dtype) * 0.3,
                t=torch.randint(0, V, (B, T), generator=gen), mask=torch.rand(B, T, generator=gen) < 0.8,
                old=-torch.rand(B, T, generator=gen, dtype=dtype) * 3, adv=torch.randn(B, generator=gen, dtype=dtype))


def _ops(b):
    """(ours, reference): scalar functions of (hidden, weight)."""
    def fused(fn):
        return lambda x, w: fn(x, w, b["t"], b["mask"], b["old"], advantages=b["adv"])[0]

    def logprobs(x, w):
        lp, ent = nk.fused_linear_logprobs(x, w, b["t"], return_entropy=True)
        return (lp * 0.3).sum() + ent.sum()

    def logprobs_ref(x, w):
        lp, ent = linear_logprobs_naive(x, w, b["t"])
        return (lp * 0.3).sum() + ent.sum()

    def policy(fn):
        def run(x, w):
            lp, _ = linear_logprobs_naive(x, w, b["t"].masked_fill(~b["mask"], -100))
            return fn(lp, b["old"], b["adv"], b["mask"])[0]
        return run

    return {"fused_loss": (fused(nk.fused_linear_ngrpo_loss), fused(fused_linear_ngrpo_loss_naive)),
            "logprobs": (logprobs, logprobs_ref),
            "policy_loss": (policy(nk.ngrpo_policy_loss), policy(policy_loss_naive))}


@pytest.mark.parametrize("op", ["fused_loss", "logprobs", "policy_loss"])
def test_nonlinear_use_is_exact_to_first_order(op, gen):
    b = _batch(gen, torch.float64)
    ours, ref = _ops({k: v.float() if v.is_floating_point() else v for k, v in b.items()})[op]
    _, ref = _ops(b)[op]
    grads = []
    for fn, dtype in ((ours, torch.float32), (ref, torch.float64)):
        x = b["x"].to(dtype).requires_grad_()
        w = b["w"].to(dtype).requires_grad_()
        y = fn(x, w)
        (y ** 2 + 3 * y).backward()
        grads.append((x.grad.double(), w.grad.double()))
    for g, want in zip(*grads):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("op", ["fused_loss", "logprobs", "policy_loss"])
def test_second_order_is_refused(op, gen):
    b = _batch(gen)
    ours, _ = _ops(b)[op]
    x = b["x"].clone().requires_grad_()
    w = b["w"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(ours(x, w), (x, w), create_graph=True)


@pytest.mark.parametrize("op", ["fused_loss", "logprobs"])
def test_the_reference_is_differentiable_twice(op, gen):
    """The REFERENCE backend's head ops run their backward on a graph of detached copies (in the inputs'
    precision under any autocast); a gradient penalty through them must still be plain autograd's."""
    b = _batch(gen, torch.float64)
    _, spec = _ops(b)[op]
    ours, _ = _ops({k: v.float() if v.is_floating_point() else v for k, v in b.items()})[op]
    results = []
    for fn, dtype, backend in ((ours, torch.float32, "reference"), (spec, torch.float64, None)):
        x = b["x"].to(dtype).requires_grad_()
        w = b["w"].to(dtype).requires_grad_()
        with nk.use_backend(backend) if backend else contextlib.nullcontext():
            gx, gw = torch.autograd.grad(fn(x, w), (x, w), create_graph=True)
            (gx.square().sum() + gw.square().sum()).backward()
        results.append((x.grad.double(), w.grad.double()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_reference_head_backward_twice_and_in_part():
    """The REFERENCE head ops' graph survives a retained backward (and only a retained one), gives only the
    gradients asked for, leaves its outputs' metrics out of the graph, and takes forward-mode AD."""
    gen = torch.Generator().manual_seed(3)
    b = _batch(gen)
    x, w = b["x"].clone().requires_grad_(), b["w"].clone()
    bias = torch.randn(w.shape[0], generator=gen, requires_grad=True)
    with nk.use_backend("reference"):
        loss, metrics = nk.fused_linear_ngrpo_loss(x, w, b["t"], b["mask"], b["old"], advantages=b["adv"], bias=bias)
    assert not any(v.requires_grad for v in metrics.values())
    first = torch.autograd.grad(loss, (x, bias), retain_graph=True)
    second = torch.autograd.grad(loss * 2, (x, bias))
    want = torch.autograd.grad(fused_linear_ngrpo_loss_naive(
        torch.where(b["mask"][..., None], x, 0), w, b["t"], b["mask"], b["old"], advantages=b["adv"], bias=bias)[0],
        (x, bias))
    for f, s, e in zip(first, second, want):
        torch.testing.assert_close(f, e)
        torch.testing.assert_close(s, 2 * e)
    with pytest.raises(RuntimeError, match="second time"):  # as plain autograd: the graph was not retained
        torch.autograd.grad(loss, (x,))
    # forward-mode AD (dual tensors) runs the specification as it is
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(b["x"])
    with fwAD.dual_level(), nk.use_backend("reference"):
        dual = fwAD.make_dual(b["x"].clone().requires_grad_(), tangent)
        jvp = fwAD.unpack_dual(nk.fused_linear_logprobs(dual, w, b["t"]).sum()).tangent
    x2 = b["x"].clone().requires_grad_()
    with nk.use_backend("reference"):
        (gx,) = torch.autograd.grad(nk.fused_linear_logprobs(x2, w, b["t"]).sum(), (x2,))
    torch.testing.assert_close(jvp, (gx * tangent).sum())


@pytest.mark.parametrize("op", ["fused_loss", "logprobs", "policy_loss"])
def test_training_after_an_inference_mode_call_with_the_same_options(op, gen):
    """An old-policy / reference pass under ``torch.inference_mode()`` and then a training call with the same
    options (the ops keep one tensor of float options per set of values): backward works and matches the
    reference."""
    b = _batch(gen)
    ours, ref = _ops(b)[op]
    with torch.inference_mode():
        ours(b["x"], b["w"])
    x, w = b["x"].clone().requires_grad_(), b["w"].clone().requires_grad_()
    ours(x, w).backward()
    xr, wr = b["x"].clone().requires_grad_(), b["w"].clone().requires_grad_()
    ref(xr, wr).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-5)

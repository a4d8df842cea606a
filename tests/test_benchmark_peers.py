"""The benchmarks compare like with like: at a tiny size every peer adapter in benchmarks/impls.py that runs
here gives the same loss and gradients (dX, dW; fwd+bwd cases) or log-probs (no-grad cases) as the float64
reference, on padded batches. On the CPU in float32; on a GPU (the "cuda" cases, which gpu_suite.sh runs)
in bf16, where the GPU-only peers (Cut Cross-Entropy, Liger's Triton loss, verl's Triton head) are checked.
Peers that need a missing package or compilation (torch.compile, Liger's compiled chunked loss, ours
compiled) are left out."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import impls  # noqa: E402
from ngrpo_kernels.ops.policy_loss.naive import policy_loss_naive  # noqa: E402

CASES = {"cpu": impls.Case(64, 32, 97, torch.float32, "cpu", sequences=4, padded=True),
         "cuda": impls.Case(256, 128, 1024, torch.bfloat16, "cuda", sequences=4, padded=True)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Tolerances: float32 against float64; bf16 inputs are the same values for everyone (made in float32, then
# rounded), but bf16 logits or gradients in a peer's pipeline cost up to ~1e-2 relative.
TOL = {"cpu": dict(loss=1e-4, lp=1e-4, grad=1e-4), "cuda": dict(loss=2e-2, lp=5e-2, grad=5e-2)}
SLOW = {"torch_compile", "liger", "ngrpo_compiled"}  # ours compiled: tests/test_compile.py


def _reference(case):
    x = impls.inputs(case)
    h = x["hidden"].double().requires_grad_()
    w = x["weight"].double().requires_grad_()
    logits = h @ w.T
    lp = torch.log_softmax(logits, -1).gather(-1, x["targets"][..., None])[..., 0]
    loss, _ = policy_loss_naive(lp, x["old"].double(), x["adv"].double(), x["mask"])
    loss.backward()
    return loss.detach(), lp.detach(), h.grad, w.grad


def _runnable(table, impl, case):
    """The peer's callable for the case, or skip the test with the reason it cannot run here."""
    try:
        return table[impl](case)
    except impls.Unavailable as why:
        pytest.skip(str(why))


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("impl", [k for k in impls.FUSED_LOSS if k not in SLOW and k != "gemm_floor"])
def test_fused_loss_peers_agree(impl, dev):
    case, tol = CASES[dev], TOL[dev]
    step = _runnable(impls.FUSED_LOSS, impl, case)
    loss = step()
    want_loss, _, want_dx, want_dw = _reference(case)
    torch.testing.assert_close(loss.double(), want_loss, atol=tol["loss"] * 0.1, rtol=tol["loss"])
    h, w = step.leaves
    assert _rel(h.grad, want_dx) < tol["grad"] and _rel(w.grad, want_dw) < tol["grad"]
    valid = impls.inputs(case)["mask"]
    assert (h.grad[~valid] == 0).all()  # padding gets no gradient


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("impl", [k for k in impls.LOGPROBS if k not in SLOW and k != "gemm_floor"])
def test_logprob_peers_agree(impl, dev):
    case, tol = CASES[dev], TOL[dev]
    valid = impls.inputs(case)["mask"]
    got = _runnable(impls.LOGPROBS, impl, case)().double()
    torch.testing.assert_close(got[valid], _reference(case)[1][valid], atol=tol["lp"], rtol=tol["lp"])

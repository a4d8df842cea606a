"""The benchmarks compare like with like: at a tiny size on the CPU, every peer adapter in benchmarks/impls.py
that runs here gives the same loss (fwd+bwd cases) or log-probs (no-grad cases) as the float64 reference.
Peers that need a GPU, a missing package, or a minute of compilation (torch.compile, Liger's compiled chunked
loss) are left out."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import impls  # noqa: E402
from ngrpo_kernels.ops.policy_loss.naive import policy_loss_naive  # noqa: E402

CASE = impls.Case(64, 32, 97, torch.float32, "cpu", sequences=4, padded=True)
SLOW = {"torch_compile", "liger"}


def _reference():
    x = impls.inputs(CASE)
    logits = x["hidden"].double() @ x["weight"].double().T
    lp = torch.log_softmax(logits, -1).gather(-1, x["targets"][..., None])[..., 0]
    loss, _ = policy_loss_naive(lp, x["old"].double(), x["adv"].double(), x["mask"])
    return loss, lp


def _runnable(table, impl):
    """The peer's callable for CASE, or skip the test with the reason it cannot run here."""
    try:
        return table[impl](CASE)
    except impls.Unavailable as why:
        pytest.skip(str(why))


@pytest.mark.parametrize("impl", [k for k in impls.FUSED_LOSS if k not in SLOW and k != "gemm_floor"])
def test_fused_loss_peers_agree(impl):
    loss = _runnable(impls.FUSED_LOSS, impl)()
    torch.testing.assert_close(loss.double(), _reference()[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", [k for k in impls.LOGPROBS if k not in SLOW and k != "gemm_floor"])
def test_logprob_peers_agree(impl):
    valid = impls.inputs(CASE)["mask"]
    got = _runnable(impls.LOGPROBS, impl)().double()
    torch.testing.assert_close(got[valid], _reference()[1][valid], atol=1e-4, rtol=1e-4)

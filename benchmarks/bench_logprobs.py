"""(2) No-grad log-prob pass (old / reference policy) from hidden states: 2*N*H*V FLOPs; the floor is
the one logits GEMM, timed before each round of every implementation."""

import pytest
import torch

from conftest import CUDA, DEVICE, run_benchmark
from impls import LOGPROBS, Case

if CUDA:
    CASES = [Case(N, 3584, 152064, torch.bfloat16, DEVICE) for N in (4096, 16384, 32768)]
    ROUNDS = 5
else:
    CASES = [Case(N, 512, 32768, torch.float32, DEVICE) for N in (512, 2048)]
    CASES += [Case(256, 128, 151936, torch.float32, DEVICE)]
    ROUNDS = 3


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
@pytest.mark.parametrize("impl", list(LOGPROBS))
def test_logprobs_no_grad(benchmark, case, impl):
    run_benchmark(benchmark, LOGPROBS[impl], case, op="logprobs_no_grad", impl=impl,
                  flops=2.0 * case.N * case.H * case.V, rounds=ROUNDS, floor=LOGPROBS["gemm_floor"],
                  extra=dict(N=case.N, H=case.H, V=case.V, dtype=str(case.dtype)))

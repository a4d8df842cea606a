"""(1) Fused NGRPO loss, forward + backward, from hidden states: every implementation, with the GEMM floor
(three matmuls of the same shapes, all N tokens) timed before each of its rounds. Useful FLOPs 6*n*H*V over
the n valid tokens; the "-padded" cases mask part of the tokens (response lengths uniform in [T/4, T]:
37.5 % in expectation, the case's own share in ``padding``), which implementations that skip masked tokens
(ours, and peers given their own way to: CCE's ignore_index, TRL's and verl's heads on ``h[mask]``) do not
pay for."""

import pytest
import torch

from conftest import CUDA, DEVICE, run_benchmark
from impls import FUSED_LOSS, Case, inputs

if CUDA:
    CASES = [Case(N, 3584, 152064, torch.bfloat16, DEVICE) for N in (4096, 16384, 32768)]
    CASES += [Case(16384, 3584, 152064, torch.bfloat16, DEVICE, sequences=16, padded=True)]  # RL padding
    CASES += [Case(16384, 4096, 128256, torch.bfloat16, DEVICE)]  # Llama-3-8B head, for published figures
    ROUNDS = 5
else:
    CASES = [Case(N, 512, 32768, torch.float32, DEVICE) for N in (512, 1024, 2048)]
    CASES += [Case(2048, 512, 32768, torch.float32, DEVICE, sequences=16, padded=True)]  # RL padding
    CASES += [Case(256, 128, 151936, torch.float32, DEVICE)]  # the tiny trainer's head (Qwen vocabulary)
    ROUNDS = 3


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
@pytest.mark.parametrize("impl", list(FUSED_LOSS))
def test_fused_loss(benchmark, case, impl):
    valid = int(inputs(case)["mask"].sum())
    run_benchmark(benchmark, FUSED_LOSS[impl], case, op="fused_loss", impl=impl, flops=6.0 * valid * case.H * case.V,
                  rounds=ROUNDS, floor=FUSED_LOSS["gemm_floor"],
                  extra=dict(N=case.N, H=case.H, V=case.V, dtype=str(case.dtype), padding=1 - valid / case.N))

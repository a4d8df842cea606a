"""(1) Fused NGRPO loss, forward + backward, from hidden states: every implementation, the GEMM floor
(three matmuls of the same shapes, all N tokens) measured in the same run. 6*N*H*V FLOPs for all-valid
batches; the "-padded" cases mask about 37 % of the tokens (response lengths uniform in [T/4, T]), which
implementations that skip masked tokens do not pay for."""

import pytest
import torch

from conftest import CUDA, DEVICE, run_benchmark
from impls import FUSED_LOSS, Case

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
    run_benchmark(benchmark, FUSED_LOSS[impl], case, op="fused_loss", impl=impl, flops=6.0 * case.N * case.H * case.V,
                  rounds=ROUNDS, extra=dict(N=case.N, H=case.H, V=case.V, dtype=str(case.dtype)))

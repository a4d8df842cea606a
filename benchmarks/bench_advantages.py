"""(3) Group advantages at large B (shuffled groups of 8)."""

import pytest

from conftest import DEVICE, run_benchmark
from impls import ADVANTAGES, AdvCase

CASES = [AdvCase(B, 8, DEVICE) for B in (4096, 65536, 1048576)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
@pytest.mark.parametrize("impl", list(ADVANTAGES))
def test_advantages(benchmark, case, impl):
    run_benchmark(benchmark, ADVANTAGES[impl], case, op="advantages", impl=impl, flops=None, rounds=5,
                  extra=dict(N=case.B))

"""Device-side compaction of the tokens that count, with no host synchronisation.

``compact(valid)`` returns ``order`` (int64 [N]: the valid tokens' indices in their original order,
then the others) and ``count`` (int32 [1], on the device). The Triton schedules gather hidden rows in
this order chunk by chunk and hand ``count`` to their kernels, which stop at it: padded and ignored
tokens cost no GEMM FLOPs and are never read, so they may hold anything, NaN included. Cost: a
cumulative sum and a scatter over N int32 values, microseconds.
"""

from __future__ import annotations

import torch


def compact(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = valid.reshape(-1)
    n = v.numel()
    positions = torch.arange(n, device=v.device, dtype=torch.int64)
    before_valid = torch.cumsum(v, 0, dtype=torch.int64)      # valid tokens up to and including i
    count = before_valid[-1:]
    dest = torch.where(v, before_valid - 1, count + positions - before_valid)
    order = torch.empty_like(positions).scatter_(0, dest, positions)
    return order, count.to(torch.int32)

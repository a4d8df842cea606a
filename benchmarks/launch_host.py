"""Host time of the head passes with Triton's real launch path, on a machine with no GPU: Triton's generic
launch of every kernel against ``ngrpo_kernels.ops.launcher``'s direct one (docs/kernels.md).

    python benchmarks/launch_host.py

The kernels compile for sm_90a and Triton binds, specialises and looks them up as on a GPU; the stand-in
driver (``stand_in_driver.py``) only replaces the binary's load and the final C launch, and the tensors are
on the CPU, so torch's own operations run on it too (their CUDA launch costs are not here). Prints the
median and the minimum of 300 calls of each implementation, called below the public op, both ways, and the
host time of one persistent-GEMM launch alone. This CPU's figures, not a GPU host's.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("launch_host.py measures compiled launches: run it without TRITON_INTERPRET=1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stand_in_driver  # noqa: E402
from host_timing import host_us  # noqa: E402

stand_in_driver.install()

import torch  # noqa: E402

from ngrpo_kernels.backend import Backend  # noqa: E402
from ngrpo_kernels.ops import compaction, fused_loss, head_schedule, launcher  # noqa: E402
from ngrpo_kernels.ops import persistent_gemm as pg  # noqa: E402
from ngrpo_kernels.ops.linear_logprobs import triton_impl  # noqa: E402
from ngrpo_kernels.variants import AggMode  # noqa: E402


def _compaction_with_results():
    """The compaction launches as usual (and is timed), but no kernel runs here: its order and count are then
    filled from the PyTorch reference, computed once per input (a copy of a few hundred indices per call);
    the rows it would gather are left as they are (host time only)."""
    real, cache = head_schedule.compact_and_gather, {}

    def compact(values, ignore, x, out):
        order, count, gathered = real(values, ignore, x, out)
        key = (values.data_ptr(), tuple(values.shape), ignore)
        if key not in cache:
            cache[key] = compaction.compact_torch(values, ignore)
        order.copy_(cache[key][0])
        count.copy_(cache[key][1])
        return order, count, gathered

    head_schedule.compact_and_gather = compact


def main() -> None:
    _compaction_with_results()
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 64, 256, 1024
    x = torch.randn(B, T, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) * 0.05).bfloat16()
    t = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    old = -torch.rand(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    x2, t2 = x.reshape(-1, H), t.reshape(-1)
    parts = [torch.empty(pg.num_vocab_tiles(V, x.dtype, x.device), B * T) for _ in range(3)]

    calls = {
        "no-grad log-probs (implementation)": lambda: triton_impl.forward(
            x2, w, None, t2, inv_temp=1.0, ignore_index=-100, entropy=False),
        "fused loss forward, gradients formed (implementation)": lambda: fused_loss.forward(
            Backend.TRITON, x, w, t, mask, old, adv, bias=None, temperature=1.0, eps_neg=0.16, eps_pos=0.24,
            clip_ratio_c=None, ref_logprobs=None, beta=0.0, entropy_coef=0.0, loss_agg_mode=AggMode.TOKEN_MEAN,
            normalizer=None, length_budget=None, rollout_is_weights=None, workspace_bytes=None,
            skip_zero_advantage=False, need_dx=True, need_dw=True, need_db=False),
        "one logits GEMM launch (pg.logits)": lambda: pg.logits(
            x2, w, bias=None, inv_temp=1.0, count=None, partials=parts, entropy=True),
    }
    for fn in calls.values():  # compile every specialisation, and give each launcher its first launch
        fn()
        fn()
    stand_in_driver.Recorder.enabled = False
    for name, fn in calls.items():
        with launcher.generic_launch(True):
            generic = host_us(fn)
        direct = host_us(fn)
        print(f"{name}: host us, median (min) of 300: Triton's launch path {generic[0]:.0f} ({generic[1]:.0f}), "
              f"direct launches {direct[0]:.0f} ({direct[1]:.0f})")


if __name__ == "__main__":
    main()

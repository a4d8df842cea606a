"""How many device operations the head passes issue before their first GEMM: the host work an isolated call
pays before the GPU has anything large to do (docs/kernels.md, "Measured against the targets").

    python benchmarks/launch_count.py [--host]

Runs on the CPU under the Triton interpreter at a tiny shape and calls the Triton implementations directly
(below the custom-op layer, whose dispatch is not counted). Counts ATen operations that launch work (views,
allocations and the interpreter's own argument copies excluded) and Triton kernel launches, up to the first
persistent-GEMM launch and over the whole call.

``--host`` also times the Python around the launches (every Triton launch a no-op, the compaction's result
cached, CPU tensors; median of 300 calls, ``host_timing.py``): the public op, its implementation called
directly, and the public op routed through the custom op (torch.compile's route). This CPU's figures, not a
GPU host's: a GPU adds its own launch and allocation costs (``gpu_head.py --diagnose`` measures those).
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import ngrpo_kernels as nk  # noqa: E402
from ngrpo_kernels import _library  # noqa: E402
from ngrpo_kernels.backend import Backend  # noqa: E402
from ngrpo_kernels.ops import head_schedule  # noqa: E402
from ngrpo_kernels.ops import fused_loss  # noqa: E402
from ngrpo_kernels.ops import persistent_gemm as pg  # noqa: E402
from ngrpo_kernels.ops.linear_logprobs import triton_impl  # noqa: E402
from ngrpo_kernels.variants import AggMode  # noqa: E402

from host_timing import host_us  # noqa: E402

NOT_LAUNCHES = {"view", "reshape", "_reshape_alias", "as_strided", "slice", "select", "expand", "alias", "unsqueeze",
                "squeeze", "detach", "t", "transpose", "permute", "unbind", "split", "lift_fresh", "lift_fresh_copy",
                "resolve_conj", "resolve_neg", "_unsafe_view", "set_", "copy_", "new_empty"}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten, self.triton = 0, 0
        self.before_gemm = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NOT_LAUNCHES and not name.startswith("empty"):
            self.aten += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> Counter:
    fn()  # compile / warm up
    counter = Counter()
    real_launch, real_run = pg._launch, InterpretedFunction.run

    def launch(*a, **k):
        if counter.before_gemm is None:
            counter.before_gemm = (counter.aten, counter.triton)
        return real_launch(*a, **k)

    def run(self, *a, **k):
        counter.triton += 1
        return real_run(self, *a, **k)

    pg._launch, InterpretedFunction.run = launch, run
    try:
        with counter:
            fn()
    finally:
        pg._launch, InterpretedFunction.run = real_launch, real_run
    return counter


def main() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 16, 32, 100
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.2
    t = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    old = -torch.rand(B, T, generator=g)
    adv = torch.randn(B, generator=g)

    def no_grad():
        triton_impl.forward(x.reshape(-1, H), w, None, t.reshape(-1), inv_temp=1.0, ignore_index=-100, entropy=False)

    def loss():
        fused_loss.forward(Backend.TRITON, x, w, t, mask, old, adv, bias=None, temperature=1.0, eps_neg=0.16,
                           eps_pos=0.24, clip_ratio_c=None, ref_logprobs=None, beta=0.0, entropy_coef=0.0,
                           loss_agg_mode=AggMode.TOKEN_MEAN, normalizer=None, length_budget=None,
                           rollout_is_weights=None, workspace_bytes=None, skip_zero_advantage=False, need_dx=True,
                           need_dw=True, need_db=False)

    for name, fn in (("no-grad log-probs", no_grad), ("fused loss (forward, gradients formed)", loss)):
        c = count(fn)
        aten, tri = c.before_gemm
        print(f"{name}: before the first GEMM {aten} ATen + {tri} Triton launches; "
              f"whole call {c.aten} ATen + {c.triton} Triton")
    if "--host" in sys.argv[1:]:
        host_times(x, w, t, mask, old, adv, no_grad, loss)


def host_times(x, w, t, mask, old, adv, no_grad, loss) -> None:
    real_compact, real_run = head_schedule.compact_and_gather, InterpretedFunction.run
    cache = {}

    def cached_compact(values, ignore, x, out):  # the real result once per input, then no kernel at all
        key = (values.data_ptr(), values.shape, ignore)
        if key not in cache:
            cache[key] = real_compact(values, ignore, x, out)
        return cache[key]

    def public_no_grad():
        with torch.no_grad():
            nk.fused_linear_logprobs(x, w, t, validate=False)

    def public_loss():
        h = x.detach().requires_grad_()
        ws = w.detach().requires_grad_()
        value, _ = nk.fused_linear_ngrpo_loss(h, ws, t, mask, old, advantages=adv, validate=False)
        value.backward()

    head_schedule.compact_and_gather = cached_compact
    for fn in (no_grad, loss, public_no_grad, public_loss):
        fn()  # compile under the interpreter and fill the cache before the launches become no-ops
    InterpretedFunction.run = lambda self, *a, **k: None
    try:
        with nk.use_backend("triton"):
            for name, impl, public in (("no-grad log-probs", no_grad, public_no_grad),
                                       ("fused loss forward + backward", loss, public_loss)):
                direct = host_us(impl)[0]
                eager = host_us(public)[0]
                with _library.dispatcher_route():
                    through_op = host_us(public)[0]
                print(f"{name}: host us around the launches (Triton stubbed): public op {eager:.0f}, "
                      f"implementation alone {direct:.0f}{' (forward only)' if impl is loss else ''}, "
                      f"public op through the custom op {through_op:.0f}")
    finally:
        head_schedule.compact_and_gather, InterpretedFunction.run = real_compact, real_run


if __name__ == "__main__":
    main()

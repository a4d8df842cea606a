"""``ops/launcher.py``: after the first launch of a specialisation, our kernels skip Triton's generic launch
path. These tests check that the kernel launched is always the one Triton would pick, with the same
arguments: on this CPU through Triton's real launch path with a stand-in driver (only the binary's load and
the C launch replaced, ``benchmarks/stand_in_driver.py``), on a GPU by comparing results bit for bit."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_cheap_specialisation_key_is_at_least_as_fine_as_tritons():
    """Arguments ``_spec`` calls alike, Triton specialises alike (every flag combination of a parameter)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from ngrpo_kernels.ops import launcher

    if launcher.native_specialize_impl is None:
        pytest.skip("this Triton has no native_specialize_impl: every launch takes Triton's path")
    backend = make_backend(GPUTarget("cuda", 90, 32))
    base = torch.empty(256, dtype=torch.float32)
    values = [base, base[1:], base[4:], base[2:], base.view(torch.bfloat16)[1:], base.view(torch.bfloat16)[8:],
              base.view(torch.int32), base.to(torch.float16), base.bool(), base.to(torch.int64)[3:],
              torch.nn.Parameter(base[1:], requires_grad=False), torch.nn.Parameter(base, requires_grad=False)]
    values += [-2**63 - 1, -2**63, -2**31 - 16, -2**31 - 1, -2**31, -17, -16, -1, 0, 1, 2, 15, 16, 17, 32, 2**31 - 16,
               2**31 - 1, 2**31, 2**31 + 16, 2**63 - 16, 2**63, 2**63 + 16, 2**64 - 16]
    values += [0.0, 1.0, -2.5, 1e300, True, False, None]
    for flags in [(False, True, True), (False, True, False), (False, False, True), (True, True, True)]:
        seen = {}
        for v in values:
            key = launcher._spec(v)
            assert key is not NotImplemented, v
            try:
                spec = launcher.native_specialize_impl(backend, v, *flags)
            except Exception:  # Triton rejects it (an integer past u64): no launch to mix up
                continue
            if key in seen:
                assert seen[key][1] == spec, (flags, seen[key][0], v, seen[key][1], spec)
            seen.setdefault(key, (v, spec))


STAND_IN = textwrap.dedent('''
    import sys
    sys.path.insert(0, "benchmarks")
    import stand_in_driver as sd
    sd.install()
    import torch
    from ngrpo_kernels.ops import compaction, launcher
    from ngrpo_kernels.ops.persistent_gemm.kernel import persistent_gemm_kernel

    routes = []

    def counted(fn):
        real = fn.run
        def run(*a, **k):
            routes.append("triton")
            return real(*a, **k)
        fn.run = run

    def normal(call):  # the launch metadata is a fresh LazyDict each launch: compare its contents
        return tuple(x.data if isinstance(x, type(call[6])) and hasattr(x, "data") else x for x in call)

    def both(fn, grid, *args, **kwargs):
        """One launch by Triton, one by the launcher: the launcher's must go direct and hand the CUDA
        launcher exactly what Triton's did."""
        picked = fn[grid](*args, **kwargs)
        generic = sd.Recorder.calls[-1]
        before = len(routes)
        launched = launcher.direct(fn)[grid](*args, **kwargs)
        went = routes[before:]
        assert launched is picked  # the very compiled kernel Triton looked up
        assert normal(sd.Recorder.calls[-1]) == normal(generic), (sd.Recorder.calls[-1], generic)
        return picked, went  # the compiled kernel, the route of the launcher's launch

    k = compaction._compact_one_pass
    counted(k)
    v = torch.ones(4096, dtype=torch.int64)
    order = torch.empty(4096 + 8, dtype=torch.int64)
    count = torch.empty(4, dtype=torch.int32)
    launcher.direct(k)[(1,)](v, order, count, 100, 0, BLOCK=1024, SCAN=1, num_warps=4)  # first: Triton's
    kernels = {}
    for n, ign, o, c in [(100, 0, order, count), (96, 0, order, count), (1, 0, order, count), (100, -100, order, count),
                         (100, 0, order[1:], count), (100, 0, order, count[1:]), (100, 16, order[2:], count[3:])]:
        for _ in range(2):  # the second launch of a key must go direct
            h, went = both(k, (4,), v, o, c, n, ign, BLOCK=1024, SCAN=1, num_warps=4)
        assert went == [], (n, ign, went)
        kernels[(n % 16 == 0, n == 1, ign % 16 == 0, o.data_ptr() % 16 == 0, c.data_ptr() % 16 == 0)] = h
    assert len(set(map(id, kernels.values()))) == len(kernels)  # every specialisation its own kernel

    # a changed launch option or constexpr is another kernel, launched as Triton would
    h4, _ = both(k, (4,), v, order, count, 100, 0, BLOCK=1024, SCAN=1, num_warps=4)
    h8, _ = both(k, (4,), v, order, count, 100, 0, BLOCK=1024, SCAN=1, num_warps=8)
    h8b, went = both(k, (4,), v, order, count, 100, 0, BLOCK=1024, SCAN=1, num_warps=8)
    assert h4 != h8 and h8 == h8b and went == []
    # a constexpr given as True after 1 (equal in Python; Triton's lookup takes them as one key, the
    # launcher's as two): either way the kernel Triton picks (checked inside both())
    both(k, (4,), v, order, count, 100, 0, BLOCK=1024, SCAN=1, num_warps=4)
    both(k, (4,), v, order, count, 100, 0, BLOCK=1024, SCAN=True, num_warps=4)
    both(k, (4,), v, order, count, 100, 0, BLOCK=1024, SCAN=True, num_warps=4)
    with launcher.generic_launch(True):
        before = len(routes)
        launcher.direct(k)[(4,)](v, order, count, 100, 0, BLOCK=1024, SCAN=1, num_warps=4)
        assert routes[before:] == ["triton"]

    # the persistent GEMM: 19 arguments, 21 constexprs, the float scalar, the None-free call of the logits pass
    g = persistent_gemm_kernel
    counted(g)
    a = torch.empty(512, 256, dtype=torch.bfloat16)
    b = torch.empty(384, 256, dtype=torch.bfloat16)
    parts = torch.empty(3, 6, 512, dtype=torch.float32)
    cnt = torch.empty(1, dtype=torch.int32)
    args = (a, b, a, a, a, parts[0], parts[1], parts[2], cnt, 512, 384, 256, 0, 256, 256, 256, 512, 0, 0.5)
    kw = dict(EPILOGUE=0, A_T=False, B_T=True, LIMIT_M=True, LIMIT_K=False, INIT=False, STORE_Z=False, HAS_BIAS=False,
              ENTROPY=True, USE_TMA=True, DOT_FP32=False, PRECISION="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
              GROUP_M=8, NUM_SMS=132, SPLIT_K=1, FLATTEN=True, TMA_STORE=True, SCALED=False, num_warps=8,
              num_stages=3)
    launcher.direct(g)[(132,)](*args, **kw)
    for _ in range(2):
        h1, went = both(g, (132,), *args, **kw)
    assert went == []
    shifted = (a, b, a, a, a, parts[0], parts[1], parts[2], cnt, 512, 384, 256, 128, 256, 256, 256, 512, 0, 1.0)
    for _ in range(2):  # row0 = 128 (not 0) and inv_temp = 1.0: still a float, the same binary
        h2, went = both(g, (132,), *shifted, **kw)
    assert went == [] and h2 == h1
    print("OK", len(sd.Recorder.calls))
''')


def test_direct_launches_hand_the_launcher_what_tritons_would():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", STAND_IN], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on the CPU the interpreter takes Triton's path")
def test_direct_and_generic_launches_agree_bit_for_bit_on_a_gpu():
    import ngrpo_kernels as nk
    from ngrpo_kernels.ops import launcher
    from ngrpo_kernels.ops.persistent_gemm.kernel import persistent_gemm_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 700, 512, device="cuda", generator=g).bfloat16()
    w = (torch.randn(5000, 512, device="cuda", generator=g) * 0.05).bfloat16()
    t = torch.randint(0, 5000, (3, 700), device="cuda", generator=g)
    mask = torch.rand(3, 700, device="cuda", generator=g) < 0.6
    old = -torch.rand(3, 700, device="cuda", generator=g)
    adv = torch.randn(3, device="cuda", generator=g)

    def run():
        lp = nk.fused_linear_logprobs(x, w, t, validate=False)
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        loss, _ = nk.fused_linear_ngrpo_loss(xs, ws, t, mask, old, advantages=adv, validate=False)
        loss.backward()
        return lp, loss.detach(), xs.grad, ws.grad

    run()  # every specialisation seen once: the calls below go direct
    gemm = persistent_gemm_kernel
    real, through_triton = gemm.run, []
    gemm.run = lambda *a, **k: through_triton.append(1) or real(*a, **k)
    try:
        direct = [run() for _ in range(2)]
        assert not through_triton, "the direct route was not taken"
        with launcher.generic_launch(True):
            generic = run()
        assert through_triton
    finally:
        del gemm.run  # the class's method again
    for d in direct:
        for a, b in zip(d, generic):
            assert torch.equal(a, b)


def test_launch_host_script_times_both_routes():
    """benchmarks/launch_host.py (the host-time figures of docs/kernels.md) runs and reports both routes for
    each of its three calls."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "benchmarks/launch_host.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "Triton's launch path" in line and "direct launches" in line]
    assert len(lines) == 3, proc.stdout

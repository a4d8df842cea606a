"""Every constexpr combination the GPU path can launch compiles for sm_90a (H100) on this CPU.

The interpreter runs kernels as Python and accepts code the compiler rejects (types, shapes of scalar
branches); this catches that class of error without a GPU. Compiled in a subprocess because the test
session runs with TRITON_INTERPRET=1."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import itertools
    from ngrpo_kernels import hopper_report as hr
    from ngrpo_kernels.ops.advantages.triton_impl import _group_advantages_kernel
    from ngrpo_kernels.ops.fused_loss.row_triton import _loss_rows_kernel
    from ngrpo_kernels.ops.linear_logprobs import triton_impl as ll
    from ngrpo_kernels.ops.policy_loss.triton_impl import _policy_loss_kernel, stat_constexprs
    from ngrpo_kernels.variants import NUM_STATS

    def compile_with(name, fn, flags, warps, stages):
        base = next(c for c in hr._cases() if c[0] == name)
        const = dict(base[5]); const.update(flags)
        sig = dict(base[4]); sig.update({k: "constexpr" for k in const})
        hr._compile(fn, sig, const, warps, stages)

    n = 0
    for adv_tok, ref, ent, isw, dual in itertools.product([False, True], repeat=5):
        compile_with("policy_loss", _policy_loss_kernel, dict(ADV_PER_TOKEN=adv_tok, HAS_REF=ref, HAS_ENT=ent,
                     HAS_ISW=isw, DUAL_CLIP=dual, GRAD_LP=True, GRAD_ENT=ent), 4, 1); n += 1
    for bias, ref, isw, dual, on_policy, grad in itertools.product([False, True], repeat=6):
        compile_with("loss_rows", _loss_rows_kernel, dict(HAS_BIAS=bias, HAS_REF=ref, HAS_ISW=isw, DUAL_CLIP=dual,
                     ON_POLICY=on_policy, NEED_GRAD=grad), 8, 1); n += 1
    for bias, entropy in itertools.product([False, True], repeat=2):
        compile_with("lse_forward", ll._lse_forward_kernel, dict(HAS_BIAS=bias, ENTROPY=entropy), 8, 3); n += 1
    for bias, g_ent, atomic in itertools.product([False, True], repeat=3):
        compile_with("dlogits", ll._dlogits_kernel, dict(HAS_BIAS=bias, HAS_G_ENT=g_ent, ATOMIC=atomic,
                     NEED_DX=atomic, NEED_DW=atomic, NEED_DB=atomic and bias), 8, 3); n += 1
    for unbiased, use_std in itertools.product([False, True], repeat=2):
        compile_with("group_advantages", _group_advantages_kernel, dict(UNBIASED=unbiased, USE_STD=use_std), 1, 1)
        n += 1
    print("compiled", n)
''')


def test_every_gpu_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 112" in proc.stdout  # 32 + 64 + 4 + 8 + 4 variants

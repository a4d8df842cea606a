"""Every constexpr combination the GPU path can launch compiles on this CPU (sm_90a, H100/H200).

The interpreter runs kernels as Python and accepts code the compiler rejects (types, shapes of scalar
branches); this catches that class of error without a GPU. ``hopper_report`` (tested in
test_linear_logprobs.py) covers the persistent GEMM's half-precision variants with their resource
checks; here: every flag combination of the row kernels, and the float32 GEMM variants. Compiled in a
subprocess because the test session runs with TRITON_INTERPRET=1."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import itertools
    from ngrpo_kernels import hopper_report as hr
    from ngrpo_kernels.ops.persistent_gemm import configs
    from ngrpo_kernels.ops.persistent_gemm.kernel import persistent_gemm_kernel

    cases = {c[0]: c for c in hr._cases()}

    def compile_with(name, flags, types=None):
        base = cases[name]
        const = dict(base[5]); const.update(flags)
        sig = dict(base[4]); sig.update(types or {}); sig.update({k: "constexpr" for k in const})
        hr._compile(base[3], sig, const, base[6], base[7])

    n = 0
    for adv_tok, ref, ent, isw, dual in itertools.product([False, True], repeat=5):
        compile_with("policy_loss", dict(ADV_PER_TOKEN=adv_tok, HAS_REF=ref, HAS_ENT=ent, HAS_ISW=isw,
                                         DUAL_CLIP=dual, GRAD_LP=True, GRAD_ENT=ent)); n += 1
    for bias, ref, isw, dual, on_policy in itertools.product([False, True], repeat=5):
        compile_with("loss_tokens", dict(HAS_BIAS=bias, HAS_REF=ref, HAS_ISW=isw, DUAL_CLIP=dual,
                                         ON_POLICY=on_policy)); n += 1
    for dt, (bias, entropy) in itertools.product(["bf16", "fp16", "fp32"], itertools.product([False, True], repeat=2)):
        compile_with("logprobs_rows", dict(HAS_BIAS=bias, ENTROPY=entropy),
                     dict(XC="*" + dt, W="*" + dt, BIAS="*" + dt)); n += 1
    for (z, dz), (shift, g_h, tail) in itertools.product(
            [("fp16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")], itertools.product([False, True], repeat=3)):
        compile_with("dlogits", dict(SLICE_SHIFT=shift, HAS_G_H=g_h, ZERO_TAIL=tail), dict(Z="*" + z, DZ="*" + dz))
        n += 1
    for dt, splits in itertools.product(["bf16", "fp16"], [1, 2]):
        compile_with("dx_finish", dict(SPLITS=splits), dict(DX="*" + dt)); n += 1
    for unbiased, use_std in itertools.product([False, True], repeat=2):
        compile_with("group_advantages", dict(UNBIASED=unbiased, USE_STD=use_std)); n += 1
    # float32 inputs: the logits GEMM (exact fp32 products, pointer loads); dX / dW are cuBLAS.
    cfg = configs.FLOAT32
    for label, role, ptrs, const in hr.gemm_variants("fp32"):
        if role != "logits":
            continue
        const = dict(const, USE_TMA=False, DOT_FP32=False, PRECISION="ieee", BLOCK_M=cfg.block_m,
                     BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, NUM_SMS=132, FLATTEN=cfg.flatten,
                     TMA_STORE=cfg.tma_store)
        sig = dict(hr.GEMM_SIGNATURE, **dict(ptrs, C="*fp32"))
        sig.update({k: "constexpr" for k in const})
        hr._inspect("g", label, True, hr._compile(persistent_gemm_kernel, sig, const, cfg.num_warps, cfg.num_stages))
        n += 1
    # The Hopper logits GEMMs with TMA loads and pointer stores of the logits (GemmConfig.tma_store=False,
    # timed against the TMA stores by gpu_head.py): they compile and spill nothing.
    for case in hr._cases():
        if (case[0] == "persistent_gemm" and case[1].startswith("bf16 logits") and case[8] == 90
                and ("store=1" in case[1] or "shifted" in case[1])):
            const = dict(case[5], TMA_STORE=False)
            sig = dict(case[4])
            row = hr._inspect("g", case[1], True, hr._compile(case[3], sig, const, case[6], case[7]))
            assert row.spill_bytes == 0 and row.hgmma > 0, row
            n += 1
    # ... and with the logits stored a statistics slice per TMA store (GemmConfig.store_halves): 180 KB of
    # shared memory (one 32 KB staging buffer instead of 16 KB), no spills.
    for case in hr._cases():
        if case[0] == "persistent_gemm" and case[1].startswith(("bf16 logits", "fp16 logits")) and case[8] == 90 \
                and "store=1" in case[1]:
            const = dict(case[5], STORE_HALF=True)
            sig = dict(case[4], STORE_HALF="constexpr")
            row = hr._inspect("g", case[1], True, hr._compile(case[3], sig, const, case[6], case[7]))
            assert not row.problems(), row
            n += 1
    # The warp-specialised candidates (GemmConfig.warp_specialize): the loop is really specialised (a
    # ttg.warp_specialize op: one producer and two consumer warpgroups, 384 threads, setmaxnreg), with HGMMA
    # and TMA, no spills, within the shared memory. One variant per epilogue (dX also scaled); both dtypes' dW
    # accumulation; the statistics-only variant both as a candidate (3 stages) and as shipped (4 stages);
    # the ones storing logits (from registers) with 3 and with 4 stages.
    wanted = {"bf16 logits stats bias=1 entropy=1 store=1", "bf16 logits stats bias=0 entropy=0 store=0",
              "bf16 logits shifted bias=1", "bf16 dX split-K 1", "bf16 dW accumulate",
              "bf16 dW init in the weight's dtype scaled", "fp16 dW accumulate scaled",
              "fp16 logits stats bias=0 entropy=1 store=1"}
    for case in hr._gemm_cases(candidates=True):
        if not case[5].get("WARP_SPEC") or not any(case[1].startswith(w + " ") for w in wanted):
            continue
        compiled = hr._compile(*case[3:9])
        row = hr._inspect("g", case[1], True, compiled, tma_expected=True, ws_expected=True)
        assert compiled.metadata.num_warps == 12 and not row.problems(), row
        n += 1
    print("compiled", n)
''')


def test_every_gpu_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 32 + 32 + 12 + 24 + 4 + 4 + 10 + 6 + 8 + 12 variants (the last: 9 warp-specialised candidates, the two
    # storing logits also with 4 stages, and the shipped warp-specialised statistics-only GEMM)
    assert "compiled 144" in proc.stdout

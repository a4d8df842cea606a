"""Compile every shipped kernel configuration for the H100 (sm_90a) on this machine, no GPU needed.

    python -m ngrpo_kernels.hopper_report [--candidates]

Prints one row per (kernel, config): registers per thread, spill bytes (from ptxas), shared memory, whether
the kernel is persistent (grid = number of SMs, by design), whether its machine code uses the tensor memory
accelerator (TMA loads ``UTMALDG`` / stores ``UTMASTG`` found in the SASS), and the count of Hopper
warpgroup MMA instructions (HGMMA) versus the older HMMA. The Ampere/Ada variant of the head GEMM (pointer
loads) is compiled for sm_80 and must show HMMA instead. The shipped statistics-only logits GEMM is
warp-specialised (``configs.HOPPER_WS_STATS``) and must show the specialisation (column WS);
``--candidates`` adds the other warp-specialised configurations (``GemmConfig.warp_specialize``, timed and
not shipped), which must show it too. Exits non-zero if a GEMM-class kernel lacks its matrix instructions,
spills, or needs more shared memory than an SM has, or if a Hopper GEMM that should use TMA does not. Must
run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024}  # per block, opt-in maximum (H100, A100)


@dataclass
class Row:
    kernel: str
    config: str
    gemm: bool
    registers: int
    spill_bytes: int
    shared_bytes: int
    hgmma: int
    hmma: int
    arch: int = 90
    persistent: bool = False
    tma_expected: bool = False
    tma_ops: int = 0
    ws_expected: bool = False  # a warp-specialised candidate (GemmConfig.warp_specialize)
    specialised: bool = False  # a ttg.warp_specialize op in the TTGIR and setmaxnreg in the PTX

    def problems(self) -> list[str]:
        out = []
        if self.gemm and self.arch >= 90 and self.hgmma == 0:
            out.append("no HGMMA (wgmma) instructions")
        if self.gemm and self.arch < 90 and self.hmma == 0:
            out.append("no HMMA instructions")
        if self.tma_expected and self.tma_ops == 0:
            out.append("no TMA instructions")
        if self.ws_expected and not self.specialised:
            out.append("not warp-specialised")
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes")
        if self.shared_bytes > SHARED_BYTES[self.arch]:
            out.append(f"shared memory {self.shared_bytes} > {SHARED_BYTES[self.arch]}")
        return out


def _nvidia_bin(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


# What the JIT would see at the Qwen2.5 / Llama head shapes: every pointer 16-byte aligned, and the
# hidden and vocabulary sizes and leading dimensions multiples of 16. Without these hints the compiler
# cannot vectorise loads and the report would describe code that never runs.
_DIVISIBLE_INTS = {"H", "V", "M", "N", "K", "n", "lda", "ldb", "ldc", "ld_part", "ld_split", "ldz"}


def _compile(fn, signature, constexprs, num_warps, num_stages, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # constexprs with a default that the caller leaves out take it, as a launch would
    missing = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default and p.name not in signature}
    signature = {**signature, **{name: "constexpr" for name in missing}}
    constexprs = {**missing, **constexprs}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
             if ty.startswith("*") or name in _DIVISIBLE_INTS}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _inspect(kernel, config, gemm, compiled, arch=90, persistent=False, tma_expected=False, ws_expected=False) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        cubin = Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        ptxas = _nvidia_bin("ptxas-blackwell")
        if not ptxas.exists():
            ptxas = _nvidia_bin("ptxas")
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        info = subprocess.run([str(ptxas), "-v", f"-arch={target}", str(ptx), "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(_nvidia_bin("cuobjdump")), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)]
    return Row(kernel, config, gemm, int(regs.group(1)) if regs else -1, sum(spill),
               int(compiled.metadata.shared), len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass)),
               arch=arch, persistent=persistent, tma_expected=tma_expected,
               tma_ops=len(re.findall(r"\bUTMA(?:LDG|STG)\b", sass)), ws_expected=ws_expected,
               specialised="ttg.warp_specialize" in compiled.asm["ttgir"] and "setmaxnreg" in compiled.asm["ptx"])


GEMM_SIGNATURE = {"A": "*bf16", "B": "*bf16", "C": "*fp16", "BIAS": "*bf16", "SHIFT": "*fp32",
                  "M_PART": "*fp32", "S_PART": "*fp32", "U_PART": "*fp32", "COUNT": "*i32",
                  "M": "i32", "N": "i32", "K": "i32",
                  "row0": "i32", "lda": "i32", "ldb": "i32", "ldc": "i32", "ld_part": "i32", "ld_split": "i32",
                  "inv_temp": "fp32"}


def gemm_variants(dtype: str):
    """(label, pointer types, constexprs) of every persistent-GEMM launch the schedules make for one
    half-precision input dtype: the head GEMM with statistics (+ stored logits), with the shift, the
    split-K dX and the dW accumulation."""
    from .ops.persistent_gemm.kernel import ACCUMULATE, LOGITS_SHIFTED, LOGITS_STATS

    ptr = f"*{dtype}"
    base = dict(A_T=False, B_T=True, LIMIT_M=True, LIMIT_K=False, INIT=False, STORE_Z=False, HAS_BIAS=False,
                ENTROPY=False, SPLIT_K=1, SCALED=False)
    for bias in (False, True):
        for entropy in (False, True):
            for store in (False, True):
                yield (f"logits stats bias={int(bias)} entropy={int(entropy)} store={int(store)}", "logits",
                       dict(A=ptr, B=ptr, BIAS=ptr, C="*fp16"),
                       dict(base, EPILOGUE=LOGITS_STATS, HAS_BIAS=bias, ENTROPY=entropy, STORE_Z=store))
        yield (f"logits shifted bias={int(bias)}", "logits", dict(A=ptr, B=ptr, BIAS=ptr, C="*fp16"),
               dict(base, EPILOGUE=LOGITS_SHIFTED, HAS_BIAS=bias))
    # fp16 dZ is formed times a power of two; its GEMMs scale the product back (SCALED, gemm.scale_fp16_grads).
    # A one-chunk fused loss runs dX and dW in backward with the upstream gradient as the scale, bf16 too
    # (head_schedule.deferred_backprop).
    scales = (dict(SCALED=True),) if dtype == "fp16" else ({}, dict(SCALED=True))
    for scaled in scales:
        tag = " scaled" if scaled else ""
        for split in (1, 2):
            yield (f"dX split-K {split}{tag}", "dx", dict(A=ptr, B=ptr, C="*fp32"),
                   dict(base, EPILOGUE=ACCUMULATE, B_T=False, INIT=True, SPLIT_K=split, **scaled))
        for init in (False, True):
            if dtype == "bf16" and scaled:  # bf16 scales only the one-chunk pass (below)
                continue
            yield (f"dW {'init' if init else 'accumulate'}{tag}", "dw", dict(A=ptr, B=ptr, C="*fp32"),
                   dict(base, EPILOGUE=ACCUMULATE, A_T=True, B_T=False, LIMIT_M=False, LIMIT_K=True, INIT=init,
                        **scaled))
        # one chunk: dW written once, in the weight's dtype (the log-prob backward; scaled: the fused loss)
        yield (f"dW init in the weight's dtype{tag}", "dw", dict(A=ptr, B=ptr, C=ptr),
               dict(base, EPILOGUE=ACCUMULATE, A_T=True, B_T=False, LIMIT_M=False, LIMIT_K=True, INIT=True,
                    **scaled))


def _gemm_case(label, cfg, ptrs, const, *, use_tma=True, sms=132, arch=90, **flags):
    """One persistent-GEMM row of the report: ``gemm_variants``' constexprs under a config's tiles."""
    from .ops.persistent_gemm.kernel import persistent_gemm_kernel

    const = dict(const, USE_TMA=use_tma, DOT_FP32=False, PRECISION="tf32", BLOCK_M=cfg.block_m,
                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, NUM_SMS=sms, FLATTEN=cfg.flatten,
                 TMA_STORE=cfg.tma_store, **flags)
    sig = dict(GEMM_SIGNATURE, **ptrs)
    sig.update({k: "constexpr" for k in const})
    return ("persistent_gemm", f"{label} {cfg.label()}{' (sm_80)' if arch == 80 else ''}", True,
            persistent_gemm_kernel, sig, const, cfg.num_warps, cfg.num_stages, arch, True, use_tma)


def _statistics_only(const) -> bool:
    from .ops.persistent_gemm.kernel import LOGITS_STATS

    return const["EPILOGUE"] == LOGITS_STATS and not const["STORE_Z"]


def _gemm_cases(candidates: bool = False):
    """The shipped GEMM configurations; with ``candidates`` also the warp-specialised ones (one split)."""
    from dataclasses import replace

    from .ops.persistent_gemm import configs
    from .ops.persistent_gemm.kernel import ACCUMULATE, LOGITS_STATS

    for dtype in ("bf16", "fp16"):
        for label, role, ptrs, const in gemm_variants(dtype):
            if _statistics_only(const):  # role "stats": warp-specialised (configs.HOPPER_WS_STATS)
                yield _gemm_case(f"{dtype} {label}", configs.HOPPER_WS_STATS, ptrs, const, FULL_TILE=True,
                                 WARP_SPEC=True)
                continue
            cfg = {"logits": configs.HOPPER_LOGITS}.get(role, configs.HOPPER)
            yield _gemm_case(f"{dtype} {label}", cfg, ptrs, const)
    for dtype in ("bf16", "fp16") if candidates else ():
        for label, role, ptrs, const in gemm_variants(dtype):
            if const["SPLIT_K"] > 1:
                continue
            cfg = configs.HOPPER_WS_LOGITS if role == "logits" else configs.HOPPER_WS_DENSE
            stages = (cfg.num_stages,)
            if const["EPILOGUE"] == LOGITS_STATS and const["STORE_Z"]:
                # the logits stored as the launcher stores them (persistent_gemm._launch): from registers,
                # where a fourth stage fits beside them (213 KB; timed as "ws 256x128 s4")
                cfg = replace(cfg, tma_store=configs.stores_logits_by_tma(cfg, specialised=True,
                                                                          with_statistics=True))
                stages = (3, 4)
            for num_stages in stages:
                yield _gemm_case(f"{dtype} {label}", replace(cfg, num_stages=num_stages), ptrs, const,
                                 FULL_TILE=True, C_TMA=const["EPILOGUE"] == ACCUMULATE, WARP_SPEC=True)
    # Ampere / Ada: pointer loads, compiled for sm_80 (A100).
    for label, role, ptrs, const in gemm_variants("bf16"):
        if role == "logits":  # on Ampere/Ada dX and dW are cuBLAS (configs.DENSE_OTHER)
            yield _gemm_case(f"bf16 {label}", configs.AMPERE, ptrs, const, use_tma=False, sms=108, arch=80)


def _cases(candidates: bool = False):
    """(kernel, config label, GEMM-class, fn, signature, constexprs, warps, stages, arch, persistent, TMA)."""
    from .ops.advantages.triton_impl import _group_advantages_kernel
    from .ops.fused_loss.triton_schedule import _token_kernel
    from .ops.linear_logprobs import triton_rows as rows
    from .ops.policy_loss.triton_impl import _policy_loss_kernel, stat_constexprs
    from .variants import NUM_STATS

    yield from _gemm_cases(candidates)

    sig = {"XC": "*bf16", "W": "*bf16", "BIAS": "*bf16", "TGT_C": "*i64", "ORDER": "*i64", "COUNT": "*i32",
           "M_PART": "*fp32", "S_PART": "*fp32", "U_PART": "*fp32", "LP": "*fp32", "ENT": "*fp32",
           "ROW_STATS": "*fp32",
           "n": "i32", "H": "i32", "V": "i32", "row0": "i32", "ld_part": "i32", "n_slices": "i32",
           "inv_temp": "fp32"}
    const = dict(HAS_BIAS=True, ENTROPY=True, BLOCK_R=rows.BLOCK_ROWS, BLOCK_T=rows.BLOCK_SLICES,
                 BLOCK_H=rows.BLOCK_H)
    sig.update({k: "constexpr" for k in const})
    yield ("logprobs_rows", "bias, entropy", False, rows._logprobs_kernel, sig, const, 4, 1, 90, False, False)

    sig = {"Z": "*fp16", "DZ": "*bf16", "M_PART": "*fp32", "M_ROW": "*fp32", "LOG_S": "*fp32", "H_ROW": "*fp32",
           "G_LP": "*fp32", "G_H": "*fp32", "TGT": "*i64", "COUNT": "*i32", "n": "i32", "V": "i32", "ldz": "i32",
           "ld_part": "i32", "row0": "i32", "inv_temp": "fp32"}
    const = dict(SLICE_SHIFT=True, HAS_G_H=True, ZERO_TAIL=True, BLOCK_R=rows.BLOCK_ROWS, SLICE=128)
    sig.update({k: "constexpr" for k in const})
    yield ("dlogits", "slice-shifted, entropy, zero tail", False, rows._dlogits_kernel, sig, const, 4, 1, 90,
           False, False)

    sig = {"PART": "*fp32", "DX": "*bf16", "ORDER": "*i64", "COUNT": "*i32", "n": "i32", "H": "i32", "row0": "i32",
           "ld_split": "i32"}
    const = dict(SPLITS=2, BLOCK_R=16, BLOCK_C=256)
    sig.update({k: "constexpr" for k in const})
    yield ("dx_finish", "2 splits", False, rows._dx_finish_kernel, sig, const, 4, 1, 90, False, False)

    sig = {"XC": "*bf16", "W": "*bf16", "BIAS": "*bf16", "COUNT": "*i32", "M_PART": "*fp32", "S_PART": "*fp32",
           "U_PART": "*fp32", "TGT": "*i64", "W_TOK": "*fp32", "ADV": "*fp32", "OLD": "*fp32", "REF": "*fp32",
           "ISW": "*fp32", "M_OUT": "*fp32", "LOG_S_OUT": "*fp32", "H_OUT": "*fp32", "G_LP": "*fp32", "G_H": "*fp32",
           "STATS": "*fp32",
           "n": "i32", "H": "i32", "V": "i32", "row0": "i32", "ld_part": "i32", "n_slices": "i32",
           "inv_temp": "fp32", "eps_neg": "fp32", "eps_pos": "fp32", "clip_c": "fp32", "beta": "fp32",
           "entropy_coef": "fp32"}
    const = dict(HAS_BIAS=True, HAS_REF=True, HAS_ISW=True, DUAL_CLIP=True, ON_POLICY=False, NUM_STATS=NUM_STATS,
                 BLOCK_R=rows.BLOCK_ROWS, BLOCK_T=rows.BLOCK_SLICES, BLOCK_H=rows.BLOCK_H, **stat_constexprs())
    sig.update({k: "constexpr" for k in const})
    yield ("loss_tokens", "all options", False, _token_kernel, sig, const, 4, 1, 90, False, False)

    sig = {"LP": "*fp32", "OLD": "*fp32", "ADV": "*fp32", "VALID": "*u8", "ROW_SCALE": "*fp32", "REF": "*fp32",
           "ENT": "*fp32", "ISW": "*fp32", "G_LP": "*fp32", "G_ENT": "*fp32", "STATS": "*fp32", "T": "i32",
           "eps_neg": "fp32", "eps_pos": "fp32", "clip_c": "fp32", "beta": "fp32", "entropy_coef": "fp32"}
    const = dict(ADV_PER_TOKEN=False, HAS_REF=True, HAS_ENT=True, HAS_ISW=True, DUAL_CLIP=True, GRAD_LP=True,
                 GRAD_ENT=True, NUM_STATS=NUM_STATS, BLOCK_T=1024, **stat_constexprs())
    sig.update({k: "constexpr" for k in const})
    yield ("policy_loss", "all options, BLOCK_T=1024 w4", False, _policy_loss_kernel, sig, const, 4, 1, 90, False,
           False)

    from .ops.fused_loss.triton_cast import BLOCK, _scaled_cast_kernel

    sig = {"SRC": "*fp32", "SCALE": "*fp32", "DST": "*bf16", "n": "i32", "BLOCK": "constexpr"}
    yield ("scaled_cast", f"fp32 -> bf16, BLOCK={BLOCK} w4", False, _scaled_cast_kernel, sig, dict(BLOCK=BLOCK), 4,
           1, 90, False, False)

    from .ops import compaction

    sig = {"VALUES": "*i64", "ORDER": "*i64", "COUNT": "*i32", "N": "i32", "ignore": "i32", "BLOCK": "constexpr",
           "SCAN": "constexpr"}
    yield ("compact_1pass", f"targets, BLOCK={compaction.BLOCK}, SCAN={compaction.SCAN} w4", False,
           compaction._compact_one_pass, sig, dict(BLOCK=compaction.BLOCK, SCAN=compaction.SCAN), 4, 1, 90, False,
           False)
    sig = {"VALUES": "*i64", "ORDER": "*i64", "COUNT": "*i32", "X": "*bf16", "OUT": "*bf16", "N": "i32", "H": "i32",
           "ldx": "i32", "ignore": "i32", "rows_out": "i32", "BLOCK": "constexpr", "SCAN": "constexpr",
           "SUB": "constexpr", "BLOCK_H": "constexpr"}
    const = dict(BLOCK=compaction.BLOCK, SCAN=compaction.SCAN, SUB=compaction.GATHER_SUB,
                 BLOCK_H=compaction.GATHER_COLUMNS)
    yield ("compact_gather", f"targets, bf16 rows, SUB={compaction.GATHER_SUB}, BLOCK_H={compaction.GATHER_COLUMNS} w4",
           False, compaction._compact_gather_one_pass, sig, const, 4, 1, 90, False, False)
    sig = {"VALUES": "*i1", "COUNTS": "*i32", "N": "i32", "ignore": "i32", "BLOCK": "constexpr"}
    yield ("compact_counts", f"mask, BLOCK={compaction.BLOCK} w4", False, compaction._block_counts, sig,
           dict(BLOCK=compaction.BLOCK), 4, 1, 90, False, False)
    sig = {"VALUES": "*i1", "COUNTS": "*i32", "ORDER": "*i64", "COUNT": "*i32", "N": "i32", "ignore": "i32",
           "n_blocks": "i32", "BLOCK": "constexpr", "MAX_BLOCKS": "constexpr"}
    yield ("compact_rank", f"mask, BLOCK={compaction.BLOCK}, 128 blocks, w4", False,
           compaction._compact_from_counts, sig, dict(BLOCK=compaction.BLOCK, MAX_BLOCKS=128), 4, 1, 90, False, False)

    sig = {"R": "*fp32", "ORDER": "*i64", "SORTED_IDS": "*i64", "SEG_END": "*i64", "OUT": "*fp32",
           "r_max_bits": "i64", "num_virtual": "fp32", "eps": "fp32"}
    const = dict(UNBIASED=True, USE_STD=True, BLOCK=32)
    sig.update({k: "constexpr" for k in const})
    yield ("group_advantages", "BLOCK=32 w1", False, _group_advantages_kernel, sig, const, 1, 1, 90, False, False)


def report(candidates: bool = False) -> list[Row]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("hopper_report compiles real kernels: run it without TRITON_INTERPRET=1")
    return [_inspect(name, label, gemm, _compile(fn, sig, const, w, s, arch), arch, persistent, tma,
                     ws_expected=bool(const.get("WARP_SPEC")))
            for name, label, gemm, fn, sig, const, w, s, arch, persistent, tma in _cases(candidates)]


def main() -> int:
    rows = report(candidates="--candidates" in sys.argv[1:])
    head = (f"{'kernel':<16} {'config':<78} {'arch':>5} {'regs':>5} {'spill B':>8} {'smem B':>8} {'persist':>8} "
            f"{'TMA ops':>8} {'HGMMA':>6} {'HMMA':>5} {'WS':>3}  verdict")
    print("Code generation, compiled on this CPU (sm_90a = H100/H200; sm_80 = A100)")
    print(head)
    print("-" * len(head))
    failed = False
    for r in rows:
        problems = r.problems()
        failed |= bool(problems)
        print(f"{r.kernel:<16} {r.config:<78} {r.arch:>5} {r.registers:>5} {r.spill_bytes:>8} {r.shared_bytes:>8} "
              f"{'yes' if r.persistent else 'no':>8} {r.tma_ops:>8} {r.hgmma:>6} {r.hmma:>5} "
              f"{'yes' if r.specialised else 'no':>3}  "
              f"{'; '.join(problems) or 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

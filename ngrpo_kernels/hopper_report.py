"""Compile every shipped kernel configuration for the H100 (sm_90a) on this machine, no GPU needed.

    python -m ngrpo_kernels.hopper_report

Prints one row per (kernel, config): registers per thread, spill bytes (from ptxas), shared memory,
and the count of Hopper warpgroup MMA instructions (HGMMA) versus the older HMMA in the SASS. Exits
non-zero if a GEMM-class kernel has no HGMMA, spills, or needs more shared memory than an SM has.
Must run with TRITON_INTERPRET unset (the interpreter replaces the compiler).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

H100_SHARED_BYTES = 227 * 1024  # per block, opt-in maximum on sm_90


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

    def problems(self) -> list[str]:
        out = []
        if self.gemm and self.hgmma == 0:
            out.append("no HGMMA (wgmma) instructions")
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes")
        if self.shared_bytes > H100_SHARED_BYTES:
            out.append(f"shared memory {self.shared_bytes} > {H100_SHARED_BYTES}")
        return out


def _nvidia_bin(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


# What the JIT would see at the Qwen2.5 / Llama head shapes: every pointer 16-byte aligned, and the
# hidden and vocabulary sizes (H = 3584, V = 152064) multiples of 16. Without these hints the compiler
# cannot vectorise loads and the report would describe code that never runs.
_DIVISIBLE_INTS = {"H", "V"}


def _compile(fn, signature, constexprs, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
             if ty.startswith("*") or name in _DIVISIBLE_INTS}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _inspect(kernel, config, gemm, compiled) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        cubin = Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        ptxas = _nvidia_bin("ptxas-blackwell")
        if not ptxas.exists():
            ptxas = _nvidia_bin("ptxas")
        info = subprocess.run([str(ptxas), "-v", "-arch=sm_90a", str(ptx), "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(_nvidia_bin("cuobjdump")), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)]
    return Row(kernel, config, gemm, int(regs.group(1)) if regs else -1, sum(spill),
               int(compiled.metadata.shared), len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass)))


def _cases():
    """(kernel name, config label, is GEMM-class, fn, signature, constexprs, warps, stages)."""
    from .ops.advantages.triton_impl import _group_advantages_kernel
    from .ops.linear_logprobs import triton_impl as ll
    from .ops.policy_loss.triton_impl import _policy_loss_kernel, stat_constexprs
    from .variants import NUM_STATS

    for dtype in ("bf16", "fp16"):
        ptr = f"*{dtype}"
        cfg = ll.FORWARD_CONFIG
        for entropy in (False, True):
            sig = {"X": ptr, "W": ptr, "BIAS": ptr, "TGT": "*i64", "M_OUT": "*fp32", "S_OUT": "*fp32",
                   "U_OUT": "*fp32", "ZT_OUT": "*fp32", "N": "i32", "V": "i32", "H": "i32",
                   "cols_per_split": "i32", "inv_temp": "fp32"}
            # The worst case of each: entropy on with a bias (register pressure), entropy off without.
            const = dict(HAS_BIAS=entropy, ENTROPY=entropy, DOT_FP32=False, PRECISION="tf32",
                         BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h)
            sig.update({k: "constexpr" for k in const})
            yield ("lse_forward", f"{dtype} entropy/bias={entropy} {cfg.block_n}x{cfg.block_v}x{cfg.block_h} "
                   f"w{cfg.num_warps} s{cfg.num_stages}", True, ll._lse_forward_kernel, sig, const,
                   cfg.num_warps, cfg.num_stages)
        cfg = ll.BACKWARD_CONFIG
        for atomic in (False, True):
            sig = {"X": ptr, "W": ptr, "BIAS": ptr, "TGT": "*i64", "LSE": "*fp32", "MEAN_Z": "*fp32",
                   "G_LP": "*fp32", "G_ENT": "*fp32", "DZ": ptr, "DX": "*fp32", "DW": "*fp32", "DB": "*fp32",
                   "N": "i32", "V": "i32", "H": "i32", "inv_temp": "fp32", "ignore_index": "i32"}
            const = dict(HAS_BIAS=True, HAS_G_ENT=True, ATOMIC=atomic, NEED_DX=atomic, NEED_DW=atomic,
                         NEED_DB=atomic, DOT_FP32=False, PRECISION="tf32", BLOCK_N=cfg.block_n,
                         BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h)
            sig.update({k: "constexpr" for k in const})
            yield ("dlogits", f"{dtype} {'atomic' if atomic else 'deterministic'} {cfg.block_n}x{cfg.block_v}x"
                   f"{cfg.block_h} w{cfg.num_warps} s{cfg.num_stages}", True, ll._dlogits_kernel, sig, const,
                   cfg.num_warps, cfg.num_stages)

    sig = {"LP": "*fp32", "OLD": "*fp32", "ADV": "*fp32", "VALID": "*u8", "ROW_SCALE": "*fp32", "REF": "*fp32",
           "ENT": "*fp32", "ISW": "*fp32", "G_LP": "*fp32", "G_ENT": "*fp32", "STATS": "*fp32", "T": "i32",
           "eps_neg": "fp32", "eps_pos": "fp32", "clip_c": "fp32", "beta": "fp32", "entropy_coef": "fp32"}
    const = dict(ADV_PER_TOKEN=False, HAS_REF=True, HAS_ENT=True, HAS_ISW=True, DUAL_CLIP=True, GRAD_LP=True,
                 GRAD_ENT=True, NUM_STATS=NUM_STATS, BLOCK_T=1024, **stat_constexprs())
    sig.update({k: "constexpr" for k in const})
    yield ("policy_loss", "all options, BLOCK_T=1024 w4", False, _policy_loss_kernel, sig, const, 4, 1)

    from .ops.fused_loss.row_triton import _loss_rows_kernel

    sig = {"Z": "*fp32", "DZ": "*bf16", "BIAS": "*bf16", "TGT": "*i64", "VALID": "*u8", "W_TOK": "*fp32",
           "ADV": "*fp32", "OLD": "*fp32", "REF": "*fp32", "ISW": "*fp32", "STATS": "*fp32", "V": "i32",
           "inv_temp": "fp32", "eps_neg": "fp32", "eps_pos": "fp32", "clip_c": "fp32", "beta": "fp32",
           "entropy_coef": "fp32"}
    const = dict(HAS_BIAS=True, HAS_REF=True, HAS_ISW=True, DUAL_CLIP=True, ON_POLICY=False, NEED_GRAD=True,
                 NUM_STATS=NUM_STATS, BLOCK_V=4096, **stat_constexprs())
    sig.update({k: "constexpr" for k in const})
    yield ("loss_rows", "all options, bf16 dZ, BLOCK_V=4096 w8", False, _loss_rows_kernel, sig, const, 8, 1)

    sig = {"R": "*fp32", "ORDER": "*i64", "SORTED_IDS": "*i64", "SEG_END": "*i64", "OUT": "*fp32",
           "r_max": "fp32", "num_virtual": "fp32", "eps": "fp32"}
    const = dict(UNBIASED=True, USE_STD=True, BLOCK=32)
    sig.update({k: "constexpr" for k in const})
    yield ("group_advantages", "BLOCK=32 w1", False, _group_advantages_kernel, sig, const, 1, 1)


def report() -> list[Row]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("hopper_report compiles real kernels: run it without TRITON_INTERPRET=1")
    return [_inspect(name, label, gemm, _compile(fn, sig, const, w, s))
            for name, label, gemm, fn, sig, const, w, s in _cases()]


def main() -> int:
    rows = report()
    head = f"{'kernel':<18} {'config':<46} {'regs':>5} {'spill B':>8} {'smem B':>8} {'HGMMA':>6} {'HMMA':>5}  verdict"
    print("sm_90a (H100) code generation, compiled on this CPU")
    print(head)
    print("-" * len(head))
    failed = False
    for r in rows:
        problems = r.problems()
        failed |= bool(problems)
        print(f"{r.kernel:<18} {r.config:<46} {r.registers:>5} {r.spill_bytes:>8} {r.shared_bytes:>8} "
              f"{r.hgmma:>6} {r.hmma:>5}  {'; '.join(problems) or 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

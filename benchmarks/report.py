"""Turn pytest-benchmark JSON into benchmarks/RESULTS.md tables and a PNG plot.

    python benchmarks/report.py RUN.json [MORE.json ...] [--out benchmarks/RESULTS.md] [--plot benchmarks/results.png]

One table per (operation, machine, shape): median time, ratio to the GEMM floor timed alternately with
that implementation (its ``floor_median``; the floor's own row otherwise), achieved TFLOP/s on the useful
FLOPs (6*n*H*V fwd+bwd over the n valid tokens, 2*N*H*V no-grad), and peak memory. Implementations that
did not run (skipped: missing package, wrong device, out of memory) have no row: nothing is estimated.
The plot shows time and peak memory against N, one line per implementation.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

OPS = {"fused_loss": "Fused NGRPO loss, forward + backward", "logprobs_no_grad": "No-grad log-prob pass",
       "advantages": "Group advantages (shuffled groups of 8)"}


def load(paths):
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for b in data["benchmarks"]:
            info = b["extra_info"]
            rows.append(dict(info, median=b["stats"]["median"], rounds=b["stats"]["rounds"]))
    return rows


def _mem(v):
    if v is None:
        return "not measured"
    return f"{v / 2**20:,.0f} MiB" if v >= 2**20 else f"{v / 2**10:,.0f} KiB"


def tables(rows) -> str:
    out = []
    by = defaultdict(list)
    for r in rows:
        by[(r["op"], r["device"], r["case"])].append(r)
    def order(kv):
        (op, device, case), group = kv
        return op, device, group[0].get("N", 0), case

    for (op, device, case), group in sorted(by.items(), key=order):
        meta = group[0]
        own_floor = next((r["median"] for r in group if r["impl"] == "gemm_floor"), None)
        out.append(f"### {OPS.get(op, op)}: {case}\n")
        padding = f"; {meta['padding']:.1%} of the tokens are padding" if meta.get("padding") else ""
        out.append(f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}{padding}\n")
        head = "| implementation | median time | × GEMM floor (timed alternately) | TFLOP/s (useful) | peak memory |"
        out += [head, "|---|---:|---:|---:|---:|"]
        # The floor's own test is timed in rounds of its own, minutes from the others (on 2 shared cores its
        # median came out 1.7x the floor the other rows were divided by): its row shows the median of the
        # floors timed beside each row instead, the denominator of their ratios.
        beside = sorted(r["floor_median"] for r in group if r["impl"] != "gemm_floor" and r.get("floor_median"))
        shown = {id(r): (beside[len(beside) // 2] if r["impl"] == "gemm_floor" and beside else r["median"])
                 for r in group}
        for r in sorted(group, key=lambda r: shown[id(r)]):
            median = shown[id(r)]
            floor = r.get("floor_median") or own_floor
            ratio = "1.00" if r["impl"] == "gemm_floor" else (f"{median / floor:.2f}" if floor else "—")
            tflops = f"{r['flops'] / median / 1e12:.3f}" if r.get("flops") else "—"
            impl = "gemm_floor (median of the floors timed beside the rows)" if median != r["median"] else r["impl"]
            out.append(f"| {impl} | {median * 1e3:,.2f} ms | {ratio} | {tflops} | {_mem(r['peak_mem_bytes'])} |")
        out.append("")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in rows:
        if r["op"] == "advantages" or "H" not in r:
            continue
        series[(r["op"], r["device"], r["H"], r["V"], r["impl"])].append((r["N"], r["median"], r["peak_mem_bytes"]))
    panels = sorted({k[:4] for k in series if len(series[k]) > 1})
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4 * len(panels)), squeeze=False)
    for row, panel in enumerate(panels):
        for key, pts in sorted(series.items()):
            if key[:4] != panel:
                continue
            pts.sort()
            n = [p[0] for p in pts]
            axes[row][0].plot(n, [p[1] * 1e3 for p in pts], marker="o", label=key[4])
            mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
            if mem:
                axes[row][1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=key[4])
        op, device, H, V = panel
        axes[row][0].set(title=f"{op}, H={H}, V={V}\n{device}", xlabel="tokens N", ylabel="median time (ms)",
                         xscale="log", yscale="log")
        axes[row][1].set(title=f"{op}: peak memory", xlabel="tokens N", ylabel="MiB above inputs", xscale="log",
                         yscale="log")
        for ax in axes[row]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--plot", default=str(Path(__file__).with_name("results.png")))
    parser.add_argument("--title", default="Benchmark results")
    args = parser.parse_args()
    rows = load(args.json)
    text = (f"# {args.title}\n\nGenerated by `python benchmarks/report.py` from pytest-benchmark JSON "
            f"(`pytest benchmarks/ --benchmark-json=...`). Times are medians after a warm-up call; "
            f"the GEMM floor is three (fwd+bwd) or one (no-grad) `torch.matmul` of the same shapes, timed "
            f"before every round of each implementation (the floor's row shows the median of those floors: its own "
            f"test, timed apart, drifted with the machine's load); peak memory is defined in `benchmarks/conftest.py` "
            f"(on the CPU, glibc's mmap threshold is pinned at 128 KiB for the whole run so that freed blocks "
            f"leave the resident set: it costs the chunked implementations a few percent of time, ours "
            f"included). Ours runs with `validate=False`, as the peers check nothing either (the default "
            f"`validate=True` adds one device sync and the value checks). In padded batches every peer with a "
            f"way to skip padding uses it (`h[mask]` for the PyTorch heads, TRL's and verl's; CCE's "
            f"`ignore_index`); Liger's losses compute every position. CCE runs with its defaults: its backward skips "
            f"blocks of logits whose gradients are all below the dtype's eps / 32 (`filter_eps=\"high\"`), an "
            f"approximation ours does not make. Implementations that could not run on a "
            f"machine are absent from its tables (not measured).\n\n"
            + tables(rows))
    Path(args.out).write_text(text)
    plot(rows, Path(args.plot))
    print(text)


if __name__ == "__main__":
    main()

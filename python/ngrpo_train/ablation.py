"""The paper's ablation at the tiny scale: GRPO; + asymmetric clip; + calibration (virtual sample); both;
full NGRPO (both + the all-correct filter), everything else identical.

Task (a small answer space, where pushing down sampled wrong answers moves probability toward the right
one): ``a+b=`` answered by the last digit of the sum, ten possible answers. The warm start only sees
problems without a carry (``a % 10 + b % 10 < 10``); RL trains on a 50/50 mix of those and of carry
problems, which the warm-started model mostly gets wrong, so many groups start all-wrong: GRPO gets no
gradient from them, the calibrated arms get a negative advantage. Warm-start, RL and held-out problems
are disjoint parts of the problem space (``tasks.split_of``). Every arm of a seed starts from the same
warm-started weights and sees the same prompts; same lr, steps, batch, no KL, entropy bonus 0.001.

Reported: pass@k (k = 1 ... 16, 16 samples at temperature 0.6, top-p 0.95, as docs/algorithm.md §7) and
its AUC on held-out carry and no-carry problems, per arm: mean over seeds with a 95 % confidence
interval (Student t), a table and a plot.

    python -m ngrpo_train.ablation --output-dir outputs/ablation   # 10 seeds x 5 arms, ~11 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

from . import tasks
from .evaluate import evaluate
from .presets import Algo, preset
from .train import build_tokenizer, run

# The arms: (estimator, eps_neg, eps_pos, all-correct filter). No KL in any arm (same KL everywhere).
ARMS = {
    "grpo": Algo("grpo", 0.2, 0.2, 0.0, filter_all_correct=False, filter_all_wrong=False),
    "grpo+clip": Algo("grpo", 0.16, 0.24, 0.0, filter_all_correct=False, filter_all_wrong=False),
    "grpo+calibration": Algo("ngrpo", 0.2, 0.2, 0.0, filter_all_correct=False, filter_all_wrong=False),
    "both": Algo("ngrpo", 0.16, 0.24, 0.0, filter_all_correct=False, filter_all_wrong=False),
    "ngrpo": Algo("ngrpo", 0.16, 0.24, 0.0, filter_all_correct=True, filter_all_wrong=False),
}
# Student t's 97.5 % quantile by degrees of freedom (tables to 30; beyond, the Cornish-Fisher expansion, within
# 1e-3 of the exact value). No dependency ships it: torch's StudentT has no icdf, scipy is not required.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t_975(df: int) -> float:
    if df in T_975:
        return T_975[df]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def carry(row) -> bool:
    a, b = (int(v) for v in row["prompt"][:-1].split("+"))
    return a % 10 + b % 10 >= 10


def last_digit(rows):
    return [{"prompt": r["prompt"], "answer": str(int(r["answer"]) % 10)} for r in rows]


def problem_sets(seed: int, max_operand: int, heldout: int = 128):
    """Warm-start rows (no carry), RL prompts (half carry), held-out no-carry and carry problems."""
    warm = [r for r in tasks.arithmetic_problems(8192, max_operand=max_operand, seed=seed, split="warm")
            if not carry(r)][:4096]
    pool = tasks.arithmetic_problems(8192, max_operand=max_operand, seed=seed + 1, split="train")
    easy = [r for r in pool if not carry(r)][:2048]
    hard = [r for r in pool if carry(r)][:2048]
    train = [row for pair in zip(easy, hard) for row in pair]
    held = tasks.heldout_problems(max_operand=max_operand)
    held_easy = [r for r in held if not carry(r)][:heldout]
    held_hard = [r for r in held if carry(r)][:heldout]
    return tuple(last_digit(rows) for rows in (warm, train, held_easy, held_hard))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_975(n - 1) * sd / math.sqrt(n)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m ngrpo_train.ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--max-steps", type=int, default=240)
    ap.add_argument("--warm-start-steps", type=int, default=150)
    ap.add_argument("--n", type=int, default=16, help="samples per held-out problem for pass@k")
    ap.add_argument("--heldout-problems", type=int, default=128, help="held-out problems of each kind")
    ap.add_argument("--output-dir", default="outputs/ablation")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and plot from results.json")
    args = ap.parse_args(argv)
    if args.report_only:
        out = Path(args.output_dir)
        runs = json.loads((out / "results.json").read_text())["runs"]
        args.seeds = sorted({r["seed"] for r in runs})
        args.arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
        report = _report(runs, args, out)
        (out / "results.json").write_text(json.dumps({"runs": runs, "summary": report}, indent=2))
        return report
    if len(args.seeds) < 1 or args.max_steps < 1:
        ap.error("need at least one seed and one step")
    p = dataclasses.replace(preset("tiny"), max_steps=args.max_steps, warm_start_steps=args.warm_start_steps,
                            save_steps=args.max_steps, max_completion_length=2)
    tok = build_tokenizer(p)
    out = Path(args.output_dir)
    results = []
    for seed in args.seeds:
        warm, train, held_easy, held_hard = problem_sets(seed, p.max_operand, args.heldout_problems)
        warm_dir = None
        for arm in args.arms:
            run_dir = out / f"{arm}-seed{seed}"
            if warm_dir is not None and not (run_dir / "warm_start").exists():  # the seed's shared start
                shutil.copytree(warm_dir, run_dir / "warm_start")
            summary = run(p, ARMS[arm], arm, str(run_dir), seed=seed, quiet=True, train_rows=train, warm_rows=warm,
                          heldout_rows=[], plot=False)
            warm_dir = run_dir / "warm_start"
            row = {"arm": arm, "seed": seed, "reward_first": summary.get("reward_first"),
                   "reward_last": summary.get("reward_last")}
            for name, rows in (("no_carry", held_easy), ("carry", held_hard)):
                for when, model in (("before", warm_dir), ("after", run_dir / "final")):
                    if when == "before" and arm != args.arms[0]:  # the same weights for every arm
                        row[f"{name}_before"] = results[-1][f"{name}_before"]
                        continue
                    ev = evaluate(str(model), rows, "arithmetic", n=args.n, temperature=0.6, top_p=0.95,
                                  max_new_tokens=2, tokenizer=tok, problem_set=f"held-out {name}")
                    row[f"{name}_{when}"] = {"pass_at_k": ev["pass_at_k"], "auc": ev["auc"]}
            results.append(row)
            print(json.dumps({k: (v["auc"] if isinstance(v, dict) else v) for k, v in row.items()}), flush=True)
            if not args.keep_models:
                shutil.rmtree(run_dir / "final", ignore_errors=True)
                for ckpt in run_dir.glob("checkpoint-*"):
                    shutil.rmtree(ckpt, ignore_errors=True)
    report = _report(results, args, out)
    (out / "results.json").write_text(json.dumps({"runs": results, "summary": report}, indent=2))
    return report


def _report(results, args, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {}
    lines = [f"Held-out pass@k AUC (k = 1 ... {args.n}), mean ± 95 % CI over seeds {args.seeds}; "
             f"{args.max_steps} RL steps.", "",
             "| arm | carry: AUC after | carry: pass@1 after | no carry: AUC after | no carry: pass@1 after |",
             "|---|---|---|---|---|"]
    before = [r for r in results if r["arm"] == args.arms[0]]
    for name in ("carry", "no_carry"):
        m, h = mean_ci([r[f"{name}_before"]["auc"] for r in before])
        summary[f"warm start {name} AUC"] = (m, h)
    for arm in args.arms:
        runs = [r for r in results if r["arm"] == arm]
        cells = []
        for name in ("carry", "no_carry"):
            auc = mean_ci([r[f"{name}_after"]["auc"] for r in runs])
            p1 = mean_ci([r[f"{name}_after"]["pass_at_k"]["1"] if "1" in r[f"{name}_after"]["pass_at_k"]
                          else r[f"{name}_after"]["pass_at_k"][1] for r in runs])
            summary[f"{arm} {name} AUC"] = auc
            summary[f"{arm} {name} pass@1"] = p1
            cells += [f"{auc[0]:.1f} ± {auc[1]:.1f}", f"{p1[0]:.3f} ± {p1[1]:.3f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    first = args.arms[0]
    lines += ["", f"AUC after, paired with {first} on the same seed (same warm start, same prompts): mean "
              "difference ± 95 % CI (no correction for the comparisons' number), and seeds higher / lower / equal.",
              "", f"| arm | carry: difference to {first} | higher / lower / equal | no carry: difference to {first} "
              "| higher / lower / equal |", "|---|---|---|---|---|"]
    for arm in args.arms[1:]:
        cells = []
        for name in ("carry", "no_carry"):
            base = {r["seed"]: r[f"{name}_after"]["auc"] for r in results if r["arm"] == first}
            diffs = [r[f"{name}_after"]["auc"] - base[r["seed"]] for r in results
                     if r["arm"] == arm and r["seed"] in base]
            d = mean_ci(diffs)
            summary[f"{arm} {name} AUC - {first}"] = d
            wins = sum(x > 1e-9 for x in diffs), sum(x < -1e-9 for x in diffs), sum(abs(x) <= 1e-9 for x in diffs)
            cells += [f"{d[0]:+.1f} ± {d[1]:.1f}", f"{wins[0]} / {wins[1]} / {wins[2]}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Warm start (every arm's starting point): carry AUC "
              f"{summary['warm start carry AUC'][0]:.1f} ± {summary['warm start carry AUC'][1]:.1f}, no carry "
              f"{summary['warm start no_carry AUC'][0]:.1f} ± {summary['warm start no_carry AUC'][1]:.1f}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, name in enumerate(("carry", "no_carry")):
        means = [summary[f"{arm} {name} AUC"][0] for arm in args.arms]
        errs = [summary[f"{arm} {name} AUC"][1] for arm in args.arms]
        ax[i].bar(range(len(args.arms)), means, yerr=errs, capsize=4, color="tab:gray")
        ax[i].axhline(summary[f"warm start {name} AUC"][0], color="k", ls="--", lw=1, label="warm start")
        ax[i].set_xticks(range(len(args.arms)), args.arms, rotation=20, fontsize=8)
        ax[i].set(ylabel="held-out pass@k AUC", title=f"{name.replace('_', ' ')} problems")
        ax[i].legend(fontsize=8)
        ax[i].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=100)
    return summary


if __name__ == "__main__":
    main()

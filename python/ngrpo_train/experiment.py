"""The all-wrong-groups experiment: GRPO gets no gradient from groups in which every sample is wrong;
NGRPO's virtual max-reward sample gives them a negative advantage. Does that signal help?

Set-up (tiny preset): the warm start only sees sums up to ``easy_max``; RL trains on a mix of those
easy prompts and hard ones (sums above ``hard_min``) that the warm-started model essentially always
gets wrong, so their groups are all-wrong. Both algorithms start from the same warm-started weights
(same seed) and see the same prompts. We report the reward curves and the greedy accuracy on held-out
easy and hard problems, per seed, whatever they show.

    python -m ngrpo_train.experiment --seeds 0 1 2 --output-dir outputs/experiment
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from . import tasks
from .presets import algo, preset
from .train import build_tokenizer, greedy_accuracy, run


def problem_sets(seed: int, easy_max: int, hard_min: int, max_operand: int):
    """Warm-start rows, RL prompts and the two held-out sets, from disjoint parts of the problem space
    (``tasks.split_of``): no held-out problem is ever trained on."""
    warm = tasks.arithmetic_problems(4096, max_operand=max_operand, max_sum=easy_max, seed=seed, split="warm")
    easy = tasks.arithmetic_problems(2048, max_operand=max_operand, max_sum=easy_max, seed=seed + 1000,
                                     split="train")
    hard = tasks.arithmetic_problems(2048, max_operand=max_operand, min_sum=hard_min, seed=seed + 2000,
                                     split="train")
    train = [row for pair in zip(easy, hard) for row in pair]  # half easy, half hard, interleaved
    held_easy = tasks.heldout_problems(max_operand=max_operand, max_sum=easy_max, limit=256)
    held_hard = tasks.heldout_problems(max_operand=max_operand, min_sum=hard_min, limit=256)
    return warm, train, held_easy, held_hard


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m ngrpo_train.experiment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=["grpo", "ngrpo"])
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--warm-start-steps", type=int, default=800)
    ap.add_argument("--easy-max", type=int, default=60)
    ap.add_argument("--hard-min", type=int, default=80)
    ap.add_argument("--output-dir", default="outputs/experiment")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    p = dataclasses.replace(preset("tiny"), max_steps=args.max_steps, warm_start_steps=args.warm_start_steps,
                            save_steps=args.max_steps)
    tok = build_tokenizer(p)
    results = []
    for seed in args.seeds:
        warm, train, held_easy, held_hard = problem_sets(seed, args.easy_max, args.hard_min, p.max_operand)
        for name in args.algos:
            out = Path(args.output_dir) / f"{name}-seed{seed}"
            summary = run(p, algo(name), name, str(out), seed=seed, quiet=True, train_rows=train, warm_rows=warm)
            acc = {}
            for when, path in (("before", out / "warm_start"), ("after", out / "final")):
                model = AutoModelForCausalLM.from_pretrained(path)
                acc[when] = {"easy": greedy_accuracy(model, tok, held_easy, p.max_completion_length),
                             "hard": greedy_accuracy(model, tok, held_hard, p.max_completion_length)}
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            results.append({"algo": name, "seed": seed, "accuracy": acc,
                            "train_accuracy_first": summary.get("accuracy_first"),
                            "train_accuracy_last": summary.get("accuracy_last"),
                            "frac_all_wrong_first": sum(r["frac_all_wrong"] for r in rows[:30]) / min(30, len(rows)),
                            "frac_all_wrong_last": sum(r["frac_all_wrong"] for r in rows[-30:]) / min(30, len(rows)),
                            "curve": [r["accuracy"] for r in rows]})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}))
    out = Path(args.output_dir)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _report(results, out)
    return results


def _report(results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| algo | seed | held-out easy: before → after | held-out hard: before → after | "
             "train accuracy (verifier): first → last 20 % | all-wrong groups: first → last 30 steps |",
             "|---|---:|---|---|---|---|"]
    for r in results:
        a = r["accuracy"]
        lines.append(f"| {r['algo']} | {r['seed']} | {a['before']['easy']:.3f} → {a['after']['easy']:.3f} | "
                     f"{a['before']['hard']:.3f} → {a['after']['hard']:.3f} | {r['train_accuracy_first']:.3f} → "
                     f"{r['train_accuracy_last']:.3f} | "
                     f"{r['frac_all_wrong_first']:.2f} → {r['frac_all_wrong_last']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"grpo": "tab:blue", "ngrpo": "tab:red", "dapo": "tab:green", "w_reinforce": "tab:purple"}
    for r in results:
        curve = r["curve"]
        k = 10
        smooth = [sum(curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]
        ax.plot(range(1, len(curve) + 1), smooth, color=colors.get(r["algo"]), alpha=0.8,
                label=f"{r['algo']} seed {r['seed']}")
    ax.set(xlabel="step", ylabel="train accuracy (10-step mean)",
           title="tiny preset, half the prompts all-wrong at start")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=100)


if __name__ == "__main__":
    main()

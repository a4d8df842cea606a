"""``ngrpo-eval``: sample n completions per problem, grade them, report pass@k (k = 1, 2, 4, ..., n) and
the pass@k AUC of docs/algorithm.md §7, as a table (eval.md), JSON (eval.json) and a plot (passk.png).

    ngrpo-eval --model outputs/tiny-ngrpo/final --task arithmetic --n 16
    ngrpo-eval --model outputs/7b/final --task math --data data/aime2025.parquet --n 256 \\
        --exclude data/math_train.parquet --temperature 0.6 --top-p 0.95 --max-new-tokens 4096  # vLLM (GPU)

Generation uses vLLM when it is installed and a GPU is present, else HF ``generate`` (CPU works for
the tiny model). math-verify grading runs in this (main) thread: its timeouts use ``signal.alarm``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import passk, tasks


def _generate_hf(model_dir, prompts, *, n, temperature, top_p, max_new_tokens, batch=64, tokenizer=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if not isinstance(p, str) else p
             for p in prompts]
    outputs = []
    with torch.no_grad():
        for text in texts:
            samples = []
            for lo in range(0, n, batch):
                k = min(batch, n - lo)
                enc = tok([text] * k, return_tensors="pt", padding=True)
                sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
                    dict(do_sample=False)  # temperature 0: greedy, as vLLM reads it
                out = model.generate(**enc, **sampling, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
                samples += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            outputs.append(samples)
    return outputs


def _generate_vllm(model_dir, prompts, *, n, temperature, top_p, max_new_tokens, seed):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=seed)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
    if isinstance(prompts[0], str):
        results = llm.generate(prompts, params)
    else:
        results = llm.chat(prompts, params)
    return [[o.text for o in r.outputs] for r in results]


def evaluate(model_dir: str, rows: list[dict], task: str, *, n: int, temperature: float, top_p: float,
             max_new_tokens: int, out_dir: str | None = None, tokenizer=None, problem_set: str = "given",
             seed: int = 1234) -> dict:
    """``problem_set`` names where ``rows`` come from ("held-out split", a file...): it is reported."""
    prompts = [r["prompt"] for r in rows]
    use_vllm = False
    try:
        import torch
        import vllm  # noqa: F401

        use_vllm = torch.cuda.is_available()
    except ImportError:
        pass
    gen = _generate_vllm if use_vllm else _generate_hf
    kwargs = dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    if use_vllm:
        kwargs["seed"] = seed  # HF generate follows torch's seed, set by main
    else:
        kwargs["tokenizer"] = tokenizer
    samples = gen(model_dir, prompts, **kwargs)
    grade = tasks.exact_answer_reward if task == "arithmetic" else tasks.math_verify_reward
    correct = [int(sum(grade(None, s, answer=[r["answer"]] * len(s)))) for s, r in zip(samples, rows)]
    curve = passk.mean_pass_at_k(correct, n)
    result = {"model": model_dir, "task": task, "problems": len(rows), "problem_set": problem_set, "n": n,
              "temperature": temperature,
              "top_p": top_p, "generator": "vllm" if use_vllm else "hf", "pass_at_k": curve,
              "auc": passk.pass_at_k_auc(curve) if len(curve) > 1 else None}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        lines = ["| k | pass@k |", "|---:|---:|"] + [f"| {k} | {v:.4f} |" for k, v in curve.items()]
        auc = "n/a" if result["auc"] is None else f"{result['auc']:.2f}"
        (out / "eval.md").write_text(f"# {model_dir} on {task} ({len(rows)} problems: {problem_set}; n = {n})\n\n"
                                     + "\n".join(lines) + f"\n\npass@k AUC: {auc}\n")
        _plot(curve, out / "passk.png", title=f"{Path(model_dir).name}: AUC {auc}")
    return result


def _plot(curve, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(curve), list(curve.values()), marker="o")
    ax.set(xscale="log", xlabel="k", ylabel="pass@k", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="ngrpo-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", choices=("arithmetic", "math"), default="arithmetic")
    ap.add_argument("--data", help="parquet (math task); arithmetic problems are generated")
    ap.add_argument("--exclude", action="append", default=[], metavar="PARQUET",
                    help="math task: leave out problems that also occur in this file (the training data), repeatable")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: 4 for arithmetic (the tiny presets' completions), 4096 for math (docs/algorithm.md §7)")
    ap.add_argument("--seed", type=int, default=1234, help="problem generation and sampling seed")
    ap.add_argument("--output-dir", default=None, help="default: MODEL/../eval")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    if args.max_new_tokens is None:
        args.max_new_tokens = 4 if args.task == "arithmetic" else 4096
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0 or not 0 < args.top_p <= 1:
        ap.error(f"--temperature must be >= 0 (0: greedy) and --top-p in (0, 1], got {args.temperature} and "
                 f"{args.top_p}")
    model = Path(args.model)
    looks_local = (model.is_absolute() or args.model.startswith((".", "~")) or args.model.count("/") != 1
                   or Path(args.model.split("/")[0]).exists())
    if looks_local and not model.exists():  # not a hub id: say so now, not after a hub lookup
        ap.error(f"--model {args.model}: no such directory")
    import torch

    torch.manual_seed(args.seed)  # sampling (HF generate) is reproducible run to run
    tokenizer = None
    if args.task == "arithmetic":
        # the held-out split: problems that no training run of the tiny presets has seen
        rows = tasks.heldout_problems(max_operand=50, limit=args.limit or 64, seed=args.seed)
        if not (model / "tokenizer_config.json").exists():  # else the model's own (char or Qwen vocabulary)
            from .tokenizer import char_tokenizer

            tokenizer = char_tokenizer(tasks.ALPHABET)
            config = model / "config.json"
            vocab = json.loads(config.read_text()).get("vocab_size") if config.exists() else None
            if vocab is not None and vocab != len(tokenizer):
                ap.error(f"--model {args.model} has no tokenizer and a {vocab}-token vocabulary, not the "
                         f"{len(tokenizer)}-token character tokenizer's: save its tokenizer beside it")
        problem_set = "held-out split of a+b= (never in a warm-start or RL set)"
    else:
        if not args.data:
            ap.error("--task math needs --data PARQUET")
        rows = tasks.load_math_parquet(args.data)
        dropped = 0
        for path in args.exclude:
            rows, n = tasks.without_seen(rows, tasks.load_math_parquet(path))
            dropped += n
        rows = rows[:args.limit]
        problem_set = args.data + (f" less {dropped} problem(s) in {', '.join(args.exclude)}" if args.exclude else "")
    out_dir = args.output_dir or str(Path(args.model).parent / "eval")
    result = evaluate(args.model, rows, args.task, n=args.n, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, out_dir=out_dir, tokenizer=tokenizer,
                      problem_set=problem_set, seed=args.seed)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

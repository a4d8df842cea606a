"""``ngrpo-train`` / ``python -m ngrpo_train``: run a preset with an algorithm.

    ngrpo-train                                   # tiny preset, NGRPO, output in outputs/tiny-ngrpo
    ngrpo-train --preset tiny --algo grpo --max-steps 100 --seed 1
    ngrpo-train --output-dir outputs/run --resume auto   # continue from the last checkpoint
    accelerate launch --config_file python/ngrpo_train/accelerate/fsdp2.yaml -m ngrpo_train \\
        --preset qwen2.5-math-7b --train-path data/math_train.parquet --output-dir outputs/7b
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from .presets import ALGOS, PRESETS, algo, preset


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ngrpo-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--algo", default="ngrpo", choices=ALGOS)
    ap.add_argument("--output-dir", default=None, help="default: outputs/PRESET-ALGO")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", default=None, help="a checkpoint directory, or 'auto' for the last one in --output-dir")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--trainer", default="ngrpo", choices=("ngrpo", "trl"),
                    help="trl: TRL's stock GRPOTrainer on the same preset, for end-to-end comparisons")
    knobs = ap.add_argument_group("overrides of the preset")
    for field in ("max_steps", "learning_rate", "num_generations", "prompts_per_generation",
                  "optimizer_steps_per_generation", "max_completion_length", "temperature", "warm_start_steps",
                  "save_steps", "num_train", "per_device_train_batch_size", "train_path", "model"):
        f = next(x for x in dataclasses.fields(PRESETS["tiny"]) if x.name == field)
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        knobs.add_argument("--" + field.replace("_", "-"), type=kind, default=None)
    return ap


def _need_train_extra(ap) -> None:
    """The trainer's dependencies are the [train] extra: say so, not a ModuleNotFoundError from inside."""
    import importlib.util

    missing = [m for m in ("transformers", "trl", "accelerate", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        ap.error(f"ngrpo-train needs {', '.join(missing)}: pip install --no-build-isolation \"ngrpo-kernels[train]\" "
                 "(or `make demo`, which sets everything up)")


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        ap.error(f"--max-steps must be >= 1, got {args.max_steps}")
    p = preset(args.preset)
    overrides = {k: v for k, v in vars(args).items() if v is not None and hasattr(p, k)}
    if args.model is not None:  # a given model brings its own tokenizer (the presets' char / Qwen ones are for theirs)
        overrides["tokenizer"] = "model"
    p = dataclasses.replace(p, **overrides)
    output_dir = args.output_dir or f"outputs/{args.preset}-{args.algo}"
    _need_train_extra(ap)
    from .train import run

    summary = run(p, algo(args.algo), args.algo, output_dir, seed=args.seed, resume=args.resume, quiet=args.quiet,
                  trainer_impl=args.trainer)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()

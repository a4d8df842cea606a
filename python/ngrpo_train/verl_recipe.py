"""The authors' NGRPO recipe (docs/algorithm.md §6: Qwen2.5-Math-7B on MATH) on verl 0.9, through the
``ngrpo_kernels.integrations.verl`` plugin. Three steps:

    python -m ngrpo_train.verl_recipe prepare --src ../shared/data --out data/verl
    python -m ngrpo_train.verl_recipe launch --model Qwen/Qwen2.5-Math-7B --data data/verl --dry-run
    python -m ngrpo_train.verl_recipe launch --model Qwen/Qwen2.5-Math-7B --data data/verl [-- override ...]

``prepare`` writes verl-layout parquets (chat ``prompt`` with the recipe's instruction, ``reward_model.ground_truth``
a string, ``data_source`` naming this recipe's reward) from any layout ``tasks.load_math_parquet`` reads:
``train.parquet`` (MATH train) and the held-out ``math_test`` / ``aime2025`` / ``amc23`` when present.
``launch`` runs ``python -m verl.trainer.main_ppo`` with ``recipe_overrides`` (``--dry-run`` prints them);
overrides after ``--`` are appended (Hydra: the last one wins). ``compute_score`` is the reward verl calls.

Mapping onto verl (checked on verl 0.9.1's v1 trainer, its default):
- 1,024 prompts x 8 responses per generation (``data.train_batch_size``, ``rollout.n``); PPO mini-batch 256
  prompts and 1 PPO epoch: 4 optimizer steps per generation, the first on-policy, the next three clipped.
- NGRPO: ``algorithm.adv_estimator=ngrpo`` (r_max 1.0, one virtual sample), ``policy_loss.loss_mode=ngrpo``
  with clip 0.16 / 0.24 and no dual clip (``clip_ratio_c`` 1e9: the released loss had none), token-mean,
  entropy bonus 0.001, no KL (no reference model is built), lr 1e-6 constant, weight decay 0.01, clip 1.0.
- The all-correct filter with refill: ``NGRPOReplayBuffer`` (verl's dynamic sampling narrowed to all-correct
  groups). verl counts ``trainer.total_epochs`` in generation steps over the dataset (~7,490 prompts //
  1,024 = 7 generations per epoch), so 20 epochs are the recipe's ~140 generations.
- Lengths: prompt <= 1,024, response <= 3,072 tokens; vLLM rollout at temperature 1.0, TP 2; the actor's
  log-probs and entropy from the fused head (``fused_kernel_options.impl_backend=ngrpo``).
- One node of 8 GPUs (``--gpus``); the global batch is the same for any GPU count (verl splits it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from . import tasks

DATA_SOURCE = "ngrpo_train/math"  # any name: compute_score does not dispatch on it
HELD_OUT = ("math_test", "aime2025", "amc23")


def prepare(src: str, out: str) -> dict[str, int]:
    """Write train.parquet (from ``src``/math_train.parquet) and the held-out sets present in ``src`` in
    verl's layout, each held-out set less the problems the training file also holds (MATH's test repeats
    three of its training problems). Returns {file stem: rows}."""
    import pandas as pd

    src_dir, out_dir = Path(src), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    train_rows = None
    for stem, split in [("math_train", "train"), *[(name, "test") for name in HELD_OUT]]:
        path = src_dir / f"{stem}.parquet"
        if not path.exists():
            if split == "train":
                raise FileNotFoundError(f"{path} is needed (MATH train in any layout tasks.load_math_parquet reads)")
            continue
        rows = tasks.load_math_parquet(str(path))
        if split == "train":
            train_rows = rows
        else:
            rows, dropped = tasks.without_seen(rows, train_rows)
            if dropped:
                print(f"{stem}: {dropped} problem(s) also in {src_dir / 'math_train.parquet'} left out of the held-out set")
        frame = pd.DataFrame({
            "data_source": [f"{DATA_SOURCE}/{stem}"] * len(rows),
            "prompt": [r["prompt"] for r in rows],
            "ability": ["math"] * len(rows),
            "reward_model": [{"style": "rule", "ground_truth": r["answer"]} for r in rows],
            "extra_info": [{"index": i, "split": split} for i in range(len(rows))],
        })
        name = "train" if split == "train" else stem
        frame.to_parquet(out_dir / f"{name}.parquet")
        written[name] = len(rows)
    return written


# Seconds one score may take in a worker thread before it counts as wrong; math-verify's own 5 s timeouts
# then work in the scoring process (a main thread), so a stuck sample frees its worker as well.
SCORE_TIMEOUT = 30.0
_pool = None
_pool_lock = threading.Lock()


def _score_pool(broken: ProcessPoolExecutor | None = None) -> ProcessPoolExecutor:
    """The scoring processes; ``broken``: a pool found broken (a worker killed, e.g. by the OOM killer), replaced."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool is broken:
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            _pool = ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("spawn"))
    return _pool


def _score(solution_str: str, ground_truth: str) -> float:
    return tasks.math_verify_reward(None, [solution_str], answer=[ground_truth])[0]


def compute_score(data_source=None, solution_str="", ground_truth="", extra_info=None, **_unused) -> float:
    """verl's custom reward signature: 1.0 if the last \\boxed{} answer of the response equals the reference
    mathematically (math-verify), else 0.0, in bounded time. math-verify's timeouts use ``signal.alarm``, which
    works in a main thread only; verl's reward loop calls this from worker threads, and without timeouts one
    answer such as ``\\boxed{9^{9^{9^{9}}}}`` never returned. From a thread the score is computed in a
    process pool (as verl's own math_verify reward does), and after ``SCORE_TIMEOUT`` seconds counts as wrong."""
    if isinstance(ground_truth, dict):
        ground_truth = ground_truth["target"]
    if tasks.boxed_answer(solution_str) is None:
        return 0.0
    if threading.current_thread() is threading.main_thread():
        return _score(solution_str, ground_truth)
    pool = _score_pool()
    try:
        return pool.submit(_score, solution_str, ground_truth).result(timeout=SCORE_TIMEOUT)
    except FuturesTimeout:
        return 0.0
    except BrokenProcessPool:  # a scoring process died: this answer counts as wrong, the next gets a new pool
        _score_pool(broken=pool)
        return 0.0


def held_out_files(data_dir: Path) -> list[str]:
    return [str(data_dir / f"{name}.parquet") for name in HELD_OUT if (data_dir / f"{name}.parquet").exists()]


def recipe_overrides(model: str, data: str, *, gpus: int = 8, nodes: int = 1, rollout_tp: int = 2,
                     project: str = "ngrpo", experiment: str = "qwen2.5-math-7b-ngrpo") -> list[str]:
    """Hydra overrides of verl's ppo_trainer config for the recipe (docs/algorithm.md §6)."""
    data_dir = Path(data)
    # Validation only ever reads held-out sets: those present, else the ones ``prepare`` writes (``launch``
    # refuses to start without at least one of them).
    val = held_out_files(data_dir) or [str(data_dir / f"{name}.parquet") for name in HELD_OUT]
    batch = 1024
    actor, rollout, model_key = "actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.model"
    overrides = [
        # NGRPO: advantages, loss, filter (the plugin registers the names in every verl process)
        "algorithm.adv_estimator=ngrpo", "+algorithm.ngrpo_r_max=1.0", "+algorithm.ngrpo_num_virtual=1",
        "algorithm.use_kl_in_reward=False", "algorithm.filter_groups.enable=True",
        "trainer.v1.sampler.custom_sampler.path=pkg://ngrpo_kernels.integrations.verl.sampler",
        "trainer.v1.sampler.custom_sampler.name=NGRPOReplayBuffer",
        "+trainer.v1.sampler.sampler_kwargs.train_batch_size=${data.train_batch_size}",  # follows an override
        "+trainer.v1.sampler.sampler_kwargs.correct_reward=1.0",
        # data
        f"data.train_files={data_dir / 'train.parquet'}",
        f"data.val_files=[{','.join(val)}]",
        f"data.train_batch_size={batch}", "data.max_prompt_length=1024", "data.max_response_length=3072",
        "data.filter_overlong_prompts=True", "data.truncation=error",
        # model: the plugin in every process, the fused log-prob / entropy head
        f"{model_key}.path={model}", f"{model_key}.external_lib=ngrpo_kernels.integrations.verl",
        f"{model_key}.use_remove_padding=True", f"{model_key}.enable_gradient_checkpointing=True",
        f"{model_key}.use_fused_kernels=True", f"{model_key}.fused_kernel_options.impl_backend=ngrpo",
        # actor: optimizer, batches, loss
        f"{actor}.optim.lr=1e-6", f"{actor}.optim.weight_decay=0.01", f"{actor}.optim.clip_grad=1.0",
        f"{actor}.ppo_mini_batch_size=256", f"{actor}.ppo_epochs=1",
        f"{actor}.use_dynamic_bsz=True", f"{actor}.ppo_max_token_len_per_gpu=36000",
        f"{actor}.policy_loss.loss_mode=ngrpo", f"{actor}.loss_agg_mode=token-mean",
        f"{actor}.clip_ratio_low=0.16", f"{actor}.clip_ratio_high=0.24", f"{actor}.clip_ratio_c=1e9",
        f"{actor}.entropy_coeff=0.001", f"{actor}.use_kl_loss=False",
        # rollout: vLLM, temperature 1.0; old log-probs recomputed by the trainer
        f"{rollout}.name=vllm", f"{rollout}.n=8", f"{rollout}.temperature=1.0", f"{rollout}.top_p=1.0",
        f"{rollout}.tensor_model_parallel_size={rollout_tp}", f"{rollout}.gpu_memory_utilization=0.7",
        f"{rollout}.log_prob_use_dynamic_bsz=True", f"{rollout}.log_prob_max_token_len_per_gpu=48000",
        # reward: math-verify on the last \boxed{}
        "reward.custom_reward_function.path=pkg://ngrpo_train.verl_recipe",
        "reward.custom_reward_function.name=compute_score",
        # trainer
        f"trainer.n_gpus_per_node={gpus}", f"trainer.nnodes={nodes}", "trainer.total_epochs=20",
        "trainer.val_before_train=False", "trainer.test_freq=7", "trainer.save_freq=7",
        # a 7B checkpoint with its optimizer state is ~100 GB: the last three, not all twenty
        "trainer.max_actor_ckpt_to_keep=3",
        f"trainer.project_name={project}", f"trainer.experiment_name={experiment}", "trainer.logger=[console]",
    ]
    return overrides


def launch_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "verl.trainer.main_ppo", *overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ngrpo_train.verl_recipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write verl-layout parquets")
    p.add_argument("--src", default="../shared/data")
    p.add_argument("--out", default="data/verl")
    p = sub.add_parser("launch", help="run verl's trainer with the recipe")
    p.add_argument("--model", default="Qwen/Qwen2.5-Math-7B")
    p.add_argument("--data", default="data/verl")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--rollout-tp", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("extra", nargs="*", help="more Hydra overrides (after --)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        for name, n in prepare(args.src, args.out).items():
            print(f"{args.out}/{name}.parquet: {n} rows")
        return 0
    overrides = recipe_overrides(args.model, args.data, gpus=args.gpus, nodes=args.nodes, rollout_tp=args.rollout_tp)
    command = launch_command(overrides + list(args.extra))
    if args.dry_run:
        print(" \\\n  ".join(shlex.quote(c) for c in command))
        return 0
    if not (Path(args.data) / "train.parquet").exists():
        raise SystemExit(f"{args.data}/train.parquet is missing: run `python -m ngrpo_train.verl_recipe prepare` first")
    if not held_out_files(Path(args.data)):
        raise SystemExit(f"{args.data} holds no held-out set ({', '.join(n + '.parquet' for n in HELD_OUT)}): "
                         "validation never runs on the training file; run `prepare` with a --src that has them")
    return subprocess.call(command, env=launch_env(os.environ))


PLUGIN = "ngrpo_kernels.integrations.verl"


def launch_env(environ) -> dict:
    """The environment of the verl run: the plugin added to the user's VERL_USE_EXTERNAL_MODULES, not in place of it."""
    modules = [m for m in environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    return {**environ, "VERL_USE_EXTERNAL_MODULES": ",".join(modules + [PLUGIN] * (PLUGIN not in modules))}


if __name__ == "__main__":
    sys.exit(main())

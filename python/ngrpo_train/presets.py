"""Presets (what to train, on what, how) and algorithms (docs/algorithm.md §8), each a plain dataclass.

- ``tiny`` (the default, CPU): a 4-layer Qwen2-architecture model built from a config, a character
  tokenizer, synthetic arithmetic ``a+b=`` (answers checked exactly), a short supervised warm start
  (a random model never earns reward), then RL. Minutes on 2 cores.
- ``qwen2.5-math-7b``: docs/algorithm.md §6 as released, for one node of 8 x 80 GB GPUs with vLLM in colocate
  mode: 1024 prompts x 8 samples per generation, 4 optimizer steps of 256 prompts on it (so the ratio
  moves away from 1 and the clip acts). ``trl_args`` turns that into TRL's counts, which are micro-steps.
- ``tiny`` takes 2 optimizer steps per generation, as the recipe takes 4, so that clipping acts in the
  default job too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ALGOS = ("ngrpo", "grpo", "dapo", "w_reinforce")


@dataclasses.dataclass
class Algo:
    """Estimator, clip bounds, KL and filtering of one algorithm (docs/algorithm.md §8; entropy bonus 0.001 for all)."""

    estimator: str
    epsilon: float
    epsilon_high: float
    beta: float
    filter_all_correct: bool
    filter_all_wrong: bool
    entropy_coef: float = 0.001
    overlong_cache: float = 0.0  # DAPO's soft overlong penalty: cache as a fraction of max_completion_length


def algo(name: str) -> Algo:
    if name == "ngrpo":
        return Algo("ngrpo", 0.16, 0.24, 0.0, filter_all_correct=True, filter_all_wrong=False)
    if name == "grpo":
        return Algo("grpo", 0.2, 0.2, 0.001, filter_all_correct=False, filter_all_wrong=False)
    if name == "dapo":  # dynamic sampling -> filters (no refill), soft overlong penalty over the last 25 %
        return Algo("grpo", 0.2, 0.28, 0.0, filter_all_correct=True, filter_all_wrong=True, overlong_cache=0.25)
    if name == "w_reinforce":
        return Algo("w_reinforce", 0.2, 0.2, 0.0, filter_all_correct=False, filter_all_wrong=False)
    raise ValueError(f"--algo {name!r} is not one of {', '.join(ALGOS)}")


@dataclasses.dataclass
class Preset:
    name: str
    # model
    model: str | None = None  # a hub name or path; None: built from `model_config`
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer: str = "char"  # "char", "qwen" (offline Qwen2.5 vocabulary) or "model" (the model's own)
    # data
    task: str = "arithmetic"  # "arithmetic" or "math"
    train_path: str | None = None
    num_train: int = 4096
    max_prompt_length: int | None = None  # tokens (chat template included); longer prompts are left out
    max_operand: int = 50
    heldout_problems: int = 256  # greedy accuracy before and after training, on problems of no other split
    warm_start_steps: int = 0
    warm_start_lr: float = 3e-3
    warm_start_batch: int = 64
    # RL
    prompts_per_generation: int = 16
    num_generations: int = 8
    optimizer_steps_per_generation: int = 2  # the recipe's 1024-prompt generation / 256-prompt mini-batches
    max_completion_length: int = 4
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 300
    temperature: float = 1.0
    save_steps: int = 100
    per_device_train_batch_size: int | None = None  # completions per micro-step and process; None: a whole step
    use_vllm: bool = False
    bf16: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


PRESETS = {
    "tiny": Preset(
        name="tiny",
        model_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False),
        warm_start_steps=600,  # ~40 % greedy accuracy: room for RL to show
    ),
    # The tiny task with Qwen2.5's real vocabulary (151,936 logits per token, H = 128): where the fused
    # kernels matter. Measured on 2 CPU cores: ~1.3 s per RL step, ~0.9 s per warm-start step (full
    # logits); a 200-step warm start reached only 5 % greedy accuracy, so learning at this budget is
    # not demonstrated (the char-level `tiny` preset is the default for that).
    "tiny-qwen-vocab": Preset(
        name="tiny-qwen-vocab",
        tokenizer="qwen",
        model_config=dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          tie_word_embeddings=False),
        warm_start_steps=400,
        max_steps=100,
        save_steps=50,
    ),
    # One GPU, end to end, timed: a Qwen2.5-0.5B-shaped model with the real 151,936-entry vocabulary and
    # random weights (no download), bf16, 256-token completions (random weights sample until the limit,
    # so every step runs the head on 16 x 8 x 256 tokens), 20 optimizer steps. Run it twice on the same
    # GPU, with `--algo grpo` and `--trainer ngrpo` or `--trainer trl` (TRL's stock GRPO loss and fused head), to compare
    # step time and peak memory (summary.json). Not a learning run: the reward stays ~0.
    "gpu-qwen-small": Preset(
        name="gpu-qwen-small",
        tokenizer="qwen",
        model_config=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=False),
        warm_start_steps=0,
        heldout_problems=64,  # random weights answer nothing: a short check, not 2 x 256 completions of 256 tokens
        prompts_per_generation=16,
        max_completion_length=256,
        learning_rate=1e-5,
        max_steps=20,
        save_steps=1000,
        bf16=True,
    ),
    "qwen2.5-math-7b": Preset(
        name="qwen2.5-math-7b",
        model="Qwen/Qwen2.5-Math-7B",
        tokenizer="model",
        task="math",
        train_path="data/math_train.parquet",
        num_train=7500,
        max_prompt_length=1024,  # the recipe's; TRL 1.16 has no such limit, so longer prompts are dropped
        prompts_per_generation=1024,
        num_generations=8,
        optimizer_steps_per_generation=4,  # 1024-prompt generation batch / 256-prompt PPO mini-batches
        per_device_train_batch_size=8,  # 256 prompts x 8 = 2048 completions per step = 8 GPUs x 8 x 32 micro-steps
        max_completion_length=3072,
        learning_rate=1e-6,
        weight_decay=0.01,
        max_grad_norm=1.0,
        max_steps=560,  # ~140 generation steps x 4 optimizer steps (20 passes over 7,500 prompts at 1024/step)
        temperature=1.0,
        save_steps=40,
        use_vllm=True,
        bf16=True,
        extra=dict(vllm_mode="colocate", vllm_gpu_memory_utilization=0.35, gradient_checkpointing=True),
    ),
}


def preset(name: str) -> Preset:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ValueError(f"--preset {name!r} is not one of {', '.join(PRESETS)}") from None


def trl_args(p: Preset, a: Algo, *, output_dir: str, seed: int, num_processes: int = 1) -> dict[str, Any]:
    """NGRPOConfig keyword arguments for a preset and an algorithm on ``num_processes`` processes.

    The preset counts like the recipe: ``prompts_per_generation`` prompts x ``num_generations`` samples
    per generation, ``optimizer_steps_per_generation`` optimizer steps on each generation. TRL counts
    micro-steps (calls of ``training_step``): its ``steps_per_generation`` is the number of micro-steps per
    generation and ``generation_batch_size = per_device_train_batch_size * num_processes *
    steps_per_generation`` (trl/trainer/grpo_config.py). So, with ``c`` completions per optimizer step:
    ``gradient_accumulation_steps = c / (num_processes * per_device_train_batch_size)`` micro-steps make
    one optimizer step, and ``steps_per_generation = optimizer_steps_per_generation *
    gradient_accumulation_steps``. The per-device batch stays the preset's on any process count (memory
    per GPU is what limits it); the accumulation absorbs the process count."""
    completions = p.prompts_per_generation * p.num_generations
    steps = p.optimizer_steps_per_generation
    per_step = completions // steps
    per_device = p.per_device_train_batch_size or per_step // num_processes
    gradient_accumulation_steps = per_step // (num_processes * per_device) if per_device else 0
    if per_step * steps != completions:
        raise ValueError(f"{completions} completions per generation ({p.prompts_per_generation} prompts x "
                         f"{p.num_generations}) do not split into optimizer_steps_per_generation={steps} equal steps")
    if gradient_accumulation_steps * num_processes * per_device != per_step:
        raise ValueError(
            f"{completions} completions per generation in {steps} optimizer steps of {per_step} do not split into "
            f"{num_processes} processes x micro-batches of {per_device}: choose a process count and "
            f"--per-device-train-batch-size whose product divides {per_step}")
    args = dict(
        output_dir=output_dir, seed=seed, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=gradient_accumulation_steps,
        steps_per_generation=steps * gradient_accumulation_steps,
        num_generations=p.num_generations, max_completion_length=p.max_completion_length,
        learning_rate=p.learning_rate, lr_scheduler_type="constant", weight_decay=p.weight_decay,
        max_grad_norm=p.max_grad_norm, max_steps=p.max_steps, temperature=p.temperature, top_p=1.0,
        logging_steps=1, save_strategy="steps", save_steps=p.save_steps, report_to=[], bf16=p.bf16,
        use_vllm=p.use_vllm, advantage_estimator=a.estimator, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
        beta=a.beta, filter_all_correct=a.filter_all_correct, filter_all_wrong=a.filter_all_wrong,
        entropy_coef=a.entropy_coef, loss_type="dapo", num_iterations=1, shuffle_dataset=True,
        use_bias_correction_kl=False,  # the fused k3 KL is not ratio-weighted (NGRPOConfig refuses the mix)
        # The published recipe has no rollout importance correction (its ratio is to the trainer's own old
        # log-probs); TRL's default with vLLM reweights, or zeroes above a cap, whole sequences by the
        # trainer / vLLM probability ratio. A preset may ask for it in ``extra``.
        vllm_importance_sampling_correction=False,
        disable_tqdm=True,
    )
    args.update(p.extra)
    return args

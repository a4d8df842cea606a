"""The training run: build (or load) the model and tokenizer, the data and the reward, warm-start the
tiny model, then ``NGRPOTrainer``; write metrics.jsonl, the resolved config, checkpoints and a plot."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import tasks
from .presets import Algo, Preset, trl_args

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads vs the trainer's workers


class MetricsLog(TrainerCallback):
    """One JSON object per optimizer step in OUTPUT/metrics.jsonl, and a one-line progress report.
    ``accuracy`` is the first reward function's mean (the verifier); ``reward_mean`` sums every reward
    function (DAPO's length penalty included)."""

    FIELDS = {"reward_mean": "reward", "reward_std": "reward_std", "frac_all_wrong": "frac_all_wrong",
              "frac_all_correct": "frac_all_correct", "clip_frac": "clip_ratio/region_mean", "entropy": "entropy",
              "loss": "loss", "approx_kl": "approx_kl", "completion_length": "completions/mean_length"}

    # Logged once per generation; the optimizer steps that reuse a generation repeat its values.
    PER_GENERATION = ("reward_mean", "accuracy", "reward_std", "frac_all_wrong", "frac_all_correct",
                      "completion_length")

    def __init__(self, path: Path, max_steps: int, verifier: str, quiet: bool = False):
        self.path, self.max_steps, self.quiet = path, max_steps, quiet
        self.fields = {**self.FIELDS, "accuracy": f"rewards/{verifier}/mean"}
        self._t = time.perf_counter()
        self._generation: dict = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        row = {"step": state.global_step, "seconds": round(now - self._t, 4)}
        self._t = now
        row.update({k: logs[v] for k, v in self.fields.items() if v in logs})
        if "reward_mean" in row:
            self._generation = {k: row[k] for k in self.PER_GENERATION if k in row}
        row = {**self._generation, **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if not self.quiet:
            done = int(30 * state.global_step / max(1, self.max_steps))
            print(f"\r[{'#' * done}{'.' * (30 - done)}] step {state.global_step}/{self.max_steps} "
                  f"accuracy {row.get('accuracy', 0):.3f} clip {row.get('clip_frac', 0):.3f} "
                  f"{row['seconds']:.2f}s/step", end="\n" if state.global_step >= self.max_steps else "", flush=True)


def build_tokenizer(p: Preset):
    if p.tokenizer == "char":
        from .tokenizer import char_tokenizer

        return char_tokenizer(tasks.ALPHABET)
    if p.tokenizer == "qwen":
        from .tokenizer import qwen_tokenizer

        return qwen_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(p.model)
    tok.padding_side = "left"
    return tok


def build_model(p: Preset, tokenizer, seed: int):
    if p.model is not None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(p.model, torch_dtype=torch.bfloat16 if p.bf16 else None)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = dict(p.model_config)
    config.setdefault("vocab_size", len(tokenizer))
    config = Qwen2Config(pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **config)
    model = Qwen2ForCausalLM(config)
    return model.to(torch.bfloat16) if p.bf16 else model  # bf16 weights, as a hub model loaded for RL


def build_data(p: Preset, seed: int):
    """(RL prompts, supervised warm-start rows, held-out rows or None, reward). The synthetic task's
    three sets come from disjoint parts of the problem space (``tasks.split_of``)."""
    if p.task == "arithmetic":
        train = tasks.arithmetic_problems(p.num_train, max_operand=p.max_operand, seed=seed, split="train")
        warm = tasks.arithmetic_problems(p.num_train, max_operand=p.max_operand, seed=seed + 1, split="warm")
        heldout = tasks.heldout_problems(max_operand=p.max_operand, limit=p.heldout_problems)
        return train, warm, heldout, tasks.exact_answer_reward
    rows = tasks.load_math_parquet(p.train_path, limit=p.num_train)
    return rows, rows, None, tasks.math_verify_reward


def prompt_tokens(tokenizer, prompt) -> int:
    """Tokens of a prompt as the trainer feeds it: a chat list through the chat template (with the generation
    prompt), a string as it is."""
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])


def drop_overlong_prompts(rows, tokenizer, limit: int, log=print):
    """The rows whose prompt has at most ``limit`` tokens, as verl's ``data.filter_overlong_prompts`` keeps
    them (TRL 1.16 has no prompt-length limit of its own)."""
    kept = [r for r in rows if prompt_tokens(tokenizer, r["prompt"]) <= limit]
    if len(kept) < len(rows):
        log(f"dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than {limit} tokens")
    return kept


def warm_start(model, tokenizer, rows, *, steps: int, lr: float, batch: int, seed: int, log=print) -> float:
    """Supervised steps on prompt + answer + eos (a random model never earns reward). Returns the last loss."""
    if steps <= 0:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.randint(0, len(rows), (batch,), generator=g).tolist()
        texts = [rows[i]["prompt"] + rows[i]["answer"] + tokenizer.eos_token for i in idx]
        enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"warm start {step + 1}/{steps}: loss {loss.item():.3f}")
    return loss.item()


def greedy_accuracy(model, tokenizer, rows, max_new_tokens: int) -> float:
    """Share of rows whose greedy completion is exactly the answer."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(rows), 64):
            chunk = rows[lo:lo + 64]
            enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            correct += sum(t.strip() == r["answer"] for t, r in zip(texts, chunk))
    model.train()
    return correct / max(1, len(rows))


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at, from its trainer_state.json (any folder name)."""
    state = Path(path) / "trainer_state.json"
    if not state.exists():
        raise ValueError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    return int(json.loads(state.read_text())["global_step"])


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest *complete* checkpoint: the trainer writes trainer_state.json last, so a folder without
    it is a save that was interrupted, skipped."""
    done = [d for d in output_dir.glob("checkpoint-*") if (d / "trainer_state.json").exists()]
    return str(max(done, key=checkpoint_step)) if done else None


def check_options(p: Preset, a: Algo, trainer_impl: str) -> None:
    """What can be refused before anything is built or trained (the batch split is ``trl_args``'s)."""
    if trainer_impl not in ("ngrpo", "trl"):
        raise ValueError(f"trainer_impl={trainer_impl!r} is not 'ngrpo' or 'trl'")
    at_least = dict(max_steps=1, num_generations=2, prompts_per_generation=1, optimizer_steps_per_generation=1,
                    max_completion_length=1, save_steps=1, num_train=1, warm_start_steps=0)
    for name, low in at_least.items():
        if getattr(p, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(p, name)}")
    if p.per_device_train_batch_size is not None and p.per_device_train_batch_size < 1:
        raise ValueError(f"per_device_train_batch_size must be >= 1 (or unset), got {p.per_device_train_batch_size}")
    for name in ("learning_rate", "temperature"):
        if not getattr(p, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(p, name)}")
    if p.save_steps % p.optimizer_steps_per_generation and p.save_steps < p.max_steps:
        raise ValueError(f"save_steps={p.save_steps} is not a multiple of optimizer_steps_per_generation="
                         f"{p.optimizer_steps_per_generation}: a checkpoint inside a generation cannot be resumed "
                         "as the run would have gone on (the generation's last optimizer steps would sample a new one)")
    if p.train_path is not None and p.task != "math":
        raise ValueError(f"train_path is read by the math presets; preset {p.name!r} generates its {p.task} problems")
    if p.model is not None and p.tokenizer != "model":
        raise ValueError(f"model={p.model!r} is read with its own tokenizer (tokenizer='model'), not {p.tokenizer!r}")
    if trainer_impl == "trl" and (a.estimator != "grpo" or a.filter_all_correct or a.filter_all_wrong):
        raise ValueError("the 'trl' trainer is TRL's stock GRPOTrainer: group-normalised GRPO advantages and no "
                         "group filters; run it with algo 'grpo' (NGRPO, DAPO and W-REINFORCE need NGRPOTrainer)")


def _config_record(p: Preset, a: Algo, algo_name: str, seed: int, trainer_impl: str, resolved: dict) -> dict:
    """config.json: what the run was made with, as JSON reads it back."""
    return json.loads(json.dumps({"preset": dataclasses.asdict(p), "algo": dataclasses.asdict(a),
                                  "algo_name": algo_name, "seed": seed, "trainer": trainer_impl,
                                  "trl_args": resolved}, default=str))


def _changed(before: dict, now: dict) -> list[str]:
    """The options two config.json records give differently (one level down: preset.*, algo.*, trl_args.*),
    other than ``max_steps`` (a run may be extended), TRL's micro-batching (it follows from the preset, compared,
    and the process count: a run may resume on another number of GPUs) and those the earlier record does not
    hold (older versions)."""
    derived = {"output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation"}
    out = []
    for part, value in now.items():
        if isinstance(value, dict):
            old = before.get(part) or {}
            skip = {"max_steps"} | (derived if part == "trl_args" else set())
            out += [f"{part}.{k} {old[k]!r} -> {value[k]!r}" for k in value
                    if k not in skip and k in old and old[k] != value[k]]
        elif part in before and before[part] != value:
            out.append(f"{part} {before[part]!r} -> {value!r}")
    return sorted(out)


def _check_resume(out: Path, resume_from: str, record: dict) -> None:
    """A resumed run continues the run in ``out`` with the same options (only ``max_steps`` may grow), and
    its warm start there."""
    checkpoint_step(resume_from)
    config = out / "config.json"
    if config.exists():
        changed = _changed(json.loads(config.read_text()), record)
        if changed:
            raise ValueError(f"--resume: {out} holds a run made with other options ({', '.join(changed[:6])}"
                             f"{', ...' if len(changed) > 6 else ''}); resume with the same options (only "
                             "--max-steps may change) or use another --output-dir")
    p = record["preset"]
    if p["model"] is None and p["warm_start_steps"] and not (out / "warm_start" / "config.json").exists():
        raise ValueError(f"--resume: {out / 'warm_start'} is missing: the run's initial weights are not there")


def _check_fresh(out: Path) -> None:
    """A fresh run does not start over another run's weights: its checkpoints would be what a later
    ``--resume auto`` picks up, whatever algorithm wrote them."""
    left = sorted(d.name for d in out.glob("checkpoint-*")) + (["final"] if (out / "final").exists() else [])
    if left:
        raise ValueError(f"--output-dir {out} holds a previous run's weights ({', '.join(left[:3])}"
                         f"{', ...' if len(left) > 3 else ''}): continue it with --resume auto, or use another "
                         "--output-dir (or delete that one)")


def _warm_start_record(p: Preset, seed: int, warm_rows) -> dict:
    """What a warm start was made from, stored beside its weights: a run re-uses the weights only if
    they came from the same recipe (preset, seed, steps, learning rate, batch and the very problems)."""
    import hashlib

    problems = hashlib.sha256(json.dumps(warm_rows, sort_keys=True).encode()).hexdigest()[:16]
    return {"preset": p.name, "seed": seed, "steps": p.warm_start_steps, "lr": p.warm_start_lr,
            "batch": p.warm_start_batch, "problems": problems}


WARM_START_RECORD = "ngrpo_warm_start.json"


def run(p: Preset, a: Algo, algo_name: str, output_dir: str, *, seed: int = 0, resume: str | None = None,
        quiet: bool = False, train_rows=None, warm_rows=None, heldout_rows=None, plot: bool = True,
        trainer_impl: str = "ngrpo") -> dict:
    """Train; returns a summary dict (also written to OUTPUT/summary.json). ``trainer_impl="trl"`` runs TRL's
    stock ``GRPOTrainer`` (its own loss, fused head and group-normalised advantages) on the same preset, for
    end-to-end comparisons; "ngrpo" (the default) is NGRPOTrainer."""
    from accelerate import PartialState
    from datasets import Dataset

    from ngrpo_kernels.integrations.trl import NGRPOConfig, NGRPOTrainer

    check_options(p, a, trainer_impl)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):  # find out now, not after the warm start
        raise PermissionError(f"--output-dir {out} is not writable")
    # One process, or each of `accelerate launch` / torchrun's; on a machine without CUDA the processes
    # talk over gloo (accelerate only sets that up when told the run is on the CPU).
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    log = (lambda *_: None) if quiet or not main else print
    if p.bf16 and os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" \
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        import warnings

        warnings.warn(f"preset {p.name!r} trains bf16 weights, without FSDP or DeepSpeed (the accelerate configs in "
                      "python/ngrpo_train/accelerate keep float32 master weights): updates below bf16's resolution "
                      f"are lost (at learning rate {p.learning_rate:g}, most of them)", stacklevel=2)
    # the batch split is checked here, before the warm start (its error would otherwise come after it)
    resolved = trl_args(p, a, output_dir=str(out), seed=seed, num_processes=state.num_processes)
    if trainer_impl == "trl":
        for name in ("advantage_estimator", "filter_all_correct", "filter_all_wrong"):
            resolved.pop(name)  # TRL's own: group-normalised advantages, no filters (check_options)
    record = _config_record(p, a, algo_name, seed, trainer_impl, resolved)
    resume_from = last_checkpoint(out) if resume == "auto" else resume
    if resume_from is not None:
        _check_resume(out, resume_from, record)
        if checkpoint_step(resume_from) >= p.max_steps and (out / "summary.json").exists():
            log(f"{out}: already trained to step {checkpoint_step(resume_from)} (max_steps {p.max_steps}); nothing to do")
            return json.loads((out / "summary.json").read_text())
    else:
        _check_fresh(out)
    tokenizer = build_tokenizer(p)
    rows, default_warm, heldout, reward = build_data(p, seed)
    if train_rows is not None:
        rows = train_rows
    warm_rows = default_warm if warm_rows is None else warm_rows
    if heldout_rows is not None:  # a caller with its own task (an empty list: no held-out accuracy here)
        heldout = heldout_rows or None
    if p.max_prompt_length is not None:
        rows = drop_overlong_prompts(rows, tokenizer, p.max_prompt_length, log=log)
    if len(rows) < p.prompts_per_generation:
        raise ValueError(f"{len(rows)} training prompts cannot fill one generation of prompts_per_generation="
                         f"{p.prompts_per_generation}")
    # On this process's device from the start (a GPU where there is one): the warm start and the held-out
    # evaluation run before the trainer would move the model, and on a CPU the evaluation took the
    # gpu-qwen-small preset past the 110 s that benchmarks/gpu_trainer.sh allowed on an H200.
    model = build_model(p, tokenizer, seed).to(state.device)
    summary: dict = {"preset": p.name, "algo": algo_name, "seed": seed}

    warm_dir = out / "warm_start"
    warm_record = _warm_start_record(p, seed, warm_rows) if p.model is None else None
    with state.main_process_first():  # the main process warm-starts; the others then load its weights
        if p.model is None and (warm_dir / "config.json").exists():
            # The run's initial weights (a fresh run re-uses them; a resumed one starts "before" from them),
            # if they were made by this recipe (weights saved before the record existed are taken as they are).
            stored = warm_dir / WARM_START_RECORD
            if stored.exists() and json.loads(stored.read_text()) != warm_record:
                raise ValueError(f"{warm_dir} was made by another warm start ({stored.read_text().strip()}), not "
                                 f"{json.dumps(warm_record)}: use another --output-dir, or delete {warm_dir}")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(warm_dir).to(state.device)
        elif p.model is None:
            if resume_from is not None or not main:  # _check_resume / the main process guarantee it
                raise ValueError(f"{warm_dir} is missing")
            summary["warm_start_loss"] = warm_start(model, tokenizer, warm_rows, steps=p.warm_start_steps,
                                                    lr=p.warm_start_lr, batch=p.warm_start_batch, seed=seed, log=log)
            # Saved atomically: an interrupted save never leaves a half-written or random "warm start".
            tmp = out / "warm_start.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)  # ngrpo-eval reads the "before" model with its own tokenizer
            (tmp / WARM_START_RECORD).write_text(json.dumps(warm_record))
            tmp.rename(warm_dir)
    if p.model is None:
        # TRL builds the KL reference model (beta > 0) from config._name_or_path: point it at the
        # initial policy's weights (the warm-started model), saved here.
        model.config._name_or_path = str(warm_dir)
    if heldout is not None:  # problems in neither the warm-start nor the RL set
        summary["heldout_problems"] = len(heldout)
        summary["heldout_greedy_accuracy_before"] = greedy_accuracy(model, tokenizer, heldout, p.max_completion_length)

    if trainer_impl == "trl":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**resolved)
        trainer_cls = GRPOTrainer
    else:
        args = NGRPOConfig(**resolved)
        trainer_cls = NGRPOTrainer
    metrics_path = out / "metrics.jsonl"
    if main:
        (out / "config.json").write_text(json.dumps(record, indent=2))
        if resume_from is None and metrics_path.exists():
            metrics_path.unlink()
    state.wait_for_everyone()
    rewards = [reward]
    if a.overlong_cache > 0:  # DAPO: correctness first (the filters read it), then the length penalty
        cache = max(1, int(a.overlong_cache * p.max_completion_length))
        rewards.append(tasks.soft_overlong_penalty(p.max_completion_length, cache))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = trainer_cls(model=model, reward_funcs=rewards, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    trainer.add_callback(MetricsLog(metrics_path, p.max_steps, trainer.reward_func_names[0], quiet))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # MetricsLog reports progress; the raw log dicts go to metrics.jsonl
    if resume_from is not None and main:
        _truncate_metrics(metrics_path, checkpoint_step(resume_from))
    trainer.train(resume_from_checkpoint=resume_from)
    save_final_model(trainer, str(out / "final"))
    state.wait_for_everyone()
    if not main:  # the main process evaluates and writes the summary
        return summary

    if heldout is not None:
        summary["heldout_greedy_accuracy_after"] = greedy_accuracy(trainer.model, tokenizer, heldout,
                                                                   p.max_completion_length)
    rows_logged = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    summary["steps"] = trainer.state.global_step
    summary["trainer"] = trainer_impl
    if len(rows_logged) > 2:  # the first steps include compilation and allocator growth
        summary["seconds_per_step"] = sum(r["seconds"] for r in rows_logged[2:]) / (len(rows_logged) - 2)
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        summary["gpu"] = torch.cuda.get_device_name()
    if rows_logged:
        k = max(1, len(rows_logged) // 5)
        summary["reward_first"] = sum(r["reward_mean"] for r in rows_logged[:k]) / k
        summary["reward_last"] = sum(r["reward_mean"] for r in rows_logged[-k:]) / k
        summary["accuracy_first"] = sum(_accuracy(r) for r in rows_logged[:k]) / k
        summary["accuracy_last"] = sum(_accuracy(r) for r in rows_logged[-k:]) / k
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if plot and rows_logged:
        plot_metrics(rows_logged, out / "reward.png", title=f"{p.name} / {algo_name} / seed {seed}")
    return summary


def _accuracy(row: dict) -> float:
    """A metrics.jsonl row's accuracy; rows a run resumed from wrote before the field existed have the total
    reward only (the same number unless a shaping reward was on)."""
    return row.get("accuracy", row["reward_mean"])


def save_final_model(trainer, path: str) -> None:
    """The whole model in ``path``, what ``ngrpo-eval`` loads. Under FSDP, transformers' ``save_model`` writes
    nothing unless the state dict is FULL_STATE_DICT; the recipe's launch config checkpoints sharded (fast,
    resumable), so the last save switches to full, as accelerate's plugin intends."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(path)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop logged steps after the checkpoint (they will be run again)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def plot_metrics(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].plot(steps, [_accuracy(r) for r in rows], label="accuracy of samples (verifier)")
    shaped = any(r["reward_mean"] != _accuracy(r) for r in rows)  # e.g. DAPO's length penalty, down to -1
    if shaped:
        ax[0].plot(steps, [r["reward_mean"] for r in rows], label="reward (all reward functions)")
    ax[0].set(xlabel="step", ylabel="per sample", title=title, ylim=(-1.02 if shaped else -0.02, 1.02))
    ax[1].plot(steps, [r.get("frac_all_wrong", 0) for r in rows], label="all-wrong groups")
    ax[1].plot(steps, [r.get("frac_all_correct", 0) for r in rows], label="all-correct groups")
    ax[1].plot(steps, [r.get("clip_frac", 0) for r in rows], label="clip fraction")
    ax[1].set(xlabel="step", title="group outcomes and clipping")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


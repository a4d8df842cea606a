"""Helper of test_trainer.py::test_two_processes_use_the_single_process_advantages, run under
``torchrun --nproc_per_node 2`` with ACCELERATE_USE_CPU=1: the tiny preset for two steps with a reward
that varies within groups, every process dumping what its loss will see (gathered rewards, its slice of
the advantages, its token count and the global one) to DUMP/rank<r>.jsonl."""

import dataclasses
import json
import os
import sys
import zlib

from ngrpo_kernels.integrations import trl as ngrpo_trl
from ngrpo_train import tasks
from ngrpo_train.presets import algo, preset
from ngrpo_train.train import run

dump = sys.argv[1]
generate_and_score = ngrpo_trl.NGRPOTrainer._generate_and_score_completions


def recorded(self, inputs):
    out = generate_and_score(self, inputs)
    row = dict(rank=self.accelerator.process_index, world=self.accelerator.num_processes,
               rewards=self._gathered_rewards_per_func[:, 0].tolist(), advantages=out["advantages"].tolist(),
               local_tokens=float(out["completion_mask"].sum()), num_items=float(out["num_items_in_batch"]))
    with open(os.path.join(dump, f"rank{row['rank']}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return out


def varied_reward(prompts, completions, **_):
    """Deterministic, about half right, different within a group: every advantage path is exercised."""
    return [float(zlib.crc32((p + c).encode()) % 2) for p, c in zip(prompts, completions)]


ngrpo_trl.NGRPOTrainer._generate_and_score_completions = recorded
tasks.exact_answer_reward = varied_reward
small = dict(model_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False),
             warm_start_steps=5, warm_start_batch=16, prompts_per_generation=4, num_generations=4, max_steps=2,
             save_steps=100, num_train=64, optimizer_steps_per_generation=1, temperature=1.5)
run(dataclasses.replace(preset("tiny"), **small), algo("ngrpo"), "ngrpo", os.path.join(dump, "out"), seed=0,
    quiet=True, plot=False)

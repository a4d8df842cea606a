"""The verl plugin (ngrpo_kernels.integrations.verl) on verl's own functions and data structures, on the CPU:
the names resolve from verl's registries, the estimator and the loss agree with float64 references and with
verl's own vanilla loss, the fused head backend returns what verl's torch backend returns (values and
gradients), the filter keeps all-wrong groups and refills, and the recipe's overrides compose and validate.

verl is installed for the tests (``make setup``: tests/requirements-verl.txt, with --no-deps)."""

import uuid

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

import ngrpo_kernels as nk  # noqa: E402
from ngrpo_kernels.integrations import verl as plugin  # noqa: E402
from ngrpo_kernels.ops.advantages.naive import group_advantages_naive  # noqa: E402
from ngrpo_kernels.ops.policy_loss.naive import policy_loss_naive  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402


def _responses(gen, groups=(8, 8, 8, 1, 5), T=12, correct=(8, 0, 3, 1, 2)):
    """verl-shaped outcome rewards: each response's score on its last valid token, right padding, uid strings,
    responses of a group not contiguous. Groups: all-correct, all-wrong, mixed, a singleton, a mixed one."""
    uids, scores = [], []
    for size, ok in zip(groups, correct):
        uid = str(uuid.UUID(int=int(torch.randint(0, 2**62, (1,), generator=gen))))
        uids += [uid] * size
        scores += [1.0] * ok + [0.0] * (size - ok)
    B = len(uids)
    perm = torch.randperm(B, generator=gen)
    uids = np.array(uids, dtype=object)[perm.numpy()]
    scores = torch.tensor(scores)[perm]
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    return rewards, mask, uids, scores


def test_names_resolve_from_verls_registries():
    assert core_algos.get_adv_estimator_fn("ngrpo") is plugin.compute_ngrpo_outcome_advantage
    assert core_algos.get_policy_loss_fn("ngrpo") is plugin.compute_policy_loss_ngrpo
    from verl.models.transformers import monkey_patch
    from verl.utils.experimental import torch_functional

    assert torch_functional.FusedLinearForPPO is plugin.NGRPOFusedLinearForPPO
    assert monkey_patch.patch_forward_with_backends is plugin.patch_forward_with_backends


def test_estimator_matches_float64_reference_through_verls_compute_advantage(gen):
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    rewards, mask, uids, scores = _responses(gen)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                               non_tensors={"uid": uids})
    config = OmegaConf.create({"adv_estimator": "ngrpo", "ngrpo_r_max": 1.0, "ngrpo_num_virtual": 1,
                               "norm_adv_by_std_in_grpo": True})
    out = compute_advantage(data, adv_estimator="ngrpo", config=config)

    _, ids = np.unique(uids, return_inverse=True)
    want = group_advantages_naive(scores.double(), torch.as_tensor(ids), r_max=1.0, num_virtual=1)
    got = out.batch["advantages"]
    torch.testing.assert_close(got, (want[:, None] * mask).float(), atol=1e-6, rtol=1e-6)
    assert torch.equal(out.batch["returns"], got)
    # NGRPO's point: the all-wrong group gets a negative advantage, the all-correct one exactly zero.
    per_response = got.sum(-1) / mask.sum(-1)
    seen = set()
    for uid in set(uids):
        members = torch.as_tensor(uids == uid)
        n, correct = int(members.sum()), float(scores[members].sum())
        if n == 8 and correct in (0.0, 8.0):
            seen.add(correct)
            assert (per_response[members] < 0).all() if correct == 0 else (per_response[members] == 0).all()
    assert seen == {0.0, 8.0}


def test_estimator_options_and_refusals(gen):
    from omegaconf import OmegaConf

    rewards, mask, uids, scores = _responses(gen)
    _, ids = np.unique(uids, return_inverse=True)
    config = OmegaConf.create({"ngrpo_r_max": 2.0, "ngrpo_num_virtual": 3})
    adv, _ = plugin.compute_ngrpo_outcome_advantage(rewards, mask, uids, config=config)
    want = group_advantages_naive(scores.double(), torch.as_tensor(ids), r_max=2.0, num_virtual=3)
    torch.testing.assert_close(adv, (want[:, None] * mask).float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo"):
        plugin.compute_ngrpo_outcome_advantage(rewards, mask, uids, config=OmegaConf.create(
            {"norm_adv_by_std_in_grpo": False}))
    with pytest.raises(ValueError, match="one group id per response"):
        plugin.compute_ngrpo_outcome_advantage(rewards, mask, uids[:-1])


def _actor_config(**global_batch_info):
    from verl.workers.config import FSDPActorConfig

    config = FSDPActorConfig(strategy="fsdp", clip_ratio_low=0.16, clip_ratio_high=0.24, clip_ratio_c=3.0,
                             ppo_micro_batch_size_per_gpu=2, rollout_n=8)
    config.global_batch_info.update(global_batch_info)
    return config


def _loss_inputs(gen, B=6, T=9):
    mask = torch.rand(B, T, generator=gen) > 0.25
    mask[0] = False  # a fully masked sequence
    mask[1, 0] = True
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, generator=gen)[:, None].expand(B, T) * mask
    isw = torch.rand(B, T, generator=gen) + 0.5
    return logp, old, adv.contiguous(), mask, isw


AGG_CASES = [
    ("token-mean", {}),
    ("token-mean", {"dp_size": 4, "batch_num_tokens": 97}),
    ("token-mean", {"dp_size": 2, "batch_num_tokens": torch.tensor(61)}),
    ("token-sum", {"dp_size": 3}),
    ("seq-mean-token-mean", {}),
    ("seq-mean-token-mean", {"dp_size": 2, "global_batch_size": 13}),
    ("seq-mean-token-sum", {"dp_size": 2, "global_batch_size": 13}),
    ("seq-mean-token-sum-norm", {}),
    ("seq-mean-token-sum-norm", {"dp_size": 2, "global_batch_size": 13, "loss_scale_factor": 512}),
]


@pytest.mark.parametrize("mode,info", AGG_CASES, ids=[f"{m}-{'global' if i else 'local'}" for m, i in AGG_CASES])
def test_policy_loss_matches_verls_vanilla_loss(mode, info, backend, gen):
    """Same clip bounds, dual clip, IS weights and global batch normalisation: our fused loss and verl's vanilla
    PPO loss agree in value, gradient and metrics (NGRPO's loss is verl's asymmetric dual-clip PPO loss)."""
    logp, old, adv, mask, isw = _loss_inputs(gen)
    config = _actor_config(**info)
    ours_lp, verl_lp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    with nk.use_backend(backend):
        ours, ours_metrics = core_algos.get_policy_loss_fn("ngrpo")(
            old_log_prob=old, log_prob=ours_lp, advantages=adv, response_mask=mask, loss_agg_mode=mode, config=config,
            rollout_is_weights=isw)
    want, want_metrics = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=old, log_prob=verl_lp, advantages=adv, response_mask=mask, loss_agg_mode=mode, config=config,
        rollout_is_weights=isw)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-5)
    ours.backward()
    want.backward()
    torch.testing.assert_close(ours_lp.grad, verl_lp.grad, atol=1e-6, rtol=1e-5)
    assert set(ours_metrics) == set(want_metrics)
    for k, v in want_metrics.items():
        assert float(ours_metrics[k]) == pytest.approx(v, abs=1e-6), k


def test_policy_loss_matches_float64_reference(gen):
    logp, old, adv, mask, isw = _loss_inputs(gen)
    config = _actor_config(dp_size=2, batch_num_tokens=50)
    lp = logp.clone().requires_grad_()
    ours, _ = plugin.compute_policy_loss_ngrpo(old, lp, adv, mask, "token-mean", config, isw)
    ours.backward()
    ref_lp = logp.double().requires_grad_()
    want = policy_loss_naive(ref_lp, old.double(), adv.double(), mask, eps_neg=0.16, eps_pos=0.24, clip_ratio_c=3.0,
                             normalizer=25.0, rollout_is_weights=isw.double())[0]
    want.backward()
    torch.testing.assert_close(ours.double(), want, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(lp.grad.double(), ref_lp.grad, atol=1e-7, rtol=1e-6)


def test_policy_loss_errors_are_verls():
    logp, old, adv, mask, _ = _loss_inputs(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        plugin.compute_policy_loss_ngrpo(old, logp, adv, mask, "token-mean", _actor_config(dp_size=2))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        plugin.compute_policy_loss_ngrpo(old, logp, adv, mask, "seq-sum", _actor_config())
    with pytest.raises(ValueError, match="actor config"):
        plugin.compute_policy_loss_ngrpo(old, logp, adv, mask)


# --- the fused actor head ---------------------------------------------------------------------------------

def _tiny_model(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).float()


@pytest.mark.parametrize("via", ["apply_monkey_patch", "patch_forward_with_backends"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "rmpad"])
def test_fused_head_backend_matches_verls_torch_backend(packed, via, backend, gen, monkeypatch):
    """verl's patched forward (dense_common) with impl_backend='ngrpo' vs 'torch': log-probs, entropy and the
    gradients of a loss using both, through the whole model. ``apply_monkey_patch`` is the call verl's FSDP
    engine makes when it builds the model."""
    from verl.models.transformers import monkey_patch

    # apply_monkey_patch imports a class TRL 1.16 no longer has whenever TRL is installed (docs/verl.md): this
    # test environment has TRL for the TRL trainer; a verl environment has verl's TRL pin or none.
    monkeypatch.setattr(monkey_patch, "is_trl_available", lambda: False)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return nk.fused_linear_logprobs(*args, **kwargs)

    monkeypatch.setattr(plugin, "fused_linear_logprobs", counted)
    models = {name: _tiny_model() for name in ("torch", "ngrpo")}
    for name, model in models.items():
        if via == "apply_monkey_patch":
            monkey_patch.apply_monkey_patch(model, use_remove_padding=packed, use_fused_kernels=True,
                                            fused_kernels_backend=name)
        else:
            plugin.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=name)
    assert models["ngrpo"]._verl_fused_kernels_backend == "ngrpo"
    shape = (1, 23) if packed else (3, 11)
    input_ids = torch.randint(0, 97, shape, generator=gen)
    extra = {"shift_labels": torch.roll(input_ids, -1, dims=-1)} if packed else {}
    weights = torch.randn(shape, generator=gen)
    outputs, grads = {}, {}
    for name, model in models.items():
        with nk.use_backend(backend):
            out = model(input_ids=input_ids, temperature=0.7, return_dict=True, **extra)
            ((out.log_probs * weights).sum() + 0.3 * out.entropy.sum()).backward()
        outputs[name] = out
        grads[name] = {k: p.grad for k, p in model.named_parameters()}
    assert len(calls) == 1  # the ngrpo model went through our head, the torch one did not
    ours, theirs = outputs["ngrpo"], outputs["torch"]
    assert ours.log_probs.shape == theirs.log_probs.shape == shape
    assert ours.entropy.shape == shape
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours.entropy, theirs.entropy.float(), atol=2e-5, rtol=1e-5)
    for k, g in grads["torch"].items():
        torch.testing.assert_close(grads["ngrpo"][k], g, atol=2e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("model_kind", ["phi (lm_head bias)", "granite (logits_scaling)", "cohere (logit_scale)",
                                        "gemma2 (soft cap)"])
def test_fused_head_refuses_logits_it_cannot_form(model_kind):
    """verl's fused forward hands the head only lm_head.weight and the temperature: a bias, a logit scale or a
    soft cap would be dropped (log-probs 0.2-2.5 off the distribution vLLM samples from; verl's own torch and
    triton heads drop them alike). impl_backend=ngrpo refuses such a model when verl patches it."""
    import transformers as tr

    small = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    cls, config, words = {
        "phi (lm_head bias)": (tr.PhiForCausalLM, tr.PhiConfig(**small), "lm_head has a bias"),
        "granite (logits_scaling)": (tr.GraniteForCausalLM, tr.GraniteConfig(**small, logits_scaling=8.0),
                                     "scales its logits by 0.125"),
        "cohere (logit_scale)": (tr.CohereForCausalLM, tr.CohereConfig(**small, logit_scale=0.0625),
                                 "scales its logits by 0.0625"),
        "gemma2 (soft cap)": (tr.Gemma2ForCausalLM, tr.Gemma2Config(**small, head_dim=8, final_logit_softcapping=2.0),
                              "final_logit_softcapping"),
    }[model_kind]
    with pytest.raises(ValueError, match=words):  # refused before verl patches the class (its forward stays)
        plugin.patch_forward_with_backends(cls(config), use_fused_kernels=True, fused_kernels_backend="ngrpo")


def test_fused_head_takes_a_head_sharded_by_fsdp2(tmp_path):
    """verl's FSDP2 shards an untied lm_head as its own unit, whose forward (which would gather it) the fused
    forward never calls: the head reads it as a DTensor (verl's torch head: 'mixed torch.Tensor and DTensor').
    One gloo process here (the averaging over ranks is the TRL integration's, tested with two in
    fsdp2_head_run.py): log-probs, entropy and the head's gradient as from the plain weight."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "fsdp2_head.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
        dist.init_process_group("gloo", rank=0, world_size=1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from ngrpo_kernels.integrations import verl as plugin
        torch.manual_seed(0)
        head, plain = torch.nn.Linear(16, 37, bias=False), torch.nn.Linear(16, 37, bias=False)
        plain.load_state_dict(head.state_dict())
        fully_shard(head, mesh=init_device_mesh("cpu", (1,)))
        assert type(head.weight).__name__ == "DTensor"
        h, ids = torch.randn(2, 5, 16), torch.randint(0, 37, (2, 5))
        fused = plugin.NGRPOFusedLinearForPPO(impl_backend="ngrpo")
        got = fused(h, head.weight, ids, temperature=0.7)
        want = fused(h, plain.weight, ids, temperature=0.7)
        (got[0].sum() + got[1].sum()).backward()
        (want[0].sum() + want[1].sum()).backward()
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(head.weight.grad.full_tensor(), plain.weight.grad)
        # bf16 hidden states: the float32 master shard is gathered, then computed in bf16 (as FSDP2's
        # mixed precision would for the head's own forward), not as an exact float32 GEMM
        seen = []
        real = plugin.fused_linear_logprobs
        plugin.fused_linear_logprobs = lambda x, w, *a, **k: (seen.append(w.dtype), real(x, w, *a, **k))[1]
        got = fused(h.bfloat16(), head.weight, ids)
        plugin.fused_linear_logprobs = real
        assert seen == [torch.bfloat16] and got[0].dtype == torch.float32
        torch.testing.assert_close(got[0], fused(h.bfloat16(), plain.weight.bfloat16(), ids)[0])
        dist.destroy_process_group()
        print("ok")
    """))
    import os
    import random

    env = dict(os.environ, PORT=str(random.randint(20000, 40000)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_other_fused_backends_are_untouched():
    from verl.utils.experimental import torch_functional

    head = torch_functional.FusedLinearForPPO(impl_backend="torch")
    assert head.impl_backend == "torch"
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):
        torch_functional.FusedLinearForPPO(impl_backend="bogus")


# --- the all-correct filter with refill --------------------------------------------------------------------

class _FakeTransferQueue:
    """The three TransferQueue calls the replay buffer makes, over an in-memory store: prompt keys ``uid`` with
    their status, trajectory keys ``uid_i`` with their reward. ``refill`` adds finished groups from a queue."""

    def __init__(self, groups):
        self.store, self.rewards, self.queue, self.refilled = {}, {}, [], 0
        for uid, rewards in groups.items():
            self.add(uid, rewards, step=0)

    def add(self, uid, rewards, step):
        self.store[uid] = {"is_prompt": True, "status": "finished", "global_steps": step}
        for i, r in enumerate(rewards):
            self.store[f"{uid}_{i}"] = {}
            self.rewards[f"{uid}_{i}"] = torch.tensor([0.0, float(r)])

    def refill(self, n):
        self.refilled += n
        for _ in range(n):
            uid, rewards = self.queue.pop(0)
            self.add(uid, rewards, step=1)

    def kv_list(self):
        return {"train": dict(self.store)}

    def kv_batch_get(self, keys, partition_id, select_fields):
        return {"rm_scores": [self.rewards[k] for k in keys]}

    def kv_clear(self, partition_id, keys):
        for k in keys:
            self.store.pop(k, None)


@pytest.mark.parametrize("sampler", ["ngrpo", "verl-dapo"])
def test_filter_drops_only_all_correct_groups_and_refills(sampler, monkeypatch):
    from verl.trainer.ppo.v1 import replay_buffer
    from ngrpo_kernels.integrations.verl.sampler import NGRPOReplayBuffer

    fake = _FakeTransferQueue({"a": [1, 1, 1, 1], "b": [0, 0, 0, 0], "c": [1, 0, 0, 1], "d": [0, 1, 1, 1]})
    fake.queue = [("e", [1, 1, 1, 1]), ("f", [0, 1, 0, 0]), ("g", [1, 0, 1, 0]), ("h", [0, 0, 1, 0])]
    for name in ("kv_list", "kv_batch_get", "kv_clear"):
        monkeypatch.setattr(replay_buffer.tq, name, getattr(fake, name))
    common = dict(trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None, max_off_policy_strategy="drop",
                  poll_interval=0.0, refill_fn=fake.refill)
    if sampler == "ngrpo":
        buffer = NGRPOReplayBuffer(sampler_kwargs={"train_batch_size": 4, "correct_reward": 1.0}, **common)
    else:
        buffer = replay_buffer.ReplayBuffer(sampler_kwargs={}, filter_groups_metric="reward", train_batch_size=4,
                                            gen_batch_size=1, **common)
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=4)
    kept = sorted({k.split("_")[0] for k in batch.keys})
    if sampler == "ngrpo":  # a evicted (2 refills: e, then f); e evicted too (2 more: g, h); b, c, d, f kept
        assert kept == ["b", "c", "d", "f"]
        assert metrics["training/filter_groups/evicted_samples"] == 2
    else:  # verl's DAPO rule also evicts the all-wrong b
        assert "b" not in kept and len(kept) == 4
    assert fake.refilled >= 2
    evicted = ["a", "e"] if sampler == "ngrpo" else ["a", "b"]
    assert not any(k.split("_")[0] in evicted for k in fake.store)  # evicted groups left TransferQueue


def test_filter_needs_the_batch_size_and_the_sync_trainer():
    from ngrpo_kernels.integrations.verl.sampler import NGRPOReplayBuffer

    with pytest.raises(ValueError, match="train_batch_size"):
        NGRPOReplayBuffer("sync", {}, None, "drop", {}, refill_fn=lambda n: None)
    with pytest.raises(ValueError, match="correct_rewrd"):  # a misspelt option is not a silent default
        NGRPOReplayBuffer("sync", {}, None, "drop", {"train_batch_size": 4, "correct_rewrd": 0.5},
                          refill_fn=lambda n: None)
    for mode in ("colocate_async", "separate_async"):  # verl would call the async buffer's methods
        with pytest.raises(ValueError, match="trainer_mode"):
            NGRPOReplayBuffer(mode, {}, None, "drop", {"train_batch_size": 4}, refill_fn=lambda n: None)
    buffer = NGRPOReplayBuffer("sync", {}, None, "drop", {"train_batch_size": 4, "sync_refill_failed_groups": True},
                               refill_fn=lambda n: None)
    assert buffer.sync_refill_failed_groups and buffer.correct_reward == 1.0


# --- torch.compile of the plugin's loss ----------------------------------------------------------------------

def test_policy_loss_compiles_fullgraph(gen):
    logp, old, adv, mask, isw = _loss_inputs(gen)
    config = _actor_config(dp_size=1, batch_num_tokens=40)
    fn = torch.compile(lambda lp: plugin.compute_policy_loss_ngrpo(old, lp, adv, mask, "token-mean", config, isw)[0],
                       backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(logp), plugin.compute_policy_loss_ngrpo(old, logp, adv, mask, "token-mean", config,
                                                                          isw)[0])


# --- the authors' recipe on verl -------------------------------------------------------------------------------

def _toy_math_dir(tmp_path):
    import pandas as pd

    src = tmp_path / "src"
    src.mkdir()
    pd.DataFrame({"prompt": [[{"role": "user", "content": f"What is ${i}+1$?"}] for i in range(5)],
                  "reward_model": [{"ground_truth": {"target": str(i + 1)}, "style": "rule"} for i in range(5)]}
                 ).to_parquet(src / "math_train.parquet")
    pd.DataFrame({"problem": ["What is $2+2$?"], "answer": ["4"]}).to_parquet(src / "aime2025.parquet")
    return src


def test_recipe_composes_validates_and_resolves(tmp_path):
    """The launch command's overrides on verl's own config: Hydra composes them, verl's validate_config passes,
    the numbers are the recipe's (docs/algorithm.md §6), and every name resolves to this package's code."""
    import os

    from hydra import compose, initialize_config_dir
    from ngrpo_train import verl_recipe
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.import_utils import load_extern_object, load_extern_type

    from ngrpo_kernels.integrations.verl.sampler import NGRPOReplayBuffer

    data = tmp_path / "verl"
    assert verl_recipe.prepare(str(_toy_math_dir(tmp_path)), str(data)) == {"train": 5, "aime2025": 1}
    overrides = verl_recipe.recipe_overrides("Qwen/Qwen2.5-Math-7B", str(data))
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
        # the filter's batch size follows a user's override of the data's (it is an interpolation)
        smaller = compose(config_name="ppo_trainer", overrides=overrides + ["data.train_batch_size=512"])
    assert dict(smaller.trainer.v1.sampler.sampler_kwargs)["train_batch_size"] == 512
    assert not need_reference_policy(cfg) and not need_critic(cfg)  # no KL: no reference model; no critic
    validate_config(config=cfg, use_reference_policy=False, use_critic=False)

    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert (cfg.data.train_batch_size, rollout.n, actor.ppo_mini_batch_size, actor.ppo_epochs) == (1024, 8, 256, 1)
    assert cfg.data.train_batch_size // actor.ppo_mini_batch_size == 4  # optimizer steps per generation
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.entropy_coeff, actor.optim.lr) == (0.16, 0.24, 0.001, 1e-6)
    # the gradient clip where verl's FSDP engine reads it (actor.grad_clip is a deprecated field it ignores)
    assert actor.optim.clip_grad == 1.0 and not any(".grad_clip=" in o for o in overrides)
    assert cfg.trainer.max_actor_ckpt_to_keep == 3
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (1024, 3072)
    assert not actor.use_kl_loss and not cfg.algorithm.use_kl_in_reward and actor.loss_agg_mode == "token-mean"
    assert cfg.trainer.v1.sampler.sampler_kwargs.train_batch_size == cfg.data.train_batch_size
    assert list(cfg.data.val_files) == [str(data / "aime2025.parquet")]  # held out: never the training file

    assert core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator) is plugin.compute_ngrpo_outcome_advantage
    assert core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode) is plugin.compute_policy_loss_ngrpo
    assert cfg.actor_rollout_ref.model.fused_kernel_options.impl_backend == plugin.NAME
    sampler = cfg.trainer.v1.sampler.custom_sampler
    assert load_extern_type(sampler.path, sampler.name) is NGRPOReplayBuffer
    reward = cfg.reward.custom_reward_function
    assert load_extern_object(reward.path, reward.name).__qualname__ == "compute_score"


def test_prepare_leaves_training_problems_out_of_the_held_out_sets(tmp_path, capsys):
    """A held-out problem that the training file also holds (here in other case and spacing, as MATH's test
    repeats one training problem) is left out of the held-out set, and the count is said."""
    import pandas as pd
    from ngrpo_train import tasks, verl_recipe

    src = _toy_math_dir(tmp_path)
    pd.DataFrame({"problem": ["what is  $3+1$?", "What is $9+9$?"], "solution": [r"\boxed{4}", r"\boxed{18}"]}
                 ).to_parquet(src / "math_test.parquet")
    written = verl_recipe.prepare(str(src), str(tmp_path / "verl"))
    assert written["math_test"] == 1 and "1 problem(s) also in" in capsys.readouterr().out
    held = tasks.load_math_parquet(str(tmp_path / "verl" / "math_test.parquet"))
    assert [r["answer"] for r in held] == ["18"]


def test_recipe_reward_and_data(tmp_path):
    import pandas as pd
    from ngrpo_train import verl_recipe

    pytest.importorskip("math_verify")
    data = tmp_path / "verl"
    verl_recipe.prepare(str(_toy_math_dir(tmp_path)), str(data))
    train = pd.read_parquet(data / "train.parquet")
    row = train.iloc[2]
    assert row["reward_model"]["ground_truth"] == "3"
    assert row["prompt"][0]["content"].endswith("put your final answer within \\boxed{}.")
    score = verl_recipe.compute_score
    assert score(row["data_source"], r"so it is \boxed{3}", "3") == 1.0
    assert score(row["data_source"], r"\boxed{\frac{6}{2}}", "3") == 1.0
    assert score(row["data_source"], r"\boxed{4}", "3") == 0.0
    assert score(row["data_source"], "3", "3") == 0.0  # no \boxed{}: wrong, as in the recipe
    assert score(None, r"\boxed{3}", {"target": "3"}) == 1.0


def test_recipe_reward_is_bounded_in_time_from_a_worker_thread():
    """verl's reward loop calls compute_score from worker threads, where math-verify's signal-based timeouts
    cannot run: with them switched off, one answer (a tower of powers) kept a step waiting for ever. From a
    thread the score runs in a process pool, math-verify's timeouts on; a slow one counts as wrong."""
    import concurrent.futures
    import time

    from ngrpo_train import verl_recipe

    pytest.importorskip("math_verify")
    start = time.perf_counter()
    threads = concurrent.futures.ThreadPoolExecutor(2)
    right = threads.submit(verl_recipe.compute_score, None, r"so \boxed{\frac{6}{2}}", "3")
    tower = threads.submit(verl_recipe.compute_score, None, r"so the answer is \boxed{9^{9^{9^{9}}}}", "5")
    limit = verl_recipe.SCORE_TIMEOUT + 20
    assert (right.result(timeout=limit), tower.result(timeout=limit)) == (1.0, 0.0)
    assert time.perf_counter() - start < limit
    threads.shutdown(wait=False)


def test_recipe_reward_survives_a_dead_scoring_process():
    """A scoring process killed (the OOM killer) broke the pool for good: every later reward call raised. That
    answer now counts as wrong and the next call gets a new pool."""
    import concurrent.futures
    import os
    import signal

    from ngrpo_train import verl_recipe

    pytest.importorskip("math_verify")
    if verl_recipe._pool is not None:  # a pool of this test's own, whose one process is the one killed (with a
        verl_recipe._score_pool(broken=verl_recipe._pool)  # second, idle one, a later call could meet the break)
    threads = concurrent.futures.ThreadPoolExecutor(1)
    score = lambda: threads.submit(verl_recipe.compute_score, None, r"\boxed{3}", "3").result(timeout=60)  # noqa: E731
    assert score() == 1.0
    assert len(verl_recipe._pool._processes) == 1
    os.kill(next(iter(verl_recipe._pool._processes)), signal.SIGKILL)
    assert [score() for _ in range(3)] == [0.0, 1.0, 1.0]  # the call that met the dead pool counts 0
    threads.shutdown(wait=False)


def test_recipe_launch_dry_run(tmp_path, capsys):
    from ngrpo_train import verl_recipe

    assert verl_recipe.main(["launch", "--data", str(tmp_path), "--gpus", "4", "--dry-run", "trainer.total_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "verl.trainer.main_ppo" in out and "trainer.n_gpus_per_node=4" in out
    assert out.rstrip().endswith("trainer.total_epochs=1")  # extra overrides come last (Hydra: last one wins)
    # No data prepared yet: validation still names only held-out files, and a real launch refuses to start.
    val = next(o for o in verl_recipe.recipe_overrides("m", str(tmp_path)) if o.startswith("data.val_files="))
    assert "train.parquet" not in val and all(f"{name}.parquet" in val for name in verl_recipe.HELD_OUT)
    (tmp_path / "train.parquet").write_bytes(b"")
    with pytest.raises(SystemExit, match="no held-out set"):
        verl_recipe.main(["launch", "--data", str(tmp_path)])
    # the plugin joins a user's external modules instead of replacing them
    assert verl_recipe.launch_env({"VERL_USE_EXTERNAL_MODULES": "mine"})["VERL_USE_EXTERNAL_MODULES"] == (
        "mine," + verl_recipe.PLUGIN)
    assert verl_recipe.launch_env({})["VERL_USE_EXTERNAL_MODULES"] == verl_recipe.PLUGIN
    assert verl_recipe.launch_env({"VERL_USE_EXTERNAL_MODULES": verl_recipe.PLUGIN})[
        "VERL_USE_EXTERNAL_MODULES"] == verl_recipe.PLUGIN


def test_import_verl_loads_the_plugin_through_its_entry_point():
    """A fresh process that only imports verl has the ngrpo names (the verl.plugins entry point), and
    VERL_USE_EXTERNAL_PLUGINS=none turns that off."""
    import os
    import subprocess
    import sys

    code = ("import verl\nfrom verl.trainer.ppo import core_algos\n"
            "print('ngrpo' in core_algos.ADV_ESTIMATOR_REGISTRY, 'ngrpo' in core_algos.POLICY_LOSS_REGISTRY)")
    for policy, want in (("auto", "True True"), ("none", "False False")):
        env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": policy}
        env.pop("VERL_USE_EXTERNAL_MODULES", None)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == want, (policy, out.stdout)

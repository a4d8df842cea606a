"""The released recipe's group filter on verl's v1 trainer: drop only the all-correct groups, keep the
all-wrong ones (NGRPO gives them a negative advantage), and refill the batch with new prompts.

verl's own dynamic sampling (``algorithm.filter_groups``, DAPO) evicts every group whose reward is the same
for all its responses, all-wrong ones included. ``NGRPOReplayBuffer`` is verl's ``ReplayBuffer`` with that
rule narrowed: a group is evicted only when every response has the same reward and that reward is at least
``correct_reward`` (default 1.0, the reward of a correct answer). The rest is verl's machinery unchanged:
each evicted group buys two refill prompts from the dataloader (at most ``max_inflight_gen_batches`` batches
in flight), the step waits until ``train_batch_size`` groups are kept, and any surplus is discarded (the
released code carried the surplus over to the next step instead; verl's sync trainer has no buffer).

Settings (``ngrpo_train.verl_recipe`` writes them)::

    algorithm.filter_groups.enable=True
    trainer.v1.sampler.custom_sampler.path=pkg://ngrpo_kernels.integrations.verl.sampler
    trainer.v1.sampler.custom_sampler.name=NGRPOReplayBuffer
    +trainer.v1.sampler.sampler_kwargs.train_batch_size=1024     # = data.train_batch_size
    +trainer.v1.sampler.sampler_kwargs.correct_reward=1.0

verl hands a custom sampler neither the filter metric nor the batch size (it does for its own), hence the
``sampler_kwargs`` (also ``metric``, ``max_inflight_gen_batches`` and ``sync_refill_failed_groups``, which
verl gives its own sampler only; an unknown key is refused). Only ``trainer.v1.trainer_mode=sync`` (verl's
default) can use this class: other modes are refused.
"""

from __future__ import annotations

from collections import Counter

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

__all__ = ["NGRPOReplayBuffer"]

# What the sampler reads from trainer.v1.sampler.sampler_kwargs (verl passes a custom sampler nothing else).
_OPTIONS = {"train_batch_size", "correct_reward", "metric", "max_inflight_gen_batches", "sync_refill_failed_groups"}


class NGRPOReplayBuffer(ReplayBuffer):
    def __init__(self, trainer_mode, trainer_config, max_off_policy_threshold, max_off_policy_strategy, sampler_kwargs,
                 poll_interval: float = 2.0, refill_fn=None, **kwargs):
        if trainer_mode != "sync":  # verl builds a custom sampler in every mode; this one is the sync buffer
            raise ValueError(f"NGRPOReplayBuffer is verl's sync ReplayBuffer: trainer.v1.trainer_mode={trainer_mode!r} "
                             "needs the async buffer's interface and staleness rules (use trainer_mode=sync)")
        options = dict(sampler_kwargs or {})
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(f"unknown trainer.v1.sampler.sampler_kwargs for NGRPOReplayBuffer: {unknown} "
                             f"(known: {sorted(_OPTIONS)})")
        if "train_batch_size" not in options:
            raise ValueError("NGRPOReplayBuffer needs +trainer.v1.sampler.sampler_kwargs.train_batch_size "
                             "(= data.train_batch_size): verl does not pass it to a custom sampler")
        self.correct_reward = float(options.get("correct_reward", 1.0))
        kwargs.update(filter_groups_metric=options.get("metric", "reward"),
                      train_batch_size=int(options["train_batch_size"]), gen_batch_size=1,
                      max_inflight_gen_batches=int(options.get("max_inflight_gen_batches", 1)),
                      sync_refill_failed_groups=bool(options.get("sync_refill_failed_groups", False)))
        super().__init__(trainer_mode, trainer_config, max_off_policy_threshold, max_off_policy_strategy,
                         sampler_kwargs, poll_interval=poll_interval, refill_fn=refill_fn, **kwargs)

    def _dapo_filtered_keys(self, partition_id: str) -> tuple[set[str], Counter]:
        """verl's classification (the shared reward of each uniform finished group, cached), keeping for
        eviction only the groups whose shared reward is a correct answer's."""
        uniform, _ = super()._dapo_filtered_keys(partition_id)
        shared = self._dapo_classification_cache[partition_id]
        all_correct = {uid for uid in uniform if shared[uid] >= self.correct_reward}
        return all_correct, Counter(shared[uid] for uid in all_correct)

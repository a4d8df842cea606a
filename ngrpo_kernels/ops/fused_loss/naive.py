"""The fused linear -> NGRPO loss as the composition of the reference ops: the specification.

advantages (from rewards, or given) -> log-probs and entropy from full logits -> policy loss. Autograd
gives the gradients. Materialises [tokens, V] logits: tests and small inputs only.
"""

from __future__ import annotations

import torch

from ..advantages.naive import ngrpo_advantages_naive
from ..linear_logprobs.naive import linear_logprobs_naive
from ..policy_loss.naive import policy_loss_naive


def fused_linear_ngrpo_loss_naive(
    hidden, weight, targets, mask, old_logprobs, *, advantages=None, rewards=None, group_ids=None, bias=None,
    temperature=1.0, r_max=1.0, num_virtual=1, **loss_options,
):
    if advantages is None:
        advantages = ngrpo_advantages_naive(rewards.double(), group_ids, r_max=r_max, num_virtual=num_virtual)
    valid = mask != 0
    # Masked positions read target 0 and are zeroed after; a valid position's target is read as it is (one
    # outside [0, V), possible only with validate=False, is an index error, never taken for an ignore marker).
    logprobs, entropy = linear_logprobs_naive(hidden, weight, torch.where(valid, targets, 0), bias=bias,
                                              temperature=temperature, ignore_index=None)
    zero = logprobs.new_zeros(())
    logprobs, entropy = torch.where(valid, logprobs, zero), torch.where(valid, entropy, zero)
    if old_logprobs is None:  # on-policy: the ratio is exactly 1 and carries the gradient of logp
        old_logprobs = logprobs.detach()
    loss, metrics = policy_loss_naive(logprobs, old_logprobs, advantages.to(logprobs.dtype), mask,
                                      entropy=entropy, **loss_options)
    n = valid.sum()
    metrics["logprob_mean"] = (logprobs.detach() * valid).sum() / n if n > 0 else logprobs.sum().detach() * 0
    return loss, metrics

"""Log-probs (and entropy) of sampled tokens from hidden states and the lm_head: the readable spec
(docs/algorithm.md §5). Materialises the full [N, V] logits, so it is only for tests and small inputs.
"""

from __future__ import annotations

import torch


def linear_logprobs_naive(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100):
    """Returns (logprobs, entropy) with the leading shape of ``targets``, in the inputs' dtype
    (pass float64 for the ground truth). Ignored positions give 0 and receive no gradient;
    ``ignore_index=None`` ignores none (a target outside [0, V) is then an index error)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    picked = log_p.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # = logsumexp(z) - sum softmax(z) * z
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(valid, picked, zero), torch.where(valid, entropy, zero)

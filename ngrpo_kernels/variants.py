"""The named loss variants, in one place.

Aggregation modes and advantage estimators are enums whose values are the strings RL stacks use
(verl's ``loss_agg_mode`` names). The reference, the kernels' host code and the docs all read these
enums; no other module re-parses the strings.
"""

from __future__ import annotations

import enum


def _parse(cls, value, argument: str):
    # A lookup in the members' table, not ``cls(value)``: the public ops call this under torch.compile,
    # and Dynamo (torch 2.11) cannot trace an Enum constructor.
    if isinstance(value, cls):
        return value
    member = cls._value2member_map_.get(value) if isinstance(value, str) else None
    if member is None:
        names = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{argument}={value!r} is not one of {names}")
    return member


class AggMode(str, enum.Enum):
    """How per-token losses become one scalar (docs/algorithm.md §4).

    With ``m`` the validity mask, ``n_b`` the valid tokens of sequence ``b``, ``S`` the sequences
    that have at least one valid token and ``L`` the length budget:

    - ``token-mean``: ``sum_bt m*l / N`` with ``N = sum m`` (DAPO; the default).
    - ``seq-mean-token-mean``: ``sum_b (sum_t m*l / n_b) / S`` (original GRPO).
    - ``seq-mean-token-sum``: ``sum_b (sum_t m*l) / S``.
    - ``seq-mean-token-sum-norm``: ``sum_bt m*l / L`` (Dr. GRPO; ``L`` defaults to ``T``), as verl
      computed it before 0.9: no division by the number of sequences unless a ``normalizer`` is given
      (verl 0.9 divides by the global sequence count: the verl plugin passes it as the normalizer).

    An explicit ``normalizer`` replaces the outer denominator (``N``, ``S``, or ``1`` for the
    sum-norm mode). Passing the whole batch's value to every micro-batch makes the micro-batch
    losses (and gradients) sum to the whole batch's.
    """

    TOKEN_MEAN = "token-mean"
    SEQ_MEAN_TOKEN_MEAN = "seq-mean-token-mean"
    SEQ_MEAN_TOKEN_SUM = "seq-mean-token-sum"
    SEQ_MEAN_TOKEN_SUM_NORM = "seq-mean-token-sum-norm"

    @classmethod
    def parse(cls, value: "str | AggMode") -> "AggMode":
        return _parse(cls, value, "loss_agg_mode")


class Estimator(str, enum.Enum):
    """Group advantage estimators sharing the segmented-statistics machinery (docs/algorithm.md §2)."""

    NGRPO = "ngrpo"              # (r - mu') / (sigma' + eps), virtual r_max sample(s) in the stats
    GRPO = "grpo"                # (r - mean) / (std + eps)
    DR_GRPO = "dr_grpo"          # r - mean
    W_REINFORCE = "w_reinforce"  # +lambda if correct else -1; no baseline

    @classmethod
    def parse(cls, value: "str | Estimator") -> "Estimator":
        return _parse(cls, value, "estimator")


class Stat(enum.IntEnum):
    """Columns of the per-program partial sums that every policy-loss backend writes.

    All sums run over valid tokens only. ``LOSS`` is weighted by the per-token factor of the aggregation
    mode; the global denominator is applied once on the device by the policy-loss entry point, and
    folded into the per-token weights by the fused loss (whose kernels then form the loss's own
    gradient: an unnormalised one can overflow fp16).
    """

    LOSS = 0        # sum of row_scale * l_t
    CLIPPED = 1     # tokens where the clipped branch of the asymmetric clip was chosen
    LOG_RATIO = 2   # sum of old_logp - logp   (approx KL to the old policy)
    ADV = 3         # sum of the (broadcast) advantage
    ENTROPY = 4     # sum of entropy
    KL_REF = 5      # sum of the k3 KL to the reference policy
    DUAL_CLIPPED = 6  # tokens where the dual-clip bound -c*A was chosen
    LOGPROB = 7     # sum of logp


NUM_STATS = len(Stat)

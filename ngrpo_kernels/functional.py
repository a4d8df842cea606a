"""The public functional API: validate at the boundary, pick the backend once, call the op.

Every function takes ``validate=True``: checks that must read tensor values (NaN/inf, 0/1 masks,
positive tensor normalisers) then cost one device synchronisation per call. Pass ``validate=False`` in
hot loops once the inputs are known to be sound; structural checks (shapes, dtypes, devices, options)
always run and never synchronise.
"""

from __future__ import annotations

import warnings

import torch

from . import _checks as check
from . import _library
from .backend import selected_backend
from .variants import AggMode, Estimator

__all__ = ["fused_linear_logprobs", "fused_linear_ngrpo_loss", "group_advantages", "ngrpo_advantages", "ngrpo_policy_loss"]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    estimator: str | Estimator = "ngrpo",
    r_max: float = 1.0,
    num_virtual: int = 1,
    eps: float = 1e-6,
    unbiased: bool = True,
    w_lambda: float = 0.1,
    correct_threshold: float = 0.5,
    validate: bool = True,
) -> torch.Tensor:
    """Per-response advantages from scalar rewards and group ids (docs/algorithm.md §2).

    Args:
        rewards: [B] float rewards, one per response.
        group_ids: [B] integer id of each response's prompt. Any values; members of a group need not be
            contiguous; singleton groups get ``r / (1 + eps)`` (mean 0, std 1, no virtual sample).
        estimator: ``"ngrpo"`` (virtual max-reward calibration), ``"grpo"`` ((r - mean) / (std + eps)),
            ``"dr_grpo"`` (r - mean) or ``"w_reinforce"`` (+w_lambda if r > correct_threshold, else -1).
        r_max, num_virtual: the virtual samples' reward and count (NGRPO only; ``num_virtual=0`` is GRPO).
        eps: added to the std outside the square root.
        unbiased: Bessel-corrected std (divide by N - 1, the default, as the released code and
            ``torch.std``); ``False`` gives the paper's printed population std (divide by N).
        validate: check that rewards are finite (one sync); ``False`` skips it.

    Returns:
        [B] float32 advantages on the rewards' device.
    """
    estimator = Estimator.parse(estimator)
    check.tensor("rewards", rewards, ranks=(1,))
    check.tensor("group_ids", group_ids, ranks=(1,))
    check.floating("rewards", rewards)
    check.integer("group_ids", group_ids)
    check.nonempty("rewards", rewards)
    check.same_shape("group_ids", group_ids, "rewards", rewards)
    device = check.same_device({"rewards": rewards, "group_ids": group_ids})
    r_max = check.finite_number("r_max", r_max)
    num_virtual = check.nonnegative_int("num_virtual", num_virtual)
    eps = check.open_unit("eps", eps)
    w_lambda = check.finite_number("w_lambda", w_lambda)
    correct_threshold = check.finite_number("correct_threshold", correct_threshold)
    if check.flag("validate", validate):
        values = check.ValueChecks()
        values.finite("rewards", rewards)
        values.run()
    return _library.group_advantages(  # no gradient, on every backend: rewards are data
        selected_backend(device), rewards.detach(), group_ids, estimator=estimator, r_max=r_max,
        num_virtual=num_virtual, eps=eps, unbiased=check.flag("unbiased", unbiased), w_lambda=w_lambda,
        correct_threshold=correct_threshold,
    )


def ngrpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    r_max: float = 1.0,
    num_virtual: int = 1,
    eps: float = 1e-6,
    unbiased: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """NGRPO advantage calibration (docs/algorithm.md §2): GRPO statistics with ``num_virtual`` virtual samples of
    reward ``r_max`` added to each group of two or more; all-wrong groups get a negative advantage.
    See ``group_advantages`` for the arguments. Returns [B] float32."""
    return group_advantages(
        rewards, group_ids, estimator=Estimator.NGRPO, r_max=r_max, num_virtual=num_virtual, eps=eps,
        unbiased=unbiased, validate=validate,
    )


def ngrpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_neg: float = 0.16,
    eps_pos: float = 0.24,
    clip_ratio_c: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_agg_mode: str | AggMode = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    length_budget: float | None = None,
    rollout_is_weights: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The NGRPO policy loss with asymmetric clipping (docs/algorithm.md §3-§4), fused forward and backward.

    Per valid token: ``rho = exp(logprobs - old_logprobs)``;
    ``l = -min(rho A, clip(rho, 1 - eps_neg, 1 + eps_pos) A)``, bounded by ``-clip_ratio_c A`` for
    ``A < 0`` when ``clip_ratio_c`` is given (dual clip), times ``rollout_is_weights`` when given;
    plus ``beta * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1`` when ``ref_logprobs`` is given;
    minus ``entropy_coef * entropy``. Then aggregated by ``loss_agg_mode`` (see ``AggMode``).

    Args:
        logprobs: [B, T] float, the current policy's log-probs of the sampled tokens (gets a gradient).
        old_logprobs: [B, T] float, the behaviour policy's log-probs (no gradient).
        advantages: [B] or [B, 1] (one per sequence) or [B, T] float (no gradient).
        mask: [B, T] bool, or 0/1 integer or float: which tokens count. Masked positions are never read
            into the result, so padding may hold anything (even NaN).
        ref_logprobs, entropy, rollout_is_weights: optional [B, T] float; ``entropy`` gets a gradient;
            ``rollout_is_weights`` may also be [B, 1] (one per sequence).
        normalizer: replaces the aggregation's denominator (the token count for token-mean, the number
            of non-empty sequences for the seq-mean modes, 1 for seq-mean-token-sum-norm). Give every
            micro-batch the whole batch's value (e.g. TRL's ``num_items_in_batch``): micro-batch losses
            and gradients then sum to the whole batch's. A number or a 0-dim tensor (> 0). Two cases
            break that invariance and warn: seq-mean-token-sum-norm without ``length_budget`` (the
            budget would be each micro-batch's own padded T), and, in the fused loss, ``rewards=`` (the
            group statistics then come from one micro-batch: groups must not be split).
        length_budget: the constant length of seq-mean-token-sum-norm (default: T).
        validate: check values (finite inputs at valid positions, 0/1 mask, positive tensor
            normaliser) with one sync; ``False`` skips them.

    Returns:
        ``(loss, metrics)``: a 0-dim loss, and 0-dim metric tensors averaged over valid tokens:
        ``clip_frac`` (clipped branch chosen), ``approx_kl`` (mean old_logp - logp), ``adv_mean``, and
        ``entropy`` / ``kl`` (k3 to the reference) / ``dual_clip_frac`` when those inputs are given.
        A fully masked batch gives loss 0, zero gradients and zero metrics. No host synchronisation
        when ``validate=False``.
    """
    loss_agg_mode = AggMode.parse(loss_agg_mode)
    check.tensor("logprobs", logprobs, ranks=(2,))
    check.floating("logprobs", logprobs)
    check.nonempty("logprobs", logprobs)
    for name, x in (("old_logprobs", old_logprobs), ("mask", mask)):
        check.tensor(name, x, ranks=(2,))
        check.same_shape(name, x, "logprobs", logprobs)
    check.floating("old_logprobs", old_logprobs)
    check.mask_like("mask", mask)
    check.tensor("advantages", advantages, ranks=(1, 2))
    check.floating("advantages", advantages)
    advantages = _per_sequence(advantages, logprobs.shape)
    if advantages.dim() == 1 and advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"advantages of rank 1 must have shape ({logprobs.shape[0]},) (one per sequence of logprobs "
            f"{tuple(logprobs.shape)}), got {check.describe(advantages)}"
        )
    if advantages.dim() == 2:
        check.same_shape("advantages", advantages, "logprobs", logprobs)
    rollout_is_weights = _per_token(rollout_is_weights, logprobs.shape)
    optional = {"ref_logprobs": ref_logprobs, "entropy": entropy, "rollout_is_weights": rollout_is_weights}
    for name, x in optional.items():
        if x is not None:
            check.tensor(name, x, ranks=(2,))
            check.floating(name, x)
            check.same_shape(name, x, "logprobs", logprobs)
    check.same_device({"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages,
                       "mask": mask, **optional})

    eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, length_budget, normalizer = _loss_options(
        loss_agg_mode, eps_neg, eps_pos, clip_ratio_c, beta, ref_logprobs is not None, entropy_coef,
        entropy is not None, length_budget, normalizer, logprobs.device)

    if check.flag("validate", validate):
        values = _loss_value_checks(mask, advantages, normalizer,
                                    {"logprobs": logprobs, "old_logprobs": old_logprobs, **optional})
        values.run()

    return _library.policy_loss(
        selected_backend(logprobs.device), logprobs, old_logprobs, advantages, mask, eps_neg=eps_neg,
        eps_pos=eps_pos, clip_ratio_c=clip_ratio_c, ref_logprobs=ref_logprobs, beta=beta, entropy=entropy,
        entropy_coef=entropy_coef, loss_agg_mode=loss_agg_mode, normalizer=normalizer,
        length_budget=length_budget, rollout_is_weights=rollout_is_weights,
    )


def _head_value_checks(values: check.ValueChecks, weight, bias, temperature: float) -> None:
    """The lm_head's values: a NaN or inf there reaches every token's logsumexp. -inf is refused too: a banned
    token is a large negative finite bias (-1e4 here is exp(-1e4) = 0), which every backend handles alike, as
    long as it stays finite once divided by the temperature (``torch.finfo(torch.float32).min`` does not at
    a temperature below 1: the logit is then -inf, and its 0 * -inf entropy terms NaN)."""
    values.finite("weight", weight)
    if bias is not None:
        values.add(torch.isfinite(bias), "bias has NaN or inf values (to ban tokens, use a large negative finite bias "
                   "such as -1e4, not -inf)", lambda: check.describe(bias))
        # (the message is constant and the temperature only in the detail: under torch.compile a formatted
        # value would pin the graph to it, a recompile per temperature)
        values.add(torch.isfinite(bias.float() * (1.0 / temperature)) | ~torch.isfinite(bias),
                   "bias / temperature overflows float32; to ban tokens use a large negative bias such as -1e4, "
                   "not the most negative float", lambda: f"temperature {temperature}; {check.describe(bias)}")


def _check_skip_zero_advantage(skip_zero_advantage, entropy_coef, beta):
    if skip_zero_advantage and (entropy_coef != 0 or beta != 0):
        raise ValueError(f"skip_zero_advantage=True needs entropy_coef == 0 and beta == 0 (a zero-advantage token "
                         f"still has an entropy / KL gradient), got entropy_coef={entropy_coef!r}, beta={beta!r}")


def _loss_options(loss_agg_mode, eps_neg, eps_pos, clip_ratio_c, beta, has_ref, entropy_coef, has_entropy,
                  length_budget, normalizer, device):
    """Checks the scalar options shared by the policy-loss entry points; returns them normalised."""
    eps_neg = check.open_unit("eps_neg", eps_neg)
    eps_pos = check.positive("eps_pos", eps_pos)  # the upper bound 1 + eps_pos may be any ratio above 1
    if clip_ratio_c is not None:
        clip_ratio_c = check.finite_number("clip_ratio_c", clip_ratio_c)
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (the dual-clip bound -c*A), got {clip_ratio_c!r}")
    beta = check.finite_number("beta", beta)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if beta > 0 and not has_ref:
        raise ValueError(f"beta={beta!r} > 0 needs ref_logprobs for the KL penalty")
    entropy_coef = check.finite_number("entropy_coef", entropy_coef)
    if entropy_coef != 0 and not has_entropy:
        raise ValueError(f"entropy_coef={entropy_coef!r} needs the per-token entropy tensor")
    if length_budget is not None:
        if loss_agg_mode != AggMode.SEQ_MEAN_TOKEN_SUM_NORM:
            raise ValueError(f"length_budget applies only to loss_agg_mode='seq-mean-token-sum-norm', "
                             f"not {loss_agg_mode.value!r}")
        length_budget = check.positive("length_budget", length_budget)
    if isinstance(normalizer, torch.Tensor):
        check.tensor("normalizer", normalizer, ranks=(0,))
        if normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise TypeError(f"normalizer must be a real number tensor, got {check.describe(normalizer)}")
        if normalizer.device.type != "cpu":  # a 0-dim CPU tensor acts as a number: no copy, no sync
            normalizer = normalizer.to(device=device)
    elif normalizer is not None:
        normalizer = check.positive("normalizer", normalizer)
        f32 = torch.finfo(torch.float32)
        if not f32.tiny <= normalizer <= f32.max:  # the loss divides by it in float32
            raise ValueError(f"normalizer must lie in float32's range [{f32.tiny:.3g}, {f32.max:.3g}], "
                             f"got {normalizer!r}")
    if normalizer is not None and loss_agg_mode == AggMode.SEQ_MEAN_TOKEN_SUM_NORM and length_budget is None:
        # The budget defaults to this call's T: micro-batches padded to different lengths would then be
        # divided by different constants, and their losses would not add up to the whole batch's.
        warnings.warn("seq-mean-token-sum-norm with a normalizer but no length_budget divides by this call's "
                      "padded length T: give length_budget= (e.g. max_completion_length) so that micro-batches "
                      "padded differently add up to the whole batch", stacklevel=3)
    return eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, length_budget, normalizer


def _per_sequence(advantages: torch.Tensor, bt) -> torch.Tensor:
    """[B, 1] advantages (TRL's layout: one per sequence, unsqueezed for broadcasting) as [B]; any other
    shape as given, for the shape check to name."""
    if len(bt) == 2 and tuple(advantages.shape) == (bt[0], 1) and bt[1] != 1:
        return advantages[:, 0]
    return advantages


def _per_token(weights: torch.Tensor | None, bt) -> torch.Tensor | None:
    """[B, 1] importance weights (TRL's sequence-level correction) broadcast to [B, T]; any other shape as
    given, for the shape check to name."""
    if isinstance(weights, torch.Tensor) and len(bt) == 2 and tuple(weights.shape) == (bt[0], 1):
        return weights.expand(*bt)
    return weights


def _loss_value_checks(mask, advantages, normalizer, per_token: dict) -> check.ValueChecks:
    """The data checks shared by the loss entry points (run by the caller, with its own additions)."""
    values = check.ValueChecks()
    valid = mask != 0
    if mask.dtype != torch.bool:
        values.add((mask == 0) | (mask == 1), "mask must hold only 0 and 1", lambda: check.describe(mask))
    # per-sequence advantages are read only for sequences with a valid token (an all-padding row may hold NaN)
    values.finite("advantages", advantages, valid if advantages.dim() == 2 else valid.any(-1))
    for name, x in per_token.items():
        if x is not None:
            values.finite(name, x, valid)
    if isinstance(normalizer, torch.Tensor):  # as the kernels take it: in float32 (1e300 is inf there, 1e-300 is 0)
        n32 = normalizer.float()
        values.add(torch.isfinite(n32) & (n32 > 0), "normalizer must be finite and > 0 (in float32)",
                   lambda: check.describe(normalizer))
    return values


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    deterministic: bool = True,
    workspace_bytes: int | None = None,
    validate: bool = True,
):
    """Log-probs of ``targets`` (and the entropy) under ``softmax((hidden @ weight.T + bias) / temperature)``
    without materialising the [tokens, vocab] logits (docs/algorithm.md §5).

    Args:
        hidden: [..., H] final hidden states (after the final norm), bf16 / fp16 / fp32. No tokens (a
            leading size 0) give empty outputs.
        weight: [V, H] lm_head weight, same dtype as ``hidden``. ``bias``: optional [V].
        targets: [...] integer token ids (the leading shape of ``hidden``); ``ignore_index`` marks
            positions that get log-prob 0, entropy 0 and no gradient.
        temperature: logits are divided by it (> 0).
        return_entropy: also return ``logsumexp(z) - sum softmax(z) * z`` per position.
        deterministic: accepted for compatibility; every backend's backward reduces in a fixed order
            without atomics (chunks of logits in a bounded workspace, then GEMMs), at no extra cost.
        workspace_bytes: bound on the logits workspace (default min(1.25 GiB, memory / 16) on a GPU,
            where the backward holds chunks of logits at 2 bytes each for half inputs, and the forward,
            which stores none, its statistics and gathered rows: ~21 KB a token at the 7B head, one GEMM
            launch up to ~60k tokens; 64 MiB on the CPU backends, 32 MiB for Triton's interpreter). Ignored positions cost no GEMM FLOPs on a GPU and
            are never read.
        validate: check that targets lie in [0, V) or equal ``ignore_index``, that hidden states are
            finite where they are not ignored and that weight and bias are finite (one sync). Without the
            checks nothing is hidden: a NaN or inf input gives NaN results, and a target outside [0, V)
            is never read (NaN log-prob, or an error on the PyTorch paths).

    Returns:
        ``logprobs`` float32 with the leading shape, or ``(logprobs, entropy)``. Gradients flow to
        ``hidden``, ``weight`` and ``bias`` (in their dtypes, accumulated in fp32). Under
        ``torch.no_grad()`` nothing is kept for a backward pass.
    """
    check.tensor("hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H], got {check.describe(hidden)}")
    check.tensor("weight", weight, ranks=(2,))
    check.tensor("targets", targets)
    for name, x in (("hidden", hidden), ("weight", weight)):
        check.floating(name, x)
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {check.describe(x)}")
    check.integer("targets", targets)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape [V, {H}] to match hidden {tuple(hidden.shape)}, "
                         f"got {check.describe(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype must match hidden ({hidden.dtype}), got {check.describe(weight)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {check.describe(targets)}")
    if bias is not None:
        check.tensor("bias", bias, ranks=(1,))
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) and dtype {weight.dtype}, "
                             f"got {check.describe(bias)}")
    if weight.shape[0] == 0 or H == 0:
        raise ValueError(f"weight must be non-empty, got {check.describe(weight)}")
    device = check.same_device({"hidden": hidden, "weight": weight, "targets": targets, "bias": bias})
    temperature = check.positive("temperature", temperature)
    ignore_index = check.integer_option("ignore_index", ignore_index)
    workspace_bytes = check.workspace("workspace_bytes", workspace_bytes)
    return_entropy = check.flag("return_entropy", return_entropy)
    if targets.numel() == 0:  # no tokens (an all-padding micro-batch): empty outputs, as a plain head gives
        empty = _no_tokens(hidden, weight, bias)
        return (empty, empty.clone()) if return_entropy else empty
    if check.flag("validate", validate):
        values = check.ValueChecks()
        V = weight.shape[0]
        wide = targets.long()  # as the ops read them: in uint8, -100 would wrap to 156 and pass for an ignore marker
        values.add((wide == ignore_index) | ((wide >= 0) & (wide < V)),
                   "targets must lie in [0, V) or equal ignore_index",
                   lambda: f"here [0, {V}) or {ignore_index}; {check.describe(targets)}")
        values.finite("hidden", hidden, (wide != ignore_index)[..., None])
        _head_value_checks(values, weight, bias, temperature)
        values.run()
    with _library.inputs_precision(device):
        return _library.linear_logprobs(
            selected_backend(device), hidden, weight, targets, bias=bias, temperature=temperature,
            ignore_index=ignore_index, return_entropy=bool(return_entropy), deterministic=bool(deterministic),
            workspace_bytes=workspace_bytes,
        )


def _no_tokens(hidden, weight, bias) -> torch.Tensor:
    """Float32 zeros of hidden's leading (empty) shape, in the autograd graph of the inputs that require a
    gradient, so that a backward through them gives zero gradients instead of an error."""
    out = hidden.new_zeros(hidden.shape[:-1], dtype=torch.float32)
    for x in (hidden, weight, bias):
        if x is not None and x.requires_grad and torch.is_grad_enabled():
            out = out + x.sum().float() * 0
    return out


def fused_linear_ngrpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    *,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    eps_neg: float = 0.16,
    eps_pos: float = 0.24,
    clip_ratio_c: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    loss_agg_mode: str | AggMode = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    length_budget: float | None = None,
    r_max: float = 1.0,
    num_virtual: int = 1,
    rollout_is_weights: torch.Tensor | None = None,
    workspace_bytes: int | None = None,
    skip_zero_advantage: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The NGRPO loss straight from final hidden states: log-probs, entropy, asymmetric clipped loss and
    the gradients for ``hidden``, ``weight`` (and ``bias``) in one pass, never holding more than
    ``workspace_bytes`` of logits (docs/algorithm.md §2-§5).

    Args:
        hidden: [B, T, H] final hidden states at the positions that predict ``targets`` (already shifted
            by one: position t holds the state that predicts token t), bf16 / fp16 / fp32.
        weight: [V, H] lm_head weight (same dtype); ``bias``: optional [V].
        targets: [B, T] sampled token ids; ``mask``: [B, T] bool or 0/1, the response tokens that count.
        old_logprobs: [B, T] behaviour-policy log-probs, or None for on-policy updates (the ratio is then
            exactly 1, as in TRL with one iteration per generation).
        advantages: [B] (or [B, 1]) or [B, T]; or ``rewards`` [B] with ``group_ids`` [B], from which NGRPO
            advantages are computed in-op (``r_max``, ``num_virtual``; see ``ngrpo_advantages``).
        temperature: the sampling temperature; logits are divided by it.
        eps_neg, eps_pos, clip_ratio_c, ref_logprobs, beta, rollout_is_weights, loss_agg_mode, normalizer,
            length_budget: as in ``ngrpo_policy_loss``.
        entropy_coef: the entropy bonus (loss -= entropy_coef * aggregated entropy; the recipe uses 0.001).
        workspace_bytes: bound on the logits workspace (default: 32 MiB on CPU; min(1.25 GiB, memory / 16)
            on a GPU, where it holds ``chunk x V`` logits at 2 bytes each for half inputs, 4 for float32;
            docs/kernels.md has the measured time and memory per setting). It must hold at least one
            row: V * 4 bytes (+ V * 2 for bf16 gradients).
        skip_zero_advantage: also leave out tokens whose advantage is exactly 0 (e.g. NGRPO's all-correct
            groups): their loss and gradient are exactly 0 when ``entropy_coef == 0`` and ``beta == 0``
            (required), so the loss and gradients are unchanged and the GPU spends no FLOPs on them. The
            metrics then cover only the computed tokens; ``metrics["computed_frac"]`` says which share of
            the valid tokens that is.
        validate: value checks (targets in range, finite hidden states and other inputs at valid
            positions, finite weight and bias, 0/1 mask) with one sync, and finite rewards with another
            when ``rewards`` is given; ``False`` skips
            them, and a non-finite input or an out-of-range target then gives a NaN loss (or an error on
            the PyTorch paths), never a finite one.

    Returns:
        ``(loss, metrics)``: 0-dim loss; metrics (0-dim, means over valid tokens): ``clip_frac``,
        ``approx_kl``, ``entropy``, ``adv_mean``, ``logprob_mean`` (+ ``kl``, ``dual_clip_frac`` when used).
        The gradients are computed in the forward pass (6*N*H*V FLOPs over the valid tokens only: masked
        tokens cost nothing on a GPU) and only rescaled in backward; on a Hopper GPU, an eager call whose
        batch fits one workspace chunk leaves the dX / dW GEMMs to backward, which folds the upstream
        gradient into them (no float32 dW between forward and backward, no cast pass).
    """
    loss_agg_mode = AggMode.parse(loss_agg_mode)
    check.tensor("hidden", hidden, ranks=(3,))
    check.tensor("weight", weight, ranks=(2,))
    for name, x in (("hidden", hidden), ("weight", weight)):
        check.floating(name, x)
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {check.describe(x)}")
    check.nonempty("hidden", hidden)
    B, T, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H or V == 0:
        raise ValueError(f"weight must have shape [V, {H}] to match hidden {tuple(hidden.shape)}, "
                         f"got {check.describe(weight)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype must match hidden ({hidden.dtype}), got {check.describe(weight)}")
    if bias is not None:
        check.tensor("bias", bias, ranks=(1,))
        if bias.shape[0] != V or bias.dtype != weight.dtype:
            raise ValueError(f"bias must have shape ({V},) and dtype {weight.dtype}, got {check.describe(bias)}")
    bt = (B, T)
    check.tensor("targets", targets, ranks=(2,))
    check.integer("targets", targets)
    check.tensor("mask", mask, ranks=(2,))
    check.mask_like("mask", mask)
    rollout_is_weights = _per_token(rollout_is_weights, bt)
    optional = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "rollout_is_weights": rollout_is_weights}
    for name, x in (("targets", targets), ("mask", mask), *optional.items()):
        if x is None:
            continue
        check.tensor(name, x, ranks=(2,))
        if x.shape != bt:
            raise ValueError(f"{name} must have shape {bt} (hidden's [B, T]), got {check.describe(x)}")
        if name in optional:
            check.floating(name, x)

    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages= or rewards= (with group_ids=)")
    if advantages is not None:
        if group_ids is not None:
            raise ValueError("group_ids= goes with rewards=, not with advantages=")
        check.tensor("advantages", advantages, ranks=(1, 2))
        check.floating("advantages", advantages)
        advantages = _per_sequence(advantages, bt)
        # (two comparisons: tuple membership with a symbolic batch size misjudged equal shapes under torch.compile)
        if not (advantages.shape == (B,) or advantages.shape == bt):
            raise ValueError(f"advantages must have shape ({B},) or {bt}, got {check.describe(advantages)}")
    else:
        if group_ids is None:
            raise ValueError("rewards= needs group_ids= (one id per prompt)")
        check.tensor("rewards", rewards)
        check.tensor("group_ids", group_ids)
        if rewards.shape != (B,):
            raise ValueError(f"rewards must have shape ({B},) (one per sequence), got {check.describe(rewards)}")
    device = check.same_device({"hidden": hidden, "weight": weight, "bias": bias, "targets": targets, "mask": mask,
                                "advantages": advantages, "rewards": rewards, "group_ids": group_ids, **optional})

    temperature = check.positive("temperature", temperature)
    eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, length_budget, normalizer = _loss_options(
        loss_agg_mode, eps_neg, eps_pos, clip_ratio_c, beta, ref_logprobs is not None, entropy_coef, True,
        length_budget, normalizer, device)
    skip_zero_advantage = check.flag("skip_zero_advantage", skip_zero_advantage)
    _check_skip_zero_advantage(skip_zero_advantage, entropy_coef, beta)
    r_max = check.finite_number("r_max", r_max)
    num_virtual = check.nonnegative_int("num_virtual", num_virtual)
    workspace_bytes = check.workspace("workspace_bytes", workspace_bytes)
    if workspace_bytes is not None:
        from .ops.fused_loss.schedule import bytes_per_row

        grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                            or (bias is not None and bias.requires_grad))
        need = bytes_per_row(V, hidden.dtype, grad)
        if workspace_bytes < need:
            raise ValueError(f"workspace_bytes={workspace_bytes} cannot hold one row of logits (V={V}, "
                             f"{hidden.dtype}): at least {need} bytes are needed")

    if rewards is not None and normalizer is not None:
        warnings.warn("rewards= with a normalizer (micro-batching): the group statistics come from this call's "
                      "responses only, so every group must lie whole in this micro-batch; otherwise compute the "
                      "advantages once over the whole batch and pass advantages=", stacklevel=2)
    if rewards is not None:  # validates rewards / group_ids itself (the same validate= convention)
        advantages = ngrpo_advantages(rewards, group_ids, r_max=r_max, num_virtual=num_virtual, validate=validate)
    if check.flag("validate", validate):
        values = _loss_value_checks(mask, advantages, normalizer, optional)
        values.add((mask == 0) | ((targets >= 0) & (targets < V)),
                   "targets must lie in [0, V) at valid (mask != 0) positions",
                   lambda: f"here [0, {V}); {check.describe(targets)}")
        values.finite("hidden", hidden, (mask != 0)[..., None])
        _head_value_checks(values, weight, bias, temperature)
        values.run()

    with _library.inputs_precision(device):
        return _library.fused_linear_ngrpo_loss(
            selected_backend(device), hidden, weight, targets, mask, old_logprobs, advantages, bias=bias,
            temperature=temperature, eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c,
            ref_logprobs=ref_logprobs, beta=beta, entropy_coef=entropy_coef, loss_agg_mode=loss_agg_mode,
            normalizer=normalizer, length_budget=length_budget, rollout_is_weights=rollout_is_weights,
            workspace_bytes=workspace_bytes, skip_zero_advantage=bool(skip_zero_advantage),
        )

"""NGRPO on verl (0.9.x), loaded the way verl loads external code: no fork, no edits to verl.

Importing this module registers, in the importing process:

- ``algorithm.adv_estimator=ngrpo``: NGRPO's advantages (``ngrpo_kernels.ngrpo_advantages``: a virtual sample
  of reward ``r_max`` in each group's statistics, so all-wrong groups get a negative advantage), groups by
  verl's ``uid``; options ``+algorithm.ngrpo_r_max`` (1.0) and ``+algorithm.ngrpo_num_virtual`` (1).
- ``actor_rollout_ref.actor.policy_loss.loss_mode=ngrpo``: the asymmetric clipped loss from
  ``clip_ratio_low`` (eps_neg) / ``clip_ratio_high`` (eps_pos), dual clip ``clip_ratio_c`` on negative
  advantages, rollout importance weights, every ``loss_agg_mode`` with verl's global batch normalisation
  (``config.global_batch_info``), computed by the fused policy-loss kernel; it logs verl's metrics
  ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``.
- ``actor_rollout_ref.model.fused_kernel_options.impl_backend=ngrpo`` (with ``model.use_fused_kernels=True``):
  the actor's log-probs and entropy from ``fused_linear_logprobs`` (hidden states x lm_head, never the full
  [tokens, vocab] logits; gradients through both). Every other backend name behaves exactly as before.
- ``NGRPOReplayBuffer`` (``ngrpo_kernels.integrations.verl.sampler``; ``trainer.v1.sampler.custom_sampler``):
  the released recipe's filter, drop only all-correct groups (keep all-wrong ones) and refill.

verl calls the estimator and the sampler in its TaskRunner process and the loss and the model head in
its workers, so the module must be imported in all of them. Any one of these does it:
``actor_rollout_ref.model.external_lib=ngrpo_kernels.integrations.verl`` (imported by verl's model config
in the TaskRunner and in every worker before the model is built), the ``verl.plugins`` entry point this
package declares (loaded on ``import verl`` when ``VERL_USE_EXTERNAL_PLUGINS`` is unset or ``auto``), or
``VERL_USE_EXTERNAL_MODULES=ngrpo_kernels.integrations.verl``. ``recipe`` has the authors' 7B recipe.
"""

from __future__ import annotations

import numpy as np
import torch
from verl.trainer.ppo import core_algos
from verl.models.transformers import monkey_patch as _monkey_patch
from verl.utils.experimental import torch_functional as _torch_functional

from ...functional import fused_linear_logprobs, ngrpo_advantages, ngrpo_policy_loss
from .._heads import logit_scale, whole
from ...variants import AggMode

NAME = "ngrpo"

__all__ = ["NAME", "NGRPOFusedLinearForPPO", "compute_ngrpo_outcome_advantage", "compute_policy_loss_ngrpo"]


def _option(config, key, default):
    if config is None:
        return default
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


# --- advantages (TaskRunner) ----------------------------------------------------------------------------

def compute_ngrpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray,
                                    epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config=None,
                                    **_unused) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's estimator signature. One outcome reward per response (the sum of ``token_level_rewards``),
    groups by ``index`` (verl's ``uid`` per response; any hashable values). Singleton groups get
    ``r / (1 + eps)`` as in verl's GRPO. Returns (advantages, returns), both [B, T], zero outside the mask."""
    if not _option(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo):
        raise ValueError("adv_estimator=ngrpo divides by the calibrated group std; norm_adv_by_std_in_grpo=False "
                         "(Dr. GRPO) is adv_estimator=grpo's option, not NGRPO's")
    index = np.asarray(index)
    if index.shape != (token_level_rewards.shape[0],):
        raise ValueError(f"index must hold one group id per response ({token_level_rewards.shape[0]}), "
                         f"got shape {index.shape}")
    _, group_ids = np.unique(index, return_inverse=True)
    scores = token_level_rewards.sum(dim=-1, dtype=torch.float32)
    adv = ngrpo_advantages(scores, torch.as_tensor(group_ids.reshape(-1), device=scores.device),
                           r_max=float(_option(config, "ngrpo_r_max", 1.0)),
                           num_virtual=int(_option(config, "ngrpo_num_virtual", 1)), eps=epsilon)
    adv = adv[:, None] * response_mask.to(adv.dtype)
    return adv, adv


# --- policy loss (workers) ------------------------------------------------------------------------------

def _aggregation(loss_agg_mode: str, info: dict, response_mask: torch.Tensor):
    """verl's agg_loss (with global batch info) as (AggMode, normalizer, length_budget) of ngrpo_policy_loss."""
    dp_size = info.get("dp_size") or 1
    if loss_agg_mode == "token-sum":  # sum * dp_size
        return AggMode.TOKEN_MEAN, 1.0 / dp_size, None
    mode = AggMode.parse(loss_agg_mode)
    key = "batch_num_tokens" if mode == AggMode.TOKEN_MEAN else "global_batch_size"
    total = info.get(key)
    budget = None
    if mode == AggMode.SEQ_MEAN_TOKEN_SUM_NORM:
        budget = float(info.get("loss_scale_factor") or response_mask.shape[-1])
    if total is None:
        if dp_size > 1:
            raise ValueError(f"(global) {key} is required when dp_size > 1")
        if mode == AggMode.SEQ_MEAN_TOKEN_SUM_NORM:  # verl 0.9 divides this mode by the sequence count too
            return mode, (response_mask.sum(-1) > 0).sum().clamp_min(1).float(), budget
        return mode, None, budget
    if isinstance(total, torch.Tensor):
        return mode, total.float().clamp_min(1) / dp_size, budget
    return mode, max(float(total), 1.0) / dp_size, budget  # 0 tokens in the batch: loss 0, not NaN


def compute_policy_loss_ngrpo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                              response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                              rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """verl's policy-loss signature; ``config`` is the actor config (``clip_ratio``, ``clip_ratio_low`` /
    ``clip_ratio_high``, ``clip_ratio_c`` (default 3.0, as verl), ``global_batch_info``)."""
    if config is None:
        raise ValueError("policy loss 'ngrpo' needs the actor config (clip ratios, global batch info)")
    clip = _option(config, "clip_ratio", 0.2)
    mode, normalizer, budget = _aggregation(loss_agg_mode, dict(_option(config, "global_batch_info", {})),
                                            response_mask)
    loss, metrics = ngrpo_policy_loss(
        log_prob, old_log_prob.detach(), advantages.detach(), response_mask,
        eps_neg=_option(config, "clip_ratio_low", clip), eps_pos=_option(config, "clip_ratio_high", clip),
        clip_ratio_c=_option(config, "clip_ratio_c", 3.0), loss_agg_mode=mode, normalizer=normalizer,
        length_budget=budget, rollout_is_weights=None if rollout_is_weights is None else rollout_is_weights.detach(),
    )
    return loss, {"actor/pg_clipfrac": metrics["clip_frac"].detach(), "actor/ppo_kl": metrics["approx_kl"].detach(),
                  "actor/pg_clipfrac_lower": metrics["dual_clip_frac"].detach()}


# --- the fused actor head (workers) ----------------------------------------------------------------------

# verl's originals, kept on verl's modules so that a second import of this module (importlib.reload, or
# a copy under another name) wraps them again instead of wrapping its own wrappers.
_VerlFusedLinearForPPO = vars(_torch_functional).setdefault("_ngrpo_original_fused_linear",
                                                            _torch_functional.FusedLinearForPPO)
_verl_patch_forward_with_backends = vars(_monkey_patch).setdefault("_ngrpo_original_patch_forward",
                                                                   _monkey_patch.patch_forward_with_backends)


class NGRPOFusedLinearForPPO(_VerlFusedLinearForPPO):
    """verl's ``FusedLinearForPPO`` with one more ``impl_backend``: ``"ngrpo"``. verl's patched model forward
    builds this class at every call (``dense_common.forward_with_torch_backend`` and the VLM variants) and
    expects (log_probs float32, entropy) of the labels' shape; both get gradients."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        if impl_backend != NAME:
            super().__init__(chunk_size=chunk_size, impl_backend=impl_backend)
            return
        torch.nn.Module.__init__(self)
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if self.impl_backend != NAME:
            return super().forward(hidden_states, vocab_weights, input_ids, temperature)
        # FSDP2 shards an untied head as its own unit, whose forward (which would gather it) verl's fused
        # forward never calls: gathered here, its gradient averaged over the ranks as FSDP2 averages the others
        vocab_weights = whole(vocab_weights, compute_dtype=hidden_states.dtype)
        if hidden_states.dtype != vocab_weights.dtype:  # autocast regions may hand fp32 states to a bf16 head
            hidden_states = hidden_states.to(vocab_weights.dtype)
        # validate=False: the labels are token ids the model read (always in range) and this is the hot path;
        # a non-finite hidden state still shows as a NaN log-prob.
        return fused_linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                     temperature=float(temperature), return_entropy=True, validate=False)


def _check_head(model) -> None:
    """verl's fused forward hands the head only its weight and the temperature: a model whose logits are more
    than ``hidden @ weight.T`` (an lm_head bias, a logit scale, a soft cap) would be trained on another
    distribution than the one vLLM samples from (verl's own torch and triton heads drop them alike). Refused."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(head, "bias", None) is not None:
        raise ValueError("fused_kernel_options.impl_backend=ngrpo: the model's lm_head has a bias, which verl's fused "
                         "forward does not pass to the head; set actor_rollout_ref.model.use_fused_kernels=False")
    try:
        scale = logit_scale(model.config)
    except ValueError as err:
        raise ValueError(f"fused_kernel_options.impl_backend=ngrpo: {err}; set "
                         "actor_rollout_ref.model.use_fused_kernels=False") from None
    if scale != 1.0:
        raise ValueError(f"fused_kernel_options.impl_backend=ngrpo: the model scales its logits by {scale}, which "
                         "verl's fused forward does not pass to the head; set actor_rollout_ref.model."
                         "use_fused_kernels=False")


def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str | None = None):
    """verl's ``patch_forward_with_backends``, plus ``"ngrpo"``: installs verl's own torch-backend forward
    (hidden states, label shift, sequence parallel and output dataclass all verl's) with our head inside."""
    if use_fused_kernels and fused_kernels_backend == NAME:
        _check_head(model)
        _verl_patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
        model._verl_fused_kernels_backend = NAME  # read by the forward at each call
        return
    _verl_patch_forward_with_backends(model, use_fused_kernels=use_fused_kernels,
                                      fused_kernels_backend=fused_kernels_backend)


def _register() -> None:
    """Idempotent: importing the module twice (entry point and external_lib) registers once."""
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(NAME) is not compute_ngrpo_outcome_advantage:
        core_algos.ADV_ESTIMATOR_REGISTRY.pop(NAME, None)
        core_algos.register_adv_est(NAME)(compute_ngrpo_outcome_advantage)
    core_algos.register_policy_loss(NAME)(compute_policy_loss_ngrpo)
    # verl looks both names up at call time (dense_common imports the class inside the forward; the
    # engine calls apply_monkey_patch, which calls patch_forward_with_backends through its module).
    _torch_functional.FusedLinearForPPO = NGRPOFusedLinearForPPO
    _monkey_patch.patch_forward_with_backends = patch_forward_with_backends


_register()

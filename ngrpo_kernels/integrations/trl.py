"""NGRPO on TRL: ``NGRPOConfig`` / ``NGRPOTrainer``, subclasses of ``trl.GRPOConfig`` / ``trl.GRPOTrainer``.

What changes against GRPO (checked on TRL 1.16):
- Advantages: TRL gathers every process's rewards in ``_calculate_rewards`` and forms advantages in
  ``_generate_and_score_completions`` before ``_prepare_inputs`` shuffles the batch. We keep its whole
  pipeline and replace the advantages right there, from the same gathered rewards, with
  ``ngrpo_kernels.group_advantages`` (NGRPO's virtual max-reward sample by default; group ids from
  TRL's layout, ``num_generations`` consecutive completions per prompt), then slice this process's
  part exactly as TRL does.
- All-correct groups (``filter_all_correct``; correctness read from the first reward function, the
  verifier): the released recipe drops them and refills the batch
  with new prompts. TRL cannot refill a generation batch, so the closest faithful equivalent is used:
  their completion tokens are masked out of the loss and out of the global token count (NGRPO gives
  them advantage 0 anyway, so only the normaliser changes). The effective batch is then smaller than
  the recipe's; ``frac_all_correct`` is logged.
- Loss: ``fused_linear_ngrpo_loss`` from the final hidden states and the (unsharded) lm_head, with the
  asymmetric clip (``epsilon`` = eps_neg 0.16, ``epsilon_high`` = eps_pos 0.24), TRL's ``entropy_coef``
  bonus, optional k3 KL (``beta``), and TRL's global normaliser (``num_items_in_batch`` per process
  and accumulation window, as TRL's ``dapo`` loss). The hidden states come through the model's own
  ``forward`` (patched, as TRL does for its fused head), so FSDP / ZeRO hooks and PEFT still run.
- Old-policy and reference log-probs (TRL's no-grad ``fused_lm_head`` calls) come from
  ``fused_linear_logprobs``; they are None when the update is on-policy, which our loss treats as
  ratio exactly 1.

With TRL's defaults (one optimizer step per generation) the ratio is always 1 and clipping never acts.
TRL counts ``steps_per_generation`` in micro-steps: the recipe's 4 optimizer steps on each 1024-prompt
generation are ``steps_per_generation = 4 * gradient_accumulation_steps`` (``ngrpo_train.presets.trl_args``).
"""

from __future__ import annotations

import dataclasses
import types

import torch
import transformers
from packaging.version import Version
from transformers.utils import ModelOutput
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx

from ..functional import fused_linear_logprobs, fused_linear_ngrpo_loss, group_advantages
from ._heads import logit_scale as _logit_scale
from ._heads import whole as _whole
from ..variants import Estimator


NGRPO_EPS_NEG, NGRPO_EPS_POS = 0.16, 0.24  # the paper's asymmetric clip (docs/algorithm.md)


@dataclasses.dataclass
class NGRPOConfig(GRPOConfig):
    """``GRPOConfig`` with NGRPO's defaults and knobs."""

    advantage_estimator: str = dataclasses.field(
        default="ngrpo", metadata={"help": "ngrpo | grpo | dr_grpo | w_reinforce (ngrpo_kernels.Estimator)"})
    r_max: float = dataclasses.field(default=1.0, metadata={"help": "reward of the virtual sample(s)"})
    num_virtual: int = dataclasses.field(default=1, metadata={"help": "number of virtual samples per group"})
    w_lambda: float = dataclasses.field(default=0.1, metadata={"help": "W-REINFORCE weight of correct samples"})
    filter_all_correct: bool = dataclasses.field(
        default=True, metadata={"help": "mask all-correct groups out of the loss (the recipe's filter)"})
    filter_all_wrong: bool = dataclasses.field(
        default=False, metadata={"help": "also mask all-wrong groups (DAPO's dynamic sampling)"})
    epsilon: float = NGRPO_EPS_NEG
    # None: NGRPO's 0.24 while ``epsilon`` is NGRPO's 0.16; otherwise ``epsilon`` (TRL's rule, so that
    # ``NGRPOConfig(epsilon=0.2)`` clips 0.2 / 0.2 as ``GRPOConfig(epsilon=0.2)`` does).
    epsilon_high: float | None = None
    beta: float = 0.0
    loss_type: str = "dapo"

    def __post_init__(self):
        super().__post_init__()
        if self.epsilon_high is None:
            self.epsilon_high = NGRPO_EPS_POS if self.epsilon == NGRPO_EPS_NEG else self.epsilon
        Estimator.parse(self.advantage_estimator)
        if self.loss_type != "dapo":
            raise ValueError("NGRPOTrainer aggregates as token-mean over the global token count (loss_type='dapo')")
        refused = [(name, why) for name, default, why in _UNSUPPORTED if getattr(self, name, default) != default]
        if self.beta != 0.0 and self.use_bias_correction_kl:
            refused.append(("use_bias_correction_kl", "the fused loss's k3 KL term is not multiplied by the ratio; "
                                                      "set use_bias_correction_kl=False with beta > 0"))
        if refused:
            raise ValueError("NGRPOTrainer does not implement " + "; ".join(f"{n} ({w})" for n, w in refused)
                             + ": unset it rather than train something else")


# GRPOConfig options NGRPOTrainer's loss or advantages do not implement, with their neutral values: a
# non-neutral value is refused at construction instead of being silently ignored.
_UNSUPPORTED = [
    ("delta", None, "two-sided clipping of the ratio"),
    ("top_entropy_quantile", 1.0, "training only on high-entropy tokens"),
    ("importance_sampling_level", "token", "sequence-level importance sampling; NGRPO clips per token"),
    ("off_policy_mask_threshold", None, "off-policy sequence masks"),
    ("scale_rewards", "group", "TRL's reward scaling; the advantages are NGRPO's (advantage_estimator)"),
    ("multi_objective_aggregation", "sum_then_normalize", "reward aggregation other than the weighted sum"),
]


@dataclasses.dataclass
class NGRPOLossOutput(ModelOutput):
    """What ``model(..., ngrpo_loss=request)`` returns. A ``ModelOutput`` (a pytree node), not a plain object:
    FSDP2's root unit registers its pre-backward hook, which re-gathers parameters it resharded after the
    forward, on the tensors it finds in the forward's output."""

    loss: torch.Tensor | None = None
    metrics: dict | None = None


# The vision-language inputs TRL 1.16 hands the model with a micro-batch (GRPOTrainer._compute_loss through
# _get_per_token_logps_and_entropies), as they are for a whole micro-batch; its num_images / num_tiles only
# serve to slice them when TRL splits a batch.
_VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                  "token_type_ids", "mm_token_type_ids", "image_position_ids")


class NGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with NGRPO advantages and the fused NGRPO loss (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, NGRPOConfig):  # a GRPOConfig has neither NGRPO's knobs nor its refusals
            raise TypeError(f"NGRPOTrainer needs args=NGRPOConfig(...) (NGRPO's options, and the refusal of TRL "
                            f"options the fused loss does not implement), got {type(config).__name__}")
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:  # TRL adds a MoE router's load-balancing loss; the fused loss path does not
            raise ValueError(
                f"NGRPOTrainer does not implement the MoE load-balancing loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}): set router_aux_loss_coef=0.0 to train without it knowingly")
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        temperature = self.temperature / _logit_scale(model.config)
        _add_ngrpo_head(model, temperature)
        if self.ref_model is not None:  # already prepared: patch the model inside its wrapper
            ref = _unwrapped(self.ref_model)
            _add_ngrpo_head(ref, self.temperature / _logit_scale(ref.config))

    # ------------------------------------------------------------------ advantages
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards_per_func = rewards_per_func  # every process's rewards, in TRL's order
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        rewards_per_func = self._gathered_rewards_per_func
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)[None]).nansum(dim=1)
        G = self.num_generations if mode == "train" else self.num_generations_eval
        group_ids = torch.arange(rewards.numel(), device=rewards.device) // G
        args = self.args
        options = dict(estimator=args.advantage_estimator, r_max=args.r_max, num_virtual=args.num_virtual,
                       w_lambda=args.w_lambda)
        # Completions that no reward function could score (all None) carry no signal: as in TRL, they get
        # advantage 0 and stay out of their group's statistics. So does a completion scored alone in its
        # group, for the estimators that compare it with its group (group_advantages would treat it as a
        # singleton group, r / (1 + eps)); W-REINFORCE scores each completion on its own.
        scorable = ~torch.isnan(rewards_per_func).all(dim=1)
        if Estimator.parse(args.advantage_estimator) != Estimator.W_REINFORCE:
            scorable &= (scorable.view(-1, G).sum(dim=1) > 1).repeat_interleave(G)
        if bool(scorable.all()):
            advantages = group_advantages(rewards.float(), group_ids, **options)
        else:
            advantages = torch.zeros_like(rewards, dtype=torch.float32)
            if bool(scorable.any()):
                advantages[scorable] = group_advantages(rewards[scorable].float(), group_ids[scorable], **options)
        local = output["advantages"].shape[0]
        process_slice = slice(self.accelerator.process_index * local, (self.accelerator.process_index + 1) * local)
        output["advantages"] = advantages[process_slice]
        # TRL logged its own advantages of these completions (the completions table): log the ones trained on.
        logged = self._logs["advantages"]
        for _ in range(min(len(logged), advantages.numel())):
            logged.pop()
        logged.extend(advantages.tolist())

        # The filters judge correctness by the first reward function (the verifier), so shaping terms
        # added after it (e.g. DAPO's length penalty) do not change which groups count as solved.
        grouped = torch.nan_to_num(rewards_per_func[:, 0], nan=0.0).view(-1, G)
        all_correct = (grouped >= args.r_max).all(dim=1)
        all_wrong = (grouped <= 0).all(dim=1)
        self._metrics[mode]["frac_all_correct"].append(all_correct.float().mean().item())
        self._metrics[mode]["frac_all_wrong"].append(all_wrong.float().mean().item())
        drop = torch.zeros_like(all_correct)
        if args.filter_all_correct:
            drop |= all_correct
        if args.filter_all_wrong:
            drop |= all_wrong
        if drop.any():
            keep = (~drop).repeat_interleave(G)[process_slice].to(output["completion_mask"].dtype)
            output["completion_mask"] = output["completion_mask"] * keep[:, None]
            output["num_items_in_batch"] = self.accelerator.gather(_loss_tokens(output).sum()).sum()
        return output

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):  # noqa: C901 - mirrors TRL's own
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":  # TRL's dapo normaliser for one accumulation window
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        request = dict(
            targets=completion_ids, mask=mask, old_logprobs=inputs.get("old_per_token_logps"),
            advantages=inputs["advantages"], eps_neg=self.epsilon_low,
            eps_pos=self.epsilon_high, beta=self.beta, ref_logprobs=inputs.get("ref_per_token_logps"),
            entropy_coef=self._entropy_coef_now(mode), normalizer=normalizer.float(),
            # TRL's importance weights: [B, T], or [B, 1] for its sequence-level modes (the loss takes both)
            rollout_is_weights=inputs.get("importance_sampling_ratio"),
        )
        images = {key: inputs[key] for key in _VISION_INPUTS if inputs.get(key) is not None}
        out = model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                    attention_mask=torch.cat([prompt_mask, completion_mask], dim=1), ngrpo_loss=request, **images)
        metrics = out.metrics
        if self.use_adaptive_entropy and mode == "train":
            self._adapt_entropy_coef(metrics["entropy"].detach() * mask.sum(), mask.sum())
        gather = self.accelerator.gather
        for name, key in (("clip_ratio/region_mean", "clip_frac"), ("entropy", "entropy"),
                          ("approx_kl", "approx_kl"), ("kl", "kl")):
            if key in metrics:
                self._metrics[mode][name].append(gather(metrics[key].detach()).nanmean().item())
        return out.loss

    # ------------------------------------------------------------------ TRL's adaptive entropy coefficient
    def _entropy_coef_now(self, mode):
        """TRL's rule: the coefficient as of the last optimizer step; in adaptive mode the bonus is on
        only while the last window's entropy was at or below ``entropy_target``."""
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            return 0.0
        return float(self.entropy_coef)

    def _adapt_entropy_coef(self, entropy_sum, tokens):
        """TRL's controller: accumulate the window's entropy over its micro-batches, and at the optimizer
        step boundary move ``entropy_coef`` by ``entropy_coef_delta`` toward keeping the entropy at the
        target, within [entropy_coef_min, entropy_coef_max]."""
        stats = torch.stack([entropy_sum.float(), tokens.float()])
        self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if not self.accelerator.sync_gradients:
            return
        window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (window[0] / window[1].clamp(min=1.0)).item()  # once per optimizer step, as TRL
        args = self.args
        if world_entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None
        self._metrics["train"]["entropy_coef"].append(self.entropy_coef)


def _add_ngrpo_head(model, temperature: float) -> None:
    """Let ``model(..., ngrpo_loss=request)`` return the fused NGRPO loss of its completion tokens.

    The model's own forward runs (so FSDP/ZeRO hooks fire and PEFT adapters apply); only the backbone is
    called inside it, and the lm_head weight is taken whole (a DTensor is gathered; a ZeRO-3 partition
    through TRL's ``maybe_gather_lm_head_ctx``) and handed to ``fused_linear_ngrpo_loss``. Without
    ``ngrpo_loss`` the previous forward (TRL's fused-head forward) runs, except for TRL's
    ``fused_lm_head=True`` log-prob calls (old policy, reference), which ``fused_linear_logprobs`` serves.
    """
    previous = model.forward
    backbone = _backbone_name(model)

    def forward(self, *args, ngrpo_loss=None, **kwargs):
        if ngrpo_loss is None:
            if kwargs.get("fused_lm_head") and kwargs.get("shift_labels") is None \
                    and not kwargs.get("output_router_logits"):
                return _token_logprobs(self, backbone, temperature, *args, **kwargs)
            return previous(*args, **kwargs)
        request = dict(ngrpo_loss)
        targets = request.pop("targets")
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone)(*args, **kwargs).last_hidden_state
        K = targets.shape[1]
        hidden = hidden[:, -K - 1:-1]  # position t predicts token t + 1
        weight, bias = _head(self, hidden.dtype)
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        # ZeRO-3: gather the partitioned head for the forward; the gradients of a DeepSpeed parameter are
        # formed right here, in the forward (the loss recognises a DeepSpeed parameter), so nothing needs the
        # gathered weight in backward.
        with maybe_gather_lm_head_ctx(*(p for p in (weight, bias) if p is not None)):
            # The head's temperature (the sampling temperature with the model's logit scale folded in), the
            # same as the old and reference log-probs' (_token_logprobs).
            loss, metrics = fused_linear_ngrpo_loss(hidden, weight, targets, request.pop("mask"),
                                                    request.pop("old_logprobs"), bias=bias, temperature=temperature,
                                                    validate=False, **request)
        return NGRPOLossOutput(loss=loss, metrics=metrics)

    model.forward = types.MethodType(forward, model)


def _backbone_name(model) -> str:
    """Where the model below the head is, as TRL's fused head finds it: ``base_model``, except for a
    vision-language model under transformers 4, whose empty ``base_model_prefix`` makes ``base_model`` the
    model itself; its language backbone is ``model`` there. Looked up by name at each call (FSDP and PEFT
    replace modules after patching)."""
    if model.config.get_text_config() is not model.config and Version(transformers.__version__) < Version("5"):
        return "model"
    return "base_model"


def _unwrapped(model):
    """The model inside the wrappers ``GRPOTrainer.__init__`` puts the reference model in before we can patch
    it (a DeepSpeed engine, FSDP1, DDP: each holds it as ``.module``). Patching the wrapper instead would
    bypass the wrapper's own forward (FSDP1's unsharding of its root parameters, for one)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _head(model, compute_dtype=None):
    """The head's weight and bias as plain tensors (``_heads.whole``: an FSDP2-sharded head gathered, in the
    hidden states' half dtype)."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    return _whole(weight, compute_dtype), None if bias is None else _whole(bias, compute_dtype)


def _token_logprobs(model, backbone, temperature, *args, labels, fused_lm_head=True, num_items_in_batch=None,
                    **kwargs):
    """What TRL's fused head returns for ``model(..., labels=labels, fused_lm_head=True)``: per-position
    log-probs of the next token and the entropy, [B, L - 1], zero where the label is -100."""
    kwargs["use_cache"] = False
    hidden = getattr(model, backbone)(*args, **kwargs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    weight, bias = _head(model, hidden.dtype)
    with maybe_gather_lm_head_ctx(*(p for p in (weight, bias) if p is not None)):
        log_probs, entropy = fused_linear_logprobs(hidden.to(device=weight.device, dtype=weight.dtype), weight,
                                                   targets.to(weight.device), bias=bias, temperature=temperature,
                                                   return_entropy=True, validate=False)
    mask = targets != -100
    loss = -log_probs.sum() / mask.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, label_mask=mask)


def _loss_tokens(output):
    """The tokens the loss counts, as TRL counts them: completion tokens, minus tool results."""
    mask = output["completion_mask"]
    return mask if "tool_mask" not in output else mask * output["tool_mask"]

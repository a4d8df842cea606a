"""A drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss``: same constructor names and
``forward`` argument order, so a TRL user swaps one object; NGRPO's asymmetric clip by default.

Mapping of Liger's ``loss_type`` to our aggregation (checked against liger-kernel 0.8.5 in the tests):
``bnpo`` -> token-mean over the micro-batch; ``dapo`` -> token-mean divided by ``num_items_in_batch``
(over the world size when torch.distributed is up, as Liger does; without it, the micro-batch's
token count); ``grpo`` -> per-sequence token mean summed over sequences / B; ``dr_grpo`` ->
token sum / (B * max_completion_length). The returned metrics follow Liger's layout:
``(loss, (mean_kl if beta != 0, clip_ratio))``; ours add nothing there (call
``fused_linear_ngrpo_loss`` directly for the full metric dict). As Liger, it reads no tensor value
back to the host (``validate=False`` by default; ``validate=True`` adds the value checks and their
one synchronisation), and ``beta > 0`` without reference log-probs is an error, not a silent KL of 0.
``attention_mask`` is a 0/1 mask (TRL's completion mask): Liger also weights tokens by fractional mask
values, the drop-in does not (``validate=True`` refuses a value other than 0 and 1). Hidden states in
another dtype than the head's weight (bf16 activations, float32 master weights) are cast to the weight's.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks as check
from ..functional import fused_linear_ngrpo_loss


def _is_ratio(ratio: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Liger's ``vllm_is_ratio`` shapes, (B,) or (B, 1) one ratio per sequence and (B, T) one per token, as the
    loss's ``rollout_is_weights`` takes them ((B, 1) or (B, T)); refused under Liger's argument name otherwise."""
    if ratio.dim() == 1 and ratio.shape[0] == B:
        ratio = ratio[:, None]  # a (B,) tensor would otherwise broadcast along the tokens
    # (== each: tuple membership misjudges a symbolic size under torch.compile)
    if ratio.dim() != 2 or ratio.shape[0] != B or not (ratio.shape[1] == 1 or ratio.shape[1] == T):
        raise ValueError(f"vllm_is_ratio must have shape ({B},), ({B}, 1) or ({B}, {T}); got {tuple(ratio.shape)}")
    return ratio


class LigerFusedLinearNGRPOLoss(nn.Module):
    """Liger's constructor parameters in Liger's order (0.8.5), NGRPO's clip bounds and no KL by default;
    this package's own options come after them, keyword-only. Liger options for behaviour NGRPO does not
    have are refused when set (``delta``, ``use_bias_correction_kl``, sequence-level ratios); the SAPO / VESPO
    temperatures only act with those loss types, which are refused."""

    def __init__(self, beta: float = 0.0, compiled: bool = True, use_ref_model: bool = False, chunk_size: int = 1,
                 epsilon_low: float = 0.16, epsilon_high: float = 0.24, loss_type: str = "dapo",
                 max_completion_length: int | None = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: float | None = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, *,
                 entropy_coef: float = 0.0, clip_ratio_c: float | None = None, workspace_bytes: int | None = None,
                 validate: bool = False):
        super().__init__()
        if loss_type not in ("bnpo", "dapo", "grpo", "dr_grpo"):
            raise ValueError(f"loss_type={loss_type!r} is not supported here (bnpo, dapo, grpo, dr_grpo)")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        if importance_sampling_level != "token":
            raise ValueError("only importance_sampling_level='token' is supported (NGRPO clips per token)")
        if delta is not None:
            raise ValueError(f"delta={delta!r} (two-sided ratio clipping) is not NGRPO's loss; for a bound on the "
                             "ratio of negative-advantage tokens use clip_ratio_c= (dual clip)")
        if use_bias_correction_kl:
            raise ValueError("use_bias_correction_kl=True is not supported (NGRPO's KL term is the k3 estimator)")
        # Liger's tuning knobs (the fused schedule needs none) and the SAPO / VESPO loss types' parameters.
        del compiled, use_ref_model, chunk_size, sapo_temperature_pos, sapo_temperature_neg
        del vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg
        # options checked here, as NGRPOLoss checks them, not first at the forward
        beta = check.finite_number("beta", beta)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if clip_ratio_c is not None and not check.finite_number("clip_ratio_c", clip_ratio_c) > 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (the dual-clip bound -c*A), got {clip_ratio_c!r}")
        self.beta, self.loss_type, self.max_completion_length = beta, loss_type, max_completion_length
        # Liger does not read tensor values back: neither does the drop-in by default
        self.validate = check.flag("validate", validate)
        self.options = dict(eps_neg=check.open_unit("epsilon_low", epsilon_low),
                            eps_pos=check.positive("epsilon_high", epsilon_high),
                            temperature=check.positive("temperature", temperature),
                            entropy_coef=check.finite_number("entropy_coef", entropy_coef), clip_ratio_c=clip_ratio_c,
                            workspace_bytes=check.workspace("workspace_bytes", workspace_bytes))

    def extra_repr(self) -> str:
        return (f"loss_type={self.loss_type!r}, beta={self.beta}, "
                + ", ".join(f"{k}={v}" for k, v in self.options.items() if v is not None))

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        if ref_input is not None or ref_weight is not None or ref_bias is not None:
            raise NotImplementedError("pass ref_per_token_logps (computed with fused_linear_logprobs under "
                                      "torch.no_grad) instead of ref_input / ref_weight")
        if self.beta != 0.0 and ref_per_token_logps is None:
            raise ValueError(f"beta={self.beta!r} needs ref_per_token_logps (the KL penalty would silently be off)")
        B, T = selected_token_ids.shape
        hidden = _input.reshape(B, T, _input.shape[-1])
        if hidden.dtype != lin_weight.dtype:  # bf16 activations with float32 master weights: Liger accepts them
            hidden = hidden.to(lin_weight.dtype)
        if bias is not None and bias.dtype != lin_weight.dtype:
            bias = bias.to(lin_weight.dtype)
        if vllm_is_ratio is not None:
            vllm_is_ratio = _is_ratio(vllm_is_ratio, B, T)
        agg, normalizer, budget = "token-mean", None, None
        if self.loss_type == "dapo" and num_items_in_batch is not None:
            world = torch.distributed.get_world_size() if (
                torch.distributed.is_available() and torch.distributed.is_initialized()) else 1
            if isinstance(num_items_in_batch, torch.Tensor):
                normalizer = num_items_in_batch.to(torch.float32).clamp_min(1.0) / world
            else:
                normalizer = max(float(num_items_in_batch), 1.0) / world
        elif self.loss_type == "grpo":
            agg, normalizer = "seq-mean-token-mean", B
        elif self.loss_type == "dr_grpo":
            agg, normalizer, budget = "seq-mean-token-sum-norm", B, self.max_completion_length
        loss, metrics = fused_linear_ngrpo_loss(
            hidden, lin_weight, selected_token_ids, attention_mask, old_per_token_logps,
            advantages=advantages.to(torch.float32), bias=bias, ref_logprobs=ref_per_token_logps,
            beta=self.beta, rollout_is_weights=vllm_is_ratio, loss_agg_mode=agg, normalizer=normalizer,
            length_budget=budget, validate=self.validate, **self.options,
        )
        out = ([metrics["kl"]] if self.beta != 0.0 and "kl" in metrics else []) + [metrics["clip_frac"]]
        return loss, tuple(out)

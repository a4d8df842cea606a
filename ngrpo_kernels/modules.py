"""``nn.Module`` wrappers: options fixed at construction, tensors per call. They only compose the
functional API (``ngrpo_kernels.functional``)."""

from __future__ import annotations

import torch
from torch import nn

from . import _checks as check
from .functional import _check_skip_zero_advantage, _loss_options, fused_linear_ngrpo_loss
from .variants import AggMode


class NGRPOLoss(nn.Module):
    """The fused NGRPO loss as a module: ``loss, metrics = NGRPOLoss()(hidden, weight, targets, mask,
    old_logprobs, advantages=...)``. Options are those of ``fused_linear_ngrpo_loss`` and are checked
    here, at construction."""

    def __init__(self, *, temperature: float = 1.0, eps_neg: float = 0.16, eps_pos: float = 0.24,
                 clip_ratio_c: float | None = None, beta: float = 0.0, entropy_coef: float = 0.0,
                 loss_agg_mode: str | AggMode = "token-mean", length_budget: float | None = None,
                 r_max: float = 1.0, num_virtual: int = 1, workspace_bytes: int | None = None,
                 skip_zero_advantage: bool = False, validate: bool = True):
        super().__init__()
        mode = AggMode.parse(loss_agg_mode)
        temperature = check.positive("temperature", temperature)
        r_max = check.finite_number("r_max", r_max)
        num_virtual = check.nonnegative_int("num_virtual", num_virtual)
        workspace_bytes = check.workspace("workspace_bytes", workspace_bytes)
        skip_zero_advantage = check.flag("skip_zero_advantage", skip_zero_advantage)
        # beta > 0 needs ref_logprobs at call time; that pairing is checked per call.
        eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, length_budget, _ = _loss_options(
            mode, eps_neg, eps_pos, clip_ratio_c, beta, True, entropy_coef, True, length_budget, None, "cpu")
        _check_skip_zero_advantage(skip_zero_advantage, entropy_coef, beta)
        self.options = dict(temperature=temperature, eps_neg=eps_neg, eps_pos=eps_pos, clip_ratio_c=clip_ratio_c,
                            beta=beta, entropy_coef=entropy_coef, loss_agg_mode=mode, length_budget=length_budget,
                            r_max=r_max, num_virtual=num_virtual, workspace_bytes=workspace_bytes,
                            skip_zero_advantage=skip_zero_advantage, validate=check.flag("validate", validate))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v.value if isinstance(v, AggMode) else v}" for k, v in self.options.items())

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                old_logprobs: torch.Tensor | None = None, *, advantages: torch.Tensor | None = None,
                rewards: torch.Tensor | None = None, group_ids: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
                rollout_is_weights: torch.Tensor | None = None,
                normalizer: float | torch.Tensor | None = None):
        return fused_linear_ngrpo_loss(
            hidden, weight, targets, mask, old_logprobs, advantages=advantages, rewards=rewards,
            group_ids=group_ids, bias=bias, ref_logprobs=ref_logprobs, rollout_is_weights=rollout_is_weights,
            normalizer=normalizer, **self.options,
        )

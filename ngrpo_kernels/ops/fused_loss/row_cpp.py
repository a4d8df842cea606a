"""The row kernel of the fused linear -> NGRPO loss through the C++ extension (csrc/loss_rows.cpp)."""

from __future__ import annotations

import torch


def loss_rows_cpp(z, dz, bias, target, valid, w, adv, old, ref, isw, *, inv_temp, eps_neg, eps_pos, clip_c,
                  beta, entropy_coef, on_policy, need_grad):
    # The C++ kernel writes dZ in float32 (over z) or into a bfloat16 buffer (schedule.py: fp16 inputs get
    # float32 dZ).
    return torch.ops.ngrpo_kernels.loss_rows(
        z, dz if need_grad else None, None if bias is None else bias.float().contiguous(),
        target, valid, w, adv, old, ref, isw, inv_temp, eps_neg, eps_pos, clip_c, beta, entropy_coef, on_policy,
        need_grad,
    )

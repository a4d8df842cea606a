"""The row kernel of the fused linear -> NGRPO loss, vectorised PyTorch (the fallback when the C++
extension is not built). Contract in ``schedule.py``."""

from __future__ import annotations

import torch

from ..policy_loss.torch_impl import token_terms


def loss_rows_torch(z, dz, bias, target, valid, w, adv, old, ref, isw, *, inv_temp, eps_neg, eps_pos, clip_c,
                    beta, entropy_coef, on_policy, need_grad):
    zz = z if bias is None else z + bias.float()
    zz = zz * inv_temp
    lse = torch.logsumexp(zz, dim=-1)
    p = torch.exp(zz - lse[:, None])
    mean_z = (p * zz).sum(-1)
    zero = zz.new_zeros(())

    def keep(x):
        return None if x is None else torch.where(valid, x, zero)

    lp = keep(zz.gather(1, target[:, None])[:, 0] - lse)
    H = keep((lse - mean_z).clamp_min(0.0))  # rounding can leave a hair below 0: entropy is >= 0
    old = lp if on_policy else keep(old)
    stats, g_lp, g_H = token_terms(lp, old, keep(adv), valid, w, keep(ref), H, keep(isw), eps_neg=eps_neg,
                                   eps_pos=eps_pos, clip_ratio_c=clip_c, beta=beta, entropy_coef=entropy_coef,
                                   grad_logprobs=need_grad, grad_entropy=need_grad)
    if need_grad:
        d = -g_lp[:, None] * p - g_H[:, None] * p * (zz - mean_z[:, None])
        d.scatter_add_(1, target[:, None], g_lp[:, None])
        dz.copy_(d * inv_temp)
    return stats[0]

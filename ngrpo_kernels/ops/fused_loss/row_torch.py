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
    logp = zz - lse[:, None]
    p = torch.exp(logp)
    zero = zz.new_zeros(())

    def keep(x):
        return None if x is None else torch.where(valid, x, zero)

    lp = keep(zz.gather(1, target[:, None])[:, 0] - lse)
    # -E_p[log p], not lse - E_p[z]: no cancellation between two large numbers when every logit is large.
    # Rounding can leave a hair below 0: entropy is >= 0.
    H = keep(-(p * logp).sum(-1).clamp_max(0.0))
    old = lp if on_policy else keep(old)
    stats, g_lp, g_H = token_terms(lp, old, keep(adv), valid, w, keep(ref), H, keep(isw), eps_neg=eps_neg,
                                   eps_pos=eps_pos, clip_ratio_c=clip_c, beta=beta, entropy_coef=entropy_coef,
                                   grad_logprobs=need_grad, grad_entropy=need_grad)
    if need_grad:
        d = -g_lp[:, None] * p - g_H[:, None] * p * (logp + H[:, None])  # z - E_p[z] = log p + H
        d.scatter_add_(1, target[:, None], g_lp[:, None])
        dz.copy_(d * inv_temp)
    return stats[0]

"""The row kernel of the fused linear -> NGRPO loss, vectorised PyTorch (the fallback when the C++
extension is not built). Contract in ``schedule.py``."""

from __future__ import annotations

import torch

from ..policy_loss.torch_impl import token_terms


def loss_rows_torch(z, dz, bias, target, valid, w, adv, old, ref, isw, *, inv_temp, eps_neg, eps_pos, clip_c,
                    beta, entropy_coef, on_policy, need_grad):
    zz = z if bias is None else z + bias.float()
    zz = zz * inv_temp
    # Everything relative to the row max (as the C++ kernel): with every logit large (a bias of 1e4), lse - E_p[z]
    # and z - lse would subtract two large numbers.
    d = zz - zz.amax(-1, keepdim=True)
    p = torch.exp(d)
    s = p.sum(-1)
    log_s = torch.log(s)
    p /= s[:, None]
    logp = d - log_s[:, None]
    zero = zz.new_zeros(())

    def keep(x):
        return None if x is None else torch.where(valid, x, zero)

    lp = keep(logp.gather(1, target[:, None])[:, 0])
    # Rounding can leave a hair below 0 for a near one-hot softmax: entropy is >= 0.
    H = keep((log_s - (p * d).sum(-1)).clamp_min(0.0))
    old = lp if on_policy else keep(old)
    stats, g_lp, g_H = token_terms(lp, old, keep(adv), valid, w, keep(ref), H, keep(isw), eps_neg=eps_neg,
                                   eps_pos=eps_pos, clip_ratio_c=clip_c, beta=beta, entropy_coef=entropy_coef,
                                   grad_logprobs=need_grad, grad_entropy=need_grad)
    if need_grad:
        d = -g_lp[:, None] * p - g_H[:, None] * p * (logp + H[:, None])  # z - E_p[z] = log p + H
        d.scatter_add_(1, target[:, None], g_lp[:, None])
        dz.copy_(d * inv_temp)
    return stats[0]

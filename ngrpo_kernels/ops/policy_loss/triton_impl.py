"""The fused policy-loss pass, Triton: loss, gradient and metric sums in one read of [B, T].

Contract (shared with ``torch_impl.py``). Inputs, all contiguous [B, T] unless stated:
``logprobs``/``old_logprobs``/``ref_logprobs``/``entropy``/``rollout_is_weights`` any float dtype,
``advantages`` [B] or [B, T], ``valid`` bool, ``row_scale`` [B] float32 (the aggregation mode's per-row
factor, 1/n_b for seq-mean-token-mean). With ``w = valid * row_scale`` and per-token loss

    l_t = isw_t * pg_t + beta * k3_t - entropy_coef * H_t,
    pg_t = max(-A rho, -A clip(rho, 1 - eps_neg, 1 + eps_pos)), then min(., -c A) where A < 0 (dual clip)

it writes ``g_logprobs = w * dl/dlogp`` and ``g_entropy = -entropy_coef * w`` (float32 [B, T], when
asked) and one row of ``NUM_STATS`` partial sums per program (``variants.Stat``). The autograd backward
then only multiplies the stored gradients by ``grad_loss / denominator``.

Grid ``(B, cdiv(T, BLOCK_T))``: each program owns one BLOCK_T slice of one row, so short and long
batches both fill the GPU. Partial sums go to their own slot (no atomics): the reduction over programs
is a fixed-order ``torch.sum``, deterministic. Traffic per token: 4 B per float32 input read once,
1 B of mask, 4 B per gradient written; ~20 flops. The op is bandwidth-bound: at 16k tokens it moves
about 0.5 MB, microseconds on an H100, negligible next to the log-prob GEMMs it follows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...variants import NUM_STATS, Stat
from .. import cdiv
from ..launcher import direct


@triton.jit
def token_loss(lp, old, A, valid, ref, H, isw, eps_neg, eps_pos, clip_c, beta, entropy_coef,
               HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr, DUAL_CLIP: tl.constexpr):
    """Per-token NGRPO loss and d loss / d logp (docs/algorithm.md §3), on tensors or scalars already zeroed where
    not valid. Returns (loss, dloss, clipped, dual_clipped, k3). Shared by the policy-loss kernel and
    the fused linear -> loss row kernel, so the two cannot drift apart."""
    log_ratio = lp - old
    ratio = tl.exp(log_ratio)
    # A = 0: the term is 0 even where the ratio overflows to inf (0 * inf would be NaN); 0 * log_ratio keeps a
    # NaN input NaN.
    pg_unclipped = tl.where(A == 0.0, 0.0 * log_ratio, -A * ratio)
    # A NaN input must give a NaN loss, never a finite clip bound: min / max propagate NaN.
    clamped = tl.minimum(tl.maximum(ratio, 1.0 - eps_neg, propagate_nan=tl.PropagateNan.ALL), 1.0 + eps_pos,
                         propagate_nan=tl.PropagateNan.ALL)
    pg_clipped = -A * clamped
    clipped = pg_clipped > pg_unclipped
    loss = tl.maximum(pg_unclipped, pg_clipped, propagate_nan=tl.PropagateNan.ALL)
    dloss = tl.where(clipped, 0.0, pg_unclipped)
    dual = clipped & False
    if DUAL_CLIP:
        bound = -A * clip_c
        dual = (A < 0.0) & (bound < loss)
        loss = tl.where(dual, bound, loss)
        dloss = tl.where(dual, 0.0, dloss)
    # A weight of 0 (a token the rollout correction masks out) or beta = 0 (a KL only logged) gives 0, also where
    # the ratio or exp(log_r) overflows to inf (0 * inf would be NaN).
    if HAS_ISW:
        loss = tl.where(isw == 0.0, 0.0, loss * isw)
        dloss = tl.where(isw == 0.0, 0.0, dloss * isw)
    k3 = loss * 0.0
    if HAS_REF:
        log_r = ref - lp
        e = tl.exp(log_r)
        k3 = tl.where(valid, e - log_r - 1.0, 0.0)
        loss = tl.where(beta == 0.0, loss, loss + beta * k3)
        dloss = tl.where(beta == 0.0, dloss, dloss + beta * (1.0 - e))
    if HAS_ENT:
        loss = loss - entropy_coef * H
    # A NaN or inf input (possible only with validate=False) gives a NaN loss and d loss / d logp, never the finite
    # value a clip bound or the A = 0 rule would make of it (d loss / d entropy stays -entropy_coef * w).
    # x * 0 is 0 for a finite x and NaN for inf or NaN: one sum says whether every input is finite.
    poison = lp * 0.0 + old * 0.0 + A * 0.0
    if HAS_REF:
        poison += ref * 0.0
    if HAS_ENT:
        poison += H * 0.0
    if HAS_ISW:
        poison += isw * 0.0
    ok = poison == 0.0
    loss = tl.where(ok, loss, float("nan"))
    dloss = tl.where(ok, dloss, float("nan"))
    return loss, dloss, clipped & valid, dual & valid, k3


@triton.jit
def store_stat_sums(out, w_loss, clipped, log_ratio, A, H, k3, dual, lp,
                    S_LOSS: tl.constexpr, S_CLIPPED: tl.constexpr, S_LOG_RATIO: tl.constexpr, S_ADV: tl.constexpr,
                    S_ENTROPY: tl.constexpr, S_KL_REF: tl.constexpr, S_DUAL: tl.constexpr, S_LOGPROB: tl.constexpr):
    """One program's row of ``Stat`` sums (per-token vectors already zero where not valid), shared by this
    kernel and the fused loss's token kernel."""
    tl.store(out + S_LOSS, tl.sum(w_loss, axis=0))
    tl.store(out + S_CLIPPED, tl.sum(clipped.to(tl.float32), axis=0))
    tl.store(out + S_LOG_RATIO, tl.sum(log_ratio, axis=0))
    tl.store(out + S_ADV, tl.sum(A, axis=0))
    tl.store(out + S_ENTROPY, tl.sum(H, axis=0))
    tl.store(out + S_KL_REF, tl.sum(k3, axis=0))
    tl.store(out + S_DUAL, tl.sum(dual.to(tl.float32), axis=0))
    tl.store(out + S_LOGPROB, tl.sum(lp, axis=0))


@triton.jit
def _policy_loss_kernel(
    LP, OLD, ADV, VALID, ROW_SCALE, REF, ENT, ISW, G_LP, G_ENT, STATS,
    T, eps_neg, eps_pos, clip_c, beta, entropy_coef,
    ADV_PER_TOKEN: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_ISW: tl.constexpr,
    DUAL_CLIP: tl.constexpr, GRAD_LP: tl.constexpr, GRAD_ENT: tl.constexpr,
    NUM_STATS: tl.constexpr, BLOCK_T: tl.constexpr,
    S_LOSS: tl.constexpr, S_CLIPPED: tl.constexpr, S_LOG_RATIO: tl.constexpr, S_ADV: tl.constexpr,
    S_ENTROPY: tl.constexpr, S_KL_REF: tl.constexpr, S_DUAL: tl.constexpr, S_LOGPROB: tl.constexpr,
):
    b = tl.program_id(0)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    in_row = t < T
    offs = b.to(tl.int64) * T + t
    valid = tl.load(VALID + offs, mask=in_row, other=0) != 0

    lp = tl.load(LP + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(OLD + offs, mask=valid, other=0.0).to(tl.float32)
    if ADV_PER_TOKEN:
        A = tl.load(ADV + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        A = tl.where(valid, tl.load(ADV + b).to(tl.float32), 0.0)
    w = tl.where(valid, tl.load(ROW_SCALE + b), 0.0)
    ref = lp
    if HAS_REF:
        ref = tl.load(REF + offs, mask=valid, other=0.0).to(tl.float32)
    H = lp * 0.0
    if HAS_ENT:
        H = tl.load(ENT + offs, mask=valid, other=0.0).to(tl.float32)
    isw = lp * 0.0
    if HAS_ISW:
        isw = tl.load(ISW + offs, mask=valid, other=0.0).to(tl.float32)
    loss, dloss, clipped, dual, k3 = token_loss(lp, old, A, valid, ref, H, isw, eps_neg, eps_pos, clip_c, beta,
                                                entropy_coef, HAS_REF, HAS_ENT, HAS_ISW, DUAL_CLIP)
    if GRAD_LP:
        tl.store(G_LP + offs, w * dloss, mask=in_row)
    if GRAD_ENT:
        tl.store(G_ENT + offs, -entropy_coef * w, mask=in_row)

    out = STATS + (b.to(tl.int64) * tl.num_programs(1) + tb) * NUM_STATS
    store_stat_sums(out, w * loss, clipped, old - lp, A, H, k3, dual, lp, S_LOSS, S_CLIPPED, S_LOG_RATIO, S_ADV,
                    S_ENTROPY, S_KL_REF, S_DUAL, S_LOGPROB)


def stat_constexprs() -> dict:
    """The Stat column indices as kernel constexprs (S_LOSS=0, ...)."""
    names = {Stat.DUAL_CLIPPED: "DUAL"}
    return {f"S_{names.get(s, s.name)}": int(s) for s in Stat}


def _block_t(T: int) -> int:
    return min(1024, triton.next_power_of_2(T))


def policy_loss_fused_triton(
    logprobs, old_logprobs, advantages, valid, row_scale, ref_logprobs, entropy, rollout_is_weights, *,
    eps_neg, eps_pos, clip_ratio_c, beta, entropy_coef, grad_logprobs, grad_entropy,
):
    B, T = valid.shape
    block_t = _block_t(T)
    grid = (B, cdiv(T, block_t))
    dev = valid.device
    stats = torch.empty(grid[0] * grid[1], NUM_STATS, dtype=torch.float32, device=dev)
    g_lp = torch.empty(B, T, dtype=torch.float32, device=dev) if grad_logprobs else None
    g_ent = torch.empty(B, T, dtype=torch.float32, device=dev) if grad_entropy else None
    dummy = stats  # never dereferenced: the matching constexpr flag is off

    def arg(x):
        return dummy if x is None else x.contiguous()

    direct(_policy_loss_kernel)[grid](
        logprobs.contiguous(), old_logprobs.contiguous(), advantages.contiguous(),
        valid.contiguous().view(torch.uint8), row_scale.to(torch.float32).contiguous(),
        arg(ref_logprobs), arg(entropy), arg(rollout_is_weights), arg(g_lp), arg(g_ent), stats,
        T, float(eps_neg), float(eps_pos), float(clip_ratio_c or 0.0), float(beta), float(entropy_coef),
        ADV_PER_TOKEN=advantages.dim() == 2, HAS_REF=ref_logprobs is not None, HAS_ENT=entropy is not None,
        HAS_ISW=rollout_is_weights is not None, DUAL_CLIP=clip_ratio_c is not None,
        GRAD_LP=grad_logprobs, GRAD_ENT=grad_entropy, NUM_STATS=NUM_STATS, BLOCK_T=block_t,
        **stat_constexprs(),
    )
    return stats.sum(0, keepdim=True), g_lp, g_ent

"""`make library-demo`: the library on a small example (`make demo` runs the trainer).

1. docs/algorithm.md §2's advantage table (G = 8, binary rewards) computed by ``ngrpo_advantages`` beside GRPO.
2. One fused policy-loss call on a random batch, with its metrics and the gradient it produces.
3. The fused hidden-state -> NGRPO loss with its gradients for the hidden states and the lm_head.
"""

from __future__ import annotations

import torch

import ngrpo_kernels as nk


def advantage_table() -> None:
    G = 8
    ks = [0, 1, 2, 4, 7, 8]
    rewards = torch.cat([torch.tensor([1.0] * k + [0.0] * (G - k)) for k in ks])
    ids = torch.arange(len(ks)).repeat_interleave(G) * 101 + 7  # arbitrary ids
    perm = torch.randperm(len(rewards))  # trainers reorder batches: groups need not be contiguous
    ngrpo = torch.empty_like(rewards)
    grpo = torch.empty_like(rewards)
    ngrpo[perm] = nk.ngrpo_advantages(rewards[perm], ids[perm])
    grpo[perm] = nk.group_advantages(rewards[perm], ids[perm], estimator="grpo")
    print(f"Advantages, G = {G}, binary rewards (backend: {nk.selected_backend('cpu').value})")
    print(f"{'k correct':>10} | {'NGRPO correct':>13} {'NGRPO wrong':>12} | {'GRPO correct':>12} {'GRPO wrong':>11}")
    for i, k in enumerate(ks):
        rows = slice(i * G, (i + 1) * G)
        n, g = ngrpo[rows], grpo[rows]
        def fmt(x, j):
            return f"{float(x[j]):+.6f}" if j is not None else "-"
        c, w = (0 if k > 0 else None), (G - 1 if k < G else None)
        print(f"{k:>10} | {fmt(n, c):>13} {fmt(n, w):>12} | {fmt(g, c):>12} {fmt(g, w):>11}")


def loss_example() -> None:
    torch.manual_seed(0)
    B, T = 8, 12
    rewards = torch.tensor([0.0] * 4 + [1.0, 0.0, 0.0, 1.0])  # group 0 all wrong, group 1 half right
    group_ids = torch.tensor([0] * 4 + [1] * 4)
    advantages = nk.ngrpo_advantages(rewards, group_ids)
    old = -torch.rand(B, T) * 2
    logp = (old + 0.2 * torch.randn(B, T)).requires_grad_()
    entropy = (torch.rand(B, T) * 2).requires_grad_()
    lengths = torch.randint(3, T + 1, (B,))
    mask = torch.arange(T)[None, :] < lengths[:, None]
    loss, metrics = nk.ngrpo_policy_loss(logp, old, advantages, mask, entropy=entropy, entropy_coef=0.001)
    loss.backward()
    print("\nOne fused NGRPO policy-loss call (B = 8 responses, T = 12, eps 0.16 / 0.24, entropy bonus 0.001)")
    print("advantages:", [round(a, 4) for a in advantages.tolist()])
    print(f"loss = {loss.item():+.6f}; " + ", ".join(f"{k} = {v.item():.4f}" for k, v in metrics.items()))
    print(f"d loss / d logprobs: {int((logp.grad != 0).sum())} nonzero of {int(mask.sum())} valid tokens "
          f"(clipped tokens get none), |grad|_1 = {logp.grad.abs().sum().item():.6f}")
    print("the all-wrong group (0) pushes its tokens down: mean grad on its valid tokens = "
          f"{logp.grad[:4][mask[:4]].mean().item():+.6f} (> 0 means gradient descent lowers their log-probs)")


def fused_example() -> None:
    """The product's centre: hidden states + lm_head -> NGRPO loss and gradients, no full logits."""
    torch.manual_seed(0)
    B, T, H, V = 8, 16, 64, 4096
    hidden = torch.randn(B, T, H, requires_grad=True)
    lm_head = torch.nn.Linear(H, V, bias=False)
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad():  # the old policy's log-probs, through the fused no-grad pass
        old = nk.fused_linear_logprobs(hidden, lm_head.weight, targets) + 0.05 * torch.randn(B, T)
    rewards = torch.tensor([0.0] * 4 + [1.0, 0.0, 1.0, 1.0])
    group_ids = torch.tensor([0] * 4 + [1] * 4)
    loss, metrics = nk.NGRPOLoss(entropy_coef=0.001)(hidden, lm_head.weight, targets, mask, old, rewards=rewards,
                                                    group_ids=group_ids)
    loss.backward()
    print(f"\nFused hidden -> loss (B={B}, T={T}, H={H}, V={V}, backend {nk.selected_backend('cpu').value}): "
          f"loss = {loss.item():+.6f}, entropy = {metrics['entropy'].item():.4f}, "
          f"|dL/dhidden| = {hidden.grad.norm().item():.3e}, |dL/dW| = {lm_head.weight.grad.norm().item():.3e}")


def main() -> None:
    advantage_table()
    loss_example()
    fused_example()


if __name__ == "__main__":
    main()

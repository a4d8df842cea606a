"""Signed errors of the head's logits and log-probs against float64, per way of computing them.

    python benchmarks/precision_probe.py        # a GPU: the 7B head, N = 2048; the CPU: a tiny head

The float64 checks of ``gpu_head.py`` found our fused loss 1.3e-5 off float64 on an H200 where plain float32
PyTorch was 1e-8 off. This says where such a difference comes from: the logits of a tensor-core GEMM (ours,
cuBLAS's bf16 GEMM with a float32 output) against plain float32 (no tensor cores) and float64, as a mean
error, a relative slope (error ~ slope * z) and the error on each row's top logits; then the logsumexp and
the log-probs each gives, and ours (``fused_linear_logprobs``, ``fused_linear_ngrpo_loss`` with ratios near 1).
"""

import torch

import ngrpo_kernels as nk
from ngrpo_kernels.ops import persistent_gemm as pg
from ngrpo_kernels.ops.fused_loss.naive import fused_linear_ngrpo_loss_naive


def main() -> None:
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    N, H, V = (2048, 3584, 152064) if cuda else (64, 48, 500)
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(N, H, device=dev, generator=g).bfloat16()
    w = (torch.randn(V, H, device=dev, generator=g) * (4.0 / H) ** 0.5).bfloat16()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    z64 = x.double() @ w.double().T
    lse64 = torch.logsumexp(z64, 1)
    lp64 = z64.gather(1, t[:, None])[:, 0] - lse64
    print(f"N={N} H={H} V={V} on {torch.cuda.get_device_name() if cuda else 'CPU'}; logit std "
          f"{z64.std().item():.2f}, mean row max {z64.amax(1).mean().item():.2f}")

    def logit_errors(name, z):
        e = z.double() - z64
        top = z64 > z64.amax(1, keepdim=True) - 3
        lse = torch.logsumexp(z.double(), 1)
        lp = z.double().gather(1, t[:, None])[:, 0] - lse
        print(f"{name}: logit mean error {e.mean().item():.2e}, relative slope "
              f"{((e * z64).sum() / (z64 * z64).sum()).item():.2e}, mean error on the top logits "
              f"{e[top].mean().item():.2e} (their mean {z64[top].mean().item():.2f}); logsumexp mean error "
              f"{(lse - lse64).mean().item():.2e}; log-prob mean error {(lp - lp64).mean().item():.2e}")

    z = torch.empty(N, V, device=dev, dtype=torch.float32)
    pg.logits(x, w, bias=None, inv_temp=1.0, shift=torch.zeros(N, device=dev), out=z)
    logit_errors("our persistent GEMM, float32 out", z)
    del z
    logit_errors("plain float32 (x.float() @ w.float().T)", x.float() @ w.float().T)
    if cuda:
        logit_errors("cuBLAS bf16 GEMM, float32 out", torch.mm(x, w.T, out_dtype=torch.float32))
    err = nk.fused_linear_logprobs(x, w, t).double() - lp64
    print(f"ours, fused_linear_logprobs: log-prob mean error {err.mean().item():.2e}, max "
          f"{err.abs().max().item():.2e}")
    mask = torch.ones(1, N, dtype=torch.bool, device=dev)
    old = lp64.float()[None] + 0.1 * torch.randn(1, N, device=dev, generator=g)
    adv = torch.ones(1, device=dev)
    loss_d, _ = fused_linear_ngrpo_loss_naive(x.double()[None], w.double(), t[None], mask, old.double(),
                                              advantages=adv.double())
    loss, _ = nk.fused_linear_ngrpo_loss(x[None], w, t[None], mask, old, advantages=adv)
    print(f"ours, fused_linear_ngrpo_loss (A = 1, ratios near 1): relative error "
          f"{(loss.double() - loss_d).item() / loss_d.item():.2e}")


if __name__ == "__main__":
    main()

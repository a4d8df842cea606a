"""pass@k and its AUC (docs/algorithm.md §7)."""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n - c, k) / C(n, k) from n samples of which c are correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def powers_of_two(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def mean_pass_at_k(correct_counts: list[int], n: int, ks: list[int] | None = None) -> dict[int, float]:
    """pass@k averaged over problems, for k = 1, 2, 4, ..., n (or the given ks)."""
    ks = ks or powers_of_two(n)
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}


def pass_at_k_auc(curve: dict[int, float]) -> float:
    """Trapezoid on a uniform log2(k) axis over k = 1, 2, 4, ..., K, scaled to 0-100:
    100 * [p1 + 2 (p2 + ... + p_{K/2}) + pK] / (2 * log2 K). With K = 256:
    100 * [p1 + 2 (p2 + p4 + ... + p128) + p256] / 16."""
    ks = sorted(curve)
    if len(ks) < 2 or ks != powers_of_two(ks[-1]):
        raise ValueError(f"need pass@k at k = 1, 2, 4, ..., K (K >= 2), got {ks}")
    p = [curve[k] for k in ks]
    return 100.0 * (p[0] + 2 * sum(p[1:-1]) + p[-1]) / (2 * (len(ks) - 1))

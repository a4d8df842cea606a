"""What the fused ops' autograd Functions share.

Their backward passes are first-order only: the gradients are formed by the kernels (in the forward of
the fused losses), with no graph behind them. Any use of the outputs is differentiated correctly to
first order (``loss ** 2``, sums, products with other terms: the stored gradient is multiplied by the
upstream one); a second-order request (``torch.autograd.grad(..., create_graph=True)``, e.g. for a
gradient penalty) would silently get a gradient without a graph, so it is refused instead.
"""

from __future__ import annotations

import functools

import torch


def first_order(backward):
    """Decorator for ``Function.backward``: raise under ``create_graph=True``, run with no graph otherwise."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # the engine enables grad mode in backward only for create_graph=True
            raise RuntimeError(
                "ngrpo_kernels ops are differentiable once: their gradients are computed by fused kernels "
                "with no autograd graph, so torch.autograd.grad(..., create_graph=True) / double backward "
                "(e.g. a gradient penalty) is not supported. First-order use of the outputs, linear or not, is.")
        return backward(ctx, *grads)

    return wrapper

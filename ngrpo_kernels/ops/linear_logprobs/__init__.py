"""Fused linear -> log-prob (+ entropy) (docs/algorithm.md §5): ``naive.py`` is the spec (full logits);
``triton_impl.py`` (GPU, or CPU under the interpreter) and ``torch_impl.py`` (chunked CPU fallback)
never hold more than a bounded chunk of logits. Both offer the same ``forward`` (log-probs, entropy and
the row max and log s kept for backward) and ``backward`` (recomputes the logits); ``ngrpo_kernels._library``
wraps them as the custom ops ``ngrpo::linear_logprobs`` / ``ngrpo::linear_logprobs_backward``.
Inputs arrive validated from ``ngrpo_kernels.functional``.
"""

from __future__ import annotations

from ...backend import Backend
from .naive import linear_logprobs_naive

__all__ = ["impl", "linear_logprobs_naive"]


def impl(backend: Backend):
    """The module whose ``forward`` / ``backward`` run on ``backend`` (TRITON, or the chunked torch path)."""
    if backend == Backend.TRITON:
        from . import triton_impl as module
    else:
        from . import torch_impl as module
    return module

"""Loads the C++ CPU backend (csrc/, built by setup.py into ngrpo_kernels/_C*.so) if it was built."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def cpp_available() -> bool:
    """True when torch.ops.ngrpo_kernels.loss_rows is registered (the extension was built and loads)."""
    for lib in sorted(Path(__file__).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
        except OSError:  # built against another torch: the PyTorch fallback runs instead
            continue
        return hasattr(torch.ops.ngrpo_kernels, "loss_rows")
    return False

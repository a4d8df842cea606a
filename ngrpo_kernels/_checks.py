"""Input checks at the public boundary. Backends never re-check what these validated.

Structural checks (types, ranks, shapes, dtypes, devices, scalar options) read no tensor data and
never synchronise. Value checks (NaN/inf, 0/1 masks, vocabulary range) read data: they are gathered
into one boolean reduction, so a call synchronises with the device at most once, and are skipped
entirely with ``validate=False``.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch


def describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def tensor(name: str, x, *, ranks: Iterable[int] | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ranks is not None:
        ranks = tuple(ranks)
        if x.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have rank {want}, got {describe(x)}")
    return x


def floating(name: str, x: torch.Tensor) -> torch.Tensor:
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a real floating-point tensor, got {describe(x)}")
    return x


def integer(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {describe(x)}")
    return x


def mask_like(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or real tensor of 0/1 values, got {describe(x)}")
    return x


def same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {describe(x)}")


def same_device(tensors: dict[str, torch.Tensor | None]) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, x in present.items():
        if x.device != first.device:
            raise ValueError(
                f"all tensors must be on one device: {first_name} is on {first.device}, {name} on {x.device}"
            )
    return first.device


def weight_kept(weight: torch.Tensor, shape_ok: bool, reads: str, fix: str) -> None:
    """For a backward that reads the lm_head weight: refuse one freed or re-partitioned since the forward
    (FSDP frees a parameter's storage after its unit's forward, DeepSpeed ZeRO-3 swaps it for an empty
    tensor) instead of reading whatever the memory holds now. ``shape_ok``: the caller's shape test. Host-side
    metadata only (no sync); called inside the ops' implementations, where every route (eager, compiled, a
    compiled backward) runs it on real tensors."""
    last = weight.storage_offset() + sum((n - 1) * s for n, s in zip(weight.shape, weight.stride()))
    needed = (last + 1) * weight.element_size() if weight.numel() else 0  # overlapping strides (expand) count once
    if not shape_ok or weight.untyped_storage().nbytes() < needed:
        raise RuntimeError(f"the lm_head weight ({describe(weight)} now) was freed or re-partitioned between the "
                           f"forward and the backward, which reads it ({reads}). {fix}")


def nonempty(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} is empty ({describe(x)}): an empty batch has no loss or advantages")


def _is_bool(v) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"  # numpy's bool is not a bool subclass


def finite_number(name: str, v) -> float:
    """A Python or NumPy real number (np.float32(0.2) included), returned as a float."""
    # Comparisons, not math.isfinite: under torch.compile a float argument may be symbolic (a SymFloat,
    # which math.isfinite cannot take); NaN fails both comparisons.
    if _is_bool(v) or not isinstance(v, numbers.Real) or not -math.inf < v < math.inf:
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def open_unit(name: str, v) -> float:
    v = finite_number(name, v)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {v!r}")
    return v


def positive(name: str, v) -> float:
    v = finite_number(name, v)
    if v <= 0.0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    return v


def flag(name: str, v) -> bool:
    """A Python or NumPy bool: a string such as "False" would otherwise read as True."""
    if not _is_bool(v):
        raise TypeError(f"{name} must be a bool, got {v!r}")
    return bool(v)


def workspace(name: str, v) -> int | None:
    """None (the default) or a positive int of bytes."""
    if v is not None and (_is_bool(v) or not isinstance(v, numbers.Integral) or v <= 0):
        raise ValueError(f"{name} must be a positive int (bytes) or None, got {v!r}")
    return None if v is None else int(v)


def integer_option(name: str, v) -> int:
    if _is_bool(v) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {v!r}")
    return int(v)


def nonnegative_int(name: str, v) -> int:
    if _is_bool(v) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    return int(v)


class ValueChecks:
    """Collects data-dependent checks and runs them with a single device synchronisation.

    Each check has a fixed ``message`` and an optional ``detail`` callable (shapes, sizes) that is called only
    to report a failure: under torch.compile the message must stay a constant string (sizes may be symbolic)."""

    def __init__(self) -> None:
        self._checks: list[tuple[torch.Tensor, str, object]] = []

    def add(self, ok: torch.Tensor, message: str, detail=None) -> None:
        self._checks.append((ok.all(), message, detail))

    def finite(self, name: str, x: torch.Tensor, where: torch.Tensor | None = None) -> None:
        ok = torch.isfinite(x) if where is None else torch.isfinite(x) | ~where
        at = "" if where is None else " at valid (mask != 0) positions"
        self.add(ok, f"{name} has NaN or inf values{at}", lambda: describe(x))

    def run(self) -> None:
        if not self._checks:
            return
        if torch.compiler.is_compiling():
            # A traced graph cannot branch on a tensor value: each check becomes an asynchronous assert
            # (a RuntimeError with the same message on the CPU; a device-side assert on a GPU, which ends
            # the process). validate=False removes them.
            for ok, message, _ in self._checks:
                torch._assert_async(ok, message)
            return
        device = self._checks[0][0].device  # a CPU normaliser's check may sit beside device ones
        if bool(torch.stack([ok.to(device) for ok, _, _ in self._checks]).all()):  # the one synchronisation
            return
        for ok, message, detail in self._checks:
            if not bool(ok):
                context = "" if detail is None else f" ({detail()})"
                raise ValueError(message + context + "; pass validate=False to skip value checks in hot loops")

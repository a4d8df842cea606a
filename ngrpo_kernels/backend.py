"""Which implementation runs an op: chosen once, at the public entry point.

- CUDA tensors -> Triton kernels.
- CPU tensors -> the vectorised PyTorch path, or the Triton kernels when ``TRITON_INTERPRET=1``
  (the Triton interpreter runs them on the CPU: that is how CI tests the kernel code itself).
  Ops that have a C++ kernel (the fused linear -> loss row kernel) use it on CPU when it was built
  (``Backend.CPP``); the others treat CPP as TORCH.
- ``use_backend(...)`` forces a choice (tests use it to check every path against the reference).

``selected_backend(device)`` answers "which one would run here?" without running anything.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import os

import torch


class Backend(str, enum.Enum):
    TRITON = "triton"        # Triton kernels (GPU, or CPU under TRITON_INTERPRET=1)
    TORCH = "torch"          # vectorised PyTorch with the same fused math (CPU fallback)
    CPP = "cpp"              # the C++ extension (csrc/), CPU only, where an op has one
    REFERENCE = "reference"  # the plain-PyTorch specification (slow, autograd-based)


_forced: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("ngrpo_backend", default=None)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton ships with every Linux install of this package
        return False
    return True


# Read once, when ngrpo_kernels is imported: Triton reads the variable when each kernel is defined (our kernel
# modules are imported later, on first use), so a value set after the import could not be honoured
# consistently (GPU code would be handed to the interpreter: "Cannot call @triton.jit'd outside of the scope
# of a kernel"). Set it before importing ngrpo_kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_enabled() -> bool:
    """Was TRITON_INTERPRET=1 set when ngrpo_kernels was imported (Triton kernels on CPU tensors)?"""
    return _INTERPRET


_answers: dict = {}  # (forced backend, device) -> Backend, for eager calls


def selected_backend(device: torch.device | str) -> Backend:
    """The backend an op called with tensors on ``device`` uses now."""
    if torch.compiler.is_compiling():
        # The members' table, not ``Backend(name)``: Dynamo (torch 2.11) cannot trace an Enum constructor.
        return Backend._value2member_map_[_selected_name(str(device))]
    # Eager: the answer depends only on the forced backend and the device (the rest is fixed per process),
    # so it is kept (~5 us of host time a call on this project's CPU). A refusal raises and is not kept.
    key = (_forced.get(), device)
    answer = _answers.get(key)
    if answer is None:
        answer = _answers[key] = Backend._value2member_map_[_selected_name(str(device))]
    return answer


# Under torch.compile the answer is taken once, when the graph is traced, and kept in the graph (Dynamo
# cannot trace a ContextVar): a use_backend() block entered after compiling does not change a compiled
# function (torch._dynamo.reset() or a fresh torch.compile does).
@torch.compiler.assume_constant_result
def _selected_name(device: str) -> str:
    forced = _forced.get()
    device = torch.device(device)
    if forced == Backend.TRITON and device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError("backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before ngrpo_kernels is imported (the kernels are GPU code otherwise)")
    if forced is not None:
        return forced.value
    if triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())):
        return Backend.TRITON.value
    if device.type == "cpu":
        from ._cpp import cpp_available

        if cpp_available():
            return Backend.CPP.value
    return Backend.TORCH.value


@contextlib.contextmanager
def use_backend(backend: Backend | str):
    """Force every op inside the block onto one backend: ``with use_backend("torch"): ...``."""
    try:
        backend = Backend(backend)
    except ValueError:
        names = ", ".join(repr(b.value) for b in Backend)
        raise ValueError(f"backend={backend!r} is not one of {names}") from None
    if backend == Backend.TRITON and not triton_available():
        raise RuntimeError("backend='triton' requested but triton is not installed")
    if backend == Backend.CPP:
        from ._cpp import cpp_available

        if not cpp_available():
            raise RuntimeError("backend='cpp' requested but the C++ extension was not built (see setup.py)")
    token = _forced.set(backend)
    try:
        yield backend
    finally:
        _forced.reset(token)

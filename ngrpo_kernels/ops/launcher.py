"""Launching our Triton kernels with less host time than ``kernel[grid](...)`` once a specialisation is compiled.

Triton's generic launch (``JITFunction.run``) binds every argument into a dict, computes each argument's
specialisation (its type, 16-byte alignment of a pointer, an integer equal to 1 or divisible by 16),
formats a string cache key from them and the options, and looks the compiled kernel up. On the H200 hosts
Triton's ``run`` was the function with the most own time in the no-grad call's host profile
(docs/kernels.md).

``Launcher(fn)(grid, *args, **kwargs)`` (``direct(fn)[grid](*args, **kwargs)``) does what
``fn[grid](*args, **kwargs)`` does. The first launch of each specialisation goes through Triton (which
compiles, or finds the kernel in its caches); the compiled kernel it returns is kept under a key made of
what Triton's specialisation depends on (``_spec``: a tensor's dtype and alignment, an integer's
equality to 1, divisibility by 16 and range, a float's or bool's type; Triton's own
``native_specialize_impl`` for anything else), the constexpr values, the launch options, the knobs Triton
adds to them, and the current device. Later launches with that key call the compiled kernel's launcher as
the end of ``JITFunction.run`` does (launch metadata and launch hooks included, so profilers such as
Proton still see them). The key is at least as fine as Triton's (``tests/test_launcher.py`` checks
``_spec`` against ``native_specialize_impl``, and, through Triton's real launch path with a stand-in
driver, that every direct launch hands the CUDA launcher the kernel and the arguments Triton's would).

Triton's generic path is kept (every launch) under the interpreter, while a pre-run hook or a
stage-inspection hook is set, for a callable grid, for a runtime argument passed by keyword, when
``NGRPO_GENERIC_LAUNCH=1`` was set at import, and within ``generic_launch(True)``.

Host time on this project's 2-core CPU (``benchmarks/launch_host.py``, stand-in driver, CPU tensors,
2026-11-28, medians of 300 calls over several runs, the larger figures while the machine was loaded): one
logits-GEMM launch (``persistent_gemm.logits``, with its Python) 45-111 us through Triton's path, 29-68 us
direct; the no-grad implementation 292-433 against 232-360 us. Not yet timed on a GPU host:
``gpu_head.py --diagnose`` times isolated calls both ways.
"""

from __future__ import annotations

import contextlib
import os

import torch
from triton import knobs
from triton.runtime import driver

from ..backend import interpreter_enabled

try:  # Triton's C++ specialisation (triton 3.3 and later); without it every launch takes Triton's path
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - older or newer Triton
    native_specialize_impl = None

_generic = os.environ.get("NGRPO_GENERIC_LAUNCH", "0") == "1"


@contextlib.contextmanager
def generic_launch(enabled: bool = True):
    """Within this block every launch goes through Triton's generic path (``enabled``), or the direct one
    after the first launch of each specialisation (``enabled=False``). Process-wide, like the launches."""
    global _generic
    previous, _generic = _generic, bool(enabled)
    try:
        yield
    finally:
        _generic = previous


def _spec(v):
    """What Triton's specialisation of an argument depends on, cheaply: a tensor's dtype and 16-byte
    alignment; an integer's equality to 1, divisibility by 16 and range (i32 / i64 / u64); the type of a
    float or bool. ``tests/test_launcher.py`` checks, over a grid of values, that equal results here imply
    equal specialisations by Triton's ``native_specialize_impl``. Anything else: ``NotImplemented``."""
    t = type(v)
    if t is torch.Tensor:
        return (v.dtype, v.data_ptr() % 16 == 0)
    if t is int:
        return (v == 1, v % 16 == 0, -2**31 <= v < 2**31, -2**63 <= v < 2**63)
    if t is float or t is bool or v is None:
        return t
    if isinstance(v, torch.Tensor):  # a Parameter, a subclass
        return (v.dtype, v.data_ptr() % 16 == 0)
    return NotImplemented


class Launcher:
    """``Launcher(fn)(grid, *args, **kwargs)`` launches the ``@triton.jit`` function ``fn`` as
    ``fn[grid](*args, **kwargs)`` would (module docstring)."""

    def __init__(self, fn):
        self.fn = fn  # a JITFunction (an InterpretedFunction under the interpreter: always Triton's path)
        self.kernels = {}  # key -> (compiled kernel, the parameter values after the positional ones)
        self.backend = None

    def _prepare(self, device):
        params = self.fn.params
        self.names = [p.name for p in params]
        self.constexpr = [p.is_constexpr for p in params]
        self.flags = [(p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment) for p in params]
        self.defaults = {p.name: p.default for p in params if p.has_default}
        self.runtime_names = frozenset(p.name for p in params if not p.is_constexpr)
        self.first_constexpr = next((i for i, c in enumerate(self.constexpr) if c), len(params))
        self.backend = self.fn.device_caches[device][3]

    def _key(self, device, args, kwargs):
        """One flat tuple: the device, each positional argument's specialisation, the keyword names, values
        and their types (constexprs and launch options, in the caller's order: a call site that orders them
        differently only gets an entry of its own; the types because True == 1 == 1.0 in Python: finer than
        Triton's own lookup, which takes them as one) and the knobs Triton adds to the options. None where
        the call must take Triton's path (a runtime argument passed by keyword)."""
        specs = [_spec(v) for v in args]
        if len(args) > self.first_constexpr or NotImplemented in specs:
            for i, v in enumerate(args):
                if self.constexpr[i]:
                    specs[i] = ("constexpr", type(v), v)
                elif specs[i] is NotImplemented:  # Triton's own answer (exact, slower)
                    specs[i] = native_specialize_impl(self.backend, v, *self.flags[i])
        if not self.runtime_names.isdisjoint(kwargs):
            return None
        comp = knobs.compilation
        values = kwargs.values()
        return (device, len(args), *specs, *kwargs, *values, *map(type, values), knobs.runtime.debug,
                comp.instrumentation_mode, getattr(comp, "fpsan_homomorphic_casts", None))

    def __call__(self, grid, *args, **kwargs):
        fn = self.fn
        if (_generic or native_specialize_impl is None or interpreter_enabled() or callable(grid) or fn.pre_run_hooks
                or getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None):
            return fn[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        if self.backend is None:  # Triton's first launch creates the device's backend
            kernel = fn[grid](*args, **kwargs)
            self._prepare(device)
            return kernel
        key = self._key(device, args, kwargs)
        try:
            hit = self.kernels.get(key) if key is not None else None
        except TypeError:  # an unhashable constexpr or option: Triton's path, every launch
            key = hit = None
        if hit is None:
            kernel = fn[grid](*args, **kwargs)
            if key is not None and kernel is not None:
                tail = tuple(kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):])
                self.kernels[key] = (kernel, tail)
            return kernel
        # as the end of Triton's JITFunction.run, with the kernel it would have looked up
        kernel, tail = hit
        stream = driver.active.get_current_stream(device)
        g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        rt = knobs.runtime
        metadata = kernel.launch_metadata(grid, stream, *args, *tail)
        kernel.run(*g, stream, kernel.function, kernel.packed_metadata, metadata, rt.launch_enter_hook,
                   rt.launch_exit_hook, *args, *tail)
        return kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self(grid, *args, **kwargs)


_launchers: dict = {}


def direct(fn) -> Launcher:
    """The process's ``Launcher`` of ``fn``: ``direct(kernel)[grid](*args, **kwargs)`` in place of
    ``kernel[grid](*args, **kwargs)``."""
    launcher = _launchers.get(id(fn))
    if launcher is None:
        launcher = _launchers.setdefault(id(fn), Launcher(fn))
    return launcher

import os
import zlib

import pytest
import torch

# The Triton interpreter reads this when @triton.jit decorates a kernel, i.e. when the kernel modules
# are first imported: it must be set before any test imports them. On a CUDA machine the kernels
# compile for the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST_BACKENDS = ["torch", "triton"]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=FAST_BACKENDS)
def backend(request, device):
    if request.param == "torch" and device.type == "cuda":
        pytest.skip("the vectorised PyTorch path is the CPU fallback")
    if request.param == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (CUDA machine: see the cuda cases)")
    return request.param


@pytest.fixture
def gen(request):
    """A random stream of its own per test, seeded from the test's id: reproducible, never shared."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every float buffer the ops allocate with torch.empty / empty_like starts as NaN, so an output
    element that a kernel forgets to write shows up as NaN in the comparison instead of stale zeros."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))

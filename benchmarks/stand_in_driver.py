"""A stand-in for Triton's CUDA driver, so that Triton's real launch path runs on a machine with no GPU.

Kernels compile for real (sm_90a, as ``hopper_report`` compiles them), Triton binds and specialises the
arguments and looks the kernel up as on a GPU; only loading the binary and the final C launch are replaced:
``Recorder`` keeps what each launch would have handed to the CUDA launcher (grid, stream, function handle,
metadata, every argument). The arguments may be CPU tensors (only their addresses are read).

Used by ``launch_host.py`` (the host time of Triton's generic launch against
``ngrpo_kernels.ops.launcher``'s) and by the tests that check the direct launches hand the launcher exactly
what Triton's would. Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import hashlib

from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class Recorder:
    """Triton's ``launcher_cls``: one per compiled kernel; ``calls`` is shared by all of them."""

    calls: list = []
    enabled = True

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        if Recorder.enabled:
            Recorder.calls.append(args)


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        # a distinct "function handle" per binary: two specialisations never look alike
        function = int.from_bytes(hashlib.sha1(kernel).digest()[:6], "little")
        return (function, function, 64, 0, 1024)  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}

    def unload_module(self, module):
        pass


class StandInDriver:
    launcher_cls = Recorder

    def __init__(self, stream: int = 7):
        self.utils = _Utils()
        self.stream = stream

    def is_active(self):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return self.stream

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def install() -> StandInDriver:
    stand_in = StandInDriver()
    driver.set_active(stand_in)
    return stand_in

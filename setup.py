"""Build script: metadata lives in pyproject.toml; this file builds the C++ CPU backend (csrc/) through
CMakeLists.txt against the installed torch, into ngrpo_kernels/_C.so.

Install with ``pip install --no-build-isolation -e .`` after torch (the build needs the installed
torch's headers). If the C++ build fails the package still installs and works: the PyTorch fallback
runs instead, and ``ngrpo_kernels.cpp_available()`` says so. Set NGRPO_REQUIRE_CPP=1 to make a failed
build an error (CI does).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        try:
            import torch

            build_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                            f"-DPython3_EXECUTABLE={sys.executable}"], check=True)
            subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)], check=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(build_dir / "_C.so", target)
        except Exception as err:  # the package works without it (PyTorch fallback)
            if os.environ.get("NGRPO_REQUIRE_CPP") == "1":
                raise
            print(f"warning: the C++ CPU backend was not built ({err}); the PyTorch fallback will be used",
                  file=sys.stderr)
            # Nothing to install: an earlier build's library would ship in its place, and an editable install
            # would try to copy the missing one into the source tree (and fail).
            target.unlink(missing_ok=True)
            (ROOT / "ngrpo_kernels" / target.name).unlink(missing_ok=True)  # an in-place / editable build's copy
            self.extensions = [e for e in self.extensions if e is not ext]


setup(ext_modules=[CMakeExtension("ngrpo_kernels._C")], cmdclass={"build_ext": CMakeBuild})

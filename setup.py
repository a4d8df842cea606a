"""Build script. The package is pure Python + Triton today; the C++ CPU backend (csrc/, built through
CMakeLists.txt) hooks in here when it lands. Metadata lives in pyproject.toml."""

from setuptools import setup

setup()

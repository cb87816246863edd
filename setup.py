"""Build script: the Python package, the Triton kernels folder mapped to ``finesteer._triton``.

(The C++/CUDA extensions are added by the kernels work; see csrc/.)
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["finesteer", "finesteer.*"]) + ["finesteer._triton"],
    package_dir={"finesteer._triton": "kernels"},
)

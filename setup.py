"""Build script: the Python package, and the C++ extension ``spade_kernels._C``.

The extension always holds the CPU ops (``csrc/*.cpp``: TORCH_LIBRARY schemas
and C++/OpenMP kernels).  Its CUDA ops (``csrc/cuda/*.cpp``, the binding, and
``csrc/kernels/*.cu``, the kernels) are added only when a CUDA-enabled torch
and nvcc are present and ``SPADE_SKIP_CUDA_BUILD`` is not set; otherwise one
line says why they were skipped.  The package imports without the
extension (``spade_kernels._ext`` reports why it is missing).

Knobs (README, "Build options"): SPADE_SKIP_CUDA_BUILD, TORCH_CUDA_ARCH_LIST,
MAX_JOBS.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_skip_reason() -> str | None:
    if os.environ.get("SPADE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "SPADE_SKIP_CUDA_BUILD is set"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _extensions():
    """``spade_kernels._C``: the CPU ops always (when torch is importable), CUDA ops when possible."""
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("spade_kernels: skipping the C++ extension: torch is not installed in the build environment")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    args = {"cxx": ["-O3", "-DAT_PARALLEL_OPENMP=1", *openmp]}
    reason = _cuda_skip_reason()
    if reason is not None:
        print(f"spade_kernels: building the CPU ops only, skipping CUDA: {reason}")
        ext = CppExtension("spade_kernels._C", cpp, extra_compile_args=args, extra_link_args=openmp)
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cu = sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
            + glob.glob(os.path.join("csrc", "kernels", "*.cu"))
        )
        args["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension(
            "spade_kernels._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            extra_compile_args=args,
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build script: the Python package always; the C++/CUDA extension when possible.

The extension (``spade_kernels._C``) is compiled from ``csrc/`` only when a
CUDA-enabled torch and nvcc are present and ``SPADE_SKIP_CUDA_BUILD`` is not
set; otherwise one line says why it was skipped and the pure-Python package
(reference + torch backends, Triton kernels) is installed as usual.

Knobs (README, "Build options"): SPADE_SKIP_CUDA_BUILD, TORCH_CUDA_ARCH_LIST,
MAX_JOBS.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_skip_reason() -> str | None:
    if os.environ.get("SPADE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "SPADE_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return "torch is not installed in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if not glob.glob(os.path.join(ROOT, "csrc", "*.cu")):
        return "csrc/ holds no torch binding (csrc/*.cu) in this release; the kernels build with CMake"
    return None


def _extensions():
    reason = _cuda_skip_reason()
    if reason is not None:
        print(f"spade_kernels: skipping the CUDA extension: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(
        "spade_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build script: the Python package and its two native libraries.

``spade_kernels._C`` holds the CPU implementations of the spade ops
(``csrc/ops_cpu.cpp``: C++/OpenMP); it is built whenever torch is importable.
``spade_kernels._C_cuda`` holds their CUDA implementations
(``csrc/ops_cuda.cu``) and is built only when a CUDA-enabled torch and nvcc are present and
``SPADE_SKIP_CUDA_BUILD`` is not set.  Its build is optional: if it fails
(a compiler or toolkit mismatch, say), the CPU ops still install and one line
says why CUDA was skipped.  The package imports without either library
(``spade_kernels._ext`` reports why one is missing).  The op schemas are
declared in Python (``spade_kernels/ops.py``); csrc/README.md lists what an
op touches.

Knobs (docs/contributing.md, "Build options"): SPADE_SKIP_CUDA_BUILD, TORCH_CUDA_ARCH_LIST,
MAX_JOBS.  Supported setuptools: >= 66.1 (the oldest that runs on Python
3.12); CI builds with setuptools 66.1 on the GPU machine's stack
(scripts/test_gpu_stack.sh) and with the newest on its own.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_EXT = "spade_kernels._C_cuda"
#: Default GPU targets of the CUDA library, shared with CMakeLists.txt.
with open(os.path.join(ROOT, "csrc", "cuda_arch_list")) as _f:
    DEFAULT_ARCH_LIST = _f.read().strip()


def _cuda_skip_reason() -> str | None:
    if os.environ.get("SPADE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "SPADE_SKIP_CUDA_BUILD is set"
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _optional_cuda_build_ext(base):
    """``BuildExtension`` in which a failure of the CUDA library skips it instead of failing the install."""

    class BuildExt(base):
        def build_extension(self, ext):
            if ext.name != CUDA_EXT:
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as exc:  # compiler errors differ by toolchain (CompileError, RuntimeError, ...)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                print(
                    f"spade_kernels: building the CPU ops only, skipping CUDA: the CUDA library failed "
                    f"to build ({type(exc).__name__}: {first}); the compiler output is above",
                    flush=True,
                )
                self._skipped = [*getattr(self, "_skipped", []), ext]

        def run(self):
            super().run()
            # Installers ask for the built files afterwards: a skipped library has none.
            self.extensions = [e for e in self.extensions if e not in getattr(self, "_skipped", [])]

    return BuildExt


def _extensions():
    """The CPU library always (when torch is importable), the CUDA library when possible."""
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("spade_kernels: skipping the C++ extension: torch is not installed in the build environment")
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    include = [os.path.join(ROOT, "csrc", "include")]
    exts = [
        CppExtension(
            "spade_kernels._C",
            [os.path.join("csrc", "ops_cpu.cpp")],
            include_dirs=include,
            # -fno-trapping-math: the compiler may evaluate both sides of a
            # floating-point select, which is what vectorises the host loops
            # (Michelot's sums, the selection's passes); no value changes
            # (nothing here enables floating-point traps).
            extra_compile_args={"cxx": ["-O3", "-fno-trapping-math", "-DAT_PARALLEL_OPENMP=1", *openmp]},
            extra_link_args=openmp,
        )
    ]
    reason = _cuda_skip_reason()
    if reason is not None:
        print(f"spade_kernels: building the CPU ops only, skipping CUDA: {reason}")
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        exts.append(
            CUDAExtension(
                CUDA_EXT,
                [os.path.join("csrc", "ops_cuda.cu")],
                include_dirs=include,
                # -Xptxas=-v: each kernel's registers, spills and shared memory in the build log.
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-Xptxas=-v"]},
            )
        )
    build_ext = _optional_cuda_build_ext(BuildExtension).with_options(no_python_abi_suffix=True)
    return exts, {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

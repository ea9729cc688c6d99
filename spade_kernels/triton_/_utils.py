"""Launch helper shared by the Triton op files."""

from __future__ import annotations

import os

from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import custom_op, triton_op, wrap_triton

#: Kernels run on CPU tensors through Triton's interpreter (set before triton is imported).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(kernel, grid, *args, **meta) -> None:
    """``wrap_triton(kernel)[grid](...)`` on a GPU; the interpreted kernel itself under the interpreter.

    With TRITON_INTERPRET=1 the ops are opaque ``custom_op``s (:func:`kernel_op`),
    so nothing traces into the kernel and ``wrap_triton`` has no job; it is
    not called there at all, because what it accepts differs by version
    (torch 2.13 passes an interpreted kernel through, torch 2.11 with triton
    3.6 rejects it: "wrap_triton only works on functions annotated with
    triton.jit", or fails following ``Autotuner.fn``).  On the fake tensors
    (FakeTensor, and the FunctionalTensor wrappers of AOT dispatch) that the
    fake implementation runs on, outputs are already allocated with their
    final shapes, so skipping the launch is exactly the fake behaviour.
    """
    if _INTERPRET:
        if not any(isinstance(a, (FakeTensor, FunctionalTensor)) for a in args):
            kernel[grid](*args, **meta)
        return
    wrap_triton(kernel)[grid](*args, **meta)


def kernel_op(name: str):
    """Register a launcher as the op ``name``: ``triton_op`` on a GPU, opaque under the interpreter.

    On a GPU ``torch.compile`` traces into a ``triton_op`` and sees the kernel.
    The interpreter's kernels cannot be traced (the graph would hold only the
    output allocations), so there the launcher becomes an opaque
    ``custom_op`` whose fake implementation is the launcher itself run on
    fake tensors (``_launch`` skips the kernel there): compiled graphs then
    call the real, interpreted kernels.
    """

    def register(fn):
        if not _INTERPRET:
            return triton_op(name, mutates_args=())(fn)
        op = custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return register

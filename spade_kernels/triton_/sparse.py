"""Triton kernels for products with sparse codes (the backward and the decoder).

Every term of SpaDE's backward and of its sparse decoder is one of three
products over the padded support ``indices`` (B, C) (docs/design.md, fact 6):

* ``gather_matmul(w, idx, M)``   out[b]    = Σ_j w[b,j] · M[idx[b,j]]      (B, d)
  — the decoder x̂ = z·W_dec, and the Σ_j G·a part of ∂L/∂x;
* ``gather_dot(G, idx, M)``      out[b,j]  = ⟨G[b], M[idx[b,j]]⟩          (B, C)
  — ∂L/∂z of the decoder, on the support only;
* ``scatter_matmul(w, idx, X, K)`` out[k]  = Σ_{idx[b,j]=k} w[b,j] · X[b]  (K, d)
  — ∂L/∂W_dec and ∂L/∂prototypes, the sparse-transpose products;

and one per-row op, ``support_jacobian``: the backward through sparsemax and
s = −λD on the support (facts 5–6), giving G = ∂L/∂D and each row's share
of ∂L/∂λ in one pass.

They have the same names and semantics as the ``torch`` backend's functions
in :mod:`spade_kernels.backends.torch_`, which the tests compare them with.
All cost O(B·C·d); none forms a B×K tensor.  They take float32, bfloat16 and
float16 matrices (the pipeline sends float64 to the ``torch`` backend) and
accumulate in float32.  ``scatter_matmul`` accumulates with fp32 atomics (one
program per (row, d-block) adds its C rows), so its sums are not
bit-reproducible across runs; the ``native`` backend's is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import _INTERPRET, _launch, kernel_op

__all__ = ["gather_dot", "gather_matmul", "scatter_matmul", "support_jacobian"]


def _blocks(d: int) -> tuple[int, int]:
    if _INTERPRET:
        return 16, 16
    return 32, min(128, triton.next_power_of_2(d))


@triton.jit
def _gather_matmul_kernel(
    w_ptr, idx_ptr, m_ptr, out_ptr,
    C, D,
    stride_wb, stride_ib, stride_mk, stride_ob,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        idx = tl.load(idx_ptr + row * stride_ib + offs_c, mask=c_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + row * stride_wb + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        m = tl.load(
            m_ptr + idx[:, None] * stride_mk + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc += tl.sum(w[:, None] * m.to(tl.float32), axis=0)
    tl.store(out_ptr + row * stride_ob + offs_d, acc, mask=d_ok)


@triton.jit
def _gather_dot_kernel(
    g_ptr, idx_ptr, m_ptr, out_ptr,
    C, D,
    stride_gb, stride_ib, stride_mk, stride_ob,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    idx = tl.load(idx_ptr + row * stride_ib + offs_c, mask=c_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        g = tl.load(g_ptr + row * stride_gb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        m = tl.load(
            m_ptr + idx[:, None] * stride_mk + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc += tl.sum(m.to(tl.float32) * g[None, :], axis=1)
    tl.store(out_ptr + row * stride_ob + offs_c, acc, mask=c_ok)


@triton.jit
def _scatter_matmul_kernel(
    w_ptr, idx_ptr, x_ptr, out_ptr,
    C, D,
    stride_wb, stride_ib, stride_xb, stride_ok,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    xv = tl.load(x_ptr + row * stride_xb + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        # Padding slots carry weight 0: skipping them saves the atomics.
        w = tl.load(w_ptr + row * stride_wb + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
        live = (offs_c < C) & (w != 0.0)
        idx = tl.load(idx_ptr + row * stride_ib + offs_c, mask=live, other=0).to(tl.int64)
        tl.atomic_add(
            out_ptr + idx[:, None] * stride_ok + offs_d[None, :],
            w[:, None] * xv[None, :],
            mask=live[:, None] & d_ok[None, :],
        )


@triton.jit
def _support_jacobian_kernel(
    z_ptr, gz_ptr, d_ptr, gd_ptr, lam_ptr, g_out_ptr, lam_rows_ptr,
    C,
    HAS_GRAD_Z: tl.constexpr, HAS_GRAD_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One program per row; rows of (B, C) tensors are contiguous.
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    lam = tl.load(lam_ptr).to(tl.float32)
    tot = tl.zeros((BLOCK_C,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_GRAD_Z:
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            ok = offs < C
            on = tl.load(z_ptr + base + offs, mask=ok, other=0.0) > 0
            g = tl.load(gz_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
            tot += tl.where(on, g, 0.0)
            cnt += on.to(tl.float32)
    mean = tl.sum(tot, axis=0) / tl.maximum(tl.sum(cnt, axis=0), 1.0)
    lam_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        ok = offs < C
        on = tl.load(z_ptr + base + offs, mask=ok, other=0.0) > 0
        gs = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if HAS_GRAD_Z:
            g = tl.load(gz_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
            gs = tl.where(on, g - mean, 0.0)  # ∂L/∂s on the support (fact 5)
        G = -lam * gs
        if HAS_GRAD_D:
            G += tl.where(on, tl.load(gd_ptr + base + offs, mask=ok, other=0.0).to(tl.float32), 0.0)
        tl.store(g_out_ptr + base + offs, G, mask=ok)
        dist = tl.load(d_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
        lam_acc += tl.where(on, gs * dist, 0.0)
    tl.store(lam_rows_ptr + row, -tl.sum(lam_acc, axis=0))


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dimension with unit stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_product(kernel, first, indices, second, out, *, over_support: bool) -> None:
    """Launch one of the three product kernels, which share one argument layout.

    Grid: one program per (row of ``indices``, block of the support) when
    ``over_support`` (``gather_dot``), else per (row, block of d).
    """
    first, indices, second = (_contiguous_rows(t) for t in (first, indices, second))
    B, C = indices.shape
    d = second.shape[1]
    block_c, block_d = _blocks(d)
    grid = (B, triton.cdiv(C, block_c) if over_support else triton.cdiv(d, block_d))
    _launch(
        kernel, grid,
        first, indices, second, out, C, d,
        first.stride(0), indices.stride(0), second.stride(0), out.stride(0),
        BLOCK_C=block_c, BLOCK_D=block_d,
    )  # fmt: skip


@kernel_op("spade_kernels::triton_support_jacobian")
def _support_jacobian_op(
    z: torch.Tensor,
    grad_z: torch.Tensor | None,
    D: torch.Tensor,
    grad_D: torch.Tensor | None,
    lam: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    z, D = z.contiguous(), D.contiguous()
    grad_z = None if grad_z is None else grad_z.contiguous()
    grad_D = None if grad_D is None else grad_D.contiguous()
    B, C = z.shape
    G = torch.empty((B, C), dtype=torch.float32, device=z.device)
    lam_rows = torch.empty((B,), dtype=torch.float32, device=z.device)
    block_c = 16 if _INTERPRET else min(1024, triton.next_power_of_2(max(C, 16)))
    _launch(
        _support_jacobian_kernel, (B,),
        z, z if grad_z is None else grad_z, D, D if grad_D is None else grad_D, lam, G, lam_rows, C,
        HAS_GRAD_Z=grad_z is not None, HAS_GRAD_D=grad_D is not None, BLOCK_C=block_c,
    )  # fmt: skip
    return G, lam_rows


def support_jacobian(z, grad_z, D, grad_D, lam: torch.Tensor):
    """Triton version of :func:`spade_kernels.backends.torch_.support_jacobian` (G, λ-grad rows).

    ``lam`` is a 0-d tensor (read by the kernel, so tracing needs no value).
    G and the rows come out in float32 (the kernel's arithmetic).
    """
    lam = lam.detach().reshape(()).to(device=z.device, dtype=torch.float32)
    return _support_jacobian_op(z, grad_z, D, grad_D, lam)


@kernel_op("spade_kernels::triton_gather_matmul")
def gather_matmul(weights: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b] = Σ_j weights[b, j] · M[indices[b, j]] (float32 accumulation, M's dtype out)."""
    out = torch.empty((indices.shape[0], M.shape[1]), dtype=torch.float32, device=M.device)
    _launch_product(_gather_matmul_kernel, weights, indices, M, out, over_support=False)
    return out.to(M.dtype)


@kernel_op("spade_kernels::triton_gather_dot")
def gather_dot(G: torch.Tensor, indices: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """out[b, j] = ⟨G[b], M[indices[b, j]]⟩ (float32 accumulation, M's dtype out)."""
    out = torch.empty(indices.shape, dtype=torch.float32, device=M.device)
    _launch_product(_gather_dot_kernel, G, indices, M, out, over_support=True)
    return out.to(M.dtype)


@kernel_op("spade_kernels::triton_scatter_matmul")
def scatter_matmul(
    weights: torch.Tensor, indices: torch.Tensor, X: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """out[k] = Σ_{b,j: indices[b,j]=k} weights[b, j] · X[b] (float32 atomics, X's dtype out)."""
    out = torch.zeros((n_rows, X.shape[1]), dtype=torch.float32, device=X.device)
    _launch_product(_scatter_matmul_kernel, weights, indices, X, out, over_support=False)
    return out.to(X.dtype)

"""A batch's codes from its row blocks: held once without autograd, concatenated with it (docs/design.md, "Memory model")."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..backends.interface import INITIAL_BUFFER
from ..codes import SparseCodes

__all__ = ["RowWriter", "codes_of_blocks", "concatenate", "held_row_bytes"]


def held_row_bytes(K: int, itemsize: int) -> int:
    """An estimate of the bytes a :class:`RowWriter` holds per row: 1.25 × C slots of value, index and
    distance plus the support size, with C taken as min(K, ``INITIAL_BUFFER``) (wider supports are rare)."""
    width = min(K, INITIAL_BUFFER)
    return (5 * width * (2 * itemsize + 8) + 3) // 4 + 8


class RowWriter:
    """The codes of a batch, written a row block at a time into buffers that grow in width.

    Without autograd, each block's result is copied in and released before
    the next block runs, so the batch's codes are never held twice: the
    buffers start at 1.25× the first block's width and grow by 1.25× when a
    wider block arrives (rare: blocks of i.i.d. rows have similar widths).
    The result is a view of the first C = (widest support) columns: at most a
    quarter of the width unused.
    """

    def __init__(self, B: int, K: int):
        self.B, self.K, self.width, self.r = B, K, 0, 0
        self.parts = None
        self.no_distances = False

    def add(self, z, idx, size, D=None) -> None:
        """Append a block's values, indices, support sizes and (optionally) distances."""
        n, w = z.shape
        if D is None:
            D = z.new_zeros(())
            self.no_distances = True
        if self.parts is None or w > self.width:
            grown = max(w, (self.width * 5 + 3) // 4, (w * 5 + 3) // 4)
            wide = [z, idx] + ([] if self.no_distances else [D])
            new = [t.new_zeros((self.B, grown)) for t in wide]
            new += [z.new_zeros(())] * (3 - len(new)) + [size.new_zeros(self.B)]
            if self.parts is not None:
                for dst, src in zip(new[: len(wide)], self.parts[: len(wide)]):
                    dst[: self.r, : self.width] = src[: self.r]
                new[3][: self.r] = self.parts[3][: self.r]
            self.parts, self.width = new, grown
        vz, vi, vD, vs = self.parts
        rows = slice(self.r, self.r + n)
        vz[rows, :w], vi[rows, :w], vs[rows] = z, idx, size
        if not self.no_distances:
            vD[rows, :w] = D
        self.r += n

    def codes(self) -> SparseCodes:
        vz, vi, vD, vs = self.parts
        C = max(int(vs.max()) if vs.numel() else 0, 1)
        D = None if self.no_distances else vD[:, :C]
        return SparseCodes(vi[:, :C], vz[:, :C], vs, self.K, distances=D)


def concatenate(blocks, K: int) -> SparseCodes:
    """One :class:`SparseCodes` from row blocks' (values, indices, support_size, D or None), differentiably."""
    C = max(b[0].shape[1] for b in blocks)

    def cat(i):
        if blocks[0][i] is None:
            return None
        return torch.cat(
            [torch.nn.functional.pad(b[i], (0, C - b[i].shape[1])) if i != 2 else b[i] for b in blocks]
        )

    z, idx, size, D = (cat(i) for i in range(4))
    return SparseCodes(idx, z, size, K, distances=D)


def codes_of_blocks(
    blocks: list[slice], encode_block: Callable, n_rows: int, K: int, keep_graph: bool
) -> SparseCodes:
    """The codes of ``n_rows`` rows, ``encode_block(rows)`` giving (values, indices, support_size, D or None).

    One block (or none: zero rows): its codes.  Several: concatenated when
    ``keep_graph`` (autograd needs every block's tensors), otherwise written
    into a :class:`RowWriter`, so the codes are held once.
    """
    if len(blocks) <= 1:
        z, idx, size, D = encode_block(slice(0, n_rows))
        return SparseCodes(idx, z, size, K, distances=D)
    if keep_graph:
        return concatenate([encode_block(rs) for rs in blocks], K)
    out = RowWriter(n_rows, K)
    for rs in blocks:
        out.add(*encode_block(rs))
    return out.codes()

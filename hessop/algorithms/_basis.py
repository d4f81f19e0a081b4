"""The orthonormal basis of the Lanczos-type algorithms, written in place where arrays allow.

A basis holds up to ``m`` vectors of ``p`` independent runs as rows of ``(p, rows, d)``
blocks, so that a vector is a contiguous row and a projection is two batched matrix-vector
products over the filled rows only. Where the framework's arrays are writable (numpy, torch)
there is a single block: a new vector is written in place and every operation reads a view
of the filled rows. Where they are immutable (JAX), a new vector replaces one row of its
block of :data:`BLOCK_ROWS` rows (a copy of that block, not of the basis) and the operations
read whole filled blocks, whose unfilled rows are zeros: every kernel sees a few fixed
shapes (one per number of filled blocks), so nothing is compiled again step after step.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from .._operator import LinearOperator

#: rows per block where arrays are immutable: a write copies this many rows
BLOCK_ROWS = 4

#: DGKS criterion (ARPACK's 0.717): project again when a projection removed more than
#: this fraction of the norm, i.e. when cancellation may have left components behind
REORTH_RATIO = 1 / math.sqrt(2)


class Basis:
    """Up to ``m`` orthonormal rows of length ``d`` for each of ``p`` runs."""

    def __init__(self, A: LinearOperator, p: int, m: int, *, writable: bool | None = None):
        d = A.shape[0]
        if writable is None:
            writable = array_api_compat.is_writeable_array(A.zeros((1,)))
        self.A, self.p, self.m, self.writable = A, p, m, writable
        self.rows = m if writable else min(m, BLOCK_ROWS)
        self.blocks = [A.zeros((p, self.rows, d)) for _ in range(math.ceil(m / self.rows))]
        self.n = 0
        self._write = A.kernel(_write_row)
        self._project = A.kernel(_project)
        self._combine = A.kernel(_combine)

    def filled(self) -> list[Any]:
        """The blocks that hold the first ``n`` rows (a view of exactly those if writable)."""
        nb = math.ceil(self.n / self.rows)
        blocks = self.blocks[:nb]
        if self.writable and nb:
            blocks = [blocks[0][:, : self.n, :]]
        return blocks

    def append(self, V: Any) -> None:
        """Store ``V`` ``(p, d)`` as row ``n``."""
        b, r = divmod(self.n, self.rows)
        if self.writable:
            self.blocks[b][:, r, :] = V
        else:
            onehot = self.A.asarray(np.arange(self.rows) == r, dtype=bool)
            self.blocks[b] = self._write(self.blocks[b], V, onehot)
        self.n += 1

    def row(self, i: int) -> Any:
        """Row ``i``, ``(p, d)``."""
        b, r = divmod(i, self.rows)
        return self.blocks[b][:, r, :]

    def project(self, W: Any) -> tuple[Any, Any, np.ndarray]:
        """``W - Q^T (Q W)`` for ``W`` ``(p, d)`` against the filled rows, by classical
        Gram-Schmidt, again where a pass removed most of a norm (DGKS, as ARPACK).

        Returns the projected ``W``, the coefficients ``Q W`` ``(p, n)`` summed over the
        passes (in the framework), and the final norms on the host.
        """
        blocks = self.filled()
        if not blocks:
            norms = self.A.xp.sqrt(self.A.xp.sum(W * W, axis=1))
            return W, None, np.asarray(self.A.to_numpy(norms), dtype=np.float64)
        W, H, norms = self._project(W, *blocks)
        before, after = np.asarray(self.A.to_numpy(norms), dtype=np.float64)
        if np.any(after < REORTH_RATIO * before):
            W, H2, norms = self._project(W, *blocks)
            H, after = H + H2, np.asarray(self.A.to_numpy(norms), dtype=np.float64)[1]
        return W, H, after

    def combine(self, S: np.ndarray) -> Any:
        """``S^T Q``: ``(p, k, d)`` rows from the ``(p, n, k)`` coefficients ``S`` (host)."""
        blocks = self.filled()
        width = sum(int(b.shape[1]) for b in blocks)
        padded = np.zeros((self.p, width, S.shape[2]))
        padded[:, : self.n] = S
        return self._combine(self.A.asarray(padded), *blocks)

    def reset(self, rows: Any) -> None:
        """Replace the basis by the ``(p, k, d)`` ``rows``."""
        if not self.writable:  # a partly filled block must read zeros past its rows
            self.blocks = [self.A.zeros(tuple(b.shape)) for b in self.blocks]
        self.n = 0
        for i in range(rows.shape[1]):
            self.append(rows[:, i, :])


def _write_row(xp: Any, block: Any, V: Any, onehot: Any) -> Any:
    return xp.where(onehot[None, :, None], V[:, None, :], block)


def _project(xp: Any, W: Any, *blocks: Any) -> Any:
    H = [blk @ W[:, :, None] for blk in blocks]  # (p, rows, 1) each
    before = xp.sqrt(xp.sum(W * W, axis=1))
    for blk, h in zip(blocks, H):
        W = W - (xp.permute_dims(blk, (0, 2, 1)) @ h)[:, :, 0]
    after = xp.sqrt(xp.sum(W * W, axis=1))
    return W, xp.concat(H, axis=1)[:, :, 0], xp.stack([before, after])


def _combine(xp: Any, S: Any, *blocks: Any) -> Any:
    out, start = None, 0
    for blk in blocks:
        rows = blk.shape[1]
        part = xp.permute_dims(S[:, start : start + rows, :], (0, 2, 1)) @ blk
        out = part if out is None else out + part
        start += rows
    return out

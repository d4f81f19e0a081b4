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
from ._common import to_host

#: rows per block where arrays are immutable: a write copies this many rows, and a kernel is
#: compiled once per number of filled blocks
BLOCK_ROWS = 8

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
        if not writable:
            self._onehot = [
                A.asarray(np.arange(self.rows) == r, dtype=bool) for r in range(self.rows)
            ]
        # the old block is handed over: JAX writes the new row into its memory (0.08 ms
        # instead of a 0.29 ms copy of 8 rows of 269k numbers)
        self._write = A.kernel(_write_row, donate=(0,))
        self._step = A.kernel(_lanczos_step)
        self._project = A.kernel(_project)
        self._combine = A.kernel(_combine)

    def filled(self) -> list[Any]:
        """The blocks that hold the first ``n`` rows (a view of exactly those if writable)."""
        nb = math.ceil(self.n / self.rows)
        blocks = self.blocks[:nb]
        if self.writable and nb:
            blocks = [blocks[0][:, : self.n, :]]
        return blocks

    def append(self, W: Any, b: np.ndarray | None = None) -> Any:
        """Store ``W / b`` (``W`` ``(p, d)``, ``b`` ``(p,)`` on the host, default 1) as row
        ``n``, and return it."""
        b = self.A.asarray(np.ones(self.p) if b is None else b)
        i, r = divmod(self.n, self.rows)
        self.n += 1
        if self.writable:
            V = W / b[:, None]
            self.blocks[i][:, r, :] = V
            return V
        V, self.blocks[i] = self._write(self.blocks[i], W, b, self._onehot[r])
        return V

    def row(self, i: int) -> Any:
        """Row ``i``, ``(p, d)``."""
        b, r = divmod(i, self.rows)
        return self.blocks[b][:, r, :]

    def lanczos_step(
        self, V: Any, AV: Any, V_prev: Any, beta_prev: Any
    ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """The three-term recurrence ``W = AV - a V - beta_prev V_prev`` (``a = V . AV``),
        then :meth:`project`: the recurrence takes out the large components, so that one
        Gram-Schmidt pass removes the rest and a second one is rarely needed.

        Returns ``W``, and on the host ``a``, ``||W||`` and the projection coefficients
        ``(n, p)``; one read from the device unless a second pass is needed.
        """
        blocks = self.filled()
        W, stats = self._step(V, AV, V_prev, beta_prev, *blocks)
        stats = to_host(self.A, stats)
        W, H, norm = self._again(W, blocks, stats[1:])
        return W, stats[0], norm, H

    def project(self, W: Any) -> tuple[Any, np.ndarray, np.ndarray]:
        """``W - Q^T (Q W)`` for ``W`` ``(p, d)`` against the filled rows, by classical
        Gram-Schmidt, again where a pass removed most of a norm (DGKS, as ARPACK).

        Returns the projected ``W``, and on the host its norms ``(p,)`` and the
        coefficients ``Q W`` ``(n, p)`` summed over the passes.
        """
        blocks = self.filled()
        if not blocks:
            norms = self.A.xp.sqrt(self.A.xp.sum(W * W, axis=1))
            return W, to_host(self.A, norms), np.zeros((0, self.p))
        W, stats = self._project(W, *blocks)
        W, H, norm = self._again(W, blocks, to_host(self.A, stats))
        return W, norm, H

    def _again(self, W: Any, blocks: list[Any], stats: np.ndarray) -> tuple[Any, Any, Any]:
        before, after, H = stats[0], stats[1], stats[2 : 2 + self.n]
        if np.any(after < REORTH_RATIO * before):
            W, again = self._project(W, *blocks)
            again = to_host(self.A, again)
            after, H = again[1], H + again[2 : 2 + self.n]
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


def _write_row(xp: Any, block: Any, W: Any, b: Any, onehot: Any) -> Any:
    V = W / b[:, None]
    return V, xp.where(onehot[None, :, None], V[:, None, :], block)


def _gram_schmidt(xp: Any, W: Any, blocks: tuple[Any, ...]) -> Any:
    """One classical Gram-Schmidt pass; the norms before and after and the coefficients
    ``(width, p)`` stacked, for one read to the host."""
    # Both products keep the blocks' row layout: (p, 1, rows) @ (p, rows, d), not the
    # transpose, which XLA would write out (five times slower on the CPU).
    H = [xp.permute_dims(blk @ W[:, :, None], (0, 2, 1)) for blk in blocks]  # (p, 1, rows)
    before = xp.linalg.vector_norm(W, axis=1)  # one pass, no temporary
    for blk, h in zip(blocks, H):
        W = W - (h @ blk)[:, 0, :]
    after = xp.linalg.vector_norm(W, axis=1)
    coeffs = xp.permute_dims(xp.concat(H, axis=2)[:, 0, :], (1, 0))
    return W, xp.concat([before[None, :], after[None, :], coeffs], axis=0)


def _project(xp: Any, W: Any, *blocks: Any) -> Any:
    return _gram_schmidt(xp, W, blocks)


def _lanczos_step(xp: Any, V: Any, AV: Any, V_prev: Any, beta_prev: Any, *blocks: Any) -> Any:
    a = xp.vecdot(V, AV, axis=1)
    W = AV - a[:, None] * V - beta_prev[:, None] * V_prev
    W, stats = _gram_schmidt(xp, W, blocks)
    return W, xp.concat([a[None, :], stats], axis=0)


def _combine(xp: Any, S: Any, *blocks: Any) -> Any:
    out, start = None, 0
    for blk in blocks:
        rows = blk.shape[1]
        part = xp.permute_dims(S[:, start : start + rows, :], (0, 2, 1)) @ blk
        out = part if out is None else out + part
        start += rows
    return out

"""Top eigenpairs of symmetric blocks by Rayleigh-Ritz on a growing subspace, in lockstep.

Each :class:`RitzProblem` is one symmetric block that the caller applies: it asks for the
product of a block of vectors (:meth:`~RitzProblem.request`), is given the result
(:meth:`~RitzProblem.receive`), and keeps a subspace ``V`` with its image ``A V``. After each
product it computes the Ritz pairs of ``V^T A V``, their exact residuals ``A y - theta y``
(from the stored ``A V``, not a recurrence), and grows ``V`` by the residuals of the pairs
that have not converged. Without a preconditioner this subspace is the block Krylov space of
the start block, so from one random vector it is Lanczos with full reorthogonalization; its
point is that it starts from *any* block, such as the eigenvectors of a nearby matrix (a warm
start), and that the residual it reports is the true one. When the subspace holds ``ncv``
vectors it restarts from the best Ritz vectors and their images (a thick restart, exact
because ``A V`` is kept).

Vectors are stored as rows (``V^T``, each vector contiguous), in a few blocks that are merged
now and then, so that growing the subspace rarely copies it and every pass over it reads
contiguous memory: on a model with few samples per batch these passes cost as much as the
products themselves.

:func:`lockstep` drives several problems together, so that the caller can apply all their
requested blocks in one product (the diagonal blocks of a Hessian, one pass over the data).
Nothing here depends on a framework: arrays go through the array namespace of a
:class:`~hessop.LinearOperator` (``like``), the small dense algebra through numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._operator import LinearOperator

#: merge the subspace's blocks into one when there are more than this many
_MAX_BLOCKS = 4


class RitzProblem:
    """The ``k`` largest eigenpairs of one symmetric ``(n, n)`` block, applied by the caller.

    Parameters
    ----------
    like : LinearOperator
        Gives the array namespace, dtype, device and machine epsilon of the vectors.
    X0 :
        ``(n, b)`` start block (any ``b >= 1``; its span is the first subspace; zero or
        dependent columns are dropped and random ones added up to ``k``).
    k : int
        Wanted eigenpairs (capped at ``n``).
    tol : float
        Pair i has converged when ``||A y_i - theta_i y_i|| <= tol * max(|theta_i|,
        eps^(2/3) ||A||)`` (:func:`hessop.eigsh`'s test), ``||A||`` estimated by the largest
        Ritz value in magnitude.
    ncv : int
        Largest subspace before a thick restart.
    max_matvecs : int
        Products (columns) this problem may ask for in all.
    keep : int
        Ritz vectors returned by :attr:`vectors` (``>= k``: the extra ones, unconverged, are
        a good warm start for a nearby matrix).
    rng :
        The numpy generator of the random directions that fill a start block up to ``k``.
    expand : int, optional
        Residuals added per round, those of the best unconverged pairs (default ``k``: all
        of them). One per round spends the fewest products (the subspace grows as in
        Lanczos); ``k`` the fewest rounds.
    """

    def __init__(
        self,
        like: LinearOperator,
        X0: Any,
        k: int,
        *,
        tol: float,
        ncv: int,
        max_matvecs: int,
        keep: int | None = None,
        rng: np.random.Generator | None = None,
        expand: int | None = None,
    ) -> None:
        self.like, self.xp = like, like.xp
        n = int(X0.shape[0])
        self.n, self.k, self.tol = n, min(k, n), tol
        self.keep = min(n, max(self.k, keep or self.k))
        self.ncv = min(n, max(ncv, 2 * self.k + 1, self.keep + self.k))
        self.max_matvecs = max_matvecs
        self.expand = self.k if expand is None else max(1, min(expand, self.k))
        self.blocks: list[tuple[Any, Any]] = []  # (rows of V, rows of A V)
        self.M = np.zeros((0, 0))  # V^T A V
        self.num_matvecs = 0
        self.done = False
        self.values = np.zeros(0)
        self.residual_norms = np.full(self.k, np.inf)
        self.converged = np.zeros(self.k, dtype=bool)
        Wt = self._directions(self.xp.permute_dims(X0, (1, 0)))
        rng = np.random.default_rng(0) if rng is None else rng
        while Wt is None or Wt.shape[0] < self.k:  # fill up to k directions at random
            extra = like.asarray(random_block(rng, self.k, n))
            Wt = self._directions(extra if Wt is None else self.xp.concat([Wt, extra]))
        self._pending = Wt

    @property
    def vectors(self) -> Any:
        """The ``(n, keep)`` best Ritz vectors, largest Ritz value first."""
        rows = self._combine(self._S[:, : min(self.keep, self.M.shape[0])])
        return self.xp.permute_dims(rows, (1, 0))

    def request(self) -> Any:
        """The ``(n, u)`` block to multiply next, or None when the problem is solved."""
        return None if self.done else self.xp.permute_dims(self._pending, (1, 0))

    def receive(self, AW: Any) -> None:
        """Take the product of the requested block; decide the next request."""
        Wt, self._pending = self._pending, None
        self.num_matvecs += int(Wt.shape[0])
        self._append(Wt, self.xp.permute_dims(AW, (1, 0)))
        Rt = self._rayleigh_ritz()
        budget = self.max_matvecs - self.num_matvecs
        if self.converged.all() or budget <= 0:
            self.done = True
            return
        todo = np.flatnonzero(~self.converged)[: min(budget, self.expand)]
        Wt = self._directions(_rows(self.xp, Rt, todo))
        if Wt is None:  # the residuals lie in the subspace: rounding is all that is left
            self.done = True
            return
        if self.M.shape[0] + Wt.shape[0] > self.ncv:
            self._restart()
        self._pending = Wt

    # --- internals ------------------------------------------------------------------------
    def _dot(self, Wt: Any) -> np.ndarray:
        """``V^T W`` on the host, float64, for rows ``Wt`` of ``W``."""
        to_np, Wc = self.like.to_numpy, self.xp.permute_dims(Wt, (1, 0))
        return np.concatenate([to_np(Bt @ Wc).astype(np.float64) for Bt, _ in self.blocks])

    def _combine(self, S: np.ndarray, image: bool = False) -> Any:
        """The rows of ``V S`` (of ``A V S`` with ``image``) for a host matrix ``S``."""
        out, start = None, 0
        for Bt, ABt in self.blocks:
            m = Bt.shape[0]
            piece = self.like.asarray(S[start : start + m].T) @ (ABt if image else Bt)
            out = piece if out is None else out + piece
            start += m
        return out

    def _append(self, Wt: Any, AWt: Any) -> None:
        m, u = self.M.shape[0], Wt.shape[0]
        WAW = self.like.to_numpy(Wt @ self.xp.permute_dims(AWt, (1, 0))).astype(np.float64)
        M = np.zeros((m + u, m + u))
        M[:m, :m] = self.M
        M[m:, m:] = 0.5 * (WAW + WAW.T)
        if self.blocks:
            C = self._dot(AWt)
            M[:m, m:], M[m:, :m] = C, C.T
        self.blocks.append((Wt, AWt))
        if len(self.blocks) > _MAX_BLOCKS:
            xp = self.xp
            self.blocks = [tuple(xp.concat([b[i] for b in self.blocks]) for i in (0, 1))]
        self.M = M

    def _rayleigh_ritz(self) -> Any:
        """Ritz pairs of the subspace, largest first; returns the wanted pairs' residuals
        (as rows)."""
        xp, like, k = self.xp, self.like, self.k
        theta, S = np.linalg.eigh(self.M)
        order = np.argsort(-theta, kind="stable")
        self._theta, self._S = theta[order], S[:, order]
        Sk = self._S[:, :k]
        theta_k = like.asarray(self._theta[:k])[:, None]
        Rt = self._combine(Sk, image=True) - theta_k * self._combine(Sk)
        self.residual_norms = like.to_numpy(xp.sqrt(xp.sum(Rt * Rt, axis=1))).astype(np.float64)
        anorm = float(np.abs(theta).max())
        scale = np.maximum(np.abs(self._theta[:k]), like.eps ** (2.0 / 3.0) * anorm)
        self.values = self._theta[: min(self.keep, len(theta))]
        self.converged = self.residual_norms <= self.tol * scale
        if self.M.shape[0] >= self.n:  # the subspace is the whole space: exact
            self.converged[:] = True
        return Rt

    def _restart(self) -> None:
        """Keep the best Ritz vectors (at least half the subspace) with their images."""
        m = self.M.shape[0]
        n_keep = min(m, max(self.keep, self.k + (self.ncv - self.k) // 2, self.ncv // 2))
        n_keep = min(n_keep, self.ncv - self.k)
        S = self._S[:, :n_keep]
        self.blocks = [(self._combine(S), self._combine(S, image=True))]
        self.M = np.diag(self._theta[:n_keep])
        self._S = np.eye(n_keep)

    def _project(self, Wt: Any) -> Any:
        """Rows ``Wt`` without their part in the subspace: classical Gram-Schmidt, repeated
        when it removed most of a row's norm (the DGKS test, as ARPACK)."""
        if not self.blocks:
            return Wt
        xp, like = self.xp, self.like
        before = like.to_numpy(xp.sum(Wt * Wt, axis=1))
        Wt = Wt - self._combine(self._dot(Wt))
        if (like.to_numpy(xp.sum(Wt * Wt, axis=1)) < 0.5 * before).any():
            Wt = Wt - self._combine(self._dot(Wt))
        return Wt

    def _directions(self, Wt: Any) -> Any:
        """Orthonormal rows spanning the part of the rows ``Wt`` outside the subspace, or
        None.

        Rows are normalized and projected out of ``V``, then orthonormalized among
        themselves through the eigendecomposition of their Gram matrix (SVQB, Stathopoulos
        & Wu 2002), dropping directions below ``sqrt(eps)``.
        """
        xp, like = self.xp, self.like
        norms = xp.sqrt(xp.sum(Wt * Wt, axis=1))
        nz = np.flatnonzero(like.to_numpy(norms) > 0)
        if nz.size == 0:
            return None
        Wt = self._project(_rows(xp, Wt, nz) / _rows(xp, norms[:, None], nz))
        G = like.to_numpy(Wt @ xp.permute_dims(Wt, (1, 0))).astype(np.float64)
        s, U = np.linalg.eigh(0.5 * (G + G.T))
        good = s > like.eps
        if not good.any():
            return None
        Wt = like.asarray((U[:, good] / np.sqrt(s[good])).T) @ Wt
        if Wt.shape[0] > 1 or s[good].min() < 0.5:
            Wt = self._project(Wt)  # SVQB amplified what rounding left in the subspace
        return Wt / xp.sqrt(xp.sum(Wt * Wt, axis=1))[:, None]


def lockstep(
    problems: Sequence[RitzProblem], apply: Callable[[list[Any], list[int]], list[Any]]
) -> int:
    """Run ``problems`` to the end, one call of ``apply`` per round for all of them.

    ``apply(blocks, which)`` gets the requested ``(n_i, u_i)`` blocks and the indices of the
    problems that asked, and returns their products in the same order. Returns the number
    of rounds.
    """
    rounds = 0
    while True:
        which = [i for i, p in enumerate(problems) if p.request() is not None]
        if not which:
            return rounds
        blocks = [problems[i].request() for i in which]
        for i, AW in zip(which, apply(blocks, which)):
            problems[i].receive(AW)
        rounds += 1


def _rows(xp: Any, Wt: Any, idx: np.ndarray) -> Any:
    """The rows ``idx`` of ``Wt`` (``Wt`` itself when that is all of them)."""
    if len(idx) == Wt.shape[0]:
        return Wt
    return xp.concat([Wt[int(j) : int(j) + 1] for j in idx])


def random_block(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """A Gaussian ``(n, b)`` block drawn on the host (the same numbers in every framework)."""
    return rng.standard_normal((n, b)) / math.sqrt(max(n, 1))

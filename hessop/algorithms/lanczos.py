"""The Lanczos tridiagonalization ``A Q = Q T + r e_m^T`` of a symmetric operator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._operator import LinearOperator
from ._common import (
    apply,
    as_native,
    as_operator,
    column_norms,
    from_numpy,
    kernel,
    new_rng,
    positive_int,
    progress_bar,
    to_numpy,
)

#: an off-diagonal below this multiple of eps * ||T|| ends the recurrence (invariant subspace)
BREAKDOWN_FACTOR = 1e3


@dataclass(frozen=True)
class LanczosResult:
    """What :func:`lanczos` returns.

    ``T = diag(alpha) + diag(beta, 1) + diag(beta, -1)`` is the ``m x m`` tridiagonal
    matrix, ``m = num_iter``, with ``Q^T A Q = T`` for the orthonormal ``basis`` Q.

    Attributes
    ----------
    alpha :
        Diagonal of T, shape ``(m,)``, an array of the operator's framework.
    beta :
        Off-diagonal of T, shape ``(m - 1,)``.
    basis :
        The Lanczos vectors as columns, ``(d, m)``, when ``return_basis=True``; else None.
    num_iter : int
        Steps actually done (fewer than asked after a breakdown).
    breakdown : bool
        True when the Krylov space became invariant (the next off-diagonal vanished):
        then the eigenvalues of T are eigenvalues of A.
    residual_norm : float
        ``||r||``, the off-diagonal the next step would have added (0 after a breakdown).
    num_matvecs : int
        Products with the operator.
    """

    alpha: Any
    beta: Any
    basis: Any
    num_iter: int
    breakdown: bool
    residual_norm: float
    num_matvecs: int

    def tridiagonal(self) -> Any:
        """The dense ``(m, m)`` tridiagonal matrix T, in the operator's framework."""
        from ..backends import get_backend

        bk = get_backend(self.alpha)
        a = bk.to_numpy(self.alpha).astype(np.float64)
        b = bk.to_numpy(self.beta).astype(np.float64)
        T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
        return bk.asarray(T, dtype=self.alpha.dtype, device=bk.device_of(self.alpha))


def lanczos(
    A: Any,
    num_iter: int,
    *,
    v0: Any = None,
    seed: Any = 0,
    reorthogonalize: bool = True,
    return_basis: bool = False,
    progress: bool = False,
) -> LanczosResult:
    """Run ``num_iter`` steps of the Lanczos process on a symmetric operator.

    Parameters
    ----------
    A :
        A symmetric :class:`hessop.LinearOperator`, dense array or scipy operator.
    num_iter : int
        Number of steps m (capped at the dimension d, where the space is exhausted).
    v0 :
        Start vector (normalized here); default a Gaussian vector from ``seed``.
    seed :
        Seed of the private numpy generator drawing ``v0``; global RNG state is untouched.
    reorthogonalize : bool
        Full reorthogonalization (classical Gram-Schmidt, twice) against every previous
        vector: keeps the basis orthonormal, so T has no spurious copies of converged
        eigenvalues, at ``O(d m)`` extra work and memory. Without it only three vectors
        are kept (unless ``return_basis``).
    return_basis : bool
        Return the Lanczos vectors, ``(d, m)``.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    LanczosResult

    Notes
    -----
    A breakdown (the residual falls below ``1e3 * eps * ||T||``) means the Krylov space is
    invariant: the recurrence stops early, ``breakdown=True``, and T is the smaller matrix
    built so far.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.diag(np.arange(1.0, 11.0))
    >>> res = hessop.lanczos(A, 10, seed=0)
    >>> np.allclose(np.linalg.eigvalsh(res.tridiagonal()), np.arange(1.0, 11.0))
    True
    """
    A = as_operator(A)
    d = A.shape[0]
    m = min(positive_int(num_iter, "num_iter"), d)
    if v0 is None:
        V0 = from_numpy(A, new_rng(seed).standard_normal((d, 1)))
    else:
        V0 = A.xp.reshape(as_native(A, v0, "v0"), (d, 1))
        if float(A.xp.linalg.vector_norm(V0)) == 0.0:
            raise ValueError("v0 must be a nonzero vector")
    run = lanczos_block(
        A, V0, m, reorthogonalize=reorthogonalize, keep_basis=return_basis, progress=progress
    )
    n = int(run.lengths[0])
    alpha = from_numpy(A, run.alpha[0, :n])
    beta = from_numpy(A, run.beta[0, : n - 1])
    basis = None
    if return_basis:
        basis = A.xp.concat([Q[:, :1] for Q in run.basis[:n]], axis=1)
    return LanczosResult(
        alpha=alpha,
        beta=beta,
        basis=basis,
        num_iter=n,
        breakdown=bool(run.breakdown[0]),
        residual_norm=0.0 if run.breakdown[0] else float(run.beta[0, n - 1]),
        num_matvecs=run.num_matvecs,
    )


@dataclass
class BlockRun:
    """Independent Lanczos runs done in lockstep (internal to the algorithms)."""

    alpha: np.ndarray  # (p, m)
    beta: np.ndarray  # (p, m): beta[:, j] is the norm of the residual after step j
    lengths: np.ndarray  # (p,) steps done per run
    breakdown: np.ndarray  # (p,) bool
    basis: list[Any] | None  # m arrays (d, p)
    num_matvecs: int


def lanczos_block(
    A: LinearOperator,
    V0: Any,
    m: int,
    *,
    reorthogonalize: bool = True,
    keep_basis: bool = False,
    progress: bool = False,
    desc: str = "lanczos",
) -> BlockRun:
    """``p`` independent Lanczos runs from the columns of ``V0`` (d, p), one ``matmat`` a step.

    Each column is normalized and runs its own recurrence; a column that breaks down stops
    (its later entries are zero and ``lengths`` says how far it got) while the others go on.
    The basis lives in a fixed ``(p, m, d)`` buffer (zeros where not yet filled), so every
    step sees the same shapes.
    """
    xp = A.xp
    d, p = V0.shape
    eps = float(np.finfo(A._bk.dtype_name(A.dtype)).eps)
    keep = reorthogonalize or keep_basis
    step = kernel(A, _step_reorth if reorthogonalize else _step_plain)
    advance = kernel(A, _advance if keep else _advance_plain)
    eye = np.eye(m)
    V = V0 / column_norms(xp, V0)[None, :]
    V_prev = xp.zeros_like(V)
    beta_prev = xp.zeros_like(V[0, :])
    Qs = xp.zeros((p, m, d), dtype=A.dtype, **A._device_kw()) if keep else xp.zeros_like(V)
    if keep:
        Qs = _insert(xp, Qs, V, from_numpy(A, eye[0]))
    alpha = np.zeros((p, m))
    beta = np.zeros((p, m))
    lengths = np.zeros(p, dtype=np.int64)
    broken = np.zeros(p, dtype=bool)
    active = np.ones(p, dtype=bool)
    anorm = np.zeros(p)
    tiny = np.finfo(float).tiny
    num_matvecs = 0
    bar = progress_bar(progress, m, desc)
    try:
        for j in range(m):
            W, a, b = step(V, apply(A, V), V_prev, beta_prev, Qs)
            num_matvecs += p
            a_np = to_numpy(A, a).astype(np.float64)
            b_np = to_numpy(A, b).astype(np.float64)
            alpha[active, j] = a_np[active]
            beta[active, j] = b_np[active]
            lengths[active] = j + 1
            prev = beta[:, j - 1] if j > 0 else 0.0
            anorm = np.maximum(anorm, np.abs(a_np) + b_np + prev)
            stop = active & (b_np <= BREAKDOWN_FACTOR * eps * np.maximum(anorm, tiny))
            broken |= stop
            beta[stop, j] = 0.0
            active &= ~stop
            bar.update(1)
            if j == m - 1 or not active.any():
                break
            e = from_numpy(A, eye[j + 1]) if keep else from_numpy(A, eye[0])
            act = from_numpy(A, active, dtype=bool)
            V_prev = V
            V, Qs, beta_prev = advance(W, b, act, Qs, e)
    finally:
        bar.close()
    basis = None
    if keep_basis:
        basis = [xp.permute_dims(Qs[:, i, :], (1, 0)) for i in range(m)]
    return BlockRun(alpha, beta, lengths, broken, basis, num_matvecs)


def _project_out(xp: Any, Qs: Any, W: Any) -> Any:
    """``W - Q (Q^T W)`` column by column, as batched matmuls; ``Qs`` is (p, m, d)."""
    w = xp.permute_dims(W, (1, 0))[:, :, None]  # (p, d, 1)
    coeff = Qs @ w  # (p, m, 1)
    corr = xp.permute_dims(Qs, (0, 2, 1)) @ coeff  # (p, d, 1)
    return W - xp.permute_dims(corr[:, :, 0], (1, 0))


def _step_plain(xp: Any, V: Any, W: Any, V_prev: Any, beta_prev: Any, Qs: Any) -> Any:
    a = xp.sum(V * W, axis=0)
    W = W - a[None, :] * V - beta_prev[None, :] * V_prev
    return W, a, xp.sqrt(xp.sum(W * W, axis=0))


def _step_reorth(xp: Any, V: Any, W: Any, V_prev: Any, beta_prev: Any, Qs: Any) -> Any:
    a = xp.sum(V * W, axis=0)
    W = W - a[None, :] * V - beta_prev[None, :] * V_prev
    # Full reorthogonalization, classical Gram-Schmidt twice ("twice is enough").
    W = _project_out(xp, Qs, _project_out(xp, Qs, W))
    return W, a, xp.sqrt(xp.sum(W * W, axis=0))


def _insert(xp: Any, Qs: Any, V: Any, e: Any) -> Any:
    # Qs[:, j, :] = V.T written as a one-hot update: no in-place writes, fixed shapes.
    return Qs + xp.permute_dims(V, (1, 0))[:, None, :] * e[None, :, None]


def _advance(xp: Any, W: Any, b: Any, act: Any, Qs: Any, e: Any) -> Any:
    safe = xp.where(act, b, xp.ones_like(b))
    V = xp.where(act[None, :], W / safe[None, :], xp.zeros_like(W))
    return V, _insert(xp, Qs, V, e), xp.where(act, b, xp.zeros_like(b))


def _advance_plain(xp: Any, W: Any, b: Any, act: Any, Qs: Any, e: Any) -> Any:
    safe = xp.where(act, b, xp.ones_like(b))
    V = xp.where(act[None, :], W / safe[None, :], xp.zeros_like(W))
    return V, Qs, xp.where(act, b, xp.zeros_like(b))


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the symmetric tridiagonal (alpha, beta), on the host."""
    import scipy.linalg

    n = len(alpha)
    if n == 1:
        return np.array(alpha, dtype=np.float64), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(alpha, beta[: n - 1])

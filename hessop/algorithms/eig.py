"""A few extreme eigenpairs of a symmetric operator: thick-restart Lanczos and power iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import unknown
from .._operator import LinearOperator
from ._common import (
    as_native,
    as_operator,
    from_numpy,
    kernel,
    new_rng,
    positive_int,
    progress_bar,
    to_numpy,
)
from .lanczos import BREAKDOWN_FACTOR

WHICH = ("LA", "SA", "LM")


@dataclass(frozen=True)
class EigshResult:
    """What :func:`eigsh` returns.

    Attributes
    ----------
    eigenvalues :
        ``(k,)``, in ascending order whatever ``which`` is (scipy's convention), an array
        of the operator's framework.
    eigenvectors :
        ``(d, k)`` orthonormal columns, ``eigenvectors[:, i]`` belonging to
        ``eigenvalues[i]``.
    residual_norms : numpy.ndarray
        ``||A x_i - lambda_i x_i||`` as estimated by the Lanczos recurrence (exact up to
        rounding, thanks to the full reorthogonalization).
    converged : numpy.ndarray
        Per pair: ``residual_norm <= tol * max(|lambda_i|, eps^(2/3) ||A||)``.
    num_matvecs : int
        Products with the operator.
    num_restarts : int
        Restart cycles done.
    """

    eigenvalues: Any
    eigenvectors: Any
    residual_norms: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    num_restarts: int


def eigsh(
    A: Any,
    k: int = 6,
    which: str = "LA",
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    ncv: int | None = None,
    v0: Any = None,
    seed: Any = 0,
    progress: bool = False,
) -> EigshResult:
    """``k`` eigenpairs of a symmetric operator by thick-restart Lanczos.

    The Lanczos basis is fully reorthogonalized; when it holds ``ncv`` vectors, the ``l``
    most wanted Ritz vectors (``k`` plus up to half the rest, growing with the number
    already converged, as ARPACK does) are kept with their residual coupling and the
    process goes on (Wu & Simon, 2000). This is mathematically what ARPACK's implicitly
    restarted Lanczos with exact shifts computes, so the number of products is similar.

    Parameters
    ----------
    A :
        A symmetric :class:`hessop.LinearOperator`, dense array or scipy operator.
    k : int
        Number of eigenpairs, ``1 <= k < d``.
    which : {"LA", "SA", "LM"}
        Largest algebraic, smallest algebraic, or largest magnitude eigenvalues.
    tol : float
        Relative residual: pair i has converged when
        ``||A x_i - lambda_i x_i|| <= tol * max(|lambda_i|, eps^(2/3) ||A||)``.
    maxiter : int, optional
        Maximum number of restarts (default ``10 * d``, as scipy).
    ncv : int, optional
        Size of the Lanczos basis, ``k < ncv <= d``; default ``min(d, max(2k + 1, 20))``
        (scipy's default).
    v0 :
        Start vector; default a Gaussian vector drawn from ``seed``.
    seed :
        Seed of the private numpy generator (start vector, and fresh directions after a
        breakdown); global RNG state is untouched.
    progress : bool
        Show a tqdm progress bar (one tick per restart).

    Returns
    -------
    EigshResult
        Pairs that did not converge within ``maxiter`` are returned too, flagged in
        ``converged``.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.diag(np.arange(1.0, 101.0))
    >>> res = hessop.eigsh(A, k=3, which="LA")
    >>> res.eigenvalues
    array([ 98.,  99., 100.])
    >>> bool(res.converged.all())
    True
    """
    A = as_operator(A)
    xp = A.xp
    d = A.shape[0]
    k = positive_int(k, "k")
    if k >= d:
        raise ValueError(
            f"eigsh needs k < d, got k={k} for a {d}x{d} operator; for all eigenvalues of a "
            "small operator use numpy.linalg.eigh on A.to_dense()"
        )
    if which not in WHICH:
        raise unknown("which", which, WHICH)
    ncv = min(d, max(2 * k + 1, 20)) if ncv is None else int(ncv)
    if not k < ncv <= d:
        raise ValueError(f"ncv must satisfy k < ncv <= d, got ncv={ncv}, k={k}, d={d}")
    maxiter = 10 * d if maxiter is None else positive_int(maxiter, "maxiter")
    eps = float(np.finfo(A._bk.dtype_name(A.dtype)).eps)
    eps23 = eps ** (2.0 / 3.0)
    rng = new_rng(seed)

    if v0 is None:
        v = from_numpy(A, rng.standard_normal(d))
    else:
        v = as_native(A, v0, "v0")
        if float(xp.linalg.vector_norm(v)) == 0.0:
            raise ValueError("v0 must be a nonzero vector")
    expand = kernel(A, _expand)
    eye = np.eye(ncv)
    q = v / xp.linalg.vector_norm(v)  # the vector being expanded
    # The basis is a fixed (d, ncv) buffer, zero where not yet filled: fixed shapes.
    Qb = q[:, None] * from_numpy(A, eye[0])[None, :]
    j = 0  # index of q in the basis
    T = np.zeros((ncv, ncv))
    anorm = 0.0
    tiny = np.finfo(float).tiny
    num_matvecs = 0
    bar = progress_bar(progress, None, "eigsh")
    try:
        for restart in range(maxiter):
            # Expand to ncv vectors; columns before the restart point are kept Ritz vectors
            # (their couplings to the first new vector form the arrow part of T).
            while True:
                w, h, beta = expand(Qb, A.matvec(q))
                num_matvecs += 1
                T[j, j] = float(to_numpy(A, h)[j])
                beta = float(beta)
                anorm = max(anorm, abs(T[j, j]) + beta + (T[j, j - 1] if j > 0 else 0.0))
                small = beta <= BREAKDOWN_FACTOR * eps * max(anorm, tiny)
                if j + 1 == ncv:
                    beta_last, r = beta, w
                    break
                if small:
                    # Invariant subspace: carry on in a fresh direction (T decouples there).
                    q = _fresh_direction(A, rng, Qb)
                    beta = 0.0
                else:
                    q = w / beta
                T[j + 1, j] = T[j, j + 1] = beta
                j += 1
                Qb = Qb + q[:, None] * from_numpy(A, eye[j])[None, :]

            theta, S = np.linalg.eigh(T)
            resid = np.abs(beta_last * S[-1, :])
            order = _most_wanted(theta, which)
            want = order[:k]
            scale = np.maximum(np.abs(theta[want]), eps23 * max(np.abs(theta).max(), anorm))
            conv = resid[want] <= tol * scale
            nconv = int(conv.sum())
            bar.update(1)
            bar.set_postfix_str(f"converged {nconv}/{k}")
            if nconv == k or restart == maxiter - 1:
                break

            # Thick restart: keep the n_keep most wanted Ritz vectors and the residual direction.
            n_keep = k + min(nconv, (ncv - k) // 2)
            if n_keep == 1:
                n_keep = ncv // 2 if ncv >= 6 else min(2, ncv - 1)
            n_keep = min(n_keep, ncv - 1)
            keep = order[:n_keep]
            C = np.zeros((ncv, ncv))
            C[:, :n_keep] = S[:, keep]
            Qb = Qb @ from_numpy(A, C)
            small = beta_last <= BREAKDOWN_FACTOR * eps * max(anorm, tiny)
            q = _fresh_direction(A, rng, Qb) if small else r / beta_last
            j = n_keep
            Qb = Qb + q[:, None] * from_numpy(A, eye[j])[None, :]
            T = np.zeros((ncv, ncv))
            T[np.arange(n_keep), np.arange(n_keep)] = theta[keep]
            T[n_keep, :n_keep] = T[:n_keep, n_keep] = 0.0 if small else beta_last * S[-1, keep]
    finally:
        bar.close()

    sel = want[np.argsort(theta[want], kind="stable")]
    conv_sel = resid[sel] <= tol * np.maximum(
        np.abs(theta[sel]), eps23 * max(np.abs(theta).max(), anorm)
    )
    return EigshResult(
        eigenvalues=from_numpy(A, theta[sel]),
        eigenvectors=Qb @ from_numpy(A, S[:, sel]),
        residual_norms=resid[sel],
        converged=conv_sel,
        num_matvecs=num_matvecs,
        num_restarts=restart,
    )


def _expand(xp: Any, Qb: Any, w: Any) -> Any:
    """Orthogonalize ``w = A q`` against the basis (Gram-Schmidt twice).

    Returns the residual, the coefficients (column j holds T[j, j]) and the residual norm.
    """
    h1 = Qb.T @ w
    w = w - Qb @ h1
    h2 = Qb.T @ w
    w = w - Qb @ h2
    return w, h1 + h2, xp.linalg.vector_norm(w)


def _most_wanted(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of the Ritz values, most wanted first."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _fresh_direction(A: LinearOperator, rng: np.random.Generator, Qm: Any) -> Any:
    """A random unit vector orthogonal to the columns of ``Qm``."""
    xp = A.xp
    w = from_numpy(A, rng.standard_normal(A.shape[0]))
    for _ in range(2):
        w = w - Qm @ (Qm.T @ w)
    return w / xp.linalg.vector_norm(w)


@dataclass(frozen=True)
class PowerIterationResult:
    """What :func:`power_iteration` returns.

    Attributes
    ----------
    eigenvalues :
        ``(k,)`` in the order found: decreasing magnitude (an array of the operator's
        framework).
    eigenvectors :
        ``(d, k)``, unit columns.
    residual_norms : numpy.ndarray
        ``||A x_i - lambda_i x_i||`` of the deflated operator at the last iteration.
    converged : numpy.ndarray
        Whether the relative change of each eigenvalue fell below ``tol``.
    iterations : numpy.ndarray
        Iterations per eigenpair.
    num_matvecs : int
        Products with the operator.
    """

    eigenvalues: Any
    eigenvectors: Any
    residual_norms: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray
    num_matvecs: int


def power_iteration(
    A: Any,
    k: int = 1,
    *,
    tol: float = 1e-6,
    maxiter: int = 1000,
    seed: Any = 0,
    progress: bool = False,
) -> PowerIterationResult:
    """The ``k`` eigenvalues of largest magnitude by power iteration with deflation.

    PyHessian's method: the i-th pair is found by power iteration on ``A`` with the
    previously found eigenvectors projected out of every product. It needs many more
    products than :func:`eigsh` for the same accuracy (its rate is the ratio of successive
    eigenvalue magnitudes) and is kept as the familiar baseline.

    Parameters
    ----------
    A :
        A symmetric :class:`hessop.LinearOperator`, dense array or scipy operator.
    k : int
        Number of eigenpairs, ``1 <= k < d``.
    tol : float
        Stop a pair when ``|lambda_new - lambda_old| <= tol * |lambda_new|``.
    maxiter : int
        Iterations per pair.
    seed :
        Seed of the private numpy generator drawing the start vectors.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    PowerIterationResult

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.diag([5.0, -3.0, 1.0, 0.5])
    >>> res = hessop.power_iteration(A, k=2, tol=1e-10)
    >>> np.round(res.eigenvalues, 6)
    array([ 5., -3.])
    """
    A = as_operator(A)
    xp = A.xp
    d = A.shape[0]
    k = positive_int(k, "k")
    if k >= d:
        raise ValueError(f"power_iteration needs k < d, got k={k} for a {d}x{d} operator")
    maxiter = positive_int(maxiter, "maxiter")
    rng = new_rng(seed)
    step = kernel(A, _power_step)
    eye = np.eye(k)
    U = xp.zeros((d, k), dtype=A.dtype, **A._device_kw())  # found eigenvectors, zero-padded
    vals, res, conv, iters = [], [], [], []
    num_matvecs = 0
    bar = progress_bar(progress, k * maxiter, "power iteration")
    try:
        for i in range(k):
            v = from_numpy(A, rng.standard_normal(d))
            v = v - U @ (U.T @ v)
            v = v / xp.linalg.vector_norm(v)
            lam, ok, it, rnorm = 0.0, False, 0, float("nan")
            for it in range(1, maxiter + 1):  # noqa: B007 - the count is reported
                v_new, lam_new, rnorm, wnorm = step(U, v, A.matvec(v))
                num_matvecs += 1
                lam_new, rnorm, wnorm = float(lam_new), float(rnorm), float(wnorm)
                bar.update(1)
                if wnorm == 0.0:  # v lies in the null space of the deflated operator
                    lam, ok = 0.0, True
                    break
                v = v_new
                if it > 1 and abs(lam_new - lam) <= tol * abs(lam_new):
                    lam, ok = lam_new, True
                    break
                lam = lam_new
            U = U + v[:, None] * from_numpy(A, eye[i])[None, :]
            vals.append(lam)
            res.append(rnorm)
            conv.append(ok)
            iters.append(it)
    finally:
        bar.close()
    return PowerIterationResult(
        eigenvalues=from_numpy(A, np.array(vals)),
        eigenvectors=U,
        residual_norms=np.array(res),
        converged=np.array(conv),
        iterations=np.array(iters),
        num_matvecs=num_matvecs,
    )


def _power_step(xp: Any, U: Any, v: Any, w: Any) -> Any:
    """Deflate ``w = A v`` (project out the found eigenvectors); Rayleigh quotient, residual."""
    w = w - U @ (U.T @ w)
    lam = xp.sum(v * w)
    wnorm = xp.linalg.vector_norm(w)
    v_new = w / xp.where(wnorm > 0, wnorm, xp.ones_like(wnorm))
    return v_new, lam, xp.linalg.vector_norm(w - lam * v), wnorm

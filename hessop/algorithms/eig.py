"""A few extreme eigenpairs of a symmetric operator: thick-restart Lanczos and power iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks
from .._operator import LinearOperator
from ._basis import Basis
from ._common import (
    as_operator,
    check_finite_values,
    choice,
    new_rng,
    progress_bar,
    to_host,
)
from .lanczos import BREAKDOWN_FACTOR, start_vector

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
        ``||A x_i - lambda_i x_i|| <= tol * max(|lambda_i|, eps^(2/3) ||A||)``; 0 asks for
        machine precision (scipy's convention).
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

    Raises
    ------
    NonFiniteError
        When ``v0`` or a product of the operator holds NaN or infinity.

    Notes
    -----
    Each step costs one product, one classical Gram-Schmidt pass over the vectors filled so
    far (two when the first removed most of the norm, ARPACK's DGKS test) and a few scalars
    read to the host; the basis is written in place (a block of eight rows at a time in
    JAX, whose arrays are immutable). On a Hessian this spends a small fraction of the time of
    its products.

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
    d = A.shape[0]
    k = _checks.integer(k, "k", minimum=1)
    if k >= d:
        raise ValueError(
            f"eigsh needs k < d, got k={k} for a {d}x{d} operator; for all eigenvalues of a "
            "small operator use numpy.linalg.eigh on A.to_dense()"
        )
    which = choice(which, "which", WHICH)
    ncv = _checks.optional_integer(ncv, "ncv", minimum=1)
    ncv = min(d, max(2 * k + 1, 20)) if ncv is None else ncv
    if not k < ncv <= d:
        raise ValueError(f"ncv must satisfy k < ncv <= d, got ncv={ncv}, k={k}, d={d}")
    maxiter = _checks.optional_integer(maxiter, "maxiter", minimum=1) or 10 * d
    tol = _checks.real(tol, "tol", minimum=0.0) or A.eps
    rng = new_rng(seed)
    lz = _Restarted(A, ncv, rng, start_vector(A, v0, rng, "eigsh"))
    bar = progress_bar(progress, None, "eigsh")
    try:
        for restart in range(maxiter):
            lz.expand()
            theta, S = np.linalg.eigh(lz.T)
            resid = np.abs(lz.beta_last * S[-1, :])
            order = _most_wanted(theta, which)
            want = order[:k]
            conv = resid[want] <= tol * lz.scale(theta, theta[want])
            nconv = int(conv.sum())
            bar.update(1)
            bar.set_postfix_str(f"converged {nconv}/{k}")
            if nconv == k or restart == maxiter - 1:
                break
            # Thick restart: keep the n_keep most wanted Ritz vectors and the residual.
            n_keep = k + min(nconv, (ncv - k) // 2)
            if n_keep == 1:
                n_keep = ncv // 2 if ncv >= 6 else min(2, ncv - 1)
            lz.restart(theta, S, order[: min(n_keep, ncv - 1)])
    finally:
        bar.close()
    sel = want[np.argsort(theta[want], kind="stable")]
    X = lz.basis.combine(S[None, :, sel])[0]
    return EigshResult(
        eigenvalues=A.asarray(theta[sel]),
        eigenvectors=A.xp.permute_dims(X, (1, 0)),
        residual_norms=resid[sel],
        converged=resid[sel] <= tol * lz.scale(theta, theta[sel]),
        num_matvecs=lz.num_matvecs,
        num_restarts=restart,
    )


class _Restarted:
    """The state of thick-restart Lanczos: the basis, the arrow-tridiagonal T, the vector
    being expanded and the residual of the last expansion (Wu & Simon, 2000)."""

    def __init__(self, A: LinearOperator, ncv: int, rng: np.random.Generator, q: Any) -> None:
        self.A, self.ncv, self.rng = A, ncv, rng
        self.basis = Basis(A, 1, ncv)
        self.q = self.basis.append(q[None, :])  # the vector being expanded, (1, d)
        self.q_prev = A.xp.zeros_like(self.q)
        self.j = 0  # the index of q in the basis
        self.arrow = -1  # the step that couples to the kept Ritz vectors
        self.T = np.zeros((ncv, ncv))
        self.anorm, self.beta_last, self.r = 0.0, 0.0, None
        self.num_matvecs = 0

    def small(self, beta: float) -> bool:
        """Whether a residual norm means an invariant subspace (a breakdown)."""
        return beta <= BREAKDOWN_FACTOR * self.A.eps * max(self.anorm, np.finfo(float).tiny)

    def scale(self, theta: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """What ``tol`` is relative to: ``max(|lambda|, eps^(2/3) ||A||)``."""
        anorm = max(np.abs(theta).max(), self.anorm)
        return np.maximum(np.abs(lam), self.A.eps ** (2.0 / 3.0) * anorm)

    def expand(self) -> None:
        """Lanczos steps until the basis holds ``ncv`` vectors; columns before the restart
        point are kept Ritz vectors (their couplings to the first new vector form the arrow
        part of T, which the Gram-Schmidt pass of that step takes out)."""
        A, T, j, basis = self.A, self.T, self.j, self.basis
        while True:
            w = A.matvec(self.q[0])[None, :]
            self.num_matvecs += 1
            prev = 0.0 if j == self.arrow or j == 0 else T[j, j - 1]
            W, a, beta, H = basis.lanczos_step(self.q, w, self.q_prev, A.asarray([prev]))
            T[j, j], beta = a[0] + H[j, 0], float(beta[0])
            check_finite_values([T[j, j], beta], "eigsh", f"at Lanczos step {self.num_matvecs}")
            self.anorm = max(self.anorm, abs(T[j, j]) + beta + (T[j, j - 1] if j > 0 else 0.0))
            if j + 1 == self.ncv:
                self.beta_last, self.r = beta, W
                self.j = j
                return
            self.q_prev = self.q
            if self.small(beta):
                # Invariant subspace: carry on in a fresh direction (T decouples there).
                self.q, beta = self._fresh_direction(), 0.0
            else:
                self.q = basis.append(W, np.array([beta]))
            T[j + 1, j] = T[j, j + 1] = beta
            j += 1

    def restart(self, theta: np.ndarray, S: np.ndarray, keep: np.ndarray) -> None:
        """Keep the Ritz vectors ``keep`` with their residual couplings, and the residual
        as the next vector to expand."""
        n_keep = len(keep)
        self.basis.reset(self.basis.combine(S[None, :, keep]))
        small = self.small(self.beta_last)
        if small:
            self.q = self._fresh_direction()
        else:
            self.q = self.basis.append(self.r, np.array([self.beta_last]))
        self.q_prev = self.A.xp.zeros_like(self.q)
        self.j = self.arrow = n_keep
        self.T = np.zeros((self.ncv, self.ncv))
        self.T[np.arange(n_keep), np.arange(n_keep)] = theta[keep]
        coupling = 0.0 if small else self.beta_last * S[-1, keep]
        self.T[n_keep, :n_keep] = self.T[:n_keep, n_keep] = coupling

    def _fresh_direction(self) -> Any:
        """A random unit vector orthogonal to the basis, appended to it."""
        w = self.A.asarray(self.rng.standard_normal(self.A.shape[0]))[None, :]
        for _ in range(2):
            w, norm, _ = self.basis.project(w)
        return self.basis.append(w, norm)


def _most_wanted(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of the Ritz values, most wanted first."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


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

    Raises
    ------
    NonFiniteError
        When a product of the operator holds NaN or infinity.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.diag([5.0, -3.0, 1.0, 0.5])
    >>> res = hessop.power_iteration(A, k=2, tol=1e-10)
    >>> np.round(res.eigenvalues, 6)
    array([ 5., -3.])
    """
    A = as_operator(A)
    d = A.shape[0]
    k = _checks.integer(k, "k", minimum=1)
    if k >= d:
        raise ValueError(f"power_iteration needs k < d, got k={k} for a {d}x{d} operator")
    tol = _checks.real(tol, "tol", minimum=0.0)
    maxiter = _checks.integer(maxiter, "maxiter", minimum=1)
    rng = new_rng(seed)
    rayleigh = A.kernel(_rayleigh)
    found = Basis(A, 1, k)  # the eigenvectors found so far, projected out of every product
    vals, res, conv, iters = [], [], [], []
    num_matvecs = 0
    bar = progress_bar(progress, k * maxiter, "power iteration")
    try:
        for _ in range(k):
            v, norm, _ = found.project(A.asarray(rng.standard_normal(d))[None, :])
            v = v / A.asarray(norm)
            lam, ok, it, rnorm = 0.0, False, 0, float("nan")
            for it in range(1, maxiter + 1):  # noqa: B007 - the count is reported
                W, wnorm, _ = found.project(A.matvec(v[0])[None, :])
                num_matvecs += 1
                v_new, lam_rnorm = rayleigh(v, W, A.asarray(wnorm))
                (lam_new, rnorm), wnorm = to_host(A, lam_rnorm), float(wnorm[0])
                check_finite_values([lam_new, rnorm, wnorm], "power_iteration", f"at step {it}")
                bar.update(1)
                if wnorm == 0.0:  # v lies in the null space of the deflated operator
                    lam, ok = 0.0, True
                    break
                v = v_new
                if it > 1 and abs(lam_new - lam) <= tol * abs(lam_new):
                    lam, ok = lam_new, True
                    break
                lam = lam_new
            found.append(v)
            vals.append(lam)
            res.append(rnorm)
            conv.append(ok)
            iters.append(it)
    finally:
        bar.close()
    return PowerIterationResult(
        eigenvalues=A.asarray(np.array(vals)),
        eigenvectors=A.xp.stack([found.row(i)[0, :] for i in range(k)], axis=1),
        residual_norms=np.array(res),
        converged=np.array(conv),
        iterations=np.array(iters),
        num_matvecs=num_matvecs,
    )


def _rayleigh(xp: Any, v: Any, w: Any, wnorm: Any) -> Any:
    """From the deflated ``w = A v`` (rows ``(1, d)``): the next unit vector, the Rayleigh
    quotient and the residual norm ``||w - lambda v||``."""
    lam = xp.sum(v * w)
    v_new = w / xp.where(wnorm > 0, wnorm, xp.ones_like(wnorm))[:, None]
    return v_new, xp.stack([lam, xp.sqrt(xp.sum((w - lam * v) ** 2))])

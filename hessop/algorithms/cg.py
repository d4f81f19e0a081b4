"""Conjugate gradients for ``(A + damping I) x = b``, one or several right-hand sides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks
from .._errors import ShapeError
from .._operator import LinearOperator, aslinearoperator
from ._common import (
    apply,
    as_native,
    as_operator,
    check_finite_input,
    check_finite_values,
    progress_bar,
    to_host,
)


@dataclass(frozen=True)
class CGResult:
    """What :func:`cg` returns.

    For a vector ``b`` the diagnostics are Python scalars; for a block ``b`` of shape
    ``(d, k)`` they are numpy arrays with one entry per column.

    Attributes
    ----------
    x :
        The solution (same shape as ``b``), an array of the operator's framework.
    converged : bool or numpy.ndarray
        Whether ``||r|| <= max(tol * ||b||, atol)`` was reached.
    iterations : int or numpy.ndarray
        CG steps taken (per column).
    residual_norm : float or numpy.ndarray
        ``||b - (A + damping I) x||`` by the CG recurrence.
    negative_curvature : bool or numpy.ndarray
        Whether a direction ``p`` with ``p^T (A + damping I) p <= 0`` stopped the column.
    curvature_direction :
        That direction (columns of zeros where none was met), or None if no column met one.
    num_matvecs : int
        Products with ``A`` (columns of a ``matmat`` count one each).
    """

    x: Any
    converged: Any
    iterations: Any
    residual_norm: Any
    negative_curvature: Any
    curvature_direction: Any
    num_matvecs: int


def cg(
    A: Any,
    b: Any,
    *,
    x0: Any = None,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    damping: float = 0.0,
    M: Any = None,
    callback: Callable[[Any], None] | None = None,
    progress: bool = False,
) -> CGResult:
    """Solve ``(A + damping I) x = b`` by (preconditioned) conjugate gradients.

    ``A`` must be symmetric; it is positive definite for a proper solve. Each column of a
    block ``b`` runs its own CG recurrence, but the products of all still-active columns
    are batched into one ``A.matmat`` per iteration; a column stops on its own as soon as it
    converges or meets non-positive curvature.

    Parameters
    ----------
    A :
        A :class:`hessop.LinearOperator`, a dense array, a scipy ``LinearOperator`` or a
        matvec callable (its size and framework are taken from ``b``; it is assumed
        symmetric).
    b :
        Right-hand side of shape ``(d,)`` or ``(d, k)``; numpy input is converted to the
        operator's framework.
    x0 :
        Initial guess (default zero), shaped like ``b``.
    tol, atol : float
        Stop a column when ``||r|| <= max(tol * ||b||, atol)`` (scipy's convention).
    maxiter : int, optional
        Iterations per column; default ``10 * d``.
    damping : float
        Solve ``(A + damping I) x = b`` (Tikhonov / Levenberg-Marquardt damping).
    M :
        Preconditioner approximating ``(A + damping I)^{-1}``, applied as ``M @ r``: a
        :class:`hessop.LinearOperator`, a dense array or a callable on vectors. It must be
        symmetric positive definite.
    callback : callable, optional
        ``callback(x)`` after every iteration, with the current iterate.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    CGResult

    Raises
    ------
    NonFiniteError
        When ``b`` or ``x0`` holds NaN or infinity, or a product of the operator (or of the
        preconditioner) does: never a step computed from non-finite numbers.

    Notes
    -----
    **Non-positive curvature.** When a search direction ``p`` has
    ``p^T (A + damping I) p <= 0`` the column stops with ``negative_curvature=True``,
    ``converged=False`` and ``p`` in ``curvature_direction``. Following Newton-CG
    (Nocedal & Wright, *Numerical Optimization*, Algorithm 7.1), ``x`` is the last iterate,
    except when this happens at the very first step with no ``x0``: ``x`` is then the first
    search direction ``M b`` (``b`` itself unpreconditioned), which is the steepest-descent
    step when ``b = -gradient``.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> res = hessop.cg(A, np.array([1.0, 2.0]), tol=1e-12)
    >>> res.converged, res.iterations
    (True, 2)
    >>> np.allclose(A @ res.x, [1.0, 2.0])
    True
    """
    A = as_operator(A, like=b)
    xp = A.xp
    d = A.shape[0]
    B = as_native(A, b, "b", ndims=(1, 2))
    vector = B.ndim == 1
    B = xp.reshape(B, (d, 1)) if vector else B
    k = B.shape[1]
    tol = _checks.real(tol, "tol", minimum=0.0)
    atol = _checks.real(atol, "atol", minimum=0.0)
    maxiter = _checks.optional_integer(maxiter, "maxiter", minimum=1) or 10 * d
    damping = _checks.real(damping, "damping")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {callback!r}")
    bnorm = to_host(A, xp.linalg.vector_norm(B, axis=0))
    if not np.all(np.isfinite(bnorm)):
        check_finite_input(A, B, "cg", "the right-hand side b")  # names an overflow too
    solver = _Solver(A, k, damping, _preconditioner(A, M), no_x0=x0 is None)
    if x0 is None:
        X, R = xp.zeros_like(B), B
    else:
        X = as_native(A, x0, "x0", ndims=(1, 2))
        X = xp.reshape(X, (d, 1)) if X.ndim == 1 else X
        if tuple(X.shape) != tuple(B.shape):
            raise ValueError(f"x0 has shape {tuple(X.shape)} but b has {tuple(B.shape)}")
        check_finite_input(A, X, "cg", "x0")
        R = B - solver.apply_A(X, list(range(k)))
    rnorm = to_host(A, xp.linalg.vector_norm(R, axis=0))
    check_finite_values(rnorm, "cg", "with x0")
    X, state = solver.run(
        X, R, rnorm, np.maximum(tol * bnorm, atol), maxiter, callback, vector, progress
    )
    if state.fallback.any():
        # Newton-CG: with no step taken, return the first search direction M b.
        X = xp.where(A.asarray(state.fallback, dtype=bool)[None, :], solver.apply_M(B), X)
    D = state.D
    if vector:
        return CGResult(
            x=X[:, 0],
            converged=bool(state.converged[0]),
            iterations=int(state.iterations[0]),
            residual_norm=float(state.rnorm[0]),
            negative_curvature=bool(state.negative[0]),
            curvature_direction=None if D is None else D[:, 0],
            num_matvecs=solver.num_matvecs,
        )
    return CGResult(
        x=X,
        converged=state.converged,
        iterations=state.iterations,
        residual_norm=state.rnorm,
        negative_curvature=state.negative,
        curvature_direction=D,
        num_matvecs=solver.num_matvecs,
    )


@dataclass
class _State:
    """Per-column bookkeeping of a CG run, on the host."""

    rnorm: np.ndarray
    converged: np.ndarray
    negative: np.ndarray
    iterations: np.ndarray
    fallback: np.ndarray  # met non-positive curvature before the first step, without x0
    D: Any = None  # directions of non-positive curvature


class _Solver:
    """The products of one CG run (operator, damping, preconditioner) and its loop."""

    def __init__(self, A: LinearOperator, k: int, damping: float, Minv: Any, no_x0: bool) -> None:
        self.A, self.k, self.damping, self.Minv, self.no_x0 = A, k, damping, Minv, no_x0
        self.num_matvecs = 0

    def apply_A(self, P: Any, cols: list[int]) -> Any:
        """``(A + damping I) P`` on the columns ``cols`` (the others come back zero): only
        the still-active columns are multiplied, gathered and scattered by slicing."""
        A, xp, k = self.A, self.A.xp, self.k
        self.num_matvecs += len(cols)
        if len(cols) == k:
            Y = apply(A, P)
        else:
            Ya = apply(A, xp.stack([P[:, j] for j in cols], axis=1))
            zero = xp.zeros_like(P[:, 0])
            where = {j: i for i, j in enumerate(cols)}
            Y = xp.stack([Ya[:, where[j]] if j in where else zero for j in range(k)], axis=1)
        return Y + self.damping * P if self.damping else Y

    def apply_M(self, R: Any) -> Any:
        return R if self.Minv is None else apply(self.Minv, R)

    def _check_M(self, rz: Any, active: np.ndarray) -> None:
        """With a preconditioner, ``r^T M r`` is read to tell its NaN from the operator's."""
        if self.Minv is not None:
            check_finite_values(to_host(self.A, rz)[active], "cg", "of the preconditioner M")

    def run(
        self,
        X: Any,
        R: Any,
        rnorm: np.ndarray,
        thresh: np.ndarray,
        maxiter: int,
        callback: Any,
        vector: bool,
        progress: bool,
    ) -> tuple[Any, _State]:
        A, xp, k = self.A, self.A.xp, self.k
        converged = rnorm <= thresh
        st = _State(rnorm, converged, np.zeros(k, bool), np.zeros(k, np.int64), np.zeros(k, bool))
        active = ~converged
        Z = self.apply_M(R)
        P, rz = Z, xp.vecdot(R, Z, axis=0)
        self._check_M(rz, active)
        update, direction = A.kernel(_update), A.kernel(_direction)
        bar = progress_bar(progress, maxiter, "cg")
        act, n_act = None, -1  # columns only ever leave the active set: a count tells a change
        try:
            for it in range(maxiter):
                cols = [int(j) for j in np.flatnonzero(active)]
                if not cols:
                    break
                AP = self.apply_A(P, cols)
                if act is None or len(cols) != n_act:  # the mask on the device, when it changed
                    act, n_act = A.asarray(active, dtype=bool), len(cols)
                X, R, host = update(X, R, P, AP, rz, act)
                pAp, rnorm_new = to_host(A, host)
                check_finite_values(pAp[active], "cg", f"with the search direction at step {it}")
                bad = active & ~(pAp > 0)  # the kernel skipped these columns
                if bad.any():
                    st.negative |= bad
                    mask = A.asarray(bad, dtype=bool)[None, :]
                    st.D = xp.where(mask, P, xp.zeros_like(P) if st.D is None else st.D)
                    st.fallback |= bad & (st.iterations == 0) & self.no_x0
                    active &= ~bad
                    if not active.any():
                        break  # no column took a step
                st.iterations += active
                st.rnorm = np.where(active, rnorm_new, st.rnorm)
                done = active & (st.rnorm <= thresh)
                st.converged |= done
                active &= ~done
                if callback is not None:
                    callback(X[:, 0] if vector else X)
                bar.update(1)
                if not active.any():
                    break
                Z = self.apply_M(R)
                if int(active.sum()) != n_act:
                    act, n_act = A.asarray(active, dtype=bool), int(active.sum())
                P, rz = direction(R, Z, P, rz, act)
                self._check_M(rz, active)
        finally:
            bar.close()
        return X, st


def _update(xp: Any, X: Any, R: Any, P: Any, AP: Any, rz: Any, act: Any) -> Any:
    """One CG step on the active columns with positive curvature; the rest stay put.
    Returns the new X and R, and ``p^T A p`` and ``||r||`` stacked for one host read."""
    pAp = xp.vecdot(P, AP, axis=0)
    ok = act & (pAp > 0)
    alpha = xp.where(ok, rz / xp.where(ok, pAp, xp.ones_like(pAp)), xp.zeros_like(pAp))
    X = X + alpha[None, :] * P
    R = R - alpha[None, :] * AP
    return X, R, xp.stack([pAp, xp.linalg.vector_norm(R, axis=0)])


def _direction(xp: Any, R: Any, Z: Any, P: Any, rz: Any, act: Any) -> Any:
    rz_new = xp.vecdot(R, Z, axis=0)
    beta = xp.where(act, rz_new / xp.where(act, rz, xp.ones_like(rz)), xp.zeros_like(rz))
    return Z + beta[None, :] * P, xp.where(act, rz_new, rz)


def _preconditioner(A: LinearOperator, M: Any) -> LinearOperator | None:
    if M is None:
        return None
    if callable(M) and not hasattr(M, "shape"):  # a LinearOperator has a shape
        return aslinearoperator(
            M,
            shape=A.shape,
            dtype=A.dtype,
            backend=A.backend,
            device=A.device,
            symmetric=True,
        )
    M = aslinearoperator(M)
    if M.shape != A.shape:
        raise ShapeError(f"the preconditioner M must have the shape of A, {A.shape}; got {M.shape}")
    return M

"""Conjugate gradients for ``(A + damping I) x = b``, one or several right-hand sides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._operator import LinearOperator, aslinearoperator
from ._common import as_native, as_operator, from_numpy, kernel, progress_bar, to_numpy


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
    if vector:
        B = xp.reshape(B, (d, 1))
    k = B.shape[1]
    maxiter = 10 * d if maxiter is None else int(maxiter)
    damping = float(damping)

    Minv = _preconditioner(A, M)

    def apply_A(P: Any, cols: np.ndarray) -> Any:
        # Products only for the active columns, scattered back by a one-hot matmul so the
        # code has no in-place writes (JAX arrays are immutable).
        n_act = len(cols)
        if n_act == k:
            Y = A.matvec(P[:, 0])[:, None] if k == 1 else A.matmat(P)
        else:
            idx = from_numpy(A, cols, dtype=_index_dtype(A))
            Pa = xp.take(P, idx, axis=1)
            Ya = A.matvec(Pa[:, 0])[:, None] if n_act == 1 else A.matmat(Pa)
            E = np.zeros((n_act, k))
            E[np.arange(n_act), cols] = 1.0
            Y = Ya @ from_numpy(A, E)
        return Y + damping * P if damping else Y

    def apply_M(R: Any) -> Any:
        if Minv is None:
            return R
        return Minv.matvec(R[:, 0])[:, None] if k == 1 else Minv.matmat(R)

    bnorm = to_numpy(A, xp.sqrt(xp.sum(B * B, axis=0))).astype(np.float64)
    thresh = np.maximum(tol * bnorm, atol)
    num_matvecs = 0
    if x0 is None:
        X = xp.zeros_like(B)
        R = B
    else:
        X = as_native(A, x0, "x0", ndims=(1, 2))
        X = xp.reshape(X, (d, 1)) if X.ndim == 1 else X
        if tuple(X.shape) != tuple(B.shape):
            raise ValueError(f"x0 has shape {tuple(X.shape)} but b has {tuple(B.shape)}")
        R = B - apply_A(X, np.arange(k))
        num_matvecs += k

    rnorm = to_numpy(A, xp.sqrt(xp.sum(R * R, axis=0))).astype(np.float64)
    converged = rnorm <= thresh
    negative = np.zeros(k, dtype=bool)
    iterations = np.zeros(k, dtype=np.int64)
    active = ~converged
    Z = apply_M(R)
    P = Z
    rz = xp.sum(R * Z, axis=0)
    D = None  # directions of non-positive curvature
    first_step_fallback = np.zeros(k, dtype=bool)

    update, direction = kernel(A, _update), kernel(A, _direction)
    bar = progress_bar(progress, maxiter, "cg")
    try:
        for _ in range(maxiter):
            cols = np.flatnonzero(active)
            if len(cols) == 0:
                break
            AP = apply_A(P, cols)
            num_matvecs += len(cols)
            act = from_numpy(A, active, dtype=bool)
            X, R, pAp, rnorm_new = update(X, R, P, AP, rz, act)
            pAp_np = to_numpy(A, pAp).astype(np.float64)
            bad = active & ~(pAp_np > 0)  # the kernel skipped these columns
            if bad.any():
                negative |= bad
                mask = from_numpy(A, bad, dtype=bool)[None, :]
                D = xp.where(mask, P, xp.zeros_like(P) if D is None else D)
                first_step_fallback |= bad & (iterations == 0) & (x0 is None)
                active &= ~bad
                if not active.any():
                    break  # no column took a step
            iterations += active
            rnorm = np.where(active, to_numpy(A, rnorm_new).astype(np.float64), rnorm)
            done = active & (rnorm <= thresh)
            converged |= done
            active &= ~done
            if callback is not None:
                callback(X[:, 0] if vector else X)
            bar.update(1)
            if not active.any():
                break
            Z = apply_M(R)
            P, rz = direction(R, Z, P, rz, from_numpy(A, active, dtype=bool))
    finally:
        bar.close()

    if first_step_fallback.any():
        # Newton-CG: with no step taken, return the first search direction M b.
        mask = from_numpy(A, first_step_fallback, dtype=bool)[None, :]
        X = xp.where(mask, apply_M(B), X)

    if vector:
        return CGResult(
            x=X[:, 0],
            converged=bool(converged[0]),
            iterations=int(iterations[0]),
            residual_norm=float(rnorm[0]),
            negative_curvature=bool(negative[0]),
            curvature_direction=None if D is None else D[:, 0],
            num_matvecs=num_matvecs,
        )
    return CGResult(
        x=X,
        converged=converged,
        iterations=iterations,
        residual_norm=rnorm,
        negative_curvature=negative,
        curvature_direction=D,
        num_matvecs=num_matvecs,
    )


def _update(xp: Any, X: Any, R: Any, P: Any, AP: Any, rz: Any, act: Any) -> Any:
    """One CG step on the active columns with positive curvature; the rest stay put."""
    pAp = xp.sum(P * AP, axis=0)
    ok = act & (pAp > 0)
    alpha = xp.where(ok, rz / xp.where(ok, pAp, xp.ones_like(pAp)), xp.zeros_like(pAp))
    X = X + alpha[None, :] * P
    R = R - alpha[None, :] * AP
    return X, R, pAp, xp.sqrt(xp.sum(R * R, axis=0))


def _direction(xp: Any, R: Any, Z: Any, P: Any, rz: Any, act: Any) -> Any:
    rz_new = xp.sum(R * Z, axis=0)
    beta = xp.where(act, rz_new / xp.where(act, rz, xp.ones_like(rz)), xp.zeros_like(rz))
    return Z + beta[None, :] * P, xp.where(act, rz_new, rz)


def _index_dtype(A: LinearOperator) -> Any:
    return A._bk.dtype("int64") if A.backend != "jax" else A._bk.xp.int32


def _preconditioner(A: LinearOperator, M: Any) -> LinearOperator | None:
    if M is None:
        return None
    if isinstance(M, LinearOperator):
        return M
    if callable(M) and not hasattr(M, "shape"):
        return aslinearoperator(
            M,
            shape=A.shape,
            dtype=A.dtype,
            backend=A.backend,
            device=A.device,
            symmetric=True,
        )
    return aslinearoperator(M)

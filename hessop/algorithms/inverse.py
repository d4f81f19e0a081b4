"""Inverse-Hessian-vector products ``(H + damping I)^{-1} v``, as bilevel optimization needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks
from ._common import (
    as_native,
    as_operator,
    check_finite_input,
    check_finite_values,
    choice,
    progress_bar,
    to_host,
)
from .cg import cg
from .lanczos import lanczos

METHODS = ("cg", "neumann")


@dataclass(frozen=True)
class InverseHVPResult:
    """What :func:`inverse_hvp` returns.

    Attributes
    ----------
    x :
        ``(A + damping I)^{-1} v``, shaped like ``v``, an array of the operator's framework.
    converged : bool or numpy.ndarray
        CG: the residual test passed. Neumann: the last term fell below ``tol * ||v||``.
    iterations : int
        CG iterations (the most over columns), or Neumann terms summed (one product per
        term after the first).
    residual_norm : float or numpy.ndarray
        CG: ``||v - (A + damping I) x||``. Neumann: the norm of the last term computed,
        ``||scale (I - scale B)^j v||``, an estimate of the truncation error.
    num_matvecs : int
        Products with the operator (including any spent estimating the Neumann scale).
    scale : float or None
        The Neumann step size used.
    """

    x: Any
    converged: Any
    iterations: int
    residual_norm: Any
    num_matvecs: int
    scale: float | None = None


def inverse_hvp(
    A: Any,
    v: Any,
    *,
    method: str = "cg",
    damping: float = 0.0,
    tol: float = 1e-6,
    maxiter: int | None = None,
    scale: float | None = None,
    num_terms: int = 100,
    seed: Any = 0,
    progress: bool = False,
) -> InverseHVPResult:
    """Solve ``(A + damping I) x = v``: the inverse-Hessian-vector product of bilevel methods.

    The implicit function theorem gives the hypergradient of an outer loss through the
    inner optimum ``w*(lam)`` as ``-(d2 L_in / dlam dw) (H + damping I)^{-1} grad_w L_out``:
    this function supplies the middle factor from Hessian-vector products only.

    Parameters
    ----------
    A :
        A symmetric :class:`hessop.LinearOperator` (e.g. :func:`hessop.hessian`), dense
        array, scipy operator or matvec callable.
    v :
        ``(d,)`` or ``(d, k)`` right-hand side(s).
    method : {"cg", "neumann"}
        ``"cg"`` (default): conjugate gradients, :func:`hessop.cg`; needs
        ``A + damping I`` positive definite. ``"neumann"``: the truncated Neumann series
        ``scale * sum_{j < num_terms} (I - scale B)^j v`` with ``B = A + damping I``
        (Lorraine, Vicol & Duvenaud, 2020), one product per term; it converges only when
        ``0 < scale < 2 / lambda_max(B)`` and B is positive definite, at a rate
        ``1 - scale * lambda_min(B)``: slower than CG but a fixed, differentiable
        computation, and a truncated sum is a damped approximation to the inverse.
    damping : float
        Added to the diagonal; makes an indefinite or singular Hessian solvable.
    tol : float
        CG: relative residual. Neumann: stop when a term is below ``tol * ||v||``.
    maxiter : int, optional
        CG iterations (default ``10 d``).
    scale : float, optional
        Neumann step size. By default ``1 / lambda_max(B)`` with ``lambda_max`` estimated
        by 20 Lanczos steps (top Ritz value plus its residual norm), which costs 20
        products.
    num_terms : int
        Neumann: the maximum number of terms.
    seed :
        Seed for the Lanczos start vector of the default Neumann scale.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    InverseHVPResult

    Raises
    ------
    NonFiniteError
        When ``v`` or a product of the operator holds NaN or infinity.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> H = np.array([[3.0, 1.0], [1.0, 2.0]])
    >>> res = hessop.inverse_hvp(H, np.array([1.0, 1.0]), tol=1e-12)
    >>> np.allclose(H @ res.x, 1.0)
    True
    >>> res = hessop.inverse_hvp(H, np.array([1.0, 1.0]), method="neumann", num_terms=200,
    ...                          tol=1e-12, scale=0.25)
    >>> np.allclose(H @ res.x, 1.0)
    True
    """
    method = choice(method, "method", METHODS)
    damping = _checks.real(damping, "damping")
    tol = _checks.real(tol, "tol", minimum=0.0)
    scale = _checks.optional_real(scale, "scale", positive=True)
    num_terms = _checks.integer(num_terms, "num_terms", minimum=1)
    if method == "cg":
        res = cg(A, v, tol=tol, maxiter=maxiter, damping=damping, progress=progress)
        return InverseHVPResult(
            x=res.x,
            converged=res.converged,
            iterations=int(np.max(res.iterations)),
            residual_norm=res.residual_norm,
            num_matvecs=res.num_matvecs,
        )
    _checks.optional_integer(maxiter, "maxiter", minimum=1)
    A = as_operator(A, like=v)
    xp = A.xp
    V = check_finite_input(A, as_native(A, v, "v", ndims=(1, 2)), "inverse_hvp", "v")
    vector = V.ndim == 1
    num_matvecs = 0
    if scale is None:
        lz = lanczos(A, 20, seed=seed)
        num_matvecs += lz.num_matvecs
        theta, S = np.linalg.eigh(to_host(A, lz.tridiagonal()))
        # top Ritz value plus its residual norm |beta_m s_m|: an eigenvalue lies within it
        lam_max = float(theta[-1]) + lz.residual_norm * abs(float(S[-1, -1])) + damping
        if lam_max <= 0:
            raise ValueError(
                "A + damping I has no positive eigenvalue, so the Neumann series cannot "
                "converge; increase damping or use method='cg'"
            )
        scale = 1.0 / lam_max

    def apply_B(P: Any) -> Any:
        Y = A.matvec(P) if vector else A.matmat(P)
        return Y + damping * P if damping else Y

    def norm(P: Any) -> np.ndarray:
        return np.atleast_1d(to_host(A, xp.sqrt(xp.sum(P * P, axis=0))))

    vnorm = norm(V)
    term = V  # (I - scale B)^j v
    total = V
    terms = 1
    tnorm = vnorm
    bar = progress_bar(progress, num_terms, "neumann")
    try:
        while terms < num_terms:
            term = term - scale * apply_B(term)
            num_matvecs += 1 if vector else V.shape[1]
            tnorm = norm(term)
            check_finite_values(tnorm, "inverse_hvp", f"at Neumann term {terms}")
            total = total + term
            terms += 1
            bar.update(1)
            if np.all(tnorm <= tol * vnorm):
                break
    finally:
        bar.close()
    converged = tnorm <= tol * vnorm
    resid = scale * tnorm
    return InverseHVPResult(
        x=scale * total,
        converged=bool(converged[0]) if vector else converged,
        iterations=terms,
        residual_norm=float(resid[0]) if vector else resid,
        num_matvecs=num_matvecs,
        scale=scale,
    )

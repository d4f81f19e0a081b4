"""The Lanczos tridiagonalization ``A Q = Q T + r e_m^T`` of a symmetric operator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from .. import _checks
from .._operator import LinearOperator
from ._basis import Basis
from ._common import (
    apply,
    as_native,
    as_operator,
    check_finite_input,
    check_finite_values,
    host,
    new_rng,
    progress_bar,
    to_host,
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
        xp = array_api_compat.array_namespace(self.alpha)
        a, b = host(self.alpha), host(self.beta)
        T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
        return xp.asarray(T, dtype=self.alpha.dtype, device=array_api_compat.device(self.alpha))


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
        Full reorthogonalization (classical Gram-Schmidt against every previous vector,
        repeated when it removed most of the norm, as ARPACK does): keeps the basis
        orthonormal, so T has no spurious copies of converged eigenvalues, at ``O(d m)``
        extra work and memory. Without it only three vectors
        are kept (unless ``return_basis``).
    return_basis : bool
        Return the Lanczos vectors, ``(d, m)``.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    LanczosResult

    Raises
    ------
    NonFiniteError
        When ``v0`` or a product of the operator holds NaN or infinity.

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
    m = min(_checks.integer(num_iter, "num_iter", minimum=1), d)
    reorth = _checks.flag(reorthogonalize, "reorthogonalize")
    keep = _checks.flag(return_basis, "return_basis")
    v = start_vector(A, v0, new_rng(seed), "lanczos")
    run = lanczos_block(
        A, A.xp.reshape(v, (1, d)), m, reorthogonalize=reorth, keep_basis=keep, progress=progress
    )
    n = int(run.lengths[0])
    basis = None
    if keep:
        basis = A.xp.stack([run.basis.row(i)[0, :] for i in range(n)], axis=1)
    return LanczosResult(
        alpha=A.asarray(run.alpha[0, :n]),
        beta=A.asarray(run.beta[0, : n - 1]),
        basis=basis,
        num_iter=n,
        breakdown=bool(run.breakdown[0]),
        residual_norm=0.0 if run.breakdown[0] else float(run.beta[0, n - 1]),
        num_matvecs=run.num_matvecs,
    )


def start_vector(A: LinearOperator, v0: Any, rng: np.random.Generator, algo: str) -> Any:
    """The unit start vector: ``v0`` normalized (finite, nonzero), or Gaussian from ``rng``."""
    xp = A.xp
    if v0 is None:
        v = A.asarray(rng.standard_normal(A.shape[0]))
    else:
        v = check_finite_input(A, as_native(A, v0, "v0"), algo, "v0")
        if float(A.to_numpy(xp.linalg.vector_norm(v))) == 0.0:
            raise ValueError("v0 must be a nonzero vector")
    return v / xp.linalg.vector_norm(v)


@dataclass
class BlockRun:
    """Independent Lanczos runs done in lockstep (internal to the algorithms)."""

    alpha: np.ndarray  # (p, m)
    beta: np.ndarray  # (p, m): beta[:, j] is the norm of the residual after step j
    lengths: np.ndarray  # (p,) steps done per run
    breakdown: np.ndarray  # (p,) bool
    basis: Basis | None  # the Lanczos vectors, as rows
    num_matvecs: int


def lanczos_block(
    A: LinearOperator,
    V0: Any,
    m: int,
    *,
    reorthogonalize: bool = True,
    keep_basis: bool = False,
    progress: bool = False,
    algo: str = "lanczos",
) -> BlockRun:
    """``p`` independent Lanczos runs from the rows of ``V0`` ``(p, d)``, one ``matmat`` a step.

    Each row is normalized and runs its own recurrence; a run that breaks down stops (its
    later entries are zero and ``lengths`` says how far it got) while the others go on.
    With reorthogonalization (or ``keep_basis``) the vectors are kept in a :class:`Basis`,
    written in place, and each step projects against the filled rows only.
    """
    xp = A.xp
    p = V0.shape[0]
    eps = A.eps
    basis = Basis(A, p, m) if reorthogonalize or keep_basis else None
    step, advance = A.kernel(three_term), A.kernel(_advance)
    V = V0 / xp.sqrt(xp.sum(V0 * V0, axis=1))[:, None]
    V_prev, beta_prev = xp.zeros_like(V), xp.zeros_like(V[:, 0])
    if basis is not None:
        V = basis.append(V)
    alpha, beta = np.zeros((p, m)), np.zeros((p, m))
    lengths, broken = np.zeros(p, dtype=np.int64), np.zeros(p, dtype=bool)
    active, anorm = np.ones(p, dtype=bool), np.zeros(p)
    tiny = np.finfo(float).tiny
    num_matvecs = 0
    bar = progress_bar(progress, m, algo)
    try:
        for j in range(m):
            AV = xp.permute_dims(apply(A, xp.permute_dims(V, (1, 0))), (1, 0))
            num_matvecs += p
            if reorthogonalize:
                W, a_np, b_np, _ = basis.lanczos_step(V, AV, V_prev, beta_prev)
            else:
                W, stats = step(V, AV, V_prev, beta_prev)
                a_np, b_np = to_host(A, stats)
            check_finite_values([a_np[active], b_np[active]], algo, f"at Lanczos step {j}")
            alpha[active, j], beta[active, j] = a_np[active], b_np[active]
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
            # A stopped run goes on with zeros: its (finite, tiny) residual divided by inf.
            V_prev, scale = V, np.where(active, b_np, np.inf)
            V = advance(W, A.asarray(scale)) if basis is None else basis.append(W, scale)
            beta_prev = A.asarray(np.where(active, b_np, 0.0))
    finally:
        bar.close()
    return BlockRun(alpha, beta, lengths, broken, basis, num_matvecs)


def three_term(xp: Any, V: Any, W: Any, V_prev: Any, beta_prev: Any) -> Any:
    """``W - a V - beta_prev V_prev`` with ``a = V . W``, row by row; ``a`` and the norms
    stacked for one read to the host."""
    a = xp.sum(V * W, axis=1)
    W = W - a[:, None] * V - beta_prev[:, None] * V_prev
    return W, xp.stack([a, xp.sqrt(xp.sum(W * W, axis=1))])


def _advance(xp: Any, W: Any, b: Any) -> Any:
    return W / b[:, None]


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of the symmetric tridiagonal (alpha, beta), on the host."""
    import scipy.linalg

    n = len(alpha)
    if n == 1:
        return np.array(alpha, dtype=np.float64), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(alpha, beta[: n - 1])

"""Diagonal estimation: Hutchinson (Bekas et al.), XDiag, and exact by unit vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._common import (
    all_finite,
    apply_chunked,
    as_operator,
    choice,
    chunk_option,
    iter_chunks,
    new_rng,
    nonfinite_product,
)
from ._estimators import (
    ProbeOptions,
    draw,
    exchangeable_sketch,
    mean_and_error,
    num_matvecs_option,
    probe_options,
)

METHODS = ("hutchinson", "xdiag", "exact")


@dataclass(frozen=True)
class DiagonalResult:
    """What :func:`diagonal` returns.

    Attributes
    ----------
    estimate :
        ``(d,)`` estimate of ``diag(A)``, an array of the operator's framework.
    std_error :
        ``(d,)`` estimated standard error of each entry (zeros for ``"exact"``, NaN with a
        single sample).
    num_matvecs : int
        Products with the operator.
    """

    estimate: Any
    std_error: Any
    num_matvecs: int


def diagonal(
    A: Any,
    num_matvecs: int | None = None,
    *,
    method: str = "hutchinson",
    seed: Any = 0,
    distribution: str | None = None,
    density: float | None = None,
    probes: Any = None,
    chunk_size: int | None = None,
) -> DiagonalResult:
    """Estimate the diagonal of ``A`` from ``num_matvecs`` products.

    Parameters
    ----------
    A :
        A :class:`hessop.LinearOperator`, dense array or scipy operator.
    num_matvecs : int
        Products to spend (optional for ``"exact"``, fixed by ``probes`` when given).
    method : {"hutchinson", "xdiag", "exact"}
        The estimator (see Notes).
    seed :
        Seed of the private numpy generator drawing the probes; global RNG state is
        untouched.
    distribution : {"rademacher", "sparse-rademacher", "gaussian", "sphere"}, optional
        Probe distribution, default Rademacher (the lowest variance for diagonals).
        ``"sparse-rademacher"`` entries are ``+-1/sqrt(density)`` with probability
        ``density / 2`` each and 0 otherwise, so that ``E z z^T = I`` still holds.
    density : float, optional
        The fraction of nonzero entries of sparse Rademacher probes, in (0, 1]; default 0.1.
    probes :
        Your own probe vectors, a ``(d, n)`` array (numpy or the operator's framework),
        used instead of drawn ones; ``E z z^T = I`` makes the estimate unbiased.
        ``"hutchinson"`` spends ``n`` products, ``"xdiag"`` ``2 n`` (all ``n`` probes are
        used exchangeably); ``"exact"`` takes none (it uses the unit vectors).
    chunk_size : int, optional
        Columns per ``matmat`` call (default: all at once).

    Returns
    -------
    DiagonalResult

    Raises
    ------
    NonFiniteError
        When the probes or the operator's products hold NaN or infinity.

    Notes
    -----
    ``"hutchinson"``
        ``mean_i z_i * (A z_i)`` (Bekas, Kokiopoulou & Saad, 2007).
    ``"xdiag"``
        Epperly, Tropp & Webber (2024): half the products build a leave-one-out low-rank
        approximation ``Q Q^T A`` from the other probes, the rest correct its diagonal.
        Much more accurate when the spectrum decays. Needs an even ``num_matvecs >= 4``
        and uses ``A^T`` products (``A`` itself when symmetric).
    ``"exact"``
        ``d`` products with the unit vectors, batched ``chunk_size`` at a time
        (``num_matvecs``, if given, must be ``d``).

    **How many products for what error.** With Rademacher probes entry j of one
    Hutchinson sample has variance ``sum_{l != j} A_jl^2`` (the off-diagonal mass of its
    row); Gaussian probes add ``2 A_jj^2``, sparse Rademacher ones
    ``(1/density - 1) A_jj^2``. The error of the mean falls as ``1 / sqrt(m)``: entry j
    to absolute error ``eps`` needs about ``sum_{l != j} A_jl^2 / eps^2`` products. XDiag's
    error falls with the tail of the spectrum beyond ``num_matvecs / 2`` eigenvalues, and
    vanishes once that exceeds the numerical rank; when ``d`` products are affordable,
    ``"exact"`` is exact.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.array([[2.0, 0.5], [0.5, 3.0]])
    >>> hessop.diagonal(A, method="exact").estimate
    array([2., 3.])

    Your own probes, e.g. the two sign patterns that cancel the off-diagonal exactly:

    >>> hessop.diagonal(A, probes=np.array([[1.0, 1.0], [1.0, -1.0]])).estimate
    array([2., 3.])
    """
    A = as_operator(A)
    method = choice(method, "method", METHODS)
    chunk = chunk_option(chunk_size)
    if method == "exact":
        d = A.shape[0]
        if probes is not None or distribution is not None or density is not None:
            raise ValueError(
                "method='exact' multiplies by the unit vectors: it takes no probes, "
                "distribution or density"
            )
        if num_matvecs is not None and num_matvecs != d:
            raise ValueError(
                f"method='exact' takes exactly d={d} products, got num_matvecs={num_matvecs}; "
                "omit num_matvecs"
            )
        return _exact(A, chunk)
    opts = probe_options(A, "diagonal", method, probes, distribution, density)
    if num_matvecs is None and opts.user is None:
        raise ValueError(f"method={method!r} needs num_matvecs (or probes)")
    m = num_matvecs_option(num_matvecs, method, opts)
    rng = new_rng(seed)
    if method == "hutchinson":
        Z = draw(A, opts, rng, m)
        samples = Z * apply_chunked(A, Z, chunk, "diagonal")
        return _result(A, samples, m)
    if m < 4 or m % 2:
        raise ValueError(
            f"xdiag spends its products in pairs and needs an even num_matvecs >= 4 "
            f"(2 probes), got {m}"
        )
    return _xdiag(A, m, opts, rng, chunk)


def _result(A: Any, samples: Any, num: int) -> DiagonalResult:
    est, err = mean_and_error(A.xp, samples, axis=1)
    if not all_finite(A, est):
        raise nonfinite_product("diagonal", "with its probe vectors (the estimate overflowed)")
    return DiagonalResult(est, err, num)


def _exact(A: Any, chunk: int | None) -> DiagonalResult:
    xp = A.xp
    d = A.shape[0]
    parts = []
    for start, stop in iter_chunks(d, d if chunk is None else chunk):
        E = np.zeros((d, stop - start))
        E[np.arange(start, stop), np.arange(stop - start)] = 1.0
        E = A.asarray(E)
        parts.append(xp.sum(E * apply_chunked(A, E, None, "diagonal"), axis=0))
    est = parts[0] if len(parts) == 1 else xp.concat(parts)
    return DiagonalResult(est, xp.zeros_like(est), d)


def _xdiag(A: Any, num: int, opts: ProbeOptions, rng: Any, chunk: int | None) -> DiagonalResult:
    # Epperly, Tropp & Webber (2024), Algorithm "xdiag": the diagonal of the leave-one-out
    # approximation P_i A, P_i = Q (I - K_i K_i^T) Q^T the projector onto the other probes'
    # products, plus the probe correction omega_i * ((I - P_i) A omega_i), averaged over i.
    xp = A.xp
    sk = exchangeable_sketch(A, draw(A, opts, rng, num // 2), chunk, "diagonal", transpose=True)
    Om, Y, Q, Z, T = sk.Om, sk.Y, sk.Q, sk.Z, sk.T  # Z = A^T Q, so that Q Z^T = Q Q^T A
    base = xp.sum(Q * Z, axis=1)  # diag(Q Q^T A)
    if sk.kind == "vector":
        S = sk.K
        QS, ZS = Q @ S, Z @ S
        dST = xp.sum(S * T, axis=0)
        samples = base[:, None] + (-QS * ZS + Om * Y - Om * (Q @ T) + Om * QS * dST[None, :])
    else:
        cols = []
        for i, Ki in enumerate(sk.K):
            QK, t = Q @ Ki, T[:, i]
            low = base - xp.sum(QK * (Z @ Ki), axis=1)
            resid = Y[:, i] - Q @ t + QK @ (Ki.T @ t)  # (I - P_i) A omega_i
            cols.append(low + Om[:, i] * resid)
        samples = xp.stack(cols, axis=1)
    return _result(A, samples, num)

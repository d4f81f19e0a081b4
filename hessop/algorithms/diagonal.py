"""Diagonal estimation: Hutchinson (Bekas et al.), XDiag, and exact by unit vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import unknown
from ._common import (
    apply_chunked,
    as_operator,
    check_distribution,
    from_numpy,
    iter_chunks,
    leave_one_out,
    new_rng,
    positive_int,
    random_probes,
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
    distribution: str = "rademacher",
    chunk_size: int | None = None,
) -> DiagonalResult:
    """Estimate the diagonal of ``A`` from ``num_matvecs`` products.

    Parameters
    ----------
    A :
        A :class:`hessop.LinearOperator`, dense array or scipy operator.
    num_matvecs : int
        Products to spend (optional for ``"exact"``).
    method : {"hutchinson", "xdiag", "exact"}
        The estimator (see Notes).
    seed :
        Seed of the private numpy generator drawing the probes; global RNG state is
        untouched.
    distribution : {"rademacher", "gaussian", "sphere"}
        Probe distribution (Rademacher has the lowest variance for diagonals).
    chunk_size : int, optional
        Columns per ``matmat`` call (default: all at once).

    Returns
    -------
    DiagonalResult

    Notes
    -----
    ``"hutchinson"``
        ``mean_i z_i * (A z_i)`` (Bekas, Kokiopoulou & Saad, 2007); with Rademacher
        probes entry j has variance ``sum_{l != j} A_jl^2`` per probe.
    ``"xdiag"``
        Epperly, Tropp & Webber (2024): half the products build a leave-one-out low-rank
        approximation ``Q Q^T A`` from the other probes, the rest correct its diagonal.
        Much more accurate when the spectrum decays. Needs an even ``num_matvecs >= 4``
        and uses ``A^T`` products (``A`` itself when symmetric).
    ``"exact"``
        ``d`` products with the unit vectors, batched ``chunk_size`` at a time
        (``num_matvecs``, if given, must be ``d``).

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.array([[2.0, 0.5], [0.5, 3.0]])
    >>> hessop.diagonal(A, method="exact").estimate
    array([2., 3.])
    """
    A = as_operator(A)
    if method not in METHODS:
        raise unknown("method", method, METHODS)
    check_distribution(distribution)
    d = A.shape[0]
    xp = A.xp
    if method == "exact":
        if num_matvecs is not None and num_matvecs != d:
            raise ValueError(
                f"method='exact' takes exactly d={d} products, got num_matvecs={num_matvecs}; "
                "omit num_matvecs"
            )
        return _exact(A, chunk_size)
    if num_matvecs is None:
        raise ValueError(f"method={method!r} needs num_matvecs")
    m = positive_int(num_matvecs, "num_matvecs")
    rng = new_rng(seed)
    if method == "hutchinson":
        Z = from_numpy(A, random_probes(rng, d, m, distribution))
        samples = Z * apply_chunked(A, Z, chunk_size)
        return DiagonalResult(*_mean_and_error(xp, samples), m)
    if m < 4 or m % 2:
        raise ValueError(
            f"xdiag spends its products in pairs and needs an even num_matvecs >= 4, got {m}"
        )
    return _xdiag(A, m, rng, distribution, chunk_size)


def _mean_and_error(xp: Any, samples: Any) -> tuple[Any, Any]:
    m = samples.shape[1]
    est = xp.mean(samples, axis=1)
    if m < 2:
        return est, est * float("nan")
    return est, xp.std(samples, axis=1, correction=1) / math.sqrt(m)


def _exact(A: Any, chunk: int | None) -> DiagonalResult:
    xp = A.xp
    d = A.shape[0]
    step = d if chunk is None else max(1, int(chunk))
    parts = []
    for start, stop in iter_chunks(d, step):
        E = np.zeros((d, stop - start))
        E[np.arange(start, stop), np.arange(stop - start)] = 1.0
        E = from_numpy(A, E)
        parts.append(xp.sum(E * apply_chunked(A, E, None), axis=0))
    est = parts[0] if len(parts) == 1 else xp.concat(parts)
    return DiagonalResult(est, xp.zeros_like(est), d)


def _xdiag(A: Any, num: int, rng: Any, dist: str, chunk: int | None) -> DiagonalResult:
    # Epperly, Tropp & Webber (2024), Algorithm "xdiag": the diagonal of the leave-one-out
    # approximation P_i A, P_i = Q (I - K_i K_i^T) Q^T the projector onto the other probes'
    # products, plus the probe correction omega_i * ((I - P_i) A omega_i), averaged over i.
    xp = A.xp
    d = A.shape[0]
    m = num // 2
    if m >= d:
        raise ValueError(
            f"xdiag with num_matvecs={num} uses {m} probes, which needs m < d={d}; use "
            "method='exact' instead"
        )
    Om = from_numpy(A, random_probes(rng, d, m, dist))
    Y = apply_chunked(A, Om, chunk)
    Q, R = xp.linalg.qr(Y)
    Z = _rapply(A, Q, chunk)  # A^T Q, so that Q Z^T = Q Q^T A
    T = Z.T @ Om  # = Q^T A Omega
    base = xp.sum(Q * Z, axis=1)  # diag(Q Q^T A)
    kind, K = leave_one_out(A, R)
    if kind == "vector":
        S = K
        QS, ZS = Q @ S, Z @ S
        dST = xp.sum(S * T, axis=0)
        samples = base[:, None] + (-QS * ZS + Om * Y - Om * (Q @ T) + Om * QS * dST[None, :])
    else:
        cols = []
        for i, Ki in enumerate(K):
            QK, t = Q @ Ki, T[:, i]
            low = base - xp.sum(QK * (Z @ Ki), axis=1)
            resid = Y[:, i] - Q @ t + QK @ (Ki.T @ t)  # (I - P_i) A omega_i
            cols.append(low + Om[:, i] * resid)
        samples = xp.stack(cols, axis=1)
    return DiagonalResult(*_mean_and_error(xp, samples), num)


def _rapply(A: Any, V: Any, chunk: int | None) -> Any:
    if A.symmetric:
        return apply_chunked(A, V, chunk)
    xp = A.xp
    k = V.shape[1]
    step = k if chunk is None else max(1, int(chunk))
    return xp.concat([A.rmatmat(V[:, j : j + step]) for j in range(0, k, step)], axis=1)

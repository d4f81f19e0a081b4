"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace."""

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
    leave_one_out,
    new_rng,
    positive_int,
    random_probes,
)

METHODS = ("hutchinson", "hutch++", "xtrace")
_DEFAULT_DISTRIBUTION = {"hutchinson": "rademacher", "hutch++": "rademacher", "xtrace": "sphere"}


@dataclass(frozen=True)
class TraceResult:
    """What :func:`trace` returns.

    Attributes
    ----------
    estimate :
        The trace estimate, a 0-d array of the operator's framework (differentiable when
        the operator's products are).
    std_error :
        Its estimated standard error (0-d array; NaN with a single sample).
    num_matvecs : int
        Products with the operator: exactly the ``num_matvecs`` asked for.
    """

    estimate: Any
    std_error: Any
    num_matvecs: int


def trace(
    A: Any,
    num_matvecs: int,
    *,
    method: str = "hutchinson",
    seed: Any = 0,
    distribution: str | None = None,
    chunk_size: int | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` from exactly ``num_matvecs`` products with ``A``.

    Parameters
    ----------
    A :
        A :class:`hessop.LinearOperator`, dense array or scipy operator.
    num_matvecs : int
        The exact number of products to spend.
    method : {"hutchinson", "hutch++", "xtrace"}
        The estimator (see Notes).
    seed :
        Seed of the private numpy generator drawing the probes (the same numbers in every
        framework); global RNG state is untouched.
    distribution : {"rademacher", "gaussian", "sphere"}, optional
        Probe distribution; default Rademacher, and the sphere of radius ``sqrt(d)`` for
        XTrace.
    chunk_size : int, optional
        Columns per ``matmat`` call (default: all at once).

    Returns
    -------
    TraceResult

    Notes
    -----
    ``"hutchinson"``
        ``mean_i z_i^T A z_i`` over ``num_matvecs`` probes (Hutchinson, 1989); the standard
        error is the sample standard deviation over ``sqrt(num_matvecs)``.
    ``"hutch++"``
        Meyer, Musco, Musco & Woodruff (2021): a third of the products sketch the range
        ``Q = orth(A S)``, a third give ``tr(Q^T A Q)`` exactly, and the rest run
        Hutchinson on the deflated ``(I - QQ^T) A (I - QQ^T)``. Far less variance when the
        spectrum decays. Needs ``num_matvecs >= 3``; the standard error is that of the
        Hutchinson part given Q.
    ``"xtrace"``
        Epperly, Tropp & Webber (2024): ``num_matvecs / 2`` probes, each estimate using
        the low-rank approximation from all the other probes (exchangeable, so every
        product serves both purposes). Needs an even ``num_matvecs >= 4``; with the
        default ``"sphere"`` probes it uses the paper's improved normalization. The error
        is the paper's estimate (std of the leave-one-out estimates / sqrt(m)).

    Every method is unbiased, for symmetric and non-symmetric ``A`` alike. When the
    products of the XTrace probes are numerically rank deficient (an operator of rank
    below ``num_matvecs / 2``), the leave-one-out projectors come from SVDs of the small
    triangular factor instead of its inverse, which keeps the estimate unbiased (and exact
    for such an operator). All probes of one call go through one ``A.matmat`` per phase
    (split into ``chunk_size`` columns when given, to bound memory).

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.diag(np.arange(1.0, 51.0))          # trace 1275
    >>> res = hessop.trace(A, 30, method="hutch++", seed=0)
    >>> res.num_matvecs
    30
    >>> abs(float(res.estimate) - 1275.0) < 3 * float(res.std_error) + 1e-8
    True
    """
    A = as_operator(A)
    if method not in METHODS:
        raise unknown("method", method, METHODS)
    num_matvecs = positive_int(num_matvecs, "num_matvecs")
    dist = _DEFAULT_DISTRIBUTION[method] if distribution is None else distribution
    check_distribution(dist)
    rng = new_rng(seed)
    if method == "hutchinson":
        return _hutchinson(A, num_matvecs, rng, dist, chunk_size)
    if method == "hutch++":
        if num_matvecs < 3:
            raise ValueError(f"hutch++ needs num_matvecs >= 3, got {num_matvecs}")
        return _hutchpp(A, num_matvecs, rng, dist, chunk_size)
    if num_matvecs < 4 or num_matvecs % 2:
        raise ValueError(
            f"xtrace spends its products in pairs and needs an even num_matvecs >= 4, got "
            f"{num_matvecs}; pass {max(4, num_matvecs - num_matvecs % 2)}"
        )
    return _xtrace(A, num_matvecs, rng, dist, chunk_size)


def _mean_and_error(xp: Any, samples: Any) -> tuple[Any, Any]:
    m = samples.shape[0]
    est = xp.mean(samples)
    if m < 2:
        return est, est * float("nan")
    return est, xp.std(samples, correction=1) / math.sqrt(m)


def _hutchinson(A: Any, m: int, rng: Any, dist: str, chunk: int | None) -> TraceResult:
    xp = A.xp
    Z = from_numpy(A, random_probes(rng, A.shape[0], m, dist))
    samples = xp.sum(Z * apply_chunked(A, Z, chunk), axis=0)
    est, err = _mean_and_error(xp, samples)
    return TraceResult(est, err, m)


def _hutchpp(A: Any, m: int, rng: Any, dist: str, chunk: int | None) -> TraceResult:
    xp = A.xp
    d = A.shape[0]
    s = m // 3
    g = m - 2 * s
    S = from_numpy(A, random_probes(rng, d, s, dist))
    G = from_numpy(A, random_probes(rng, d, g, dist))
    Q, _ = xp.linalg.qr(apply_chunked(A, S, chunk))
    low_rank = xp.sum(Q * apply_chunked(A, Q, chunk))
    Gp = G - Q @ (Q.T @ G)
    samples = xp.sum(Gp * apply_chunked(A, Gp, chunk), axis=0)
    rest, err = _mean_and_error(xp, samples)
    return TraceResult(low_rank + rest, err, m)


def _xtrace(A: Any, num: int, rng: Any, dist: str, chunk: int | None) -> TraceResult:
    # Epperly, Tropp & Webber (2024), Algorithm "xtrace"; A is only used through products.
    # Probe i: tr(P_i A) + w_i^T (I - P_i) A (I - P_i) w_i with P_i the projector onto
    # the span of the other probes' products A w_j; all terms reduce to m x m algebra.
    xp = A.xp
    d = A.shape[0]
    m = num // 2
    if m >= d:
        raise ValueError(
            f"xtrace with num_matvecs={num} uses {m} probes, which needs m < d={d}; use fewer "
            "products (or hessop.diagonal(A, method='exact') for the exact trace)"
        )
    Om = from_numpy(A, random_probes(rng, d, m, dist))
    Y = apply_chunked(A, Om, chunk)
    Q, R = xp.linalg.qr(Y)
    W = Q.T @ Om
    Z = apply_chunked(A, Q, chunk)
    H = Q.T @ Z
    HW = H @ W
    T = Z.T @ Om  # = Q^T A^T Omega
    kind, K = leave_one_out(A, R)

    def dprod(X: Any, Y: Any) -> Any:  # diag(X^T Y)
        return xp.sum(X * Y, axis=0)

    dWHW = dprod(W, HW)
    dTW = dprod(T, W)
    if kind == "vector":
        S = K
        dSW = dprod(S, W)  # c_i = s_i^T w_i
        cc = dSW * dSW
        low = xp.linalg.trace(H) - dprod(S, H @ S)
        cross = dprod(S, R - HW) * dSW + dprod(T - H.T @ W, S) * dSW + cc * dprod(S, H @ S)
        ranks = m - 1
    else:
        parts_low, parts_cross, parts_cc, rank_list = [], [], [], []
        for i, Ki in enumerate(K):
            w, r, t = W[:, i], R[:, i], T[:, i]
            c = Ki.T @ w
            KHK = Ki.T @ H @ Ki
            parts_low.append(xp.linalg.trace(H) - xp.linalg.trace(KHK))
            parts_cross.append(
                xp.sum(c * (Ki.T @ (r - H @ w)))
                + xp.sum((t - H.T @ w) * (Ki @ c))
                + xp.sum(c * (KHK @ c))
            )
            parts_cc.append(xp.sum(c * c))
            rank_list.append(m - Ki.shape[1])
        low, cross, cc = xp.stack(parts_low), xp.stack(parts_cross), xp.stack(parts_cc)
        ranks = from_numpy(A, np.array(rank_list, dtype=np.float64))
    if dist == "sphere":
        # Improved normalization: rescale each residual probe to its projected length, in
        # the (d - rank P_i)-dimensional complement where it is uniformly distributed.
        scale = (d - ranks) / (d - dprod(W, W) + cc)
    else:
        scale = 1.0
    ests = low + (dWHW - dTW + cross) * scale
    est, err = _mean_and_error(xp, ests)
    return TraceResult(est, err, num)

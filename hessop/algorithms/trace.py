"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._common import (
    apply_chunked,
    as_operator,
    choice,
    chunk_option,
    new_rng,
    nonfinite_product,
    to_host,
)
from ._estimators import (
    ProbeOptions,
    draw,
    exchangeable_sketch,
    mean_and_error,
    num_matvecs_option,
    probe_options,
)

METHODS = ("hutchinson", "hutch++", "xtrace")


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
    num_matvecs: int | None = None,
    *,
    method: str = "hutchinson",
    seed: Any = 0,
    distribution: str | None = None,
    density: float | None = None,
    probes: Any = None,
    chunk_size: int | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` from exactly ``num_matvecs`` products with ``A``.

    Parameters
    ----------
    A :
        A :class:`hessop.LinearOperator`, dense array or scipy operator.
    num_matvecs : int
        The exact number of products to spend (fixed by ``probes`` when given).
    method : {"hutchinson", "hutch++", "xtrace"}
        The estimator (see Notes).
    seed :
        Seed of the private numpy generator drawing the probes (the same numbers in every
        framework); global RNG state is untouched.
    distribution : {"rademacher", "sparse-rademacher", "gaussian", "sphere"}, optional
        Probe distribution; default Rademacher, and the sphere of radius ``sqrt(d)`` for
        XTrace. ``"sparse-rademacher"`` entries are ``+-1/sqrt(density)`` with probability
        ``density / 2`` each and 0 otherwise, so that ``E z z^T = I`` still holds.
    density : float, optional
        The fraction of nonzero entries of sparse Rademacher probes, in (0, 1]; default 0.1.
    probes :
        Your own probe vectors, a ``(d, n)`` array (numpy or the operator's framework),
        used instead of drawn ones; they should satisfy ``E z z^T = I`` for an unbiased
        estimate. ``"hutchinson"`` uses each column once (``n`` products); ``"hutch++"``
        sketches the range with the first ``n // 2`` columns and runs Hutchinson with the
        rest (``n + n // 2`` products); ``"xtrace"`` uses all ``n`` exchangeably (``2 n``
        products; its normalization for sphere probes only with ``distribution="sphere"``).
    chunk_size : int, optional
        Columns per ``matmat`` call (default: all at once).

    Returns
    -------
    TraceResult

    Raises
    ------
    NonFiniteError
        When the probes or the operator's products hold NaN or infinity.

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

    **How many products for what error.** One Hutchinson sample has variance
    ``2 sum_{i != j} A_ij^2`` with Rademacher probes, ``2 ||A||_F^2`` with Gaussian ones,
    and ``2 sum_{i != j} A_ij^2 + (1/density - 1) sum_i A_ii^2`` with sparse Rademacher
    ones (sparser probes are cheaper to form, never more accurate); the error of the mean
    falls as ``1 / sqrt(m)``: a relative error ``eps`` needs about
    ``2 ||A||_F^2 / (eps tr A)^2`` products. For a positive semi-definite A, Hutch++ and
    XTrace reach relative error ``eps`` with ``O(1 / eps)`` products (Meyer et al.), and
    far fewer when the spectrum decays fast, as Hessian spectra do: XTrace is then exact
    once ``num_matvecs / 2`` exceeds the numerical rank. ``std_error`` estimates the error
    of the call at hand.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.diag(np.arange(1.0, 51.0))          # trace 1275
    >>> res = hessop.trace(A, 30, method="hutch++", seed=0)
    >>> res.num_matvecs
    30
    >>> abs(float(res.estimate) - 1275.0) < 3 * float(res.std_error) + 1e-8
    True

    Your own probes, e.g. Rademacher columns drawn elsewhere (``z^T A z`` is then exact for
    a diagonal A), and sparse Rademacher probes, rescaled so that ``E z z^T = I``:

    >>> Z = np.random.default_rng(1).choice([-1.0, 1.0], size=(50, 8))
    >>> res = hessop.trace(A, probes=Z)
    >>> res.num_matvecs, float(res.estimate)
    (8, 1275.0)
    >>> res = hessop.trace(A, 2000, distribution="sparse-rademacher", density=0.1, seed=0)
    >>> bool(abs(float(res.estimate) - 1275.0) < 4 * float(res.std_error))
    True
    """
    A = as_operator(A)
    method = choice(method, "method", METHODS)
    opts = probe_options(A, "trace", method, probes, distribution, density)
    num = num_matvecs_option(num_matvecs, method, opts)
    chunk = chunk_option(chunk_size)
    if method == "hutch++" and num < 3:
        raise ValueError(f"hutch++ needs num_matvecs >= 3 (2 probes), got {num}")
    if method == "xtrace" and (num < 4 or num % 2):
        raise ValueError(
            f"xtrace spends its products in pairs and needs an even num_matvecs >= 4 "
            f"(2 probes), got {num}; pass {max(4, num - num % 2)}"
        )
    run = {"hutchinson": _hutchinson, "hutch++": _hutchpp, "xtrace": _xtrace}[method]
    est, err = run(A, num, opts, new_rng(seed), chunk)
    if not math.isfinite(float(to_host(A, est))):
        raise nonfinite_product("trace", "with its probe vectors (the estimate overflowed)")
    return TraceResult(est, err, num)


def _hutchinson(A: Any, m: int, opts: ProbeOptions, rng: Any, chunk: int | None) -> Any:
    xp = A.xp
    Z = draw(A, opts, rng, m)
    samples = xp.sum(Z * apply_chunked(A, Z, chunk, "trace"), axis=0)
    return mean_and_error(xp, samples, axis=0)


def _hutchpp(A: Any, m: int, opts: ProbeOptions, rng: Any, chunk: int | None) -> Any:
    xp = A.xp
    if opts.user is not None:
        s = int(opts.user.shape[1]) // 2
        S, G = opts.user[:, :s], opts.user[:, s:]
    else:
        s = m // 3
        S, G = draw(A, opts, rng, s), draw(A, opts, rng, m - 2 * s)
    Q, _ = xp.linalg.qr(apply_chunked(A, S, chunk, "trace"))
    low_rank = xp.sum(Q * apply_chunked(A, Q, chunk, "trace"))
    Gp = G - Q @ (Q.T @ G)
    samples = xp.sum(Gp * apply_chunked(A, Gp, chunk, "trace"), axis=0)
    rest, err = mean_and_error(xp, samples, axis=0)
    return low_rank + rest, err


def _xtrace(A: Any, num: int, opts: ProbeOptions, rng: Any, chunk: int | None) -> Any:
    # Epperly, Tropp & Webber (2024), Algorithm "xtrace"; A is only used through products.
    # Probe i: tr(P_i A) + w_i^T (I - P_i) A (I - P_i) w_i with P_i the projector onto
    # the span of the other probes' products A w_j; all terms reduce to m x m algebra.
    xp = A.xp
    d = A.shape[0]
    m = num // 2
    sk = exchangeable_sketch(A, draw(A, opts, rng, m), chunk, "trace", transpose=False)
    R, T = sk.R, sk.T  # T = Z^T Omega = Q^T A^T Omega
    W = sk.Q.T @ sk.Om
    H = sk.Q.T @ sk.Z
    HW = H @ W

    def dprod(X: Any, Y: Any) -> Any:  # diag(X^T Y)
        return xp.sum(X * Y, axis=0)

    dWHW = dprod(W, HW)
    dTW = dprod(T, W)
    if sk.kind == "vector":
        S = sk.K
        dSW = dprod(S, W)  # c_i = s_i^T w_i
        cc = dSW * dSW
        low = xp.linalg.trace(H) - dprod(S, H @ S)
        cross = dprod(S, R - HW) * dSW + dprod(T - H.T @ W, S) * dSW + cc * dprod(S, H @ S)
        ranks = m - 1
    else:
        parts_low, parts_cross, parts_cc, rank_list = [], [], [], []
        for i, Ki in enumerate(sk.K):
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
        ranks = A.asarray(rank_list)
    if opts.distribution == "sphere":
        # Improved normalization: rescale each residual probe to its projected length, in
        # the (d - rank P_i)-dimensional complement where it is uniformly distributed.
        scale = (d - ranks) / (d - dprod(W, W) + cc)
    else:
        scale = 1.0
    ests = low + (dWHW - dTW + cross) * scale
    return mean_and_error(xp, ests, axis=0)

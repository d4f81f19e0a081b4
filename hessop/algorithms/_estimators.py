"""What the stochastic trace and diagonal estimators share: probe options, the sample mean
and its error, and the exchangeable sketch of XTrace / XDiag (Epperly, Tropp & Webber 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks
from .._operator import LinearOperator
from ._common import (
    DISTRIBUTIONS,
    apply_chunked,
    as_native,
    check_finite_input,
    choice,
    random_probes,
    to_host,
)

#: the default density of sparse Rademacher probes
SPARSE_DENSITY = 0.1


@dataclass(frozen=True)
class ProbeOptions:
    """The validated probe options of one call."""

    distribution: str
    density: float
    user: Any  # the user's (d, n) probes in the operator's framework, or None


def density_option(value: Any, distribution: str) -> float:
    """The ``density`` of sparse Rademacher probes, in (0, 1]."""
    want = "density must be a finite number in (0, 1]"
    try:
        dens = _checks.real(value, "density", positive=True)
    except ValueError:
        raise ValueError(f"{want}, got {value!r}") from None
    if dens > 1.0:
        raise ValueError(f"{want}, got {dens!r}")
    if dens != 1.0 and distribution != "sparse-rademacher":
        raise ValueError(
            f"density={dens} applies to distribution='sparse-rademacher' only, got "
            f"distribution={distribution!r}"
        )
    return dens


def probe_options(
    A: LinearOperator,
    algo: str,
    method: str,
    probes: Any,
    distribution: str | None,
    density: float | None,
) -> ProbeOptions:
    """Check ``distribution``, ``density`` and user ``probes`` (finite, ``(d,)`` or ``(d, n)``).

    With user probes, ``distribution`` may only tell that they lie on the sphere (which
    turns on XTrace's normalization), and ``density`` has no meaning.
    """
    if probes is not None:
        if density is not None or (distribution is not None and method != "xtrace"):
            what = "density" if density is not None else "distribution"
            raise ValueError(
                f"{what} describes the probes that {algo} draws, so it has no meaning with "
                "probes=; drop it (with method='xtrace', distribution='sphere' says that "
                "your probes lie on the sphere of radius sqrt(d))"
            )
        if distribution is not None:
            choice(distribution, "distribution", ("sphere",))
        P = as_native(A, probes, "probes", ndims=(1, 2))
        if P.ndim == 1:
            P = A.xp.reshape(P, (-1, 1))
        check_finite_input(A, P, algo, "probes")
        return ProbeOptions(distribution or "given", 1.0, P)
    default = "sphere" if method == "xtrace" else "rademacher"
    dist = default if distribution is None else choice(distribution, "distribution", DISTRIBUTIONS)
    if density is None:
        dens = SPARSE_DENSITY if dist == "sparse-rademacher" else 1.0
    else:
        dens = density_option(density, dist)
    return ProbeOptions(dist, dens, None)


def draw(A: LinearOperator, opts: ProbeOptions, rng: np.random.Generator, k: int) -> Any:
    """``k`` probes of the operator's framework: the user's (all of them), or drawn."""
    if opts.user is not None:
        return opts.user
    return A.asarray(random_probes(rng, A.shape[0], k, opts.distribution, opts.density))


def products_for(method: str, n: int) -> int:
    """The products that ``n`` user probes cost under ``method``."""
    return {"hutchinson": n, "hutch++": n + n // 2}.get(method, 2 * n)


def num_matvecs_option(value: Any, method: str, opts: ProbeOptions) -> int:
    """``num_matvecs`` checked against the user probes (which fix it) or >= 1."""
    if opts.user is None:
        return _checks.integer(value, "num_matvecs", minimum=1)
    need = products_for(method, int(opts.user.shape[1]))
    if value is not None and _checks.integer(value, "num_matvecs", minimum=1) != need:
        raise ValueError(
            f"{opts.user.shape[1]} probes cost {need} products with method={method!r}, but "
            f"num_matvecs={value}; omit num_matvecs (the probes fix it)"
        )
    return need


def mean_and_error(xp: Any, samples: Any, axis: int) -> tuple[Any, Any]:
    """The sample mean along ``axis`` and its standard error (NaN with one sample)."""
    m = samples.shape[axis]
    est = xp.mean(samples, axis=axis)
    if m < 2:
        return est, est * float("nan")
    # The two-pass variance written with sums: torch's std along the strided axis of a
    # (d, k) block took 133 ms for 269k x 30, these reductions 20 ms.
    dev = samples - xp.expand_dims(est, axis=axis)
    return est, xp.sqrt(xp.sum(dev * dev, axis=axis) / (m - 1)) / math.sqrt(m)


@dataclass(frozen=True)
class Sketch:
    """``Y = A Omega = Q R`` and ``Z = A Q`` (``A^T Q`` when asked), ``T = Z^T Omega``, and
    the leave-one-out geometry ``(kind, K)`` of :func:`leave_one_out`."""

    Om: Any
    Y: Any
    Q: Any
    R: Any
    Z: Any
    T: Any
    kind: str
    K: Any


def exchangeable_sketch(
    A: LinearOperator, Om: Any, chunk: int | None, algo: str, transpose: bool
) -> Sketch:
    """The part of XTrace and XDiag before their own algebra: ``2 m`` products for ``m``
    probes, one batched product per phase."""
    xp = A.xp
    d, m = Om.shape
    if m >= d:
        raise ValueError(
            f"{algo} with {m} probes ({2 * m} products) needs fewer probes than d={d}; use "
            "fewer products, or hessop.diagonal(A, method='exact') for the exact values"
        )
    Y = apply_chunked(A, Om, chunk, algo)
    Q, R = xp.linalg.qr(Y)
    Z = apply_chunked(A, Q, chunk, algo, transpose=transpose)
    kind, K = leave_one_out(A, R)
    return Sketch(Om, Y, Q, R, Z, Z.T @ Om, kind, K)


def leave_one_out(A: LinearOperator, R: Any) -> tuple[str, Any]:
    """The exchangeable estimators' leave-one-out geometry, from ``Y = A Omega = Q R``.

    For each probe i, the projector onto ``span(Y without column i)`` is
    ``Q (I - K_i K_i^T) Q^T`` where ``K_i`` (m x n_i, in Q-coordinates) spans the part of
    ``span(Q)`` that the other columns miss. When Y has full numerical rank, ``n_i = 1`` and
    ``K_i = s_i``, the normalized i-th column of ``R^{-T}`` (Epperly, Tropp & Webber):
    returns ``("vector", S)`` with S in the framework (so gradients flow). When Y is
    numerically rank deficient (singular values below ``sqrt(eps)`` of the largest, as for
    an operator of rank < m), ``R^{-T}`` does not exist and each ``K_i`` comes from an SVD
    of ``R`` without column i: returns ``("blocks", [K_i])``. Either way ``K_i`` depends on
    the other probes only, which is what keeps the estimators unbiased.
    """
    xp = A.xp
    Rn = to_host(A, R)
    m = Rn.shape[1]
    rtol = math.sqrt(A.eps)
    sv = np.linalg.svd(Rn, compute_uv=False)
    if sv.size and sv[-1] > rtol * sv[0]:
        S = xp.linalg.inv(R).T
        return "vector", S / xp.sqrt(xp.sum(S * S, axis=0))[None, :]
    blocks = []
    for i in range(m):
        U, s, _ = np.linalg.svd(np.delete(Rn, i, axis=1), full_matrices=True)
        rank = int(np.sum(s > rtol * max(sv[0], np.finfo(float).tiny)))
        blocks.append(A.asarray(U[:, rank:]))
    return "blocks", blocks

"""The misuse suite, part 3: the algorithms (see ``misuse.py`` for the table machinery).

The contract for every algorithm: non-finite inputs or products raise
:class:`hessop.NonFiniteError`; a meaningless option raises a ``ValueError`` / ``TypeError``
naming it; an empty operator is refused by name. References are numpy's dense linear
algebra and exact identities (Hutchinson with Rademacher probes is exact on a diagonal
matrix; Hutch++ with a sketch of full rank is exact).
"""

from __future__ import annotations

import numpy as np
import pytest
from misuse import (
    QUAD_H,
    V3,
    close,
    err,
    nat,
    ok,
    only,
    other,
    params,
    quad_op,
    run_case,
)

import hessop
from conftest import to_numpy

E = hessop
EIGS = np.arange(1.0, 7.0)
Q6 = np.linalg.qr(np.random.default_rng(3).standard_normal((6, 6)))[0]
SPD = Q6 @ np.diag(EIGS) @ Q6.T
DIAG = np.diag(EIGS)
ONES = np.ones(6)
NAN_B = np.array([1.0, np.nan, 0.0, 0.0, 0.0, 0.0])
NAN_A = SPD.copy()
NAN_A[2, 2] = np.nan


def numpy_rows(*cases):
    return only(("numpy",), *cases)


# --- cg and inverse_hvp ---------------------------------------------------------------------
SOLVERS = numpy_rows(
    err(
        "cg-b-length",
        lambda b: hessop.cg(SPD, np.ones(5)),
        E.ShapeError,
        r"b must have shape \(6,\) or \(6, k\) to match the operator, got \(5,\)",
    ),
    err(
        "cg-b-complex",
        lambda b: hessop.cg(SPD, ONES * 1j),
        E.DTypeError,
        "b must be a real array, got dtype complex128",
    ),
    err(
        "cg-b-text",
        lambda b: hessop.cg(SPD, np.array(["a"] * 6)),
        E.DTypeError,
        "b must be a real array, got dtype <U1",
    ),
    err(
        "cg-x0-length",
        lambda b: hessop.cg(SPD, ONES, x0=np.ones(4)),
        E.ShapeError,
        r"x0 must have shape \(6,\) or \(6, k\)",
    ),
    err(
        "cg-x0-block-mismatch",
        lambda b: hessop.cg(SPD, np.ones((6, 2)), x0=np.ones((6, 3))),
        ValueError,
        r"x0 has shape \(6, 3\) but b has \(6, 2\)",
    ),
    err(
        "cg-not-square",
        lambda b: hessop.cg(np.ones((3, 4)), np.ones(3)),
        E.ShapeError,
        r"A must be square, got shape \(3, 4\)",
    ),
    err(
        "cg-int-matrix",
        lambda b: hessop.cg(np.eye(3, dtype=int), np.ones(3)),
        E.DTypeError,
        "the matrix has dtype int64",
    ),
    err(
        "plain-callable-no-size",
        lambda b: hessop.trace(lambda v: v, 2),
        E.ShapeError,
        "A is a plain callable, so its size is unknown",
    ),
    err(
        "inverse-method",
        lambda b: hessop.inverse_hvp(SPD, ONES, method="lu"),
        E.UnknownOptionError,
        r"unknown method 'lu'; valid methods are: 'cg', 'neumann'",
    ),
    err(
        "neumann-scale-negative",
        lambda b: hessop.inverse_hvp(SPD, ONES, method="neumann", scale=-1.0),
        ValueError,
        r"scale must be a finite number > 0, got -1\.0",
    ),
    err(
        "neumann-num-terms",
        lambda b: hessop.inverse_hvp(SPD, ONES, method="neumann", num_terms=0),
        ValueError,
        "num_terms must be an integer >= 1, got 0",
    ),
    err(
        "neumann-no-positive-eigenvalue",
        lambda b: hessop.inverse_hvp(-SPD, ONES, method="neumann"),
        ValueError,
        "A \\+ damping I has no positive eigenvalue",
    ),
    ok(
        "cg",
        lambda b: hessop.cg(SPD, ONES, tol=1e-12).x,
        close(np.linalg.solve(SPD, ONES), rtol=1e-9),
    ),
    ok(
        "cg-block",
        lambda b: hessop.cg(SPD, np.eye(6)[:, :2], tol=1e-12).x,
        close(np.linalg.inv(SPD)[:, :2], rtol=1e-9),
    ),
    ok(
        "cg-plain-callable",
        lambda b: hessop.cg(lambda v: SPD @ v, ONES, tol=1e-12).x,
        close(np.linalg.solve(SPD, ONES), rtol=1e-9),
    ),
    ok(  # numpy integers convert exactly to the operator's float64
        "cg-int-rhs",
        lambda b: hessop.cg(SPD, np.arange(6), tol=1e-12).x,
        close(np.linalg.solve(SPD, np.arange(6.0)), rtol=1e-9),
    ),
    ok("cg-zero-rhs", lambda b: hessop.cg(SPD, np.zeros(6)).x, close(np.zeros(6))),
    ok(
        "neumann",
        lambda b: (
            hessop.inverse_hvp(
                SPD, ONES, method="neumann", scale=1 / 7, num_terms=2000, tol=1e-13
            ).x
        ),
        close(np.linalg.solve(SPD, ONES), rtol=1e-9),
    ),
)
SOLVERS += numpy_rows(
    err("cg-b-nan", lambda b: hessop.cg(SPD, NAN_B), E.NonFiniteError, r"(\bb\b|right-hand side)"),
    err(
        "cg-b-inf",
        lambda b: hessop.cg(SPD, ONES * np.inf),
        E.NonFiniteError,
        r"(\bb\b|right-hand side)",
    ),
    err("cg-x0-nan", lambda b: hessop.cg(SPD, ONES, x0=NAN_B), E.NonFiniteError, r"\bx0\b"),
    err("cg-operator-nan", lambda b: hessop.cg(NAN_A, ONES), E.NonFiniteError, "product"),
    err("cg-tol-negative", lambda b: hessop.cg(SPD, ONES, tol=-1.0), ValueError, r"\btol\b"),
    err("cg-tol-nan", lambda b: hessop.cg(SPD, ONES, tol=float("nan")), ValueError, r"\btol\b"),
    err("cg-atol-negative", lambda b: hessop.cg(SPD, ONES, atol=-1.0), ValueError, r"\batol\b"),
    err("cg-maxiter-negative", lambda b: hessop.cg(SPD, ONES, maxiter=-5), ValueError, "maxiter"),
    err(
        "cg-maxiter-float",
        lambda b: hessop.cg(SPD, ONES, maxiter=2.5),
        (TypeError, ValueError),
        "maxiter",
    ),
    err(
        "cg-damping-nan",
        lambda b: hessop.cg(SPD, ONES, damping=float("nan")),
        ValueError,
        "damping",
    ),
    err(
        "cg-preconditioner-shape",
        lambda b: hessop.cg(SPD, ONES, M=np.eye(5)),
        E.ShapeError,
        r"(\bM\b|preconditioner)",
    ),
    err(
        "cg-callback-not-callable",
        lambda b: hessop.cg(SPD, ONES, callback=3),
        TypeError,
        "callback",
    ),
    err(
        "inverse-b-nan",
        lambda b: hessop.inverse_hvp(SPD, NAN_B),
        E.NonFiniteError,
        r"(\bv\b|right-hand side)",
    ),
    err(
        "neumann-scale-nan",
        lambda b: hessop.inverse_hvp(SPD, ONES, method="neumann", scale=float("nan")),
        ValueError,
        r"\bscale\b",
    ),
    err(
        "neumann-damping-nan",
        lambda b: hessop.inverse_hvp(SPD, ONES, method="neumann", damping=float("nan")),
        ValueError,
        "damping",
    ),
)
SOLVERS += [
    err(
        "cg-rhs-other-framework",
        lambda b: hessop.cg(quad_op(b), nat(other(b), V3)),
        TypeError,
        r"b is a (torch|jax) array but the operator is a (torch|jax) operator",
    ),
    ok(
        "cg-native",
        lambda b: hessop.cg(quad_op(b), nat(b, V3), tol=1e-12).x,
        close(np.linalg.solve(QUAD_H, V3), rtol=1e-9),
    ),
    ok(
        "cg-native-numpy-rhs",
        lambda b: hessop.cg(quad_op(b), V3, tol=1e-12).x,
        close(np.linalg.solve(QUAD_H, V3), rtol=1e-9),
    ),
    ok(
        "inverse-hvp-native",
        lambda b: hessop.inverse_hvp(quad_op(b), nat(b, V3), damping=0.5, tol=1e-12).x,
        close(np.linalg.solve(QUAD_H + 0.5 * np.eye(3), V3), rtol=1e-9),
    ),
]


# --- eigenvalues ----------------------------------------------------------------------------
EIGEN = numpy_rows(
    err(
        "lanczos-num-iter-zero",
        lambda b: hessop.lanczos(SPD, 0),
        ValueError,
        "num_iter must be an integer >= 1, got 0",
    ),
    err(
        "lanczos-num-iter-float",
        lambda b: hessop.lanczos(SPD, 2.5),
        TypeError,
        r"num_iter must be an integer >= 1, got 2\.5 \(float\)",
    ),
    err(
        "lanczos-v0-zero",
        lambda b: hessop.lanczos(SPD, 3, v0=np.zeros(6)),
        ValueError,
        "v0 must be a nonzero vector",
    ),
    err(
        "lanczos-v0-length",
        lambda b: hessop.lanczos(SPD, 3, v0=np.ones(5)),
        E.ShapeError,
        r"v0 must have shape \(6,\)",
    ),
    err(
        "eigsh-k-too-large",
        lambda b: hessop.eigsh(SPD, 6),
        ValueError,
        "eigsh needs k < d, got k=6 for a 6x6 operator",
    ),
    err(
        "eigsh-k-zero",
        lambda b: hessop.eigsh(SPD, 0),
        ValueError,
        "k must be an integer >= 1, got 0",
    ),
    err(
        "eigsh-which",
        lambda b: hessop.eigsh(SPD, 1, which="XX"),
        E.UnknownOptionError,
        r"unknown which 'XX'; valid whichs are: 'LA', 'SA', 'LM'",
    ),
    err(
        "eigsh-ncv-too-large",
        lambda b: hessop.eigsh(SPD, 2, ncv=7),
        ValueError,
        "ncv must satisfy k < ncv <= d, got ncv=7",
    ),
    err(
        "eigsh-ncv-too-small",
        lambda b: hessop.eigsh(SPD, 2, ncv=2),
        ValueError,
        "ncv must satisfy k < ncv <= d, got ncv=2",
    ),
    err(
        "eigsh-maxiter-zero",
        lambda b: hessop.eigsh(SPD, 1, maxiter=0),
        ValueError,
        "maxiter must be an integer >= 1, got 0",
    ),
    err(
        "eigsh-v0-zero",
        lambda b: hessop.eigsh(SPD, 1, v0=np.zeros(6)),
        ValueError,
        "v0 must be a nonzero vector",
    ),
    err(
        "power-k-too-large",
        lambda b: hessop.power_iteration(SPD, 6),
        ValueError,
        "power_iteration needs k < d, got k=6",
    ),
    err(
        "power-maxiter-zero",
        lambda b: hessop.power_iteration(SPD, 1, maxiter=0),
        ValueError,
        "maxiter must be an integer >= 1, got 0",
    ),
    ok(
        "lanczos-full",
        lambda b: np.linalg.eigvalsh(hessop.lanczos(SPD, 6).tridiagonal()),
        close(EIGS, rtol=1e-10),
    ),
    ok("eigsh-top-two", lambda b: hessop.eigsh(SPD, 2).eigenvalues, close(EIGS[-2:], rtol=1e-10)),
    ok(
        "eigsh-smallest",
        lambda b: hessop.eigsh(SPD, 1, which="SA").eigenvalues,
        close(EIGS[:1], rtol=1e-10),
    ),
    ok(
        "power",
        lambda b: hessop.power_iteration(DIAG, 1, tol=1e-12, maxiter=5000).eigenvalues,
        close(EIGS[-1:], rtol=1e-8),
    ),
)
EIGEN += numpy_rows(
    err("lanczos-v0-nan", lambda b: hessop.lanczos(SPD, 3, v0=NAN_B), E.NonFiniteError, r"\bv0\b"),
    err("lanczos-operator-nan", lambda b: hessop.lanczos(NAN_A, 3), E.NonFiniteError, "product"),
    err("eigsh-v0-nan", lambda b: hessop.eigsh(SPD, 1, v0=NAN_B), E.NonFiniteError, r"\bv0\b"),
    err("eigsh-operator-nan", lambda b: hessop.eigsh(NAN_A, 1), E.NonFiniteError, "product"),
    err(
        "eigsh-ncv-float",
        lambda b: hessop.eigsh(SPD, 1, ncv=2.5),
        (TypeError, ValueError),
        r"\bncv\b",
    ),
    err("eigsh-tol-negative", lambda b: hessop.eigsh(SPD, 1, tol=-1.0), ValueError, r"\btol\b"),
    err(
        "power-tol-nan",
        lambda b: hessop.power_iteration(SPD, 1, tol=float("nan")),
        ValueError,
        r"\btol\b",
    ),
    err(
        "power-operator-nan",
        lambda b: hessop.power_iteration(NAN_A, 1),
        E.NonFiniteError,
        "product",
    ),
)
EIGEN += [
    ok(
        "lanczos-native",
        lambda b: np.linalg.eigvalsh(to_numpy(hessop.lanczos(quad_op(b), 3).tridiagonal())),
        close(np.linalg.eigvalsh(QUAD_H), rtol=1e-9),
    ),
    ok(
        "eigsh-native",
        lambda b: hessop.eigsh(quad_op(b), 1, ncv=3).eigenvalues,
        close(np.linalg.eigvalsh(QUAD_H)[-1:], rtol=1e-9),
    ),
]


# --- estimators and densities ---------------------------------------------------------------
ESTIMATORS = numpy_rows(
    err(
        "trace-method",
        lambda b: hessop.trace(SPD, 4, method="exact"),
        E.UnknownOptionError,
        r"unknown method 'exact'; valid methods are: 'hutchinson', 'hutch\+\+', 'xtrace'",
    ),
    err(
        "trace-num-matvecs-zero",
        lambda b: hessop.trace(SPD, 0),
        ValueError,
        "num_matvecs must be an integer >= 1, got 0",
    ),
    err(
        "trace-num-matvecs-float",
        lambda b: hessop.trace(SPD, 2.0),
        TypeError,
        r"num_matvecs must be an integer >= 1, got 2\.0 \(float\)",
    ),
    err(
        "trace-distribution",
        lambda b: hessop.trace(SPD, 4, distribution="uniform"),
        E.UnknownOptionError,
        r"unknown distribution 'uniform'; valid distributions are: 'rademacher'",
    ),
    err(
        "hutchpp-too-few",
        lambda b: hessop.trace(SPD, 2, method="hutch++"),
        ValueError,
        r"hutch\+\+ needs num_matvecs >= 3 \(2 probes\), got 2",
    ),
    err(
        "xtrace-odd",
        lambda b: hessop.trace(SPD, 5, method="xtrace"),
        ValueError,
        r"xtrace spends its products in pairs and needs an even num_matvecs >= 4 \(2 probes\), "
        r"got 5; pass 4",
    ),
    err(
        "xtrace-too-many",
        lambda b: hessop.trace(SPD, 12, method="xtrace"),
        ValueError,
        r"trace with 6 probes \(12 products\) needs fewer probes than d=6",
    ),
    err(
        "trace-not-square",
        lambda b: hessop.trace(np.ones((2, 3)), 2),
        E.ShapeError,
        r"A must be square, got shape \(2, 3\)",
    ),
    err(
        "diagonal-method",
        lambda b: hessop.diagonal(SPD, 4, method="hutch++"),
        E.UnknownOptionError,
        r"unknown method 'hutch\+\+'; valid methods are: 'hutchinson', 'xdiag', 'exact'",
    ),
    err(
        "diagonal-exact-count",
        lambda b: hessop.diagonal(SPD, 3, method="exact"),
        ValueError,
        "method='exact' takes exactly d=6 products, got num_matvecs=3",
    ),
    err(
        "diagonal-needs-count",
        lambda b: hessop.diagonal(SPD),
        ValueError,
        "method='hutchinson' needs num_matvecs",
    ),
    err(
        "xdiag-odd",
        lambda b: hessop.diagonal(SPD, 3, method="xdiag"),
        ValueError,
        r"xdiag spends its products in pairs and needs an even num_matvecs >= 4 \(2 probes\), "
        r"got 3",
    ),
    err(
        "xdiag-too-many",
        lambda b: hessop.diagonal(SPD, 12, method="xdiag"),
        ValueError,
        r"diagonal with 6 probes \(12 products\) needs fewer probes than d=6",
    ),
    err(
        "diagonal-distribution",
        lambda b: hessop.diagonal(SPD, 4, distribution="normal"),
        E.UnknownOptionError,
        "unknown distribution 'normal'",
    ),
    err(
        "density-sigma-zero",
        lambda b: hessop.spectral_density(SPD, sigma=0.0, num_iter=3),
        ValueError,
        r"sigma must be a finite number > 0, got 0\.0",
    ),
    err(
        "density-sigma-negative",
        lambda b: hessop.spectral_density(SPD, sigma=-1.0, num_iter=3),
        ValueError,
        r"sigma must be a finite number > 0, got -1\.0",
    ),
    err(
        "density-num-probes",
        lambda b: hessop.spectral_density(SPD, num_probes=0),
        ValueError,
        "num_probes must be an integer >= 1, got 0",
    ),
    err(
        "density-num-iter",
        lambda b: hessop.spectral_density(SPD, num_iter=-1),
        ValueError,
        "num_iter must be an integer >= 1, got -1",
    ),
    err(
        "density-num-points",
        lambda b: hessop.spectral_density(SPD, num_iter=3, num_points=0),
        ValueError,
        "num_points must be an integer >= 2, got 0",
    ),
    err(
        "density-grid-2d",
        lambda b: hessop.spectral_density(SPD, num_iter=3, grid=np.ones((2, 2))),
        ValueError,
        r"grid must be a non-empty 1-D array, got shape \(2, 2\)",
    ),
    ok("hutchinson-diagonal-exact", lambda b: hessop.trace(DIAG, 3).estimate, close(EIGS.sum())),
    ok("hutchinson-diag-exact", lambda b: hessop.diagonal(DIAG, 3).estimate, close(EIGS)),
    ok(
        "hutchpp-full-sketch-exact",
        lambda b: hessop.trace(SPD, 18, method="hutch++").estimate,
        close(EIGS.sum(), rtol=1e-10),
    ),
    ok(
        "diagonal-exact",
        lambda b: hessop.diagonal(SPD, method="exact", chunk_size=4).estimate,
        close(np.diag(SPD)),
    ),
    ok("density-mass", lambda b: density_mass(), close(np.array([1.0, 0.5]), atol=1e-6)),
)
ESTIMATORS += numpy_rows(
    err("trace-operator-nan", lambda b: hessop.trace(NAN_A, 4), E.NonFiniteError, "product"),
    err("diagonal-operator-nan", lambda b: hessop.diagonal(NAN_A, 4), E.NonFiniteError, "product"),
    err("trace-chunk-zero", lambda b: hessop.trace(SPD, 4, chunk_size=0), ValueError, "chunk_size"),
    err(
        "diagonal-chunk-zero",
        lambda b: hessop.diagonal(SPD, method="exact", chunk_size=0),
        ValueError,
        "chunk_size",
    ),
    err(
        "density-sigma-nan",
        lambda b: hessop.spectral_density(SPD, sigma=float("nan"), num_iter=3),
        ValueError,
        r"\bsigma\b",
    ),
    err(
        "density-operator-nan",
        lambda b: hessop.spectral_density(NAN_A, num_iter=3),
        E.NonFiniteError,
        "product",
    ),
    err(
        "density-empty-operator",
        lambda b: hessop.spectral_density(np.zeros((0, 0))),
        E.ShapeError,
        r"A is empty \(shape \(0, 0\)\)",
    ),
    err(
        "cg-empty-operator",
        lambda b: hessop.cg(np.zeros((0, 0)), np.zeros(0)),
        E.ShapeError,
        r"A is empty \(shape \(0, 0\)\)",
    ),
    err(
        "eigsh-empty-operator",
        lambda b: hessop.eigsh(np.zeros((0, 0)), 1),
        E.ShapeError,
        r"A is empty \(shape \(0, 0\)\)",
    ),
)
ESTIMATORS += [
    ok(
        "hutchpp-native-exact",
        lambda b: hessop.trace(quad_op(b), 9, method="hutch++").estimate,
        close(np.trace(QUAD_H), rtol=1e-10),
    ),
    ok(
        "diagonal-native-exact",
        lambda b: hessop.diagonal(quad_op(b), method="exact").estimate,
        close(np.diag(QUAD_H)),
    ),
]


def density_mass():
    """Total mass, and the mass below 3.5 of diag(1..6) (half its eigenvalues)."""
    res = hessop.spectral_density(DIAG, num_probes=4, num_iter=6, sigma=0.05)
    g, p = np.asarray(res.grid), np.asarray(res.density)
    dx = g[1] - g[0]
    return np.array([p.sum() * dx, p[g < 3.5].sum() * dx])


#: algorithm kernels compile in JAX for seconds each; test_cg.py, test_eig.py, ... already
#: run every algorithm on JAX operators, so these native rows run in torch only
JAX_ALREADY_COVERED = {
    "lanczos-native",
    "eigsh-native",
    "hutchpp-native-exact",
    "diagonal-native-exact",
}
CASES = [
    only(("torch",), c)[0] if c.id in JAX_ALREADY_COVERED else c
    for c in SOLVERS + EIGEN + ESTIMATORS
]


@pytest.mark.parametrize("case, backend", params(CASES))
def test_misuse(case, backend):
    run_case(case, backend)

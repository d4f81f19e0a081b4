"""Plumbing shared by the algorithms: operator coercion, seeded random probes, progress.

Every algorithm is written once against the array API: ``A.xp`` is the namespace of the
operator's framework, so the same code runs on numpy, torch and JAX arrays and keeps them on
the operator's device. Small dense problems (a tridiagonal eigendecomposition, a k x k
Rayleigh-Ritz) are solved with numpy on the host, which is cheap and identical everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._errors import ShapeError, unknown
from .._operator import CallableOperator, LinearOperator, aslinearoperator
from ..backends import get_backend, infer_backend

DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")


def as_operator(A: Any, like: Any = None, what: str = "A") -> LinearOperator:
    """Coerce ``A`` to a square :class:`LinearOperator`.

    A plain callable is accepted when ``like`` (a vector of the right size and framework)
    tells its shape; it is then taken to be symmetric, as every algorithm here assumes.
    """
    if callable(A) and not isinstance(A, LinearOperator) and not hasattr(A, "shape"):
        if like is None:
            raise ShapeError(
                f"{what} is a plain callable, so its size is unknown; wrap it first with "
                "hessop.aslinearoperator(f, shape=(d, d), backend=..., symmetric=True)"
            )
        bk = get_backend(like) if infer_backend(like) is not None else get_backend("numpy")
        n = int(like.shape[0])
        dtype = like.dtype if bk.is_floating(like.dtype) else "float64"
        return CallableOperator(A, (n, n), dtype, bk, bk.device_of(like), symmetric=True)
    op = aslinearoperator(A)
    if op.shape[0] != op.shape[1]:
        raise ShapeError(f"{what} must be square, got shape {op.shape}")
    return op


def as_native(A: LinearOperator, x: Any, what: str, ndims: tuple[int, ...] = (1,)) -> Any:
    """``x`` as an array of ``A``'s framework, dtype and device; numpy input is converted."""
    bk = A._bk
    if not bk.owns(x):
        name = infer_backend(x)
        if name not in (None, "numpy") and name != A.backend:
            raise TypeError(
                f"{what} is a {name} array but the operator is a {A.backend} operator; "
                f"pass a {A.backend} (or numpy) array"
            )
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{what} must be a real array, got dtype {x.dtype}")
        x = bk.asarray(x.astype(np.float64), dtype=A.dtype, device=A.device)
    else:
        bk.check_floating(x.dtype, what)
        bk.check_device(x, A.device, what)
        if x.dtype != A.dtype:
            x = A.xp.astype(x, A.dtype)
    shape = tuple(x.shape)
    if len(shape) not in ndims or shape[0] != A.shape[0]:
        want = " or ".join(f"({A.shape[0]},)" if k == 1 else f"({A.shape[0]}, k)" for k in ndims)
        raise ShapeError(f"{what} must have shape {want} to match the operator, got {shape}")
    return x


def from_numpy(A: LinearOperator, x: Any, dtype: Any = None) -> Any:
    """A numpy array (or scalar) as an array of ``A``'s framework on its device."""
    return A._bk.asarray(np.asarray(x), dtype=A.dtype if dtype is None else dtype, device=A.device)


def to_numpy(A: LinearOperator, x: Any) -> np.ndarray:
    """An array of ``A``'s framework as a (detached, host) numpy array."""
    return A._bk.to_numpy(x)


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise unknown("distribution", distribution, DISTRIBUTIONS)
    return distribution


def random_probes(
    rng: np.random.Generator, d: int, k: int, distribution: str = "rademacher"
) -> np.ndarray:
    """``k`` random probe vectors in R^d as a float64 numpy ``(d, k)`` array with E zz^T = I.

    Drawn on the host with numpy so every framework sees the same numbers for a seed.
    """
    check_distribution(distribution)
    if distribution == "rademacher":
        return rng.integers(0, 2, size=(d, k)).astype(np.float64) * 2.0 - 1.0
    Z = rng.standard_normal((d, k))
    if distribution == "sphere":
        Z *= math.sqrt(d) / np.linalg.norm(Z, axis=0, keepdims=True)
    return Z


def new_rng(seed: Any) -> np.random.Generator:
    """A private generator: never reads or advances any global RNG state."""
    return np.random.default_rng(seed)


def apply(A: LinearOperator, V: Any) -> Any:
    """``A @ V`` for a ``(d, k)`` block: one ``matmat``; a single ``matvec`` when k == 1."""
    if V.shape[1] == 1:
        return A.xp.reshape(A.matvec(V[:, 0]), (-1, 1))
    return A.matmat(V)


def apply_chunked(A: LinearOperator, V: Any, chunk_size: int | None) -> Any:
    """``A @ V`` in column blocks of ``chunk_size`` (all at once when None)."""
    k = V.shape[1]
    if chunk_size is None or chunk_size >= k:
        return apply(A, V)
    step = max(1, int(chunk_size))
    return A.xp.concat([apply(A, V[:, j : j + step]) for j in range(0, k, step)], axis=1)


def column_norms(xp: Any, V: Any) -> Any:
    return xp.sqrt(xp.sum(V * V, axis=0))


def positive_int(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar when ``enabled`` (tqdm imported lazily), else a no-op with the same API."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def kernel(A: LinearOperator, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(xp, *arrays)`` bound to ``A``'s namespace (see :meth:`LinearOperator.kernel`)."""
    return A.kernel(fn)


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


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
    Rn = to_numpy(A, R).astype(np.float64)
    m = Rn.shape[1]
    rtol = math.sqrt(float(np.finfo(A._bk.dtype_name(A.dtype)).eps))
    sv = np.linalg.svd(Rn, compute_uv=False)
    if sv.size and sv[-1] > rtol * sv[0]:
        S = xp.linalg.inv(R).T
        return "vector", S / xp.sqrt(xp.sum(S * S, axis=0))[None, :]
    blocks = []
    for i in range(m):
        U, s, _ = np.linalg.svd(np.delete(Rn, i, axis=1), full_matrices=True)
        rank = int(np.sum(s > rtol * max(sv[0], np.finfo(float).tiny)))
        blocks.append(from_numpy(A, U[:, rank:]))
    return "blocks", blocks

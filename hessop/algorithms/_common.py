"""Plumbing shared by the algorithms: operator coercion, input checks, seeded probes, progress.

Every algorithm is written once against the array API and the public
:class:`~hessop.LinearOperator` interface (``A.xp``, ``A.asarray``, ``A.to_numpy``,
``A.zeros``, ``A.eps``, ``A.kernel``), so the same code runs on numpy, torch and JAX arrays
and keeps them on the operator's device. Small dense problems (a tridiagonal
eigendecomposition, a k x k Rayleigh-Ritz) are solved with numpy on the host, which is cheap
and identical everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import array_api_compat
import numpy as np

from .. import _checks
from .._errors import DeviceError, DTypeError, NonFiniteError, ShapeError, unknown
from .._operator import LinearOperator, aslinearoperator

DISTRIBUTIONS = ("rademacher", "sparse-rademacher", "gaussian", "sphere")

#: what to do about a non-finite product, appended to every such error
_PRODUCT_HINT = (
    "A Hessian of a loss that is finite at its point has finite products: check that the "
    "loss, the parameters and the data are finite there (a diverged optimizer step leaves "
    "NaN parameters), or the operator's own code"
)


# --- operators and their arrays --------------------------------------------------------------
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
        if _namespace(like) is None:  # numpy, a list: a float64 numpy operator
            like = np.asarray(like, dtype=np.float64)
        # A (n, 1) dense operator tells the framework, dtype and device of `like`.
        probe = aslinearoperator(array_api_compat.array_namespace(like).reshape(like, (-1, 1)))
        n = probe.shape[0]
        return aslinearoperator(
            A,
            shape=(n, n),
            dtype=probe.dtype,
            backend=probe.backend,
            device=probe.device,
            symmetric=True,
        )
    op = aslinearoperator(A)
    if op.shape[0] != op.shape[1]:
        raise ShapeError(f"{what} must be square, got shape {op.shape}")
    if op.shape[0] == 0:  # Krylov methods and sketches divide by norms of empty vectors
        raise ShapeError(f"{what} is empty (shape {op.shape}): there is nothing to compute")
    return op


def _namespace(x: Any) -> Any:
    """The array namespace of a framework array, None for numpy arrays and non-arrays."""
    if isinstance(x, (np.ndarray, np.generic)):
        return None
    try:
        return array_api_compat.array_namespace(x)
    except TypeError:
        return None


def as_native(A: LinearOperator, x: Any, what: str, ndims: tuple[int, ...] = (1,)) -> Any:
    """``x`` as an array of ``A``'s framework, dtype and device; numpy input is converted.

    Refuses an array of another framework, a complex or non-numeric dtype, a native array on
    another device, and a shape whose first axis is not the operator's size.
    """
    ns = _namespace(x)
    if ns is None:
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise DTypeError(f"{what} must be a real array, got dtype {x.dtype}")
        x = A.asarray(x.astype(np.float64))
    elif ns is not A.xp:
        name = ns.__name__.replace("array_api_compat.", "").split(".")[0]
        raise TypeError(
            f"{what} is a {name} array but the operator is a {A.backend} operator; "
            f"pass a {A.backend} (or numpy) array"
        )
    else:
        if not A.xp.isdtype(x.dtype, "real floating"):
            raise DTypeError(
                f"{what} has dtype {x.dtype}; pass a real floating-point array "
                f"(it is converted to the operator's {A.dtype})"
            )
        _check_device(A, x, what)
        x = A.asarray(x)
    shape = tuple(x.shape)
    if len(shape) not in ndims or shape[0] != A.shape[0]:
        want = " or ".join(f"({A.shape[0]},)" if k == 1 else f"({A.shape[0]}, k)" for k in ndims)
        raise ShapeError(f"{what} must have shape {want} to match the operator, got {shape}")
    return x


def _check_device(A: LinearOperator, x: Any, what: str) -> None:
    have, want = array_api_compat.device(x), A.device
    if want is None or have == want:
        return
    # A data-parallel operator lives on several devices (a sharding with a device_set).
    if have in getattr(want, "device_set", ()):
        return
    raise DeviceError(
        f"{what} is on device {have} but the operator is on {want}; move it there first"
    )


def host(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Any framework's array (or a sequence) as a numpy array, float64 unless ``dtype`` is
    None: for values that come with no operator to ask."""
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, RuntimeError):
        if _namespace(x) is None:
            raise
    # on an accelerator, or a tensor that records gradients (duck-typed)
    x = array_api_compat.to_device(x, "cpu")
    return np.asarray(x.detach() if hasattr(x, "detach") else x, dtype=dtype)


def to_host(A: LinearOperator, x: Any) -> np.ndarray:
    """An array of ``A``'s framework as a float64 numpy array."""
    return np.asarray(A.to_numpy(x), dtype=np.float64)


# --- finiteness ------------------------------------------------------------------------------
def all_finite(A: LinearOperator, x: Any) -> bool:
    """Whether ``x`` holds only finite numbers.

    One sum first: a NaN or an infinity anywhere makes it non-finite, so a finite sum
    settles it in one read (torch's elementwise ``isfinite`` is ~15x slower on a CPU: 50 ms
    for a 269k x 30 block); the elementwise test runs only when the sum is not finite, to
    tell an overflowing sum of finite numbers from a NaN or an infinity.
    """
    xp = A.xp
    return bool(A.to_numpy(xp.isfinite(xp.sum(x)))) or bool(A.to_numpy(xp.all(xp.isfinite(x))))


def check_finite_input(A: LinearOperator, x: Any, algo: str, what: str) -> Any:
    """Raise :class:`NonFiniteError` when the input ``x`` holds NaN or infinity."""
    if not all_finite(A, x):
        raise NonFiniteError(
            f"{algo}: {what} holds NaN or infinity; pass finite values "
            "(hessop does not guess what a non-finite input means)"
        )
    return x


def nonfinite_product(algo: str, where: str) -> NonFiniteError:
    """The error for a product (or a value computed from products) that is not finite."""
    return NonFiniteError(
        f"{algo}: the operator's product {where} is NaN or infinite, so no result can be "
        f"trusted. {_PRODUCT_HINT}"
    )


def check_finite_values(values: Any, algo: str, where: str) -> None:
    """Raise when host values read from products (norms, coefficients) are not finite."""
    if not np.all(np.isfinite(values)):
        raise nonfinite_product(algo, where)


# --- options -----------------------------------------------------------------------------------
def choice(value: Any, name: str, valid: tuple[str, ...]) -> str:
    """``value`` if it is one of ``valid``, else the error that lists them."""
    if not isinstance(value, str) or value not in valid:
        raise unknown(name, value, valid)
    return value


def chunk_option(value: Any) -> int | None:
    return _checks.optional_integer(value, "chunk_size", minimum=1)


# --- randomness ------------------------------------------------------------------------------
def new_rng(seed: Any) -> np.random.Generator:
    """A private generator: never reads or advances any global RNG state."""
    return np.random.default_rng(seed)


def random_probes(
    rng: np.random.Generator,
    d: int,
    k: int,
    distribution: str = "rademacher",
    density: float = 1.0,
) -> np.ndarray:
    """``k`` random probe vectors in R^d as a numpy ``(d, k)`` array with E zz^T = I.

    Drawn on the host with numpy so every framework sees the same numbers for a seed.
    Rademacher signs are int8 (exact in every dtype, converted once by the operator's
    ``asarray``), one random bit each, drawn probe after probe so that each probe (column)
    is contiguous: the draw and the operator's per-column products read memory in order
    (on a 269k x 30 block: 170 ms -> 15 ms, against 30 products of 13 ms).
    ``"sparse-rademacher"`` entries are ``+-1/sqrt(density)`` with probability
    ``density / 2`` each and 0 otherwise: the rescaling keeps E zz^T = I; the other
    distributions are float64.
    """
    if distribution == "rademacher":
        bits = np.frombuffer(rng.bytes((d * k + 7) // 8), dtype=np.uint8)
        signs = np.unpackbits(bits, count=d * k).view(np.int8).reshape(k, d)
        signs *= 2
        signs -= 1
        return signs.T
    if distribution == "sparse-rademacher":
        u = rng.random((d, k))
        half = density / 2.0
        signs = np.where(u < half, 1.0, np.where(u < density, -1.0, 0.0))
        return signs / math.sqrt(density)
    Z = rng.standard_normal((d, k))
    if distribution == "sphere":
        Z *= math.sqrt(d) / np.linalg.norm(Z, axis=0, keepdims=True)
    return Z


# --- products ----------------------------------------------------------------------------------
def apply(A: LinearOperator, V: Any) -> Any:
    """``A @ V`` for a ``(d, k)`` block: one ``matmat``; a single ``matvec`` when k == 1."""
    if V.shape[1] == 1:
        return A.xp.reshape(A.matvec(V[:, 0]), (-1, 1))
    return A.matmat(V)


def apply_chunked(
    A: LinearOperator, V: Any, chunk_size: int | None, algo: str = "", transpose: bool = False
) -> Any:
    """``A @ V`` (``A^T @ V`` with ``transpose`` on a non-symmetric A) in column blocks of
    ``chunk_size`` (all at once when None), checked finite when ``algo`` names the caller."""
    k = V.shape[1]
    step = k if chunk_size is None else chunk_size

    def one(W: Any) -> Any:
        return A.rmatmat(W) if transpose and not A.symmetric else apply(A, W)

    parts = [one(V[:, j : j + step]) for j in range(0, k, step)]
    Y = parts[0] if len(parts) == 1 else A.xp.concat(parts, axis=1)
    if algo and not all_finite(A, Y):
        raise nonfinite_product(algo, "with its probe vectors")
    return Y


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar when ``enabled`` (tqdm imported lazily), else a no-op with the same API."""
    if not _checks.flag(enabled, "progress"):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def iter_chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)

"""Matrix-free linear operators over numpy, torch or JAX arrays.

:class:`LinearOperator` owns everything that is not the product itself: input checks
(shape, dtype, framework, device), ``@`` from both sides, the transpose, sums, scalar
multiples, composition, and conversion to scipy and to a dense matrix. A concrete operator
implements ``_matvec`` (and ``_matmat`` when it can batch, ``_rmatvec`` when it is not
symmetric).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _checks
from ._errors import DeviceError, DTypeError, ShapeError
from .backends import Backend, get_backend, infer_backend


class LinearOperator:
    """A linear map ``R^m -> R^n`` given by its products with vectors.

    Parameters
    ----------
    shape : tuple of int
        ``(n, m)``.
    dtype :
        The native dtype of the operator's vectors.
    backend : str or Backend
        The framework of the vectors: ``"numpy"``, ``"torch"`` or ``"jax"``.
    device :
        The native device the vectors live on (None for numpy).
    symmetric : bool
        Whether the operator equals its transpose (then ``rmatvec`` is ``matvec``).

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = hessop.aslinearoperator(np.array([[2.0, 1.0], [1.0, 3.0]]))
    >>> A @ np.array([1.0, 0.0])
    array([2., 1.])
    >>> B = 2 * A - A.T
    >>> (B @ A).to_dense()
    array([[ 5.,  5.],
           [ 5., 10.]])
    """

    # numpy defers ``ndarray @ op`` to ``op.__rmatmul__`` instead of broadcasting.
    __array_ufunc__ = None

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: Any,
        backend: str | Backend,
        device: Any = None,
        symmetric: bool = False,
    ) -> None:
        self._bk = get_backend(backend)
        self.shape = _check_shape(shape)
        self.dtype = native_dtype(self._bk, dtype, "the operator's dtype")
        self.device = device
        self.symmetric = _checks.flag(symmetric, "symmetric")

    # --- what subclasses implement --------------------------------------------------------
    def _matvec(self, v: Any) -> Any:
        raise NotImplementedError

    def _matmat(self, V: Any) -> Any:
        xp = self.xp
        return xp.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], axis=1)

    def _rmatvec(self, v: Any) -> Any:
        if self.symmetric:
            return self._matvec(v)
        raise NotImplementedError(
            f"{type(self).__name__} does not implement rmatvec (needed by A.T and v @ A); "
            "give one (hessop.CallableOperator(..., rmatvec=...)), or declare "
            "symmetric=True if the operator is symmetric"
        )

    def _rmatmat(self, V: Any) -> Any:
        if self.symmetric:
            return self._matmat(V)
        xp = self.xp
        return xp.stack([self._rmatvec(V[:, j]) for j in range(V.shape[1])], axis=1)

    # --- public products ------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The name of the operator's framework: ``"numpy"``, ``"torch"`` or ``"jax"``."""
        return self._bk.name

    @property
    def xp(self) -> Any:
        """The array-API namespace of the operator's arrays."""
        return self._bk.xp

    def matvec(self, v: Any) -> Any:
        """Return ``A v`` for a vector ``v`` of shape ``(m,)``."""
        return self._matvec(self._check(v, 1, self.shape[1], "matvec"))

    def rmatvec(self, v: Any) -> Any:
        """Return ``A^T v`` for a vector ``v`` of shape ``(n,)``."""
        return self._rmatvec(self._check(v, 1, self.shape[0], "rmatvec"))

    def matmat(self, V: Any) -> Any:
        """Return ``A V`` for a matrix ``V`` of shape ``(m, k)``, as one batched product."""
        V = self._check(V, 2, self.shape[1], "matmat")
        return self._matmat(V) if V.shape[1] else self.zeros((self.shape[0], 0))

    def rmatmat(self, V: Any) -> Any:
        """Return ``A^T V`` for a matrix ``V`` of shape ``(n, k)``."""
        V = self._check(V, 2, self.shape[0], "rmatmat")
        return self._rmatmat(V) if V.shape[1] else self.zeros((self.shape[1], 0))

    def __matmul__(self, x: Any) -> Any:
        if isinstance(x, LinearOperator):
            return ProductOperator(self, x)
        ndim = len(getattr(x, "shape", ()))
        return self.matmat(x) if ndim == 2 else self.matvec(x)

    def __rmatmul__(self, x: Any) -> Any:
        # x @ A == (A^T x^T)^T: a row vector, or k rows stacked as (k, n).
        if isinstance(x, LinearOperator):
            return ProductOperator(x, self)
        ndim = len(getattr(x, "shape", ()))
        if ndim == 2:
            return self.xp.permute_dims(self.rmatmat(self.xp.permute_dims(x, (1, 0))), (1, 0))
        return self.rmatvec(x)

    def __call__(self, v: Any) -> Any:
        return self @ v

    # --- arrays of the operator's framework (what algorithms need besides products) -------
    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` (numpy, a Python scalar or sequence, or an array of this framework) as an
        array of the operator's framework on its device, in ``dtype`` (default the
        operator's).

        Examples
        --------
        >>> import numpy as np, hessop
        >>> A = hessop.aslinearoperator(np.eye(2))
        >>> A.asarray([1, 2])
        array([1., 2.])
        """
        bk = self._bk
        if not bk.owns(x):
            name = infer_backend(x)
            if name not in (None, "numpy"):
                raise TypeError(
                    f"got a {name} array for a {self.backend} operator; pass a "
                    f"{self.backend} (or numpy) array"
                )
            x = np.asarray(x)
            kind = x.dtype.kind
        else:
            kind = "c" if "complex" in bk.dtype_name(x.dtype) else "f"
        if kind not in "biuf":  # a cast would drop imaginary parts or fail on text
            raise DTypeError(
                f"got an array of dtype {x.dtype}; hessop works on real numbers (the cast "
                f"to {bk.dtype_name(self.dtype)} would lose information): pass a real array"
            )
        native = self.dtype if dtype is None else bk.dtype(dtype)
        return bk.asarray(x, dtype=native, device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        """An array of the operator's framework as a numpy array on the host (detached)."""
        return self._bk.to_numpy(x)

    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        """Zeros of ``shape`` in the operator's framework, dtype (by default) and device."""
        native = self.dtype if dtype is None else self._bk.dtype(dtype)
        return self.xp.zeros(shape, dtype=native, **self._device_kw())

    @property
    def eps(self) -> float:
        """The machine epsilon of the operator's dtype.

        >>> import numpy as np, hessop
        >>> hessop.aslinearoperator(np.eye(2, dtype=np.float32)).eps
        1.1920928955078125e-07
        """
        return self._bk.eps(self.dtype)

    def kernel(self, fn: Callable[..., Any], donate: tuple[int, ...] = ()) -> Callable[..., Any]:
        """``fn(xp, *arrays)`` bound to this operator's array namespace, compiled once by
        the framework where that pays (``jax.jit`` in JAX; eager elsewhere): the loop
        bodies of iterative algorithms, written once against the array API. A kernel must
        see arrays of fixed shapes only. ``donate``: positions of arrays the caller hands
        over (a compiled kernel may write its results into their memory).
        """
        return self._bk.jit(fn, self.device, donate)

    # --- algebra --------------------------------------------------------------------------
    @property
    def T(self) -> LinearOperator:
        """The transpose ``A^T`` (the operator itself when symmetric)."""
        return self if self.symmetric else TransposedOperator(self)

    def __add__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return _no_scalar_sum(other, "for A + c*I use A.damped(c)")
        return SumOperator(self, other)

    __radd__ = __add__

    def __sub__(self, other: Any) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return _no_scalar_sum(other, "for A - c*I use A.damped(-c)")
        return SumOperator(self, ScaledOperator(other, -1.0))

    def __rsub__(self, other: Any) -> LinearOperator:
        return _no_scalar_sum(other, "for c*I - A use (-A).damped(c)")

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def __mul__(self, alpha: Any) -> LinearOperator:
        if not _is_scalar(alpha):
            return NotImplemented
        return ScaledOperator(self, _checks.real(alpha, "the factor of an operator"))

    __rmul__ = __mul__

    def __truediv__(self, alpha: Any) -> LinearOperator:
        if not _is_scalar(alpha):
            return NotImplemented
        alpha = _checks.real(alpha, "the divisor of an operator")
        if alpha == 0.0:
            raise ValueError("cannot divide an operator by 0")
        return ScaledOperator(self, 1.0 / alpha)

    def damped(self, damping: float) -> LinearOperator:
        """Return ``A + damping * I`` (Levenberg-Marquardt / Tikhonov damping).

        Examples
        --------
        >>> import numpy as np, hessop
        >>> A = hessop.aslinearoperator(np.diag([1.0, 2.0]))
        >>> A.damped(0.5) @ np.ones(2)
        array([1.5, 2.5])
        """
        return self + _checks.real(damping, "damping") * IdentityOperator.like(self)

    # --- conversion -----------------------------------------------------------------------
    def to_dense(self, chunk_size: int | None = None) -> Any:
        """Materialize the ``(n, m)`` matrix, ``chunk_size`` columns per batched product.

        Costs ``m`` matrix-vector products: meant for small operators and tests.
        """
        chunk_size = _checks.optional_integer(chunk_size, "chunk_size", minimum=1)
        m = self.shape[1]
        eye = self.xp.eye(m, dtype=self.dtype, **self._device_kw())
        step = m if chunk_size is None else chunk_size
        blocks = [self._matmat(eye[:, j : j + step]) for j in range(0, m, step)]
        return blocks[0] if len(blocks) == 1 else self.xp.concat(blocks, axis=1)

    def to_scipy(self) -> Any:
        """Wrap as a :class:`scipy.sparse.linalg.LinearOperator` (numpy in, numpy out).

        While a torch or JAX product runs, numpy's and scipy's BLAS are held to one thread
        (threadpoolctl); scipy's own BLAS calls between products keep their threads. On a
        CPU that is not enough: after those calls (ARPACK's Gram-Schmidt) OpenBLAS's
        workers poll for work for up to ~0.1 s and take cores from the product (two
        cores, torch's two threads: 58 ms a product inside ``scipy.sparse.linalg.eigsh``,
        9.4 ms outside). Hold scipy's BLAS to one thread for the whole call instead:
        ``with threadpoolctl.threadpool_limits(1, user_api="blas"): spla.eigsh(L, ...)``
        took 0.85 s where the plain call took 4.65 s (:func:`hessop.eigsh`: 0.69 s).

        Examples
        --------
        >>> import numpy as np, hessop, scipy.sparse.linalg as spla
        >>> A = hessop.aslinearoperator(np.diag([1.0, 2.0, 3.0]))
        >>> round(float(spla.eigsh(A.to_scipy(), k=1)[0][0]), 8)  # ARPACK: random start
        3.0
        """
        import scipy.sparse.linalg as spla

        bk, dev = self._bk, self.device
        limit = None  # numpy's and scipy's BLAS (not a framework's own), for other frameworks
        if self.backend != "numpy":  # a numpy operator's products are numpy's BLAS
            try:
                import scipy.linalg  # noqa: F401 - loads scipy's BLAS, which ARPACK uses
                from threadpoolctl import ThreadpoolController
            except ImportError:  # pragma: no cover - threadpoolctl is a dependency
                ThreadpoolController = None  # noqa: N806
            if ThreadpoolController is not None:
                limit = ThreadpoolController().select(user_api="blas")
                limit.lib_controllers = [
                    lib
                    for lib in limit.lib_controllers
                    if "numpy" in lib.filepath or "scipy" in lib.filepath
                ]
                limit = limit if limit.lib_controllers else None

        def wrap(fn: Callable[[Any], Any]) -> Callable[[np.ndarray], np.ndarray]:
            def apply(x: np.ndarray) -> np.ndarray:
                x = np.asarray(x)
                if np.iscomplexobj(x):  # scipy probes with complex vectors in some solvers
                    return wrap(fn)(x.real) + 1j * wrap(fn)(x.imag)
                if fn in (self.matvec, self.rmatvec):  # scipy also passes (n, 1) columns
                    x = x.reshape(-1)
                if limit is None:
                    return bk.to_numpy(fn(bk.asarray(x, dtype=self.dtype, device=dev)))
                with limit.limit(limits=1):
                    y = fn(bk.asarray(x, dtype=self.dtype, device=dev))
                    return bk.to_numpy(y)

            return apply

        return spla.LinearOperator(
            self.shape,
            matvec=wrap(self.matvec),
            rmatvec=wrap(self.rmatvec),
            matmat=wrap(self.matmat),
            rmatmat=wrap(self.rmatmat),
            dtype=np.dtype(self._bk.dtype_name(self.dtype)),
        )

    # --- helpers --------------------------------------------------------------------------
    def _device_kw(self) -> dict[str, Any]:
        return {} if self.backend == "numpy" else {"device": self.device}

    def _check(self, v: Any, ndim: int, n: int, what: str) -> Any:
        bk = self._bk
        if not bk.owns(v):
            got = type(v).__module__.split(".")[0] + "." + type(v).__name__
            hint = (
                "use A.to_scipy() for numpy in and out"
                if self.backend != "numpy"
                else "convert it with numpy.asarray"
            )
            raise TypeError(
                f"{what} of a {self.backend} operator needs a {self.backend} array, got {got}; "
                f"convert it first ({hint})"
            )
        shape = tuple(v.shape)
        if len(shape) != ndim or shape[0] != n:
            want = f"({n},)" if ndim == 1 else f"({n}, k)"
            raise ShapeError(
                f"{what} expects an array of shape {want}, got {shape}"
                + (
                    "; turn a params-shaped pytree into a flat vector with H.ravel(tree)"
                    if hasattr(self, "ravel")
                    else ""
                )
            )
        bk.check_floating(v.dtype, f"the input of {what}")
        bk.check_device(v, self.device, f"the input of {what}")
        if v.dtype != self.dtype:
            v = self.xp.astype(v, self.dtype)
        return v

    def _check_compatible(self, other: LinearOperator, how: str) -> None:
        if other.backend != self.backend:
            raise TypeError(
                f"cannot {how} a {self.backend} operator and a {other.backend} operator; "
                "build both in one framework"
            )
        if self.device != other.device:
            raise DeviceError(
                f"cannot {how} operators on devices {self.device} and {other.device}; "
                "build both on one device"
            )

    def __repr__(self) -> str:
        n, m = self.shape
        return (
            f"<{type(self).__name__} {n}x{m} {self._bk.dtype_name(self.dtype)} "
            f"backend={self.backend!r} device={self.device}>"
        )


def _is_scalar(x: Any) -> bool:
    return isinstance(x, numbers.Real) or (getattr(x, "shape", None) == () and hasattr(x, "dtype"))


def _no_scalar_sum(other: Any, fix: str) -> Any:
    if not _is_scalar(other):
        return NotImplemented
    raise TypeError(f"cannot add a number to an operator (a number is not an operator); {fix}")


def _check_shape(shape: Any) -> tuple[int, int]:
    """``shape`` as a pair of non-negative ints; a :class:`ShapeError` otherwise."""
    ok = isinstance(shape, (tuple, list)) and len(shape) == 2
    ok = ok and all(_checks.is_int(n) and n >= 0 for n in shape)
    if not ok:
        raise ShapeError(f"shape must be a pair (n, m) of integers >= 0, got {shape!r}")
    return int(shape[0]), int(shape[1])


def native_dtype(bk: Backend, dtype: Any, what: str) -> Any:
    """``dtype`` (a name, numpy or native dtype) as ``bk``'s real floating dtype; a
    :class:`DTypeError` naming ``what`` otherwise."""
    try:
        native = bk.dtype(dtype)
    except DTypeError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        raise DTypeError(
            f"{what} {dtype!r} is not a dtype {bk.name} knows ({err}); pass 'float32' or 'float64'"
        ) from None
    bk.check_floating(native, what)
    return native


class _Derived(LinearOperator):
    """An operator built from others: inherits backend, dtype and device."""

    def __init__(self, like: LinearOperator, shape: tuple[int, int], symmetric: bool) -> None:
        super().__init__(shape, like.dtype, like._bk, like.device, symmetric)


class TransposedOperator(_Derived):
    """``A^T`` for an operator that implements ``rmatvec``."""

    def __init__(self, A: LinearOperator) -> None:
        super().__init__(A, (A.shape[1], A.shape[0]), A.symmetric)
        self.A = A

    def _matvec(self, v: Any) -> Any:
        return self.A._rmatvec(v)

    def _matmat(self, V: Any) -> Any:
        return self.A._rmatmat(V)

    def _rmatvec(self, v: Any) -> Any:
        return self.A._matvec(v)

    def _rmatmat(self, V: Any) -> Any:
        return self.A._matmat(V)

    @property
    def T(self) -> LinearOperator:
        return self.A


class ScaledOperator(_Derived):
    """``alpha * A``."""

    def __init__(self, A: LinearOperator, alpha: float) -> None:
        super().__init__(A, A.shape, A.symmetric)
        self.A, self.alpha = A, alpha

    def _matvec(self, v: Any) -> Any:
        return self.alpha * self.A._matvec(v)

    def _matmat(self, V: Any) -> Any:
        return self.alpha * self.A._matmat(V)

    def _rmatvec(self, v: Any) -> Any:
        return self.alpha * self.A._rmatvec(v)

    def _rmatmat(self, V: Any) -> Any:
        return self.alpha * self.A._rmatmat(V)


class SumOperator(_Derived):
    """``A + B``."""

    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        A._check_compatible(B, "add")
        if A.shape != B.shape:
            raise ShapeError(f"cannot add operators of shapes {A.shape} and {B.shape}")
        super().__init__(A, A.shape, A.symmetric and B.symmetric)
        self.A, self.B = A, B

    def _matvec(self, v: Any) -> Any:
        return self.A._matvec(v) + self.B._matvec(v)

    def _matmat(self, V: Any) -> Any:
        return self.A._matmat(V) + self.B._matmat(V)

    def _rmatvec(self, v: Any) -> Any:
        return self.A._rmatvec(v) + self.B._rmatvec(v)

    def _rmatmat(self, V: Any) -> Any:
        return self.A._rmatmat(V) + self.B._rmatmat(V)


class ProductOperator(_Derived):
    """``A @ B``, applied lazily as ``A (B v)``."""

    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        A._check_compatible(B, "compose")
        if A.shape[1] != B.shape[0]:
            raise ShapeError(f"cannot compose operators of shapes {A.shape} and {B.shape}")
        super().__init__(A, (A.shape[0], B.shape[1]), False)
        self.A, self.B = A, B

    def _matvec(self, v: Any) -> Any:
        return self.A._matvec(self.B._matvec(v))

    def _matmat(self, V: Any) -> Any:
        return self.A._matmat(self.B._matmat(V))

    def _rmatvec(self, v: Any) -> Any:
        return self.B._rmatvec(self.A._rmatvec(v))

    def _rmatmat(self, V: Any) -> Any:
        return self.B._rmatmat(self.A._rmatmat(V))


class IdentityOperator(LinearOperator):
    """The identity ``I`` of size ``n``.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> I = hessop.IdentityOperator(3, dtype="float64")
    >>> I @ np.arange(3.0)
    array([0., 1., 2.])
    """

    def __init__(
        self, n: int, dtype: Any = "float64", backend: str | Backend = "numpy", device: Any = None
    ) -> None:
        super().__init__((n, n), dtype, backend, device, symmetric=True)

    @classmethod
    def like(cls, A: LinearOperator) -> IdentityOperator:
        """The identity with the size, dtype, framework and device of ``A``."""
        return cls(A.shape[0], A.dtype, A._bk, A.device)

    def _matvec(self, v: Any) -> Any:
        return v

    def _matmat(self, V: Any) -> Any:
        return V


class DenseOperator(LinearOperator):
    """An explicit matrix of any framework, as an operator in that framework.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = hessop.DenseOperator(np.array([[1.0, 2.0], [0.0, 1.0]]))
    >>> A.symmetric, A.T @ np.array([1.0, 1.0])
    (False, array([1., 3.]))
    """

    def __init__(self, A: Any, symmetric: bool | None = None) -> None:
        bk = get_backend(A)
        if len(getattr(A, "shape", ())) != 2:
            raise ShapeError(f"a dense operator needs a 2-D array, got shape {A.shape}")
        bk.check_floating(A.dtype, "the matrix")
        if symmetric is None:
            An = bk.to_numpy(A)
            symmetric = An.shape[0] == An.shape[1] and bool(np.array_equal(An, An.T))
        super().__init__(tuple(A.shape), A.dtype, bk, bk.device_of(A), symmetric)
        self.A = A

    def _matvec(self, v: Any) -> Any:
        return self.A @ v

    def _matmat(self, V: Any) -> Any:
        return self.A @ V

    def _rmatvec(self, v: Any) -> Any:
        return self.xp.permute_dims(self.A, (1, 0)) @ v

    def _rmatmat(self, V: Any) -> Any:
        return self.xp.permute_dims(self.A, (1, 0)) @ V

    def to_dense(self, chunk_size: int | None = None) -> Any:
        return self.A


class CallableOperator(LinearOperator):
    """An operator from a matvec callable (and optionally rmatvec / matmat callables).

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = hessop.CallableOperator(lambda v: np.cumsum(v), (3, 3), "float64", "numpy",
    ...                             rmatvec=lambda v: np.cumsum(v[::-1])[::-1])
    >>> A @ np.ones(3), np.ones(3) @ A
    (array([1., 2., 3.]), array([3., 2., 1.]))
    """

    def __init__(
        self,
        matvec: Callable[[Any], Any],
        shape: tuple[int, int],
        dtype: Any,
        backend: str | Backend,
        device: Any = None,
        rmatvec: Callable[[Any], Any] | None = None,
        matmat: Callable[[Any], Any] | None = None,
        symmetric: bool = False,
    ) -> None:
        super().__init__(shape, dtype, backend, device, symmetric)
        self._mv, self._rmv, self._mm = matvec, rmatvec, matmat

    def _matvec(self, v: Any) -> Any:
        return self._output(self._mv(v), (self.shape[0],), "matvec")

    def _matmat(self, V: Any) -> Any:
        if self._mm is None:
            return super()._matmat(V)
        return self._output(self._mm(V), (self.shape[0], V.shape[1]), "matmat")

    def _rmatvec(self, v: Any) -> Any:
        if self._rmv is None:
            return super()._rmatvec(v)
        return self._output(self._rmv(v), (self.shape[1],), "rmatvec")

    def _output(self, y: Any, shape: tuple[int, ...], what: str) -> Any:
        # The user's function is the one part of the operator hessop cannot vouch for: a
        # result of another shape or framework would surface far away, or not at all.
        if not self._bk.owns(y):
            got = type(y).__module__.split(".")[0] + "." + type(y).__name__
            raise TypeError(
                f"the {what} function of a {self.backend} CallableOperator returned {got}; "
                f"it must return a {self.backend} array"
            )
        if tuple(y.shape) != shape:
            raise ShapeError(
                f"the {what} function of a CallableOperator of shape {self.shape} returned "
                f"shape {tuple(y.shape)}, expected {shape}"
            )
        return y


def aslinearoperator(
    x: Any,
    shape: tuple[int, int] | None = None,
    dtype: Any = None,
    *,
    backend: str | None = None,
    device: Any = None,
    symmetric: bool | None = None,
) -> LinearOperator:
    """Wrap ``x`` as a :class:`LinearOperator`.

    Parameters
    ----------
    x :
        A :class:`LinearOperator` (returned as is); a dense 2-D numpy, torch or JAX array
        (the operator stays in that framework, on that device); a
        :class:`scipy.sparse.linalg.LinearOperator` or scipy sparse matrix (a numpy
        operator); or a matvec callable, which needs ``shape`` (and takes ``dtype``,
        ``backend``, ``device``; default float64 numpy on the CPU).
    symmetric : bool, optional
        Declare symmetry (callables default to False; arrays are checked).

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = hessop.aslinearoperator(lambda v: 2 * v, shape=(3, 3), symmetric=True)
    >>> A @ np.ones(3)
    array([2., 2., 2.])
    """
    if isinstance(x, LinearOperator):
        return x
    try:
        import scipy.sparse as sp
        import scipy.sparse.linalg as spla
    except ImportError:  # pragma: no cover - scipy is a hard dependency
        spla = sp = None
    if spla is not None and (isinstance(x, spla.LinearOperator) or sp.issparse(x)):
        op = spla.aslinearoperator(x)
        return CallableOperator(
            lambda v: np.asarray(op.matvec(v)).reshape(-1),
            op.shape,
            op.dtype,
            "numpy",
            "cpu",
            rmatvec=lambda v: np.asarray(op.rmatvec(v)).reshape(-1),
            matmat=lambda V: np.asarray(op.matmat(V)),
            symmetric=False if symmetric is None else symmetric,
        )
    if callable(x) and not hasattr(x, "shape"):
        if shape is None:
            raise ShapeError("aslinearoperator(callable) needs shape=(n, m)")
        bk = get_backend(backend or "numpy")
        dev = bk.resolve_device(device) if device is not None else bk.default_device()
        sym = False if symmetric is None else symmetric
        return CallableOperator(x, shape, dtype or "float64", bk, dev, symmetric=sym)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return DenseOperator(x, symmetric)
    if isinstance(x, (list, tuple)):
        try:
            return DenseOperator(np.asarray(x, dtype=float), symmetric)
        except ValueError as err:  # ragged rows, or entries that are not numbers
            raise ShapeError(
                f"cannot make a matrix of the nested list ({err}); pass a rectangular list "
                "of rows of numbers, or an array"
            ) from None
    raise DTypeError(
        f"cannot make a linear operator from {type(x).__name__}; pass an array, a scipy "
        "LinearOperator or a matvec callable with shape="
    )

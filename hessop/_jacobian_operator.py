"""The Jacobian of a vector-valued function of the parameters as a matrix-free operator.

:func:`jacobian_operator` wraps ``f(params, *args) -> array`` at one point as an ``(m, d)``
:class:`JacobianOperator`: ``J @ v`` is a Jacobian-vector product (forward mode), ``u @ J``
and ``J.T @ u`` are vector-Jacobian products (reverse mode), and blocks of vectors are one
vmapped call. Composed with the operator algebra, ``J.T @ J`` is a Gauss-Newton matrix,
``J @ J.T`` an empirical neural tangent kernel, and ``J.to_scipy()`` runs in
``scipy.sparse.linalg.svds``.

Like the Hessian operator it is the Jacobian at the state it was built in (the snapshot
contract of :mod:`hessop._state`): the point, the arguments and what ``f`` reads from
outside them are watched, not copied, and a later change raises
:class:`~hessop.StaleOperatorError`. The work that does not depend on the vector is kept
from the first product of each kind (``cache=True``): the pullback of ``f`` (what the
forward pass saved) for reverse products, and for forward ones the linearization (JAX) or
the graph of that pullback (torch: ``J v = d/du <J^T u, v>``, no forward mode needed).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import _checks, _pytree, _rng
from ._errors import DTypeError, ForwardModeUnsupportedError
from ._hessian import place
from ._inputs import convert_arg
from ._layout import PointLayout
from ._operator import LinearOperator
from ._sharing import SharedFunctions, ShareKey
from ._state import StateWatch
from .backends import Backend, resolve_backend
from .jacobians import output_array, random_function, translated

__all__ = ["JacobianOperator", "jacobian_operator"]

#: the first products are checked for random draws (a random f has no fixed Jacobian)
_CHECKED_USES = 2
#: compiled products, shared by the operators of one function (see hessop._sharing)
_SHARED = SharedFunctions(maxsize=16)


class JacobianOperator(PointLayout, LinearOperator):
    """The Jacobian ``J = df/dparams`` of a vector-valued function at a point, ``(m, d)``.

    Not built directly: use :func:`jacobian_operator`. Inputs of ``J @ v`` are flat in the
    layout of the parameters (:meth:`ravel` / :meth:`unravel`); outputs are the raveled
    outputs of ``f`` (reshape with :attr:`output_shape`).

    Attributes
    ----------
    output_shape : tuple of int
        The shape of ``f(params, *args)``; ``m`` is its size.
    cache : bool
        Whether the linear maps of the first products are kept for the later ones.
    chunk_size : int or None
        Columns per vmapped call in ``matmat`` / ``rmatmat``.

    Examples
    --------
    >>> import numpy as np, torch, hessop
    >>> f = lambda p, x: torch.tanh(x @ p["w"]) + p["b"]   # outputs (1, 2)
    >>> p = {"w": np.zeros((3, 2)), "b": np.zeros(2)}
    >>> J = hessop.jacobian_operator(f, p, np.array([[1.0, 2.0, 3.0]]), backend="torch")
    >>> J.shape, J.output_shape
    ((2, 8), (1, 2))
    >>> J @ J.ravel({"w": np.ones((3, 2)), "b": np.zeros(2)})   # tanh'(0) x @ 1 = 6
    tensor([6., 6.], dtype=torch.float64)
    """

    def __init__(
        self,
        fns: Any,
        leaves: list[Any],
        args: tuple[Any, ...],
        spec: _pytree.TreeSpec,
        output_shape: tuple[int, ...],
        *,
        backend: Backend,
        device: Any,
        watch: StateWatch,
        cache: bool,
        chunk_size: int | None,
    ) -> None:
        m = math.prod(output_shape)
        super().__init__((m, spec.size), leaves[0].dtype, backend, device, symmetric=False)
        self._fns, self._leaves, self._point, self._args = fns, leaves, list(leaves), args
        self.spec, self.output_shape = spec, tuple(output_shape)
        self.watch, self.cache, self.chunk_size = watch, cache, chunk_size
        self._maps: dict[str, Any] = {}  # "jvp" / "vjp": the kept linear maps (cache)
        self._lock = threading.Lock()
        self._uses = 0

    def _product(self, kind: str, V: Any) -> Any:
        """``J V`` (kind "jvp") or ``J^T V`` ("vjp") for a vector or a block ``V``, after
        the state check, with the first uses checked for random draws."""
        self.watch.check()
        tr = self._bk.transforms
        checked = self._uses < _CHECKED_USES
        guard = (
            _rng.refuse_draws(self._bk, random_function) if checked else contextlib.nullcontext()
        )
        mode = "forward-over-reverse" if kind == "jvp" else "reverse-over-reverse"
        try:
            with tr.context(graph=False), translated(tr, mode), guard:
                if V.ndim == 1:
                    out = self._apply(kind, V)
                else:
                    step = self.chunk_size or V.shape[1]
                    parts = [
                        self._apply(kind, V[:, j : j + step]) for j in range(0, V.shape[1], step)
                    ]
                    out = parts[0] if len(parts) == 1 else self.xp.concat(parts, axis=1)
        except ForwardModeUnsupportedError as err:
            cause = err.__cause__ or err
            raise ForwardModeUnsupportedError(
                "J @ v with cache=False is a forward-mode product, and an operation in f has "
                f"no forward-mode derivative ({str(cause).strip().splitlines()[0]}); pass "
                "cache=True (torch then takes J @ v as two reverse passes)"
            ) from cause
        self._uses += 1
        self.watch.after_use()
        return out

    def _apply(self, kind: str, V: Any) -> Any:
        fns, xp, block = self._fns, self.xp, "_mat" if V.ndim == 2 else ""
        if kind == "vjp":  # cotangents shaped like the output (a block: one per row)
            shape = self.output_shape if V.ndim == 1 else (V.shape[1], *self.output_shape)
            V = xp.reshape(V if V.ndim == 1 else xp.permute_dims(V, (1, 0)), shape)
        if not self.cache:  # everything from the point, every time
            return getattr(fns, kind + block)(self._point, self._args, V)
        with self._lock:
            if kind not in self._maps:
                make = fns.linearize if kind == "jvp" else fns.pullback
                self._maps[kind] = make(self._point, self._args)
            kept = self._maps[kind]
        return getattr(fns, ("push" if kind == "jvp" else "pull") + block)(kept, V)

    def _matvec(self, v: Any) -> Any:
        return self._product("jvp", v)

    def _matmat(self, V: Any) -> Any:
        return self._product("jvp", V)

    def _rmatvec(self, u: Any) -> Any:
        return self._product("vjp", u)

    def _rmatmat(self, U: Any) -> Any:
        return self._product("vjp", U)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" output_shape={self.output_shape}>"


def _functions(bk: Backend, f: Callable[..., Any], spec: _pytree.TreeSpec) -> SimpleNamespace:
    """The products of ``f`` as functions of the point's leaves, the arguments and a flat
    vector (or a block), compiled by ``Transforms.jit`` where it compiles, so that the
    operators of one ``f`` share them. Cotangents come shaped like the output (a block
    ``(k, *output_shape)``); results are flat (a block ``(n, k)``)."""
    tr, xp = bk.transforms, bk.xp

    def fn(args: tuple[Any, ...]) -> Callable[[list[Any]], Any]:
        return lambda point: output_array(bk, f(_pytree.unflatten(spec, list(point)), *args))

    def push(lin: Callable[[Any], Any], v: Any) -> Any:
        return xp.reshape(lin(_pytree.unravel(xp, spec, v)), (-1,))

    def pull(pb: Callable[[Any], Any], c: Any) -> Any:
        return _pytree.ravel(xp, spec, list(pb(c)))

    def jvp(point: list[Any], args: tuple[Any, ...], v: Any) -> Any:
        return push(lambda t: tr.jvp(fn(args), point, t)[1], v)

    def vjp(point: list[Any], args: tuple[Any, ...], c: Any) -> Any:
        return pull(tr.vjp(fn(args), point)[1], c)

    def columns(product: Callable[..., Any], axes: tuple[Any, ...]) -> Callable[..., Any]:
        batched = tr.vmap(product, in_axes=axes)
        return lambda *a: xp.permute_dims(batched(*a), (1, 0))

    def vjp_mat(point: list[Any], args: tuple[Any, ...], C: Any) -> Any:
        return columns(pull, (None, 0))(tr.vjp(fn(args), point)[1], C)  # one forward pass

    return SimpleNamespace(
        jvp=tr.jit(jvp),
        vjp=tr.jit(vjp),
        jvp_mat=tr.jit(columns(jvp, (None, None, 1))),
        vjp_mat=tr.jit(vjp_mat),
        linearize=tr.jit(lambda point, args: tr.linearize(fn(args), point)),
        pullback=tr.jit(lambda point, args: tr.pullback(fn(args), point)),
        push=tr.jit(push),
        pull=tr.jit(pull),
        push_mat=tr.jit(columns(push, (None, 1))),
        pull_mat=tr.jit(columns(pull, (None, 0))),
    )


def jacobian_operator(
    f: Callable[..., Any],
    params: Any,
    *args: Any,
    backend: str | None = None,
    device: Any = None,
    dtype: Any = None,
    cache: bool = True,
    chunk_size: int | None = None,
) -> JacobianOperator:
    """The Jacobian of ``f(params, *args)`` with respect to ``params``, as an operator.

    ``J`` has shape ``(m, d)``: ``m`` the size of ``f``'s output (any shape, raveled), ``d``
    the number of parameters in hessop's flat layout. ``J @ v`` costs one Jacobian-vector
    product (forward mode), ``u @ J`` and ``J.T @ u`` one vector-Jacobian product (reverse
    mode); ``J @ V`` and ``J.T @ U`` with ``k`` columns are one vmapped call. So

    * ``J.T @ J`` is the Gauss-Newton matrix of ``0.5 * |f|^2`` (positive semi-definite),
    * ``J @ J.T`` the empirical neural tangent kernel of the outputs,
    * ``scipy.sparse.linalg.svds(J.to_scipy(), k)`` its top singular triplets,

    without ever forming ``J``.

    Parameters
    ----------
    f : callable
        ``f(params, *args) -> array``, floating point, in the parameters' dtype.
    params :
        The point: an array or a pytree (dict / list / tuple) of arrays, numpy or native.
    *args :
        Extra arguments of ``f``, not differentiated (numpy floating arrays are converted
        to the operator's dtype and device).
    backend : {"torch", "jax"}, optional
        Inferred from the arrays when omitted (numpy arrays alone need it).
    device, dtype : optional
        As in :func:`hessop.hessian`.
    cache : bool
        Keep the work that does not depend on the vector from the first product of each
        kind: the pullback (the forward pass's saved values) for ``u @ J``, and for ``J @
        v`` in JAX the linearization, in torch the graph of that pullback (``J v`` is then
        one reverse pass through it, ``d/du <J^T u, v>``, about the cost of a forward pass
        and without forward-mode AD). Costs the memory of the kept graphs; ``False``
        recomputes every product (``J @ v`` then by forward mode).
    chunk_size : int, optional
        Columns per vmapped call in ``matmat`` / ``rmatmat`` (bounds memory).

    Notes
    -----
    The operator is the Jacobian at the state it was built in; changing the point, the
    arguments or what ``f`` reads in place afterwards makes every later use raise
    :class:`~hessop.StaleOperatorError`. Products keep no autograd graph (torch), and the
    point is a constant to ``jax.grad`` (JAX; the operator can be built and used inside
    ``jax.jit``). In JAX the products are compiled once per ``f`` and shapes and shared by
    the operators of that ``f``, as the Hessian's are. An ``f`` that
    draws random numbers (dropout in training mode) has no fixed Jacobian and is refused
    with :class:`~hessop.RandomnessError`.

    Examples
    --------
    >>> import torch, hessop
    >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> residuals = lambda w, X: torch.sin(X @ w)          # m = 3 outputs, d = 2
    >>> J = hessop.jacobian_operator(residuals, torch.zeros(2, dtype=torch.float64), X)
    >>> J.shape                                            # cos(0) = 1: J = X
    (3, 2)
    >>> (J.T @ J).to_dense()                               # Gauss-Newton: X^T X
    tensor([[3., 3.],
            [3., 5.]], dtype=torch.float64)
    """
    if not callable(f):
        raise TypeError(f"f must be a function f(params, *args) -> array, got {type(f).__name__}")
    cache = _checks.flag(cache, "cache")
    chunk_size = _checks.optional_integer(chunk_size, "chunk_size", minimum=1)
    leaves, spec = _pytree.flatten(params)
    bk = resolve_backend(backend, leaves, args)
    dev, dt = place(bk, leaves, device, dtype)
    # numpy leaves are copied (the caller may change them unseen); native ones are watched
    leaves = [np.array(x) if isinstance(x, np.ndarray) else x for x in leaves]
    leaves = [bk.stop_gradient(bk.asarray(x, dtype=dt, device=dev)) for x in leaves]
    args = tuple(_pytree.map_arrays(lambda a: convert_arg(bk, a, dt, dev), args))
    watch = StateWatch()
    for path, x in zip(spec.paths, leaves):
        watch.add_array(f"parameter leaf {path or 0}", x)
    for i, x in enumerate(_pytree.collect_arrays(args)):
        if bk.owns(x):
            bk.check_device(x, dev, "an argument of f")
        watch.add_array(f"array {i} of the arguments", x)
    watch.add_function(f, "f")

    tr = bk.transforms
    if tr.compiles and watch.shareable:  # (not inside a JAX transformation)
        key = ShareKey(("jacobian", bk.name, f, spec, watch.key()), watch.kept())
        fns = _SHARED.get(key, lambda: _functions(bk, f, spec))
    else:
        fns = _functions(bk, f, spec)

    def fn(point: list[Any]) -> Any:
        return output_array(bk, f(_pytree.unflatten(spec, list(point)), *args))

    with tr.context(graph=False), translated(tr), _rng.refuse_draws(bk, random_function):
        shape, out_dtype = tr.output_spec(fn, leaves)
    if bk.dtype_name(out_dtype) != bk.dtype_name(dt):
        raise DTypeError(
            f"f returns {bk.dtype_name(out_dtype)} at {bk.dtype_name(dt)} parameters; the "
            "Jacobian operator maps vectors of one dtype: compute f in the parameters' dtype "
            "(or pass dtype= to convert the parameters)"
        )
    return JacobianOperator(
        fns,
        leaves,
        args,
        spec,
        shape,
        backend=bk,
        device=dev,
        watch=watch,
        cache=cache,
        chunk_size=chunk_size,
    )

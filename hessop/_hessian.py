"""The Hessian of a scalar loss as a matrix-free operator, and the :func:`hessian` factory.

:class:`HessianOperator` holds what every backend shares: the point, the flat layout of the
parameter pytree, the dataset streaming and the choice of mode. A backend subclass supplies
the per-batch products (``_batch_hvp``, ``_batch_hmm``, ``_batch_grad``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import _pytree
from ._errors import DTypeError, EmptyDataError, ShapeError, unknown
from ._operator import LinearOperator
from .backends import Backend, get_backend, infer_backend

#: canonical mode names, in the order they are documented
MODES = (
    "forward-over-reverse",
    "reverse-over-forward",
    "reverse-over-reverse",
    "dense",
    "finite-difference",
    "auto",
)
_ALIASES = {
    "fwd-rev": "forward-over-reverse",
    "rev-fwd": "reverse-over-forward",
    "rev-rev": "reverse-over-reverse",
    "fd": "finite-difference",
}
REDUCTIONS = ("mean", "sum")


def canonical_mode(mode: str) -> str:
    """Map a mode name or alias to its canonical name; raise for unknown modes.

    >>> canonical_mode("fwd-rev")
    'forward-over-reverse'
    """
    name = _ALIASES.get(mode, mode)
    if name not in MODES:
        raise unknown("mode", mode, list(MODES) + list(_ALIASES))
    return name


class Problem:
    """Everything that defines the loss: the function, the point and the data.

    Built by :func:`hessian`; backends read it. ``leaves`` are the parameter leaves as
    native arrays (detached, on the operator's device, in the operator's dtype);
    ``batches()`` yields ``(args, weight)`` pairs whose weights are the batch sizes.
    ``reducer`` (a :class:`hessop.distributed.Reducer`, or None for one process) combines
    this process's share of each product with the other processes' shares.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        spec: _pytree.TreeSpec,
        leaves: list[Any],
        args: tuple[Any, ...] | None,
        data: Iterable[Any] | None,
        reduction: str,
        batch_size: Callable[[tuple[Any, ...]], int] | None,
        convert: Callable[[Any], Any],
        reducer: Any = None,
    ) -> None:
        self.f, self.spec, self.leaves = f, spec, leaves
        self.args, self.data, self.reduction = args, data, reduction
        self._batch_size, self._convert = batch_size, convert
        self.reducer = reducer

    @property
    def streamed(self) -> bool:
        return self.data is not None

    def batches(self) -> Iterable[tuple[tuple[Any, ...], int]]:
        """Yield ``(args, size)`` for each batch; a single batch has size 1."""
        if self.data is None:
            yield self.args, 1
            return
        empty = True
        for item in self.data:
            empty = False
            # DataLoader's default collate turns a (x, y) sample into a [x, y] list.
            args = self._convert(tuple(item) if isinstance(item, (tuple, list)) else (item,))
            yield args, self.size_of(args)
        if empty and self.reducer is None:  # a reducer decides whether all ranks are empty
            raise EmptyDataError("data= yielded no batch; pass a non-empty iterable of batches")

    def size_of(self, args: tuple[Any, ...]) -> int:
        if self._batch_size is not None:
            return int(self._batch_size(args))
        leaves: list[Any] = []
        _collect_arrays(args, leaves)
        for x in leaves:
            if len(getattr(x, "shape", ())) >= 1:
                return int(x.shape[0])
        raise ShapeError(
            "cannot find the batch size: no argument of the batch is an array with a leading "
            "dimension; pass batch_size=lambda args: ... to hessian()"
        )

    def loss(self, leaves: list[Any], args: tuple[Any, ...]) -> Any:
        """Evaluate the loss on parameter leaves; check that it is a real scalar."""
        out = self.f(_pytree.unflatten(self.spec, list(leaves)), *args)
        shape = tuple(getattr(out, "shape", ()))
        if shape != ():
            from ._errors import LossError

            raise LossError(
                f"the loss must return a scalar, but it returned shape {shape}; "
                "reduce it with .mean() or .sum() (for per-sample quantities see "
                "hessop.per_sample_hessians)"
            )
        if isinstance(out, complex) or "complex" in str(getattr(out, "dtype", "")):
            from ._errors import LossError

            raise LossError(
                "the loss must return a real scalar, but it returned a complex one; "
                "return its real part or its absolute value (e.g. abs(z) ** 2)"
            )
        return out


def _collect_arrays(tree: Any, out: list[Any]) -> None:
    if isinstance(tree, dict):
        for v in tree.values():
            _collect_arrays(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _collect_arrays(v, out)
    elif hasattr(tree, "shape") and hasattr(tree, "dtype"):
        out.append(tree)


def map_arrays(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every array leaf of a nested dict/list/tuple, keep the rest."""
    if isinstance(tree, dict):
        return type(tree)((k, map_arrays(fn, v)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_arrays(fn, v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_arrays(fn, v) for v in tree)
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return fn(tree)
    return tree


class HessianOperator(LinearOperator):
    """The Hessian of a scalar loss at a point, as a symmetric linear operator.

    Not built directly: use :func:`hessian` (or :func:`hessop.model_hessian`). Each backend
    has its own subclass; all of them share this interface.

    Attributes
    ----------
    mode : str
        The automatic-differentiation mode in use (the one ``"auto"`` chose).
    compile_time : float or None
        With ``compile=True``, the seconds spent compiling at construction (0.0 when an
        earlier operator of the same loss had compiled it); None otherwise.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> H = hessop.hessian(lambda p: (p["a"] ** 2 * p["b"]).sum(),
    ...                    {"a": np.array([1.0, 2.0]), "b": np.array(3.0)}, backend="torch")
    >>> isinstance(H, hessop.HessianOperator), H.shape
    (True, (3, 3))
    >>> H.unravel(H @ H.ravel({"a": np.zeros(2), "b": np.array(1.0)}))["a"]
    tensor([2., 4.], dtype=torch.float64)
    """

    compile_time: float | None = None

    def __init__(self, problem: Problem, mode: str, backend: Backend, device: Any) -> None:
        d = problem.spec.size
        super().__init__((d, d), problem.leaves[0].dtype, backend, device, symmetric=True)
        self.problem = problem
        self.mode = mode

    # --- per-batch products, supplied by the backend ------------------------------------
    def _batch_hvp(self, args: tuple[Any, ...], v: Any) -> Any:
        raise NotImplementedError

    def _batch_hmm(self, args: tuple[Any, ...], V: Any) -> Any:
        raise NotImplementedError

    def _batch_grad(self, args: tuple[Any, ...]) -> tuple[Any, Any]:
        raise NotImplementedError

    # --- dataset reduction --------------------------------------------------------------
    def _reduce(
        self,
        per_batch: Callable[[tuple[Any, ...]], Any],
        zero: Callable[[], Any] | None = None,
    ) -> Any:
        # ``zero()`` is the result for a process with no local batch (distributed only).
        self._check_point()
        total, acc = 0, None
        for args, n in self.problem.batches():
            y = per_batch(args)
            if self.problem.streamed and self.problem.reduction == "mean":
                y = _scale(y, n)
            acc = y if acc is None else _add(acc, y)
            total += n
        if self.problem.reducer is not None:  # the other processes' shares (distributed.py)
            acc, total = self.problem.reducer.reduce(acc, total, zero)
        if self.problem.streamed and self.problem.reduction == "mean":
            acc = _scale(acc, 1.0 / total)
        return acc

    def _check_point(self) -> None:
        """Raise :class:`~hessop.StaleOperatorError` when the point changed in place."""

    def _matvec(self, v: Any) -> Any:
        if self.problem.reducer is not None:
            v = self.problem.reducer.replicate(v)
        return self._reduce(lambda args: self._batch_hvp(args, v), lambda: self.xp.zeros_like(v))

    def _matmat(self, V: Any) -> Any:
        if self.problem.reducer is not None:
            V = self.problem.reducer.replicate(V)
        return self._reduce(lambda args: self._batch_hmm(args, V), lambda: self.xp.zeros_like(V))

    # --- extras -------------------------------------------------------------------------
    @property
    def params(self) -> Any:
        """The point at which the Hessian is taken, as a params-shaped pytree."""
        self._check_point()
        return _pytree.unflatten(self.problem.spec, list(self.problem.leaves))

    def loss_and_gradient(self) -> tuple[Any, Any]:
        """The loss (0-d array) and its flat gradient at the point (over all the data)."""
        xp, kw = self.xp, {"dtype": self.dtype, **self._device_kw()}
        return self._reduce(
            lambda args: self._batch_grad(args),
            lambda: (xp.zeros((), **kw), xp.zeros(self.shape[0], **kw)),
        )

    def gradient(self) -> Any:
        """The flat gradient of the loss at the point (over all the data)."""
        return self.loss_and_gradient()[1]

    def ravel(self, tree: Any) -> Any:
        """Flatten a params-shaped pytree into a vector in this operator's layout.

        The layout is depth-first, dict entries in insertion order, each leaf in row-major
        order; it is the same in every backend.
        """
        ok, leaves = _pytree.same_structure(self.problem.spec, tree)
        if not ok:
            raise ShapeError(
                "the pytree does not match the parameters: expected a "
                f"{self.problem.spec.describe()}"
            )
        bk = self._bk
        leaves = [bk.asarray(x, dtype=self.dtype, device=self.device) for x in leaves]
        return _pytree.ravel(self.xp, self.problem.spec, leaves)

    def unravel(self, v: Any) -> Any:
        """Split a flat vector into a params-shaped pytree (inverse of :meth:`ravel`)."""
        v = self._check(v, 1, self.shape[0], "unravel")
        return _pytree.unflatten(self.problem.spec, _pytree.unravel(self.xp, self.problem.spec, v))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" mode={self.mode!r}>"


def _scale(y: Any, a: float) -> Any:
    return tuple(_scale(t, a) for t in y) if isinstance(y, tuple) else y * a


def _add(a: Any, b: Any) -> Any:
    return tuple(_add(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else a + b


def _infer_backend_name(params_leaves: list[Any], args: Any) -> str:
    names = {infer_backend(x) for x in params_leaves} - {"numpy", None}
    if len(names) > 1:
        raise TypeError(
            f"the parameters mix frameworks ({sorted(names)}); use arrays of one framework"
        )
    if names:
        return names.pop()
    arrays: list[Any] = []
    _collect_arrays(args, arrays)
    names = {infer_backend(x) for x in arrays} - {"numpy", None}
    if len(names) == 1:
        return names.pop()
    raise TypeError(
        "cannot infer the backend from numpy (or mixed) arrays; "
        "pass backend='torch' or backend='jax'"
    )


def hessian(
    f: Callable[..., Any],
    params: Any,
    *args: Any,
    backend: str | None = None,
    mode: str = "auto",
    device: Any = None,
    dtype: Any = None,
    data: Iterable[Any] | None = None,
    reduction: str = "mean",
    batch_size: Callable[[tuple[Any, ...]], int] | None = None,
    cache: bool | None = None,
    chunk_size: int | None = None,
    compile: bool = False,
    distributed: bool = False,
    process_group: Any = None,
    differentiable: bool = False,
) -> HessianOperator:
    """The Hessian of ``f(params, *args)`` with respect to ``params``, as an operator.

    Parameters
    ----------
    f : callable
        ``f(params, *args) -> scalar``, written for the chosen framework (or once, with the
        array API, for both).
    params :
        The point: an array or a pytree (dict / list / tuple, nested) of arrays, numpy or
        native. Its flat layout (see :meth:`HessianOperator.ravel`) is the same in every
        backend: depth-first, dict entries in insertion order. numpy arrays are copied;
        torch tensors are not (no extra memory): changing them in place afterwards (an
        optimizer step) makes every later use of the operator raise
        :class:`~hessop.StaleOperatorError` instead of mixing two points. Build a new
        operator at the new point, or pass ``p.detach().clone()`` to keep the old one.
    *args :
        Extra arguments of ``f`` (data, targets, ...). numpy floating arrays are converted
        to the backend's arrays in the operator's dtype, on its device.
    backend : {"torch", "jax"}, optional
        The framework; inferred from the arrays when omitted (numpy alone needs it).
    mode : str
        ``"forward-over-reverse"`` (``"fwd-rev"``), ``"reverse-over-forward"``
        (``"rev-fwd"``), ``"reverse-over-reverse"`` (``"rev-rev"``), ``"dense"``
        (materialize once, for checks), ``"finite-difference"`` (``"fd"``: central
        differences of gradients, inexact) or ``"auto"`` (the fastest exact mode of the
        backend; ``H.mode`` tells which).
    device : optional
        Where to compute; default: the params' device, else the framework's default
        accelerator, else CPU.
    dtype : optional
        ``"float32"`` or ``"float64"``; default: the params' dtype.
    data : iterable of tuples, optional
        Instead of ``*args``: a re-iterable (list, DataLoader) of argument tuples, one per
        batch. The operator is then the Hessian of the loss over the whole dataset, streamed
        batch by batch: with ``reduction="mean"`` (``f`` returns a batch mean) the
        size-weighted mean ``sum_b n_b L_b / sum_b n_b``; with ``"sum"`` (``f`` returns a
        batch sum) the plain sum. The size ``n_b`` of a batch is the leading dimension of
        its first array argument, or ``batch_size(args)`` when given.
    cache : bool, optional
        Reuse work that does not depend on ``v`` across products (the gradient graph in
        torch, the linearization in JAX). Default: on for a single batch, off for
        ``data=`` (which would otherwise keep every batch's graph in memory).
    chunk_size : int, optional
        Columns per batched call in ``matmat`` (bounds memory); default all at once.
    compile : bool
        Compile the product ahead of the first use and report the one-time cost in
        ``H.compile_time`` (seconds; 0.0 when an earlier operator of the same loss already
        compiled it). torch: the product is built with ``torch.func`` and passed through
        ``torch.compile`` (``mode="auto"`` then means reverse-over-forward); it pays when
        many products are taken at new points with equal shapes (the compilation takes
        seconds to a minute). JAX: products are always jitted; ``compile=True`` only
        compiles them at construction instead of at the first product.
    distributed : bool
        Data parallelism (see :mod:`hessop.distributed` and ``docs/distributed.md``):
        ``data=`` (or ``*args``, then one batch) is this process's share, and the operator,
        built on every process with the same ``params``, is the Hessian over the union of
        all shares, each batch weighted by its size. torch: one all-reduce per product over
        ``process_group``; shards may be uneven or empty. JAX: each batch is sharded over a
        device mesh and XLA reduces; batch sizes must divide by the local device count.
    process_group : optional
        torch: a ``torch.distributed`` process group (default the world, which must be
        initialized). JAX: a :class:`jax.sharding.Mesh` (default all of ``jax.devices()``).
    differentiable : bool
        Keep products (and :meth:`~HessianOperator.loss_and_gradient`) differentiable with
        respect to the arrays in ``*args`` and those ``f`` closes over, so that ``v @ (H @
        v)`` can sit inside a training loss (Hutchinson trace penalties, sliced score
        matching; see :func:`hessop.hvp` for a one-shot, fully differentiable product).
        torch: products keep their autograd graph (``create_graph=True``) and ``cache``
        defaults to off, so each product owns its graph and can be backpropagated once.
        JAX: products are always differentiable with respect to ``*args`` (the operator can
        be built inside ``jax.grad`` / ``jax.jit``); the flag changes nothing. In both, the
        point ``params`` itself is a constant: no gradient flows to it.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> def f(w, A):
    ...     return 0.5 * w @ A @ w + (w**3).sum()
    >>> A = np.array([[2.0, 1.0], [1.0, 3.0]])
    >>> H = hessop.hessian(f, np.array([1.0, -1.0]), A, backend="torch")
    >>> H.mode, H.shape
    ('reverse-over-reverse', (2, 2))
    >>> H.to_dense().numpy()   # A + diag(6 w)
    array([[ 8.,  1.],
           [ 1., -3.]])
    """
    mode = canonical_mode(mode)
    if reduction not in REDUCTIONS:
        raise unknown("reduction", reduction, REDUCTIONS)
    if process_group is not None and not distributed:
        raise TypeError("process_group= is used only with distributed=True; pass both")
    if distributed and data is None:
        data, args = [args], ()  # this process's arguments are its one local batch
    if data is not None:
        if args:
            raise TypeError("pass either *args or data=, not both")
        if iter(data) is data:
            raise TypeError(
                "data= must be re-iterable (a list, tuple or DataLoader): every matrix-vector "
                "product streams it again, and a one-shot iterator or generator would be "
                "exhausted after the first; wrap it with list(...) if it fits in memory"
            )
        if hasattr(data, "__len__") and len(data) == 0 and not distributed:
            raise EmptyDataError("data= is empty; pass at least one batch")
    leaves, spec = _pytree.flatten(params)
    name = backend if backend is not None else _infer_backend_name(leaves, args)
    bk = get_backend(name)
    if not bk.differentiable:
        raise TypeError(
            f"the {name!r} backend cannot differentiate; pass backend='torch' or backend='jax'"
        )
    dev = bk.resolve_device(device) if device is not None else None
    if dev is None:
        natives = [x for x in leaves if bk.owns(x)]
        dev = bk.device_of(natives[0]) if natives else bk.default_device()
    for i, x in enumerate(leaves):
        if not hasattr(x, "dtype"):
            continue
        bk_x = get_backend(x) if infer_backend(x) else bk
        bk_x.check_floating(x.dtype, f"parameter leaf {i}")
        if device is None and bk.owns(x):
            bk.check_device(x, dev, f"parameter leaf {i}")
    native_dtype = _resolve_dtype(bk, leaves, dtype)
    # numpy leaves are copied, since the caller may change them in place unseen; native
    # tensors are not (a torch operator watches their version counters instead).
    leaves = [np.array(x) if isinstance(x, np.ndarray) else x for x in leaves]
    leaves = [bk.stop_gradient(bk.asarray(x, dtype=native_dtype, device=dev)) for x in leaves]
    arg_arrays: list[Any] = []
    _collect_arrays(args, arg_arrays)
    for x in arg_arrays:  # fail here, not deep inside the first product
        if bk.owns(x):
            bk.check_device(x, dev, "an argument of the loss")
    reducer = None
    if distributed:
        from .distributed import make_reducer

        reducer = make_reducer(bk.name, process_group)
        leaves, dev = reducer.prepare(leaves, dev)

    def convert(batch_args: tuple[Any, ...]) -> tuple[Any, ...]:
        if reducer is not None:
            batch_args = reducer.shard_batch(batch_args, native_dtype)
        return tuple(map_arrays(lambda x: _convert_arg(bk, x, native_dtype, dev), batch_args))

    problem = Problem(
        f,
        spec,
        leaves,
        convert(args) if data is None else None,
        data,
        reduction,
        batch_size,
        convert,
        reducer=reducer,
    )
    options: dict[str, Any] = {"differentiable": True} if differentiable else {}
    if compile:
        options["compile"] = True
    return bk.hessian_operator(
        problem, mode, device=dev, cache=cache, chunk_size=chunk_size, **options
    )


def _resolve_dtype(bk: Backend, leaves: list[Any], dtype: Any) -> Any:
    if dtype is not None:
        native = bk.dtype(dtype)
        bk.check_floating(native, "dtype=")
        return native
    names = {str(getattr(x, "dtype", "float64")).replace("torch.", "") for x in leaves}
    if len(names) > 1:
        raise DTypeError(
            f"the parameter leaves have different dtypes {sorted(names)}; pass dtype= to choose one"
        )
    return bk.dtype(names.pop())


def _convert_arg(bk: Backend, x: Any, dtype: Any, device: Any) -> Any:
    if bk.owns(x):
        return x
    name = infer_backend(x)
    if name == "numpy":
        kind = np.asarray(x).dtype.kind
        return bk.asarray(x, dtype=dtype if kind == "f" else None, device=device)
    if name is not None and name != bk.name:
        # Silently converting across frameworks would copy (and maybe move) every batch.
        raise TypeError(
            f"an argument of the loss is a {name} array but the operator uses {bk.name}; "
            f"pass {bk.name} or numpy arrays (for a torch DataLoader feeding JAX, convert "
            "each batch to numpy)"
        )
    return x

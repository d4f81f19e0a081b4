"""The Hessian of a scalar loss as a matrix-free operator, and the :func:`hessian` factory.

:class:`HessianOperator` is a :class:`~hessop._streamed.StreamedOperator` whose per-batch
products come from the framework's Hessian kernel in one AD mode. The two modes that are
not AD modes are composed here, the same way for every framework: ``"dense"`` materializes
the batch's Hessian once (the kernel's :meth:`dense`), ``"finite-difference"`` takes
central differences of two gradients.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import _checks, _pytree
from ._errors import DTypeError, EmptyDataError, ShapeError, unknown
from ._inputs import check_framework, convert_arg
from ._loss import Loss
from ._operator import native_dtype
from ._sharing import ShareKey
from ._state import StateWatch
from ._streamed import REDUCTIONS, Batches, StreamedOperator
from .backends import Backend, get_backend, resolve_backend
from .backends._base import KernelOptions

#: canonical mode names, in the order they are documented
MODES = (
    "forward-over-reverse",
    "reverse-over-forward",
    "reverse-over-reverse",
    "dense",
    "finite-difference",
    "auto",
)
#: the short names accepted for the modes
MODE_ALIASES = {
    "fwd-rev": "forward-over-reverse",
    "rev-fwd": "reverse-over-forward",
    "rev-rev": "reverse-over-reverse",
    "fd": "finite-difference",
}
_AD_MODES = MODES[:3]


def canonical_mode(mode: str, allowed: tuple[str, ...] = MODES) -> str:
    """Map a mode name or alias to its canonical name; raise for unknown modes.

    >>> canonical_mode("fwd-rev")
    'forward-over-reverse'
    """
    name = MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else mode
    if name not in allowed:
        aliases = [a for a, m in MODE_ALIASES.items() if m in allowed]
        raise unknown("mode", mode, list(allowed) + aliases)
    return name


class HessianOperator(StreamedOperator):
    """The Hessian of a scalar loss at a point, as a symmetric linear operator.

    Not built directly: use :func:`hessian` (or :func:`hessop.model_hessian`). It is the
    Hessian at the state it was built in; see :mod:`hessop._state` and the docs page "What
    hessop guarantees".

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

    def __init__(self, *a: Any, mode: str, differentiable: bool = False, **k: Any) -> None:
        super().__init__(*a, **k)
        self.mode, self.differentiable = mode, differentiable
        self._dense: Any = None
        self._dense_lock = threading.Lock()

    def _product(self, args: tuple[Any, ...], V: Any) -> Any:
        if self.mode == "dense":
            return self._dense_matrix(args, keep=not self._bk.is_tracer(V)) @ V
        if self.mode == "finite-difference":
            return self._finite_difference(args, V)
        return super()._product(args, V)

    def _dense_matrix(self, args: tuple[Any, ...], keep: bool = True) -> Any:
        if self._dense is None and (self.batches.streamed or self.differentiable or not keep):
            # never one matrix per batch, nor one holding a JAX transformation's tracers
            return self._kernel.dense(self._point, args)
        with self._dense_lock:
            if self._dense is None:
                self._dense = self._kernel.dense(self._point, args)
        return self._dense

    def _finite_difference(self, args: tuple[Any, ...], V: Any) -> Any:
        xp = self.xp
        if V.ndim == 2:
            return xp.stack(
                [self._finite_difference(args, V[:, j]) for j in range(V.shape[1])], axis=1
            )
        w = _pytree.ravel(xp, self.spec, list(self._point))
        # Central differences: error O(h^2) from truncation vs O(eps/h) from rounding; the
        # balance is at h ~ eps^(1/3), scaled to the size of the point. Computed as arrays,
        # not host numbers: no device sync, and it runs under a JAX transformation.
        vnorm, wnorm = xp.linalg.vector_norm(V), xp.linalg.vector_norm(w)
        h = self.eps ** (1 / 3) * xp.where(wnorm > 1, wnorm, 1.0) / xp.where(vnorm > 0, vnorm, 1.0)

        def grad_at(x: Any) -> Any:
            return self._kernel.gradient(tuple(_pytree.unravel(xp, self.spec, x)), args)[1]

        return (grad_at(w + h * V) - grad_at(w - h * V)) / (2 * h)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" mode={self.mode!r}>"


def build_hessian(
    loss: Loss,
    leaves: list[Any],
    batches: Batches,
    watch: StateWatch,
    *,
    backend: Backend,
    device: Any,
    mode: str,
    cache: bool | None,
    chunk_size: int | None,
    compile: bool,
    differentiable: bool,
) -> HessianOperator:
    """The :class:`HessianOperator` of a checked loss at native ``leaves``: the part of
    :func:`hessian` that model-level operators share."""
    if mode == "auto":
        mode = backend.auto_compiled_mode if compile else backend.auto_mode
    if compile:
        _check_compile(backend, mode, differentiable)
        if loss.seed is not None:
            raise ValueError(
                "compile=True cannot be combined with allow_randomness: a compiled product "
                "does not re-seed the generators per call; pass compile=False"
            )
    # A kept graph would be shared by every differentiable product, and the caller's first
    # backward through one of them would free it under the others.
    default_cache = not batches.streamed and not differentiable
    cache = default_cache if cache is None else cache
    share, prefix = None, (loss.key, loss.spec, mode, loss.seed)
    if watch.shareable and not any(backend.is_tracer(x) for x in leaves):
        share = ShareKey((*prefix, watch.key()), watch.kept())
        loss.skip_checks_if_seen(ShareKey((loss.checks_key, loss.spec, loss.seed, watch.key())))
    options = KernelOptions(device, differentiable, compile, cache, chunk_size, share)
    kernel = backend.hessian_kernel(loss, mode, options)
    H = HessianOperator(
        leaves,
        loss.spec,
        batches,
        kernel,
        backend=backend,
        device=device,
        watch=watch,
        loss=loss,
        cache=cache,
        chunk_size=chunk_size,
        mode=mode,
        differentiable=differentiable,
    )
    H._share = share if kernel.shares_compilations else None
    H._share_prefix = prefix
    if compile:
        first = batches.first()
        # no local batch (distributed): compiled at the first product
        H.compile_time = 0.0 if first is None else kernel.warm_up(H._point, first)
        if first is not None and H.cache:
            # The operator's own linearization, with the compiled functions: every product
            # of this operator is then an application of it.
            H._products = 1
            H._linearization = kernel.linearize(H._point, first, H.zeros((H.shape[0],)))[1]
    return H


def _check_compile(backend: Backend, mode: str, differentiable: bool) -> None:
    if differentiable and not backend.compiled_products_differentiable:
        raise ValueError(
            "compile=True and differentiable=True cannot be combined: a compiled product "
            "keeps no autograd graph to the arguments; pass compile=False"
        )
    if mode not in backend.compilable_modes:
        raise ValueError(
            f"compile=True needs one of the modes {list(backend.compilable_modes)} in the "
            f"{backend.name!r} backend (or 'auto'); mode={mode!r} cannot be compiled: pass "
            "one of those, or compile=False"
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
    allow_randomness: str | None = None,
    seed: int = 0,
) -> HessianOperator:
    """The Hessian of ``f(params, *args)`` with respect to ``params``, as an operator.

    Parameters
    ----------
    f : callable
        ``f(params, *args) -> scalar``, written for the chosen framework (or once, with the
        array API, for both). It must compute the loss from the ``params`` it receives:
        hessop differentiates with respect to them.
    params :
        The point: an array or a pytree (dict / list / tuple, nested) of arrays, numpy or
        native. Its flat layout (see :meth:`HessianOperator.ravel`) is the same in every
        backend: depth-first, dict entries in insertion order.
    *args :
        Extra arguments of ``f`` (data, targets, ...). numpy floating arrays are converted
        to the backend's arrays in the operator's dtype, on its device.
    backend : {"torch", "jax"}, optional
        The framework; inferred from the arrays when omitted (numpy arrays alone need it,
        unless only one framework is installed).
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
        many products are taken at new points with equal shapes. JAX: products are always
        jitted; ``compile=True`` only compiles them at construction.
    distributed : bool
        Data parallelism (see :mod:`hessop.distributed` and ``docs/distributed.md``):
        ``data=`` (or ``*args``, then one batch) is this process's share, and the operator,
        built on every process with the same ``params``, is the Hessian over the union of
        all shares, each batch weighted by its size.
    process_group : optional
        torch: a ``torch.distributed`` process group (default the world, which must be
        initialized). JAX: a :class:`jax.sharding.Mesh` (default all of ``jax.devices()``).
    differentiable : bool
        Keep products (and :meth:`~HessianOperator.loss_and_gradient`) differentiable with
        respect to the arrays in ``*args`` and those ``f`` closes over, so that ``v @ (H @
        v)`` can sit inside a training loss (see :func:`hessop.hvp` for a one-shot, fully
        differentiable product). torch: products keep their autograd graph and ``cache``
        defaults to off. JAX: products are always differentiable with respect to ``*args``
        (the operator can be built inside ``jax.grad`` / ``jax.jit``). In both, the point
        ``params`` itself is a constant.
    allow_randomness : {None, "fixed-seed"}
        A loss that draws random numbers has no Hessian and is refused (it is noticed on
        its first evaluations). ``"fixed-seed"`` makes it deterministic instead: every
        evaluation seeds the global generators with ``seed`` in a scope that restores them,
        so every product sees the same draws (modes ``auto``/``reverse-over-reverse`` and
        ``finite-difference``).
    seed : int
        The seed of ``allow_randomness="fixed-seed"``.

    Notes
    -----
    The operator is the Hessian at the state it was built in: the point, the arguments and
    what ``f`` reads from outside them. torch tensors are not copied; changing any of them
    in place afterwards, or rebinding a global or closed-over variable ``f`` reads, makes
    every later use raise :class:`~hessop.StaleOperatorError` instead of mixing two states.

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
    chunk_size = _checks.optional_integer(chunk_size, "chunk_size", minimum=1)
    compile = _checks.flag(compile, "compile")
    distributed = _checks.flag(distributed, "distributed")
    differentiable = _checks.flag(differentiable, "differentiable")
    if cache is not None:
        cache = _checks.flag(cache, "cache")
    if not callable(f):
        raise TypeError(f"f must be a function f(params, *args) -> scalar, got {type(f).__name__}")
    if batch_size is not None and not callable(batch_size):
        raise TypeError("batch_size must be a function batch_size(args) -> int")
    if process_group is not None and not distributed:
        raise TypeError("process_group= is used only with distributed=True; pass both")
    if distributed and data is None:
        data, args = [args], ()  # this process's arguments are its one local batch
    if data is not None:
        _check_data(data, args, distributed)
    leaves, spec = _pytree.flatten(params)
    bk = resolve_backend(backend, leaves, args)
    dev, native_dtype = place(bk, leaves, device, dtype)
    # numpy leaves are copied, since the caller may change them in place unseen; native
    # tensors are not (the operator watches them instead).
    leaves = [np.array(x) if isinstance(x, np.ndarray) else x for x in leaves]
    leaves = [bk.stop_gradient(bk.asarray(x, dtype=native_dtype, device=dev)) for x in leaves]
    for i, x in enumerate(leaves):
        bk.check_argument(x, f"parameter leaf {i}")
    for x in _pytree.collect_arrays(args):  # fail here, not deep inside the first product
        if bk.owns(x):
            bk.check_device(x, dev, "an argument of the loss")
    batches, leaves, dev = make_batches(
        bk,
        leaves,
        dev,
        native_dtype,
        args=args,
        data=data,
        reduction=reduction,
        batch_size=batch_size,
        distributed=distributed,
        process_group=process_group,
    )
    loss = Loss(f, spec, bk, allow_randomness=allow_randomness, seed=seed, device=dev, what="f")
    if loss.seed is not None:
        _check_fixed_seed_mode(mode)
    watch = StateWatch()
    for i, x in enumerate(leaves):
        watch.add_array(f"parameter leaf {spec.paths[i] or i}", x)
    for i, x in enumerate(_pytree.collect_arrays(batches.args or ())):
        watch.add_array(f"array {i} of the arguments", x)
    watch.add_function(f, "f")
    return build_hessian(
        loss,
        leaves,
        batches,
        watch,
        backend=bk,
        device=dev,
        mode=mode,
        cache=cache,
        chunk_size=chunk_size,
        compile=compile,
        differentiable=differentiable,
    )


def make_batches(
    bk: Backend,
    leaves: list[Any],
    device: Any,
    dtype: Any,
    *,
    args: tuple[Any, ...],
    data: Iterable[Any] | None,
    reduction: str,
    batch_size: Callable[[tuple[Any, ...]], int] | None,
    distributed: bool,
    process_group: Any,
) -> tuple[Batches, list[Any], Any]:
    """The :class:`Batches` of an operator, with the distributed reduction when asked;
    returns them with the leaves and device (a data-parallel operator places both)."""
    reducer = None
    if distributed:
        from .distributed import make_reducer

        reducer = make_reducer(bk, process_group)
        leaves, device = reducer.prepare(leaves, device)

    def convert(batch_args: tuple[Any, ...]) -> tuple[Any, ...]:
        if reducer is not None:
            batch_args = reducer.shard_batch(batch_args, dtype)
        out = tuple(_pytree.map_arrays(lambda x: convert_arg(bk, x, dtype, device), batch_args))
        _pytree.tree_map(lambda x: bk.check_argument(x, "an argument of the loss"), out)
        return out

    batches = Batches(
        convert(args) if data is None else None,
        data,
        reduction=reduction,
        batch_size=batch_size,
        convert=convert,
        reducer=reducer,
    )
    return batches, leaves, device


def _check_data(data: Any, args: tuple[Any, ...], distributed: bool) -> None:
    if args:
        raise TypeError("pass either *args or data=, not both")
    if not isinstance(data, Iterable):
        raise TypeError(f"data= must be an iterable of argument tuples, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(
            "data= must be re-iterable (a list, tuple or DataLoader): every matrix-vector "
            "product streams it again, and a one-shot iterator or generator would be "
            "exhausted after the first; wrap it with list(...) if it fits in memory"
        )
    if hasattr(data, "__len__") and len(data) == 0 and not distributed:
        raise EmptyDataError("data= is empty; pass at least one batch")


def _check_fixed_seed_mode(mode: str) -> None:
    if mode not in ("auto", "reverse-over-reverse", "finite-difference"):
        raise ValueError(
            f"allow_randomness='fixed-seed' works with modes 'auto', 'reverse-over-reverse' "
            f"and 'finite-difference', not {mode!r}: that mode batches products with vmap, "
            "which refuses random operations; use mode='reverse-over-reverse'"
        )


def place(bk: Backend, leaves: list[Any], device: Any, dtype: Any) -> tuple[Any, Any]:
    """The device and native dtype of an operator with these parameter leaves; checks that
    the leaves are real floating arrays on one device and that the point is not empty."""
    dev = bk.resolve_device(device) if device is not None else None
    if dev is None:
        natives = [x for x in leaves if bk.owns(x)]
        dev = bk.device_of(natives[0]) if natives else bk.default_device()
    dtypes: dict[Any, str] = {}  # each distinct dtype once: its name, checked floating
    empty = True
    for i, x in enumerate(leaves):
        if not hasattr(x, "dtype"):
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise DTypeError(
                    f"parameter leaf {i} is a Python {type(x).__name__}, not an array; the "
                    "parameters must be floating point arrays (or real numbers)"
                )
            empty = False  # a Python number
            continue
        empty = empty and math.prod(x.shape) == 0
        native = bk.owns(x)
        name = bk.name if native else check_framework(bk, x, f"parameter leaf {i}")
        if x.dtype not in dtypes:
            bk_x = bk if native else get_backend(name or bk.name)
            bk_x.check_floating(x.dtype, f"parameter leaf {i}")
            dtypes[x.dtype] = bk_x.dtype_name(x.dtype)
        if device is None and native:
            bk.check_device(x, dev, f"parameter leaf {i}")
    if empty:
        raise ShapeError(
            "the parameters have no entries (every leaf has size 0), so there is nothing to "
            "differentiate; pass the parameters the loss depends on"
        )
    if dtype is not None:
        return dev, native_dtype(bk, dtype, "dtype=")
    names = set(dtypes.values()) or {"float64"}  # Python floats as leaves
    if len(names) > 1:
        raise DTypeError(
            f"the parameter leaves have different dtypes {sorted(names)}; pass dtype= to choose one"
        )
    return dev, bk.dtype(names.pop())

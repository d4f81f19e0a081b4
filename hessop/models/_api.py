"""Model-level Hessians: :func:`model_hessian` and :func:`model_hvp`.

Both turn a model and a loss into the scalar function ``loss_fn(model(x), y)`` of the
parameters and build its operator with the core's machinery (modes, caching, streaming,
the snapshot contract). :func:`prepare` is shared with :func:`hessop.model_ggn` and
:func:`hessop.model_fisher`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .. import _checks, _pytree
from .._errors import EmptyDataError, LossError, ShapeError, unknown
from .._hessian import (
    HessianOperator,
    _check_fixed_seed_mode,
    build_hessian,
    canonical_mode,
    make_batches,
    place,
)
from .._loss import Loss
from .._operator import native_dtype
from .._sharing import ShareKey
from .._state import StateWatch, used_at_once
from .._streamed import REDUCTIONS, Batches
from ..backends import Backend, framework_of_object, get_backend, resolve_backend
from ._data import ModelBatches, as_pair, converter, is_single_batch, sample_count
from ._functional import FunctionalModel

#: what ``loss_fn.reduction`` may say, and what it means for how batches combine
_DECLARED = {"mean": "mean", "sum": "sum", "batchmean": "mean"}


@dataclass
class Prepared:
    """A model's loss, ready for an operator: the adapter, the checked loss of the
    parameter leaves, the batches and the state to watch."""

    model: Any
    loss: Loss
    leaves: list[Any]
    batches: Batches
    watch: StateWatch
    backend: Backend
    device: Any


def share_key(p: Prepared, kind: str) -> ShareKey | None:
    """The key under which ``kind`` operators (``"ggn"``, ``"fisher"``) of the same model
    functions, loss, layout and watched state share their compiled functions, so that an
    operator per batch compiles once (None: not shared; a module adapter holds tensors of
    its own and has no ``key``)."""
    key = getattr(p.model, "key", None)
    if key is None or not p.watch.shareable:
        return None
    loss = p.loss
    return ShareKey((kind, loss.key, loss.spec, loss.seed, p.watch.key()), p.watch.kept())


def _adapter(model, loss_fn, params, backend, dtype, device, allow_randomness, seed, data):
    """The model adapter and its backend: a framework module (an ``nn.Module``) or a
    function ``apply(params, x)`` with ``params=``."""
    owner = framework_of_object(model)
    if owner is not None:
        if backend not in (None, owner):
            raise ValueError(
                f"the model is a {owner} module, but backend={backend!r}; drop backend= or "
                f"pass backend={owner!r} (for a functional model pass apply(params, x) and "
                "params=)"
            )
        bk = get_backend(owner)
        if device is not None:
            device = bk.resolve_device(device)
        if dtype is not None:
            dtype = native_dtype(bk, dtype, "dtype=")
        adapter = bk.module_model(
            model,
            loss_fn,
            params=params,
            dtype=dtype,
            device=device,
            allow_randomness=allow_randomness,
            seed=seed,
        )
        if adapter is not None:
            return adapter, bk, adapter.device
    if not callable(model):
        raise TypeError(
            "model must be a torch nn.Module or a function apply(params, x); got "
            f"{type(model).__name__}"
        )
    if params is None:
        FunctionalModel(model, loss_fn, params, None)  # raises the explanation
    leaves, _ = _pytree.flatten(params)
    bk = resolve_backend(backend, leaves, data if is_single_batch(data) else ())
    dev, _ = place(bk, leaves, device, dtype)
    return FunctionalModel(model, loss_fn, params, bk, dev), bk, dev


def _reduction(loss_fn: Any, reduction: str | None) -> str:
    """How batches combine: ``reduction`` if given, else what ``loss_fn`` declares."""
    if reduction is not None and reduction not in REDUCTIONS:
        raise unknown("reduction", reduction, REDUCTIONS)
    declared = getattr(loss_fn, "reduction", None)
    if isinstance(declared, str):
        if declared == "none":
            raise LossError(
                "loss_fn has reduction='none': it returns one loss per sample, but the "
                "operator needs the batch's scalar loss; use reduction='mean' or 'sum' (for "
                "per-sample curvature see hessop.model_fisher and hessop.per_sample_hessians)"
            )
        if declared in _DECLARED:
            if reduction is None:
                return _DECLARED[declared]
            if reduction != _DECLARED[declared]:
                raise ValueError(
                    f"loss_fn reduces each batch with reduction={declared!r}, but "
                    f"reduction={reduction!r} was passed: batches would be weighted for the "
                    f"wrong loss. Drop reduction= (it is read from loss_fn), or pass "
                    f"reduction={_DECLARED[declared]!r}"
                )
    return "mean" if reduction is None else reduction


def prepare(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    data: Any,
    *,
    params: Any = None,
    backend: str | None = None,
    mode: str = "auto",
    dtype: Any = None,
    device: Any = None,
    batch_size: Callable[..., int] | None = None,
    reduction: str | None = None,
    allow_randomness: str | None = None,
    seed: int = 0,
    distributed: bool = False,
    process_group: Any = None,
) -> Prepared:
    """Everything a model-level operator needs (see :class:`Prepared`)."""
    mode = canonical_mode(mode)
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a function loss_fn(output, target) -> scalar (or a loss "
            f"module), got {type(loss_fn).__name__}"
        )
    reduction = _reduction(loss_fn, reduction)
    distributed = _checks.flag(distributed, "distributed")
    seed = _checks.integer(seed, "seed")
    if batch_size is not None and not callable(batch_size):
        raise TypeError("batch_size must be a function batch_size(x, y) -> int")
    adapter, bk, dev = _adapter(
        model, loss_fn, params, backend, dtype, device, allow_randomness, seed, data
    )
    leaves, spec = _pytree.flatten(adapter.params)
    _, native_dtype = place(bk, leaves, dev, dtype)
    leaves = [bk.stop_gradient(bk.asarray(x, dtype=native_dtype, device=dev)) for x in leaves]
    convert = converter(bk, native_dtype, dev)
    size = None if batch_size is None else (lambda args: batch_size(*args))
    if is_single_batch(data) and not distributed:
        args, stream = convert(as_pair(data)), None
        if sample_count(args) == 0:  # a mean over no samples is NaN, a sum 0: no curvature
            raise EmptyDataError("the batch (x, y) has no samples (leading dimension 0)")
    else:
        if is_single_batch(data):
            data = [data]  # distributed: this process's one local batch
        if not isinstance(data, Iterable):
            raise TypeError(
                "data must be one (x, y) batch or an iterable of (x, y) batches, got "
                f"{type(data).__name__}"
            )
        args, stream = (), ModelBatches(data, convert, bk, dev)
        if not distributed:
            stream.first()  # an empty iterable fails here, not at the first product
    batches, leaves, dev = make_batches(
        bk,
        leaves,
        dev,
        native_dtype,
        args=args,
        data=stream,
        reduction=reduction,
        batch_size=size,
        distributed=distributed,
        process_group=process_group,
    )
    key = getattr(adapter, "key", None)
    checks_key = getattr(adapter, "checks_key", None)
    loss = Loss(
        adapter.loss,
        spec,
        bk,
        allow_randomness=allow_randomness,
        seed=seed,
        device=dev,
        what="loss_fn(model(x), y)",
        key=(key, reduction) if key is not None else None,
        checks_key=(checks_key, reduction) if checks_key is not None else None,
    )
    if loss.seed is not None:
        _check_fixed_seed_mode(mode)
    watch = StateWatch()
    for name, x in zip(spec.paths, leaves):
        watch.add_array(f"parameter {name}", x)
    for i, x in enumerate(_pytree.collect_arrays(batches.args or ())):
        watch.add_array(f"array {i} of the batch", x)
    adapter.watch(watch)
    return Prepared(adapter, loss, leaves, batches, watch, bk, dev)


def model_hessian(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    data: Any,
    *,
    params: Any = None,
    backend: str | None = None,
    mode: str = "auto",
    dtype: Any = None,
    device: Any = None,
    batch_size: Callable[..., int] | None = None,
    reduction: str | None = None,
    cache: bool | None = None,
    chunk_size: int | None = None,
    compile: bool = False,
    allow_randomness: str | None = None,
    seed: int = 0,
    distributed: bool = False,
    process_group: Any = None,
) -> HessianOperator:
    """The Hessian of a model's loss with respect to its parameters, as an operator.

    The loss is ``loss_fn(model(x), y)``; the operator is a :class:`hessop.HessianOperator`
    (every mode, ``matvec``/``matmat``/``to_dense``/``to_scipy``/``ravel``/``unravel``,
    ``loss_and_gradient()``), built by the machinery of :func:`hessop.hessian`.

    Parameters
    ----------
    model :
        A torch ``nn.Module``, or a function ``apply(params, x)`` (JAX, or torch on a
        parameter pytree) together with ``params=``.
    loss_fn :
        ``loss_fn(output, target) -> scalar``: a loss module (``nn.CrossEntropyLoss()``) or
        a function (``optax``-style in JAX).
    data :
        One batch ``(x, y)`` (a tuple or list of two items whose first item is an array or
        a dict of arrays), or an iterable of such batches (a list of pairs, a
        ``DataLoader``): the loss over the dataset, streamed batch by batch, each batch
        weighted by its size. ``x`` is passed to the model as one argument (a dict stays a
        dict). A multi-input model with ``x`` a tuple must be given a list of batches,
        ``[((x1, x2), y)]``, to be unambiguous. Floating arrays are converted to the
        operator's dtype and device; integer arrays (labels, token ids) keep their dtype.
    params :
        torch: which parameters to differentiate: ``None`` (every parameter with
        ``requires_grad``), a list of names (or of parameter tensors), or a predicate
        ``(name, param) -> bool``. The rest, and the buffers, are held fixed. The flat
        layout follows ``model.named_parameters()`` order whatever the order of the list.
        Functional models: the parameter pytree (required).
    backend : {"torch", "jax"}, optional
        Inferred from the model or the parameters.
    mode : str
        As in :func:`hessop.hessian`; ``"auto"`` is reverse-over-reverse in torch (which
        works with every op that has a double-backward, also where forward-mode AD is
        missing) and forward-over-reverse in JAX.
    dtype, device : optional
        Compute in this dtype / on this device (default: the parameters'); the model's
        other parameters, its floating buffers and the batches are converted alike.
    batch_size : callable, optional
        ``batch_size(x, y) -> int``, the size that weighs a batch of ``data``. By default
        it is the leading dimension of the first array in ``x`` (for a dict, its first
        entry in insertion order), else of ``y``.
    reduction : {"mean", "sum"}, optional
        How batches combine: the size-weighted mean ``sum_b n_b L_b / sum_b n_b`` of batch
        means, or the plain sum of batch sums. Default: what ``loss_fn.reduction`` says
        (torch loss modules), else ``"mean"``; a value that contradicts
        ``loss_fn.reduction`` is an error.
    cache, chunk_size, compile, distributed, process_group :
        As in :func:`hessop.hessian` (``cache`` defaults to on for one batch, off for a
        dataset).
    allow_randomness : {None, "fixed-seed"}
        A loss that draws random numbers (dropout in training mode) has no Hessian and is
        refused, naming the module. ``"fixed-seed"`` makes it deterministic instead:
        every evaluation seeds the global generators with ``seed`` in a scope that
        restores them, so every product sees the same dropout mask (modes ``auto``,
        ``reverse-over-reverse`` and ``finite-difference``).
    seed : int
        The seed of ``allow_randomness="fixed-seed"``.

    Notes
    -----
    Nothing about the model changes: BatchNorm in training mode normalizes with batch
    statistics without updating its running statistics, ``.grad`` is never written,
    ``model.training`` is left alone, and the global RNG states are left as they were.
    The operator is the Hessian of the model **as it was when the operator was built**:
    its parameters, buffers and train/eval flags are not copied but watched, and every use
    after any of them changed (an optimizer step, ``model.eval()``) raises
    :class:`~hessop.StaleOperatorError`; build a new operator instead.

    Examples
    --------
    >>> import torch, hessop
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> model = model.double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    >>> H = hessop.model_hessian(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> H.shape, H.mode
    ((26, 26), 'reverse-over-reverse')
    >>> last = hessop.model_hessian(model, torch.nn.CrossEntropyLoss(), (x, y),
    ...                             params=["2.weight", "2.bias"])
    >>> last.shape
    (10, 10)
    >>> batches = [(x[:5], y[:5]), (x[5:], y[5:])]   # the same loss, streamed
    >>> Hd = hessop.model_hessian(model, torch.nn.CrossEntropyLoss(), batches)
    >>> v = torch.ones(26, dtype=torch.float64)
    >>> torch.allclose(H @ v, Hd @ v)
    True
    """
    p = prepare(
        model,
        loss_fn,
        data,
        params=params,
        backend=backend,
        mode=mode,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        reduction=reduction,
        allow_randomness=allow_randomness,
        seed=seed,
        distributed=distributed,
        process_group=process_group,
    )
    return build_hessian(
        p.loss,
        p.leaves,
        p.batches,
        p.watch,
        backend=p.backend,
        device=p.device,
        mode=canonical_mode(mode),
        cache=None if cache is None else _checks.flag(cache, "cache"),
        chunk_size=_checks.optional_integer(chunk_size, "chunk_size", minimum=1),
        compile=_checks.flag(compile, "compile"),
        differentiable=False,
    )


def model_hvp(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    x: Any,
    y: Any,
    v: Any,
    *,
    params: Any = None,
    backend: str | None = None,
    mode: str = "auto",
    **kw: Any,
) -> Any:
    """One Hessian-vector product of ``loss_fn(model(x), y)``: a one-call convenience.

    ``v`` is a flat vector (returns a flat vector), a params-shaped pytree (returns the
    same pytree: for an ``nn.Module`` a dict by parameter name), or, for an ``nn.Module``,
    a list of tensors in parameter order (returns a list). Other arguments as in
    :func:`model_hessian`. For several products build the operator once with
    :func:`model_hessian` instead: it reuses work between products.

    Examples
    --------
    >>> import torch, hessop
    >>> model = torch.nn.Linear(3, 1).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    >>> v = {"weight": torch.ones(1, 3, dtype=torch.float64),
    ...      "bias": torch.zeros(1, dtype=torch.float64)}
    >>> Hv = hessop.model_hvp(model, torch.nn.MSELoss(), x, y, v)
    >>> sorted(Hv), torch.allclose(Hv["weight"][0], 2 * x.T @ x.sum(1) / 5)
    (['bias', 'weight'], True)
    """
    kw.setdefault("cache", False)  # one product: do not keep the graph alive
    with used_at_once():  # H never leaves this call: nothing can change before its product
        H = model_hessian(model, loss_fn, (x, y), params=params, backend=backend, mode=mode, **kw)
    spec = H.spec
    if _pytree.is_array(v) and (spec.root is not None or len(v.shape) == 1):
        if tuple(v.shape) != (H.shape[0],):
            raise ShapeError(
                f"v has shape {tuple(v.shape)}; pass a flat vector of length {H.shape[0]} or "
                f"a params-shaped pytree ({spec.describe()})"
            )
        return H.matvec(v)  # checks the length, the framework, dtype and device
    point = _pytree.unflatten(spec, list(H._leaves))  # (H.params would spend the skipped check)
    if isinstance(v, (list, tuple)) and isinstance(point, dict) and spec.root is not None:
        if len(v) != spec.num_leaves:
            raise ShapeError(
                f"v has {len(v)} entries but {spec.num_leaves} parameters are selected "
                f"({spec.describe()})"
            )
        out = H.unravel(H @ H.ravel(dict(zip(point, v))))
        return type(v)(out.values())
    return H.unravel(H @ H.ravel(v))

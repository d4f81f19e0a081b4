"""Model-level Hessians: :func:`model_hessian` and :func:`model_hvp`.

Both turn a model and a loss into the scalar function ``f(params, x, y)`` that
:func:`hessop.hessian` differentiates; the modes, the caching and the dataset streaming
are the core's. :func:`prepare` is shared with :func:`hessop.model_ggn` and
:func:`hessop.model_fisher`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from .. import _pytree
from .._hessian import HessianOperator, _resolve_dtype, canonical_mode, hessian
from ..backends import get_backend, infer_backend
from ._data import Batches, as_pair, converter, is_array, is_single_batch

#: modes that keep a random loss deterministic under allow_randomness="fixed-seed": the
#: others batch products with vmap, which refuses random operations
_FIXED_SEED_MODES = ("auto", "reverse-over-reverse", "finite-difference")


def is_torch_module(model: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _framework(model: Any, params: Any, data: Any, backend: str | None) -> str:
    if is_torch_module(model):
        if backend not in (None, "torch"):
            raise ValueError(
                f"an nn.Module is a torch model, but backend={backend!r}; drop backend= or "
                "pass backend='torch' (for JAX pass apply(params, x) and params=)"
            )
        return "torch"
    if not callable(model):
        raise TypeError(
            "model must be a torch nn.Module or a function apply(params, x); got "
            f"{type(model).__name__}"
        )
    if backend is not None:
        return backend
    if params is not None:
        leaves, _ = _pytree.flatten(params)
        names = {infer_backend(x) for x in leaves} - {"numpy", None}
        if len(names) == 1:
            return names.pop()
    if is_single_batch(data):
        arrays: list[Any] = []
        _collect(data, arrays)
        names = {infer_backend(x) for x in arrays} - {"numpy", None}
        if len(names) == 1:
            return names.pop()
    raise TypeError(
        "cannot infer the framework from numpy arrays; pass backend='jax' or backend='torch'"
    )


def _collect(tree: Any, out: list[Any]) -> None:
    if isinstance(tree, dict):
        for v in tree.values():
            _collect(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _collect(v, out)
    elif is_array(tree):
        out.append(tree)


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
    reduction: str = "mean",
    cache: bool | None = None,
    allow_randomness: str | None = None,
    seed: int = 0,
    own_norms: str | None = None,
    **kw: Any,
) -> tuple[Any, HessianOperator]:
    """The model adapter and the :class:`HessianOperator` of ``loss_fn(model(x), y)``.

    ``own_norms``: an AD mode whose normalization decompositions the adapter applies on
    every forward pass, for products computed outside the Hessian's backend (GGN, Fisher);
    the backend applies its own.
    """
    name = _framework(model, params, data, backend)
    mode = canonical_mode(mode)
    if name == "torch" and is_torch_module(model):
        from ._torch_module import TorchModuleModel

        adapter: Any = TorchModuleModel(
            model, loss_fn, params, dtype, device, allow_randomness, seed
        )
        bk = get_backend("torch")
        native_dtype, dev = adapter.dtype, adapter.device
    else:
        from ._functional import FunctionalModel

        if allow_randomness is not None:
            raise ValueError(
                "allow_randomness= applies to torch nn.Modules; a functional model takes its "
                "randomness (a PRNG key) explicitly, so fix the key instead"
            )
        bk = get_backend(name)
        if params is None:
            FunctionalModel(model, loss_fn, params, name)  # raises the explanation
        leaves, _ = _pytree.flatten(params)
        native_dtype = _resolve_dtype(bk, leaves, dtype)
        if device is not None:
            dev = bk.resolve_device(device)
        else:
            natives = [x for x in leaves if bk.owns(x)]
            dev = bk.device_of(natives[0]) if natives else bk.default_device()
        adapter = FunctionalModel(model, loss_fn, params, name, dev)
    if allow_randomness is not None and kw.get("compile"):
        raise ValueError(
            "compile=True cannot be combined with allow_randomness: a compiled product "
            "does not re-seed the generators per call; pass compile=False"
        )
    if allow_randomness == "fixed-seed" and mode not in _FIXED_SEED_MODES:
        raise ValueError(
            f"allow_randomness='fixed-seed' works with modes {_FIXED_SEED_MODES}, not "
            f"{mode!r}: that mode batches products with vmap, which refuses random "
            "operations; use mode='reverse-over-reverse' or call model.eval()"
        )
    if name == "torch" and own_norms is not None:
        from ..backends._torch_norms import for_mode

        adapter.norms = for_mode(own_norms)
    convert = converter(bk, native_dtype, dev)
    size = None if batch_size is None else (lambda args: batch_size(*args))
    options = dict(
        backend=name,
        mode=mode,
        device=dev,
        dtype=native_dtype,
        reduction=reduction,
        batch_size=size,
        cache=cache,
        **kw,
    )
    if is_single_batch(data):
        first = convert(as_pair(data))
        H = hessian(adapter.loss, adapter.params, *first, **options)
    else:
        if not isinstance(data, Iterable):
            raise TypeError(
                "data must be one (x, y) batch or an iterable of (x, y) batches, got "
                f"{type(data).__name__}"
            )
        batches = Batches(data, convert, dev if name == "torch" else None)
        first = batches.first()
        H = hessian(adapter.loss, adapter.params, data=batches, **options)
    if hasattr(adapter, "check_deterministic"):
        adapter.check_deterministic(first)
    return adapter, H


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
    reduction: str = "mean",
    cache: bool | None = None,
    allow_randomness: str | None = None,
    seed: int = 0,
    **kw: Any,
) -> HessianOperator:
    """The Hessian of a model's loss with respect to its parameters, as an operator.

    The loss is ``loss_fn(model(x), y)``; the operator is a :class:`hessop.HessianOperator`
    (every mode, ``matvec``/``matmat``/``to_dense``/``to_scipy``/``ravel``/``unravel``,
    ``loss_and_gradient()``), built by :func:`hessop.hessian`.

    Parameters
    ----------
    model :
        A torch ``nn.Module``, or a function ``apply(params, x)`` (JAX, or torch on a
        parameter pytree) together with ``params=``.
    loss_fn :
        ``loss_fn(output, target) -> scalar``: a loss module (``nn.CrossEntropyLoss()``) or
        a function (``optax``-style in JAX). With ``reduction="mean"`` it must return the
        batch mean, with ``"sum"`` the batch sum.
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
    reduction : {"mean", "sum"}
        How batches combine: the size-weighted mean ``sum_b n_b L_b / sum_b n_b`` of batch
        means, or the plain sum of batch sums.
    cache : bool, optional
        As in :func:`hessop.hessian` (default: on for one batch, off for a dataset).
    allow_randomness : {None, "fixed-seed"}
        A loss that draws random numbers (dropout in training mode) has no Hessian and is
        refused, naming the module. ``"fixed-seed"`` makes it deterministic instead:
        every evaluation seeds torch's generator with ``seed`` in a forked RNG scope, so
        every product sees the same dropout mask (modes ``auto``, ``reverse-over-reverse``
        and ``finite-difference``).
    seed : int
        The seed of ``allow_randomness="fixed-seed"``.
    **kw :
        Passed to :func:`hessop.hessian` (``chunk_size``).

    Notes
    -----
    Nothing about the model changes: the operator works on a snapshot of the parameters
    taken at construction (through ``torch.func.functional_call``), BatchNorm in training
    mode normalizes with batch statistics without updating its running statistics,
    ``.grad`` is never written, ``model.training`` is left alone, and torch's, numpy's and
    Python's global RNG states are restored after every evaluation. The operator uses the
    model's train/eval flags as they are when a product runs.

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
    return prepare(
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
        cache=cache,
        allow_randomness=allow_randomness,
        seed=seed,
        **kw,
    )[1]


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
    H = model_hessian(model, loss_fn, (x, y), params=params, backend=backend, mode=mode, **kw)
    bk = get_backend(H.backend)
    d = H.shape[0]
    if bk.owns(v) and len(v.shape) == 1 and v.shape[0] == d:
        return H @ v
    spec = H.problem.spec
    ok, _ = _pytree.same_structure(spec, v)
    if not ok and isinstance(v, (list, tuple)) and isinstance(H.params, dict):
        if len(v) != spec.num_leaves:
            raise ValueError(
                f"v has {len(v)} entries but {spec.num_leaves} parameters are selected"
            )
        out = H.unravel(H @ H.ravel(dict(zip(H.params, v))))
        return type(v)(out.values())
    if not ok and not isinstance(v, (dict, list, tuple)) and hasattr(v, "shape"):
        raise ValueError(
            f"v has shape {tuple(v.shape)}; pass a flat vector of length {d} or a "
            f"params-shaped pytree ({spec.describe()})"
        )
    return H.unravel(H @ H.ravel(v))

"""An ``nn.Module`` and a loss as pure functions of (a subset of) the module's parameters.

:class:`TorchModuleModel` is what :func:`hessop.model_hessian` and friends differentiate:

* the **point** is the selected parameters, as a dict in ``named_parameters()`` order (so the
  flat layout follows that order). Neither they nor the other parameters and buffers are
  copied: the operator watches them (:mod:`hessop._state`), together with the modules'
  train/eval flags, and refuses to answer once any of them changed;
* every evaluation goes through :func:`torch.func.functional_call` with the selected
  parameters and, while any module is in training mode, **fresh clones of the buffers**, so
  BatchNorm in training mode normalizes with the batch statistics (the loss being
  differentiated) while its updates of ``running_mean``, ``running_var`` and
  ``num_batches_tracked`` land on throw-away copies;
* randomness in the loss (dropout in training mode) is refused before anything runs,
  naming the modules, because each product would then differentiate a different function.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..._errors import DTypeError, RandomnessError
from ..._loss import randomness_message
from ..._rng import preserve


def select_parameters(model: nn.Module, params: Any) -> list[str]:
    """Names of the selected parameters, in ``named_parameters()`` order.

    ``params`` is None (every parameter with ``requires_grad``), a name, a list of names or
    of parameter tensors, or a predicate ``(name, param) -> bool``.
    """
    named = list(model.named_parameters())
    if params is None:
        names = [n for n, p in named if p.requires_grad]
        if not names:
            raise ValueError(
                "the model has no parameter with requires_grad=True; select parameters "
                "explicitly with params=[names] or params=lambda name, p: ..."
            )
        return names
    if callable(params) and not isinstance(params, nn.Parameter):
        names = [n for n, p in named if params(n, p)]
        if not names:
            raise ValueError("the params= predicate selected no parameter")
        return names
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    if not isinstance(params, Iterable):
        raise TypeError(
            "params= must be None, a list of parameter names (or tensors), or a predicate "
            f"(name, param) -> bool; got {type(params).__name__}"
        )
    by_id = {id(p): n for n, p in named}
    known = dict(named)
    chosen: set[str] = set()
    unknown = []
    for item in params:
        if isinstance(item, torch.Tensor):
            if id(item) in by_id:
                chosen.add(by_id[id(item)])
            else:
                unknown.append(f"<tensor of shape {tuple(item.shape)}>")
        elif item in known:
            chosen.add(item)
        else:
            unknown.append(repr(item))
    if unknown:
        valid = ", ".join(known)
        raise ValueError(
            f"params= names unknown parameters {', '.join(unknown)}; the model's parameters "
            f"are: {valid}"
        )
    if not chosen:
        raise ValueError("params= selected no parameter")
    return [n for n, _ in named if n in chosen]


def module_groups(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """The parameters ``names`` grouped by the module that holds each directly (its name in
    ``named_modules()``, ``"<root>"`` for the model itself), in the order of ``names``.

    A parameter shared by two modules belongs to the one ``named_parameters()`` names it by.
    """
    owner: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            owner.setdefault(full, module_name or "<root>")
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(owner.get(n, n.rpartition(".")[0] or "<root>"), []).append(n)
    return groups


def random_modules(model: nn.Module, named: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Modules that draw random numbers in their current mode (dropout with ``p > 0``);
    ``named`` is ``list(model.named_modules())`` when the caller has it."""
    found = []
    for name, m in model.named_modules() if named is None else named:
        if not m.training:
            continue
        p = None
        if isinstance(m, nn.modules.dropout._DropoutNd):
            p = m.p
        elif isinstance(m, nn.MultiheadAttention):
            p = m.dropout
        elif "drop" in type(m).__name__.lower():  # DropPath, StochasticDepth, ...
            p = getattr(m, "p", getattr(m, "drop_prob", None))
        if isinstance(p, (int, float)) and p > 0:
            found.append(f"{name or '<root>'} ({type(m).__name__}, p={p})")
    return found


_PLAIN = frozenset({bool, int, float, str, type(None), tuple})
_FUNCTIONS = frozenset({types.FunctionType, types.MethodType, functools.partial})
_DICTS = frozenset({dict, collections.OrderedDict})


def behaviour(modules: Iterable[nn.Module]) -> tuple[Any, ...]:
    """What decides how ``modules`` compute besides the contents of their tensors, as a
    hashable summary: their types, their plain attributes (``training``, ``p``, sizes), the
    hooks registered on them (by handle id, never reused), functions set on them (a
    replaced ``forward``) and, by identity, their parameters (with ``requires_grad``),
    buffers and submodules.

    Operators of a model with the same summary (and the same loss) run the same code:
    the checks of a loss's first evaluations (randomness, ``.item()``) need not run again,
    and the model's traversals (:func:`structure`) give the same names and tensors.
    (A tuple holding something unhashable makes the summary unhashable: never shared.)
    """
    out = []
    for m in modules:
        d = vars(m)
        items = d.items()
        out.append(
            (
                type(m),
                tuple([(k, v) for k, v in items if type(v) in _PLAIN]),
                tuple([(k, id(v)) for k, v in items if type(v) in _FUNCTIONS]),
                tuple([(k, tuple(v)) for k, v in items if type(v) in _DICTS and v and "hook" in k]),
                tuple(
                    [
                        (n, id(p), p.requires_grad)
                        for n, p in d["_parameters"].items()
                        if p is not None
                    ]
                ),
                tuple([(n, id(b)) for n, b in d["_buffers"].items()]),
                tuple([(n, id(c)) for n, c in d["_modules"].items()]),
            )
        )
    return tuple(out)


class Structure:
    """What traversing a model gives: its parameters and buffers by name, its submodules
    (not the model itself: a structure is cached under the model as a weak key), and the
    :func:`behaviour` summary of the model and its submodules that says whether this
    still holds."""

    __slots__ = ("summary", "named", "buffers", "submodules")

    def __init__(self, model: nn.Module) -> None:
        self.named = dict(model.named_parameters())
        self.buffers = {n: b for n, b in model.named_buffers() if b is not None}
        self.submodules = list(model.named_modules())[1:]
        self.summary = behaviour([model, *(m for _, m in self.submodules)])


#: the last structure of each model
_STRUCTURES: weakref.WeakKeyDictionary[nn.Module, Structure] = weakref.WeakKeyDictionary()


def structure(model: nn.Module) -> Structure:
    """The model's :class:`Structure`, reused from its last build when its summary is the
    same: every parameter, buffer and submodule the same object, the same flags,
    ``requires_grad``, attributes and hooks (an operator per batch traverses nothing)."""
    found = _STRUCTURES.get(model)
    if found is not None and behaviour([model, *(m for _, m in found.submodules)]) == (
        found.summary
    ):
        return found
    found = _STRUCTURES[model] = Structure(model)
    return found


def batchnorm_modules(model: nn.Module) -> list[str]:
    """BatchNorm-like modules in training mode (they couple the samples of a batch)."""
    return [
        f"{name or '<root>'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


#: one lock per module: torch.func.functional_call swaps the module's parameters in place
#: for the length of a forward pass, so two concurrent calls on one module swap each other's
#: tensors, compute with the wrong ones and can leave plain tensors where the user's
#: nn.Parameters were
_CALL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_CALL_LOCKS_GUARD = threading.Lock()


def call_lock(model: nn.Module) -> threading.RLock:
    """The lock that serializes hessop's forward passes through ``model``."""
    with _CALL_LOCKS_GUARD:
        lock = _CALL_LOCKS.get(model)
        if lock is None:
            lock = _CALL_LOCKS[model] = threading.RLock()
        return lock


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


class TorchModuleModel:
    """``model`` and ``loss_fn`` as pure functions of the selected parameters.

    Attributes
    ----------
    params : dict
        The point: the selected parameters (detached, not copied unless ``dtype``/``device``
        convert them), by name, in ``named_parameters()`` order.
    """

    def __init__(
        self,
        backend: Any,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Any],
        params: Any = None,
        dtype: Any = None,
        device: Any = None,
        allow_randomness: str | None = None,
        seed: int = 0,
    ) -> None:
        self.backend, self.model, self.loss_fn = backend, model, loss_fn
        self._call_lock = call_lock(model)
        found = structure(model)
        named = found.named
        if params is None:  # the trainable ones: part of the summary, so the same
            self.names = [n for n, p in named.items() if p.requires_grad]
        if params is not None or not self.names:
            self.names = select_parameters(model, params)  # (or the error that none is)
        dtypes = {named[n].dtype for n in self.names}
        if dtype is None:
            if len(dtypes) > 1:
                raise DTypeError(
                    f"the selected parameters have different dtypes {sorted(map(str, dtypes))}; "
                    "pass dtype= to compute in one"
                )
            dtype = dtypes.pop()
        elif not isinstance(dtype, torch.dtype):
            dtype = backend.dtype(dtype)
        if device is None:
            device = named[self.names[0]].device
        self.dtype, self.device = dtype, torch.device(device)

        def native(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            if t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            return t.to(self.device)

        chosen = set(self.names)
        self.params = {n: native(named[n]) for n in self.names}
        self.fixed = {n: native(p) for n, p in named.items() if n not in chosen}
        self.buffers = {n: native(b) for n, b in found.buffers.items()}
        named_modules = [("", model), *found.submodules]
        self.modules = [m for _, m in named_modules]
        # Whether a forward pass may update buffers in place (BatchNorm in training mode);
        # the flags are watched, so this holds for the operator's life.
        self.training = any(m.training for m in self.modules)
        self.seed = int(seed) if allow_randomness == "fixed-seed" else None
        self.allow_randomness = allow_randomness
        #: the model's identity and what decides its code path, for Loss.skip_checks_if_seen
        #: (no reference to the model: the key outlives the operator)
        loss_modules = list(loss_fn.modules()) if isinstance(loss_fn, nn.Module) else []
        self.checks_key = (
            "module",
            id(model),
            found.summary,
            behaviour(loss_modules),
            loss_fn,
            tuple(self.names),
            dtype,
            self.device,
        )
        if allow_randomness is None:
            drawing = random_modules(model, named_modules)
            if drawing:
                raise RandomnessError(
                    randomness_message(
                        "modules in training mode draw dropout masks: " + "; ".join(drawing)
                    )
                )

    # --- what the operator watches --------------------------------------------------------
    def watch(self, watch: Any) -> None:
        """Record the state the loss reads besides the point: the other parameters, the
        buffers, the train/eval flags, and what ``loss_fn`` reads."""
        for n, t in {**self.fixed, **self.buffers}.items():
            watch.add_array(f"{'buffer' if n in self.buffers else 'parameter'} {n!r}", t)
        modules = self.modules
        watch.add_flags(
            f"the train/eval mode of the {type(self.model).__name__}",
            lambda: tuple(m.training for m in modules),
        )
        watch.add_function(self.loss_fn, "loss_fn")

    # --- pure functions -------------------------------------------------------------------
    def scope(self) -> Any:
        """The RNG scope of one evaluation outside :class:`hessop._loss.Loss` (GGN and
        Fisher products): seeded with ``allow_randomness='fixed-seed'``."""
        if self.seed is None or _is_compiling():
            return contextlib.nullcontext()
        return preserve(self.backend, self.device, self.seed)

    def output(self, p: dict[str, Any], x: Any) -> Any:
        """The model's output at parameters ``p`` (the selected ones) on input ``x``."""
        buffers = self.buffers
        if self.training:
            # A training-mode BatchNorm updates its running statistics in place: those
            # updates must land on copies.
            buffers = {n: b.clone() for n, b in buffers.items()}
        tensors = {**self.fixed, **buffers, **p}
        if _is_compiling():  # traced into a graph: nothing is swapped at run time
            return torch.func.functional_call(self.model, tensors, (x,))
        with self._call_lock:
            return torch.func.functional_call(self.model, tensors, (x,))

    def loss(self, p: dict[str, Any], x: Any, y: Any) -> Any:
        """``loss_fn(model(x), y)`` at parameters ``p``."""
        return self.loss_fn(self.output(p, x), y)

    def per_sample_error(self) -> str | None:
        """Why the loss does not split into per-sample losses (None when it does)."""
        found = batchnorm_modules(self.model)
        if found:
            return (
                "BatchNorm in training mode couples the samples of a batch: "
                + "; ".join(found)
                + ". Call model.eval()"
            )
        return None

    def describe(self) -> str:
        return f"{type(self.model).__name__} ({len(self.names)} parameter tensors)"

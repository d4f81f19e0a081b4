"""An ``nn.Module`` and a loss as pure functions of (a subset of) the module's parameters.

:class:`TorchModuleModel` is what :func:`hessop.model_hessian` and friends differentiate:

* the **point** is the selected parameters at construction, as a dict in
  ``named_parameters()`` order (so the flat layout follows that order); it, the other
  parameters and the buffers are private copies (:func:`hessop.hessian` copies the point),
  so later updates of the model (an optimizer step) neither change the operator nor clash
  with its cached graph;
* every evaluation goes through :func:`torch.func.functional_call` with the selected
  parameters, snapshots of the others (held fixed) and **fresh clones of the buffers**, so
  BatchNorm in training mode normalizes with the batch statistics (the loss being
  differentiated) while the updates of ``running_mean``, ``running_var`` and
  ``num_batches_tracked`` land on throw-away copies;
* every evaluation runs under :func:`~hessop.models._rng.preserve_rng`, so no global RNG
  state moves;
* randomness in the loss (dropout in training mode) is refused before anything runs,
  because each product would then differentiate a different function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._errors import DTypeError, RandomnessError
from ..backends._torch import autodiff_context
from ._rng import preserve_rng


def norms_context(kinds: frozenset[str]) -> Any:
    """Decompose the normalizations ``kinds`` while active (nothing when empty)."""
    if not kinds:
        return contextlib.nullcontext()
    from ..backends._torch_norms import CompositeNorms

    return CompositeNorms(kinds)


#: values of ``allow_randomness``
RANDOMNESS_OPTIONS = (None, "fixed-seed")


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
    wanted = list(params)
    by_id = {id(p): n for n, p in named}
    chosen: set[str] = set()
    unknown = []
    for item in wanted:
        if isinstance(item, torch.Tensor):
            if id(item) in by_id:
                chosen.add(by_id[id(item)])
            else:
                unknown.append(f"<tensor of shape {tuple(item.shape)}>")
        elif item in dict(named):
            chosen.add(item)
        else:
            unknown.append(repr(item))
    if unknown:
        valid = ", ".join(n for n, _ in named)
        raise ValueError(
            f"params= names unknown parameters {', '.join(unknown)}; the model's parameters "
            f"are: {valid}"
        )
    if not chosen:
        raise ValueError("params= selected no parameter")
    return [n for n, _ in named if n in chosen]


def random_modules(model: nn.Module) -> list[str]:
    """Modules that draw random numbers in their current mode (dropout with ``p > 0``)."""
    found = []
    for name, m in model.named_modules():
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


def batchnorm_modules(model: nn.Module) -> list[str]:
    """BatchNorm-like modules in training mode (they couple the samples of a batch)."""
    return [
        f"{name or '<root>'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


def _randomness_message(what: str) -> str:
    return (
        f"the loss is random: {what}. Each product would differentiate a different function, "
        "so the operator would not be a fixed matrix. Fix: call model.eval() (to differentiate "
        "the deterministic network), or pass allow_randomness='fixed-seed' to draw the same "
        "random numbers (the same dropout mask) in every evaluation, from a fixed local seed "
        "(seed=...)."
    )


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


class TorchModuleModel:
    """``model`` and ``loss_fn`` as pure functions of the selected parameters.

    Attributes
    ----------
    params : dict
        The point: snapshots of the selected parameters, by name, in
        ``named_parameters()`` order.
    """

    framework = "torch"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Any],
        params: Any = None,
        dtype: Any = None,
        device: Any = None,
        allow_randomness: str | None = None,
        seed: int = 0,
    ) -> None:
        if allow_randomness not in RANDOMNESS_OPTIONS:
            from .._errors import unknown

            raise unknown("allow_randomness option", allow_randomness, ["fixed-seed"])
        self.model, self.loss_fn = model, loss_fn
        self.names = select_parameters(model, params)
        named = dict(model.named_parameters())
        dtypes = {named[n].dtype for n in self.names}
        if dtype is None:
            if len(dtypes) > 1:
                raise DTypeError(
                    f"the selected parameters have different dtypes {sorted(map(str, dtypes))}; "
                    "pass dtype= to compute in one"
                )
            dtype = dtypes.pop()
        elif not isinstance(dtype, torch.dtype):
            from ..backends import get_backend

            dtype = get_backend("torch").dtype(dtype)
        if device is None:
            device = named[self.names[0]].device
        self.dtype, self.device = dtype, torch.device(device)
        convert = dtype not in dtypes or len(dtypes) > 1

        def snapshot(t: torch.Tensor, copy: bool = True) -> torch.Tensor:
            t = t.detach()
            if convert and t.is_floating_point():
                t = t.to(dtype)
            t = t.to(self.device)
            # A copy: the operator lives at this point even if the model is updated later.
            return t.clone() if copy else t

        chosen = set(self.names)
        # hessop.hessian() takes its own private copy of the point itself.
        self.params = {n: snapshot(named[n], copy=False) for n in self.names}
        self.fixed = {n: snapshot(p) for n, p in named.items() if n not in chosen}
        self.buffers = {n: snapshot(b) for n, b in model.named_buffers() if b is not None}
        self.seed = int(seed) if allow_randomness == "fixed-seed" else None
        #: normalizations computed from elementary ops (per mode: backends/_torch_norms)
        self.norms: frozenset[str] = frozenset()
        self.allow_randomness = allow_randomness
        if allow_randomness is None:
            found = random_modules(model)
            if found:
                raise RandomnessError(
                    _randomness_message(
                        "modules in training mode draw dropout masks: " + "; ".join(found)
                    )
                )

    # --- pure functions -----------------------------------------------------------------
    def rng(self) -> Any:
        """The RNG scope of one evaluation (preserved, and seeded with 'fixed-seed')."""
        if self.seed is None and _is_compiling():
            # Inside compile=True's compiled product (which torch.compile cannot trace a
            # snapshot of the global generators into): the loss was checked to draw
            # nothing at construction, and the generators are not touched.
            return contextlib.nullcontext()
        return preserve_rng(self.device, self.seed)

    def output(self, p: dict[str, Any], x: Any) -> Any:
        """The model's output at parameters ``p`` (the selected ones) on input ``x``."""
        # Buffers are cloned per call: a training-mode BatchNorm updates its running
        # statistics in place, and those updates must land on copies.
        tensors = {**self.fixed, **{n: b.clone() for n, b in self.buffers.items()}, **p}
        with self.rng(), norms_context(self.norms):
            return torch.func.functional_call(self.model, tensors, (x,))

    def loss(self, p: dict[str, Any], x: Any, y: Any) -> Any:
        """``loss_fn(model(x), y)`` at parameters ``p``."""
        out = self.output(p, x)
        with self.rng():
            return self.loss_fn(out, y)

    def check_deterministic(self, batch: tuple[Any, Any]) -> None:
        """Run the loss once and refuse it if it advanced torch's generator.

        Catches randomness that no module attribute reveals (``F.dropout(x, p, True)`` in a
        custom ``forward``). The generators are restored afterwards.
        """
        if self.seed is not None:
            return
        gens = [torch.default_generator]
        if self.device.type == "cuda":
            gens.append(torch.cuda.default_generators[self.device.index or 0])
        with preserve_rng(self.device), autodiff_context(), torch.no_grad():
            before = [g.get_state() for g in gens]
            tensors = {**self.fixed, **{n: b.clone() for n, b in self.buffers.items()}}
            out = torch.func.functional_call(self.model, {**tensors, **self.params}, (batch[0],))
            self.loss_fn(out, batch[1])
            moved = any(not torch.equal(b, g.get_state()) for b, g in zip(before, gens))
        if moved:
            raise RandomnessError(
                _randomness_message(
                    "the forward pass drew random numbers from torch's generator (for example "
                    "F.dropout(..., training=True) in a custom forward, or a random "
                    "augmentation)"
                )
            )

    def describe(self) -> str:
        return f"{type(self.model).__name__} ({len(self.names)} parameter tensors)"

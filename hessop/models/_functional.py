"""A functional model ``apply(params, x)`` and a loss, in JAX (or torch on a parameter dict)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._rng import preserve


class FunctionalModel:
    """``apply(params, x)`` and ``loss_fn(output, y)`` as pure functions of ``params``.

    The JAX way to write a model (Flax's ``model.apply``, Haiku's ``transformed.apply``,
    Equinox with ``eqx.partition``); torch functions of a parameter dict work the same way.
    Everything it reads besides its arguments is watched through ``apply`` and ``loss_fn``.
    """

    def __init__(
        self,
        apply: Callable[[Any, Any], Any],
        loss_fn: Callable[[Any, Any], Any],
        params: Any,
        backend: Any,
        device: Any = None,
    ) -> None:
        if params is None:
            raise TypeError(
                "a functional model apply(params, x) needs its parameters: pass params=, the "
                "pytree (dict / list / tuple of arrays) that apply takes"
            )
        self.apply, self.loss_fn, self.params = apply, loss_fn, params
        self.backend, self.device = backend, device
        self.seed: int | None = None
        #: what identifies the model when operators share compilations: the adapter holds
        #: no state of its own, so every adapter of the same functions computes the same
        self.key = ("functional", apply, loss_fn)

    def watch(self, watch: Any) -> None:
        """Record what ``apply`` and ``loss_fn`` read besides their arguments."""
        watch.add_function(self.apply, "apply")
        watch.add_function(self.loss_fn, "loss_fn")

    def scope(self) -> Any:
        """The RNG scope of one evaluation outside :class:`hessop._loss.Loss`: the global
        generators are restored (a torch function may draw from torch's)."""
        return preserve(self.backend, self.device)

    def output(self, p: Any, x: Any) -> Any:
        return self.apply(p, x)

    def loss(self, p: Any, x: Any, y: Any) -> Any:
        return self.loss_fn(self.apply(p, x), y)

    def per_sample_error(self) -> str | None:
        return None

    def describe(self) -> str:
        return getattr(self.apply, "__name__", type(self.apply).__name__)

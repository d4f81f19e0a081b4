"""A functional model ``apply(params, x)`` and a loss, in JAX (or torch)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ._rng import preserve_rng


class FunctionalModel:
    """``apply(params, x)`` and ``loss_fn(output, y)`` as pure functions of ``params``.

    The JAX way to write a model (Flax's ``model.apply``, Haiku's ``transformed.apply``,
    Equinox with ``eqx.partition``); torch functions of a parameter dict work the same way.
    """

    def __init__(
        self,
        apply: Callable[[Any, Any], Any],
        loss_fn: Callable[[Any, Any], Any],
        params: Any,
        framework: str,
        device: Any = None,
    ) -> None:
        if params is None:
            raise TypeError(
                "a functional model apply(params, x) needs its parameters: pass params=, the "
                "pytree (dict / list / tuple of arrays) that apply takes"
            )
        self.apply, self.loss_fn, self.params = apply, loss_fn, params
        self.framework, self.device = framework, device
        #: torch normalizations computed from elementary ops (per mode: backends/_torch_norms)
        self.norms: frozenset[str] = frozenset()

    def rng(self) -> Any:
        # JAX has no global generator; a torch function may still draw from torch's.
        return preserve_rng(self.device) if self.framework == "torch" else contextlib.nullcontext()

    def _norms(self) -> Any:
        if self.framework != "torch" or not self.norms:
            return contextlib.nullcontext()
        from ._torch_module import norms_context

        return norms_context(self.norms)

    def output(self, p: Any, x: Any) -> Any:
        with self.rng(), self._norms():
            return self.apply(p, x)

    def loss(self, p: Any, x: Any, y: Any) -> Any:
        with self.rng(), self._norms():
            return self.loss_fn(self.apply(p, x), y)

    def describe(self) -> str:
        return getattr(self.apply, "__name__", type(self.apply).__name__)

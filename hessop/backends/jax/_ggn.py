"""Generalized Gauss-Newton products ``J^T H_loss J v`` in JAX: ``jax.linearize`` of the
model's output gives ``J v``, a JVP of the loss gradient ``H_loss (J v)``, and
``jax.linear_transpose`` of the same linearization ``J^T``; one jitted function."""

from __future__ import annotations

from typing import Any

import jax

from ... import _pytree
from ..._sharing import SharedFunctions
from .._base import CurvatureKernel, KernelOptions
from ._kernel import JaxHessianKernel, ravel_in_jit

#: the GGN products, shared by the operators of the same model functions and state
_SHARED = SharedFunctions(maxsize=16)


class JaxGGNKernel(CurvatureKernel):
    """The GGN of ``loss_fn(model(x), y)`` for a model adapter (``output``, ``loss_fn``)."""

    def __init__(self, model: Any, loss: Any, options: KernelOptions) -> None:
        spec = loss.spec
        self.hessian = JaxHessianKernel(loss, "forward-over-reverse", options)

        # an operator per batch compiles once (its function is the same)
        self._mv, self._mm = _SHARED.get(options.share_key, lambda: _functions(model, spec))

    def product(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> Any:
        return self._mv(point, V, args) if V.ndim == 1 else self._mm(point, V, args)

    def gradient(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> tuple[Any, Any]:
        return self.hessian.gradient(point, args)

    def depends_on_point(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> bool:
        return self.hessian.depends_on_point(point, args)


def _functions(model: Any, spec: Any) -> tuple[Any, Any]:
    """The jitted vector and block products."""

    def mv(p: tuple[Any, ...], v: Any, args: tuple[Any, ...]) -> Any:
        x, y = args
        out, lin = jax.linearize(lambda q: model.output(_pytree.unflatten(spec, list(q)), x), p)
        grad_loss = jax.grad(lambda o: model.loss_fn(o, y))
        t = tuple(_pytree.unravel(jax.numpy, spec, v))
        HJv = jax.jvp(grad_loss, (out,), (lin(t),))[1]
        return ravel_in_jit(jax.linear_transpose(lin, p)(HJv)[0], spec.size)

    return jax.jit(mv), jax.jit(jax.vmap(mv, in_axes=(None, 1, None), out_axes=1))

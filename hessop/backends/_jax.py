"""The JAX backend: HVPs by jax.jvp / jax.grad / jax.linearize, each jitted once.

Modes
-----
* forward-over-reverse (``auto``): ``jax.jvp`` of ``jax.grad``. With the cache on (the
  default for a single batch), the first product also returns ``jax.linearize`` of the
  gradient, in the same compiled call, and every later product applies that linear map:
  the forward and backward passes are not repeated.
* reverse-over-forward: ``jax.grad`` of ``jax.jvp``.
* reverse-over-reverse: ``jax.grad`` of ``<jax.grad f, v>``; with the cache, the VJP of the
  gradient is kept instead.
* dense: ``jax.hessian`` once, then matrix products.
* finite-difference: central differences of two gradients.

Each function is compiled once per operator with the batch passed as an argument, so
products never retrace, and batches of equal shapes share one compilation. ``matmat`` is
one ``jax.vmap``-ed call. float64 needs ``jax_enable_x64``; without it hessop raises
instead of silently computing in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _pytree
from .._errors import DTypeError
from .._hessian import HessianOperator, Problem
from ._base import Backend


class JaxBackend(Backend):
    name = "jax"
    xp = jnp
    differentiable = True

    def owns(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Any:
        if dtype is not None:
            dtype = self.dtype(dtype)
        arr = jnp.asarray(x, dtype=dtype)
        return jax.device_put(arr, device) if device is not None else arr

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def device_of(self, x: Any) -> Any:
        try:
            return x.device
        except (AttributeError, ValueError):  # sharded over several devices
            return None

    def default_device(self) -> Any:
        return jax.devices()[0]

    def resolve_device(self, device: Any) -> Any:
        if isinstance(device, str):
            kind, _, index = device.partition(":")
            kind = {"cuda": "gpu"}.get(kind, kind)
            return jax.devices(kind)[int(index or 0)]
        return device

    def dtype(self, dtype: Any) -> Any:
        native = jnp.dtype(dtype)
        if native.itemsize == 8 and native.kind in "fc" and not jax.config.jax_enable_x64:
            raise DTypeError(
                f"{native.name} in JAX needs 64-bit mode, which is off: call "
                "jax.config.update('jax_enable_x64', True) at startup (or set "
                "JAX_ENABLE_X64=1), or pass dtype='float32'. hessop does not silently "
                "downcast."
            )
        return native

    def dtype_name(self, dtype: Any) -> str:
        return jnp.dtype(dtype).name

    def stop_gradient(self, x: Any) -> Any:
        return jax.lax.stop_gradient(x)

    def hessian_operator(self, problem: Problem, mode: str, **options: Any) -> HessianOperator:
        return JaxHessianOperator(problem, mode, self, **options)


BACKEND = JaxBackend()


class JaxHessianOperator(HessianOperator):
    """Hessian operator computed with JAX (see the module docstring for the modes)."""

    def __init__(
        self,
        problem: Problem,
        mode: str,
        backend: JaxBackend,
        device: Any,
        cache: bool | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if mode == "auto":
            mode = "forward-over-reverse"
        super().__init__(problem, mode, backend, device)
        self.cache = (not problem.streamed) and (True if cache is None else bool(cache))
        self.chunk_size = chunk_size
        spec = problem.spec
        self._w = _pytree.ravel(jnp, spec, problem.leaves)

        def loss(w: Any, args: tuple[Any, ...]) -> Any:
            return problem.loss(_pytree.unravel(jnp, spec, w), args)

        grad = jax.grad(loss)
        self._value_and_grad = jax.jit(jax.value_and_grad(loss))
        self._grad = jax.jit(grad)

        if mode == "forward-over-reverse":

            def hvp(w, v, args):
                return jax.jvp(lambda x: grad(x, args), (w,), (v,))[1]

            def linear_map(w, args):
                return jax.linearize(lambda x: grad(x, args), w)[1]
        elif mode == "reverse-over-forward":

            def hvp(w, v, args):
                return jax.grad(lambda x: jax.jvp(lambda y: loss(y, args), (x,), (v,))[1])(w)

            linear_map = None
        elif mode == "reverse-over-reverse":

            def hvp(w, v, args):
                return jax.grad(lambda x: jnp.vdot(grad(x, args), v))(w)

            def linear_map(w, args):
                vjp = jax.vjp(lambda x: grad(x, args), w)[1]
                return jax.tree_util.Partial(lambda f, v: f(v)[0], vjp)
        else:
            hvp = linear_map = None

        if hvp is not None:
            self._hvp = jax.jit(hvp)
            self._hmm = jax.jit(jax.vmap(hvp, in_axes=(None, 1, None), out_axes=1))
        if linear_map is not None and self.cache:
            # One compiled call gives the first product *and* the linear map, so a one-off
            # product costs no more than the uncached mode.
            def first(w, v, args):
                lin = linear_map(w, args)
                return lin(v), lin

            def first_mat(w, V, args):
                lin = linear_map(w, args)
                return jax.vmap(lin, in_axes=1, out_axes=1)(V), lin

            self._first = jax.jit(first)
            self._first_mat = jax.jit(first_mat)
            self._apply = jax.jit(lambda lin, v: lin(v))
            self._apply_mat = jax.jit(lambda lin, V: jax.vmap(lin, in_axes=1, out_axes=1)(V))
        else:
            self.cache = False
        self._lin = None
        self._dense_fn = jax.jit(jax.hessian(loss)) if mode == "dense" else None
        self._dense = None

    def _batch_hvp(self, args: tuple[Any, ...], v: Any) -> Any:
        if self.cache:
            if self._lin is None:
                out, self._lin = self._first(self._w, v, args)
                return out
            return self._apply(self._lin, v)
        if self.mode == "dense":
            return self._dense_matrix(args) @ v
        if self.mode == "finite-difference":
            return self._fd(args, v)
        return self._hvp(self._w, v, args)

    def _batch_hmm(self, args: tuple[Any, ...], V: Any) -> Any:
        step = self.chunk_size or V.shape[1]
        if step < V.shape[1]:
            return jnp.concatenate(
                [self._batch_hmm(args, V[:, j : j + step]) for j in range(0, V.shape[1], step)],
                axis=1,
            )
        if self.cache:
            if self._lin is None:
                out, self._lin = self._first_mat(self._w, V, args)
                return out
            return self._apply_mat(self._lin, V)
        if self.mode == "dense":
            return self._dense_matrix(args) @ V
        if self.mode == "finite-difference":
            return jnp.stack([self._fd(args, V[:, j]) for j in range(V.shape[1])], axis=1)
        return self._hmm(self._w, V, args)

    def _dense_matrix(self, args: tuple[Any, ...]) -> Any:
        if self.problem.streamed:
            return self._dense_fn(self._w, args)
        if self._dense is None:
            self._dense = self._dense_fn(self._w, args)
        return self._dense

    def _fd(self, args: tuple[Any, ...], v: Any) -> Any:
        vnorm = float(jnp.linalg.norm(v))
        if vnorm == 0.0:
            return jnp.zeros_like(v)
        # h ~ eps^(1/3) balances truncation (h^2) against rounding (eps / h).
        h = self._bk.eps(self.dtype) ** (1 / 3) * max(1.0, float(jnp.linalg.norm(self._w)))
        h /= vnorm
        return (self._grad(self._w + h * v, args) - self._grad(self._w - h * v, args)) / (2 * h)

    def _batch_grad(self, args: tuple[Any, ...]) -> tuple[Any, Any]:
        return self._value_and_grad(self._w, args)

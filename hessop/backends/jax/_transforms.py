"""JAX's transforms behind hessop's :class:`~hessop.backends._base.Transforms`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ..._errors import LossError
from ..._pytree import tree_map
from .._base import Transforms


def _apply(lin: Any, v: Any) -> Any:
    return lin(v)


def _apply_first(pull: Any, v: Any) -> Any:
    return pull(v)[0]


class JaxTransforms(Transforms):
    name = "jax"
    compiles = True

    def vmap(self, fn: Callable, in_axes: Any, randomness: str = "error") -> Callable:
        return jax.vmap(fn, in_axes=in_axes)  # JAX has no hidden random state to check

    def jit(self, fn: Callable) -> Callable:
        return jax.jit(fn)

    def grad(self, fn: Callable) -> Callable:
        return jax.grad(fn)

    def jvp(self, fn: Callable, primal: Any, tangent: Any) -> tuple[Any, Any]:
        return jax.jvp(fn, (primal,), (tangent,))

    def vjp(self, fn: Callable, primal: Any) -> tuple[Any, Callable]:
        out, pull = jax.vjp(fn, primal)
        return out, lambda ct: pull(ct)[0]

    # Both maps are pytrees (a Partial of a module-level function, so that the tree
    # structure is the same at every call of a compiled function returning one).
    def linearize(self, fn: Callable, primal: Any) -> Callable:
        return jax.tree_util.Partial(_apply, jax.linearize(fn, primal)[1])

    def pullback(self, fn: Callable, primal: Any) -> Callable:
        return jax.tree_util.Partial(_apply_first, jax.vjp(fn, primal)[1])

    def jacfwd(self, fn: Callable, randomness: str = "error") -> Callable:
        return jax.jacfwd(fn)

    def jacrev(self, fn: Callable) -> Callable:
        return jax.jacrev(fn)

    def eye(self, m: int, like: Any) -> Any:
        return jnp.eye(m, dtype=like.dtype)

    def output_spec(self, fn: Callable[[Any], Any], x: Any) -> tuple[tuple[int, ...], Any]:
        out = jax.eval_shape(fn, x)
        return tuple(out.shape), out.dtype

    def chunked(self, kernel, mapped, size, chunk):
        if chunk is None or chunk >= size:
            return kernel(*mapped)
        # lax.map runs the chunks one after another, also under jit, so memory stays
        # bounded by one chunk; a leftover partial chunk is one extra call.
        full = (size // chunk) * chunk
        stacked = [m[:full].reshape(size // chunk, chunk, *m.shape[1:]) for m in mapped]
        out = jax.lax.map(lambda ms: kernel(*ms), stacked)
        out = tree_map(lambda a: a.reshape(full, *a.shape[2:]), out)
        if full == size:
            return out
        rest = kernel(*[m[full:] for m in mapped])
        return tree_map(lambda *xs: jnp.concatenate(xs, axis=0), out, rest)

    def translate_error(self, err: Exception, mode: str) -> Exception:
        return translate_error(err)


def translate_error(err: Exception) -> Exception:
    """The hessop error for a JAX error raised while tracing the loss (or ``err``)."""
    if isinstance(
        err,
        (
            jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError,
            jax.errors.TracerIntegerConversionError,
        ),
    ):
        first = (str(err).strip().splitlines() or [""])[0]
        return LossError(
            "the loss turns a traced array into a Python value (.item(), float(), int(), "
            f"np.asarray or Python control flow on it), which JAX cannot differentiate or "
            f"compile ({first}); keep the computation in jax.numpy (jnp.where for branches)"
        )
    return err

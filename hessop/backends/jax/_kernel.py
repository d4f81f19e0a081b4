"""Hessian products of one loss in JAX: jax.jvp / jax.grad / jax.linearize, each jitted once.

* forward-over-reverse (``auto``): ``jax.jvp`` of ``jax.grad``;
  :meth:`~JaxHessianKernel.linearize` also returns ``jax.linearize`` of the gradient, in the
  same compiled call, and later products apply that linear map: the forward and backward
  passes are not repeated.
* reverse-over-forward: ``jax.grad`` of ``jax.jvp``.
* reverse-over-reverse: ``jax.grad`` of ``<jax.grad f, v>``; the kept work is the VJP of the
  gradient.
* dense: ``jax.hessian`` of the loss of a flat vector.

Each function is compiled once with the batch passed as an argument, so products never
retrace, and batches of equal shapes share one compilation. Operators of the same loss share
the compiled functions (:mod:`hessop._sharing`), under a key that includes the values the
loss reads from outside its arguments, so a changed closure compiles anew. ``matmat`` is one
``jax.vmap``-ed call on accelerators and a loop of matvecs on a CPU, where XLA runs the
batched contractions slower than k plain ones.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp

from ... import _pytree
from ..._sharing import SharedFunctions
from .._base import CurvatureKernel, KernelOptions
from ._transforms import translate_error

_log = logging.getLogger("hessop")
_SHARED = SharedFunctions(maxsize=16)
_LINEARIZABLE = ("forward-over-reverse", "reverse-over-reverse")
_AD_MODES = ("forward-over-reverse", "reverse-over-forward", "reverse-over-reverse")


class JaxHessianKernel(CurvatureKernel):
    """Per-batch Hessian products of a :class:`hessop._loss.Loss` (see the module doc)."""

    def __init__(self, loss: Any, mode: str, options: KernelOptions) -> None:
        self.loss, self.mode, self.spec = loss, mode, loss.spec
        self.chunk_size = options.chunk_size
        self.linearizable = mode in _LINEARIZABLE
        self.block_products = mode in _AD_MODES
        self.fns = _SHARED.get(options.share_key, lambda: _functions(loss, mode))
        # On a CPU a loop of compiled matvecs beats one vmapped call: XLA:CPU runs the
        # batched contractions slower than k plain ones (benchmarks/). Accelerators batch.
        self.loop_columns = on_cpu(options.device)

    def share_as(self, key: Any) -> None:
        _SHARED.alias(key, self.fns)

    def product(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> Any:
        with _translated():
            return self._product(point, args, V)

    def _product(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> Any:
        if V.ndim == 1:
            return self.fns.hvp(point, V, args)
        if self.loop_columns:
            return _stack_columns([self.fns.hvp(point, v, args) for v in _transpose(V)])
        return self._chunks(V, lambda B: self.fns.hmm(point, B, args))

    def linearize(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> tuple[Any, Any]:
        with _translated():
            return self._linearize(point, args, V)

    def _linearize(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> Any:
        if V.ndim == 1:
            return self.fns.first(point, V, args)
        if self.loop_columns:
            rows = _transpose(V)  # contiguous columns: slicing V[:, j] gathers
            first, lin = self.fns.first(point, rows[0], args)
            rest = [self.fns.apply(lin, v) for v in rows[1:]]
            return _stack_columns([first, *rest]), lin
        first, lin = self.fns.first_mat(point, V, args)
        return first, lin

    def apply(self, lin: Any, V: Any) -> Any:
        if V.ndim == 1:
            return self.fns.apply(lin, V)
        if self.loop_columns:
            return _stack_columns([self.fns.apply(lin, v) for v in _transpose(V)])
        return self._chunks(V, lambda B: self.fns.apply_mat(lin, B))

    def _chunks(self, V: Any, fn: Any) -> Any:
        step = self.chunk_size or V.shape[1]
        if step >= V.shape[1]:
            return fn(V)
        return jnp.concatenate([fn(V[:, j : j + step]) for j in range(0, V.shape[1], step)], axis=1)

    def block_product(
        self,
        point: tuple[Any, ...],
        args: tuple[Any, ...],
        blocks: list[tuple[tuple[int, ...], Any]],
        cache: Any = None,
    ) -> tuple[list[Any], Any]:
        """Each block's product from the loss as a function of the block's leaves alone
        (compiled once per set of leaves), so XLA drops the other parameters' second
        derivatives. Nothing is cached between calls."""
        outs = []
        with _translated():
            for idx, V in blocks:
                fns = self.fns.blocks.get(idx)
                if fns is None:
                    fns = self.fns.blocks[idx] = _block_functions(self.loss, self.mode, idx)
                if self.loop_columns:
                    outs.append(_stack_columns([fns.hvp(point, v, args) for v in _transpose(V)]))
                else:
                    outs.append(self._chunks(V, lambda B, fns=fns: fns.hmm(point, B, args)))
        return outs, None

    def gradient(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> tuple[Any, Any]:
        with _translated():
            return self.fns.value_and_grad(point, args)

    def dense(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        with _translated():
            return self.fns.dense(_pytree.ravel(jnp, self.spec, list(point)), args)

    def depends_on_point(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> bool:
        from ._dependence import output_depends_on_input

        return output_depends_on_input(lambda p: self.loss(list(p), args), tuple(point))

    def dependence_known(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> bool | None:
        # Read off the jaxpr once per compiled functions and shapes (a trace, which the
        # first compilation pays anyway); operators sharing the functions reuse the answer.
        arrays = jax.tree_util.tree_leaves((point, args))
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            return None
        signature = _signature(arrays)
        known = self.fns.dependence.get(signature)
        if known is None:
            with _translated():
                known = self.fns.dependence[signature] = self.depends_on_point(point, args)
        return known

    def warm_up(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> float:
        """Compile every function a product will call, on this batch; the seconds that
        took, or 0.0 when an earlier operator of the same loss compiled them for the same
        shapes (then nothing runs)."""
        arrays = jax.tree_util.tree_leaves((point, args))
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            return 0.0  # inside a transformation: compiled with the enclosing function
        signature = _signature(arrays)
        if signature in self.fns.compiled_for:
            return 0.0
        start = time.perf_counter()
        zero = jnp.zeros(self.spec.size, point[0].dtype)
        if self.mode == "dense":
            jax.block_until_ready(self.dense(point, args))
        elif self.mode != "finite-difference":
            jax.block_until_ready(self.fns.hvp(point, zero, args))
            if self.linearizable:
                out, lin = self.fns.first(point, zero, args)
                jax.block_until_ready(self.fns.apply(lin, out))
        jax.block_until_ready(self.fns.value_and_grad(point, args))
        seconds = time.perf_counter() - start
        self.fns.compiled_for.add(signature)
        _log.info("compiled the %s Hessian-vector products in %.1f s", self.mode, seconds)
        return seconds


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """hessop's error for a JAX error raised while tracing the loss (``.item()``, ...)."""
    try:
        yield
    except (TypeError, jax.errors.JAXTypeError) as err:
        translated = translate_error(err)
        if translated is err:
            raise
        raise translated from err


def ravel_in_jit(leaves: Any, size: int) -> Any:
    """hessop's flat layout (see hessop._pytree.ravel), inside a compiled function.

    Written as in-place slice updates: XLA:CPU compiles ``jnp.concatenate`` into a loop
    that is several times slower than the copies (and than the elementwise work of an HVP).
    """
    out = jnp.zeros((size,), dtype=leaves[0].dtype)
    start = 0
    for x in leaves:
        out = jax.lax.dynamic_update_slice(out, jnp.reshape(x, (-1,)), (start,))
        start += x.size
    return out


def _products(loss: Any, mode: str) -> tuple[Any, Any]:
    """``(hvp(p, v, args), linear_map(p, args) or None)`` of a mode, unjitted."""
    spec = loss.spec

    def unravel(v: Any) -> tuple[Any, ...]:
        return tuple(_pytree.unravel(jnp, spec, v))

    def ravel(leaves: Any) -> Any:
        return ravel_in_jit(leaves, spec.size)

    def f(p: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        return loss(list(p), args)

    grad = jax.grad(f)
    if mode == "forward-over-reverse":

        def hvp(p, v, args):
            return ravel(jax.jvp(lambda q: grad(q, args), (p,), (unravel(v),))[1])

        def linear_map(p, args):
            lin = jax.linearize(lambda q: grad(q, args), p)[1]
            return jax.tree_util.Partial(lambda lin, v: ravel(lin(unravel(v))), lin)

        return hvp, linear_map
    if mode == "reverse-over-forward":

        def hvp(p, v, args):
            t = unravel(v)
            return ravel(jax.grad(lambda q: jax.jvp(lambda r: f(r, args), (q,), (t,))[1])(p))

        return hvp, None

    def hvp(p, v, args):
        t = unravel(v)
        return ravel(jax.grad(lambda q: _tree_vdot(grad(q, args), t))(p))

    def linear_map(p, args):
        vjp = jax.vjp(lambda q: grad(q, args), p)[1]
        return jax.tree_util.Partial(lambda vjp, v: ravel(vjp(unravel(v))[0]), vjp)

    return hvp, linear_map


def _functions(loss: Any, mode: str) -> SimpleNamespace:
    """The jitted functions of a kernel. Functions of the point take the tuple of leaves and
    differentiate with respect to it (differentiating with respect to a flat vector makes
    XLA slice the weights out and concatenate the result); vectors are flat."""
    spec = loss.spec

    def value_and_flat_grad(p, args):
        value, g = jax.value_and_grad(lambda q: loss(list(q), args))(p)
        return value, ravel_in_jit(g, spec.size)

    def flat_loss(w, args):
        return loss(_pytree.unravel(jnp, spec, w), args)

    fns = SimpleNamespace(
        value_and_grad=jax.jit(value_and_flat_grad),
        dense=jax.jit(jax.hessian(flat_loss)),
        compiled_for=set(),  # input signatures warm_up has compiled (see warm_up)
        dependence={},  # input signature -> whether the loss depends on the point
        blocks={},  # leaf indices -> _block_functions
    )
    if mode in ("dense", "finite-difference"):
        return fns
    hvp, linear_map = _products(loss, mode)
    fns.hvp = jax.jit(hvp)
    fns.hmm = jax.jit(jax.vmap(hvp, in_axes=(None, 1, None), out_axes=1))
    if linear_map is not None:
        # One compiled call gives the first product *and* the linear map. Writing the
        # linearization out makes that call ~10-25% slower than a plain product on CPU:
        # the operator calls it only for its second product (a one-off pays nothing).
        def first(p, v, args):
            lin = linear_map(p, args)
            return lin(v), lin

        def first_mat(p, V, args):
            lin = linear_map(p, args)
            return jax.vmap(lin, in_axes=1, out_axes=1)(V), lin

        fns.first = jax.jit(first)
        fns.first_mat = jax.jit(first_mat)
        fns.apply = jax.jit(lambda lin, v: lin(v))
        fns.apply_mat = jax.jit(lambda lin, V: jax.vmap(lin, in_axes=1, out_axes=1)(V))
    return fns


class _Restricted:
    """The loss as a function of some of its leaves, the point passed with the batch."""

    def __init__(self, loss: Any, idx: tuple[int, ...]) -> None:
        self.loss, self.idx = loss, idx
        self.spec = _pytree.flatten([jnp.zeros(loss.spec.shapes[i]) for i in idx])[1]

    def __call__(self, leaves: list[Any], point_and_args: tuple[Any, Any]) -> Any:
        point, args = point_and_args
        full = list(point)
        for i, x in zip(self.idx, leaves):
            full[i] = x
        return self.loss(full, args)


def _block_functions(loss: Any, mode: str, idx: tuple[int, ...]) -> SimpleNamespace:
    """The jitted product of the diagonal block of the leaves ``idx`` (vector and block)."""
    hvp = _products(_Restricted(loss, idx), mode)[0]

    def block_hvp(p: tuple[Any, ...], v: Any, args: tuple[Any, ...]) -> Any:
        return hvp(tuple(p[i] for i in idx), v, (p, args))

    return SimpleNamespace(
        hvp=jax.jit(block_hvp),
        hmm=jax.jit(jax.vmap(block_hvp, in_axes=(None, 1, None), out_axes=1)),
    )


def _tree_vdot(a: tuple[Any, ...], b: tuple[Any, ...]) -> Any:
    return sum(jnp.vdot(x, y) for x, y in zip(a, b))


_transpose = jax.jit(jnp.transpose)
_stack_columns = jax.jit(functools.partial(jnp.stack, axis=1))


def on_cpu(device: Any) -> bool:
    devices = getattr(device, "device_set", None) or [device]  # a sharding, or one device
    return all(getattr(d, "platform", "cpu") == "cpu" for d in devices)


def _signature(leaves: list[Any]) -> tuple[Any, ...]:
    """Shapes and dtypes of the leaves of a point and its arguments; Python numbers among
    the arguments count by type (jit traces them as weakly typed scalars)."""
    return tuple((tuple(jnp.shape(x)), str(getattr(x, "dtype", type(x).__name__))) for x in leaves)

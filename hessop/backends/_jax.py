"""The JAX backend: HVPs by jax.jvp / jax.grad / jax.linearize, each jitted once.

Modes
-----
* forward-over-reverse (``auto``): ``jax.jvp`` of ``jax.grad``. With the cache on (the
  default for a single batch), the first product is a plain one (a one-off product must not
  pay for a cache it will not use); the second also returns ``jax.linearize`` of the
  gradient, in the same compiled call, and every later product applies that linear map:
  the forward and backward passes are not repeated.
* reverse-over-forward: ``jax.grad`` of ``jax.jvp``.
* reverse-over-reverse: ``jax.grad`` of ``<jax.grad f, v>``; with the cache, the VJP of the
  gradient is kept instead.
* dense: ``jax.hessian`` once, then matrix products.
* finite-difference: central differences of two gradients.

Each function is compiled once per operator with the batch passed as an argument, so
products never retrace, and batches of equal shapes share one compilation; operators of
the same loss share them too. ``matmat`` is one ``jax.vmap``-ed call on accelerators and
a loop of matvecs on a CPU, where XLA runs the batched contractions slower than k plain
ones. ``compile=True`` compiles every product function at construction and reports the
seconds in ``compile_time``. float64 needs ``jax_enable_x64``; without it hessop raises
instead of silently computing in float32.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from types import SimpleNamespace
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
        if isinstance(x, jax.Array) and (dtype is None or x.dtype == dtype):
            arr = x  # immutable: neither a conversion nor a copy is needed
        elif isinstance(x, np.ndarray):
            # A copy: on CPU jnp.asarray may alias a numpy array that the caller can mutate.
            arr = jnp.array(x, dtype=dtype, copy=True)
        else:
            arr = jnp.asarray(x, dtype=dtype)
        if device is None or (isinstance(device, jax.Device) and _only_on(arr, device)):
            return arr  # already there: skip device_put, which costs ~0.1 ms per leaf
        return jax.device_put(arr, device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def device_of(self, x: Any) -> Any:
        try:
            return x.device
        except (AttributeError, ValueError):  # sharded over several devices
            return None

    def check_device(self, x: Any, device: Any, what: str) -> None:
        # A data-parallel operator lives on a replicated sharding (hessop.distributed); an
        # array on some of its devices is fine: the operator replicates it before use.
        if isinstance(device, jax.sharding.Sharding) and isinstance(x, jax.Array):
            try:
                placed = x.sharding.device_set
            except AttributeError:  # a tracer (inside jit or grad): placement is not known
                return
            if placed <= device.device_set:
                return
        super().check_device(x, device, what)

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
        # Only a tracer carries gradients; a concrete array is immutable and, when it came
        # from numpy, already a copy (asarray): no per-leaf dispatch or copy per operator.
        return jax.lax.stop_gradient(x) if isinstance(x, jax.core.Tracer) else x

    def jit(self, fn: Any, device: Any) -> Any:
        jitted = _JITTED_KERNELS.get(fn)
        if jitted is None:
            jitted = _JITTED_KERNELS[fn] = jax.jit(fn, static_argnums=0)

        def call(*args: Any) -> Any:
            # Commit every array to the operator's device: a mix of committed and
            # uncommitted arguments would compile the kernel a second time.
            if device is not None:
                args = tuple(
                    jax.device_put(a, device) if isinstance(a, jax.Array) else a for a in args
                )
            return jitted(jnp, *args)

        return call

    def hessian_operator(self, problem: Problem, mode: str, **options: Any) -> HessianOperator:
        return JaxHessianOperator(problem, mode, self, **options)


#: algorithm kernels compiled once per function (see Backend.jit)
_JITTED_KERNELS: dict[Any, Any] = {}


BACKEND = JaxBackend()
_log = logging.getLogger("hessop")


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
        differentiable: bool = False,  # JAX products are always differentiable in *args
        compile: bool = False,
    ) -> None:
        if mode == "auto":
            mode = "forward-over-reverse"
        super().__init__(problem, mode, backend, device)
        self.cache = (not problem.streamed) and (True if cache is None else bool(cache))
        self.chunk_size = chunk_size
        # The products differentiate with respect to the leaves and only then lay the
        # result out flat; ``_w`` (the flat point) serves the dense and finite-difference
        # modes and is built on first use.
        self._p = tuple(problem.leaves)
        # The compiled functions depend on (f, layout, mode, cache), not on the point: they
        # are shared between operators, so that an operator at a new point (a Newton step,
        # a new batch) neither retraces nor recompiles.
        fns = _functions(problem, mode, self.cache)
        self._value_and_grad, self._grad = fns.value_and_grad, fns.grad
        if fns.hvp is not None:
            self._hvp, self._hmm = fns.hvp, fns.hmm
        if fns.first is not None:
            self._first, self._first_mat = fns.first, fns.first_mat
            self._apply, self._apply_mat = fns.apply, fns.apply_mat
        else:
            self.cache = False
        self._lin = None
        self._used = False  # a cached operator builds its linear map on the second product
        self._dense_fn = fns.dense
        self._dense = None
        # On a CPU a loop of compiled matvecs beats one vmapped call: XLA:CPU runs the
        # batched contractions slower than k plain ones (benchmarks/). Accelerators batch.
        self._loop_columns = _on_cpu(device)
        self.compile_time: float | None = None
        if compile:
            self.compile_time = self._warm_up(fns)

    def _batch_hvp(self, args: tuple[Any, ...], v: Any) -> Any:
        if self.cache:
            if self._lin is None:
                if not self._used:
                    # A one-off product must not pay for writing out the linear map (10-25%
                    # on CPU): the first product is a plain one, the second builds the map.
                    self._used = True
                    return self._hvp(self._p, v, args)
                out, self._lin = self._first(self._p, v, args)
                return out
            return self._apply(self._lin, v)
        if self.mode == "dense":
            return self._dense_matrix(args) @ v
        if self.mode == "finite-difference":
            return self._fd(args, v)
        return self._hvp(self._p, v, args)

    def _batch_hmm(self, args: tuple[Any, ...], V: Any) -> Any:
        if self.mode == "dense":
            return self._dense_matrix(args) @ V
        if self._loop_columns or self.mode == "finite-difference":
            rows = _transpose(V)  # contiguous columns: slicing V[:, j] gathers
            return _stack_columns([self._batch_hvp(args, row) for row in rows])
        step = self.chunk_size or V.shape[1]
        if step < V.shape[1]:
            return jnp.concatenate(
                [self._batch_hmm(args, V[:, j : j + step]) for j in range(0, V.shape[1], step)],
                axis=1,
            )
        if self.cache:
            if self._lin is None:
                self._used = True
                out, self._lin = self._first_mat(self._p, V, args)
                return out
            return self._apply_mat(self._lin, V)
        return self._hmm(self._p, V, args)

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
        return self._value_and_grad(self._p, args)

    def _warm_up(self, fns: SimpleNamespace) -> float:
        """Compile every function a product will call, on the first batch; return the
        seconds that took, or 0.0 when an earlier operator of the same loss compiled them
        for the same shapes (then nothing runs)."""
        args = next(iter(self.problem.batches()))[0]
        arrays = jax.tree_util.tree_leaves((self._p, args))
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            return 0.0  # inside a transformation: compiled with the enclosing function
        signature = tuple((tuple(x.shape), str(getattr(x, "dtype", ""))) for x in arrays)
        if signature in fns.compiled_for:
            return 0.0
        start = time.perf_counter()
        zero = jnp.zeros(self.shape[0], self.dtype)
        if self.mode == "dense":
            jax.block_until_ready(self._dense_matrix(args))
        elif self.mode == "finite-difference":
            jax.block_until_ready(self._grad(self._w, args))
        else:
            jax.block_until_ready(self._hvp(self._p, zero, args))
            if self.cache:  # the operator's own linear map: later products apply it
                self._used = True
                out, self._lin = self._first(self._p, zero, args)
                jax.block_until_ready(self._apply(self._lin, out))
        jax.block_until_ready(self._value_and_grad(self._p, args))
        seconds = time.perf_counter() - start
        fns.compiled_for.add(signature)
        _log.info("compiled the %s Hessian-vector products in %.1f s", self.mode, seconds)
        return seconds

    @functools.cached_property
    def _w(self) -> Any:
        return _pytree.ravel(jnp, self.problem.spec, list(self._p))


#: compiled functions shared between operators, keyed by (f, layout, mode, cache); a few
#: recent entries only, since each one holds a reference to its loss function
_SHARED: OrderedDict[tuple[Any, ...], SimpleNamespace] = OrderedDict()
_SHARED_SIZE = 16


def _ravel_in_jit(leaves: Any, size: int) -> Any:
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


def _functions(problem: Problem, mode: str, cache: bool) -> SimpleNamespace:
    """The jitted functions of an operator, shared with earlier operators of the same loss."""
    f, spec = problem.f, problem.spec
    if any(isinstance(x, jax.core.Tracer) for x in problem.leaves):
        return _build_functions(f, spec, mode, cache)  # inside a transformation: keep none
    key = (f, spec, mode, cache)
    try:
        fns = _SHARED.pop(key, None)
    except TypeError:  # an unhashable callable: compile for this operator only
        return _build_functions(f, spec, mode, cache)
    if fns is None:
        fns = _build_functions(f, spec, mode, cache)
    _SHARED[key] = fns  # most recently used last
    while len(_SHARED) > _SHARED_SIZE:
        _SHARED.popitem(last=False)
    return fns


def _build_functions(f: Any, spec: _pytree.TreeSpec, mode: str, cache: bool) -> SimpleNamespace:
    # A Problem without a point or data: its loss() evaluates f on a pytree with the checks
    # of every other path, and the functions keep no reference to the operator's arrays.
    shell = Problem(
        f=f,
        spec=spec,
        leaves=[],
        args=None,
        data=None,
        reduction="mean",
        batch_size=None,
        convert=tuple,
    )

    # Functions of the point take the tuple of leaves ``p`` and differentiate with respect
    # to it (differentiating with respect to a flat vector makes XLA slice the weights out
    # and concatenate the result); vectors are flat, split into leaves by cheap slices.
    def loss(p: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        return shell.loss(list(p), args)

    def unravel(v: Any) -> tuple[Any, ...]:
        return tuple(_pytree.unravel(jnp, spec, v))

    def ravel(leaves: Any) -> Any:
        return _ravel_in_jit(leaves, spec.size)

    def flat_loss(w: Any, args: tuple[Any, ...]) -> Any:
        return loss(unravel(w), args)

    grad = jax.grad(loss)

    def value_and_flat_grad(p, args):
        value, g = jax.value_and_grad(loss)(p, args)
        return value, ravel(g)

    value_and_grad = jax.jit(value_and_flat_grad)
    grad_fn = jax.jit(lambda w, args: ravel(grad(unravel(w), args)))  # flat point in and out

    if mode == "forward-over-reverse":

        def hvp(p, v, args):
            return ravel(jax.jvp(lambda q: grad(q, args), (p,), (unravel(v),))[1])

        def linear_map(p, args):
            lin = jax.linearize(lambda q: grad(q, args), p)[1]
            return jax.tree_util.Partial(lambda lin, v: ravel(lin(unravel(v))), lin)
    elif mode == "reverse-over-forward":

        def hvp(p, v, args):
            t = unravel(v)
            return ravel(jax.grad(lambda q: jax.jvp(lambda r: loss(r, args), (q,), (t,))[1])(p))

        linear_map = None
    elif mode == "reverse-over-reverse":

        def hvp(p, v, args):
            t = unravel(v)
            return ravel(jax.grad(lambda q: _tree_vdot(grad(q, args), t))(p))

        def linear_map(p, args):
            vjp = jax.vjp(lambda q: grad(q, args), p)[1]
            return jax.tree_util.Partial(lambda vjp, v: ravel(vjp(unravel(v))[0]), vjp)
    else:
        hvp = linear_map = None

    hvp_fn = hmm_fn = first_fn = first_mat_fn = apply_fn = apply_mat_fn = None
    if hvp is not None:
        hvp_fn = jax.jit(hvp)
        hmm_fn = jax.jit(jax.vmap(hvp, in_axes=(None, 1, None), out_axes=1))
    if linear_map is not None and cache:
        # One compiled call gives the first product *and* the linear map. Writing the
        # linearization out makes that call ~10-25% slower than an uncached product on CPU
        # (benchmarks/): pass cache=False for one-off products.
        def first(w, v, args):
            lin = linear_map(w, args)
            return lin(v), lin

        def first_mat(w, V, args):
            lin = linear_map(w, args)
            return jax.vmap(lin, in_axes=1, out_axes=1)(V), lin

        first_fn = jax.jit(first)
        first_mat_fn = jax.jit(first_mat)
        apply_fn = jax.jit(lambda lin, v: lin(v))
        apply_mat_fn = jax.jit(lambda lin, V: jax.vmap(lin, in_axes=1, out_axes=1)(V))
    return SimpleNamespace(
        value_and_grad=value_and_grad,
        grad=grad_fn,
        hvp=hvp_fn,
        hmm=hmm_fn,
        first=first_fn,
        first_mat=first_mat_fn,
        apply=apply_fn,
        apply_mat=apply_mat_fn,
        dense=jax.jit(jax.hessian(flat_loss)) if mode == "dense" else None,
        compiled_for=set(),  # input signatures compile=True has warmed up (see _warm_up)
    )


def _tree_vdot(a: tuple[Any, ...], b: tuple[Any, ...]) -> Any:
    return sum(jnp.vdot(x, y) for x, y in zip(a, b))


_transpose = jax.jit(jnp.transpose)
_stack_columns = jax.jit(functools.partial(jnp.stack, axis=1))


def _on_cpu(device: Any) -> bool:
    devices = getattr(device, "device_set", None) or [device]  # a sharding, or one device
    return all(getattr(d, "platform", "cpu") == "cpu" for d in devices)


def _only_on(x: Any, device: Any) -> bool:
    try:
        return x.devices() == {device}
    except (AttributeError, ValueError):  # a tracer, or not a jax.Array
        return False

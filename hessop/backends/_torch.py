"""The PyTorch backend: HVPs by torch.autograd and torch.func.

Modes
-----
* reverse-over-reverse (``auto``): the gradient is computed with ``create_graph=True`` and
  differentiated again. With the cache on (the default for a single batch) the first
  product frees that graph as it goes (a one-off product must not hold it afterwards); the
  second keeps it, and every later product is one backward pass through it, about one
  gradient cheaper. ``cache=False`` rebuilds the graph per product.
* forward-over-reverse: ``torch.func.jvp`` of ``torch.func.grad``.
* reverse-over-forward: ``torch.func.grad`` of ``torch.func.jvp``.
* dense: ``torch.func.hessian`` once, then matrix products.
* finite-difference: central differences of two gradients.

Every computation runs with gradients enabled, the math attention kernel and the
multi-head-attention fast path off (the fused kernels have no forward-mode or
double-backward derivatives); the user's settings are restored afterwards.

``differentiable=True`` keeps every product's autograd graph to the tensors the loss
receives as arguments or closes over (``create_graph=True`` in the reverse-over-reverse,
dense and finite-difference modes; the torch.func modes compose with outer autograd by
themselves), and turns the default cache off, so that each product owns its graph.

``compile=True`` passes the torch.func product of the loss, a function of (point,
tangent, arguments), through ``torch.compile`` (``auto`` then means reverse-over-forward).
The compiled function is shared by the operators of the same loss, layout and mode, so an
operator at a new point or on a new batch of the same shapes reuses it; it is compiled at
construction, and ``H.compile_time`` reports how long that took. ``matmat`` loops over
the columns (a vmapped compiled function would be compiled again for each width).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import types
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NoReturn

import array_api_compat.torch as xp_torch
import numpy as np
import torch

from .._errors import ForwardModeUnsupportedError, HessopError, StaleOperatorError
from .._hessian import HessianOperator, Problem, map_arrays
from ._base import Backend

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "bool": torch.bool,
}


@contextlib.contextmanager
def autodiff_context(mode: str | None = None) -> Iterator[None]:
    """Grad mode on, math SDPA kernel, MHA fast path off; all restored on exit.

    With a ``mode``, the normalization layers whose second-order rules are wrong in that
    mode (see :mod:`hessop.backends._torch_norms`) are computed from elementary ops.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ._torch_norms import CompositeNorms, for_mode

    kinds = for_mode(mode) if mode is not None else frozenset()
    norms = CompositeNorms(kinds) if kinds else contextlib.nullcontext()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), norms:
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _forward_mode_error(err: Exception, mode: str) -> Exception:
    msg = str(err)
    if not re.search(r"forward AD|forward-mode|forward mode|jvp", msg, re.IGNORECASE):
        return err
    return ForwardModeUnsupportedError(
        f"mode={mode!r} needs forward-mode AD, which an operation in the loss does not "
        f"support ({msg.strip().splitlines()[0]}); use mode='reverse-over-reverse' "
        "(or mode='auto', which uses it)"
    )


class TorchBackend(Backend):
    name = "torch"
    xp = xp_torch
    differentiable = True

    def owns(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(dtype=dtype or x.dtype, device=device or x.device)
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            x = x.copy()  # torch warns on read-only buffers (e.g. from JAX)
        return torch.as_tensor(
            x, dtype=self.dtype(dtype) if dtype is not None else None, device=device
        )

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    def device_of(self, x: Any) -> Any:
        return x.device

    def default_device(self) -> Any:
        return self.resolve_device("cuda" if torch.cuda.is_available() else "cpu")

    def resolve_device(self, device: Any) -> Any:
        device = torch.device(device)
        # Tensors report "cuda:0", never "cuda": pin the index so device checks compare equal.
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def dtype(self, dtype: Any) -> Any:
        if isinstance(dtype, torch.dtype):
            return dtype
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        try:
            return _DTYPES[name]
        except KeyError:
            raise TypeError(f"unsupported dtype {dtype!r} for torch") from None

    def stop_gradient(self, x: Any) -> Any:
        # No copy (a copy of the parameters would cost their memory and a pass over them per
        # operator): the detached view shares the caller's version counter, so an operator
        # notices an in-place update of its point (an optimizer step) and refuses to go on;
        # see TorchHessianOperator._check_point.
        return x.detach()

    def hessian_operator(self, problem: Problem, mode: str, **options: Any) -> HessianOperator:
        return TorchHessianOperator(problem, mode, self, **options)


BACKEND = TorchBackend()


class TorchHessianOperator(HessianOperator):
    """Hessian operator computed with PyTorch (see the module docstring for the modes)."""

    def __init__(
        self,
        problem: Problem,
        mode: str,
        backend: TorchBackend,
        device: Any,
        cache: bool | None = None,
        chunk_size: int | None = None,
        differentiable: bool = False,
        compile: bool = False,
    ) -> None:
        if compile:
            mode = _compiled_mode(mode, differentiable)
        elif mode == "auto":
            mode = "reverse-over-reverse"
        super().__init__(problem, mode, backend, device)
        self.differentiable = bool(differentiable)
        # A cached graph would be shared by every differentiable product, and the caller's
        # first backward through one of them would free it under the others.
        default_cache = not problem.streamed and not self.differentiable
        self.cache = default_cache if cache is None else bool(cache)
        self.chunk_size = chunk_size
        self._graph: tuple[list[Any], list[Any], list[int]] | None = None
        self._used = False  # a cached operator keeps the gradient graph from the second product
        self._dense: dict[int, Any] = {}
        self._versions = [x._version for x in problem.leaves]
        self._compiled: types.SimpleNamespace | None = None
        if compile:
            self.cache = False  # a compiled product keeps nothing between calls
            start = time.perf_counter()
            self._compiled = _shared_compiled(problem, mode)
            self.compile_time = self._warm_up(start)

    # --- helpers ------------------------------------------------------------------------
    def _leaves_v(self, v: Any) -> list[Any]:
        """Split a flat vector (or (d, k) matrix, batch last) into parameter-shaped leaves."""
        out, start = [], 0
        for shape, n in zip(self.problem.spec.shapes, self.problem.spec.sizes):
            piece = v[start : start + n]
            out.append(piece.reshape(shape) if v.ndim == 1 else piece.T.reshape(-1, *shape))
            start += n
        return out

    @staticmethod
    def _flat(leaves: list[Any], batched: bool = False, out: Any = None) -> Any:
        if batched:  # leaves of shape (k, *shape) -> (d, k)
            return torch.cat([x.reshape(x.shape[0], -1) for x in leaves], dim=1).T
        return torch.cat([x.reshape(-1) for x in leaves], out=out)

    def _by_columns(self, V: Any, product: Any) -> Any:
        """``product(column, row_out)`` for each column of ``V``, written into the rows of
        one (k, d) block, returned as its (d, k) view.

        On a CPU copying the strided columns one by one is about 3x faster than one
        transposed copy of ``V``, and writing each result in place saves stacking them.
        """
        out = torch.empty((V.shape[1], V.shape[0]), dtype=V.dtype, device=V.device)
        for j in range(V.shape[1]):
            product(V[:, j].contiguous(), out[j])
        return out.T

    def _loss_fn(self, args: tuple[Any, ...]):
        def loss(*leaves: Any) -> Any:
            return self.problem.loss(list(leaves), args)

        return loss

    def _grad_graph(self, args: tuple[Any, ...]) -> tuple[list[Any], list[Any], list[int]]:
        """Leaves requiring grad, the gradient with its graph, and the leaves it depends on."""
        leaves = [x.detach().requires_grad_(True) for x in self.problem.leaves]
        loss = self._loss_fn(args)(*leaves)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # A gradient entry that does not depend on the parameters (the loss is linear in
        # that leaf) contributes a zero block; keep only the ones with a graph.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return leaves, [grads[i] for i in live], live

    def _backward(self, graph, vs: list[Any], batched: bool, retain: bool) -> list[Any]:
        leaves, grads, live = graph
        if not live:
            return [torch.zeros_like(v) for v in vs]
        out = torch.autograd.grad(
            grads,
            leaves,
            grad_outputs=[vs[i] for i in live],
            retain_graph=retain or self.differentiable,
            create_graph=self.differentiable,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
        return list(out)

    # --- compiled products (compile=True) ------------------------------------------------
    def _warm_up(self, start: float) -> float:
        """Compile for the first batch's shapes (one product); the seconds since ``start``
        (or 0.0 when an earlier operator compiled for the same shapes)."""
        first = next(iter(self.problem.batches()), None)
        if first is None:  # no local batch (distributed): compiled at the first product
            return 0.0
        args = _detached(first[0])
        signature = _signature(self.problem.leaves, args)
        if signature in self._compiled.seen:
            return 0.0
        self._compiled_product(
            args, torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        )
        seconds = time.perf_counter() - start
        self._compiled.seen.add(signature)
        logging.getLogger("hessop").info(
            "compiled the %s Hessian-vector product in %.1f s", self.mode, seconds
        )
        return seconds

    def _compiled_product(self, args: tuple[Any, ...], v: Any, out: Any = None) -> Any:
        # Tangent leaves are views of a contiguous vector, so that their strides (which the
        # compiled function is specialized on) are the same in every call.
        vs = tuple(self._leaves_v(v.contiguous()))
        inputs = (tuple(self.problem.leaves), vs, args)
        with autodiff_context(self.mode):
            try:
                pieces = self._compiled.fn(*inputs)
            except HessopError:
                raise
            except Exception as err:
                self._diagnose(err, inputs)
        return self._flat(list(pieces), out=out)

    def _diagnose(self, err: Exception, inputs: tuple[Any, ...]) -> NoReturn:
        """Raise the error of the uncompiled product if it fails too, else a compile error."""
        try:
            self._compiled.eager(*inputs)
        except (RuntimeError, NotImplementedError) as eager_err:
            translated = _forward_mode_error(eager_err, self.mode)
            if translated is eager_err:
                raise
            raise translated from eager_err
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"compile=True: torch.compile could not compile the {self.mode} product of this "
            f"loss ({type(err).__name__}: {first_line}); pass compile=False, which computes "
            "the same product without compiling"
        ) from err

    def _norms_mode(self, batched: bool) -> str | None:
        """The mode whose normalization decompositions this product needs (None: none).

        Reverse-over-reverse needs one only for a batched backward (``MODE_NORMS``), and the
        decomposition costs Python time on every op of the loss: a kept graph is built
        without it when it will never be backpropagated batched (on a CPU, see
        ``_batch_hmm``).
        """
        if self.mode != "reverse-over-reverse" or batched:
            return self.mode
        kept = self.cache and not self.problem.streamed
        return self.mode if kept and self.device.type != "cpu" else None

    # --- per-batch products -------------------------------------------------------------
    def _batch_hvp(self, args: tuple[Any, ...], v: Any) -> Any:
        if self._compiled is not None:
            return self._compiled_product(_detached(args), v)
        return self._product(args, v, batched=False)

    def _batch_hmm(self, args: tuple[Any, ...], V: Any) -> Any:
        if self._compiled is not None:
            args = _detached(args)
            return self._by_columns(V, lambda v, out: self._compiled_product(args, v, out))
        kept = self.cache and not self.problem.streamed
        if self.mode == "reverse-over-reverse" and kept and self.device.type == "cpu":
            # On CPU a batched backward (is_grads_batched) through the kept gradient graph is
            # no faster than one backward per column, and slower on wide layers (benchmarks/).
            if self.differentiable:  # torch.cat(out=) would keep no autograd graph
                cols = [self._product(args, V[:, j], False) for j in range(V.shape[1])]
                return torch.stack(cols, dim=1)
            return self._by_columns(V, lambda v, out: self._product(args, v, False, out))
        step = self.chunk_size or V.shape[1]
        cols = [
            self._product(args, V[:, j : j + step], batched=True)
            for j in range(0, V.shape[1], step)
        ]
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

    def _product(self, args: tuple[Any, ...], v: Any, batched: bool, out: Any = None) -> Any:
        vs = self._leaves_v(v)
        with autodiff_context(self._norms_mode(batched)):
            if self.mode == "reverse-over-reverse":
                kept = self.cache and not self.problem.streamed
                if kept and self._graph is None and not self._used:
                    # A one-off product must not hold the graph afterwards (a quarter of its
                    # peak memory): the first product frees it, the second builds and keeps it.
                    self._used, kept = True, False
                if kept and self._graph is None:
                    self._graph = self._grad_graph(args)
                graph = self._graph if kept else self._grad_graph(args)
                return self._flat(self._backward(graph, vs, batched, retain=kept), batched, out)
            if self.mode in ("forward-over-reverse", "reverse-over-forward"):
                try:
                    return self._functorch_product(args, vs, batched)
                except (RuntimeError, NotImplementedError) as err:
                    raise _forward_mode_error(err, self.mode) from err
            if self.mode == "dense":
                try:  # torch.func.hessian is jacfwd(jacrev): it needs forward mode too
                    return self._dense_matrix(args) @ v
                except (RuntimeError, NotImplementedError) as err:
                    raise _forward_mode_error(err, self.mode) from err
            if self.mode == "finite-difference":
                return self._fd_product(args, v, batched)
        raise AssertionError(self.mode)

    def _functorch_product(self, args: tuple[Any, ...], vs: list[Any], batched: bool) -> Any:
        from torch.func import grad, jvp, vmap

        loss = self._loss_fn(args)
        primals = tuple(self.problem.leaves)
        argnums = tuple(range(len(primals)))
        if self.mode == "forward-over-reverse":
            g = grad(loss, argnums=argnums)

            def hvp(*tangents: Any) -> Any:
                return jvp(g, primals, tangents)[1]
        else:

            def hvp(*tangents: Any) -> Any:
                def directional(*p: Any) -> Any:
                    return jvp(loss, p, tangents)[1]

                return grad(directional, argnums=argnums)(*primals)

        if batched:
            return self._flat(list(vmap(hvp)(*vs)), batched=True)
        return self._flat(list(hvp(*vs)))

    def _dense_matrix(self, args: tuple[Any, ...]) -> Any:
        key = id(args) if self.problem.streamed else 0
        if key not in self._dense:
            loss = self._loss_fn(args)

            def flat_loss(w: Any) -> Any:
                return loss(*self._leaves_v(w))

            w = self._flat(self.problem.leaves)
            H = torch.func.hessian(flat_loss)(w)
            if self.differentiable:
                return H  # its graph may be backpropagated only once: never reuse it
            H = H.detach()
            if self.problem.streamed:
                return H  # never keep one matrix per batch
            self._dense[key] = H
        return self._dense[key]

    def _gradient(self, args: tuple[Any, ...], leaves: list[Any]) -> Any:
        leaves = [x.detach().requires_grad_(True) for x in leaves]
        loss = self._loss_fn(args)(*leaves)
        grads = torch.autograd.grad(
            loss,
            leaves,
            allow_unused=True,
            materialize_grads=True,
            create_graph=self.differentiable,
        )
        return (loss if self.differentiable else loss.detach()), self._flat(list(grads))

    def _fd_product(self, args: tuple[Any, ...], v: Any, batched: bool) -> Any:
        if batched:
            return torch.stack(
                [self._fd_product(args, v[:, j], False) for j in range(v.shape[1])], dim=1
            )
        w = self._flat(self.problem.leaves)
        vnorm = torch.linalg.vector_norm(v)
        if vnorm == 0:
            return torch.zeros_like(v)
        # Central differences: error O(h^2) from truncation vs O(eps/h) from rounding; the
        # balance is at h ~ eps^(1/3), scaled to the size of the point.
        h = self._bk.eps(self.dtype) ** (1 / 3) * max(1.0, float(torch.linalg.vector_norm(w)))
        h = h / float(vnorm.detach())  # the step is a constant, even when v carries a graph
        plus = self._gradient(args, self._leaves_v(w + h * v))[1]
        minus = self._gradient(args, self._leaves_v(w - h * v))[1]
        return (plus - minus) / (2 * h)

    def _check_point(self) -> None:
        if [x._version for x in self.problem.leaves] != self._versions:
            raise StaleOperatorError(
                "the parameters of this operator were changed in place after it was built "
                "(an optimizer step?), and an operator is the Hessian at one point: build a "
                "new one at the new point (compilations are shared), or build this one from "
                "a copy of the parameters (p.detach().clone()) to keep its point"
            )

    def _batch_grad(self, args: tuple[Any, ...]) -> tuple[Any, Any]:
        with autodiff_context():
            return self._gradient(args, self.problem.leaves)


# --- compile=True ---------------------------------------------------------------------------
_COMPILABLE = ("forward-over-reverse", "reverse-over-forward")

#: compiled products shared between operators, keyed by (f, layout, mode); a few recent
#: entries only, since each one holds its loss function and its compiled code
_COMPILED: OrderedDict[tuple[Any, ...], types.SimpleNamespace] = OrderedDict()
_COMPILED_SIZE = 16


def _compiled_mode(mode: str, differentiable: bool) -> str:
    if differentiable:
        raise ValueError(
            "compile=True and differentiable=True cannot be combined: a compiled product "
            "keeps no autograd graph to the arguments; pass compile=False"
        )
    if mode == "auto":
        # Measured on the reference models: as fast as forward-over-reverse or faster
        # (MLP, CNN), and quicker to compile.
        return "reverse-over-forward"
    if mode not in _COMPILABLE:
        raise ValueError(
            f"compile=True needs a torch.func mode, 'forward-over-reverse' or "
            f"'reverse-over-forward' (or 'auto', which picks the latter); mode={mode!r} "
            "cannot be compiled: pass one of those, or compile=False"
        )
    return mode


def _shared_compiled(problem: Problem, mode: str) -> types.SimpleNamespace:
    """The compiled product of the loss, shared with earlier operators of the same loss."""
    key = (problem.f, problem.spec, mode)
    try:
        entry = _COMPILED.pop(key, None)
    except TypeError:  # an unhashable callable: compile for this operator only
        return _build_compiled(problem.f, problem.spec, mode)
    if entry is None:
        entry = _build_compiled(problem.f, problem.spec, mode)
    _COMPILED[key] = entry  # most recently used last
    while len(_COMPILED) > _COMPILED_SIZE:
        _COMPILED.popitem(last=False)
    return entry


def _build_compiled(f: Any, spec: Any, mode: str) -> types.SimpleNamespace:
    from torch.func import grad, jvp

    # A Problem without a point or data: the function closes over the loss only, so that
    # dynamo neither guards on the operator's arrays nor keeps them alive.
    shell = Problem(f, spec, [], None, None, "mean", None, tuple)

    def loss(p: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        return shell.loss(list(p), args)

    if mode == "forward-over-reverse":

        def product(p: tuple[Any, ...], t: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
            return jvp(lambda q: grad(loss)(q, args), (p,), (t,))[1]
    else:

        def product(p: tuple[Any, ...], t: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
            return grad(lambda q: jvp(lambda r: loss(r, args), (q,), (t,))[1])(p)

    # dynamo keeps its compilations on the code object, at most recompile_limit (8) of
    # them, which every loss would share; a private copy of the code gives each loss its
    # own. fullgraph: a graph break is an error (then explained), never a silent slowdown;
    # dynamic=False: a new batch shape compiles static kernels instead of symbolic ones.
    private = types.FunctionType(
        product.__code__.replace(),
        product.__globals__,
        product.__name__,
        None,
        product.__closure__,
    )
    fn = torch.compile(private, fullgraph=True, dynamic=False)
    return types.SimpleNamespace(fn=fn, eager=product, seen=set())


def _detached(args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Products need no graph to the arguments; a tensor requiring grad would make
    # torch.compile trace (and compile) a backward graph as well.
    return map_arrays(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, args)


def _signature(leaves: list[Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What the compiled function is specialized on, as far as hessop can tell."""
    from torch.utils._pytree import tree_leaves

    def part(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.stride(), x.dtype, x.device)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x  # dynamo specializes on the values of Python scalars
        return id(x)  # and guards other objects (a module, say) by identity

    return tuple(part(x) for x in tree_leaves((tuple(leaves), args)))

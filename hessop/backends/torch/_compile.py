"""``compile=True`` in torch: the torch.func product of the loss through ``torch.compile``.

The product is a function of (point, tangent, arguments), so it does not depend on an
operator: it is compiled once and shared by the operators of the same loss, layout and
mode (:class:`hessop._sharing.SharedFunctions`), and an operator at a new point or on a new
batch of the same shapes reuses it. dynamo guards on what the loss reads besides its
arguments, so a loss whose closed-over tensors or globals changed recompiles instead of
answering with stale values. ``matmat`` loops over the columns (a vmapped compiled function
would be compiled again for each width).

Across processes, torch's on-disk caches (inductor's FX graph cache and the AOTAutograd
cache, both on by default, in ``TORCHINDUCTOR_CACHE_DIR``) spare a later process the
compilation; dynamo still traces the loss again (a few seconds). The AOTAutograd cache
refuses graphs that call functions it does not know, and the graph of a ``torch.func``
transform calls the functorch nesting functions (``_jvp_increment_nesting`` ...): these
only enter and leave a transform level given in the graph, so hessop marks them cacheable
while it compiles (:data:`_CACHEABLE`), which makes a later process's compilation a cache
load.
"""

from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch._functorch.predispatch
import torch._inductor.config

from ..._errors import HessopError
from ..._loss import Loss
from ..._pytree import map_arrays
from ..._sharing import SharedFunctions
from .._base import CurvatureKernel, KernelOptions
from ._context import autodiff_context, translate_error
from ._kernel import TorchHessianKernel

_SHARED = SharedFunctions(maxsize=16)

#: the functorch functions in the graph of a torch.func transform, for the AOTAutograd
#: cache (keyed by torch's version, as torch asks of such entries)
_CACHEABLE = {
    f"torch._functorch.predispatch.{name}": torch.__version__
    for name in (
        "_jvp_increment_nesting",
        "_jvp_decrement_nesting",
        "_enter_dual_level",
        "_exit_dual_level",
        "_make_dual",
        "_unpack_dual",
        "_unwrap_for_grad",
        "_add_batch_dim",
        "_remove_batch_dim",
        "_vmap_increment_nesting",
        "_vmap_decrement_nesting",
    )
    if hasattr(torch._functorch.predispatch, name)
}


def use_compilation_cache(folder: Path) -> bool:
    """Inductor's and AOTAutograd's on-disk caches in ``folder`` (``TORCHINDUCTOR_CACHE_DIR``,
    which torch reads at each compilation) instead of torch's default temporary folder."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return True


class CompiledKernel(CurvatureKernel):
    """Products by the shared compiled function; the gradient stays eager."""

    def __init__(self, loss: Loss, mode: str, options: KernelOptions) -> None:
        self.loss, self.mode = loss, mode
        self.eager = TorchHessianKernel(loss, mode, options)
        self.compiled = _SHARED.get(options.share_key, lambda: _build(loss, mode))

    def share_as(self, key: Any) -> None:
        _SHARED.alias(key, self.compiled)

    def product(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> Any:
        if V.ndim == 2:
            return self.eager.by_columns(V, lambda v, out: self._vector(point, args, v, out))
        return self._vector(point, args, V)

    def _vector(self, point: tuple[Any, ...], args: tuple[Any, ...], v: Any, out: Any = None):
        # Tangent leaves are views of a contiguous vector, so that their strides (which the
        # compiled function is specialized on) are the same in every call.
        inputs = (tuple(point), tuple(self.eager.split(v.contiguous())), _detached(args))
        with autodiff_context(self.mode):
            try:
                pieces = self.compiled.fn(*inputs)
            except HessopError:
                raise
            except Exception as err:
                self._diagnose(err, inputs)
        return self.eager.join(list(pieces), out=out)

    def gradient(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> tuple[Any, Any]:
        return self.eager.gradient(point, args)

    def depends_on_point(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> bool:
        return self.eager.depends_on_point(point, args)

    def warm_up(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> float:
        """Compile for this batch's shapes (one product); 0.0 when an earlier operator
        compiled for the same shapes."""
        start = time.perf_counter()
        signature = _signature(point, _detached(args))
        if signature in self.compiled.seen:
            return 0.0  # an operator of the same loss and state checked and compiled these
        self.eager.gradient(point, args)  # the loss's first-call checks run eagerly
        d = sum(self.loss.spec.sizes)
        self._vector(point, args, torch.zeros(d, dtype=point[0].dtype, device=point[0].device))
        seconds = time.perf_counter() - start
        self.compiled.seen.add(signature)
        logging.getLogger("hessop").info(
            "compiled the %s Hessian-vector product in %.1f s", self.mode, seconds
        )
        return seconds

    def _diagnose(self, err: Exception, inputs: tuple[Any, ...]) -> NoReturn:
        """Raise the error of the uncompiled product if it fails too, else a compile error."""
        try:
            self.compiled.eager(*inputs)
        except (RuntimeError, NotImplementedError) as eager_err:
            translated = translate_error(eager_err, self.mode)
            if translated is eager_err:
                raise
            raise translated from eager_err
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"compile=True: torch.compile could not compile the {self.mode} product of this "
            f"loss ({type(err).__name__}: {first_line}); pass compile=False, which computes "
            "the same product without compiling"
        ) from err


def _build(template: Loss, mode: str) -> types.SimpleNamespace:
    from torch.func import grad, jvp

    # A loss of its own, without checks (dynamo would trace them) and without any
    # operator's arrays, so that dynamo neither guards on nor keeps them.
    shell = Loss(template.f, template.spec, template.backend)
    shell.checks = False

    def loss(p: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        return shell(list(p), args)

    if mode == "forward-over-reverse":

        def product(p: tuple[Any, ...], t: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
            return jvp(lambda q: grad(loss)(q, args), (p,), (t,))[1]
    else:

        def product(p: tuple[Any, ...], t: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
            return grad(lambda q: jvp(lambda r: loss(r, args), (q,), (t,))[1])(p)

    # dynamo keeps its compilations on the code object, at most recompile_limit (8) of
    # them, which every loss would share; a private copy of the code gives each loss its
    # own. fullgraph: a graph break is an error (then explained), never a silent slowdown.
    # dynamic=False: static kernels, compiled once per batch size (an uneven last batch
    # compiles once more). A symbolic batch size does not survive the torch.func product in
    # torch 2.13 (dynamo's automatic dynamic recompiles with the size specialized again:
    # guard "size mismatch at index 0"), and padding the last batch is not exact for a loss
    # hessop cannot see into (benchmarks/README.md, compile section).
    private = types.FunctionType(
        product.__code__.replace(),
        product.__globals__,
        product.__name__,
        None,
        product.__closure__,
    )
    fn = torch.compile(private, fullgraph=True, dynamic=False, backend=_inductor)
    return types.SimpleNamespace(fn=fn, eager=product, seen=set())


def _inductor(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """torch.compile's default backend, with graphs of torch.func transforms allowed into the
    AOTAutograd cache (see the module doc) for this compilation only: dynamo calls it only
    when it compiles, so the products pay nothing for the setting."""
    from torch._inductor.compile_fx import compile_fx

    marked = {**torch._inductor.config.unsafe_marked_cacheable_functions, **_CACHEABLE}
    with torch._inductor.config.patch(unsafe_marked_cacheable_functions=marked):
        return compile_fx(graph, example_inputs)


def _detached(args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Products need no graph to the arguments; a tensor requiring grad would make
    # torch.compile trace (and compile) a backward graph as well.
    return map_arrays(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, args)


def _signature(leaves: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What the compiled function is specialized on, as far as hessop can tell."""
    from torch.utils._pytree import tree_leaves

    def part(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), x.stride(), x.dtype, x.device)
        if x is None or isinstance(x, (bool, int, float, str)):
            return x  # dynamo specializes on the values of Python scalars
        return id(x)  # and guards other objects (a module, say) by identity

    return tuple(part(x) for x in tree_leaves((tuple(leaves), args)))

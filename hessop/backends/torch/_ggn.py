"""Generalized Gauss-Newton products ``J^T H_loss J v`` in torch, by reverse mode only.

``J v`` is computed without forward-mode AD (which some ops lack) by the double-backward
trick: ``J^T u`` is a linear function of a dummy cotangent ``u``, and its derivative with
respect to ``u`` applied to ``v`` is ``J v``. Then ``H_loss (J v)`` is one backward pass
through the gradient of the loss with respect to the output, and ``J^T`` of that is one
more backward pass through the model. :meth:`TorchGGNKernel.linearize` keeps the graphs,
so later products are three backward passes without a forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from ..._errors import LossError
from ..._pytree import join_columns, split_columns, unflatten, unravel
from .._base import CurvatureKernel, KernelOptions
from ._context import autodiff_context
from ._kernel import TorchHessianKernel


class TorchGGNKernel(CurvatureKernel):
    """The GGN of ``loss_fn(model(x), y)`` for a model adapter (``output``, ``loss_fn``)."""

    linearizable = True

    def __init__(self, model: Any, loss: Any, options: KernelOptions) -> None:
        self.model, self.spec = model, loss.spec
        self.hessian = TorchHessianKernel(loss, "reverse-over-reverse", options)
        self.device = options.device

    def _graph(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        x, y = args
        leaves = [t.detach().requires_grad_(True) for t in point]
        with self.model.scope():
            out = self.model.output(unflatten(self.spec, leaves), x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"model_ggn needs the model to return one tensor, got {type(out).__name__}; "
                "wrap the model so that it returns the tensor that loss_fn takes"
            )
        live: list[int] = []
        jtu: Any = ()
        u = None
        if out.requires_grad:
            u = torch.zeros_like(out, requires_grad=True)
            grads = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            jtu = [grads[i] for i in live]
        o = out.detach().requires_grad_(True)
        with self.model.scope():
            loss = self.model.loss_fn(o, y)
        if tuple(getattr(loss, "shape", ())) != ():
            raise LossError(
                f"loss_fn must return a scalar, got shape {tuple(loss.shape)}; reduce it"
            )
        gl = torch.autograd.grad(loss, o, create_graph=True)[0]
        return leaves, out, u, jtu, live, o, gl

    def _apply(self, graph: Any, V: Any, keep: bool) -> Any:
        batched = V.ndim == 2
        xp = self.hessian.loss.backend.xp
        vs = split_columns(xp, self.spec, V) if batched else unravel(xp, self.spec, V)
        leaves, out, u, jtu, live, o, gl = graph
        if not live or not gl.requires_grad:  # the output or the loss is linear
            return torch.zeros_like(V)
        Jv = torch.autograd.grad(
            jtu, u, [vs[i] for i in live], retain_graph=True, is_grads_batched=batched
        )[0]
        HJv = torch.autograd.grad(gl, o, Jv, retain_graph=keep, is_grads_batched=batched)[0]
        res = torch.autograd.grad(
            out,
            leaves,
            HJv,
            retain_graph=keep,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
        if batched:
            return join_columns(xp, list(res))
        return torch.cat([r.reshape(-1) for r in res])

    # batched backward passes (is_grads_batched) need the group_norm decomposition
    def product(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> Any:
        with autodiff_context("reverse-over-reverse"):
            return self._apply(self._graph(point, args), V, keep=False)

    def linearize(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> tuple[Any, Any]:
        with autodiff_context("reverse-over-reverse"):
            graph = self._graph(point, args)
            return self._apply(graph, V, keep=True), graph

    def apply(self, graph: Any, V: Any) -> Any:
        with autodiff_context("reverse-over-reverse"):
            return self._apply(graph, V, keep=True)

    block_products = True

    def block_product(
        self,
        point: tuple[Any, ...],
        args: tuple[Any, ...],
        blocks: list[tuple[tuple[int, ...], Any]],
        cache: Any = None,
    ) -> tuple[list[Any], Any]:
        """Each block's ``J_g^T H_loss J_g V`` through one set of graphs (``cache``, or
        built here): the first and last backward passes reach the block's leaves only."""
        with autodiff_context("reverse-over-reverse"):
            graph = self._graph(point, args) if cache is None else cache
            return [self._block(graph, idx, V) for idx, V in blocks], graph

    def _block(self, graph: Any, idx: tuple[int, ...], V: Any) -> Any:
        leaves, out, u, jtu, live, o, gl = graph
        pos = {i: j for j, i in enumerate(live)}
        rows = [i for i in idx if i in pos]
        if not rows or not gl.requires_grad:
            return torch.zeros_like(V)
        pieces = dict(zip(idx, torch.split(V, [self.spec.sizes[i] for i in idx])))
        vs = [pieces[i].T.reshape(-1, *self.spec.shapes[i]) for i in rows]
        Jv = torch.autograd.grad(
            [jtu[pos[i]] for i in rows], u, vs, retain_graph=True, is_grads_batched=True
        )[0]
        HJv = torch.autograd.grad(gl, o, Jv, retain_graph=True, is_grads_batched=True)[0]
        res = torch.autograd.grad(
            out,
            [leaves[i] for i in idx],
            HJv,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=True,
        )
        return TorchHessianKernel.join(list(res), batched=True)

    def gradient(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> tuple[Any, Any]:
        return self.hessian.gradient(point, args)

    def depends_on_point(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> bool:
        return self.hessian.depends_on_point(point, args)

"""torch.func's transforms behind hessop's :class:`~hessop.backends._base.Transforms`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.func

from ..._pytree import tree_map
from .._base import Transforms
from ._context import autodiff_context, translate_error


class TorchTransforms(Transforms):
    name = "torch"
    # vmap(jacfwd(jacrev(f))) is 5-10x slower than the summed-gradient trick in torch 2.x
    per_sample_hessian = "summed-gradient"
    # vmap(jacfwd(f)) is 7-30x slower than one batched JVP per input coordinate; for
    # jacrev, vmap is as fast as the summed trick or up to 3x faster (benchmarks/per_sample.py)
    per_sample_jacfwd = "summed-output"

    @contextlib.contextmanager
    def context(self, graph: bool = True) -> Iterator[None]:
        # The math attention kernel (the fused ones have no forward-mode or double-backward
        # derivatives) and the forward-mode lock, but the *caller's* grad mode: torch.func
        # differentiates inside either way, and the outer mode decides only whether results
        # keep a graph to the inputs.
        outer = contextlib.nullcontext() if graph else torch.no_grad()
        with autodiff_context("forward-over-reverse", grad=None), outer:
            yield

    def vmap(self, fn: Callable, in_axes: Any, randomness: str = "error") -> Callable:
        return torch.func.vmap(fn, in_dims=in_axes, randomness=randomness)

    def grad(self, fn: Callable) -> Callable:
        return torch.func.grad(fn)

    def jvp(self, fn: Callable, primal: Any, tangent: Any) -> tuple[Any, Any]:
        return torch.func.jvp(fn, (primal,), (tangent,))

    def vjp(self, fn: Callable, primal: Any) -> tuple[Any, Callable]:
        out, pull = torch.func.vjp(fn, primal)
        return out, lambda ct: pull(ct)[0]

    def linearize(self, fn: Callable, primal: Any) -> Callable:
        # J t = d/du <J^T u, t> (linear in u): a VJP of the kept pullback. Each product is
        # then one backward pass through the backward graph, about the cost of a forward
        # pass, where torch.func.jvp costs two to three (and torch.func.linearize tens of
        # gradients to set up), and no operation needs a forward-mode rule.
        out, pull = torch.func.vjp(fn, primal)
        push = torch.func.vjp(lambda u: pull(u)[0], torch.zeros_like(out))[1]
        return lambda tangent: push(tangent)[0]

    def jacfwd(self, fn: Callable, randomness: str = "error") -> Callable:
        return torch.func.jacfwd(fn, randomness=randomness)

    def jacrev(self, fn: Callable) -> Callable:
        return torch.func.jacrev(fn)

    def eye(self, m: int, like: Any) -> Any:
        return torch.eye(m, dtype=like.dtype, device=like.device)

    def output_spec(self, fn: Callable[[Any], Any], x: Any) -> tuple[tuple[int, ...], Any]:
        with torch.no_grad():  # only the shape and dtype are needed: keep no graph
            out = fn(x)
        return tuple(out.shape), out.dtype

    def chunked(self, kernel, mapped, size, chunk):
        if chunk is None or chunk >= size:
            return kernel(*mapped)
        parts = [kernel(*[m[i : i + chunk] for m in mapped]) for i in range(0, size, chunk)]
        return tree_map(lambda *xs: torch.cat(xs, dim=0), *parts)

    def translate_error(self, err: Exception, mode: str) -> Exception:
        return translate_error(err, mode)

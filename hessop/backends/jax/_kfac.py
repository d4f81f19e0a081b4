"""The inputs and output gradients of the dense and convolution layers of a JAX model.

No annotation is asked of the user: the model is traced to a jaxpr, and a layer is any
``dot_general`` (``x @ W``, ``x @ W.T``, ``einsum``, flax's ``Dense``) or
``conv_general_dilated`` whose one operand is a parameter leaf, possibly transposed or cast
on the way (a *tagged* value below), and whose other operand is an activation. A bias is a
parameter added right after, broadcast along the layer's output channels. Any other use
of a parameter (a LayerNorm scale, an embedding lookup, a weight used twice or inside a
``scan``) makes that parameter unsupported, with the primitive named.

The capture evaluates the jaxpr with a small interpreter (calls such as ``jit`` are
entered when they contain a layer) that records each layer's input and adds a zero
``delta`` to its output; ``jax.vjp`` with respect to the deltas gives every layer's output
gradient in one backward pass, ``vmap`` of it several cotangents at once. The whole
per-batch computation is one jitted function per ``fn``.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from ..._pytree import flatten, unflatten
from .._base import KFACLayer, LayerCapture, layer_name

#: primitives that only move, cast or broadcast a parameter's entries
_LAYOUT = ("transpose", "convert_element_type", "copy", "copy_p", "reduce_precision")
_RESHAPES = ("broadcast_in_dim", "reshape", "squeeze")
#: call primitives entered by the analysis and the interpreter, and their jaxpr parameter
#: the compiled per-batch functions (see JaxLayerCapture.run)
_COMPILED: dict[Any, Callable[..., Any]] = {}
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
}


@dataclass(frozen=True)
class _Tag:
    """A value that is parameter leaf ``leaf`` with its entries moved: ``axes[d]`` is the
    leaf axis that axis ``d`` of the value runs along (None: a broadcast axis)."""

    leaf: int
    axes: tuple[int | None, ...]


@dataclass
class _Found:
    """A layer equation and how to read its input and output gradient."""

    eqn: Any
    kind: str
    weight: int
    perm: tuple[int, ...]
    d_out: int
    d_in: int
    channels: tuple[int, ...]  # the output axes of the layer's output channels
    x_index: int  # which operand of the equation is the activation
    in_order: tuple[int, ...] = ()  # dot: activation axes as (free..., contracted...)
    out_order: tuple[int, ...] = ()  # output axes as (sample, positions..., channels...)
    bias: int | None = None


@dataclass
class _Analysis:
    layers: list[_Found] = field(default_factory=list)
    other: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    calls: set[int] = field(default_factory=set)

    def use(self, tag: _Tag | None, what: str) -> None:
        if tag is not None:
            self.other[tag.leaf].add(what)


def _inner(eqn: Any) -> Any:
    sub = eqn.params[_CALLS[eqn.primitive.name]]
    return sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())


def _walk(jaxpr: Any, tags: dict[Any, _Tag], outs: dict[Any, tuple], an: _Analysis) -> tuple:
    """Tag propagation over ``jaxpr``: fills ``an``; returns the outputs' tags and layers."""
    for eqn in jaxpr.eqns:
        ins = [tags.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
        layer_ins = [outs.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
        name = eqn.primitive.name
        if name == "transpose" and layer_ins[0] is not None:  # a layer output, transposed
            found, channels = layer_ins[0]
            perm = list(eqn.params["permutation"])
            outs[eqn.outvars[0]] = (found, tuple(perm.index(c) for c in channels))
            continue
        if not any(ins) and not (name in _CALLS and any(layer_ins)):
            continue
        if name in _LAYOUT or name in _RESHAPES:
            tag = _moved(eqn, ins[0])
            if tag is None:
                an.use(ins[0], name)
            else:
                tags[eqn.outvars[0]] = tag
        elif name == "dot_general":
            _dot(eqn, ins, tags, outs, an)
        elif name == "conv_general_dilated":
            _conv(eqn, ins, outs, an)
        elif name in ("add", "add_any"):
            _bias(eqn, ins, layer_ins, an)
        elif name in _CALLS:
            closed = _inner(eqn)
            inner = closed.jaxpr
            before = len(an.layers)
            sub_tags = {v: t for v, t in zip(inner.invars, ins) if t is not None}
            sub_outs = {v: f for v, f in zip(inner.invars, layer_ins) if f is not None}
            out_tags, out_layers = _walk(inner, sub_tags, sub_outs, an)
            if len(an.layers) > before or any(layer_ins):
                an.calls.add(id(eqn))
            for v, t, f in zip(eqn.outvars, out_tags, out_layers):
                if t is not None:
                    tags[v] = t
                if f is not None:
                    outs[v] = f
        else:
            for t in ins:
                an.use(t, name)
    out_tags = [tags.get(v) if isinstance(v, jcore.Var) else None for v in jaxpr.outvars]
    out_layers = [outs.get(v) if isinstance(v, jcore.Var) else None for v in jaxpr.outvars]
    for t in out_tags:
        an.use(t, "the model's output directly")
    return out_tags, out_layers


def _moved(eqn: Any, tag: _Tag) -> _Tag | None:
    """The tag of a layout primitive's output (None: the entries are not just moved)."""
    name, axes = eqn.primitive.name, tag.axes
    shape_in = tuple(eqn.invars[0].aval.shape)
    shape_out = tuple(eqn.outvars[0].aval.shape)
    if name in _LAYOUT:
        if name == "transpose":
            axes = tuple(axes[i] for i in eqn.params["permutation"])
        return _Tag(tag.leaf, axes)
    if name == "broadcast_in_dim":
        new: list[int | None] = [None] * len(shape_out)
        for i, d in enumerate(eqn.params["broadcast_dimensions"]):
            if shape_in[i] != shape_out[d] and shape_in[i] != 1:
                return None
            new[d] = axes[i] if shape_in[i] == shape_out[d] else None
        return _Tag(tag.leaf, tuple(new))
    if name == "squeeze":
        dims = {d % len(shape_in) for d in eqn.params["dimensions"]}
        return _Tag(tag.leaf, tuple(a for i, a in enumerate(axes) if i not in dims))
    # reshape: only inserting or removing axes of size 1
    kept = [a for a, s in zip(axes, shape_in) if s != 1]
    if [s for s in shape_in if s != 1] != [s for s in shape_out if s != 1]:
        return None
    it = iter(kept)
    return _Tag(tag.leaf, tuple(next(it) if s != 1 else None for s in shape_out))


def _full(tag: _Tag | None, ndim: int) -> bool:
    """Whether a tagged value is its whole leaf, axes permuted (usable as a weight)."""
    return tag is not None and sorted(a for a in tag.axes if a is not None) == list(range(ndim))


def _dot(eqn: Any, ins: list, tags: dict, outs: dict, an: _Analysis) -> None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lt, rt = ins
    w_index = 1 if rt is not None else 0
    wt = ins[w_index]
    x_var, w_var = eqn.invars[1 - w_index], eqn.invars[w_index]
    ndim = len(w_var.aval.shape)
    if lb or rb or (lt is not None and rt is not None) or None in wt.axes or not _full(wt, ndim):
        for t in ins:
            an.use(t, "dot_general (not as the weight of a layer)")
        return
    wc, xc = (rc, lc) if w_index == 1 else (lc, rc)
    wf = [d for d in range(ndim) if d not in wc]
    xf = [d for d in range(len(x_var.aval.shape)) if d not in xc]
    if not xf:
        an.use(wt, "dot_general with an activation that has no sample axis")
        return
    shape = w_var.aval.shape
    perm = tuple(wt.axes[d] for d in wf) + tuple(wt.axes[d] for d in wc)
    nx, nw = len(xf), len(wf)
    channels = tuple(range(nx, nx + nw)) if w_index == 1 else tuple(range(nw))
    positions = tuple(range(nx)) if w_index == 1 else tuple(range(nw, nw + nx))
    found = _Found(
        eqn,
        "linear",
        wt.leaf,
        perm,
        math.prod(shape[d] for d in wf),
        math.prod(shape[d] for d in wc),
        channels,
        1 - w_index,
        in_order=tuple(xf) + tuple(xc),
        out_order=positions + channels,
    )
    an.layers.append(found)
    outs[eqn.outvars[0]] = (found, found.channels)


def _conv(eqn: Any, ins: list, outs: dict, an: _Analysis) -> None:
    p = eqn.params
    lt, rt = ins
    rhs = eqn.invars[1]
    ok = lt is None and _full(rt, len(rhs.aval.shape)) and None not in rt.axes
    plain = p["feature_group_count"] == 1 and p["batch_group_count"] == 1
    if not ok or not plain or any(d != 1 for d in p["lhs_dilation"]):
        why = "grouped or transposed conv_general_dilated" if ok else "conv_general_dilated"
        for t in ins:
            an.use(t, why + " (not as the kernel of a convolution)")
        return
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    shape = rhs.aval.shape
    perm = tuple(rt.axes[d] for d in rhs_spec)
    found = _Found(
        eqn,
        "conv",
        rt.leaf,
        perm,
        shape[rhs_spec[0]],
        math.prod(shape[d] for d in rhs_spec[1:]),
        (out_spec[1],),
        0,
        out_order=(out_spec[0], *out_spec[2:], out_spec[1]),
    )
    an.layers.append(found)
    outs[eqn.outvars[0]] = (found, found.channels)


def _bias(eqn: Any, ins: list, layer_ins: list, an: _Analysis) -> None:
    """A parameter added to a layer's output along its channels is the layer's bias."""
    for i in (0, 1):
        tag = ins[1 - i]
        if layer_ins[i] is None or tag is None or ins[i] is not None:
            continue
        found, channels = layer_ins[i]
        if found.bias is not None:
            continue
        rank = len(eqn.invars[1 - i].aval.shape)
        want: list[int | None] = [None] * rank
        for k, c in enumerate(channels):
            want[c] = k
        if len(want) == len(tag.axes) and list(tag.axes) == want:
            found.bias = tag.leaf
            return
    for t in ins:
        an.use(t, "add (not as the bias of a layer)")


def _analyze(closed: Any, num_leaves: int) -> _Analysis:
    an = _Analysis()
    tags = {v: _Tag(i, tuple(range(len(v.aval.shape)))) for i, v in enumerate(
        closed.jaxpr.invars[:num_leaves])}  # fmt: skip
    _walk(closed.jaxpr, tags, {}, an)
    return an


def _describe(an: _Analysis, names: list[str], num_leaves: int) -> tuple[tuple, dict]:
    """The supported layers and, for every other leaf, why it is not in one."""
    roles: dict[int, list[str]] = defaultdict(list)
    for f in an.layers:
        roles[f.weight].append("a layer's weight")
        if f.bias is not None:
            roles[f.bias].append("a layer's bias")
    why: dict[int, str] = {}
    for i in range(num_leaves):
        if an.other.get(i):
            why[i] = f"it is used by {', '.join(sorted(an.other[i]))}"
        elif len(roles[i]) > 1:
            why[i] = f"it is used {len(roles[i])} times ({', '.join(roles[i])}): a shared weight"
        elif not roles[i]:
            why[i] = "the model's output does not depend on it"
    layers = []
    for f in an.layers:
        if f.weight in why:
            if f.bias is not None:
                why.setdefault(
                    f.bias, f"the weight of its layer ({names[f.weight]}) is not supported"
                )
            continue
        bias = f.bias if f.bias is not None and f.bias not in why else None
        layers.append(KFACLayer(names[f.weight], f.kind, f.weight, bias, f.perm, f.d_out, f.d_in))
    return tuple(layers), {i: why[i] for i in sorted(why)}


class JaxLayerCapture(LayerCapture):
    """:class:`~hessop.backends._base.LayerCapture` of a JAX model adapter."""

    def __init__(self, model: Any, spec: Any, example: tuple[Any, Any]) -> None:
        self.model, self.spec = model, spec
        leaves = flatten(model.params)[0]
        self.num_leaves = len(leaves)
        closed = jax.make_jaxpr(self._output)(tuple(leaves), example[0])
        names = [layer_name(path) for path in spec.paths]
        self.layers, self.unsupported = _describe(
            _analyze(closed, self.num_leaves), names, self.num_leaves
        )

    def _output(self, point: tuple[Any, ...], x: Any) -> Any:
        return self.model.output(unflatten(self.spec, list(point)), x)

    def run(self, fn: Callable[..., Any], point: tuple[Any, ...], args: Any, *extra: Any) -> Any:
        # One compilation per model functions, layout, layers and fn, shared by every
        # capture of them (a KFAC recomputed at each training step compiles once).
        key = (getattr(self.model, "key", self.model), self.spec, self.layers, fn)
        jitted = _COMPILED.get(key)
        if jitted is None:
            if len(_COMPILED) >= 64:
                _COMPILED.pop(next(iter(_COMPILED)))
            jitted = _COMPILED[key] = jax.jit(functools.partial(self._run, fn))
        return jitted(tuple(point), tuple(args), *extra)

    def _run(self, fn: Callable[..., Any], point: tuple, args: tuple, *extra: Any) -> Any:
        x = args[0]
        closed = jax.make_jaxpr(self._output)(point, x)
        if len(closed.jaxpr.outvars) != 1:
            raise TypeError("model_kfac needs the model to return one array")
        an = _analyze(closed, self.num_leaves)
        by_weight = {f.weight: f for f in an.layers}
        found = [by_weight.get(layer.weight) for layer in self.layers]
        if any(f is None for f in found):
            raise RuntimeError(
                "the model traced for this batch's shapes has other layers than on the first "
                "batch; KFAC needs the same layers in every batch"
            )
        where = {id(f.eqn): k for k, f in enumerate(found)}
        invals = [*point, *jax.tree.leaves(x)]
        deltas = tuple(jnp.zeros(f.eqn.outvars[0].aval.shape, f.eqn.outvars[0].aval.dtype)
                       for f in found)  # fmt: skip

        def forward(ds: tuple) -> Any:
            recorded: dict[int, Any] = {}
            (out,) = _interpret(closed.jaxpr, closed.consts, invals, where, an.calls, ds, recorded)
            inputs = tuple(
                _input(f, recorded[k]) if layer.weight is not None else None
                for k, (f, layer) in enumerate(zip(found, self.layers))
            )
            return out, inputs

        out, pull, inputs = jax.vjp(forward, deltas, has_aux=True)

        def pullback(V: Any) -> tuple:
            grads = jax.vmap(lambda v: pull(v)[0])(V)
            return tuple(_output_rows(f, g) for f, g in zip(found, grads))

        return fn(lax.stop_gradient(out), args, inputs, pullback, *extra)


def _interpret(jaxpr, consts, invals, where, calls, deltas, recorded) -> list[Any]:
    """Evaluate ``jaxpr``, recording the layers' inputs and adding the deltas."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, invals))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if id(eqn) in calls:
            closed = _inner(eqn)
            outs = _interpret(closed.jaxpr, closed.consts, ins, where, calls, deltas, recorded)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns: list[Any] = []
            if isinstance(params, tuple):  # older JAX: (subfuns, params)
                subfuns, params = params
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*subfuns, *ins, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            k = where.get(id(eqn))
            if k is not None:
                recorded[k] = ins
                outs = [outs[0] + deltas[k]]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _input(f: _Found, ins: list[Any]) -> Any:
    """A layer's input as ``(samples, positions, d_in)`` (patches for a convolution)."""
    x = lax.stop_gradient(ins[f.x_index])
    if f.kind == "linear":
        x = jnp.transpose(x, f.in_order)
        return x.reshape(x.shape[0], -1, f.d_in)
    p = f.eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    shape = f.eqn.invars[1].aval.shape
    patches = lax.conv_general_dilated_patches(
        x,
        [shape[d] for d in rhs_spec[2:]],
        p["window_strides"],
        p["padding"],
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        dimension_numbers=p["dimension_numbers"],
        precision=lax.Precision.HIGHEST,
    )
    patches = jnp.transpose(patches, f.out_order)
    return patches.reshape(patches.shape[0], -1, f.d_in)


def _output_rows(f: _Found, g: Any) -> Any:
    """``(k, *out.shape)`` output gradients as ``(k, samples, positions, d_out)``."""
    g = jnp.transpose(g, (0, *(1 + d for d in f.out_order)))
    return g.reshape(g.shape[0], g.shape[1], -1, f.d_out)

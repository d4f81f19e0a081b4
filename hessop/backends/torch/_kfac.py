"""The inputs and output gradients of a torch model's linear and convolution layers.

A layer is a call of ``torch.nn.functional.linear`` or ``torch.nn.functional.conv2d`` whose
weight (or bias) is one of the differentiated parameters: ``nn.Linear`` and ``nn.Conv2d``
make exactly these calls, and so does a functional model that calls them itself. The calls
are seen through a :class:`torch.overrides.TorchFunctionMode` entered around the model's
forward pass, so no hook is installed on the user's modules. Every other use of a
parameter (a LayerNorm weight, an embedding table, ``x @ W.T``, a weight tied to two layers)
is seen too, and makes that parameter unsupported.

To read the gradient with respect to a layer's output, the mode adds a zero tensor ``delta``
that requires grad to the output of each layer call; a backward pass to the ``delta`` s gives
the output gradients of all layers at once, and an in-place operation on a layer's output
downstream (``ReLU(inplace=True)``) cannot corrupt them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..._pytree import flatten, unflatten
from .._base import KFACLayer, LayerCapture, layer_name
from ._context import autodiff_context

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _call_args(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments of a linear / conv2d call by name (None for any other function)."""
    if func is F.linear:
        names, defaults = ("input", "weight", "bias"), {"bias": None}
    elif func is F.conv2d:
        names, defaults = _CONV_ARGS, _CONV_DEFAULTS
    else:
        return None
    return {**defaults, **dict(zip(names, args)), **kwargs}


def _tensors_in(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _patches(x: torch.Tensor, w: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
    """The ``(n, positions, c_in * kh * kw)`` patches a conv2d kernel sees (channel-major,
    the order of ``weight.reshape(c_out, -1)``)."""
    k, stride, dilation = tuple(w.shape[2:]), _pair(call["stride"]), _pair(call["dilation"])
    padding = call["padding"]
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": torch puts the odd extra row / column at the end
            total = [d * (s - 1) for d, s in zip(dilation, k)]
            lo = [t // 2 for t in total]
            x = F.pad(x, (lo[1], total[1] - lo[1], lo[0], total[0] - lo[0]))
            padding = (0, 0)
    cols = F.unfold(x, k, dilation=dilation, padding=_pair(padding), stride=stride)
    return cols.transpose(1, 2)


class _Calls(torch.overrides.TorchFunctionMode):
    """Sees every torch function that receives a parameter leaf; in capture mode, records
    the layer inputs and adds the ``delta`` s to the layer outputs."""

    def __init__(self, leaves: list[torch.Tensor], layers: dict[int, int] | None = None) -> None:
        super().__init__()
        self.index = {id(t): i for i, t in enumerate(leaves)}
        self.layers = layers  # weight-or-bias leaf -> layer position (capture mode)
        self.calls: list[tuple[str, dict[str, Any]]] = []  # discovery: (function, args)
        self.others: dict[int, set[str]] = {}  # discovery: leaf -> other functions using it
        self.inputs: dict[int, torch.Tensor] = {}
        self.deltas: dict[int, torch.Tensor] = {}

    def _leaf(self, t: Any) -> int | None:
        return self.index.get(id(t)) if isinstance(t, torch.Tensor) else None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        call = _call_args(func, args, kwargs)
        if call is None:
            out = func(*args, **kwargs)
            if self.layers is None and _tensors_in(out):  # not metadata (.shape, .size())
                name = getattr(func, "__name__", str(func))
                if name == "__get__":  # a property: name the attribute (.T, .mT, .data)
                    name = "." + getattr(getattr(func, "__self__", None), "__name__", "?")
                for a in (*args, *kwargs.values()):
                    i = self._leaf(a)
                    if i is not None:
                        self.others.setdefault(i, set()).add(name)
            return out
        out = func(*args, **kwargs)
        if self.layers is None:
            self.calls.append((func.__name__, call))
            return out
        w, b = self._leaf(call["weight"]), self._leaf(call["bias"])
        pos = self.layers.get(w if w is not None else b) if (w, b) != (None, None) else None
        if pos is None:
            return out
        if w is not None:
            x = call["input"].detach()
            if func is F.conv2d:
                self.inputs[pos] = _patches(x, call["weight"].detach(), call)
            else:
                self.inputs[pos] = x.reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.zeros_like(out, requires_grad=True)
        self.deltas[pos] = delta
        return out + delta


class TorchLayerCapture(LayerCapture):
    """:class:`~hessop.backends._base.LayerCapture` of a torch model adapter."""

    def __init__(self, model: Any, spec: Any, example: tuple[Any, Any]) -> None:
        self.model, self.spec = model, spec
        names = list(getattr(model, "names", None) or spec.paths)
        leaves = [t.detach() for t in flatten(model.params)[0]]
        mode = _Calls(leaves)
        with torch.no_grad(), model.scope(), mode:
            model.output(unflatten(spec, leaves), example[0])
        self.layers, self.unsupported = _layers(mode, names, leaves)
        self._position = {}
        for pos, layer in enumerate(self.layers):
            for i in (layer.weight, layer.bias):
                if i is not None:
                    self._position[i] = pos

    def run(self, fn: Callable[..., Any], point: tuple[Any, ...], args: Any, *extra: Any) -> Any:
        x = args[0]
        leaves = [t.detach() for t in point]
        mode = _Calls(leaves, self._position)
        with autodiff_context("reverse-over-reverse"):
            with self.model.scope(), mode:
                out = self.model.output(unflatten(self.spec, leaves), x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"model_kfac needs the model to return one tensor, got {type(out).__name__}"
                )
            missing = [ly.name for p, ly in enumerate(self.layers) if p not in mode.deltas]
            if missing:
                raise RuntimeError(
                    f"the layers {missing} were not called on this batch; KFAC needs every "
                    "layer it found on the first batch in every batch"
                )
            deltas = [mode.deltas[p] for p in range(len(self.layers))]
            inputs = tuple(mode.inputs.get(p) for p in range(len(self.layers)))
            convs = [layer.kind == "conv" for layer in self.layers]

            def pullback(V: torch.Tensor) -> tuple[torch.Tensor, ...]:
                grads = _backward(out, deltas, V)
                return tuple(_as_rows(g, conv) for g, conv in zip(grads, convs))

            return fn(out.detach(), args, inputs, pullback, *extra)


def _backward(out: torch.Tensor, deltas: list[torch.Tensor], V: torch.Tensor) -> list[Any]:
    """Gradients of ``<out, V[j]>`` for every column ``j`` with respect to the deltas, as
    ``(k, *delta.shape)`` tensors: one batched backward pass, or a loop where an op has no
    batching rule for its backward."""
    try:
        grads = torch.autograd.grad(
            out, deltas, V, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError:
        cols = [
            torch.autograd.grad(out, deltas, V[j], retain_graph=True, allow_unused=True)
            for j in range(V.shape[0])
        ]
        grads = tuple(
            None if col[0] is None else torch.stack(col) for col in (list(c) for c in zip(*cols))
        )
    return [
        torch.zeros((V.shape[0], *d.shape), dtype=d.dtype, device=d.device) if g is None else g
        for g, d in zip(grads, deltas)
    ]


def _as_rows(g: torch.Tensor, conv: bool) -> torch.Tensor:
    """``(k, n, ...)`` output gradients as ``(k, n, positions, d_out)``."""
    if conv:  # (k, n, c_out, h, w)
        return g.flatten(3).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _layers(mode: _Calls, names: list[str], leaves: list[Any]) -> tuple[tuple, dict[int, str]]:
    """The layers and the unsupported leaves, from the calls seen on one forward pass."""
    uses: dict[int, list[str]] = {}
    found: list[tuple[str, int | None, int | None, dict[str, Any]]] = []
    for fname, call in mode.calls:
        w, b = mode._leaf(call["weight"]), mode._leaf(call["bias"])
        for i, role in ((w, "weight"), (b, "bias")):
            if i is not None:
                uses.setdefault(i, []).append(f"the {role} of a {fname} call")
        if (w, b) != (None, None):
            found.append((fname, w, b, call))
    why: dict[int, str] = {}
    for i, others in mode.others.items():
        why[i] = f"it is used by {', '.join(sorted(others))}"
    for i, u in uses.items():
        if len(u) > 1 and i not in why:
            why[i] = f"it is used {len(u)} times ({'; '.join(u)}): a shared weight"
    layers = []
    for fname, w, b, call in found:
        key = w if w is not None else b
        if fname == "conv2d" and int(call["groups"]) != 1:
            why.setdefault(key, f"grouped convolutions (groups={call['groups']}) are unsupported")
        elif call["input"].ndim < (4 if fname == "conv2d" else 2):
            why.setdefault(key, f"its {fname} input has no batch axis")
        if w is not None and w in why and b is not None:
            why.setdefault(b, f"the weight of its layer ({names[w]}) is not supported")
        w = None if w in why else w
        b = None if b in why else b
        if w is None and (b is None or call["weight"] is None):
            continue
        weight = call["weight"]
        layers.append(
            KFACLayer(
                layer_name(names[key]),
                "conv" if fname == "conv2d" else "linear",
                w,
                b,
                tuple(range(weight.ndim)),
                int(weight.shape[0]),
                int(weight[0].numel()),
            )
        )
    for i in range(len(leaves)):
        if i not in why and i not in uses:
            why[i] = "it is not the weight or bias of a torch.nn.Linear or nn.Conv2d layer"
    return tuple(layers), {i: why[i] for i in sorted(why)}

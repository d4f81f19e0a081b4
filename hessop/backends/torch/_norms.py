"""Normalization layers written out in elementary ops, for the AD modes that need it.

In torch 2.13, ``torch.func``'s derivative rules for the fused normalization kernels are
wrong at second order: reverse-over-forward (``grad`` of ``jvp``) and vmapped double
backward (``jacrev(jacrev(f))``, ``jacfwd(jacrev(f))`` = ``torch.func.hessian``) of
``F.layer_norm``, of ``F.batch_norm`` in training mode and of ``F.instance_norm`` give
Hessians that differ from finite differences by O(1) (pytorch/functorch#534 reports the
batching rule of the backward as incorrect). Reverse-over-reverse through autograd and
forward-over-reverse are right.

:class:`CompositeNorms` is a :class:`torch.overrides.TorchFunctionMode` that, while active,
computes those three functions from means and variances instead of the fused kernels, so
every derivative is composed from ops whose rules are right. Model-level operators turn it
on for the modes that need it; evaluation-mode BatchNorm (running statistics, an affine
map) keeps the fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dim=dims, keepdim=True)  # biased, as the kernels
    return centered * torch.rsqrt(var + eps)


def _channel_affine(y: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Any,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    n = len(normalized_shape) if not isinstance(normalized_shape, int) else 1
    y = _normalize(input, tuple(range(-n, 0)), eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def batch_norm(
    input: torch.Tensor,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    if not training:  # running statistics: an affine map, the fused kernel is right
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if input.numel() // input.shape[1] <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{tuple(input.shape)}"
        )
    # Running statistics are not updated: model-level operators pass throw-away buffers.
    dims = (0, *range(2, input.dim()))
    return _channel_affine(_normalize(input, dims, eps), weight, bias)


def instance_norm(
    input: torch.Tensor,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    if not use_input_stats:
        return F.instance_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = tuple(range(2, input.dim()))
    return _channel_affine(_normalize(input, dims, eps), weight, bias)


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    n, c = input.shape[0], input.shape[1]
    grouped = input.reshape(n, num_groups, -1)
    y = _normalize(grouped, (-1,), eps).reshape(input.shape)
    return _channel_affine(y, weight, bias) if c else y


def rms_norm(
    input: torch.Tensor,
    normalized_shape: Any,
    weight: Any = None,
    eps: float | None = None,
) -> torch.Tensor:
    n = len(normalized_shape) if not isinstance(normalized_shape, int) else 1
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    y = input * torch.rsqrt((input * input).mean(dim=tuple(range(-n, 0)), keepdim=True) + eps)
    return y * weight if weight is not None else y


_REPLACEMENTS = {
    F.layer_norm: layer_norm,
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    F.group_norm: group_norm,
    F.rms_norm: rms_norm,
}


#: the normalizations each Hessian mode must decompose (torch 2.13; see the module doc).
#: reverse-over-reverse: ``F.group_norm``'s double backward fails under the batched
#: backward of ``matmat`` (``is_grads_batched``) with a shape error.
MODE_NORMS: dict[str, frozenset[str]] = {
    "reverse-over-reverse": frozenset({"group_norm"}),
    "reverse-over-forward": frozenset({"layer_norm", "batch_norm", "instance_norm", "group_norm"}),
    "dense": frozenset({"layer_norm", "batch_norm", "instance_norm", "group_norm"}),
}


def for_mode(mode: str) -> frozenset[str]:
    """The normalizations to decompose for a (canonical) Hessian mode."""
    return MODE_NORMS.get("reverse-over-reverse" if mode == "auto" else mode, frozenset())


class CompositeNorms(TorchFunctionMode):
    """While active, ``F.layer_norm``, ``F.batch_norm``, ``F.instance_norm``,
    ``F.group_norm`` and ``F.rms_norm`` (and the ``nn`` modules built on them) are computed
    from elementary ops; ``kinds`` restricts that to the named functions.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(4, 3, dtype=torch.float64)
    >>> ln = torch.nn.LayerNorm(3).double()
    >>> with CompositeNorms():
    ...     y = ln(x)
    >>> torch.allclose(y, ln(x))
    True
    """

    def __init__(self, kinds: frozenset[str] | None = None) -> None:
        super().__init__()
        self.replacements = {
            f: impl for f, impl in _REPLACEMENTS.items() if kinds is None or f.__name__ in kinds
        }

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        # The mode is disabled while its handler runs, so the replacements' own ops (and
        # the fused kernels they fall back to) do not come back here.
        impl = self.replacements.get(func, func)
        return impl(*args, **(kwargs or {}))

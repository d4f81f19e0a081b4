"""The reference models in JAX: pure forward functions on a dict of parameters keyed by
torch's ``named_parameters()`` names (torch's ``(out, in)`` weight layout kept), the loss,
and conversions to JAX arrays.

Imported by :class:`hessop.bench.reference.ReferenceSpec` when JAX is used; imports JAX.

Examples
--------
>>> import jax.numpy as jnp
>>> from hessop.bench.reference_jax import apply
>>> params = {"layers.0.weight": jnp.ones((2, 3)), "layers.0.bias": jnp.zeros(2)}
>>> apply("mlp", {"sizes": (3, 2), "activation": "tanh"}, params, jnp.ones((4, 3))).shape
(4, 2)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hessop.bench.reference_layout import as_numpy_dtype, check_seq_len

__all__ = ["apply", "batch", "default_float", "loss", "to_jax"]


def activation(name: str) -> Callable[[Any], Any]:
    """The activation function ``name`` (one of ``reference_layout.ACTIVATIONS``)."""
    return {
        "tanh": jnp.tanh,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    }[name]


def linear(params: Mapping[str, Any], name: str, x: Any) -> Any:
    """``nn.Linear`` with torch's weight layout."""
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def conv(params: Mapping[str, Any], name: str, x: Any) -> Any:
    """``nn.Conv2d(..., 3, padding=1)`` on NCHW images."""
    # lax.conv_general_dilated is a cross-correlation like torch's conv2d: no kernel flip.
    y = lax.conv_general_dilated(
        x,
        params[f"{name}.weight"],
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return y + params[f"{name}.bias"][None, :, None, None]


def layer_norm(params: Mapping[str, Any], name: str, x: Any, eps: float) -> Any:
    """``nn.LayerNorm`` over the last axis."""
    # Biased variance, as torch.nn.functional.layer_norm.
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * params[f"{name}.weight"] + params[f"{name}.bias"]


def mlp(cfg: Mapping[str, Any], params: Mapping[str, Any], x: Any) -> Any:
    """The MLP's logits."""
    act = activation(cfg["activation"])
    n_layers = len(cfg["sizes"]) - 1
    for i in range(n_layers):
        x = linear(params, f"layers.{i}", x)
        if i < n_layers - 1:
            x = act(x)
    return x


def cnn(cfg: Mapping[str, Any], params: Mapping[str, Any], x: Any) -> Any:
    """The residual CNN's logits."""
    act = activation(cfg["activation"])
    h = act(conv(params, "stem", x))
    for i in range(cfg["num_blocks"]):
        r = conv(params, f"blocks.{i}.conv2", act(conv(params, f"blocks.{i}.conv1", h)))
        h = act(h + r)
    return linear(params, "head", h.mean(axis=(2, 3)))


def self_attention(cfg: Mapping[str, Any], params: Mapping[str, Any], name: str, a: Any) -> Any:
    """Multi-head self-attention of ``a`` (batch, length, d_model), written out."""
    batch, length, d = a.shape
    n_heads = cfg["num_heads"]
    d_head = d // n_heads

    def heads(t: Any) -> Any:
        return t.reshape(batch, length, n_heads, d_head).transpose(0, 2, 1, 3)

    q = heads(linear(params, f"{name}.q", a))
    k = heads(linear(params, f"{name}.k", a))
    v = heads(linear(params, f"{name}.v", a))
    w = jax.nn.softmax((q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(d_head)), axis=-1)
    o = (w @ v).transpose(0, 2, 1, 3).reshape(batch, length, d)
    return linear(params, f"{name}.out", o)


def encoder_layer(cfg: Mapping[str, Any], params: Mapping[str, Any], p: str, h: Any) -> Any:
    """One pre-LayerNorm encoder layer (prefix ``p``)."""
    eps, act = cfg["eps"], activation(cfg["activation"])
    h = h + self_attention(cfg, params, f"{p}.attn", layer_norm(params, f"{p}.norm1", h, eps))
    m = layer_norm(params, f"{p}.norm2", h, eps)
    return h + linear(params, f"{p}.mlp.fc2", act(linear(params, f"{p}.mlp.fc1", m)))


def transformer(cfg: Mapping[str, Any], params: Mapping[str, Any], x: Any) -> Any:
    """The transformer's logits from token ids ``x`` (batch, length)."""
    length = x.shape[1]
    check_seq_len(length, cfg["seq_len"])
    h = jnp.take(params["embed.weight"], x, axis=0) + params["pos_embed.weight"][:length]
    for i in range(cfg["num_layers"]):
        h = encoder_layer(cfg, params, f"layers.{i}", h)
    h = layer_norm(params, "norm", h, cfg["eps"])
    return linear(params, "head", h.mean(axis=1))


FORWARD = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def apply(name: str, cfg: Mapping[str, Any], params: Mapping[str, Any], x: Any) -> Any:
    """Logits of the reference model ``name`` with options ``cfg``."""
    return FORWARD[name](cfg, params, x)


def loss(logits: Any, y: Any) -> Any:
    """Cross-entropy of ``logits`` (batch, classes) and integer labels, mean over the batch.

    Examples
    --------
    >>> bool(jnp.isclose(loss(jnp.zeros((2, 4)), jnp.array([0, 3])), jnp.log(4.0)))
    True
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def check_dtype(dt: np.dtype) -> None:
    """Refuse a dtype JAX would silently downcast (float64 without ``jax_enable_x64``)."""
    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise ValueError(
            f"JAX would silently downcast {dt} because 64-bit mode is off; call "
            "jax.config.update('jax_enable_x64', True) at startup, run inside "
            "`with jax.enable_x64(True):`, or ask for float32."
        )


def default_float() -> np.dtype:
    """JAX's default float: float64 with ``jax_enable_x64``, else float32."""
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def _int_dtype() -> np.dtype:
    return np.dtype(jax.dtypes.canonicalize_dtype(np.int64))


def to_jax(values: Mapping[str, np.ndarray], device: Any) -> dict[str, Any]:
    """numpy parameters as a dict of JAX arrays (dtype kept, checked), on ``device``."""
    for v in values.values():
        check_dtype(v.dtype)
    out = {name: jnp.asarray(v) for name, v in values.items()}
    return out if device is None else jax.device_put(out, device)


def batch(
    x: np.ndarray, y: np.ndarray, integer_inputs: bool, dtype: Any, device: Any
) -> tuple[Any, Any]:
    """A numpy batch as JAX arrays: float inputs in ``dtype`` (``None``: JAX's default
    float), token ids and labels in JAX's default integer type."""
    if integer_inputs:
        # Cast explicitly: int64 exists in JAX only with jax_enable_x64.
        x = x.astype(_int_dtype())
    else:
        dt = default_float() if dtype is None else as_numpy_dtype(dtype)
        check_dtype(dt)
        x = x.astype(dt)
    xy = (jnp.asarray(x), jnp.asarray(y.astype(_int_dtype())))
    return xy if device is None else jax.device_put(xy, device)

"""The reference models without a framework: options, parameter layout, initial weights.

Shared by :mod:`hessop.bench.reference` (the spec users build), and the two framework
versions :mod:`hessop.bench.reference_torch` and :mod:`hessop.bench.reference_jax`, which
must agree on every name, shape and number. Needs numpy only.

Examples
--------
>>> from hessop.bench.reference_layout import param_layout, resolve_config
>>> cfg = resolve_config("mlp", {"sizes": (4, 3)})
>>> [(name, shape) for name, shape, _ in param_layout("mlp", cfg)]
[('layers.0.weight', (3, 4)), ('layers.0.bias', (3,))]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

REFERENCE_MODELS: tuple[str, ...] = ("mlp", "cnn", "transformer")

ACTIVATIONS: tuple[str, ...] = ("tanh", "gelu", "gelu_tanh")

DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"sizes": (784, 512, 512, 10), "activation": "tanh"},
    "cnn": {
        "in_channels": 3,
        "image_size": 32,
        "channels": 16,
        "num_blocks": 2,
        "num_classes": 10,
        "activation": "gelu",
    },
    "transformer": {
        "vocab_size": 100,
        "seq_len": 32,
        "d_model": 64,
        "num_heads": 4,
        "num_layers": 2,
        "d_ff": None,  # None means 4 * d_model, resolved in resolve_config
        "num_classes": 10,
        "activation": "gelu",
        "eps": 1e-5,
    },
}

#: (name, shape, init) of one parameter; init is ("uniform", bound), ("normal", std),
#: ("ones",) or ("zeros",)
Entry = tuple[str, tuple[int, ...], tuple]


def resolve_config(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The options of model ``name``: its defaults with ``overrides``, checked.

    Examples
    --------
    >>> resolve_config("transformer", {"d_model": 8, "num_heads": 2})["d_ff"]
    32
    """
    if name not in DEFAULTS:
        raise ValueError(
            f"Unknown reference model {name!r}; valid names are {', '.join(REFERENCE_MODELS)}."
        )
    defaults = DEFAULTS[name]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for reference model {name!r}; "
            f"valid options are {sorted(defaults)}."
        )
    cfg = {**defaults, **overrides}
    if cfg["activation"] not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {cfg['activation']!r}; valid ones are {', '.join(ACTIVATIONS)}."
        )
    if name == "mlp":
        sizes = tuple(int(s) for s in cfg["sizes"])
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must hold at least two positive widths, got {sizes}.")
        cfg["sizes"] = sizes
    elif name == "transformer":
        if cfg["d_ff"] is None:
            cfg["d_ff"] = 4 * cfg["d_model"]
        if cfg["d_model"] % cfg["num_heads"]:
            raise ValueError(
                f"d_model ({cfg['d_model']}) must be divisible by num_heads ({cfg['num_heads']})."
            )
    return cfg


def _linear(name: str, fan_in: int, fan_out: int) -> list[Entry]:
    # Same bound as torch's default nn.Linear / nn.Conv2d init (kaiming_uniform, a=sqrt(5)).
    bound = 1.0 / math.sqrt(fan_in)
    return [
        (f"{name}.weight", (fan_out, fan_in), ("uniform", bound)),
        (f"{name}.bias", (fan_out,), ("uniform", bound)),
    ]


def _conv(name: str, c_in: int, c_out: int, k: int = 3) -> list[Entry]:
    bound = 1.0 / math.sqrt(c_in * k * k)
    return [
        (f"{name}.weight", (c_out, c_in, k, k), ("uniform", bound)),
        (f"{name}.bias", (c_out,), ("uniform", bound)),
    ]


def _layer_norm(name: str, d: int) -> list[Entry]:
    return [(f"{name}.weight", (d,), ("ones",)), (f"{name}.bias", (d,), ("zeros",))]


def _mlp_layout(cfg: Mapping[str, Any]) -> list[Entry]:
    layout: list[Entry] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(cfg["sizes"])):
        layout += _linear(f"layers.{i}", n_in, n_out)
    return layout


def _cnn_layout(cfg: Mapping[str, Any]) -> list[Entry]:
    c = cfg["channels"]
    layout = _conv("stem", cfg["in_channels"], c)
    for i in range(cfg["num_blocks"]):
        layout += _conv(f"blocks.{i}.conv1", c, c)
        layout += _conv(f"blocks.{i}.conv2", c, c)
    return layout + _linear("head", c, cfg["num_classes"])


def _transformer_layout(cfg: Mapping[str, Any]) -> list[Entry]:
    d, d_ff = cfg["d_model"], cfg["d_ff"]
    # Unit-variance tokens as torch's nn.Embedding default; small positions as in BERT/ViT.
    layout: list[Entry] = [
        ("embed.weight", (cfg["vocab_size"], d), ("normal", 1.0)),
        ("pos_embed.weight", (cfg["seq_len"], d), ("normal", 0.02)),
    ]
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}"
        layout += _layer_norm(f"{p}.norm1", d)
        for proj in ("q", "k", "v", "out"):
            layout += _linear(f"{p}.attn.{proj}", d, d)
        layout += _layer_norm(f"{p}.norm2", d)
        layout += _linear(f"{p}.mlp.fc1", d, d_ff)
        layout += _linear(f"{p}.mlp.fc2", d_ff, d)
    return layout + _layer_norm("norm", d) + _linear("head", d, cfg["num_classes"])


_LAYOUTS = {"mlp": _mlp_layout, "cnn": _cnn_layout, "transformer": _transformer_layout}


def param_layout(name: str, cfg: Mapping[str, Any]) -> list[Entry]:
    """(name, shape, init) per parameter, in torch ``named_parameters()`` order.

    Examples
    --------
    >>> cfg = resolve_config("cnn", {"channels": 2, "num_blocks": 0})
    >>> [name for name, _, _ in param_layout("cnn", cfg)]
    ['stem.weight', 'stem.bias', 'head.weight', 'head.bias']
    """
    return _LAYOUTS[name](cfg)


def draw_params(layout: list[Entry], seed: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Initial parameters of ``layout`` from ``seed`` with a local numpy Generator, drawn in
    float64 and then cast to ``dtype``.

    Examples
    --------
    >>> draw_params([("w", (2,), ("ones",))], seed=0, dtype=np.dtype("float32"))
    {'w': array([1., 1.], dtype=float32)}
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape, init in layout:
        kind = init[0]
        if kind == "uniform":
            value = rng.uniform(-init[1], init[1], size=shape)
        elif kind == "normal":
            value = rng.normal(0.0, init[1], size=shape)
        elif kind == "ones":
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        params[name] = value.astype(dtype)
    return params


def as_numpy_dtype(dtype: Any) -> np.dtype:
    """A real floating numpy dtype from a numpy, string, JAX or torch dtype.

    Examples
    --------
    >>> as_numpy_dtype("float32")
    dtype('float32')
    """
    if type(dtype).__module__ == "torch":
        dtype = str(dtype).rsplit(".", 1)[-1]
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ValueError(f"dtype must be a real floating dtype, got {dt}.")
    return dt


def check_seq_len(length: int, seq_len: int) -> None:
    """Refuse token sequences longer than the model's positional table.

    Examples
    --------
    >>> check_seq_len(3, 5)
    """
    if length > seq_len:
        raise ValueError(
            f"Sequence length {length} exceeds the model's seq_len {seq_len}; "
            "build the spec with a larger seq_len."
        )

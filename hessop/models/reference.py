"""Reference models with the same architecture and weights in PyTorch and JAX.

Three small, smooth classifiers are used by the tests, the benchmarks and ``hessop bench``:

* ``"mlp"``: a multilayer perceptron, 784-512-512-10 with tanh by default.
* ``"cnn"``: a residual CNN without BatchNorm (stem convolution, residual blocks,
  global average pooling, linear head) on 3x32x32 images.
* ``"transformer"``: a pre-LayerNorm transformer encoder on token ids, with attention
  written out (q/k/v projections and a softmax), so both frameworks compute the same math.

The torch side is an ``nn.Module``; the JAX side is a pure function on a plain dict whose keys
are torch's ``named_parameters()`` names, in the same order and with the same shapes (torch's
``(out, in)`` weight layout is kept), so flattened parameter vectors line up across
frameworks. Initial weights are drawn with numpy from the seed, hence identical in both
frameworks and independent of any global RNG state.

Neither framework is needed to import this module: torch and JAX are imported inside the
functions that use them. The torch module classes (``TorchMLP``, ``TorchResidualCNN``,
``TorchTransformer``) are built on first attribute access.

Examples
--------
>>> from hessop.models import reference as R
>>> spec = R.get_reference("mlp", sizes=(6, 8, 3))
>>> model = spec.torch_model(seed=0)
>>> x, y = spec.make_batch(4, seed=0, framework="torch")
>>> tuple(model(x).shape)
(4, 3)
>>> params = spec.jax_params_from_torch(model)
>>> list(params) == [name for name, _ in model.named_parameters()]
True
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

# The torch classes (TorchMLP, TorchResidualCNN, TorchTransformer) are left out of __all__
# on purpose: a star import must not import torch.
__all__ = ["DEFAULT_BATCH_SIZES", "REFERENCE_MODELS", "ReferenceSpec", "get_reference"]

REFERENCE_MODELS: tuple[str, ...] = ("mlp", "cnn", "transformer")

ACTIVATIONS: tuple[str, ...] = ("tanh", "gelu", "gelu_tanh")

_DEFAULTS: dict[str, dict[str, Any]] = {
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
        "d_ff": None,  # None means 4 * d_model, resolved in get_reference
        "num_classes": 10,
        "activation": "gelu",
        "eps": 1e-5,
    },
}

# Default batch sizes of the benchmark setting each model was sized for.
DEFAULT_BATCH_SIZES: dict[str, int] = {"mlp": 128, "cnn": 32, "transformer": 32}


# --------------------------------------------------------------------------------------
# Configuration and parameter layout (framework-free)
# --------------------------------------------------------------------------------------


def _resolve_config(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    if name not in _DEFAULTS:
        raise ValueError(
            f"Unknown reference model {name!r}; valid names are {', '.join(REFERENCE_MODELS)}."
        )
    defaults = _DEFAULTS[name]
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


def _linear(name: str, fan_in: int, fan_out: int) -> list[tuple[str, tuple[int, ...], tuple]]:
    # Same bound as torch's default nn.Linear / nn.Conv2d init (kaiming_uniform, a=sqrt(5)).
    bound = 1.0 / math.sqrt(fan_in)
    return [
        (f"{name}.weight", (fan_out, fan_in), ("uniform", bound)),
        (f"{name}.bias", (fan_out,), ("uniform", bound)),
    ]


def _conv(name: str, c_in: int, c_out: int, k: int = 3) -> list[tuple[str, tuple[int, ...], tuple]]:
    bound = 1.0 / math.sqrt(c_in * k * k)
    return [
        (f"{name}.weight", (c_out, c_in, k, k), ("uniform", bound)),
        (f"{name}.bias", (c_out,), ("uniform", bound)),
    ]


def _layer_norm(name: str, d: int) -> list[tuple[str, tuple[int, ...], tuple]]:
    return [(f"{name}.weight", (d,), ("ones",)), (f"{name}.bias", (d,), ("zeros",))]


def _param_layout(name: str, cfg: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], tuple]]:
    """(name, shape, init) per parameter, in torch ``named_parameters()`` order."""
    layout: list[tuple[str, tuple[int, ...], tuple]] = []
    if name == "mlp":
        sizes = cfg["sizes"]
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            layout += _linear(f"layers.{i}", n_in, n_out)
    elif name == "cnn":
        c = cfg["channels"]
        layout += _conv("stem", cfg["in_channels"], c)
        for i in range(cfg["num_blocks"]):
            layout += _conv(f"blocks.{i}.conv1", c, c)
            layout += _conv(f"blocks.{i}.conv2", c, c)
        layout += _linear("head", c, cfg["num_classes"])
    else:
        d, d_ff = cfg["d_model"], cfg["d_ff"]
        # Unit-variance tokens as torch's nn.Embedding default; small positions as in BERT/ViT.
        layout.append(("embed.weight", (cfg["vocab_size"], d), ("normal", 1.0)))
        layout.append(("pos_embed.weight", (cfg["seq_len"], d), ("normal", 0.02)))
        for i in range(cfg["num_layers"]):
            p = f"layers.{i}"
            layout += _layer_norm(f"{p}.norm1", d)
            for proj in ("q", "k", "v", "out"):
                layout += _linear(f"{p}.attn.{proj}", d, d)
            layout += _layer_norm(f"{p}.norm2", d)
            layout += _linear(f"{p}.mlp.fc1", d, d_ff)
            layout += _linear(f"{p}.mlp.fc2", d_ff, d)
        layout += _layer_norm("norm", d)
        layout += _linear("head", d, cfg["num_classes"])
    return layout


def _as_numpy_dtype(dtype: Any) -> np.dtype:
    """Accept numpy, string, JAX and torch dtypes alike."""
    if type(dtype).__module__ == "torch":
        dtype = str(dtype).rsplit(".", 1)[-1]
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ValueError(f"dtype must be a real floating dtype, got {dt}.")
    return dt


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    import torch

    return getattr(torch, dt.name)


def _check_jax_dtype(dt: np.dtype) -> None:
    import jax

    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise ValueError(
            f"JAX would silently downcast {dt} because 64-bit mode is off; call "
            "jax.config.update('jax_enable_x64', True) at startup, run inside "
            "`with jax.enable_x64(True):`, or ask for float32."
        )


def _jax_default_float() -> np.dtype:
    import jax

    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def _jax_int_dtype() -> np.dtype:
    import jax

    return np.dtype(jax.dtypes.canonicalize_dtype(np.int64))


# --------------------------------------------------------------------------------------
# JAX forward functions (pure; parameter dicts keyed by torch names)
# --------------------------------------------------------------------------------------


def _jax_activation(name: str):
    import jax
    import jax.numpy as jnp

    return {
        "tanh": jnp.tanh,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    }[name]


def _jax_linear(params: Mapping[str, Any], name: str, x: Any) -> Any:
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def _jax_conv(params: Mapping[str, Any], name: str, x: Any) -> Any:
    from jax import lax

    # lax.conv_general_dilated is a cross-correlation like torch's conv2d: no kernel flip.
    y = lax.conv_general_dilated(
        x,
        params[f"{name}.weight"],
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return y + params[f"{name}.bias"][None, :, None, None]


def _jax_layer_norm(params: Mapping[str, Any], name: str, x: Any, eps: float) -> Any:
    import jax.numpy as jnp

    # Biased variance, as torch.nn.functional.layer_norm.
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * params[f"{name}.weight"] + params[f"{name}.bias"]


def _jax_mlp(cfg: Mapping[str, Any], params: Mapping[str, Any], x: Any) -> Any:
    act = _jax_activation(cfg["activation"])
    n_layers = len(cfg["sizes"]) - 1
    for i in range(n_layers):
        x = _jax_linear(params, f"layers.{i}", x)
        if i < n_layers - 1:
            x = act(x)
    return x


def _jax_cnn(cfg: Mapping[str, Any], params: Mapping[str, Any], x: Any) -> Any:
    act = _jax_activation(cfg["activation"])
    h = act(_jax_conv(params, "stem", x))
    for i in range(cfg["num_blocks"]):
        r = _jax_conv(params, f"blocks.{i}.conv2", act(_jax_conv(params, f"blocks.{i}.conv1", h)))
        h = act(h + r)
    return _jax_linear(params, "head", h.mean(axis=(2, 3)))


def _jax_transformer(cfg: Mapping[str, Any], params: Mapping[str, Any], x: Any) -> Any:
    import jax
    import jax.numpy as jnp

    act = _jax_activation(cfg["activation"])
    eps = cfg["eps"]
    batch, length = x.shape
    _check_seq_len(length, cfg["seq_len"])
    d, n_heads = cfg["d_model"], cfg["num_heads"]
    d_head = d // n_heads
    scale = 1.0 / math.sqrt(d_head)

    h = jnp.take(params["embed.weight"], x, axis=0) + params["pos_embed.weight"][:length]
    for i in range(cfg["num_layers"]):
        p = f"layers.{i}"
        a = _jax_layer_norm(params, f"{p}.norm1", h, eps)

        def heads(t):
            return t.reshape(batch, length, n_heads, d_head).transpose(0, 2, 1, 3)

        q = heads(_jax_linear(params, f"{p}.attn.q", a))
        k = heads(_jax_linear(params, f"{p}.attn.k", a))
        v = heads(_jax_linear(params, f"{p}.attn.v", a))
        w = jax.nn.softmax((q @ k.swapaxes(-1, -2)) * scale, axis=-1)
        o = (w @ v).transpose(0, 2, 1, 3).reshape(batch, length, d)
        h = h + _jax_linear(params, f"{p}.attn.out", o)
        m = _jax_layer_norm(params, f"{p}.norm2", h, eps)
        h = h + _jax_linear(params, f"{p}.mlp.fc2", act(_jax_linear(params, f"{p}.mlp.fc1", m)))
    h = _jax_layer_norm(params, "norm", h, eps)
    return _jax_linear(params, "head", h.mean(axis=1))


_JAX_FORWARD = {"mlp": _jax_mlp, "cnn": _jax_cnn, "transformer": _jax_transformer}


def _check_seq_len(length: int, seq_len: int) -> None:
    if length > seq_len:
        raise ValueError(
            f"Sequence length {length} exceeds the model's seq_len {seq_len}; "
            "build the spec with a larger seq_len."
        )


# --------------------------------------------------------------------------------------
# Torch modules (built lazily so that importing this module does not import torch)
# --------------------------------------------------------------------------------------

_TORCH_CLASS_NAMES = {
    "mlp": "TorchMLP",
    "cnn": "TorchResidualCNN",
    "transformer": "TorchTransformer",
}
_TORCH_HELPER_NAMES = ("_ResidualBlock", "_SelfAttention", "_MLPBlock", "_EncoderLayer")


@functools.cache
def _torch_classes() -> dict[str, type]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    def activation(name: str):
        return {
            "tanh": torch.tanh,
            "gelu": F.gelu,
            "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
        }[name]

    def _normal(shape: tuple[int, int]) -> torch.Tensor:
        # Default init for direct construction; a no-op (and no import) on the meta device.
        w = torch.empty(shape)
        return w if w.is_meta else w.normal_()

    class TorchMLP(nn.Module):
        """Fully connected network; the activation is applied between linear layers."""

        def __init__(self, sizes: tuple[int, ...] = (784, 512, 512, 10), activation: str = "tanh"):
            super().__init__()
            self.activation = activation
            self.layers = nn.ModuleList(
                nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(sizes)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            act = activation(self.activation)
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = act(x)
            return x

    class _ResidualBlock(nn.Module):
        def __init__(self, channels: int, activation: str):
            super().__init__()
            self.activation = activation
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            act = activation(self.activation)
            return act(x + self.conv2(act(self.conv1(x))))

    class TorchResidualCNN(nn.Module):
        """Stem conv, residual blocks (no BatchNorm), global average pool, linear head."""

        def __init__(
            self,
            in_channels: int = 3,
            image_size: int = 32,
            channels: int = 16,
            num_blocks: int = 2,
            num_classes: int = 10,
            activation: str = "gelu",
        ):
            super().__init__()
            self.activation = activation
            self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
            self.blocks = nn.ModuleList(
                _ResidualBlock(channels, activation) for _ in range(num_blocks)
            )
            self.head = nn.Linear(channels, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = activation(self.activation)(self.stem(x))
            for block in self.blocks:
                h = block(h)
            return self.head(h.mean(dim=(2, 3)))

    class _SelfAttention(nn.Module):
        # Written out instead of nn.MultiheadAttention: fused SDPA kernels lack forward-mode
        # and double-backward derivatives, and JAX must be able to mirror the exact math.
        def __init__(self, d_model: int, num_heads: int):
            super().__init__()
            self.num_heads = num_heads
            self.q = nn.Linear(d_model, d_model)
            self.k = nn.Linear(d_model, d_model)
            self.v = nn.Linear(d_model, d_model)
            self.out = nn.Linear(d_model, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            batch, length, d = x.shape
            d_head = d // self.num_heads

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(batch, length, self.num_heads, d_head).transpose(1, 2)

            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            w = torch.softmax((q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d_head)), dim=-1)
            return self.out((w @ v).transpose(1, 2).reshape(batch, length, d))

    class _MLPBlock(nn.Module):
        def __init__(self, d_model: int, d_ff: int, activation: str):
            super().__init__()
            self.activation = activation
            self.fc1 = nn.Linear(d_model, d_ff)
            self.fc2 = nn.Linear(d_ff, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(activation(self.activation)(self.fc1(x)))

    class _EncoderLayer(nn.Module):
        def __init__(self, d_model: int, num_heads: int, d_ff: int, activation: str, eps: float):
            super().__init__()
            self.norm1 = nn.LayerNorm(d_model, eps=eps)
            self.attn = _SelfAttention(d_model, num_heads)
            self.norm2 = nn.LayerNorm(d_model, eps=eps)
            self.mlp = _MLPBlock(d_model, d_ff, activation)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class TorchTransformer(nn.Module):
        """Pre-LN transformer encoder classifier on token ids of shape (batch, length)."""

        def __init__(
            self,
            vocab_size: int = 100,
            seq_len: int = 32,
            d_model: int = 64,
            num_heads: int = 4,
            num_layers: int = 2,
            d_ff: int | None = None,
            num_classes: int = 10,
            activation: str = "gelu",
            eps: float = 1e-5,
        ):
            super().__init__()
            self.seq_len = seq_len
            # Passing _weight skips nn.Embedding's normal_ init: on the meta device that goes
            # through torch._refs and imports torch._dynamo (seconds), and the weights are
            # overwritten anyway (torch_model) or drawn below.
            self.embed = nn.Embedding(vocab_size, d_model, _weight=_normal((vocab_size, d_model)))
            # An Embedding rather than a bare Parameter keeps named_parameters() in
            # registration order (a module's own parameters are listed before its children).
            self.pos_embed = nn.Embedding(seq_len, d_model, _weight=_normal((seq_len, d_model)))
            self.layers = nn.ModuleList(
                _EncoderLayer(d_model, num_heads, d_ff or 4 * d_model, activation, eps)
                for _ in range(num_layers)
            )
            self.norm = nn.LayerNorm(d_model, eps=eps)
            self.head = nn.Linear(d_model, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            length = x.shape[1]
            _check_seq_len(length, self.seq_len)
            h = self.embed(x) + self.pos_embed.weight[:length]
            for layer in self.layers:
                h = layer(h)
            return self.head(self.norm(h).mean(dim=1))

    classes: dict[str, type] = {
        "TorchMLP": TorchMLP,
        "TorchResidualCNN": TorchResidualCNN,
        "TorchTransformer": TorchTransformer,
    }
    # Module-level names make the classes picklable (torch.save of a whole model).
    for cls_name, cls in classes.items():
        cls.__module__ = __name__
        cls.__qualname__ = cls_name
    for cls in (_ResidualBlock, _SelfAttention, _MLPBlock, _EncoderLayer):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        classes[cls.__name__] = cls
    return classes


def __getattr__(name: str) -> Any:
    if name in _TORCH_CLASS_NAMES.values() or name in _TORCH_HELPER_NAMES:
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------
# Public spec
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSpec:
    """A reference architecture with its configuration, in both frameworks.

    Build one with :func:`get_reference`. ``config`` holds the resolved options; treat it as
    read-only.

    Examples
    --------
    >>> from hessop.models.reference import get_reference
    >>> spec = get_reference("cnn", image_size=8, channels=4)
    >>> spec.input_shape, spec.num_classes, spec.num_params
    ((3, 8, 8), 10, 754)
    """

    name: str
    config: dict[str, Any]

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.config.items()))))

    # ----------------------------------------------------------------- description
    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        if self.name == "mlp":
            return self.config["sizes"][-1]
        return self.config["num_classes"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (without the batch dimension)."""
        c = self.config
        if self.name == "mlp":
            return (c["sizes"][0],)
        if self.name == "cnn":
            return (c["in_channels"], c["image_size"], c["image_size"])
        return (c["seq_len"],)

    @property
    def integer_inputs(self) -> bool:
        """True when the inputs are token ids (transformer), False for real-valued inputs."""
        return self.name == "transformer"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in torch ``named_parameters()`` order.

        Examples
        --------
        >>> from hessop.models.reference import get_reference
        >>> get_reference("mlp", sizes=(4, 3)).param_shapes()
        {'layers.0.weight': (3, 4), 'layers.0.bias': (3,)}
        """
        return {name: shape for name, shape, _ in _param_layout(self.name, self.config)}

    @property
    def num_params(self) -> int:
        """Total number of scalar parameters."""
        return sum(math.prod(s) for s in self.param_shapes().values())

    # ----------------------------------------------------------------- parameters
    def numpy_params(self, seed: int = 0, dtype: Any = np.float64) -> dict[str, np.ndarray]:
        """Initial parameters drawn from ``seed`` with a local numpy Generator.

        The same seed gives the same weights as :meth:`torch_model` and :meth:`jax_params`
        (values are drawn in float64, then cast to ``dtype``).

        Examples
        --------
        >>> from hessop.models.reference import get_reference
        >>> p = get_reference("mlp", sizes=(4, 3)).numpy_params(seed=1)
        >>> p["layers.0.weight"].shape, p["layers.0.weight"].dtype
        ((3, 4), dtype('float64'))
        """
        dt = _as_numpy_dtype(dtype)
        rng = np.random.default_rng(seed)
        params: dict[str, np.ndarray] = {}
        for name, shape, init in _param_layout(self.name, self.config):
            kind = init[0]
            if kind == "uniform":
                value = rng.uniform(-init[1], init[1], size=shape)
            elif kind == "normal":
                value = rng.normal(0.0, init[1], size=shape)
            elif kind == "ones":
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            params[name] = value.astype(dt)
        return params

    def torch_model(
        self,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> torch.nn.Module:
        """The torch ``nn.Module``, with weights from ``seed`` (or from ``params``).

        Parameters
        ----------
        seed
            Seed of the initial weights; global RNG states are left untouched.
        dtype
            Parameter dtype; ``None`` means ``torch.get_default_dtype()``.
        device
            Device of the parameters; ``None`` means CPU.
        params
            Optional mapping from parameter names to arrays (numpy, JAX or torch), e.g. the
            output of :meth:`jax_params`, loaded instead of the seeded weights.

        Examples
        --------
        >>> import torch
        >>> from hessop.models.reference import get_reference
        >>> spec = get_reference("transformer", d_model=8, num_heads=2, seq_len=5)
        >>> model = spec.torch_model(seed=0, dtype=torch.float64)
        >>> x, _ = spec.make_batch(3, framework="torch")
        >>> tuple(model(x).shape), model.head.weight.dtype
        ((3, 10), torch.float64)
        """
        import torch

        dtype = torch.get_default_dtype() if dtype is None else dtype
        device = torch.device("cpu") if device is None else torch.device(device)
        cls = _torch_classes()[_TORCH_CLASS_NAMES[self.name]]
        # Building on the meta device skips torch's default init, which would consume the
        # global torch RNG; the weights are then filled from the numpy draw below.
        with torch.device("meta"):
            model = cls(**self.config)
        model = model.to(dtype=dtype).to_empty(device=device)
        values = self.numpy_params(seed) if params is None else params
        self._check_names(values, "params")
        with torch.no_grad():
            for name, p in model.named_parameters():
                v = values[name]
                # np.array copies: JAX arrays view as read-only numpy arrays.
                v = v.detach() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"params[{name!r}] has shape {tuple(v.shape)}, expected {tuple(p.shape)}."
                    )
                p.copy_(v)
        return model

    def jax_params(self, seed: int = 0, dtype: Any = None, device: Any = None) -> dict[str, Any]:
        """Initial parameters as a dict of JAX arrays, without needing torch.

        Equal to ``jax_params_from_torch(torch_model(seed, ...))`` for the same seed and dtype.
        ``dtype=None`` means JAX's default float (float64 only with ``jax_enable_x64``).

        Examples
        --------
        >>> from hessop.models.reference import get_reference
        >>> spec = get_reference("mlp", sizes=(4, 3))
        >>> params = spec.jax_params(seed=0, dtype="float32")
        >>> params["layers.0.weight"].shape
        (3, 4)
        """
        dt = _jax_default_float() if dtype is None else _as_numpy_dtype(dtype)
        return self._to_jax(self.numpy_params(seed, dt), device)

    def jax_params_from_torch(self, model: torch.nn.Module, device: Any = None) -> dict[str, Any]:
        """Copy the weights of ``model`` into a dict of JAX arrays keyed by torch names.

        The dtype is kept; float64 needs ``jax_enable_x64`` (a clear error otherwise, never a
        silent downcast).

        Examples
        --------
        >>> from hessop.models.reference import get_reference
        >>> spec = get_reference("mlp", sizes=(4, 3))
        >>> params = spec.jax_params_from_torch(spec.torch_model(seed=0))
        >>> list(params)
        ['layers.0.weight', 'layers.0.bias']
        """
        values = {name: p.detach().cpu().numpy() for name, p in model.named_parameters()}
        self._check_names(values, "model.named_parameters()")
        shapes = self.param_shapes()
        for name, v in values.items():
            if v.shape != shapes[name]:
                raise ValueError(
                    f"{name!r} has shape {v.shape} but the {self.name!r} spec expects "
                    f"{shapes[name]}; build the model with this spec."
                )
        return self._to_jax(values, device)

    def _to_jax(self, values: Mapping[str, np.ndarray], device: Any) -> dict[str, Any]:
        import jax
        import jax.numpy as jnp

        for v in values.values():
            _check_jax_dtype(v.dtype)
        out = {name: jnp.asarray(v) for name, v in values.items()}
        return out if device is None else jax.device_put(out, device)

    def _check_names(self, values: Mapping[str, Any], what: str) -> None:
        expected = list(self.param_shapes())
        got = list(values)
        if sorted(got) != sorted(expected):
            missing = [n for n in expected if n not in values]
            extra = [n for n in got if n not in expected]
            raise ValueError(
                f"{what} does not match the {self.name!r} reference model: "
                f"missing {missing}, unexpected {extra}."
            )

    # ----------------------------------------------------------------- forward and loss
    def jax_apply(self, params: Mapping[str, Any], x: Any) -> Any:
        """Logits of the JAX model: the same math as ``torch_model()(x)``.

        Pure and jit-friendly (the configuration is static). Float32 matmuls follow JAX's
        default precision, which may use TF32 on GPUs; wrap calls in
        ``jax.default_matmul_precision("highest")`` for full float32 parity with torch.

        Examples
        --------
        >>> from hessop.models.reference import get_reference
        >>> spec = get_reference("mlp", sizes=(6, 8, 3))
        >>> params = spec.jax_params(seed=0, dtype="float32")
        >>> x, _ = spec.make_batch(2, framework="jax", dtype="float32")
        >>> spec.jax_apply(params, x).shape
        (2, 3)
        """
        return _JAX_FORWARD[self.name](self.config, params, x)

    @staticmethod
    def torch_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits`` (batch, classes) and integer labels, mean over the batch.

        Examples
        --------
        >>> import torch
        >>> from hessop.models.reference import ReferenceSpec
        >>> loss = ReferenceSpec.torch_loss(torch.zeros(2, 4), torch.tensor([0, 3]))
        >>> round(loss.item(), 6) == round(__import__("math").log(4), 6)
        True
        """
        import torch.nn.functional as F

        return F.cross_entropy(logits, y)

    @staticmethod
    def jax_loss(logits: Any, y: Any) -> Any:
        """Cross-entropy of ``logits`` (batch, classes) and integer labels, mean over the batch.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from hessop.models.reference import ReferenceSpec
        >>> loss = ReferenceSpec.jax_loss(jnp.zeros((2, 4)), jnp.array([0, 3]))
        >>> bool(jnp.isclose(loss, jnp.log(4.0)))
        True
        """
        import jax
        import jax.numpy as jnp

        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    def jax_objective(self, params: Mapping[str, Any], x: Any, y: Any) -> Any:
        """The scalar training loss as a function of ``params``: ``f(params, x, y)``.

        Examples
        --------
        >>> import jax
        >>> from hessop.models.reference import get_reference
        >>> spec = get_reference("mlp", sizes=(4, 3))
        >>> params = spec.jax_params(seed=0, dtype="float32")
        >>> x, y = spec.make_batch(5, framework="jax", dtype="float32")
        >>> grads = jax.grad(spec.jax_objective)(params, x, y)
        >>> grads["layers.0.bias"].shape
        (3,)
        """
        return self.jax_loss(self.jax_apply(params, x), y)

    # ----------------------------------------------------------------- data
    def make_batch(
        self,
        batch_size: int | None = None,
        seed: int = 0,
        framework: str = "numpy",
        dtype: Any = None,
        device: Any = None,
    ) -> tuple[Any, Any]:
        """A synthetic batch ``(x, y)``: standard-normal inputs (token ids for the
        transformer) and uniform integer class labels, from a local numpy Generator.

        Parameters
        ----------
        batch_size
            Number of examples; ``None`` means the benchmark default of this model.
        seed
            Seed of the batch; the same seed gives the same numbers in every framework.
        framework
            ``"numpy"``, ``"torch"`` or ``"jax"``.
        dtype
            Float dtype of ``x`` (ignored for token ids). ``None`` means float64 for numpy,
            ``torch.get_default_dtype()`` for torch, JAX's default float for JAX.
        device
            Device of the arrays (torch device or JAX device); ``None`` means the default.

        Examples
        --------
        >>> from hessop.models.reference import get_reference
        >>> spec = get_reference("transformer", vocab_size=7, seq_len=5, d_model=8)
        >>> x, y = spec.make_batch(3, seed=0)
        >>> x.shape, x.dtype, y.shape, int(x.max()) < 7
        ((3, 5), dtype('int64'), (3,), True)
        """
        if framework not in ("numpy", "torch", "jax"):
            raise ValueError(
                f"Unknown framework {framework!r}; valid ones are 'numpy', 'torch', 'jax'."
            )
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZES[self.name]
        rng = np.random.default_rng(seed)
        shape = (batch_size, *self.input_shape)
        if self.integer_inputs:
            x = rng.integers(0, self.config["vocab_size"], size=shape, dtype=np.int64)
        else:
            x = rng.standard_normal(shape)
        y = rng.integers(0, self.num_classes, size=(batch_size,), dtype=np.int64)

        if framework == "numpy":
            if not self.integer_inputs:
                x = x.astype(np.float64 if dtype is None else _as_numpy_dtype(dtype))
            return x, y
        if framework == "torch":
            import torch

            if not self.integer_inputs:
                dt = torch.get_default_dtype() if dtype is None else _as_numpy_dtype(dtype)
                x = x.astype(_as_numpy_dtype(dt))
            return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

        import jax
        import jax.numpy as jnp

        if self.integer_inputs:
            # Cast explicitly: int64 exists in JAX only with jax_enable_x64.
            x = x.astype(_jax_int_dtype())
        else:
            dt = _jax_default_float() if dtype is None else _as_numpy_dtype(dtype)
            _check_jax_dtype(dt)
            x = x.astype(dt)
        xy = (jnp.asarray(x), jnp.asarray(y.astype(_jax_int_dtype())))
        return xy if device is None else jax.device_put(xy, device)


def get_reference(name: str, **overrides: Any) -> ReferenceSpec:
    """The reference model ``name`` (one of :data:`REFERENCE_MODELS`) with options overridden.

    Options and defaults:

    * ``"mlp"``: ``sizes=(784, 512, 512, 10)``, ``activation="tanh"``.
    * ``"cnn"``: ``in_channels=3``, ``image_size=32``, ``channels=16``, ``num_blocks=2``,
      ``num_classes=10``, ``activation="gelu"``.
    * ``"transformer"``: ``vocab_size=100``, ``seq_len=32``, ``d_model=64``,
      ``num_heads=4``, ``num_layers=2``, ``d_ff=4 * d_model``, ``num_classes=10``,
      ``activation="gelu"``, ``eps=1e-5``.

    ``activation`` is one of ``"tanh"``, ``"gelu"`` (erf form) and ``"gelu_tanh"``.

    Raises
    ------
    ValueError
        For an unknown model name or activation, or inconsistent sizes.
    TypeError
        For an option the model does not have.

    Examples
    --------
    >>> from hessop.models.reference import get_reference
    >>> spec = get_reference("mlp", sizes=(10, 20, 3))
    >>> spec.name, spec.config["sizes"], spec.num_params
    ('mlp', (10, 20, 3), 283)
    """
    return ReferenceSpec(name, _resolve_config(name, overrides))

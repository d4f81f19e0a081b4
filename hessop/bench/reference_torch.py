"""The reference models in PyTorch: ``nn.Module`` classes whose ``named_parameters()`` follow
:func:`hessop.bench.reference_layout.param_layout`, and the loss and batch conversion.

Imported by :meth:`hessop.bench.reference.ReferenceSpec.torch_model` when torch is used;
imports torch.

Examples
--------
>>> import torch
>>> from hessop.bench.reference_torch import TorchMLP
>>> TorchMLP(sizes=(3, 4, 2))(torch.zeros(5, 3)).shape
torch.Size([5, 2])
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hessop.bench.reference_layout import as_numpy_dtype, check_seq_len

__all__ = ["CLASSES", "TorchMLP", "TorchResidualCNN", "TorchTransformer", "build", "loss"]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function ``name`` (one of ``reference_layout.ACTIVATIONS``)."""
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


class ResidualBlock(nn.Module):
    """``act(x + conv2(act(conv1(x))))`` with 3x3 convolutions that keep the size."""

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
        self.blocks = nn.ModuleList(ResidualBlock(channels, activation) for _ in range(num_blocks))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = activation(self.activation)(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: fused SDPA kernels lack forward-mode and
    double-backward derivatives, and JAX must be able to mirror the exact math."""

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


class MLPBlock(nn.Module):
    """The transformer's position-wise feed-forward block."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activation(self.activation)(self.fc1(x)))


class EncoderLayer(nn.Module):
    """A pre-LayerNorm encoder layer: attention and feed-forward, each residual."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, activation: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = SelfAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLPBlock(d_model, d_ff, activation)

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
        # overwritten anyway (build) or drawn below.
        self.embed = nn.Embedding(vocab_size, d_model, _weight=_normal((vocab_size, d_model)))
        # An Embedding rather than a bare Parameter keeps named_parameters() in
        # registration order (a module's own parameters are listed before its children).
        self.pos_embed = nn.Embedding(seq_len, d_model, _weight=_normal((seq_len, d_model)))
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, num_heads, d_ff or 4 * d_model, activation, eps)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        check_seq_len(length, self.seq_len)
        h = self.embed(x) + self.pos_embed.weight[:length]
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(dim=1))


#: the torch class of each reference model
CLASSES: dict[str, type[nn.Module]] = {
    "mlp": TorchMLP,
    "cnn": TorchResidualCNN,
    "transformer": TorchTransformer,
}


def build(
    name: str, config: Mapping[str, Any], values: Mapping[str, Any], dtype: Any, device: Any
) -> nn.Module:
    """The model ``name`` with options ``config`` and weights ``values`` (numpy, JAX or torch
    arrays keyed by parameter name); ``dtype=None`` means torch's default dtype, ``device=None``
    the CPU.

    Examples
    --------
    >>> import numpy as np
    >>> values = {"layers.0.weight": np.ones((2, 3)), "layers.0.bias": np.zeros(2)}
    >>> build("mlp", {"sizes": (3, 2), "activation": "tanh"}, values, None, None).layers[0].bias
    Parameter containing:
    tensor([0., 0.], requires_grad=True)
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device("cpu") if device is None else torch.device(device)
    # Building on the meta device skips torch's default init, which would consume the
    # global torch RNG; the weights are then filled from ``values``.
    with torch.device("meta"):
        model = CLASSES[name](**config)
    model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for key, p in model.named_parameters():
            v = values[key]
            # np.array copies: JAX arrays view as read-only numpy arrays.
            v = v.detach() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(
                    f"params[{key!r}] has shape {tuple(v.shape)}, expected {tuple(p.shape)}."
                )
            p.copy_(v)
    return model


def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` (batch, classes) and integer labels, mean over the batch.

    Examples
    --------
    >>> round(loss(torch.zeros(2, 4), torch.tensor([0, 3])).item(), 6) == round(math.log(4), 6)
    True
    """
    return F.cross_entropy(logits, y)


def batch(
    x: np.ndarray, y: np.ndarray, integer_inputs: bool, dtype: Any, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """A numpy batch as torch tensors: float inputs in ``dtype`` (``None``: torch's default
    dtype), token ids and labels as int64.

    Examples
    --------
    >>> x, y = batch(np.zeros((2, 3)), np.zeros(2, dtype=np.int64), False, None, None)
    >>> x.dtype, y.dtype
    (torch.float32, torch.int64)
    """
    if not integer_inputs:
        dt = torch.get_default_dtype() if dtype is None else as_numpy_dtype(dtype)
        x = x.astype(as_numpy_dtype(dt))
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

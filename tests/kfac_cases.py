"""Small models written once per framework with the same weights, for the KFAC tests
(not a test module). Each case returns ``(model, loss_fn, data, kwargs)`` for
:func:`hessop.model_kfac` / :func:`hessop.model_ggn` in the framework asked for."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def linear_weights(sizes: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """``{"<i>.weight": (out, in), "<i>.bias": (out,)}`` per layer, torch's Sequential names."""
    rng, out = _rng(seed), {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        out[f"{2 * i}.weight"] = rng.standard_normal((b, a)) / np.sqrt(a)
        out[f"{2 * i}.bias"] = 0.3 * rng.standard_normal(b)
    return out


def torch_linear_net(sizes: tuple[int, ...], weights: dict[str, np.ndarray], act: bool) -> Any:
    import torch
    from torch import nn

    layers: list[Any] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.Tanh() if act else nn.Identity())
        layers.append(nn.Linear(a, b))
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(weights[n]))
    return model


@functools.cache  # the same function object: compilations are shared between tests
def jax_linear_net(sizes: tuple[int, ...], act: bool) -> Any:
    import jax.numpy as jnp

    def apply(params: dict[str, Any], x: Any) -> Any:
        for i in range(len(sizes) - 1):
            if i:
                x = jnp.tanh(x) if act else x
            x = x @ params[f"{2 * i}.weight"].T + params[f"{2 * i}.bias"]
        return x

    return apply


def jax_mse(out: Any, y: Any) -> Any:
    import jax.numpy as jnp

    return jnp.mean((out - y) ** 2)


def jax_cross_entropy(out: Any, y: Any) -> Any:
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(out, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def mse_mean(backend: str) -> Any:
    if backend == "torch":
        import torch

        return torch.nn.MSELoss()
    return jax_mse


def cross_entropy(backend: str) -> Any:
    if backend == "torch":
        import torch

        return torch.nn.CrossEntropyLoss()
    return jax_cross_entropy


def as_native(backend: str, tree: Any) -> Any:
    from conftest import to_native

    return to_native(backend, tree)


def linear_case(backend: str, sizes=(3, 4, 2), act=True, n=6, loss="mse", seed=0) -> tuple:
    """A dense network on vectors; data in two uneven batches."""
    w = linear_weights(sizes, seed)
    rng = _rng(seed + 1)
    x = rng.standard_normal((n, sizes[0]))
    if loss == "mse":
        y = rng.standard_normal((n, sizes[-1]))
    else:
        y = rng.integers(0, sizes[-1], size=n)
    cut = max(1, n // 3)
    data = [(x[:cut], y[:cut]), (x[cut:], y[cut:])] if n > 1 else [(x, y)]
    loss_fn = mse_mean(backend) if loss == "mse" else cross_entropy(backend)
    if backend == "torch":
        data = [tuple(as_native("torch", list(b))) for b in data]
        return torch_linear_net(sizes, w, act), loss_fn, data, {}
    data = [tuple(as_native("jax", list(b))) for b in data]
    return jax_linear_net(sizes, act), loss_fn, data, {"params": as_native("jax", w)}


def sequence_case(backend: str, pool: bool, n=5, S=3, sizes=(3, 4, 2), seed=3, act=False) -> tuple:
    """A deep linear network applied at every position of ``(n, S, d)`` inputs: with a
    squared error at every position (``pool=False``), or after the mean over the positions
    between its two layers (``pool=True``); ``act`` puts a tanh after each layer."""
    assert len(sizes) == 3
    w = linear_weights(sizes, seed)
    rng = _rng(seed + 1)
    x = rng.standard_normal((n, S, sizes[0]))
    y = rng.standard_normal((n, sizes[-1]) if pool else (n, S, sizes[-1]))
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    if backend == "torch":
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.first, self.second = nn.Linear(*sizes[:2]), nn.Linear(*sizes[1:])

            def forward(self, x: Any) -> Any:
                h = self.first(x)
                h = torch.tanh(h) if act else h
                out = self.second(h.mean(1) if pool else h)
                return torch.tanh(out) if act else out

        model = Net().double()
        with torch.no_grad():
            for p, key in zip(model.parameters(), w):
                p.copy_(torch.from_numpy(w[key]))
        data = [tuple(as_native("torch", list(b))) for b in data]
        return model, mse_mean("torch"), data, {}

    data = [tuple(as_native("jax", list(b))) for b in data]
    return jax_sequence_net(pool, act), jax_mse, data, {"params": as_native("jax", w)}


@functools.cache
def jax_sequence_net(pool: bool, act: bool) -> Any:
    import jax.numpy as jnp

    def apply(p: dict[str, Any], x: Any) -> Any:
        h = x @ p["0.weight"].T + p["0.bias"]
        h = jnp.tanh(h) if act else h
        out = (h.mean(1) if pool else h) @ p["2.weight"].T + p["2.bias"]
        return jnp.tanh(out) if act else out

    return apply


def conv_case(backend: str, n=4, seed=5) -> tuple:
    """One 2-D convolution (stride 2, padding 1, 2 -> 3 channels, 3x3) with a squared error on
    its output: KFAC-expand is exact there."""
    rng = _rng(seed)
    w = {"weight": 0.4 * rng.standard_normal((3, 2, 3, 3)), "bias": 0.3 * rng.standard_normal(3)}
    x = rng.standard_normal((n, 2, 5, 5))
    y = rng.standard_normal((n, 3, 3, 3))
    data = [(x[:1], y[:1]), (x[1:], y[1:])]
    if backend == "torch":
        import torch

        model = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(w["weight"]))
            model.bias.copy_(torch.from_numpy(w["bias"]))
        return model, mse_mean("torch"), [tuple(as_native("torch", list(b))) for b in data], {}
    data = [tuple(as_native("jax", list(b))) for b in data]
    return jax_conv, jax_mse, data, {"params": as_native("jax", w)}


def jax_conv(p: dict[str, Any], x: Any) -> Any:
    from jax import lax

    out = lax.conv_general_dilated(
        x, p["weight"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    return out + p["bias"][None, :, None, None]

"""Independent references for the model-level operator tests (not a test module).

Everything here is computed without hessop: flat parameter vectors in
``named_parameters()`` order, dense Hessians by plain autograd double backward (the one AD
path whose rules for normalization layers are right in torch 2.13), Jacobians by a loop of
backward passes, per-sample gradients by a Python loop.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import numpy as np

# Tiny reference models: a few dozen to a few hundred parameters.
SMALL = {
    "mlp": {"sizes": (4, 5, 3)},
    "cnn": {"in_channels": 1, "image_size": 4, "channels": 2, "num_blocks": 1, "num_classes": 3},
    "transformer": {
        "vocab_size": 5,
        "seq_len": 3,
        "d_model": 4,
        "num_heads": 2,
        "num_layers": 1,
        "d_ff": 6,
        "num_classes": 3,
    },
}


def small_spec(name: str, **extra: Any) -> Any:
    from hessop.bench import reference as R

    return R.get_reference(name, **{**SMALL[name], **extra})


@contextlib.contextmanager
def math_attention():
    """The math SDPA kernel and no MHA fast path (both have full derivatives)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def flat_params(model: Any, names: list[str] | None = None) -> tuple[list[str], Any]:
    import torch

    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    return names, torch.cat([named[n].detach().reshape(-1) for n in names])


def unflatten(model: Any, names: list[str], w: Any) -> dict[str, Any]:
    named = dict(model.named_parameters())
    out, start = {}, 0
    for n in names:
        k = named[n].numel()
        out[n] = w[start : start + k].reshape(named[n].shape)
        start += k
    return out


def functional_output(model: Any, names: list[str], w: Any, x: Any, seed: int | None = None):
    """``model(x)`` with the parameters ``names`` replaced by the flat ``w``; buffers cloned."""
    import torch

    tensors = {n: p.detach() for n, p in model.named_parameters()}
    tensors.update({n: b.clone() for n, b in model.named_buffers()})
    tensors.update(unflatten(model, names, w))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return torch.func.functional_call(model, tensors, (x,))


def torch_loss_fn(model, loss_fn, x, y, names=None, seed=None):
    names, w0 = flat_params(model, names)

    def f(w):
        return loss_fn(functional_output(model, names, w, x, seed), y)

    return f, w0


def torch_hessian(model, loss_fn, x, y, names=None, seed=None) -> Any:
    """Dense Hessian by autograd double backward, one backward pass per column."""
    import torch

    f, w0 = torch_loss_fn(model, loss_fn, x, y, names, seed)
    with math_attention():
        return torch.autograd.functional.hessian(f, w0)


def probes(d: int, k: int = 3, seed: int = 0) -> Any:
    """A fixed ``(d, k)`` float64 probe matrix: random directions check the whole matrix."""
    import torch

    return torch.from_numpy(np.random.default_rng(seed).standard_normal((d, k)))


def torch_hvps(model, loss_fn, x, y, V, names=None, seed=None) -> Any:
    """``H V`` column by column, by plain autograd double backward."""
    import torch

    f, w0 = torch_loss_fn(model, loss_fn, x, y, names, seed)
    with math_attention():
        w = w0.clone().requires_grad_(True)
        g = torch.autograd.grad(f(w), w, create_graph=True)[0]
        cols = [torch.autograd.grad(g, w, V[:, j], retain_graph=True)[0] for j in range(V.shape[1])]
    return torch.stack(cols, dim=1)


def torch_ggn(model, loss_fn, x, y, names=None) -> Any:
    """``J^T H_loss J`` with ``J`` from a loop of backward passes and ``H_loss`` dense."""
    import torch

    names, w0 = flat_params(model, names)
    with math_attention():
        out = functional_output(model, names, w0, x).detach()
        J = torch.autograd.functional.jacobian(
            lambda w: functional_output(model, names, w, x), w0
        ).reshape(out.numel(), -1)
        HL = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out)
    HL = HL.reshape(out.numel(), out.numel())
    return J.T @ HL @ J


def torch_per_sample_grads(model, loss_fn, x, y, names=None) -> Any:
    """``(n, d)`` per-sample gradients by a loop over the samples."""
    import torch

    names, w0 = flat_params(model, names)
    rows = []
    for i in range(len(y)):
        w = w0.clone().requires_grad_(True)
        xi = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]
        loss = loss_fn(functional_output(model, names, w, xi), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, w)[0])
    return torch.stack(rows)


def jax_flat(params: dict[str, Any]) -> tuple[Any, Any]:
    """Flatten a dict of JAX arrays in insertion order; return (w, unflatten)."""
    import jax.numpy as jnp

    shapes = {k: v.shape for k, v in params.items()}
    w = jnp.concatenate([v.reshape(-1) for v in params.values()])

    def unflat(w):
        out, start = {}, 0
        for k, s in shapes.items():
            n = math.prod(s)
            out[k] = w[start : start + n].reshape(s)
            start += n
        return out

    return w, unflat


def jax_hessian(apply, loss_fn, params, x, y) -> Any:
    import jax

    w, unflat = jax_flat(params)
    # jitted: an eager jax.hessian dispatches op by op and took 10 s on a 73-parameter MLP
    return jax.jit(jax.hessian(lambda w, x, y: loss_fn(apply(unflat(w), x), y)))(w, x, y)


def rng_states() -> tuple[Any, ...]:
    """The global RNG states hessop must not touch: torch CPU, numpy, Python."""
    import torch

    return torch.get_rng_state().clone(), np.random.get_state(), random.getstate()


def same_rng_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    import torch

    np_a, np_b = a[1], b[1]
    return (
        torch.equal(a[0], b[0])
        and np_a[0] == np_b[0]
        and np.array_equal(np_a[1], np_b[1])
        and np_a[2:] == np_b[2:]
        and a[2] == b[2]
    )


def model_state(model: Any) -> dict[str, Any]:
    """Everything about a module that a call could change: tensors, grads, flags."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "versions": {n: p._version for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    import torch

    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for n in before[key]:
            assert torch.equal(before[key][n], after[key][n]), f"{key} {n} changed"
            assert before[key][n].dtype == after[key][n].dtype
    for n, g in before["grads"].items():
        h = after["grads"][n]
        assert (g is None) == (h is None), f".grad of {n} changed"
        assert g is None or torch.equal(g, h), f".grad of {n} changed"
    assert before["versions"] == after["versions"], "a parameter was modified in place"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]

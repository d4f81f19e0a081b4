"""Rebuilding a model operator (a new batch, a new step): what a build reuses from earlier
builds of the same model never hides a change of the model between them (issue #15)."""

from __future__ import annotations

import pytest

import hessop
from hessop._state import StateWatch

torch = pytest.importorskip("torch")
nn = torch.nn

#: one loss object for every build: the loss is part of what identifies a model's function
LOSS = nn.CrossEntropyLoss()


def _data(n: int = 6, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense Hessian of the trainable parameters by torch.func, in named order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    point = {n: p.detach() for n, p in model.named_parameters()}

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, start = dict(point), 0
        for n in names:
            k = point[n].numel()
            params[n] = flat[start : start + k].reshape(point[n].shape)
            start += k
        out = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(out, y)

    flat = torch.cat([point[n].reshape(-1) for n in names])
    return torch.func.hessian(f)(flat)


def _built_twice(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Two operators with products: the loss's first-evaluation checks are then recorded
    as passed for this model in this state."""
    for _ in range(2):
        H = hessop.model_hessian(model, LOSS, (x, y))
        H @ torch.ones(H.shape[0], dtype=torch.float64)
        H @ torch.ones(H.shape[0], dtype=torch.float64)


@pytest.mark.parametrize(
    "change", ["new parameter", "submodule replaced", "requires_grad", "parameter replaced"]
)
def test_a_structural_change_between_builds_is_seen(change: str) -> None:
    x, y = _data()
    model = _model()
    _built_twice(model, x, y)
    if change == "new parameter":
        model[2].register_parameter("extra", nn.Parameter(torch.ones(2, dtype=torch.float64)))
        model[2].forward = lambda t, m=model[2]: nn.functional.linear(t, m.weight, m.bias) * m.extra
    elif change == "submodule replaced":
        torch.manual_seed(1)
        model[0] = nn.Linear(3, 4).double()
    elif change == "requires_grad":
        model[0].weight.requires_grad_(False)
    else:
        model[0].weight = nn.Parameter(2 * model[0].weight.detach())
    H = hessop.model_hessian(model, LOSS, (x, y))
    ref = _reference(model, x, y)
    assert H.shape == ref.shape
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_train_eval_switch_between_builds_is_seen() -> None:
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().eval()
    _built_twice(model, x, y)
    model.train()
    with pytest.raises(hessop.RandomnessError, match="Dropout"):
        hessop.model_hessian(model, LOSS, (x, y))
    model.eval()
    H = hessop.model_hessian(model, LOSS, (x, y))
    torch.testing.assert_close(H.to_dense(), _reference(model, x, y), rtol=1e-10, atol=1e-12)


class _Noisy(nn.Module):
    """Draws random numbers in forward only when ``noisy`` is set (a plain attribute,
    which no operator watches)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.noisy = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out + torch.randn_like(out) if self.noisy else out


@pytest.mark.parametrize("change", ["attribute", "forward hook", "forward replaced"])
def test_a_model_that_starts_drawing_random_numbers_is_refused(change: str) -> None:
    """Later builds of a model skip the loss's first-evaluation checks only while the
    model runs the same code: an attribute, a hook or a replaced forward is seen."""
    x, y = _data()
    model = _Noisy()
    _built_twice(model, x, y)
    if change == "attribute":
        model.noisy = True
    elif change == "forward hook":
        model.lin.register_forward_hook(lambda m, i, out: out + torch.randn_like(out))
    else:
        plain = model.forward
        model.forward = lambda t: plain(t) + torch.randn(2, dtype=torch.float64)
    H = hessop.model_hessian(model, LOSS, (x, y))
    with pytest.raises(hessop.RandomnessError, match="global random generator"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


def test_a_model_still_checked_after_repeated_builds_gives_the_right_products() -> None:
    x, y = _data()
    model = _model()
    _built_twice(model, x, y)  # later builds skip the first-evaluation checks
    H = hessop.model_hessian(model, LOSS, (x, y))
    v = torch.linspace(-1, 1, H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H @ v, _reference(model, x, y) @ v, rtol=1e-10, atol=1e-12)
    Hv = hessop.model_hvp(model, LOSS, x, y, v)
    torch.testing.assert_close(Hv, _reference(model, x, y) @ v, rtol=1e-10, atol=1e-12)


def test_an_in_place_change_after_a_build_is_still_seen_by_the_first_product() -> None:
    x, y = _data()
    model = _model()
    _built_twice(model, x, y)
    H = hessop.model_hessian(model, LOSS, (x, y))
    with torch.no_grad():
        model[0].weight.data.mul_(2.0)  # .data: no version counter bump
    with pytest.raises(hessop.StaleOperatorError, match="changed in place"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


def test_a_watch_used_at_once_records_no_contents() -> None:
    import numpy as np

    from hessop._state import used_at_once

    X = np.ones(3)
    with used_at_once():
        once = StateWatch()
    once.add_array("X", X)
    X[0] = 2.0
    once.check()  # nothing recorded: the caller uses its operator before any user code runs
    watch = StateWatch()  # outside the block: recorded and checked as always
    watch.add_array("X", X)
    X[0] = 3.0
    with pytest.raises(hessop.StaleOperatorError, match="X was changed in place"):
        watch.check()


def test_model_hvp_reads_no_array_twice(monkeypatch) -> None:
    """model_hvp's operator is built and used at once: no fingerprint of the parameters or
    the batch (a read of every array), and the product still matches a dense Hessian."""
    from hessop.backends import torch as torch_backend

    x, y = _data()
    model = _model()
    loss_fn = torch.nn.CrossEntropyLoss()
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    expected = _reference(model, x, y) @ v
    calls = []
    real = torch_backend.bit_sum
    monkeypatch.setattr(torch_backend, "bit_sum", lambda t: calls.append(t) or real(t))
    hessop.model_hessian(model, loss_fn, (x, y))
    assert len(calls) >= len(params) + 2  # a kept operator records every array
    calls.clear()
    out = hessop.model_hvp(model, loss_fn, x, y, v)
    assert calls == []
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_later_builds_of_an_unchanged_model_skip_the_first_evaluation_checks(monkeypatch) -> None:
    """What makes a rebuild cheap: the third operator of the same model, loss and state
    runs no checked evaluation (no capture of the global generators)."""
    from hessop import _rng

    x, y = _data()
    model = _model()
    _built_twice(model, x, y)
    calls = []
    capture = _rng.capture
    monkeypatch.setattr(_rng, "capture", lambda bk: calls.append(1) or capture(bk))
    H = hessop.model_hessian(model, LOSS, (x, y))
    H @ torch.ones(H.shape[0], dtype=torch.float64)
    assert calls == []
    model.add_module("extra", nn.Linear(2, 2).double())  # a new function: checked again
    H = hessop.model_hessian(model, LOSS, (x, y))
    H @ torch.ones(H.shape[0], dtype=torch.float64)
    assert calls == [1]


@pytest.mark.parametrize("build", ["model_ggn", "model_fisher"])
def test_jax_curvature_operators_per_batch_compile_once(build: str) -> None:
    """A GGN or Fisher operator per batch (a training loop) reuses the compiled products
    of the same functions, and each gives its own batch's matrix; a closure that changed
    gets functions of its own."""
    jax = pytest.importorskip("jax")
    import numpy as np

    jnp = jax.numpy
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), dtype=jnp.float32)}
    scale = {"s": 1.0}

    def apply(p, x):
        return jnp.tanh(x @ p["w"]) * scale["s"]

    def loss_fn(out, y):
        return jnp.mean((out - y) ** 2)

    def dense(x, y):
        """The matrix by jax.jacfwd (GGN) or per-sample gradients (Fisher), float64."""
        w = np.asarray(params["w"], dtype=np.float64)
        x64, y64 = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        out = np.tanh(x64 @ w) * scale["s"]
        # d out[i, k] / d w[a, b] = (1 - tanh^2) s x[i, a] [k == b]
        J = np.einsum("ik,ia,kb->ikab", (1 - np.tanh(x64 @ w) ** 2) * scale["s"], x64, np.eye(2))
        J = J.reshape(len(x64), 2, 6)
        n = len(x64)
        if build == "model_ggn":
            return sum(J[i].T @ J[i] for i in range(n)) * 2 / (n * 2)
        g = np.stack([J[i].T @ (2 * (out[i] - y64[i]) / 2) for i in range(n)])
        return g.T @ g / n

    fns = []
    for seed in (1, 2):
        r = np.random.default_rng(seed)
        x = jnp.asarray(r.standard_normal((5, 3)), dtype=jnp.float32)
        y = jnp.asarray(r.standard_normal((5, 2)), dtype=jnp.float32)
        G = getattr(hessop, build)(apply, loss_fn, (x, y), params=params)
        np.testing.assert_allclose(np.asarray(G.to_dense()), dense(x, y), rtol=1e-4, atol=1e-5)
        k = G._kernel
        fns.append(k._mv if build == "model_ggn" else k._grads)
    assert fns[0] is fns[1]
    scale["s"] = 2.0  # what apply reads changed: another function
    G = getattr(hessop, build)(apply, loss_fn, (x, y), params=params)
    np.testing.assert_allclose(np.asarray(G.to_dense()), dense(x, y), rtol=1e-4, atol=1e-5)
    assert (G._kernel._mv if build == "model_ggn" else G._kernel._grads) is not fns[0]


def test_a_replaced_buffer_is_read_by_the_next_build() -> None:
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()
    _built_twice(model, x, y)
    model[1].running_var = torch.full((4,), 4.0, dtype=torch.float64)
    H = hessop.model_hessian(model, LOSS, (x, y))
    torch.testing.assert_close(H.to_dense(), _reference(model, x, y), rtol=1e-10, atol=1e-12)


def test_what_a_build_remembers_of_a_model_does_not_keep_it_alive() -> None:
    import gc
    import weakref

    x, y = _data()
    model = _model()
    _built_twice(model, x, y)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None

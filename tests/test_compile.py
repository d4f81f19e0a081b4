"""hessian(..., compile=True) in the torch backend: torch.compile of the torch.func product.

References: Hessian-vector products by double backward through autograd, written out
here (independent of hessop), in float64. A mode is compiled once for the whole module
(10-25 s on 2 CPU cores with a cold inductor cache); every other test reuses that
compilation, which is itself what is being tested. The default run compiles
reverse-over-forward only; ``-m slow`` adds forward-over-reverse and new shapes.
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

import hessop

torch = pytest.importorskip("torch")
F = torch.nn.functional

from model_utils import rng_states, same_rng_states  # noqa: E402

MODES = [
    "reverse-over-forward",
    # a second compilation: 10-20 s more on 2 cores with a cold inductor cache
    pytest.param("forward-over-reverse", marks=pytest.mark.slow),
]
HIDDEN, D_IN, D_OUT, BATCH = 16, 10, 3, 8


def loss(p, x, y):
    """A two-layer MLP with a LayerNorm (whose fused kernel hessop decomposes)."""
    h = torch.tanh(x @ p["W1"].T + p["b1"])
    h = F.layer_norm(h, (HIDDEN,), p["gamma"], None)
    return ((h @ p["W2"].T + p["b2"] - y) ** 2).mean()


def point(seed):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "W1": randn(HIDDEN, D_IN, scale=0.5),
        "b1": randn(HIDDEN, scale=0.1),
        "gamma": 1 + randn(HIDDEN, scale=0.1),
        "W2": randn(D_OUT, HIDDEN, scale=0.5),
        "b2": randn(D_OUT, scale=0.1),
    }


def batch(seed, n=BATCH):
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, D_IN, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, D_OUT, generator=gen, dtype=torch.float64)


def reference(params, batches, V):
    """Hessian of the size-weighted mean loss over ``batches`` times ``V``, by double
    backward through autograd (right for LayerNorm, unlike vmapped double backward)."""
    names = list(params)
    sizes = [params[n].numel() for n in names]
    shapes = [params[n].shape for n in names]
    total = sum(x.shape[0] for x, _ in batches)
    w = torch.cat([params[n].detach().reshape(-1) for n in names]).requires_grad_(True)
    p = {n: piece.reshape(s) for n, piece, s in zip(names, w.split(sizes), shapes)}
    value = sum(loss(p, x, y) * x.shape[0] for x, y in batches) / total
    (g,) = torch.autograd.grad(value, w, create_graph=True)
    columns = [torch.autograd.grad(g, w, v, retain_graph=True)[0] for v in V.T]
    return torch.stack(columns, dim=1)


def probes(d, k=3):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(d, k, generator=gen, dtype=torch.float64)


def unique_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def global_state():
    """What compiling could change behind the user's back: configs, flags, RNGs."""
    import torch._dynamo.config
    import torch._inductor.config

    return {
        "dynamo": torch._dynamo.config.get_config_copy(),
        "inductor": torch._inductor.config.get_config_copy(),
        "grad": torch.is_grad_enabled(),
        "mha_fastpath": torch.backends.mha.get_fastpath_enabled(),
        "math_sdp": torch.backends.cuda.math_sdp_enabled(),
        "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
        "default_dtype": torch.get_default_dtype(),
    }


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module", params=MODES)
def first(request):
    """The first compiled operator of the module for a mode, and what it left behind."""
    mode = request.param
    params = {n: p.requires_grad_(True) for n, p in point(0).items()}  # user's leaves
    for p in params.values():
        p.grad = torch.full_like(p, 0.25)  # a user mid-training
    x, y = batch(0)
    before = {n: (p.detach().clone(), p.grad.clone(), p._version) for n, p in params.items()}
    state, rngs = global_state(), rng_states()
    logger, records = logging.getLogger("hessop"), Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(records)
    try:
        with torch.no_grad():  # hessop must turn gradients on by itself
            H = hessop.hessian(loss, params, x, y, compile=True, mode=mode)
            V = probes(H.shape[0])
            products = (H @ V[:, 0], H @ V)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    after = {n: (p.detach().clone(), p.grad.clone(), p._version) for n, p in params.items()}
    return {
        "H": H,
        "mode": mode,
        "products": products,
        "messages": records.messages,
        "params_unchanged": all(
            torch.equal(before[n][0], after[n][0])
            and torch.equal(before[n][1], after[n][1])
            and before[n][2] == after[n][2]
            for n in params
        ),
        "global_state_unchanged": state == global_state(),
        "rngs_unchanged": same_rng_states(rngs, rng_states()),
    }


def test_compiled_products_match_the_reference(first):
    H = first["H"]
    assert H.mode == first["mode"] and H.cache is False
    V = probes(H.shape[0])
    HV_ref = reference(point(0), [batch(0)], V)
    hv, HV = first["products"]
    torch.testing.assert_close(hv, HV_ref[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(HV, HV_ref, rtol=1e-10, atol=1e-12)
    assert HV.shape == V.shape and HV.dtype == torch.float64
    # strided columns, a row, a single column: the same compiled function, no new graph
    graphs = unique_graphs()
    torch.testing.assert_close(H @ V[:, 1], HV_ref[:, 1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(V[:, 2] @ H, HV_ref[:, 2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H.matmat(V[:, :1]), HV_ref[:, :1], rtol=1e-10, atol=1e-12)
    assert unique_graphs() == graphs


def test_compile_time_is_reported_and_logged(first):
    H = first["H"]
    assert isinstance(H.compile_time, float) and H.compile_time > 0.0
    assert any("compiled" in m and H.mode in m for m in first["messages"])
    assert hessop.hessian(loss, point(0), *batch(0)).compile_time is None


def test_a_new_point_and_batch_reuse_the_compilation(first):
    mode = first["mode"]
    # with compile=True, "auto" is reverse-over-forward: the same compiled function
    asked = "auto" if mode == "reverse-over-forward" else mode
    graphs = unique_graphs()
    for seed in (1, 2):  # a new point (a Newton step), then also a new batch
        params, xy = point(seed), batch(seed - 1)
        H = hessop.hessian(loss, params, *xy, compile=True, mode=asked)
        assert H.mode == mode and H.compile_time == 0.0
        V = probes(H.shape[0])
        HV_ref = reference(params, [xy], V)
        # the products are those of the new point and batch, not stale ones
        assert (HV_ref - reference(point(0), [batch(0)], V)).abs().max() > 1e-2
        torch.testing.assert_close(H @ V[:, 0], HV_ref[:, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(H @ V, HV_ref, rtol=1e-10, atol=1e-12)
    assert unique_graphs() == graphs


def test_streamed_data_uses_the_compiled_product(first):
    batches = [batch(0), batch(1)]
    H = hessop.hessian(loss, point(3), data=batches, compile=True, mode=first["mode"])
    assert H.compile_time == 0.0  # batches of the shapes compiled for
    V = probes(H.shape[0])
    torch.testing.assert_close(H @ V, reference(point(3), batches, V), rtol=1e-10, atol=1e-12)


def test_an_uneven_last_batch_compiles_once_more(first):
    """A smaller last batch compiles once (static shapes, one compilation per batch size);
    later operators with the same data, at new points, compile nothing."""
    graphs = unique_graphs()
    batches = [batch(0), batch(4), batch(5, n=5)]
    for seed in (4, 5):
        H = hessop.hessian(loss, point(seed), data=batches, compile=True, mode=first["mode"])
        V = probes(H.shape[0])
        HV_ref = reference(point(seed), batches, V)
        torch.testing.assert_close(H @ V, HV_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(H @ V[:, 0], HV_ref[:, 0], rtol=1e-10, atol=1e-12)
    assert unique_graphs() - graphs == 1


def test_user_state_is_untouched(first):
    assert first["params_unchanged"]
    assert first["rngs_unchanged"]
    assert first["global_state_unchanged"]


# --- misuse -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reverse-over-reverse", "rev-rev", "dense", "fd"])
def test_modes_that_cannot_be_compiled(mode):
    with pytest.raises(
        ValueError, match=r"compile=True needs one of the modes.*forward.*compile=False"
    ):
        hessop.hessian(loss, point(0), *batch(0), compile=True, mode=mode)


def test_compile_and_differentiable_cannot_be_combined():
    with pytest.raises(ValueError, match=r"compile=True and differentiable=True"):
        hessop.hessian(loss, point(0), *batch(0), compile=True, differentiable=True)


def test_a_loss_that_cannot_be_compiled_says_to_pass_compile_false():
    def breaks(w):
        torch._dynamo.graph_break()  # what a print() or a .numpy() in a loss amounts to
        return (w**3).sum()

    w = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"compile=True.*could not compile.*compile=False"):
        hessop.hessian(breaks, w, compile=True)
    H = hessop.hessian(breaks, w)  # the hint is right: without compiling it works
    np.testing.assert_allclose((H @ w).numpy(), 6.0)


def test_errors_of_the_loss_itself_are_not_blamed_on_compile():
    w = torch.ones(4, dtype=torch.float64)
    with pytest.raises(hessop.LossError, match="scalar"):
        hessop.hessian(lambda w: w**2, w, compile=True)

    grid = torch.zeros(1, 2, 2, 2, dtype=torch.float64)

    def warp(w):  # grid_sampler_2d has no forward-mode derivative
        image = w.reshape(1, 1, 2, 2)
        return (F.grid_sample(image, grid * w.sum(), align_corners=False) ** 2).sum()

    with pytest.raises(hessop.ForwardModeUnsupportedError, match="reverse-over-reverse"):
        hessop.hessian(warp, w, compile=True)


# --- slow -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_float32_module_through_functional_call():
    nn = torch.nn
    gen = torch.Generator().manual_seed(5)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3))
    x = torch.randn(16, 6, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)

    def f(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    params = dict(model.named_parameters())
    state = {n: t.clone() for n, t in model.state_dict().items()}
    before = (rng_states(), random.getstate())
    H = hessop.hessian(f, params, x, y, compile=True)
    assert H.compile_time > 0.0 and H.dtype == torch.float32
    ref = hessop.hessian(f, params, x, y, mode="reverse-over-reverse")
    V = probes(H.shape[0]).float()
    torch.testing.assert_close(H @ V, ref @ V, rtol=1e-4, atol=1e-5)
    assert same_rng_states(before[0], rng_states()) and before[1] == random.getstate()
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_model_hessian_compiles():
    nn = torch.nn
    gen = torch.Generator().manual_seed(6)
    with torch.random.fork_rng():
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    before = (rng_states(), random.getstate())
    H = hessop.model_hessian(model, nn.CrossEntropyLoss(), (x, y), compile=True)
    assert H.compile_time > 0.0
    ref = hessop.model_hessian(model, nn.CrossEntropyLoss(), (x, y), mode="rev-rev")
    V = probes(H.shape[0])
    torch.testing.assert_close(H @ V, ref @ V, rtol=1e-10, atol=1e-12)
    assert same_rng_states(before[0], rng_states()) and before[1] == random.getstate()
    with pytest.raises(ValueError, match="allow_randomness"):
        hessop.model_hessian(
            model, nn.CrossEntropyLoss(), (x, y), compile=True, allow_randomness="fixed-seed"
        )

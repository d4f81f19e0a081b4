"""hessop.model_kfac: which parameters make layers (torch calls, JAX jaxprs), the errors and
the exact block for the others, Monte-Carlo Fisher, options, side effects, and
preconditioned CG."""

from __future__ import annotations

import numpy as np
import pytest
from kfac_cases import jax_mse, linear_case

import hessop
from conftest import has_framework, to_numpy


def dense(op) -> np.ndarray:
    return to_numpy(op.to_dense())


needs_torch = pytest.mark.skipif(not has_framework("torch"), reason="torch not installed")
needs_jax = pytest.mark.skipif(not has_framework("jax"), reason="jax not installed")


def torch_data(n=6, d=3, c=3, seed=0, classes=True):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g) if classes else torch.randn(n, c, generator=g)
    return x, y


# --- torch: layers, unsupported parameters, the exact block --------------------------------
@needs_torch
def test_parameters_outside_layers_are_named_or_get_their_exact_block():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    x, y = torch_data()
    loss = nn.CrossEntropyLoss()
    with pytest.raises(hessop.UnsupportedLayerError, match=r"1\.weight.*layer_norm.*params="):
        hessop.model_kfac(model, loss, (x, y))
    K = hessop.model_kfac(model, loss, (x, y), unsupported="exact")
    full = dense(K)
    G = dense(hessop.model_ggn(model, loss, (x, y)))
    ln = slice(16, 24)  # 0.weight, 0.bias (16), then 1.weight, 1.bias
    np.testing.assert_allclose(full[ln, ln], G[ln, ln], rtol=1e-12, atol=1e-14)
    assert np.all(full[ln, :16] == 0) and np.all(full[ln, 24:] == 0)
    layers = ["0.weight", "0.bias", "2.weight", "2.bias"]
    K2 = hessop.model_kfac(model, loss, (x, y), params=layers)
    keep = np.r_[0:16, 24:39]
    np.testing.assert_allclose(full[np.ix_(keep, keep)], dense(K2), rtol=1e-12, atol=1e-14)
    assert "exact block" in K.factors and K.factors["exact block"]["D"].shape == (8, 8)
    # the exact block takes part in every function of the matrix
    np.testing.assert_allclose(float(K.trace()), np.trace(full), rtol=1e-12)
    sign, logdet = np.linalg.slogdet(full + 0.1 * np.eye(39))
    np.testing.assert_allclose(float(K.logdet(0.1)), logdet, rtol=1e-11)
    v = torch.linspace(-1, 1, 39, dtype=torch.float64)
    back = K.inverse(0.1) @ (K @ v + 0.1 * v)
    torch.testing.assert_close(back, v, rtol=1e-10, atol=1e-10)


@needs_torch
def test_shared_weights_and_grouped_convolutions_are_refused():
    import torch
    from torch import nn

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))

    x, y = torch_data(c=2)
    with pytest.raises(hessop.UnsupportedLayerError, match=r"lin\.weight \(it is used 2 times"):
        hessop.model_kfac(Twice().double(), nn.CrossEntropyLoss(), (x, y))
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 2)).double()
    xc = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(hessop.UnsupportedLayerError, match="grouped"):
        hessop.model_kfac(conv, nn.CrossEntropyLoss(), (xc, y[:4]))


@needs_torch
def test_functional_torch_model_and_parameter_subsets():
    import torch
    import torch.nn.functional as F
    from torch import nn

    model, loss, data, _ = linear_case("torch", sizes=(3, 4, 3), loss="ce")
    K = dense(hessop.model_kfac(model, loss, data))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def apply(p, x):  # the same network, calling F.linear itself
        return F.linear(
            torch.tanh(F.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"]
        )

    Kf = hessop.model_kfac(apply, loss, data, params=params)
    assert [ly.name for ly in Kf.layers] == ["0", "2"]
    np.testing.assert_allclose(dense(Kf), K, rtol=1e-12, atol=1e-15)
    # a bias without its weight keeps its own block: G of its layer
    Kb = hessop.model_kfac(model, loss, data, params=["0.bias", "2.weight", "2.bias"])
    keep = np.r_[12:31]
    np.testing.assert_allclose(dense(Kb), K[np.ix_(keep, keep)], rtol=1e-12, atol=1e-15)

    def matmul(p, x):  # x @ W.T is not a layer call
        return x @ p["2.weight"].T + p["2.bias"]

    small = {"2.weight": params["2.weight"][:, :3], "2.bias": params["2.bias"]}
    with pytest.raises(hessop.UnsupportedLayerError, match=r"\['2.weight'\] \(it is used by"):
        hessop.model_kfac(matmul, loss, data, params=small)
    inplace = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
    ref = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    ref.load_state_dict(inplace.state_dict())
    np.testing.assert_allclose(
        dense(hessop.model_kfac(inplace, loss, data)), dense(hessop.model_kfac(ref, loss, data))
    )


# --- JAX: layers found in the jaxpr ---------------------------------------------------------
def jax_layouts():
    import jax.numpy as jnp
    from jax import lax

    def in_out(p, x):  # flax's Dense: kernel (in, out)
        return x @ p["kernel"] + p["bias"]

    def einsum(p, x):
        return jnp.einsum("bi,oi->bo", x, p["kernel"]) + p["bias"][None, :]

    def weight_first(p, x):  # W @ x^T: the weight is the left operand
        return (p["kernel"] @ x.T).T + p["bias"]

    def nhwc(p, x):  # flax's Conv: NHWC inputs, HWIO kernel
        y = lax.conv_general_dilated(
            x, p["kernel"], (1, 2), "SAME", rhs_dilation=(2, 1),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        return y + p["bias"]

    rng = np.random.default_rng(0)
    dense_in = {"kernel": rng.standard_normal((3, 2)), "bias": rng.standard_normal(2)}
    dense_out = {"kernel": rng.standard_normal((2, 3)), "bias": rng.standard_normal(2)}
    conv = {"kernel": rng.standard_normal((3, 2, 2, 3)), "bias": rng.standard_normal(3)}
    xv, xi = rng.standard_normal((5, 3)), rng.standard_normal((5, 4, 5, 2))
    return [
        (in_out, dense_in, xv, (5, 2)),
        (einsum, dense_out, xv, (5, 2)),
        (weight_first, dense_out, xv, (5, 2)),
        (nhwc, conv, xi, (5, 4, 3, 3)),
    ]


@needs_jax
@pytest.mark.parametrize(
    "case",
    [0, pytest.param(1, marks=pytest.mark.slow), 2, 3],
    ids=["x@W", "einsum", "W@x", "conv-NHWC"],
)
def test_jax_layer_layouts_are_exact(case):
    import jax.numpy as jnp

    apply, params, x, out_shape = jax_layouts()[case]
    params = {k: jnp.asarray(v) for k, v in params.items()}
    y = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape))
    data = (jnp.asarray(x), y)
    K = hessop.model_kfac(apply, jax_mse, data, params=params, separate_bias=False)
    assert [(ly.weight, ly.bias) for ly in K.layers] == [(0, 1)]
    G = hessop.model_ggn(apply, jax_mse, data, params=params)
    np.testing.assert_allclose(dense(K), dense(G), rtol=1e-10, atol=1e-12)


@needs_jax
def test_jax_parameters_outside_layers():
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    p = {
        "w1": jnp.asarray(rng.standard_normal((4, 3))),
        "scale": jnp.ones(4),
        "w2": jnp.asarray(rng.standard_normal((2, 4))),
    }
    x = jnp.asarray(rng.standard_normal((6, 3)))
    y = jnp.asarray(rng.standard_normal((6, 2)))

    def scaled(p, x):
        return jnp.tanh(x @ p["w1"].T) * p["scale"] @ p["w2"].T

    with pytest.raises(hessop.UnsupportedLayerError, match=r"\['scale'\] \(it is used by mul"):
        hessop.model_kfac(scaled, jax_mse, (x, y), params=p)
    K = hessop.model_kfac(scaled, jax_mse, (x, y), params=p, unsupported="exact")
    G = dense(hessop.model_ggn(scaled, jax_mse, (x, y), params=p))
    np.testing.assert_allclose(dense(K)[12:16, 12:16], G[12:16, 12:16], rtol=1e-12)

    def tied(p, x):  # the same matrix applied twice
        return jnp.tanh(jnp.tanh(x @ p["w"].T) @ p["w"].T) @ p["head"].T

    q = {"w": jnp.asarray(rng.standard_normal((3, 3))), "head": p["w2"][:, :3]}
    with pytest.raises(hessop.UnsupportedLayerError, match=r"\['w'\] \(it is used 2 times"):
        hessop.model_kfac(tied, jax_mse, (x, y), params=q)

    def scanned(p, x):  # layers stacked and applied by lax.scan
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w.T), None), x, p["ws"])
        return h @ p["head"].T

    s = {"ws": jnp.asarray(rng.standard_normal((2, 3, 3))), "head": q["head"]}
    with pytest.raises(hessop.UnsupportedLayerError, match=r"\['ws'\] \(it is used by scan"):
        hessop.model_kfac(scanned, jax_mse, (x, y), params=s)


@needs_jax
@pytest.mark.slow
def test_jax_layers_inside_jitted_functions():
    import jax

    apply, loss, data, extra = linear_case("jax", sizes=(3, 4, 3), loss="ce", n=8)
    K = dense(hessop.model_kfac(apply, loss, data, **extra))
    Kj = hessop.model_kfac(jax.jit(apply), loss, data, **extra)
    np.testing.assert_allclose(dense(Kj), K, rtol=1e-12, atol=1e-15)


# --- Monte-Carlo Fisher ---------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
def test_mc_converges_to_type2(likelihood):
    from torch import nn

    loss = {
        "categorical": nn.CrossEntropyLoss(),
        "gaussian": nn.MSELoss(),  # a mean over 3 outputs too: the curvature is 2/3
        "bernoulli": nn.BCEWithLogitsLoss(),
    }[likelihood]
    x, y = torch_data(n=8, classes=likelihood == "categorical")
    if likelihood == "bernoulli":
        y = (y > 0).double()
    model, _, _, _ = linear_case("torch", sizes=(3, 4, 3))
    ref = dense(hessop.model_kfac(model, loss, (x, y)))
    K = hessop.model_kfac(model, loss, (x, y), fisher="mc", mc_samples=4000, seed=1)
    assert K.config.likelihood == likelihood  # read from the loss module
    err = np.linalg.norm(dense(K) - ref) / np.linalg.norm(ref)
    assert err < 0.05, err
    # the draws are a function of the seed alone
    again = hessop.model_kfac(model, loss, (x, y), fisher="mc", mc_samples=5, seed=1)
    other = hessop.model_kfac(model, loss, (x, y), fisher="mc", mc_samples=5, seed=2)
    first = hessop.model_kfac(model, loss, (x, y), fisher="mc", mc_samples=5, seed=1)
    np.testing.assert_array_equal(dense(again), dense(first))
    assert not np.allclose(dense(other), dense(first))


@needs_torch
def test_mc_checks_the_likelihood_against_the_loss():
    import torch
    from torch import nn

    model, _, _, _ = linear_case("torch", sizes=(3, 4, 3))
    x, y = torch_data(classes=False)
    with pytest.raises(hessop.LossError, match="not a multiple of its negative log-likelihood"):
        hessop.model_kfac(model, nn.MSELoss(), (x, y), fisher="mc", likelihood="bernoulli")

    def custom(out, y):
        return ((out - y) ** 2).sum(1).mean()

    with pytest.raises(ValueError, match="likelihood="):
        hessop.model_kfac(model, custom, (x, y), fisher="mc")
    K = hessop.model_kfac(model, custom, (x, y), fisher="mc", likelihood="gaussian")
    assert torch.isfinite(K.trace())


# --- options and misuse ---------------------------------------------------------------------
@needs_torch
def test_misuse_gets_named_errors():
    import torch
    from torch import nn

    model, loss, data, _ = linear_case("torch", sizes=(3, 4, 3), loss="ce")
    for kw, err in (
        ({"kind": "shampoo"}, "kfac"),
        ({"fisher": "type-1"}, "type-2"),
        ({"weight_sharing": "mean"}, "expand"),
        ({"unsupported": "skip"}, "exact"),
        ({"likelihood": "poisson", "fisher": "mc"}, "categorical"),
    ):
        with pytest.raises(hessop.UnknownOptionError, match=err):
            hessop.model_kfac(model, loss, data, **kw)
    with pytest.raises(ValueError, match="mc_samples=3 applies to fisher='mc' only"):
        hessop.model_kfac(model, loss, data, mc_samples=3)
    with pytest.raises(ValueError, match="mc_samples must be an integer >= 1"):
        hessop.model_kfac(model, loss, data, fisher="mc", mc_samples=0)
    with pytest.raises(TypeError, match="separate_bias"):
        hessop.model_kfac(model, loss, data, separate_bias="no")
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().train()
    with pytest.raises(ValueError, match="model.eval"):
        hessop.model_kfac(bn, loss, data)
    x, y = torch_data(classes=False)

    def coupled(out, y):  # not a sum of per-sample losses
        return ((out - y).sum(0) ** 2).sum()

    with pytest.raises(hessop.LossError, match="couples the samples"):
        hessop.model_kfac(model, coupled, (x, y))

    def concave(out, y):
        return -((out - y) ** 2).mean()

    with pytest.raises(hessop.LossError, match="not convex"):
        hessop.model_kfac(model, concave, (x, y))
    hessop.model_kfac(model, concave, (x, y), fisher="empirical")  # fine: only gradients
    K = hessop.model_kfac(model, loss, data)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        K.logdet(-1.0)
    with pytest.raises(hessop.ShapeError):
        K @ torch.ones(5, dtype=torch.float64)


@needs_torch
def test_sum_reduction_matches_curvlinops():
    torch = pytest.importorskip("torch")
    curvlinops = pytest.importorskip("curvlinops")
    model, _, data, _ = linear_case("torch", sizes=(3, 4, 3), loss="ce", n=9)
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    for fisher in ("type-2", "empirical"):
        K = hessop.model_kfac(model, loss, data, fisher=fisher)
        C = curvlinops.KFACLinearOperator(
            model, loss, list(model.parameters()), data,
            fisher_type=fisher, check_deterministic=False,
        )  # fmt: skip
        ref = to_numpy(C @ torch.eye(K.shape[0], dtype=torch.float64))
        np.testing.assert_allclose(dense(K), ref, rtol=1e-10, atol=1e-13)


# --- state, staleness, composition ----------------------------------------------------------
@needs_torch
def test_model_and_rng_are_untouched_and_a_changed_model_is_refused():
    import torch
    from model_utils import assert_same_state, model_state, rng_states, same_rng_states

    model, loss, data, _ = linear_case("torch", sizes=(3, 4, 3), loss="ce")
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before, rngs = model_state(model), rng_states()
    for kw in ({"fisher": "mc", "kind": "ekfac"}, {"params": ["0.weight", "2.weight"]}):
        K = hessop.model_kfac(model, loss, data, **kw)
        v = torch.ones(K.shape[0], dtype=torch.float64)
        K @ v, K.inverse(0.1) @ v, K.trace(), K.logdet(0.1), K.diagonal(), K.loss_and_gradient()
    assert_same_state(before, model_state(model))
    assert same_rng_states(rngs, rng_states())
    inv = K.inverse(0.1)
    with torch.no_grad():
        model[2].weight[0, 0] += 1.0
    for use in (lambda: K @ v, lambda: inv @ v, K.trace, lambda: K.inverse(1.0), lambda: K.factors):
        with pytest.raises(hessop.StaleOperatorError):
            use()


@needs_torch
def test_kfac_preconditions_cg_on_the_ggn_and_the_hessian():
    # KFAC helps where the curvature is ill-conditioned through the layer inputs: a softmax
    # regression on features of scales 0.03 .. 10 (its Hessian is its GGN, both definite)
    import torch

    model, loss, data, _ = linear_case("torch", sizes=(8, 4), loss="ce", n=40)
    scale = torch.logspace(-1.5, 1.0, 8, dtype=torch.float64)
    data = (torch.cat([x for x, _ in data]) * scale, torch.cat([y for _, y in data]))
    K = hessop.model_kfac(model, loss, data)
    b = torch.from_numpy(np.random.default_rng(0).standard_normal(K.shape[0]))
    damping = 1e-2
    for op in (hessop.model_ggn(model, loss, data), hessop.model_hessian(model, loss, data)):
        plain = hessop.cg(op, b, damping=damping, tol=1e-7, maxiter=500)
        pre = hessop.cg(op, b, damping=damping, tol=1e-7, maxiter=500, M=K.inverse(damping))
        assert plain.converged and pre.converged
        assert pre.iterations < 0.7 * plain.iterations, (pre.iterations, plain.iterations)
        torch.testing.assert_close(pre.x, plain.x, rtol=1e-5, atol=1e-7)

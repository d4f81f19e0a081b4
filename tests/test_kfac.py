"""hessop.model_kfac: KFAC / EKFAC against the exact GGN where KFAC is exact, against
curvlinops, across frameworks, and its exact inverse, trace, log-determinant and diagonal
against the dense matrix."""

from __future__ import annotations

import numpy as np
import pytest
from kfac_cases import conv_case, linear_case, sequence_case

import hessop
from conftest import backend_params, has_framework, to_numpy


def slow_unless(param, fast: bool) -> list:
    """The marks of a ``backend_params()`` entry, plus ``slow`` unless ``fast``."""
    return list(param.marks) if fast else [*param.marks, pytest.mark.slow]


def backends(*slow_ids: str) -> list:
    """Both backends; the ``slow_ids`` cases (e.g. ``"jax"``: JAX compiles for seconds on a
    loaded CPU) only with ``-m slow``, where a fast case covers the same code."""
    return [
        pytest.param(*p.values, id=p.id, marks=slow_unless(p, p.id not in slow_ids))
        for p in backend_params()
    ]


def dense(op) -> np.ndarray:
    return to_numpy(op.to_dense())


def layer_mask(K, joint: bool) -> np.ndarray:
    """Where the factored matrix can be nonzero: one block per layer (weight and bias
    together when ``joint``)."""
    offsets = np.cumsum([0, *K.spec.sizes])
    mask = np.zeros(K.shape, dtype=bool)
    for layer in K.layers:
        groups = [[layer.weight, layer.bias]] if joint else [[layer.weight], [layer.bias]]
        for group in groups:
            idx = np.concatenate(
                [np.arange(offsets[i], offsets[i + 1]) for i in group if i is not None]
            )
            mask[np.ix_(idx, idx)] = True
    return mask


def ggn_and_kfac(case, backend, **kw):
    model, loss_fn, data, extra = case(backend)
    K = hessop.model_kfac(model, loss_fn, data, **extra, **kw)
    G = hessop.model_ggn(model, loss_fn, data, **extra)
    return K, dense(K), dense(G)


# --- where KFAC is exact ------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("jax"))
def test_linear_layer_with_squared_error_is_exact(backend):
    # a linear model: the loss Hessian is constant, so E[a a^T (x) H] = E[a a^T] (x) H
    K, Kd, Gd = ggn_and_kfac(
        lambda b: linear_case(b, sizes=(3, 2), n=7), backend, separate_bias=False
    )
    assert isinstance(K, hessop.KFACOperator) and K.shape == Gd.shape == (8, 8)
    np.testing.assert_allclose(Kd, Gd, rtol=1e-10, atol=1e-12)
    # separate blocks drop exactly the weight-bias cross terms
    _, Ks, _ = ggn_and_kfac(lambda b: linear_case(b, sizes=(3, 2), n=7), backend)
    mask = layer_mask(K, joint=False)
    np.testing.assert_allclose(Ks, np.where(mask, Gd, 0.0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "pool", [pytest.param(False, marks=pytest.mark.slow), True], ids=["expand", "reduce"]
)
def test_deep_linear_network_blocks_are_exact(backend, pool):
    # Eschenhagen et al. 2023: "expand" is exact for a loss at every position, "reduce" for
    # a loss after pooling over the positions, on deep linear networks
    sharing = "reduce" if pool else "expand"
    K, Kd, Gd = ggn_and_kfac(
        lambda b: sequence_case(b, pool), backend, weight_sharing=sharing, separate_bias=False
    )
    mask = layer_mask(K, joint=True)
    assert not np.allclose(Gd[~mask], 0.0)  # the GGN has cross-layer blocks, KFAC does not
    np.testing.assert_allclose(Kd, np.where(mask, Gd, 0.0), rtol=1e-10, atol=1e-12)
    other = "expand" if pool else "reduce"
    model, loss_fn, data, extra = sequence_case(backend, pool)
    K2 = hessop.model_kfac(model, loss_fn, data, weight_sharing=other, separate_bias=False, **extra)
    assert not np.allclose(dense(K2)[mask], Gd[mask], rtol=1e-3)


@pytest.mark.parametrize("backend", backend_params())
def test_convolution_with_squared_error_is_exact(backend):
    K, Kd, Gd = ggn_and_kfac(conv_case, backend, separate_bias=False)
    assert [(ly.kind, ly.d_out, ly.d_in) for ly in K.layers] == [("conv", 3, 18)]
    np.testing.assert_allclose(Kd, Gd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", backends("jax"))
def test_empirical_kfac_of_one_sample_is_the_empirical_fisher(backend):
    model, loss_fn, data, extra = linear_case(backend, sizes=(3, 4, 3), n=1, loss="ce")
    K = hessop.model_kfac(model, loss_fn, data, fisher="empirical", separate_bias=False, **extra)
    F = hessop.model_fisher(model, loss_fn, data, **extra)
    mask = layer_mask(K, joint=True)
    np.testing.assert_allclose(dense(K), np.where(mask, dense(F), 0.0), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", backends("jax"))
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_ekfac_eigenvalues_are_the_exact_diagonal_in_the_kronecker_eigenbasis(backend, fisher):
    model, loss_fn, data, extra = linear_case(backend, sizes=(3, 4, 3), n=9, loss="ce")
    K = hessop.model_kfac(model, loss_fn, data, kind="ekfac", fisher=fisher, **extra)
    ref = hessop.model_ggn if fisher == "type-2" else hessop.model_fisher
    exact = dense(ref(model, loss_fn, data, **extra))
    offsets = np.cumsum([0, *K.spec.sizes])
    assert len(K._blocks) == 4  # weights and biases of two layers
    for block, state in zip(K._blocks, K._states):
        QG, QA, E = (to_numpy(state[key]) for key in ("QG", "QA", "E"))
        leaf = block.weight or block.bias
        idx = np.arange(offsets[leaf.index], offsets[leaf.index + 1])
        Q = np.kron(QG, QA)
        want = np.diag(Q.T @ exact[np.ix_(idx, idx)] @ Q).reshape(QG.shape[0], -1)
        np.testing.assert_allclose(E, want, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(E, to_numpy(K.factors[block.name]["eigenvalues"]))


# --- parity: curvlinops and the other framework --------------------------------------------
def reference_case(name, framework, n=12, seed=1, **sizes):
    from model_utils import SMALL

    from hessop.bench import reference as R

    spec = R.get_reference(name, **(sizes or SMALL[name]))
    x, y = spec.make_batch(n, seed=seed, framework=framework, dtype="float64")
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    return spec, data


KFAC_OPTIONS = [
    dict(fisher=f, kind=k, weight_sharing=w, separate_bias=s)
    for f in ("type-2", "empirical")
    for k, w in (("kfac", "expand"), ("kfac", "reduce"), ("ekfac", "expand"))
    for s in (True, False)
]
#: the CNN's share of the fast suite: each convention, bias layout and kind once
CNN_OPTIONS = [KFAC_OPTIONS[i] for i in (3, 4)]


@pytest.mark.parametrize(
    "name, options",
    [
        ("mlp", KFAC_OPTIONS),
        ("cnn", CNN_OPTIONS),
        pytest.param("cnn", KFAC_OPTIONS, marks=pytest.mark.slow, id="cnn-all"),
    ],
)
def test_equals_curvlinops(name, options):
    torch = pytest.importorskip("torch")
    curvlinops = pytest.importorskip("curvlinops")
    spec, data = reference_case(name, "torch", **({"channels": 3} if name == "cnn" else {}))
    model = spec.torch_model(seed=0, dtype=torch.float64)
    loss = torch.nn.CrossEntropyLoss()
    for kw in options:
        K = hessop.model_kfac(model, loss, data, **kw)
        cls = (
            curvlinops.EKFACLinearOperator
            if kw["kind"] == "ekfac"
            else curvlinops.KFACLinearOperator
        )
        C = cls(
            model,
            loss,
            list(model.parameters()),
            data,
            fisher_type=kw["fisher"],
            kfac_approx=kw["weight_sharing"],
            separate_weight_and_bias=kw["separate_bias"],
            check_deterministic=False,
        )
        ref = to_numpy(C @ torch.eye(K.shape[0], dtype=torch.float64))
        np.testing.assert_allclose(dense(K), ref, rtol=1e-8, atol=1e-12, err_msg=str(kw))


def test_equals_curvlinops_on_weight_shared_linear_layers():
    torch = pytest.importorskip("torch")
    curvlinops = pytest.importorskip("curvlinops")
    for pool, sharing in ((False, "expand"), (True, "reduce")):
        model, loss, data, _ = sequence_case("torch", pool, act=True)  # KFAC is not exact
        K = hessop.model_kfac(model, loss, data, weight_sharing=sharing)
        C = curvlinops.KFACLinearOperator(
            model, loss, list(model.parameters()), data,
            fisher_type="type-2", kfac_approx=sharing, check_deterministic=False,
        )  # fmt: skip
        ref = to_numpy(C @ torch.eye(K.shape[0], dtype=torch.float64))
        np.testing.assert_allclose(dense(K), ref, rtol=1e-8, atol=1e-12, err_msg=sharing)


@pytest.mark.skipif(not (has_framework("torch") and has_framework("jax")), reason="needs both")
@pytest.mark.parametrize(
    "name, fisher",
    [
        ("mlp", "type-2"),
        pytest.param("mlp", "empirical", marks=pytest.mark.slow),
        pytest.param("mlp", "mc", marks=pytest.mark.slow),
        pytest.param("cnn", "type-2", marks=pytest.mark.slow),
        pytest.param("cnn", "empirical", marks=pytest.mark.slow),
        pytest.param("cnn", "mc", marks=pytest.mark.slow),
    ],
)
def test_torch_equals_jax(name, fisher):
    import torch

    spec, data_t = reference_case(name, "torch")
    _, data_j = reference_case(name, "jax")
    model = spec.torch_model(seed=0, dtype=torch.float64)
    params = spec.jax_params_from_torch(model)
    mc = {"likelihood": "categorical", "mc_samples": 3, "seed": 7} if fisher == "mc" else {}
    for kind in ("kfac", "ekfac"):
        Kt = hessop.model_kfac(model, spec.torch_loss, data_t, kind=kind, fisher=fisher, **mc)
        Kj = hessop.model_kfac(
            spec.jax_apply, spec.jax_loss, data_j, params=params, kind=kind, fisher=fisher, **mc
        )
        assert [ly.name for ly in Kt.layers] == [ly.name for ly in Kj.layers]
        np.testing.assert_allclose(dense(Kt), dense(Kj), rtol=1e-10, atol=1e-13)
        v = np.linspace(-1.0, 1.0, Kt.shape[0])
        inv_t = Kt.inverse(1e-2) @ torch.from_numpy(v)
        inv_j = Kj.inverse(1e-2) @ Kj.asarray(v)
        np.testing.assert_allclose(to_numpy(inv_t), to_numpy(inv_j), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_equals_curvlinops_at_reference_sizes(name):
    # the reference models at their default sizes: products with 3 random vectors
    torch = pytest.importorskip("torch")
    curvlinops = pytest.importorskip("curvlinops")
    from hessop.bench import reference as R

    spec = R.get_reference(name)
    model = spec.torch_model(seed=0, dtype=torch.float64)
    x, y = spec.make_batch(24, seed=1, framework="torch", dtype="float64")
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    K = hessop.model_kfac(model, torch.nn.CrossEntropyLoss(), data)
    C = curvlinops.KFACLinearOperator(
        model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data,
        fisher_type="type-2", check_deterministic=False,
    )  # fmt: skip
    V = torch.from_numpy(np.random.default_rng(0).standard_normal((K.shape[0], 3)))
    ref = C @ V
    torch.testing.assert_close(K @ V, ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))


# --- exact functions of the factored matrix -------------------------------------------------
def dense_checks(K, damping=0.1):
    xp_v = np.random.default_rng(2).standard_normal(K.shape[0])
    D = dense(K)
    np.testing.assert_allclose(D, D.T, rtol=0, atol=1e-14)
    eig = np.linalg.eigvalsh(D)
    assert eig.min() > -1e-12 * eig.max()  # positive semi-definite
    inv = K.inverse(damping)
    v = K.asarray(xp_v)
    back = inv @ (K @ v + damping * v)
    np.testing.assert_allclose(to_numpy(back), xp_v, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        dense(inv), np.linalg.inv(D + damping * np.eye(len(D))), rtol=1e-9, atol=1e-10
    )
    np.testing.assert_allclose(float(K.trace()), np.trace(D), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(K.diagonal()), np.diag(D), rtol=1e-12, atol=1e-15)
    sign, logdet = np.linalg.slogdet(D + damping * np.eye(len(D)))
    assert sign > 0
    np.testing.assert_allclose(float(K.logdet(damping)), logdet, rtol=1e-11)


INVERSE_CASES = [
    pytest.param(b.values[0], kind, sep, id=f"{b.id}-{kind}-{sep}", marks=slow_unless(b, fast))
    for b in backend_params()
    for kind in ("kfac", "ekfac")
    for sep in (True, False)
    for fast in [b.id == "torch" or (kind == "ekfac" and not sep)]
]


@pytest.mark.parametrize("backend, kind, separate_bias", INVERSE_CASES)
def test_inverse_trace_logdet_diagonal_are_exact(backend, kind, separate_bias):
    model, loss_fn, data, extra = linear_case(backend, sizes=(3, 4, 3), n=9, loss="ce")
    K = hessop.model_kfac(model, loss_fn, data, kind=kind, separate_bias=separate_bias, **extra)
    dense_checks(K)
    assert K.kind == kind and K.fisher == "type-2" and K.weight_sharing == "expand"


@pytest.mark.parametrize("backend", backend_params())
def test_functions_of_a_convolutional_kfac(backend):
    model, loss_fn, data, extra = conv_case(backend)
    dense_checks(hessop.model_kfac(model, loss_fn, data, kind="ekfac", **extra), damping=1e-3)
    K = hessop.model_kfac(model, loss_fn, data, **extra)
    with pytest.raises(ValueError, match="damping"):
        K.inverse(-1.0)
    assert np.isfinite(float(K.logdet()))  # a non-singular KFAC has a finite logdet

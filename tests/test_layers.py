"""curvature_by_layer and the operators' diagonal_block_products, against dense blocks of
Hessians and GGNs computed without hessop, and across frameworks."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hessop
from conftest import backend_params, to_numpy

torch = pytest.importorskip("torch")

from model_utils import (  # noqa: E402
    assert_same_state,
    jax_hessian,
    model_state,
    rng_states,
    same_rng_states,
    small_spec,
    torch_ggn,
    torch_hessian,
)

MODULES = ["layers.0", "layers.1", "layers.2"]
MODES = ["fwd-rev", "rev-fwd", "rev-rev"]
SLOW = pytest.mark.slow  # the same code as the fast case, in another AD mode


def mlp():
    spec = small_spec("mlp", sizes=(4, 6, 5, 3))
    model = spec.torch_model(seed=0, dtype=torch.float64)
    x, y = spec.make_batch(24, seed=1, framework="torch", dtype="float64")
    return spec, model, x, y


def blocks_of(D: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    out, start = [], 0
    for n in sizes:
        out.append(D[start : start + n, start : start + n])
        start += n
    return out


def hutchinson(D: np.ndarray, sizes: list[int], num_probes: int, seed: int):
    """The estimator written out on the dense blocks, with the probes the function draws
    (a generator seeded with ``seed``, group after group, when only the trace is asked)."""
    rng = np.random.default_rng(seed)
    out = []
    for B in blocks_of(D, sizes):
        Z = 2.0 * rng.integers(0, 2, (num_probes, B.shape[0]), dtype=np.int8).T - 1.0
        s = np.sum(Z * (B @ Z), axis=0)
        out.append((s.mean(), s.std(ddof=1) / np.sqrt(num_probes)))
    return out


def test_eigenvalues_and_traces_match_dense_blocks():
    spec, model, x, y = mlp()
    res = hessop.curvature_by_layer(model, spec.torch_loss, (x, y), k=2, tol=1e-10)
    D = torch_hessian(model, spec.torch_loss, x, y).numpy()
    assert [layer.name for layer in res] == MODULES
    assert [layer.parameters for layer in res] == [(f"{m}.weight", f"{m}.bias") for m in MODULES]
    for layer, B in zip(res, blocks_of(D, [layer.size for layer in res])):
        exact = np.linalg.eigvalsh(B)[::-1][:2]
        np.testing.assert_allclose(layer.eigenvalues, exact, rtol=1e-9)
        assert layer.converged.all() and (layer.residual_norms < 1e-9 * exact[0]).all()
        # An unbiased estimate: within 4 standard errors of the exact trace.
        assert abs(layer.trace - np.trace(B)) < 4 * layer.trace_std_error
    assert res.trace == pytest.approx(sum(layer.trace for layer in res), rel=1e-12)


def test_trace_is_hutchinson_on_the_dense_matrix():
    spec, model, x, y = mlp()
    res = hessop.curvature_by_layer(model, spec.torch_loss, (x, y), "trace", num_probes=7, seed=3)
    D = torch_hessian(model, spec.torch_loss, x, y).numpy()
    expected = hutchinson(D, [layer.size for layer in res], 7, seed=3)
    for layer, (est, err) in zip(res, expected):
        assert layer.eigenvalues is None
        assert layer.trace == pytest.approx(est, rel=1e-10, abs=1e-12)
        assert layer.trace_std_error == pytest.approx(err, rel=1e-8)
    assert res.num_matvecs == 7 * 3 and res.num_passes == 1 and res.num_probes == 7


def test_ggn_blocks():
    spec, model, x, y = mlp()
    res = hessop.curvature_by_layer(
        model, spec.torch_loss, (x, y), "top_eigenvalue", curvature="ggn", tol=1e-10
    )
    G = torch_ggn(model, spec.torch_loss, x, y).numpy()
    for layer, B in zip(res, blocks_of(G, [layer.size for layer in res])):
        np.testing.assert_allclose(layer.eigenvalues, np.linalg.eigvalsh(B)[-1:], rtol=1e-9)
    assert res.curvature == "ggn" and res.trace is None


@pytest.mark.slow  # JAX compiles per group; test_block_products_jax and the next test are fast
def test_jax_pytree_matches_torch_module():
    pytest.importorskip("jax")
    spec, model, x, y = mlp()
    params = spec.jax_params_from_torch(model)
    xj, yj = spec.make_batch(24, seed=1, framework="jax", dtype="float64")
    kw = {"k": 2, "tol": 1e-10, "num_probes": 5}
    res_t = hessop.curvature_by_layer(model, spec.torch_loss, (x, y), **kw)
    # The pytree's top-level keys are torch's parameter names: group them by module.
    res_j = hessop.curvature_by_layer(
        spec.jax_apply, spec.jax_loss, (xj, yj), groups=lambda n: n.rsplit(".", 1)[0],
        params=params, **kw,
    )  # fmt: skip
    assert [layer.name for layer in res_j] == MODULES
    for a, b in zip(res_t, res_j):
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-11)
        assert a.trace == pytest.approx(b.trace, rel=1e-11)
    D = np.asarray(jax_hessian(spec.jax_apply, spec.jax_loss, params, xj, yj))
    for layer, B in zip(res_j, blocks_of(D, [layer.size for layer in res_j])):
        np.testing.assert_allclose(layer.eigenvalues, np.linalg.eigvalsh(B)[::-1][:2], rtol=1e-9)


def test_jax_default_groups_are_top_level_keys():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    X, y = jnp.asarray(rng.standard_normal((16, 3))), jnp.asarray(rng.standard_normal(16))
    params = {
        "body": {"w": jnp.asarray(rng.standard_normal((3, 4))), "b": jnp.zeros(4)},
        "head": jnp.asarray(rng.standard_normal(4)),
    }

    def apply(p, X):
        return jnp.tanh(X @ p["body"]["w"] + p["body"]["b"]) @ p["head"]

    def loss(out, y):
        return jnp.mean((out - y) ** 2)

    res = hessop.curvature_by_layer(apply, loss, (X, y), "top_eigenvalue", params=params)
    assert [(layer.name, layer.parameters, layer.size) for layer in res] == [
        ("body", ("body.w", "body.b"), 16),
        ("head", ("head",), 4),
    ]
    # jax's own flattening sorts keys (body.b before body.w): a permutation within each
    # block, which leaves its eigenvalues alone.
    import jax
    from jax.flatten_util import ravel_pytree

    w, unravel = ravel_pytree(params)
    D = np.asarray(jax.jit(jax.hessian(lambda w, X, y: loss(apply(unravel(w), X), y)))(w, X, y))
    for layer, B in zip(res, blocks_of(D, [16, 4])):
        np.testing.assert_allclose(layer.eigenvalues, np.linalg.eigvalsh(B)[-1:], rtol=1e-9)


def test_group_specifications():
    spec, model, x, y = mlp()
    loss = spec.torch_loss
    run = lambda groups: hessop.curvature_by_layer(  # noqa: E731
        model, loss, (x, y), "top_eigenvalue", groups, tol=1e-10
    )
    by_param = run("parameter")
    assert [layer.name for layer in by_param] == [n for n, _ in model.named_parameters()]
    merged = run({"body": ["layers.0", "layers.1"], "head": ["layers.2.weight"]})
    assert [(g.name, g.parameters) for g in merged] == [
        ("body", ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias")),
        ("head", ("layers.2.weight",)),
    ]
    inverse = run({"layers.0": "body", "layers.1": "body", "layers.2.weight": "head"})
    np.testing.assert_allclose(
        [g.eigenvalues[0] for g in inverse], [g.eigenvalues[0] for g in merged], rtol=1e-10
    )
    D = torch_hessian(model, loss, x, y).numpy()
    np.testing.assert_allclose(
        merged["body"].eigenvalues[0], np.linalg.eigvalsh(D[:65, :65])[-1], rtol=1e-9
    )
    only = run(lambda n: "out" if n.startswith("layers.2") else None)
    assert [g.name for g in only] == ["out"]
    with pytest.raises(hessop.UnknownOptionError, match="'module', 'parameter'"):
        run("modules")
    with pytest.raises(ValueError, match="matches no parameter.*layers.0.weight"):
        run({"a": ["layer.0"]})
    with pytest.raises(ValueError, match="in two groups"):
        run({"a": ["layers.0"], "b": ["layers.0.bias"]})
    with pytest.raises(ValueError, match="no parameter in any group"):
        run(lambda n: None)
    with pytest.raises(TypeError, match="string or None"):
        run(lambda n: 3)
    with pytest.raises(TypeError, match="groups must be"):
        run(3)


def test_one_pass_over_the_data_per_round():
    spec, model, x, y = mlp()

    class Counted(list):
        passes = 0  # complete passes over the batches

        def __iter__(self):
            yield from super().__iter__()
            Counted.passes += 1

    data = Counted([(x[:10], y[:10]), (x[10:], y[10:])])
    res = hessop.curvature_by_layer(model, spec.torch_loss, data, tol=1e-10, num_probes=4)
    assert Counted.passes == res.num_passes
    per_group = [layer.num_matvecs for layer in res]
    assert res.num_passes == max(per_group) < sum(per_group)  # rounds, not their sum
    whole = hessop.curvature_by_layer(model, spec.torch_loss, (x, y), tol=1e-10, num_probes=4)
    for a, b in zip(res, whole):  # the streamed loss is the same loss
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9)


def test_result_table_dict_plot(tmp_path):
    spec, model, x, y = mlp()
    res = hessop.curvature_by_layer(model, spec.torch_loss, (x, y), k=2, num_probes=4)
    text = str(res)
    assert all(name in text for name in MODULES) and "(all groups)" in text
    assert f"{res['layers.1'].eigenvalues[0]:.6g}" in text
    d = json.loads(json.dumps(res.to_dict()))
    assert d["layers"]["layers.2"]["eigenvalues"] == pytest.approx(res["layers.2"].eigenvalues)
    assert d["num_passes"] == res.num_passes and d["trace"] == pytest.approx(res.trace)
    with pytest.raises(KeyError, match="the groups are"):
        res["nope"]
    pytest.importorskip("matplotlib")
    path = res.plot(tmp_path / "layers.png")
    assert (tmp_path / "layers.png").stat().st_size > 0 and path.endswith("layers.png")


def test_state_is_untouched():
    spec, model, x, y = mlp()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before, rng = model_state(model), rng_states()
    hessop.curvature_by_layer(model, spec.torch_loss, (x, y), num_probes=3)
    hessop.curvature_by_layer(model, spec.torch_loss, (x, y), curvature="ggn", num_probes=3)
    assert_same_state(before, model_state(model))
    assert same_rng_states(rng, rng_states())


def test_argument_errors():
    spec, model, x, y = mlp()
    call = lambda **kw: hessop.curvature_by_layer(model, spec.torch_loss, (x, y), **kw)  # noqa: E731
    with pytest.raises(hessop.UnknownOptionError, match="top_eigenvalue"):
        call(quantities=("top_eigenvalues",))
    with pytest.raises(ValueError, match="quantities"):
        call(quantities=())
    with pytest.raises(hessop.UnknownOptionError, match="'hessian', 'ggn'"):
        call(curvature="fisher")
    with pytest.raises(ValueError, match="drop mode="):
        call(curvature="ggn", mode="fwd-rev")
    for name, bad in [("k", 0), ("num_probes", 1), ("tol", 0.0), ("max_matvecs", 0), ("seed", -1)]:
        with pytest.raises(ValueError, match=name):
            call(**{name: bad})


# --- diagonal_block_products --------------------------------------------------------------
BLOCKS = [((0, 1), 3), ((5,), 2), ((2, 3, 4, 5), 1)]


def check_blocks(H, D):
    rng = np.random.default_rng(0)
    offsets = np.cumsum([0, *H.spec.sizes])
    blocks = []
    for idx, u in BLOCKS:
        n = sum(H.spec.sizes[i] for i in idx)
        blocks.append((idx, H.asarray(rng.standard_normal((n, u)))))
    for _ in range(2):  # the second time through a kept gradient graph (one batch)
        out = H.diagonal_block_products(blocks)
        for (idx, V), got in zip(blocks, out):
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
            want = D[np.ix_(rows, rows)] @ to_numpy(V)
            np.testing.assert_allclose(to_numpy(got), want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mode", ["auto", "fwd-rev", pytest.param("rev-fwd", marks=SLOW)])
@pytest.mark.parametrize("streamed", [False, True], ids=["batch", "data"])
def test_block_products_torch(mode, streamed):
    spec, model, x, y = mlp()
    data = [(x[:9], y[:9]), (x[9:], y[9:])] if streamed else (x, y)
    H = hessop.model_hessian(model, spec.torch_loss, data, mode=mode)
    check_blocks(H, torch_hessian(model, spec.torch_loss, x, y).numpy())


@pytest.mark.parametrize("backend", backend_params())
def test_block_products_ggn(backend):
    spec, model, x, y = mlp()
    G = torch_ggn(model, spec.torch_loss, x, y).numpy()
    if backend == "torch":
        op = hessop.model_ggn(model, spec.torch_loss, (x, y))
    else:
        xj, yj = spec.make_batch(24, seed=1, framework="jax", dtype="float64")
        op = hessop.model_ggn(
            spec.jax_apply, spec.jax_loss, (xj, yj), params=spec.jax_params_from_torch(model)
        )
    check_blocks(op, G)


@pytest.mark.parametrize("mode", ["fwd-rev", *(pytest.param(m, marks=SLOW) for m in MODES[1:])])
def test_block_products_jax(mode):
    pytest.importorskip("jax")
    spec, model, x, y = mlp()
    params = spec.jax_params_from_torch(model)
    xj, yj = spec.make_batch(24, seed=1, framework="jax", dtype="float64")
    H = hessop.model_hessian(spec.jax_apply, spec.jax_loss, (xj, yj), params=params, mode=mode)
    check_blocks(H, np.asarray(jax_hessian(spec.jax_apply, spec.jax_loss, params, xj, yj)))


def test_block_product_errors():
    spec, model, x, y = mlp()
    H = hessop.model_hessian(model, spec.torch_loss, (x, y))
    assert H.diagonal_block_products([]) == []
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 6\)"):
        H.diagonal_block_products([((6,), torch.zeros(3, 1, dtype=torch.float64))])
    with pytest.raises(ValueError, match="distinct"):
        H.diagonal_block_products([((1, 1), torch.zeros(12, 1, dtype=torch.float64))])
    with pytest.raises(hessop.ShapeError, match=r"\(6, k\)"):
        H.diagonal_block_products([((1,), torch.zeros(5, 1, dtype=torch.float64))])
    with pytest.raises(hessop.ShapeError, match=r"\(6, k\)"):
        H.diagonal_block_products([((1,), torch.zeros(6, dtype=torch.float64))])

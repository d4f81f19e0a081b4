"""hessop.hessian: every mode x every backend against independent dense references.

References are computed without hessop: a closed form written by hand in numpy where one
exists, otherwise ``torch.autograd.functional.hessian`` (or ``jax.hessian``) of the loss
composed with a ravel written here, independently of ``hessop._pytree``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import hessop
from conftest import (
    LOSSES,
    LossCase,
    build_operator,
    has_framework,
    logistic_data,
    logistic_dense,
    logistic_f,
    shared_operator,
    to_native,
    to_numpy,
)

MODES = ("fwd-rev", "rev-fwd", "rev-rev", "dense", "fd", "auto")
EXACT = ("forward-over-reverse", "reverse-over-forward", "reverse-over-reverse", "dense")


# --- an independent reference ------------------------------------------------------------
def ref_leaves(tree):
    """Depth-first leaves, dict entries in insertion order (the documented layout)."""
    if isinstance(tree, dict):
        return [x for k in tree for x in ref_leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for c in tree for x in ref_leaves(c)]
    return [tree]


def ref_ravel(tree) -> np.ndarray:
    return np.concatenate([np.reshape(to_numpy(x), -1) for x in ref_leaves(tree)])


def ref_unravel(flat, like):
    """Rebuild ``like``'s structure from ``flat`` (any framework, sliced in layout order)."""
    pos = [0]

    def build(t):
        if isinstance(t, dict):
            return {k: build(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(build(c) for c in t)
        shape = np.shape(t)
        n = math.prod(shape)
        out = flat[pos[0] : pos[0] + n].reshape(shape)
        pos[0] += n
        return out

    return build(like)


_REF_CACHE: dict[str, np.ndarray] = {}


def reference(case: LossCase) -> np.ndarray:
    """The dense float64 Hessian of ``case``, computed without hessop."""
    if case.dense is not None:
        return case.dense()
    if case.name in _REF_CACHE:
        return _REF_CACHE[case.name]
    w0 = ref_ravel(case.params)
    if has_framework("torch"):
        import torch

        args = to_native("torch", case.args)
        H = torch.autograd.functional.hessian(
            lambda w: case.f(ref_unravel(w, case.params), *args), torch.as_tensor(w0)
        )
    else:
        import jax
        import jax.numpy as jnp

        args = to_native("jax", case.args)
        H = jax.jit(jax.hessian(lambda w, *a: case.f(ref_unravel(w, case.params), *a)))(
            jnp.asarray(w0), *args
        )
    _REF_CACHE[case.name] = to_numpy(H)
    return _REF_CACHE[case.name]


def close(actual, desired, rtol):
    """assert_allclose with an absolute floor at rtol times the largest entry."""
    actual, desired = to_numpy(actual), np.asarray(desired)
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale)


def build(case: LossCase, backend: str, mode: str = "auto", dtype: str = "float64", **kw):
    return build_operator(case.name, backend, mode, dtype, **kw)


def shared(case: LossCase, backend: str, mode: str, dtype: str = "float64", **kw):
    return shared_operator(case.name, backend, mode, dtype, **kw)


def test_closed_form_reference_is_right():
    # Guard the hand-written references themselves against the AD reference.
    pytest.importorskip("torch")
    for name in ("quadcubic", "logistic"):
        case = LOSSES[name]()
        np.testing.assert_allclose(
            case.dense(), reference(LossCase(name + "_ad", case.f, case.params, case.args)), 1e-12
        )


# --- parity matrix -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_parity_float64(loss_case, backend, mode):
    # cache=False here; the cached path has its own tests below. V is square so that every
    # product (and to_dense) reuses one compiled matmat: k != d columns are tested below.
    H = shared(loss_case, backend, mode, cache=False if mode != "auto" else None)
    ref = reference(loss_case)
    d = ref.shape[0]
    rtol = 1e-5 if mode == "fd" else 1e-10

    assert isinstance(H, hessop.HessianOperator)
    assert H.backend == backend and H.shape == (d, d)
    assert H.T is H
    assert H.dtype == to_native(backend, np.zeros(1)).dtype
    if mode == "auto":  # resolved to an exact mode, and H.mode says which
        assert H.mode in EXACT and H.mode != "dense"
    else:
        assert H.mode == {"fd": "finite-difference", "dense": "dense"}.get(
            mode, {"fwd-rev": EXACT[0], "rev-fwd": EXACT[1], "rev-rev": EXACT[2]}.get(mode)
        )

    rng = np.random.default_rng(0)
    v = rng.standard_normal(d)
    vn = to_native(backend, v)
    out = H @ vn
    assert type(out) is type(vn) and tuple(out.shape) == (d,)
    close(out, ref @ v, rtol)
    close(H.matvec(vn), ref @ v, rtol)
    close(H.rmatvec(vn), ref.T @ v, rtol)
    close(vn @ H, v @ ref, rtol)
    if mode == "auto":
        return  # the same code as the mode it resolved to, which is tested in full
    V = rng.standard_normal((d, d))
    Vn = to_native(backend, V)
    close(H.to_dense(), ref, rtol)
    close(H.matmat(Vn), ref @ V, rtol)
    close(H @ Vn, ref @ V, rtol)
    close(H.xp.permute_dims(Vn, (1, 0)) @ H, V.T @ ref, rtol)


@pytest.mark.parametrize("mode", MODES[:-1])
def test_matmat_k_columns(backend, mode):
    case = LOSSES["pytree"]()
    H = shared(case, backend, mode, cache=False)
    ref = reference(case)
    V = np.random.default_rng(7).standard_normal((ref.shape[0], 3))
    Vn = to_native(backend, V)
    rtol = 1e-5 if mode == "fd" else 1e-10
    out = H @ Vn
    assert tuple(out.shape) == (ref.shape[0], 3)
    close(out, ref @ V, rtol)
    close(H.xp.permute_dims(Vn, (1, 0)) @ H, V.T @ ref, rtol)


@pytest.mark.parametrize("mode", MODES[:-1])
def test_parity_float32(backend, mode):
    case = LOSSES["pytree"]()
    H = shared(case, backend, mode, dtype="float32", cache=False)
    ref = reference(case)
    # Central differences in float32 lose about eps^(2/3) ~ 1e-5 relative, times curvature.
    rtol = 2e-3 if mode == "fd" else 1e-4
    V = np.random.default_rng(1).standard_normal(ref.shape)
    HV = H @ to_native(backend, V, "float32")
    dense = H.to_dense()
    assert "float32" in str(H.dtype)
    for x in (HV, dense):
        assert "float32" in str(x.dtype)
    close(dense, ref, rtol)
    close(HV, ref @ V, rtol)


def test_numpy_params_with_backend(backend):
    w, X, y = logistic_data()
    H = hessop.hessian(logistic_f, w, X, y, backend=backend)
    assert H.backend == backend and H._bk.owns(H.params)
    v = np.arange(4.0)
    close(H @ H.ravel(v), logistic_dense(w, X) @ v, 1e-10)


def test_mode_aliases(backend):
    case = LOSSES["quadcubic"]()
    for alias, name in [
        ("fwd-rev", "forward-over-reverse"),
        ("rev-fwd", "reverse-over-forward"),
        ("rev-rev", "reverse-over-reverse"),
        ("fd", "finite-difference"),
        ("dense", "dense"),
    ]:
        assert build(case, backend, alias).mode == name
        assert build(case, backend, name).mode == name
    H = shared(case, backend, "auto")
    assert repr(H).endswith(f"mode={H.mode!r}>")


def test_chunked_matmat_and_to_dense(backend):
    case = LOSSES["pytree"]()
    ref = reference(case)
    H = build(case, backend, "rev-rev", chunk_size=4)
    V = np.random.default_rng(2).standard_normal((ref.shape[0], 8))
    close(H @ to_native(backend, V), ref @ V, 1e-10)
    close(H.to_dense(chunk_size=4), ref, 1e-10)  # 11 columns: chunks of 4, 4 and 3


def test_gradient_and_params(backend):
    w, X, y = logistic_data()
    H = shared(LOSSES["logistic"](), backend, "auto")
    z = X @ w
    s = 1 / (1 + np.exp(-z))
    g = X.T @ (s - y) / len(y) + 0.1 * w
    loss = np.mean(np.log1p(np.exp(-z)) + (1 - y) * z) + 0.05 * w @ w
    value, grad = H.loss_and_gradient()
    close(grad, g, 1e-12)
    close(H.gradient(), g, 1e-12)
    assert abs(float(value) - loss) < 1e-12
    close(H.params, w, 0)


# --- torch vs JAX ------------------------------------------------------------------------
both = pytest.mark.skipif(
    not (has_framework("torch") and has_framework("jax")), reason="needs torch and jax"
)


@both
def test_torch_and_jax_agree(loss_case):
    Ht, Hj = shared(loss_case, "torch", "auto"), shared(loss_case, "jax", "auto")
    d = Ht.shape[0]
    assert Hj.shape == (d, d)
    v = np.random.default_rng(3).standard_normal(d)
    close(Ht @ to_native("torch", v), to_numpy(Hj @ to_native("jax", v)), 1e-12)
    tree = loss_case.params
    close(Ht.ravel(tree), to_numpy(Hj.ravel(tree)), 0)
    close(Ht.ravel(tree), ref_ravel(tree), 0)
    for H in (Ht, Hj):
        back = H.unravel(H.ravel(tree))
        assert [np.shape(x) for x in ref_leaves(back)] == [np.shape(x) for x in ref_leaves(tree)]
        close(ref_ravel(back), ref_ravel(tree), 0)
        if isinstance(tree, (dict, list, tuple)):
            assert type(back) is type(tree)


@both
def test_dict_insertion_order_not_sorted():
    import jax.flatten_util

    tree = {"b": np.array([1.0, 2.0]), "a": np.array([3.0])}
    f = lambda p: (p["b"] ** 2).sum() * (p["a"] ** 3).sum()  # noqa: E731
    for backend in ("torch", "jax"):
        H = hessop.hessian(f, to_native(backend, tree))
        close(H.ravel(tree), [1.0, 2.0, 3.0], 0)  # "b" first: insertion order
        assert list(H.unravel(H.ravel(tree))) == ["b", "a"]
    # JAX's own ravel sorts keys ("a" first): hessop differs on purpose, so that the
    # layout follows model.named_parameters() in every framework.
    flat, _ = jax.flatten_util.ravel_pytree(to_native("jax", tree))
    close(flat, [3.0, 1.0, 2.0], 0)


def test_ravel_unravel_leaf_types(backend):
    case = LOSSES["pytree"]()
    H = shared(case, backend, "auto")
    tree = to_native(backend, case.params)
    back = H.unravel(H.ravel(tree))
    assert list(back) == ["b", "a"] and isinstance(back["b"], list)
    assert tuple(back["b"][1].shape) == () and tuple(back["b"][0].shape) == (2, 3)
    assert all(H._bk.owns(x) for x in ref_leaves(back))


# --- data= ---------------------------------------------------------------------------------
def _batches(backend, X, y, sizes=(4, 4, 2), as_dict=False):
    out, start = [], 0
    for n in sizes:
        Xb, yb = to_native(backend, (X[start : start + n], y[start : start + n]))
        out.append({"X": Xb, "y": yb} if as_dict else (Xb, yb))
        start += n
    return out


@pytest.mark.parametrize("mode", ["auto", "dense"])
def test_data_mean_of_uneven_batches(backend, mode):
    w, X, y = logistic_data(n=10)
    H = hessop.hessian(logistic_f, to_native(backend, w), data=_batches(backend, X, y), mode=mode)
    ref = logistic_dense(w, X)  # the full-batch Hessian
    # An unweighted mean of the batch Hessians would differ: the sizes matter here.
    parts = [logistic_dense(w, X[s]) for s in (slice(0, 4), slice(4, 8), slice(8, 10))]
    assert not np.allclose(sum(parts) / 3, ref, atol=1e-6)
    close(H.to_dense(), ref, 1e-10)
    V = np.random.default_rng(8).standard_normal((4, 4))
    close(H @ to_native(backend, V), ref @ V, 1e-10)


def test_data_gradient_is_the_full_batch_gradient(backend):
    w, X, y = logistic_data(n=10)
    H = hessop.hessian(logistic_f, to_native(backend, w), data=_batches(backend, X, y))
    full = shared(LOSSES["logistic"](), backend, "auto")
    value, grad = H.loss_and_gradient()
    full_value, full_grad = full.loss_and_gradient()
    close(grad, to_numpy(full_grad), 1e-12)
    close(value, to_numpy(full_value), 1e-12)


def test_data_sum_of_uneven_batches(backend):
    w, X, y = logistic_data(n=10)

    def f_sum(w, X, y):
        xp = __import__("array_api_compat").array_namespace(X)
        z = X @ w
        return xp.sum(xp.log(1 + xp.exp(-z)) + (1 - y) * z)

    H = hessop.hessian(f_sum, to_native(backend, w), data=_batches(backend, X, y), reduction="sum")
    close(H.to_dense(), len(y) * (logistic_dense(w, X) - 0.1 * np.eye(4)), 1e-10)


def test_data_batch_size_override(backend):
    w, X, y = logistic_data(n=10)
    # Every batch weighted 1: the plain mean of the three batch Hessians.
    H = hessop.hessian(
        logistic_f, to_native(backend, w), data=_batches(backend, X, y), batch_size=lambda a: 1
    )
    parts = [logistic_dense(w, X[s]) for s in (slice(0, 4), slice(4, 8), slice(8, 10))]
    close(H.to_dense(), sum(parts) / 3, 1e-10)


def test_data_dict_batches_and_dict_params(backend):
    w, X, y = logistic_data(n=10)

    def f(p, batch):
        return logistic_f(p["w"], batch["X"], batch["y"])

    H = hessop.hessian(f, {"w": to_native(backend, w)}, data=_batches(backend, X, y, as_dict=True))
    close(H.to_dense(), logistic_dense(w, X), 1e-10)


def test_data_numpy_batches(backend):
    w, X, y = logistic_data(n=10)
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    H = hessop.hessian(logistic_f, w, data=data, backend=backend)
    close(H.to_dense(), logistic_dense(w, X), 1e-10)


def test_data_refuses_generators_and_empty(backend):
    w, X, y = logistic_data()
    wn = to_native(backend, w)
    gen = (b for b in _batches(backend, X, y))
    with pytest.raises(TypeError, match="re-iterable"):
        hessop.hessian(logistic_f, wn, data=gen)
    with pytest.raises(hessop.EmptyDataError, match="at least one batch"):
        hessop.hessian(logistic_f, wn, data=[])


def test_data_dataloader():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    w, X, y = logistic_data(n=10)
    loader = DataLoader(TensorDataset(torch.as_tensor(X), torch.as_tensor(y)), batch_size=4)
    assert [len(b[0]) for b in loader] == [4, 4, 2]
    H = hessop.hessian(logistic_f, torch.as_tensor(w), data=loader)
    close(H.to_dense(), logistic_dense(w, X), 1e-10)
    v = np.ones(4)
    close(H @ torch.as_tensor(v), logistic_dense(w, X) @ v, 1e-10)


# --- caching -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev", "dense"])
def test_cache_on_and_off_agree(backend, mode):
    case = LOSSES["logistic"]()
    ref = reference(case)
    cached = build(case, backend, mode, cache=True)
    uncached = shared(case, backend, mode, cache=False)
    rng = np.random.default_rng(5)
    # Different vectors in a row: a stale cache would repeat (or mix in) an earlier answer.
    for v in [rng.standard_normal(4) for _ in range(3)]:
        vn = to_native(backend, v)
        a, b = cached @ vn, uncached @ vn
        close(a, ref @ v, 1e-10)
        close(a, to_numpy(b), 1e-12)
    V = rng.standard_normal((4, 4))
    close(cached @ to_native(backend, V), ref @ V, 1e-10)
    close(cached @ to_native(backend, v), ref @ v, 1e-10)


def test_torch_kept_graph_from_the_second_product():
    # A one-off product keeps no graph alive; from the second product on, the operator
    # differentiates one kept graph. Every product is exact either way.
    pytest.importorskip("torch")
    w, X, y = logistic_data()
    ref = logistic_dense(w, X)
    H = hessop.hessian(logistic_f, *to_native("torch", (w, X, y)))
    assert H.cache and H.mode == "reverse-over-reverse"
    rng = np.random.default_rng(3)
    for i in range(3):
        v = rng.standard_normal(4)
        close(H @ to_native("torch", v), ref @ v, 1e-10)
        assert (H._linearization is None) == (i == 0)
    V = rng.standard_normal((4, 3))
    close(H @ to_native("torch", V), ref @ V, 1e-10)
    H2 = hessop.hessian(logistic_f, *to_native("torch", (w, X, y)))
    close(H2 @ to_native("torch", V), ref @ V, 1e-10)  # a matmat first: columns 2.. kept
    assert H2._linearization is not None


def test_torch_one_off_product_writes_every_block():
    # The one-off reverse-over-reverse product writes each leaf's result into the flat
    # output as autograd computes it: a leaf used twice (its contributions summed first),
    # a leaf the loss is linear in (no gradient graph) and a leaf the second pass never
    # reaches (its block must be zero, not whatever the buffer held).
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    M = torch.as_tensor(rng.standard_normal((3, 3)))
    x = torch.as_tensor(rng.standard_normal(2))

    def f(p, M, x):
        a, b, c, z = p["a"], p["b"], p["c"], p["z"]
        return (
            (torch.tanh(M @ a) * a).sum()
            + (b * a[:2]).sum() ** 2
            + (c * x).sum()
            + (z * x.sum()).sum()
        )

    point = {k[0]: torch.as_tensor(rng.standard_normal(int(k[1]))) for k in "a3 b2 c2 z1".split()}
    flat = torch.cat(list(point.values()))

    def flat_f(w):
        return f(dict(zip(point, torch.split(w, [3, 2, 2, 1]))), M, x)

    dense = torch.func.hessian(flat_f)(flat).numpy()
    for _ in range(2):  # each a fresh operator's one-off product, in a reused buffer pool
        H = hessop.hessian(f, point, M, x, mode="rev-rev")
        v = rng.standard_normal(8)
        close(H @ torch.as_tensor(v), dense @ v, 1e-12)
        close(H @ torch.as_tensor(v), dense @ v, 1e-12)  # through the kept graph
    # The blocks the pass never reaches are zeroed, not left as the buffer held them.
    kernel, v = H._kernel, torch.as_tensor(v)
    out = kernel.backward(kernel.gradient_graph(H._point, (M, x)), v, False, False, v * np.nan)
    close(out, dense @ v.numpy(), 1e-12)


@pytest.mark.parametrize(
    "mode, cache",
    [("fwd-rev", True), ("rev-rev", True), ("fwd-rev", False), ("rev-fwd", None), ("fd", None)],
)
def test_jax_no_retrace_between_products(mode, cache):
    pytest.importorskip("jax")
    case = LOSSES["logistic"]()
    traces = [0]

    def f(w, X, y):
        traces[0] += 1  # a Python side effect runs only while JAX traces
        return case.f(w, X, y)

    H = hessop.hessian(f, *to_native("jax", (case.params, *case.args)), mode=mode, cache=cache)
    assert traces[0] == 0  # nothing is traced before the first product
    rng = np.random.default_rng(6)
    H @ to_native("jax", rng.standard_normal(4))
    assert traces[0] > 0
    # A cached operator makes its first product plainly and builds the linear map with the
    # second one (which traces once more); from then on nothing is traced again.
    H @ to_native("jax", rng.standard_normal(4))
    warm = traces[0]
    for _ in range(3):
        H @ to_native("jax", rng.standard_normal(4))
    assert traces[0] == warm


def test_jax_batches_of_equal_shape_share_compilation():
    pytest.importorskip("jax")
    w, X, y = logistic_data(n=12)
    traces = [0]

    def f(w, X, y):
        traces[0] += 1
        return logistic_f(w, X, y)

    H = hessop.hessian(f, to_native("jax", w), data=_batches("jax", X, y, sizes=(4, 4, 4)))
    H @ to_native("jax", np.ones(4))
    first = traces[0]
    H @ to_native("jax", np.ones(4))
    assert traces[0] == first


# --- no side effects -----------------------------------------------------------------------
def _rng_states():
    import random

    states = [random.getstate(), np.random.get_state()]
    if has_framework("torch"):
        import torch

        states.append(torch.get_rng_state())
    return states


def _same_rng_states(before, after) -> bool:
    py, (kind, keys, pos, gauss, cached), *rest = before
    py2, (kind2, keys2, pos2, gauss2, cached2), *rest2 = after
    return (
        py == py2
        and (kind, pos, gauss, cached) == (kind2, pos2, gauss2, cached2)
        and np.array_equal(keys, keys2)
        and all(bool((a == b).all()) for a, b in zip(rest, rest2))
    )


def _exercise(H, params):
    d = H.shape[0]
    v = H.ravel(params)
    H @ v
    H @ H.xp.stack([v, 2 * v], axis=1)
    v @ H
    H.to_dense()
    H.loss_and_gradient()
    H.unravel(v)
    H.to_scipy() @ np.ones(d)


@pytest.mark.parametrize("mode", MODES)
def test_no_side_effects_torch(mode):
    torch = pytest.importorskip("torch")
    case = LOSSES["pytree"]()
    params = to_native("torch", case.params)
    leaves = [x.requires_grad_(True) for x in ref_leaves(params)]
    before = [x.detach().clone() for x in leaves]
    rng = _rng_states()
    grad_enabled = torch.is_grad_enabled()

    H = hessop.hessian(case.f, params, *to_native("torch", case.args), mode=mode)
    _exercise(H, params)

    assert _same_rng_states(rng, _rng_states())
    assert torch.is_grad_enabled() == grad_enabled
    for x, b in zip(leaves, before):
        assert torch.equal(x.detach(), b) and x.dtype == b.dtype  # bit-identical values
        assert x.grad is None and x.requires_grad and x.is_leaf


def test_no_side_effects_jax():
    pytest.importorskip("jax")
    case = LOSSES["pytree"]()
    params = to_native("jax", case.params)
    before = [np.array(x, copy=True) for x in ref_leaves(params)]
    rng = _rng_states()
    H = hessop.hessian(case.f, params, *to_native("jax", case.args))
    _exercise(H, params)
    assert _same_rng_states(rng, _rng_states())
    for x, b in zip(ref_leaves(params), before):
        assert np.asarray(x).tobytes() == b.tobytes()


def test_no_side_effects_with_grad_disabled():
    torch = pytest.importorskip("torch")
    w, X, y = (torch.as_tensor(a) for a in logistic_data())
    w.requires_grad_(True)
    with torch.no_grad():  # hessop enables gradients inside, and restores the setting
        H = hessop.hessian(logistic_f, w, X, y)
        close(H.to_dense(), logistic_dense(*logistic_data()[:2]), 1e-10)
        assert not torch.is_grad_enabled()
    assert w.grad is None


@pytest.mark.parametrize("mode", ["auto", "fwd-rev", "fd"])
def test_operator_keeps_its_point_when_params_change_in_place(backend, mode):
    # An edit of the numpy array the params came from after hessian() must not move the
    # operator (it copied them); a torch operator references the caller's tensors and
    # refuses to go on after they change in place (an optimizer step): never a mixed point.
    w, X, y = logistic_data()
    ref = logistic_dense(w, X)
    rtol = 1e-5 if mode == "fd" else 1e-10
    w_np = w.copy()
    H_np = hessop.hessian(logistic_f, w_np, X, y, backend=backend, mode=mode)
    w_np += 1.0
    close(H_np @ H_np.ravel(np.ones(4)), ref @ np.ones(4), rtol)
    if backend == "torch":
        import torch

        wt = torch.tensor(w, requires_grad=True)
        args = to_native("torch", (X, y))
        H = hessop.hessian(logistic_f, wt, *args, mode=mode)
        kept = hessop.hessian(logistic_f, wt.detach().clone(), *args, mode=mode)
        v = torch.ones(4, dtype=torch.float64)
        close(H @ v, ref @ np.ones(4), rtol)
        with torch.no_grad():
            wt.add_(1.0)
        for use in (lambda: H @ v, lambda: H @ v[:, None], H.gradient, lambda: H.params):
            with pytest.raises(hessop.StaleOperatorError, match="changed in place"):
                use()
        close(kept @ v, ref @ np.ones(4), rtol)
        close(kept.params, w, 0)
        close(hessop.hessian(logistic_f, wt, *args, mode=mode).params, w + 1.0, 0)


def _cuda() -> bool:
    if not has_framework("torch"):
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_torch_default_device_is_indexed_cuda():
    # numpy params go to the default accelerator; "cuda" must compare equal to the
    # "cuda:0" that tensors report, or every product would raise a DeviceError.
    import torch

    w, X, y = logistic_data()
    H = hessop.hessian(logistic_f, w, X, y, backend="torch")
    assert H.device.type == "cuda" and H.device.index is not None
    v = torch.ones(4, dtype=torch.float64, device="cuda")
    close(H @ v, logistic_dense(w, X) @ np.ones(4), 1e-10)
    H = hessop.hessian(logistic_f, w, X, y, backend="torch", device="cuda")
    close(H @ v, logistic_dense(w, X) @ np.ones(4), 1e-10)

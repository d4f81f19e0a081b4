"""The snapshot contract and the silent-wrong-answer cases of issue "Trust": every case gives
the right numbers or a named hessop error, in both backends where it applies.

References are dense Hessians computed here (closed forms or the other framework's plain
autodiff), never hessop's own products.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

import hessop
from conftest import backend_params, to_native, to_numpy

backends = pytest.mark.parametrize("backend", backend_params())
EXACT_MODES = ("fwd-rev", "rev-fwd", "rev-rev", "dense", "fd")


def quad_loss(w, A):
    """0.5 w^T A w + sum(w^4)/4: Hessian A + diag(3 w^2)."""
    return 0.5 * w @ A @ w + (w**4).sum() / 4


def quad_hessian(w, A):
    return A + np.diag(3 * w**2)


def sym(n, seed=0):
    M = np.random.default_rng(seed).standard_normal((n, n))
    return M + M.T


def dense(H):
    return to_numpy(H.to_dense())


# --- 1. a new operator reads the current values of everything its loss reads -------------
def closure_loss(backend):
    """A loss reading a global array and a closed-over one, in a fresh namespace."""
    xp_name = "torch" if backend == "torch" else "jax.numpy"
    ns = {"xp": __import__(xp_name, fromlist=["_"]), "SCALE": 1.0}
    ns["G"] = to_native(backend, np.diag([1.0, 2.0, 3.0]))
    code = (
        "def make(C):\n"
        "    def f(w):\n"
        "        return SCALE * (w @ G @ w) + (w * C * w).sum()\n"
        "    return f\n"
    )
    exec(code, ns)  # noqa: S102 - a module-like namespace the test can rebind
    return ns


@backends
def test_new_operator_reads_rebound_globals_and_closures(backend):
    ns = closure_loss(backend)
    C = to_native(backend, np.ones(3))
    f = ns["make"](C)
    w = to_native(backend, np.array([0.5, -1.0, 2.0]))
    np.testing.assert_allclose(dense(hessop.hessian(f, w)), 2 * np.diag([2.0, 3.0, 4.0]))
    ns["G"] = to_native(backend, np.diag([10.0, 20.0, 30.0]))  # rebind the global array
    np.testing.assert_allclose(dense(hessop.hessian(f, w)), 2 * np.diag([11.0, 21.0, 31.0]))
    ns["SCALE"] = 2.0  # a global number
    np.testing.assert_allclose(dense(hessop.hessian(f, w)), 2 * np.diag([21.0, 41.0, 61.0]))
    g = ns["make"](to_native(backend, 3 * np.ones(3)))  # the same code, another closure
    np.testing.assert_allclose(dense(hessop.hessian(g, w)), 2 * np.diag([23.0, 43.0, 63.0]))


def test_jax_numpy_closure_changed_in_place():
    jnp = pytest.importorskip("jax.numpy")
    B = np.diag([1.0, 2.0])

    def f(w):
        return w @ jnp.asarray(B) @ w

    w = jnp.array([1.0, 1.0])
    H1 = hessop.hessian(f, w)
    np.testing.assert_allclose(dense(H1), 2 * B)
    B[0, 0] = 5.0
    np.testing.assert_allclose(dense(hessop.hessian(f, w)), 2 * B)  # a new operator: new B
    with pytest.raises(hessop.StaleOperatorError, match="closed-over 'B' was changed in place"):
        H1 @ jnp.ones(2)  # the old one no longer holds its state


def test_jax_operators_share_compilations_when_nothing_changed():
    jnp = pytest.importorskip("jax.numpy")
    traces = []

    def f(w, X):
        traces.append(1)  # runs only when JAX traces
        return jnp.sum(jnp.tanh(X @ w) ** 2)

    X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)))
    counts = []
    for i in range(4):  # a Newton loop: a new operator at each point, same data shapes
        H = hessop.hessian(f, jnp.full(3, 0.1 * i), X)
        H @ jnp.ones(3)
        counts.append(len(traces))
    # the first operator traces (its product, and once the loss alone to read off that it
    # depends on the point); later operators reuse all of it
    assert counts[0] <= 2 and counts[1:] == counts[:1] * 3


@backends
def test_existing_operator_raises_after_a_global_is_rebound(backend):
    ns = closure_loss(backend)
    f = ns["make"](to_native(backend, np.ones(3)))
    w = to_native(backend, np.array([0.5, -1.0, 2.0]))
    H = hessop.hessian(f, w)
    H @ to_native(backend, np.ones(3))
    ns["G"] = to_native(backend, np.eye(3))
    with pytest.raises(hessop.StaleOperatorError, match="global 'G' is bound to another"):
        H @ to_native(backend, np.ones(3))
    ns["G"] = ns["G"] * 1  # still another object
    with pytest.raises(hessop.StaleOperatorError):
        H.gradient()


def test_loss_that_counts_its_calls_is_not_stale():
    torch = pytest.importorskip("torch")
    calls = {"n": 0}
    count = 0

    def f(w):
        nonlocal count
        count += 1
        calls["n"] += 1
        return (w**4).sum()

    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    H = hessop.hessian(f, w)
    for _ in range(3):
        torch.testing.assert_close(H @ torch.ones(2, dtype=torch.float64), 12 * w**2)
    assert count == calls["n"] >= 2  # the third product reuses the kept graph


# --- 2. model state read per product --------------------------------------------------------
def test_batchnorm_model_switched_to_eval_is_stale():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    H = hessop.model_hessian(model, nn.CrossEntropyLoss(), (x, y))
    v = torch.ones(H.shape[0], dtype=torch.float64)
    H @ v
    H @ v  # the cached graph exists now
    model.eval()
    with pytest.raises(hessop.StaleOperatorError, match="train/eval mode"):
        H @ v
    model.train()
    H @ v  # back in the mode it was built in: fine again
    assert model.training


def test_dropout_switched_on_after_construction_is_stale():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().eval()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    H = hessop.model_hessian(model, nn.CrossEntropyLoss(), (x, y))
    model.train()
    with pytest.raises(hessop.StaleOperatorError, match="train/eval mode"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


# --- 3. the point changed in place, by every path ---------------------------------------------
@pytest.mark.parametrize("mode", EXACT_MODES)
@pytest.mark.parametrize("how", ["data_mul", "optimizer", "numpy_buffer"])
def test_point_changed_in_place_raises(mode, how):
    torch = pytest.importorskip("torch")
    A = torch.as_tensor(sym(3))
    buf = np.array([0.5, -1.0, 2.0])
    w = torch.from_numpy(buf) if how == "numpy_buffer" else torch.tensor(buf, requires_grad=True)
    H = hessop.hessian(quad_loss, w, A, mode=mode)
    v = torch.ones(3, dtype=torch.float64)
    H @ v
    H @ v
    if how == "data_mul":
        w.data.mul_(2.0)  # invisible to the version counter
    elif how == "optimizer":
        w.grad = torch.ones_like(w)
        torch.optim.SGD([w], lr=0.1).step()
    else:
        buf[0] = 7.0  # a numpy write into the memory behind torch.from_numpy
    for use in (lambda: H @ v, H.gradient, lambda: H.params, lambda: H @ torch.eye(3).double()):
        with pytest.raises(hessop.StaleOperatorError, match="changed in place"):
            use()


@pytest.mark.parametrize("cache", [True, False])
def test_model_parameters_changed_after_model_hessian(cache):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    for select in (None, ["2.weight"]):  # the point itself, or a parameter held fixed
        H = hessop.model_hessian(model, nn.CrossEntropyLoss(), (x, y), cache=cache, params=select)
        v = torch.ones(H.shape[0], dtype=torch.float64)
        H @ v
        H @ v
        with torch.no_grad():
            model[0].weight.data.add_(0.1)
        with pytest.raises(hessop.StaleOperatorError, match="changed in place"):
            H @ v


def test_a_copy_keeps_the_old_point():
    torch = pytest.importorskip("torch")
    A = torch.as_tensor(sym(3))
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    H = hessop.hessian(quad_loss, w.clone(), A)
    w.mul_(2)
    np.testing.assert_allclose(dense(H), quad_hessian(np.array([0.5, -1.0, 2.0]), sym(3)))


def test_torch_argument_changed_in_place_raises():
    torch = pytest.importorskip("torch")
    A = torch.as_tensor(sym(3))
    H = hessop.hessian(quad_loss, torch.ones(3, dtype=torch.float64), A)
    A.data[0, 0] += 1.0
    with pytest.raises(hessop.StaleOperatorError, match="array 0 of the arguments"):
        H @ torch.ones(3, dtype=torch.float64)


# --- 4. threads ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "fwd-rev", "rev-fwd", "dense"])
def test_torch_products_from_threads_are_right_and_leave_settings(mode):
    torch = pytest.importorskip("torch")
    A = torch.as_tensor(sym(12))
    w = torch.as_tensor(np.random.default_rng(1).standard_normal(12))
    ref = quad_hessian(w.numpy(), A.numpy())
    H = hessop.hessian(quad_loss, w, A, mode=mode)
    cuda = torch.backends.cuda
    before = (
        torch.backends.mha.get_fastpath_enabled(),
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
    )
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(15):
                v = rng.standard_normal(12)
                np.testing.assert_allclose(to_numpy(H @ torch.as_tensor(v)), ref @ v, rtol=1e-10)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    after = (
        torch.backends.mha.get_fastpath_enabled(),
        cuda.flash_sdp_enabled(),
        cuda.mem_efficient_sdp_enabled(),
        cuda.math_sdp_enabled(),
        cuda.cudnn_sdp_enabled(),
    )
    assert after == before


# --- 7. losses that do not mean what the user thinks -----------------------------------------
def test_model_hessian_reads_the_loss_reduction():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(2)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    ref = hessop.model_hessian(model, nn.CrossEntropyLoss(reduction="sum"), (x, y)).to_dense()
    H = hessop.model_hessian(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    torch.testing.assert_close(H.to_dense(), ref)  # the dataset's summed loss, not ~50% off
    F = hessop.model_fisher(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    G = F.per_sample_gradients(x, y)
    torch.testing.assert_close(F.to_dense(), G.T @ G)  # the Fisher of the summed loss
    with pytest.raises(ValueError, match="reduction='sum'.*reduction='mean' was passed"):
        hessop.model_hessian(model, nn.CrossEntropyLoss(reduction="sum"), batches, reduction="mean")
    with pytest.raises(hessop.LossError, match="reduction='none'"):
        hessop.model_hessian(model, nn.CrossEntropyLoss(reduction="none"), (x, y))


@backends
def test_a_loss_that_ignores_the_params_is_an_error(backend):
    W = to_native(backend, np.array([1.0, 2.0]))

    def ignores(p):
        return (W**2).sum()  # reads its own weights, not the params hessop passes

    w0 = to_native(backend, np.zeros(2))
    for mode in ("auto", "fwd-rev", "rev-fwd", "rev-rev", "fd", "dense"):
        H = hessop.hessian(ignores, w0, mode=mode)
        with pytest.raises(hessop.LossError, match="does not depend on the parameters"):
            H @ to_native(backend, np.ones(2))
        with pytest.raises(hessop.LossError, match="does not depend on the parameters"):
            hessop.hessian(ignores, w0, mode=mode).gradient()


@backends
def test_a_flat_loss_is_no_error(backend):
    # Linear in w: the Hessian is exactly zero, and that is the right answer.
    c = to_native(backend, np.array([1.0, -2.0]))
    H = hessop.hessian(lambda w: (c * w).sum(), to_native(backend, np.ones(2)))
    np.testing.assert_array_equal(dense(H), np.zeros((2, 2)))
    np.testing.assert_array_equal(to_numpy(H.gradient()), [1.0, -2.0])


def test_torch_closure_over_a_model_is_an_error():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(2, 1).double()
    x = torch.ones(4, 2, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    H = hessop.hessian(lambda *a: (model(x) ** 2).mean(), params)
    with pytest.raises(hessop.LossError, match="params it passes to f"):
        H @ torch.ones(3, dtype=torch.float64)


def test_random_loss_is_refused_or_fixed():
    torch = pytest.importorskip("torch")
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def noisy(p):
        return ((p + 0.1 * torch.randn(2, dtype=torch.float64)) ** 4).sum()

    state = torch.get_rng_state()
    H = hessop.hessian(noisy, w)
    with pytest.raises(hessop.RandomnessError, match="allow_randomness='fixed-seed'"):
        H @ torch.ones(2, dtype=torch.float64)
    assert torch.equal(state, torch.get_rng_state())
    Hf = hessop.hessian(noisy, w, allow_randomness="fixed-seed", seed=3)
    outs = [Hf @ torch.ones(2, dtype=torch.float64) for _ in range(3)]
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(3)
    shifted = w + 0.1 * torch.randn(2, dtype=torch.float64)
    torch.set_rng_state(state)
    for out in outs:  # every product sees the same draw: the one of seed 3
        torch.testing.assert_close(out, 12 * shifted**2)


def test_numpy_randomness_in_a_jax_loss_is_refused():
    jnp = pytest.importorskip("jax.numpy")
    state = np.random.get_state()[1].copy()

    def noisy(w):
        return jnp.sum((w + np.random.standard_normal(2)) ** 4)

    with pytest.raises(hessop.RandomnessError, match="numpy's"):
        hessop.hessian(noisy, jnp.ones(2)) @ jnp.ones(2)
    assert (np.random.get_state()[1] == state).all()


# --- 8. raw errors where the cause is the user's input ----------------------------------------
@backends
def test_python_number_losses(backend):
    w = to_native(backend, np.ones(2))
    with pytest.raises(hessop.LossError, match="returned a Python float"):
        hessop.hessian(lambda p: 1.5, w) @ w
    with pytest.raises(hessop.LossError, match=r"\.item\(\)|Python number|Python value"):
        hessop.hessian(lambda p: (p**2).sum() * float((p**2).sum()), w).gradient()


def test_item_in_a_torch_loss_in_every_mode():
    torch = pytest.importorskip("torch")
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for mode in ("auto", "fwd-rev", "rev-fwd", "dense", "fd"):
        H = hessop.hessian(lambda p: (p**2).sum() * p.sum().item(), w, mode=mode)
        with pytest.raises(hessop.LossError, match=r"item\(\)"):
            H @ torch.ones(2, dtype=torch.float64)


@backends
def test_zero_size_parameters(backend):
    with pytest.raises(hessop.ShapeError, match="no entries"):
        hessop.hessian(lambda p: p.sum(), to_native(backend, np.zeros(0)))
    # a zero-size leaf beside others is fine: it has no rows
    p = {"a": to_native(backend, np.zeros(0)), "b": to_native(backend, np.array([1.0, 2.0]))}
    H = hessop.hessian(lambda p: (p["b"] ** 3).sum() + p["a"].sum(), p)
    np.testing.assert_allclose(dense(H), np.diag([6.0, 12.0]))


@backends
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:3"])
def test_missing_accelerator(backend, device):
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    else:
        import jax

        if any(d.platform == "gpu" for d in jax.devices()):
            pytest.skip("this machine has a GPU")
    with pytest.raises(hessop.DeviceError, match="device="):
        hessop.hessian(lambda p: (p**2).sum(), np.ones(2), backend=backend, device=device)


@backends
def test_bad_batch_sizes_and_chunks(backend):
    X = np.ones((4, 2))
    data = [(X,), (X,)]
    for bad in (lambda a: 0, lambda a: -3):
        H = hessop.hessian(lambda w, X: ((X @ w) ** 2).mean(), np.ones(2), data=data,
                           backend=backend, batch_size=bad)  # fmt: skip
        with pytest.raises(ValueError, match="batch_size.*>= 1"):
            H @ to_native(backend, np.ones(2))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        hessop.hessian(lambda w: (w**2).sum(), np.ones(2), backend=backend, chunk_size=-1)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        hessop.per_sample_hessians(lambda x: (x**2).sum(), to_native(backend, X), chunk_size=0)


def test_function_namespace_helper_is_a_real_module_namespace():
    # guards the helper used above: rebinding in ns is what a module-level rebinding does
    ns = {"K": 1}
    exec("def f():\n    return K\n", ns)  # noqa: S102
    assert isinstance(ns["f"], types.FunctionType) and ns["f"]() == 1
    ns["K"] = 2
    assert ns["f"]() == 2

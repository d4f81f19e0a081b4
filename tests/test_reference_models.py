"""Reference models: torch and JAX compute the same numbers from the same weights."""

from __future__ import annotations

import functools
import io
import subprocess
import sys

import numpy as np
import pytest

from hessop.bench import reference as R  # needs neither framework

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from hessop.bench import reference_torch  # noqa: E402  (needs torch)

# Small sizes keep the module fast (XLA compile time dominates); the defaults are checked
# abstractly in test_default_configs.
SMALL = {
    "mlp": {"sizes": (12, 16, 16, 5)},
    "cnn": {"in_channels": 2, "image_size": 6, "channels": 4},
    "transformer": {"vocab_size": 11, "seq_len": 6, "d_model": 16, "num_heads": 2, "d_ff": 24},
}
# Every model with its default activation; the other activations on the MLP only, since all
# models share one activation table per framework.
CASES = [
    ("mlp", ()),
    ("cnn", ()),
    ("transformer", ()),
    ("mlp", (("activation", "gelu"),)),
    ("mlp", (("activation", "gelu_tanh"),)),
]
CASE_IDS = [name + "".join(f"-{v}" for _, v in extra) for name, extra in CASES]
BATCH = 5


@pytest.fixture(autouse=True)
def _x64():
    # Scoped rather than a global config update, so other test modules keep JAX's defaults.
    with jax.enable_x64(True):
        yield


def small(name: str, **extra) -> R.ReferenceSpec:
    return R.get_reference(name, **{**SMALL[name], **extra})


def flat_torch(tensors) -> np.ndarray:
    return np.concatenate([t.detach().numpy().ravel() for t in tensors])


def flat_jax(tree: dict, names: list[str]) -> np.ndarray:
    # Index by name: JAX transformations return dicts with sorted keys, not torch's order.
    return np.concatenate([np.asarray(tree[n]).ravel() for n in names])


# XLA's CPU compile dominates this module's run time; these options cut it 2-3x without
# changing the float64 results beyond rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    try:
        return jax.jit(fn, compiler_options=FAST_COMPILE)
    except TypeError:  # a JAX without per-jit compiler options
        return jax.jit(fn)


@functools.cache
def jax_loss_and_grad(spec: R.ReferenceSpec):
    """One jitted (loss, logits), grad per spec, shared by all tests to compile once."""

    def loss_with_logits(params, x, y):
        logits = spec.jax_apply(params, x)
        return spec.jax_loss(logits, y), logits

    return fast_jit(jax.value_and_grad(loss_with_logits, has_aux=True))


@functools.cache
def results(name: str, extra: tuple) -> dict:
    """Logits, loss, gradient and a Hessian-vector product of one case in both frameworks."""
    spec = small(name, **dict(extra))
    model = spec.torch_model(seed=0, dtype=torch.float64)
    params = spec.jax_params_from_torch(model)
    xt, yt = spec.make_batch(BATCH, seed=1, framework="torch", dtype=torch.float64)
    xj, yj = spec.make_batch(BATCH, seed=1, framework="jax", dtype=jnp.float64)
    names = [n for n, _ in model.named_parameters()]
    ps = list(model.parameters())

    logits_t = model(xt)
    loss_t = spec.torch_loss(logits_t, yt)
    grads_t = torch.autograd.grad(loss_t, ps, create_graph=True)
    rng = np.random.default_rng(7)
    v = {n: rng.standard_normal(p.shape) for n, p in zip(names, ps, strict=True)}
    norm = np.sqrt(sum(np.sum(a * a) for a in v.values()))
    v = {n: a / norm for n, a in v.items()}
    hv_t = torch.autograd.grad(grads_t, ps, [torch.from_numpy(v[n]) for n in names])

    fn = jax_loss_and_grad(spec)
    (loss_j, logits_j), grads_j = fn(params, xj, yj)
    # Central differences of JAX's gradient reuse the compiled gradient; compiling a JAX
    # HVP as well would double this module's run time.
    eps = 1e-4
    # Shift in numpy: eager JAX would compile one small kernel per parameter shape.
    p_np = {n: np.asarray(a) for n, a in params.items()}
    shifted = [
        fn({n: p_np[n] + sign * eps * v[n] for n in names}, xj, yj)[1] for sign in (1.0, -1.0)
    ]
    hv_fd = (flat_jax(shifted[0], names) - flat_jax(shifted[1], names)) / (2 * eps)
    return {
        "spec": spec,
        "logits": (logits_t.detach().numpy(), logits_j),
        "loss": (loss_t.item(), loss_j),
        "objective": float(spec.jax_objective(params, xj, yj)) if name == "mlp" else None,
        "grad": (flat_torch(grads_t), flat_jax(grads_j, names)),
        "hvp": (flat_torch(hv_t), hv_fd),
    }


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("name", "extra"), CASES, ids=CASE_IDS)
def test_forward_matches(name, extra):
    r = results(name, extra)
    out_t, out_j = r["logits"]
    assert out_j.dtype == jnp.float64
    assert out_t.shape == out_j.shape == (BATCH, r["spec"].num_classes)
    np.testing.assert_allclose(np.asarray(out_j), out_t, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(("name", "extra"), CASES, ids=CASE_IDS)
def test_loss_matches(name, extra):
    r = results(name, extra)
    loss_t, loss_j = r["loss"]
    np.testing.assert_allclose(float(loss_j), loss_t, rtol=1e-10)
    if r["objective"] is not None:  # eager JAX, checked on the cheap MLP only
        np.testing.assert_allclose(r["objective"], loss_t, rtol=1e-10)


@pytest.mark.parametrize(("name", "extra"), CASES, ids=CASE_IDS)
def test_gradient_matches(name, extra):
    g_t, g_j = results(name, extra)["grad"]
    assert g_t.size == results(name, extra)["spec"].num_params
    assert np.linalg.norm(g_t) > 0
    np.testing.assert_allclose(g_j, g_t, rtol=1e-10, atol=1e-13 * np.abs(g_t).max())


@pytest.mark.parametrize(("name", "extra"), CASES, ids=CASE_IDS)
def test_hessian_vector_product_matches(name, extra):
    # torch double backward against central differences of JAX gradients: second
    # derivatives of every op (GELU, softmax, LayerNorm, conv) agree to the FD error.
    hv_t, hv_fd = results(name, extra)["hvp"]
    assert np.linalg.norm(hv_t) > 0
    np.testing.assert_allclose(hv_fd, hv_t, rtol=0, atol=1e-7 * np.abs(hv_t).max())


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_float32_parity(name):
    spec = small(name)
    model = spec.torch_model(seed=0, dtype=torch.float32)
    params = spec.jax_params_from_torch(model)
    assert all(p.dtype == jnp.float32 for p in params.values())
    xt, _ = spec.make_batch(BATCH, framework="torch", dtype=torch.float32)
    xj, _ = spec.make_batch(BATCH, framework="jax", dtype="float32")
    with jax.default_matmul_precision("highest"):
        out_j = fast_jit(spec.jax_apply)(params, xj)
    assert out_j.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_j), model(xt).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", R.REFERENCE_MODELS)
def test_default_configs(name):
    # Full-size compilation is slow on CPU, so JAX is checked abstractly (eval_shape traces
    # the whole forward with the real shapes and dtypes, without running it).
    spec = R.get_reference(name)
    model = spec.torch_model(seed=3, dtype=torch.float64)
    params = spec.jax_params_from_torch(model)
    xt, _ = spec.make_batch(2, framework="torch", dtype=torch.float64)
    xj, _ = spec.make_batch(2, framework="jax", dtype="float64")
    out = jax.eval_shape(spec.jax_apply, params, xj)
    assert out.shape == tuple(model(xt).shape) == (2, spec.num_classes)
    assert out.dtype == jnp.float64


def test_defaults_are_the_documented_sizes():
    mlp = R.get_reference("mlp")
    assert mlp.config["sizes"] == (784, 512, 512, 10)
    assert mlp.input_shape == (784,) and mlp.num_classes == 10
    assert R.get_reference("cnn").input_shape == (3, 32, 32)
    tr = R.get_reference("transformer")
    assert tr.config["d_model"] == 64 and tr.config["num_heads"] == 4
    assert tr.config["num_layers"] == 2 and tr.config["d_ff"] == 256
    assert tr.input_shape == (32,) and tr.config["vocab_size"] == 100
    assert R.REFERENCE_MODELS == ("mlp", "cnn", "transformer")
    assert R.get_reference("mlp", sizes=[3, 4]).config["sizes"] == (3, 4)


def test_jit_matches_eager():
    spec = small("mlp")
    params = spec.jax_params(seed=0, dtype="float64")
    x, y = spec.make_batch(BATCH, framework="jax", dtype="float64")
    eager = spec.jax_objective(params, x, y)
    jitted = jax.jit(spec.jax_objective)(params, x, y)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-12)


# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", R.REFERENCE_MODELS)
def test_param_names_order_and_shapes(name):
    spec = small(name)
    model = spec.torch_model(seed=0, dtype=torch.float64)
    params = spec.jax_params_from_torch(model)
    torch_layout = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert [(n, a.shape) for n, a in params.items()] == torch_layout
    assert list(spec.param_shapes().items()) == torch_layout
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad and p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.parametrize("name", R.REFERENCE_MODELS)
def test_init_is_deterministic_and_framework_independent(name):
    spec = small(name)
    a = spec.torch_model(seed=4, dtype=torch.float64)
    b = spec.torch_model(seed=4, dtype=torch.float64)
    c = spec.torch_model(seed=5, dtype=torch.float64)
    fa, fb, fc = (flat_torch(m.parameters()) for m in (a, b, c))
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(fa, fc)

    # The same seed gives the same weights without going through torch.
    names = list(spec.param_shapes())
    np.testing.assert_array_equal(flat_jax(spec.jax_params(seed=4, dtype="float64"), names), fa)
    np.testing.assert_array_equal(flat_jax(spec.numpy_params(seed=4), names), fa)
    # float32 weights are the float64 draw rounded, in both frameworks.
    m32 = spec.torch_model(seed=4, dtype=torch.float32)
    p32 = spec.jax_params(seed=4, dtype=np.float32)
    np.testing.assert_array_equal(flat_jax(p32, names), flat_torch(m32.parameters()))


def test_torch_model_loads_given_params():
    spec = small("transformer")
    params = spec.jax_params(seed=9, dtype="float64")
    model = spec.torch_model(dtype=torch.float64, params=params)
    names = list(params)
    np.testing.assert_array_equal(flat_torch(model.parameters()), flat_jax(params, names))
    with pytest.raises(ValueError, match="missing"):
        spec.torch_model(params={k: v for k, v in params.items() if k != "head.bias"})


def test_weights_from_another_spec_are_rejected():
    model = small("mlp").torch_model(dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        R.get_reference("mlp", sizes=(12, 16, 8, 5)).jax_params_from_torch(model)
    with pytest.raises(ValueError, match="does not match"):
        small("cnn").jax_params_from_torch(model)


def test_global_rng_state_is_untouched():
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    for name in R.REFERENCE_MODELS:
        spec = small(name)
        spec.torch_model(seed=1)
        spec.torch_model(seed=1, dtype=torch.float64)
        for framework in ("numpy", "torch", "jax"):
            spec.make_batch(3, seed=2, framework=framework)
        spec.jax_params(seed=1)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)


def test_model_is_picklable():
    spec = small("transformer")
    model = spec.torch_model(seed=0, dtype=torch.float64)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is reference_torch.TorchTransformer
    x, _ = spec.make_batch(2, framework="torch")
    assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", R.REFERENCE_MODELS)
def test_make_batch_is_deterministic_and_framework_independent(name):
    spec = small(name)
    x_np, y_np = spec.make_batch(7, seed=3)
    x_t, y_t = spec.make_batch(7, seed=3, framework="torch", dtype=torch.float64)
    x_j, y_j = spec.make_batch(7, seed=3, framework="jax", dtype="float64")
    x_np2, _ = spec.make_batch(7, seed=3)
    x_other, _ = spec.make_batch(7, seed=4)

    assert x_np.shape == (7, *spec.input_shape) and y_np.shape == (7,)
    np.testing.assert_array_equal(x_np, x_np2)
    assert not np.array_equal(x_np, x_other)
    np.testing.assert_array_equal(x_t.numpy(), x_np)
    np.testing.assert_array_equal(np.asarray(x_j), x_np)
    np.testing.assert_array_equal(y_t.numpy(), y_np)
    np.testing.assert_array_equal(np.asarray(y_j), y_np)
    assert y_t.dtype == torch.int64
    assert 0 <= y_np.min() and y_np.max() < spec.num_classes
    if spec.integer_inputs:
        assert x_t.dtype == torch.int64
        assert 0 <= x_np.min() and x_np.max() < spec.config["vocab_size"]
    else:
        assert x_np.dtype == np.float64 and x_t.dtype == torch.float64
        assert x_j.dtype == jnp.float64


def test_make_batch_dtypes_and_defaults():
    spec = small("mlp")
    x, _ = spec.make_batch(2, framework="torch")
    assert x.dtype == torch.get_default_dtype()
    x, _ = spec.make_batch(2, framework="numpy", dtype=torch.float32)
    assert x.dtype == np.float32
    x, _ = spec.make_batch(framework="numpy")
    assert x.shape[0] == R.DEFAULT_BATCH_SIZES["mlp"]
    with jax.enable_x64(False):
        x, y = spec.make_batch(2, framework="jax")
        assert x.dtype == jnp.float32 and y.dtype == jnp.int32


# ---------------------------------------------------------------------------- errors


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match="mlp, cnn, transformer"):
        R.get_reference("resnet")
    with pytest.raises(TypeError, match="valid options"):
        R.get_reference("mlp", width=3)
    with pytest.raises(ValueError, match="divisible"):
        R.get_reference("transformer", d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="tanh, gelu"):
        R.get_reference("cnn", activation="relu")
    with pytest.raises(ValueError, match="framework"):
        small("mlp").make_batch(2, framework="tensorflow")
    with pytest.raises(ValueError, match="floating"):
        small("mlp").make_batch(2, dtype="int32")

    spec = small("transformer")
    too_long = spec.make_batch(2, framework="numpy")[0].repeat(2, axis=1)
    with pytest.raises(ValueError, match="seq_len"):
        spec.torch_model()(torch.from_numpy(too_long))
    with pytest.raises(ValueError, match="seq_len"):
        spec.jax_apply(spec.jax_params(), jnp.asarray(too_long))

    with jax.enable_x64(False):
        model64 = small("mlp").torch_model(dtype=torch.float64)
        with pytest.raises(ValueError, match="jax_enable_x64"):
            small("mlp").jax_params_from_torch(model64)
        with pytest.raises(ValueError, match="jax_enable_x64"):
            small("mlp").make_batch(2, framework="jax", dtype="float64")


def test_import_needs_neither_framework():
    # The spec and its layout work with numpy alone; the framework modules are imported by
    # the methods that need them.
    code = """
import sys
sys.modules["torch"] = None
sys.modules["jax"] = None
from hessop.bench import reference as R
s = R.get_reference("cnn", image_size=4)
assert s.make_batch(2)[0].shape == (2, 3, 4, 4)
assert s.numpy_params(0)["stem.weight"].shape == (16, 3, 3, 3)
try:
    s.torch_model()
except ImportError:
    pass
else:
    raise AssertionError("torch_model should need torch")
assert "hessop.bench.reference_torch" not in sys.modules
assert "hessop.bench.reference_jax" not in sys.modules
"""
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr

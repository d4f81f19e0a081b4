"""Every misuse raises an exception that names the problem and the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hessop
from conftest import backend_params, logistic_data, logistic_f, to_native, to_numpy
from hessop import backends as registry

backends = pytest.mark.parametrize("backend", backend_params())


def operator(backend: str):
    w, X, y = logistic_data()
    return hessop.hessian(logistic_f, *to_native(backend, (w, X, y)))


def quad(w):
    return (w**2).sum()


# --- vectors -------------------------------------------------------------------------------
@backends
def test_wrong_vector_shape(backend):
    H = operator(backend)
    fix = r"H\.ravel\(tree\)"
    with pytest.raises(
        hessop.ShapeError, match=r"matvec expects .* shape \(4,\), got \(3,\).*" + fix
    ):
        H @ to_native(backend, np.ones(3))
    with pytest.raises(hessop.ShapeError, match=r"shape \(4, k\), got \(3, 2\)"):
        H @ to_native(backend, np.ones((3, 2)))
    with pytest.raises(hessop.ShapeError, match=r"got \(4, 2, 2\)"):
        H.matmat(to_native(backend, np.ones((4, 2, 2))))
    with pytest.raises(hessop.ShapeError, match=r"rmatvec expects .* \(4,\), got \(5,\)"):
        to_native(backend, np.ones(5)) @ H
    with pytest.raises(hessop.ShapeError, match=r"got \(\)"):
        H @ to_native(backend, np.asarray(1.0))
    with pytest.raises(hessop.ShapeError, match=r"unravel expects .* \(4,\)"):
        H.unravel(to_native(backend, np.ones(3)))


@backends
def test_wrong_pytree_in_ravel(backend):
    p = {"w": np.ones((2, 3)), "b": [np.ones(3), np.asarray(1.0)]}
    f = lambda p: (p["w"] ** 2).sum() + (p["b"][0] ** 2).sum() * p["b"][1]  # noqa: E731
    H = hessop.hessian(f, to_native(backend, p))
    with pytest.raises(hessop.ShapeError, match=r"at \['b'\] expected a sequence of 2 entries"):
        H.ravel({"w": np.ones((2, 3)), "b": [np.ones(3)]})  # a leaf missing
    with pytest.raises(hessop.ShapeError, match=r"leaf \['w'\] has shape \(3, 2\), expected"):
        H.ravel({"w": np.ones((3, 2)), "b": [np.ones(3), np.asarray(1.0)]})  # leaf shape
    with pytest.raises(hessop.ShapeError, match=r"keys missing: \['b'\]; keys not in the"):
        H.ravel({"w": np.ones((2, 3)), "c": [np.ones(3), np.asarray(1.0)]})  # a key renamed
    with pytest.raises(hessop.ShapeError, match="at the top level expected a dict"):
        H.ravel(np.ones(10))  # the right size, flat
    # The layout is defined by the keys: reordered keys (every jax.tree result sorts them)
    # and a tuple for a list mean the same vector.
    tree = {"w": np.arange(6.0).reshape(2, 3), "b": [np.arange(3.0) + 6, np.asarray(9.0)]}
    want = to_numpy(H.ravel(tree))
    np.testing.assert_array_equal(want, np.arange(10.0))
    reordered = {"b": tree["b"], "w": tree["w"]}
    np.testing.assert_array_equal(to_numpy(H.ravel(reordered)), want)
    np.testing.assert_array_equal(to_numpy(H.ravel({**tree, "b": tuple(tree["b"])})), want)


@backends
def test_integer_and_complex_dtypes(backend):
    H = operator(backend)
    for dtype in ("int64", "int32", "complex128", "bool"):
        with pytest.raises(hessop.DTypeError, match=rf"has dtype {dtype}.*real floating point"):
            H @ to_native(backend, np.ones(4, dtype=dtype))
    _, X, y = logistic_data()
    for dtype in ("int64", "complex128"):
        w = to_native(backend, np.ones(4, dtype=dtype))
        with pytest.raises(hessop.DTypeError, match=rf"parameter leaf 0 has dtype {dtype}"):
            hessop.hessian(logistic_f, w, *to_native(backend, (X, y)))
        with pytest.raises(hessop.DTypeError, match=rf"parameter leaf 0 has dtype {dtype}"):
            hessop.hessian(logistic_f, np.ones(4, dtype=dtype), X, y, backend=backend)
    with pytest.raises(hessop.DTypeError, match="dtype= has dtype int64"):
        hessop.hessian(quad, np.ones(3), backend=backend, dtype="int64")
    with pytest.raises(hessop.DTypeError, match="different dtypes.*pass dtype="):
        hessop.hessian(
            lambda p: quad(p[0]) + quad(p[1]),
            [to_native(backend, np.ones(2), "float32"), to_native(backend, np.ones(2))],
        )


def test_device_mismatch():
    # The meta device stands in for a second device on a CPU-only machine.
    torch = pytest.importorskip("torch")
    w, X, y = (torch.as_tensor(a) for a in logistic_data())
    H = hessop.hessian(logistic_f, w, X, y)
    fix = r"move it first \(e\.g\. x\.to\('cpu'\)"
    with pytest.raises(hessop.DeviceError, match=r"matvec is on device meta .* on cpu; " + fix):
        H @ torch.ones(4, dtype=torch.float64, device="meta")
    with pytest.raises(hessop.DeviceError, match="matmat is on device meta"):
        H @ torch.ones(4, 2, dtype=torch.float64, device="meta")
    with pytest.raises(hessop.DeviceError, match=r"argument of the loss is on device meta.*" + fix):
        hessop.hessian(logistic_f, w, X.to("meta"), y)
    with pytest.raises(hessop.DeviceError, match="parameter leaf 1 is on device meta"):
        hessop.hessian(lambda p: quad(p[0]) + quad(p[1]), [w, w.to("meta")])


@backends
def test_non_scalar_loss(backend):
    w = to_native(backend, np.ones(3))
    for mode in ("auto", "fwd-rev", "dense", "fd"):
        H = hessop.hessian(lambda w: w**2, w, mode=mode)
        with pytest.raises(
            hessop.LossError, match=r"scalar.*shape \(3,\).*\.mean\(\) or \.sum\(\)"
        ):
            H @ w
    H = hessop.hessian(lambda w: quad(w).reshape((1,)), w)
    with pytest.raises(hessop.LossError, match=r"shape \(1,\)"):
        H @ w


def test_complex_loss():
    torch = pytest.importorskip("torch")
    w = torch.ones(3, dtype=torch.float64)
    H = hessop.hessian(lambda w: quad(w.to(torch.complex128) * 1j), w)
    with pytest.raises(hessop.LossError, match="real scalar.*real part"):
        H @ w


def test_forward_mode_unsupported_names_the_mode_that_works():
    torch = pytest.importorskip("torch")

    class Square(torch.autograd.Function):  # no jvp: forward-mode AD is impossible
        @staticmethod
        def forward(x):
            return x**2

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    w = torch.ones(3, dtype=torch.float64)
    f = lambda w: Square.apply(w).sum()  # noqa: E731
    for mode in ("fwd-rev", "rev-fwd"):
        with pytest.raises(hessop.ForwardModeUnsupportedError, match="reverse-over-reverse"):
            hessop.hessian(f, w, mode=mode) @ w
    np.testing.assert_allclose((hessop.hessian(f, w) @ w).numpy(), 2.0)  # auto works


# --- options -------------------------------------------------------------------------------
def test_unknown_backend_mode_reduction():
    w = np.ones(3)
    with pytest.raises(hessop.UnknownOptionError, match=r"backend 'tf'.*'torch', 'jax'"):
        hessop.hessian(quad, w, backend="tf")
    with pytest.raises(hessop.UnknownOptionError, match=r"mode 'fast'.*'forward-over-reverse'.*"):
        hessop.hessian(quad, w, backend="torch", mode="fast")
    with pytest.raises(hessop.UnknownOptionError, match=r"'fwd-rev', 'rev-fwd', 'rev-rev', 'fd'"):
        hessop.hessian(quad, w, backend="torch", mode="fast")
    with pytest.raises(hessop.UnknownOptionError, match=r"reduction 'avg'.*'mean', 'sum'"):
        hessop.hessian(quad, w, backend="torch", reduction="avg")
    with pytest.raises(ValueError):  # UnknownOptionError is a ValueError too
        hessop.get_backend("tf")


def test_numpy_params_need_a_backend():
    with pytest.raises(TypeError, match="pass backend='torch' or backend='jax'"):
        hessop.hessian(quad, np.ones(3))
    with pytest.raises(TypeError, match="cannot differentiate; pass backend='torch'"):
        hessop.hessian(quad, np.ones(3), backend="numpy")


def test_framework_not_installed_registered_loader(monkeypatch):
    def loader():
        raise ImportError("No module named 'fakeframework'")

    monkeypatch.setitem(
        registry._REGISTRY, "fake", (loader, lambda x: False, "fake")
    )  # removed again after the test
    with pytest.raises(hessop.BackendNotAvailableError, match=r"pip install 'hessop\[fake\]'"):
        hessop.hessian(quad, np.ones(3), backend="fake")
    with pytest.raises(ImportError, match="fakeframework"):  # also an ImportError
        hessop.get_backend("fake")


def test_framework_not_installed_subprocess():
    # A fresh interpreter where importing torch and jax fails, as if they were not installed.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        sys.modules["jax"] = None
        import numpy as np
        import hessop
        for name in ("torch", "jax"):
            try:
                hessop.hessian(lambda w: (w**2).sum(), np.ones(3), backend=name)
            except hessop.BackendNotAvailableError as err:
                print(name, "|", err)
        print(hessop.aslinearoperator(np.eye(2)) @ np.ones(2))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("torch |") and "pip install 'hessop[torch]'" in lines[0]
    assert lines[1].startswith("jax |") and "pip install 'hessop[jax]'" in lines[1]
    assert lines[2] == "[1. 1.]"  # numpy operators work without either framework


def test_jax_float64_without_x64():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    with jax.enable_x64(False):  # scoped: the session keeps x64 on
        with pytest.raises(hessop.DTypeError, match=r"jax_enable_x64.*dtype='float32'"):
            hessop.hessian(quad, np.ones(3), backend="jax")
        w32 = jnp.ones(3, dtype=jnp.float32)
        with pytest.raises(hessop.DTypeError, match="silently"):
            hessop.hessian(quad, w32, dtype="float64")
        H = hessop.hessian(quad, np.ones(3), backend="jax", dtype="float32")  # the fix works
        assert H.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(H @ w32), 2.0)
    assert jax.config.jax_enable_x64


# --- frameworks ----------------------------------------------------------------------------
def test_mixed_frameworks():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    w, X, y = logistic_data()
    with pytest.raises(TypeError, match=r"mix frameworks \(\['jax', 'torch'\]\)"):
        hessop.hessian(lambda p: quad(p[0]), [torch.as_tensor(w), jnp.asarray(w)])
    with pytest.raises(
        TypeError, match="mix frameworks|is a jax array but the operator uses torch"
    ):
        hessop.hessian(logistic_f, torch.as_tensor(w), jnp.asarray(X), jnp.asarray(y))
    with pytest.raises(
        TypeError, match="mix frameworks|is a torch array but the operator uses jax"
    ):
        hessop.hessian(logistic_f, jnp.asarray(w), torch.as_tensor(X), torch.as_tensor(y))
    data = [(torch.as_tensor(X), torch.as_tensor(y))]
    with pytest.raises(TypeError, match="convert each batch to numpy"):
        hessop.hessian(logistic_f, jnp.asarray(w), data=data) @ jnp.ones(4)
    Ht = hessop.hessian(logistic_f, *(torch.as_tensor(a) for a in (w, X, y)))
    with pytest.raises(TypeError, match="needs a torch array, got jax"):
        Ht @ jnp.ones(4)
    Hj = hessop.hessian(logistic_f, *(jnp.asarray(a) for a in (w, X, y)))
    with pytest.raises(TypeError, match="needs a jax array, got torch"):
        Hj @ torch.ones(4, dtype=torch.float64)


@backends
def test_numpy_vector_into_native_operator(backend):
    H = operator(backend)
    with pytest.raises(TypeError, match=rf"needs a {backend} array, got numpy.*to_scipy\(\)"):
        H @ np.ones(4)
    with pytest.raises(TypeError, match="to_scipy"):
        np.ones(4) @ H
    np.testing.assert_allclose(H.to_scipy() @ np.ones(4), np.asarray(H.to_dense()).sum(1))


# --- data= ---------------------------------------------------------------------------------
@backends
def test_data_misuse(backend):
    w, X, y = logistic_data()
    wn, Xn, yn = to_native(backend, (w, X, y))
    batches = [(Xn[:5], yn[:5]), (Xn[5:], yn[5:])]
    with pytest.raises(TypeError, match=r"either \*args or data=, not both"):
        hessop.hessian(logistic_f, wn, Xn, yn, data=batches)
    for one_shot in (iter(batches), (b for b in batches)):
        with pytest.raises(TypeError, match=r"re-iterable.*list\(\.\.\.\)"):
            hessop.hessian(logistic_f, wn, data=one_shot)
    with pytest.raises(hessop.EmptyDataError, match="data= is empty; pass at least one batch"):
        hessop.hessian(logistic_f, wn, data=[])

    class Empty:  # re-iterable, no len(): found empty at the first product
        def __iter__(self):
            return iter(())

    H = hessop.hessian(logistic_f, wn, data=Empty())
    with pytest.raises(hessop.EmptyDataError, match="yielded no batch"):
        H @ wn
    H = hessop.hessian(lambda w, s: quad(w) * s, wn, data=[(to_native(backend, np.asarray(2.0)),)])
    with pytest.raises(hessop.ShapeError, match=r"batch size.*batch_size=lambda args"):
        H @ wn


def test_bad_pytrees():
    with pytest.raises(hessop.ShapeError, match="no array leaves"):
        hessop.hessian(lambda p: 0.0, {}, backend="torch")
    with pytest.raises(hessop.ShapeError, match="got None"):
        hessop.hessian(lambda p: 0.0, {"a": None}, backend="torch")


def test_every_error_is_a_hessop_error():
    for cls in (
        hessop.BackendNotAvailableError,
        hessop.UnknownOptionError,
        hessop.ShapeError,
        hessop.DTypeError,
        hessop.DeviceError,
        hessop.LossError,
        hessop.ForwardModeUnsupportedError,
        hessop.EmptyDataError,
    ):
        assert issubclass(cls, hessop.HessopError)

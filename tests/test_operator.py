"""LinearOperator: algebra, wrapping (aslinearoperator) and conversion, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

import hessop
from conftest import backend_params, has_framework, shared_operator, to_native, to_numpy

FRAMEWORKS = [pytest.param("numpy", id="numpy"), *backend_params()]


def mats(seed: int = 0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((5, 4))
    B = rng.standard_normal((5, 4))
    C = rng.standard_normal((4, 3))
    M = rng.standard_normal((4, 4))
    S = M + M.T
    return A, B, C, S


def check(op, dense: np.ndarray, framework: str, rtol: float = 1e-12) -> None:
    """Every product of ``op`` against the numpy matrix ``dense``, in ``framework``."""
    n, m = dense.shape
    assert op.shape == (n, m) and op.backend == framework
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(m), rng.standard_normal(n)
    X, Y = rng.standard_normal((m, 3)), rng.standard_normal((n, 2))
    xn, yn, Xn, Yn = (to_native(framework, a) for a in (x, y, X, Y))
    pairs = [
        (op @ xn, dense @ x),
        (op.matvec(xn), dense @ x),
        (op(xn), dense @ x),
        (op @ Xn, dense @ X),
        (op.rmatvec(yn), dense.T @ y),
        (yn @ op, y @ dense),
        (op.rmatmat(Yn), dense.T @ Y),
        (op.T @ yn, dense.T @ y),
        (op.to_dense(), dense),
    ]
    for got, want in pairs:
        assert type(got) is type(xn)  # results keep the framework
        np.testing.assert_allclose(to_numpy(got), want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_algebra(framework):
    A, B, C, S = mats()
    Ao, Bo, Co, So = (hessop.aslinearoperator(to_native(framework, x)) for x in (A, B, C, S))
    check(Ao, A, framework)
    check(Ao + Bo, A + B, framework)
    check(Ao - Bo, A - B, framework)
    check(-Ao, -A, framework)
    check(2.5 * Ao, 2.5 * A, framework)
    check(Ao * 2.5, 2.5 * A, framework)
    check(Ao / 4, A / 4, framework)
    check(Ao / np.float64(4.0), A / 4, framework)
    check(Ao @ Co, A @ C, framework)
    check(Ao.T, A.T, framework)
    check(Ao.T @ Bo, A.T @ B, framework)
    check((Ao - 2 * Bo).T @ (Ao + Bo) / 3, (A - 2 * B).T @ (A + B) / 3, framework)
    check(So.damped(0.7), S + 0.7 * np.eye(4), framework)
    check(So + hessop.IdentityOperator.like(So), S + np.eye(4), framework)
    assert Ao.T.T is Ao
    assert So.symmetric and So.T is So
    assert not Ao.symmetric and not (Ao @ Co).symmetric
    assert (So + So).symmetric and (3 * So).symmetric


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_float32_stays_float32(framework):
    _, _, _, S = mats()
    op = hessop.aslinearoperator(to_native(framework, S, "float32"))
    v = to_native(framework, np.ones(4), "float32")
    for derived in (op, 2 * op, op / 3, op + op, op @ op, op.damped(0.1), -op):
        out = derived @ v
        assert "float32" in str(out.dtype) and "float32" in str(derived.dtype)
    np.testing.assert_allclose(to_numpy(op.damped(0.5) @ v), S.sum(1) + 0.5, rtol=1e-5)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_identity(framework):
    Id = hessop.IdentityOperator(3, dtype="float64", backend=framework)
    check(Id, np.eye(3), framework)
    assert Id.symmetric and Id.T is Id


def test_device_is_kept():
    torch = pytest.importorskip("torch")
    op = hessop.aslinearoperator(torch.eye(3, dtype=torch.float64))
    assert op.device == torch.device("cpu")
    assert hessop.IdentityOperator.like(op).device == op.device
    assert (op + op).device == op.device


def test_scipy_operator_and_sparse():
    A, _, _, S = mats()
    for x in (spla.aslinearoperator(A), sp.csr_matrix(A), sp.coo_array(A)):
        check(hessop.aslinearoperator(x), A, "numpy")
    sym = hessop.aslinearoperator(sp.csr_matrix(S), symmetric=True)
    assert sym.symmetric and sym.T is sym
    check(sym, S, "numpy")


def test_callables():
    _, _, _, S = mats()
    op = hessop.aslinearoperator(lambda v: S @ v, shape=(4, 4), symmetric=True)
    check(op, S, "numpy")
    op = hessop.CallableOperator(
        lambda v: S @ v, (4, 4), "float64", "numpy", rmatvec=lambda v: S.T @ v
    )
    check(op, S, "numpy")
    with pytest.raises(hessop.ShapeError, match="shape="):
        hessop.aslinearoperator(lambda v: v)
    plain = hessop.aslinearoperator(lambda v: S @ v, shape=(4, 4))  # symmetry not declared
    with pytest.raises(NotImplementedError, match="symmetric=True"):
        plain.T @ np.ones(4)


@pytest.mark.parametrize("framework", backend_params())
def test_callable_in_a_framework(framework):
    _, _, _, S = mats()
    Sn = to_native(framework, S)
    op = hessop.aslinearoperator(lambda v: Sn @ v, shape=(4, 4), backend=framework, symmetric=True)
    check(op, S, framework)


def test_aslinearoperator_passthrough_and_lists():
    A, *_ = mats()
    op = hessop.aslinearoperator(A)
    assert hessop.aslinearoperator(op) is op
    check(hessop.aslinearoperator(A.tolist()), A, "numpy")
    with pytest.raises(hessop.ShapeError, match="2-D"):
        hessop.aslinearoperator(np.ones(3))
    with pytest.raises(hessop.DTypeError, match="float"):
        hessop.aslinearoperator(np.eye(3, dtype=np.int64))
    with pytest.raises(hessop.DTypeError, match="callable with shape="):
        hessop.aslinearoperator(object())


def test_incompatible_algebra():
    A, _, C, S = mats()
    Ao = hessop.aslinearoperator(A)
    with pytest.raises(hessop.ShapeError, match="cannot add"):
        Ao + hessop.aslinearoperator(S)
    with pytest.raises(hessop.ShapeError, match="cannot compose"):
        Ao @ Ao
    with pytest.raises(TypeError):
        Ao + 1.0
    if has_framework("torch"):
        import torch

        with pytest.raises(TypeError, match="one framework"):
            Ao + hessop.aslinearoperator(torch.as_tensor(A))
        meta = torch.empty(5, 4, dtype=torch.float64, device="meta")
        meta = hessop.aslinearoperator(meta, symmetric=False)  # a meta tensor has no values
        with pytest.raises(hessop.DeviceError, match="one device"):
            hessop.aslinearoperator(torch.as_tensor(A)) + meta


def test_to_scipy_numpy_in_and_out():
    A, *_ = mats()
    Ao = hessop.aslinearoperator(A)
    S = Ao.to_scipy()
    x = np.arange(4.0)
    np.testing.assert_allclose(S.matvec(x), A @ x, 1e-12)
    np.testing.assert_allclose(S.matvec(x[:, None]), (A @ x)[:, None], 1e-12)
    np.testing.assert_allclose(S @ np.eye(4), A, 1e-12)
    np.testing.assert_allclose(S.rmatvec(np.ones(5)), A.T @ np.ones(5), 1e-12)
    np.testing.assert_allclose(S.H @ np.ones(5), A.T @ np.ones(5), 1e-12)
    z = x + 1j * x[::-1]  # complex probes are split into real and imaginary parts
    np.testing.assert_allclose(S.matvec(z), A @ z, 1e-12)


# --- on real Hessian operators -----------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params())
def test_to_scipy_solvers_on_hessian(backend):
    H = shared_operator("pytree", backend, "auto")  # indefinite in general
    D = to_numpy(H.to_dense())
    d = D.shape[0]
    evals = np.linalg.eigvalsh(D)
    shift = max(0.0, -evals[0]) + 1.0
    Hs, Hd = H.to_scipy(), H.damped(shift).to_scipy()  # Hd is SPD
    assert Hs.shape == (d, d) and Hs.dtype == np.float64
    b = np.random.default_rng(2).standard_normal(d)

    top = spla.eigsh(Hs, k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), evals[-3:], rtol=1e-8, atol=1e-10)

    x, info = spla.cg(Hd, b, rtol=1e-12, atol=0, maxiter=10 * d)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(D + shift * np.eye(d), b), rtol=1e-8)

    x, info = spla.minres(Hs, b, rtol=1e-12, maxiter=10 * d)
    assert info == 0
    np.testing.assert_allclose(x, np.linalg.solve(D, b), rtol=1e-6, atol=1e-8)

    w, V = scipy.linalg.eigh(D)
    np.testing.assert_allclose(Hs @ V[:, -1], w[-1] * V[:, -1], atol=1e-10 * abs(w).max())


@pytest.mark.parametrize("backend", backend_params())
def test_hessian_algebra_keeps_framework(backend):
    H = shared_operator("pytree", backend, "auto")
    D = to_numpy(H.to_dense())
    check(H, D, backend, rtol=1e-10)
    check(2 * H - H / 2, 1.5 * D, backend, rtol=1e-10)
    check(H @ H, D @ D, backend, rtol=1e-10)
    check(H.damped(0.3), D + 0.3 * np.eye(D.shape[0]), backend, rtol=1e-10)
    dense = hessop.aslinearoperator(H.to_dense())
    check(H + dense, 2 * D, backend, rtol=1e-10)

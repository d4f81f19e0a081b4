"""Property tests (hypothesis) of Hessian operators in every backend and exact mode.

A Hessian is a symmetric linear map: u.Hv = v.Hu, H(a u + b v) = a Hu + b Hv, the batched
product equals stacked single products, and v @ H equals H @ v. The operators come from
the shared cache in conftest (built once per session), so examples cost only products.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import backend_params, shared_operator, to_native, to_numpy

D = 11  # the size of the "pytree" loss: a nested dict/list pytree with a 0-d leaf
K = 3  # columns in matmat; one fixed width keeps JAX to one compilation per operator
PROPS = settings(max_examples=20, deadline=None, derandomize=True)
MODES = ["fwd-rev", "rev-fwd", "rev-rev"]  # "auto" is one of these

floats = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
vectors = arrays(np.float64, D, elements=floats)
matrices = arrays(np.float64, (D, K), elements=floats)
scalars = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


def operator(backend: str, mode: str):
    return shared_operator("pytree", backend, mode, cache=False)


def _norm(H) -> float:
    return float(np.abs(to_numpy(H.to_dense())).max())


def assert_close(a, b, scale: float, rtol: float = 1e-10) -> None:
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=0, atol=rtol * max(scale, 1e-300))


parametrize = pytest.mark.parametrize
backends = parametrize("backend", backend_params())
modes = parametrize("mode", MODES)


@backends
@modes
@PROPS
@given(u=vectors, v=vectors)
def test_symmetry(backend, mode, u, v):
    H = operator(backend, mode)
    un, vn = to_native(backend, u), to_native(backend, v)
    uHv = float(to_numpy(un @ (H @ vn)))
    vHu = float(to_numpy(vn @ (H @ un)))
    scale = _norm(H) * D * (np.abs(u).max() + 1) * (np.abs(v).max() + 1)
    assert abs(uHv - vHu) <= 1e-12 * scale


@backends
@modes
@PROPS
@given(u=vectors, v=vectors, a=scalars, b=scalars)
def test_linearity(backend, mode, u, v, a, b):
    H = operator(backend, mode)
    un, vn = to_native(backend, u), to_native(backend, v)
    lhs = H @ (a * un + b * vn)
    rhs = a * (H @ un) + b * (H @ vn)
    scale = _norm(H) * D * (abs(a) * np.abs(u).max() + abs(b) * np.abs(v).max() + 1)
    assert_close(lhs, rhs, scale, 1e-12)


@backends
@modes
@PROPS
@given(V=matrices)
def test_matmat_is_stacked_matvecs(backend, mode, V):
    H = operator(backend, mode)
    Vn = to_native(backend, V)
    batched = to_numpy(H @ Vn)
    stacked = np.stack([to_numpy(H @ Vn[:, j]) for j in range(K)], axis=1)
    assert batched.shape == (D, K)
    assert_close(batched, stacked, _norm(H) * D * (np.abs(V).max() + 1), 1e-12)


@backends
@modes
@PROPS
@given(v=vectors)
def test_left_product_equals_right_product(backend, mode, v):
    H = operator(backend, mode)
    vn = to_native(backend, v)
    assert_close(vn @ H, H @ vn, _norm(H) * D * (np.abs(v).max() + 1), 1e-12)
    assert_close(H.rmatvec(vn), H.matvec(vn), _norm(H) * D * (np.abs(v).max() + 1), 1e-12)

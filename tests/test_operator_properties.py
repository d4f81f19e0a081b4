"""Property tests (hypothesis) of the operator contract on random small losses.

A loss is drawn as a random pytree point (one of a few structures) and random polynomials,
tanh and log-sum-exp terms of random linear maps of the flattened point, written once with
the array API so that the same function runs in torch and JAX. Its Hessian has a closed form
(computed here with numpy, no automatic differentiation), so every property is checked
against it:

* every exact mode (forward-over-reverse, reverse-over-forward, reverse-over-reverse, dense)
  equals the closed form, and finite differences come close;
* symmetry ``u.Hv = v.Hu``, linearity, ``matmat`` = stacked ``matvec``s, ``v @ H = H @ v``;
* torch and JAX give the same products and gradients for the same loss.

The structures and shapes are few and fixed, so that JAX compiles each product once and
later examples reuse it (only the numbers change between examples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hessop
from conftest import backend_params, has_framework, to_native, to_numpy

PROPS = settings(max_examples=3, deadline=None, derandomize=True)
EXACT = ("fwd-rev", "rev-fwd", "rev-rev", "dense")
M = 3  # rows of each random linear map


def _leaves(p):
    if isinstance(p, dict):
        return [x for k in p for x in _leaves(p[k])]
    if isinstance(p, (list, tuple)):
        return [x for c in p for x in _leaves(c)]
    return [p]


def random_loss(p, A, a, c, B, bb, t, C, cc, s):
    """sum_i c2 z_i^2 + c3 z_i^3 + c4 z_i^4 (z = A x + a) + t . tanh(B x + bb)
    + s log sum exp(C x + cc), with x the flattened point (hessop's layout)."""
    import array_api_compat

    xp = array_api_compat.array_namespace(A)
    x = xp.concat([xp.reshape(leaf, (-1,)) for leaf in _leaves(p)])
    z = A @ x + a
    poly = xp.sum(c[0] * z**2 + c[1] * z**3 + c[2] * z**4)
    return poly + xp.sum(t * xp.tanh(B @ x + bb)) + s * xp.log(xp.sum(xp.exp(C @ x + cc)))


#: point structures: a leaf is a shape; the flat layout is depth-first, insertion order
STRUCTURES = {
    "vector": (4,),
    "dict": {"w": (2, 3), "b": (3,)},
    "nested": [(2,), {"s": (), "m": (2, 2)}],
}


def _build(structure, flat, start=0):
    """The pytree of ``structure`` filled from ``flat`` (numpy), and the entries used."""
    if isinstance(structure, dict):
        out = {}
        for k, sub in structure.items():
            out[k], start = _build(sub, flat, start)
        return out, start
    if isinstance(structure, list):
        out = []
        for sub in structure:
            leaf, start = _build(sub, flat, start)
            out.append(leaf)
        return out, start
    n = int(np.prod(structure))
    return flat[start : start + n].reshape(structure), start + n


def _size(structure):
    return _build(structure, np.zeros(100))[1]


@dataclass
class Problem:
    """A random loss, its point, and its Hessian and gradient in closed form."""

    structure: str
    x: np.ndarray
    args: tuple[np.ndarray, ...]
    H: np.ndarray
    g: np.ndarray
    U: np.ndarray  # (d, 3) random directions

    @property
    def point(self):
        return _build(STRUCTURES[self.structure], self.x)[0]

    @property
    def d(self) -> int:
        return self.x.size

    @property
    def scale(self) -> float:
        return max(1.0, float(np.abs(self.H).max())) * self.d


def _closed_form(x, A, a, c, B, bb, t, C, cc, s):
    z, u, v = A @ x + a, B @ x + bb, C @ x + cc
    th = np.tanh(u)
    pi = np.exp(v - v.max())
    pi /= pi.sum()
    H = A.T @ np.diag(2 * c[0] + 6 * c[1] * z + 12 * c[2] * z**2) @ A
    H += B.T @ np.diag(t * (-2 * th * (1 - th**2))) @ B
    H += s * C.T @ (np.diag(pi) - np.outer(pi, pi)) @ C
    g = A.T @ (2 * c[0] * z + 3 * c[1] * z**2 + 4 * c[2] * z**3) + B.T @ (t * (1 - th**2))
    g += s * C.T @ pi
    return H, g


coefficient = st.sampled_from([0.0, 0.5, -1.0, 2.0])


#: JAX compiles every product kind once per structure and mode (about a second each on a
#: CPU): JAX gets the richest structure (a list, a dict, a 0-d leaf); torch gets them all
JAX_STRUCTURES = ("nested",)
ALL_STRUCTURES = tuple(sorted(STRUCTURES))


@st.composite
def problems(draw, structures=ALL_STRUCTURES):
    structure = draw(st.sampled_from(structures))
    seed = draw(st.integers(0, 2**32 - 1))
    # each term can be switched off (a zero coefficient: same function, no recompilation)
    c = np.array([draw(coefficient), draw(coefficient), draw(coefficient)])
    t_scale, s = draw(coefficient), draw(coefficient)
    rng = np.random.default_rng(seed)
    d = _size(STRUCTURES[structure])
    x = rng.standard_normal(d)
    A, B, C = (rng.standard_normal((M, d)) / np.sqrt(d) for _ in range(3))
    a, bb, cc = (rng.standard_normal(M) for _ in range(3))
    t = t_scale * rng.standard_normal(M)
    args = (A, a, c, B, bb, t, C, cc, np.asarray(s))
    H, g = _closed_form(x, *args)
    return Problem(structure, x, args, H, g, rng.standard_normal((d, 3)))


def operator(problem: Problem, backend: str, mode: str = "auto"):
    return hessop.hessian(
        random_loss,
        to_native(backend, problem.point),
        *to_native(backend, problem.args),
        mode=mode,
        cache=False,  # one product kind per mode: JAX compiles a matvec and a matmat only
    )


def draw_problem(data, backend: str) -> Problem:
    return data.draw(problems(JAX_STRUCTURES if backend == "jax" else ALL_STRUCTURES))


def close(got, want, scale: float, rtol: float = 1e-10) -> None:
    np.testing.assert_allclose(to_numpy(got), want, rtol=0, atol=rtol * scale)


backends = pytest.mark.parametrize("backend", backend_params())
torch_only = pytest.mark.skipif(not has_framework("torch"), reason="needs torch")
modes = pytest.mark.parametrize("mode", EXACT)


@backends
@modes
@PROPS
@given(data=st.data())
def test_every_exact_mode_is_the_closed_form(backend, mode, data):
    problem = draw_problem(data, backend)
    H = operator(problem, backend, mode)
    assert H.shape == (problem.d, problem.d)
    close(H.to_dense(), problem.H, problem.scale)


@torch_only
@PROPS
@given(data=st.data())
def test_gradient_is_the_closed_form(data):
    # torch: the JAX gradient is compared with torch's in test_torch_equals_jax
    problem = data.draw(problems())
    close(operator(problem, "torch").gradient(), problem.g, problem.scale)


@torch_only
@PROPS
@given(data=st.data())
def test_finite_differences_come_close(data):
    # the finite-difference product is framework-neutral code around the kernel's gradient
    problem = data.draw(problems())
    H = operator(problem, "torch", "fd")
    U = problem.U
    close(H @ to_native("torch", U[:, 0]), problem.H @ U[:, 0], problem.scale * 10, 1e-6)


@backends
@modes
@PROPS
@given(data=st.data(), alpha=st.floats(-5, 5), beta=st.floats(-5, 5))
def test_symmetry_linearity_and_blocks(backend, mode, data, alpha, beta):
    """u.Hv = v.Hu; H(au + bv) = aHu + bHv; a block product is the stacked matvecs; v @ H is
    H @ v (one operator per example, so the products' compilations are shared)."""
    problem = draw_problem(data, backend)
    H = operator(problem, backend, mode)
    u, v = (to_native(backend, problem.U[:, j]) for j in (0, 1))
    Hu, Hv = H @ u, H @ v
    uHv, vHu = float(to_numpy(u @ Hv)), float(to_numpy(v @ Hu))
    assert abs(uHv - vHu) <= 1e-12 * problem.scale * np.abs(problem.U).max() ** 2
    lhs = H @ (alpha * u + beta * v)
    rhs = to_numpy(alpha * Hu + beta * Hv)
    close(lhs, rhs, problem.scale * (abs(alpha) + abs(beta) + 1) * 10, 1e-12)
    E = to_native(backend, np.eye(problem.d))
    block = to_numpy(H @ E)  # one batched product of d columns (to_dense's, compiled once)
    stacked = np.stack([to_numpy(H @ E[:, j]) for j in range(3)], axis=1)
    close(block[:, :3], stacked, problem.scale, 1e-12)
    close(E @ H, block.T, problem.scale, 1e-12)  # v @ H, row by row


@pytest.mark.skipif(not (has_framework("torch") and has_framework("jax")), reason="needs both")
@PROPS
@given(problem=problems(JAX_STRUCTURES))
def test_torch_equals_jax(problem):
    Ht, Hj = operator(problem, "torch"), operator(problem, "jax")
    close(Ht.to_dense(), to_numpy(Hj.to_dense()), problem.scale)
    close(Ht.gradient(), to_numpy(Hj.gradient()), problem.scale)
    close(Ht.loss_and_gradient()[0], to_numpy(Hj.loss_and_gradient()[0]), problem.scale)


def test_closed_form_is_the_hessian():
    # guards the reference itself: central differences of the closed-form gradient
    rng = np.random.default_rng(0)
    d = 5
    x = rng.standard_normal(d)
    args = (*(rng.standard_normal((M, d)), rng.standard_normal(M)), np.array([0.5, -1.0, 2.0]))
    args += (rng.standard_normal((M, d)), rng.standard_normal(M), rng.standard_normal(M))
    args += (rng.standard_normal((M, d)), rng.standard_normal(M), 0.7)
    H, _ = _closed_form(x, *args)
    h = 1e-6
    fd = np.stack(
        [
            (_closed_form(x + h * e, *args)[1] - _closed_form(x - h * e, *args)[1]) / (2 * h)
            for e in np.eye(d)
        ],
        axis=1,
    )
    np.testing.assert_allclose(H, fd, rtol=1e-6, atol=1e-6)

"""A solver written on the operator interface alone: damped Newton-CG.

Minimizes a regularized logistic loss with Newton steps whose linear systems
``(H + lambda I) p = -g`` are solved by a hand-written conjugate gradient that only uses
``H @ v``. Works unchanged for either backend.

Run: ``python examples/custom_solver.py [--backend torch|jax]``
"""

from __future__ import annotations

import argparse
import sys

import array_api_compat
import numpy as np

import hessop


def loss(w, X, y):
    xp = array_api_compat.array_namespace(w)
    z = X @ w
    return xp.mean(xp.log(1 + xp.exp(-z)) + (1 - y) * z) + 0.01 * xp.sum(w * w)


def conjugate_gradient(A, b, tol=1e-10, maxiter=200):
    """Textbook CG on any hessop.LinearOperator; returns x with A x ~= b."""
    xp = A.xp
    x = xp.zeros_like(b)
    r = b
    p = r
    rs = xp.sum(r * r)
    for _ in range(maxiter):
        Ap = A @ p
        alpha = rs / xp.sum(p * Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = xp.sum(r * r)
        if float(rs_new) ** 0.5 <= tol * float(xp.sum(b * b)) ** 0.5:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def require(framework: str) -> None:
    """Exit with the install command (not a bare ModuleNotFoundError) if it is missing."""
    if framework not in hessop.available_backends(installed=True):
        sys.exit(
            f"this example needs {framework}, which is not installed; from the repository "
            f'root: pip install -c constraints.txt -e ".[{framework}]"'
        )


def main(backend: str = "torch") -> float:
    require(backend)
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((500, 20))
    y = (X @ rng.standard_normal(20) + 0.5 * rng.standard_normal(500) > 0).astype(np.float64)
    w = np.zeros(20)
    for step in range(8):
        H = hessop.hessian(loss, w, X, y, backend=backend)
        value, g = H.loss_and_gradient()
        gnorm = float(H.xp.linalg.vector_norm(g))
        print(f"step {step}: loss {float(value):.12f}  |grad| {gnorm:.3e}")
        if gnorm < 1e-10:
            break
        p = conjugate_gradient(H.damped(1e-8), -g)
        w = w + np.asarray(hessop.get_backend(backend).to_numpy(p))
    assert gnorm < 1e-8, gnorm
    return gnorm


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "jax"])
    main(parser.parse_args().backend)

"""Hypergradient of a validation loss by the implicit function theorem, with hessop.

Inner problem: L2-regularized logistic regression with one regularization strength per
feature, ``w*(lam) = argmin_w  mean(softplus(-s * X w)) + 0.5 * sum(exp(lam) * w**2)``.
Outer loss: the logistic loss of ``w*(lam)`` on a validation set.

The implicit function theorem gives, with ``H`` the inner Hessian at ``w*``,

    dL_out/dlam = -(d2 L_in / dlam dw)^T H^{-1} grad L_out(w*)
                = -exp(lam) * w* * (H^{-1} grad L_out(w*)),

so one inverse-Hessian-vector product (``hessop.inverse_hvp``, by CG on Hessian-vector
products) replaces differentiating through the inner solver. The inner problem is solved
by Newton-CG on ``hessop.hessian``; the check is central finite differences of the outer
loss over inner solutions computed independently, in closed-form numpy.

Run: ``python examples/bilevel_hypergradient.py [--backend torch|jax]``; it prints both
hypergradients and their relative error and exits non-zero when they disagree.
"""

from __future__ import annotations

import argparse
import sys

import array_api_compat
import numpy as np

import hessop

TOLERANCE = 1e-6


def inner_loss(w, X, s, lam):
    xp = array_api_compat.array_namespace(w)
    return xp.mean(xp.logaddexp(0.0, -s * (X @ w))) + 0.5 * xp.sum(xp.exp(lam) * w * w)


def outer_loss(w, X, s):
    xp = array_api_compat.array_namespace(w)
    return xp.mean(xp.logaddexp(0.0, -s * (X @ w)))


def make_data(seed: int = 0, n_train: int = 200, n_val: int = 100, p: int = 5):
    rng = np.random.default_rng(seed)
    w_true = rng.standard_normal(p)
    X = rng.standard_normal((n_train + n_val, p))
    s = np.where(X @ w_true + 0.7 * rng.standard_normal(n_train + n_val) > 0, 1.0, -1.0)
    lam = np.log(np.linspace(0.05, 0.5, p))
    return (X[:n_train], s[:n_train]), (X[n_train:], s[n_train:]), lam


def solve_inner_hessop(X, s, lam, backend: str) -> np.ndarray:
    """Newton-CG with hessop: each step solves H p = -g by hessop.cg."""
    w = np.zeros(X.shape[1])
    for _ in range(30):
        H = hessop.hessian(inner_loss, w, X, s, lam, backend=backend)
        g = H.gradient()
        if float(H.xp.linalg.vector_norm(g)) < 1e-13:
            break
        step = hessop.cg(H, -g, tol=1e-12).x
        w = w + np.asarray(step.cpu() if hasattr(step, "cpu") else step)
    return w


def solve_inner_numpy(X, s, lam) -> np.ndarray:
    """Plain Newton in numpy with the closed-form gradient and Hessian (the reference)."""
    w = np.zeros(X.shape[1])
    n = X.shape[0]
    for _ in range(50):
        z = s * (X @ w)
        sig = 1.0 / (1.0 + np.exp(z))  # sigmoid(-z)
        g = -(X.T @ (s * sig)) / n + np.exp(lam) * w
        if np.linalg.norm(g) < 1e-14:
            break
        H = (X.T * (sig * (1 - sig))) @ X / n + np.diag(np.exp(lam))
        w = w - np.linalg.solve(H, g)
    return w


def outer_numpy(w, X, s) -> float:
    return float(np.mean(np.logaddexp(0.0, -s * (X @ w))))


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
    (Xt, st), (Xv, sv), lam = make_data()

    # Hypergradient by the implicit function theorem.
    w_star = solve_inner_hessop(Xt, st, lam, backend)
    H = hessop.hessian(inner_loss, w_star, Xt, st, lam, backend=backend)
    g_out = hessop.hessian(outer_loss, w_star, Xv, sv, backend=backend).gradient()
    v = hessop.inverse_hvp(H, g_out, method="cg", tol=1e-12).x
    v = np.asarray(v.cpu() if hasattr(v, "cpu") else v)
    hypergrad = -np.exp(lam) * w_star * v

    # Reference: central differences of the outer loss through the numpy inner solver.
    h = 1e-5
    fd = np.empty_like(lam)
    for j in range(len(lam)):
        e = np.zeros_like(lam)
        e[j] = h
        up = outer_numpy(solve_inner_numpy(Xt, st, lam + e), Xv, sv)
        down = outer_numpy(solve_inner_numpy(Xt, st, lam - e), Xv, sv)
        fd[j] = (up - down) / (2 * h)

    rel = float(np.linalg.norm(hypergrad - fd) / np.linalg.norm(fd))
    np.set_printoptions(precision=10)
    print(f"backend: {backend}")
    print(f"implicit-function hypergradient: {hypergrad}")
    print(f"finite differences:              {fd}")
    print(f"relative error: {rel:.2e} (tolerance {TOLERANCE:.0e})")
    return rel


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "jax"])
    error = main(parser.parse_args().backend)
    sys.exit(0 if error <= TOLERANCE else 1)

"""The user guide's figures, drawn by ``draw_all`` when the docs are built (see conf.py).

Every figure is deterministic (fixed seeds) and small: the whole set takes seconds. The
operators are hessop operators of a small tanh network on synthetic data; for the
estimator curves, which need hundreds of runs, their dense matrices (computed by hessop)
are wrapped with :func:`hessop.aslinearoperator`, which gives the estimates the operators
themselves would, at a fraction of the time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator

import numpy as np
from matplotlib.figure import Figure

import hessop

SEEDS = 30  # runs per point of an estimator curve: the median error is plotted


def draw_all(folder: str) -> list[str]:
    """Draw every figure of the guide into ``folder`` as PNG files; return their paths.

    The folder is emptied first, so that a figure that failed to draw cannot leave a stale
    file behind for the build to pick up.
    """
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    paths = []
    with one_torch_thread():
        for draw in (cg_preconditioning, eigenvalue_convergence, trace_error, spectral_density):
            path = os.path.join(folder, f"{draw.__name__}.png")
            draw().savefig(path, dpi=100)
            paths.append(path)
    return paths


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny products: intra-op threads cost more than they save, and far more on a busy
    machine. The caller's setting is restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mlp_apply(p, X):
    return (X @ p["W1"] + p["b1"]).tanh() @ p["w2"]


def mse(out, y):
    return ((out - y) ** 2).mean()


@functools.cache
def dense_hessian_and_ggn() -> tuple[np.ndarray, np.ndarray]:
    """The Hessian (indefinite) and the GGN (PSD, decaying spectrum) of a tanh regression
    network with 240 parameters at its random initialization, as dense matrices."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 8))
    y = np.sin(X @ rng.standard_normal(8))
    params = {
        "W1": rng.standard_normal((8, 24)) / np.sqrt(8),
        "b1": np.zeros(24),
        "w2": rng.standard_normal(24) / np.sqrt(24),
    }
    H = hessop.model_hessian(mlp_apply, mse, (X, y), params=params, backend="torch")
    G = hessop.model_ggn(mlp_apply, mse, (X, y), params=params, backend="torch")
    return H.to_dense().numpy(), G.to_dense().numpy()


def _median_error(estimate, exact: float | np.ndarray, budgets, method: str) -> list[float]:
    errors = []
    for m in budgets:
        runs = [estimate(m, method, seed) for seed in range(SEEDS)]
        errors.append(float(np.median([np.linalg.norm(r - exact) for r in runs])))
    return errors


def trace_error() -> Figure:
    """Median trace error against products, on the Hessian and on the GGN."""
    H, G = dense_hessian_and_ggn()
    budgets = [8, 16, 32, 64, 128]
    fig = Figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    for ax, (name, A) in zip(axes[:2], [("Hessian (indefinite)", H), ("GGN (PSD)", G)]):
        op, exact = hessop.aslinearoperator(A), np.trace(A)

        def estimate(m, method, seed, op=op):
            return float(hessop.trace(op, m, method=method, seed=seed).estimate)

        for method in ("hutchinson", "hutch++", "xtrace"):
            err = np.array(_median_error(estimate, exact, budgets, method)) / abs(exact)
            ax.loglog(budgets, err, "o-", label=method)
            if method == "hutchinson":  # the 1/sqrt(m) law, through its first point
                m = np.array(budgets, dtype=float)
                ax.loglog(m, err[0] * (m / m[0]) ** -0.5, "k:", lw=1, label="∝ 1/√m")
        ax.set_title(f"trace, {name}")
        ax.set_xlabel("Hessian-vector products")
    axes[0].set_ylabel("median relative error")
    axes[0].legend(fontsize=8)

    op, exact = hessop.aslinearoperator(G), np.diag(G)

    def estimate_diag(m, method, seed):
        return np.asarray(hessop.diagonal(op, m, method=method, seed=seed).estimate)

    for method in ("hutchinson", "xdiag"):
        err = _median_error(estimate_diag, exact, budgets, method)
        axes[2].loglog(budgets, np.array(err) / np.linalg.norm(exact), "o-", label=method)
    axes[2].set_title("diagonal, GGN")
    axes[2].set_xlabel("Hessian-vector products")
    axes[2].set_ylabel("median relative error (2-norm)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


def spectral_density() -> Figure:
    """SLQ density of the network's Hessian against its exact eigenvalues."""
    H, _ = dense_hessian_and_ggn()
    exact = np.linalg.eigvalsh(H)
    res = hessop.spectral_density(hessop.aslinearoperator(H), num_probes=8, num_iter=40)
    t, p = np.asarray(res.grid), np.asarray(res.density)
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    axes[0].hist(exact, bins=60, density=True, color="0.8", label="exact eigenvalues")
    axes[0].plot(t, p, label=f"SLQ, {res.num_matvecs} products")
    axes[0].set_ylabel("density")
    axes[1].semilogy(t, np.maximum(p, 1e-8))
    axes[1].plot(exact, np.full_like(exact, 2e-8), "|", color="k", label="exact eigenvalues")
    axes[1].set_ylim(1e-8, None)
    axes[1].set_ylabel("density (log scale)")
    for ax in axes:
        ax.set_xlabel("eigenvalue")
        ax.legend(fontsize=8)
    fig.suptitle(f"Hessian of a tanh network, d = {H.shape[0]}", fontsize=10)
    fig.tight_layout()
    return fig


def eigenvalue_convergence() -> Figure:
    """Error of the top eigenvalue against products: Lanczos, power iteration, eigsh."""
    H, _ = dense_hessian_and_ggn()
    op, top = hessop.aslinearoperator(H), np.linalg.eigvalsh(H)[-1]
    steps = np.arange(2, 61, 2)
    lanczos = [np.linalg.eigvalsh(hessop.lanczos(op, int(m)).tridiagonal())[-1] for m in steps]
    power = [
        float(hessop.power_iteration(op, maxiter=int(m), tol=0.0).eigenvalues[0]) for m in steps
    ]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    floor = 1e-16
    ax.semilogy(
        steps,
        np.maximum(abs(np.array(lanczos) - top) / top, floor),
        "o-",
        ms=3,
        label="lanczos: top Ritz value",
    )
    ax.semilogy(
        steps,
        np.maximum(abs(np.array(power) - top) / top, floor),
        "s-",
        ms=3,
        label="power_iteration (largest magnitude)",
    )
    res = hessop.eigsh(op, k=1)
    err = max(abs(float(res.eigenvalues[0]) - top) / top, floor)
    ax.semilogy(
        res.num_matvecs,
        err,
        "k*",
        ms=10,
        label=f"eigsh(k=1): converged, residual {res.residual_norms[0]:.0e}",
    )
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel("relative error of the top eigenvalue")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def scaled_logistic():
    """The badly scaled logistic regression of the Newton-CG page at w = 0."""
    import array_api_compat

    def loss(w, X, y):
        xp = array_api_compat.array_namespace(w)
        z = X @ w
        return xp.mean(xp.logaddexp(0.0, z) - y * z) + 1e-3 * xp.sum(w * w)

    rng = np.random.default_rng(1)
    scale = np.logspace(-1, 1, 30)
    X = rng.standard_normal((200, 30)) * scale
    y = (X @ (rng.standard_normal(30) / scale) + rng.standard_normal(200) > 0) * 1.0
    return hessop.hessian(loss, np.zeros(30), X, y, backend="torch")


def cg_preconditioning() -> Figure:
    """CG residuals with no preconditioner, the exact Jacobi one, and an estimated one."""
    H = scaled_logistic()
    b = -H.gradient()
    A, bn = H.to_dense().numpy(), b.numpy()
    exact = hessop.diagonal(H, method="exact").estimate
    estimated = hessop.diagonal(H, 30, seed=0).estimate.clamp(min=1e-6)
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    for label, diag in (
        ("no preconditioner", None),
        ("Jacobi, exact diagonal (30 products)", exact),
        ("Jacobi, Hutchinson diagonal (30 products, clipped)", estimated),
    ):
        history: list[float] = []

        def record(x, history=history):
            history.append(np.linalg.norm(bn - A @ x.numpy()) / np.linalg.norm(bn))

        M = None if diag is None else (lambda r, diag=diag: r / diag)
        res = hessop.cg(H, b, tol=1e-8, maxiter=1000, M=M, callback=record)
        ax.semilogy(
            np.arange(1, len(history) + 1), history, label=f"{label}: {res.iterations} iterations"
        )
    ax.set_xlabel("CG iteration (one Hessian-vector product each)")
    ax.set_ylabel("relative residual")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

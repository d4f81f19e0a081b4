"""Sliced score matching: a Hessian-vector product inside a training loss.

An energy model ``E_theta(x)`` (a small softplus MLP plus a fixed confining term) defines
the density ``p(x) ~ exp(-E_theta(x))`` on 2-D data (a mixture of four Gaussians); its
score is ``s(x) = -grad_x E_theta(x)``. Sliced score matching (Song, Garg, Shi & Ermon,
2019) fits ``theta`` by minimizing, over data ``x`` and random directions ``v``,

    J(theta) = E_x E_v [ v^T (ds/dx) v + 1/2 (v^T s)^2 ]
             = E_x E_v [ -v^T H_x v + 1/2 (v^T grad_x E)^2 ],

where ``H_x`` is the Hessian of ``E_theta`` with respect to ``x`` (a Hutchinson estimate of
its trace). The loss needs the HVP ``H_x v`` of every sample, and its gradient with
respect to ``theta``. hessop gets all of them from one product: the Hessian of
``sum_i E(x_i)`` with respect to the whole batch ``X`` is block diagonal, so ``H @
vec(V)`` holds ``H_{x_i} v_i`` in row ``i``. ``differentiable=True`` keeps that product
(and the gradient) differentiable with respect to ``theta``, which ``f`` receives as an
argument. (``hessop.hvp`` is the one-shot functional equivalent.)

The example prints the loss and the error of the learned score against the true score of
the data distribution, both decreasing.

Run: ``python examples/sliced_score_matching.py [--backend torch|jax] [--steps 300]``
"""

from __future__ import annotations

import argparse
import sys
import time

import array_api_compat
import numpy as np

import hessop

CENTERS = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
SIGMA = 0.5


def sample_data(rng: np.random.Generator, n: int) -> np.ndarray:
    """n points from the mixture of four isotropic Gaussians."""
    return CENTERS[rng.integers(0, 4, n)] + SIGMA * rng.standard_normal((n, 2))


def true_score(x: np.ndarray) -> np.ndarray:
    """grad_x log p(x) of the data mixture, in closed form."""
    d = x[:, None, :] - CENTERS[None]  # (n, 4, 2)
    logw = -0.5 * (d**2).sum(-1) / SIGMA**2
    w = np.exp(logw - logw.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return -(w[..., None] * d).sum(1) / SIGMA**2


def init_params(rng: np.random.Generator, hidden: int = 32) -> dict[str, np.ndarray]:
    return {
        "W1": rng.standard_normal((2, hidden)) / np.sqrt(2),
        "b1": np.zeros(hidden),
        "W2": rng.standard_normal((hidden, hidden)) / np.sqrt(hidden),
        "b2": np.zeros(hidden),
        "w3": rng.standard_normal(hidden) / np.sqrt(hidden),
    }


def energy(X, theta):
    """E_theta at every row of X: (n, 2) -> (n,). Written once with the array API."""
    xp = array_api_compat.array_namespace(X)

    def softplus(z):
        return xp.log(1 + xp.exp(-xp.abs(z))) + xp.maximum(z, 0 * z)

    h = softplus(X @ theta["W1"] + theta["b1"])
    h = softplus(h @ theta["W2"] + theta["b2"])
    return h @ theta["w3"] + 0.05 * xp.sum(X**2, axis=1)  # the quadratic keeps p normalizable


def total_energy(X, theta):
    """sum_i E(x_i): its Hessian in X is block diagonal, one 2x2 block per sample."""
    xp = array_api_compat.array_namespace(X)
    return xp.sum(energy(X, theta))


def ssm_loss(theta, X, V, backend: str):
    """The sliced score matching loss of a batch X with one probe V[i] per sample."""
    H = hessop.hessian(total_energy, X, theta, backend=backend, differentiable=True)
    xp = H.xp
    v = H.ravel(V)
    _, grad = H.loss_and_gradient()  # grad_X sum_i E(x_i): row i is grad_x E(x_i)
    vHv = xp.sum(xp.reshape(v * (H @ v), (-1, 2)), axis=1)  # v_i^T H_{x_i} v_i
    vg = xp.sum(xp.reshape(v * grad, (-1, 2)), axis=1)  # v_i^T grad_x E(x_i)
    return xp.mean(-vHv + 0.5 * vg**2)


def score_error(theta, X, backend: str) -> float:
    """mean |s_theta(x) - s_true(x)|^2 on held-out data (the Fisher divergence, x2)."""
    H = hessop.hessian(total_energy, X, theta, backend=backend)
    g = H.gradient()
    model = -(g.detach().numpy() if hasattr(g, "detach") else np.asarray(g)).reshape(-1, 2)
    return float(np.mean(np.sum((model - true_score(np.asarray(X))) ** 2, axis=1)))


def train_torch(theta0, data, probes, held_out, steps, lr, log):
    import torch

    theta = {k: torch.tensor(v, requires_grad=True) for k, v in theta0.items()}
    opt = torch.optim.Adam(theta.values(), lr=lr)
    losses = []
    for t in range(steps):
        X, V = torch.as_tensor(data[t]), torch.as_tensor(probes[t])
        loss = ssm_loss(theta, X, V, "torch")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        log(t, losses, lambda: score_error({k: v.detach() for k, v in theta.items()},
                                            torch.as_tensor(held_out), "torch"))  # fmt: skip
    return losses


def train_jax(theta0, data, probes, held_out, steps, lr, log):
    import jax
    import jax.numpy as jnp

    theta = {k: jnp.asarray(v) for k, v in theta0.items()}
    # The operator is built inside the traced function: jit traces hessop once.
    value_and_grad = jax.jit(jax.value_and_grad(lambda th, X, V: ssm_loss(th, X, V, "jax")))
    m = {k: jnp.zeros_like(v) for k, v in theta.items()}
    s = {k: jnp.zeros_like(v) for k, v in theta.items()}
    losses = []
    for t in range(steps):  # Adam, written out (no optax dependency)
        loss, g = value_and_grad(theta, jnp.asarray(data[t]), jnp.asarray(probes[t]))
        for k in theta:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            s[k] = 0.999 * s[k] + 0.001 * g[k] ** 2
            mhat, shat = m[k] / (1 - 0.9 ** (t + 1)), s[k] / (1 - 0.999 ** (t + 1))
            theta[k] = theta[k] - lr * mhat / (jnp.sqrt(shat) + 1e-8)
        losses.append(float(loss))
        log(t, losses, lambda: score_error(theta, jnp.asarray(held_out), "jax"))
    return losses


def require(framework: str) -> None:
    """Exit with the install command (not a bare ModuleNotFoundError) if it is missing."""
    if framework not in hessop.available_backends(installed=True):
        sys.exit(
            f"this example needs {framework}, which is not installed; from the repository "
            f'root: pip install -c constraints.txt -e ".[{framework}]"'
        )


def main(
    backend: str = "torch",
    steps: int = 300,
    batch: int = 128,
    seed: int = 0,
    lr: float = 3e-3,
    verbose: bool = True,
) -> dict:
    """Train and return the loss curve and the score error before and after."""
    require(backend)
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(seed)  # local generator: no global RNG state is touched
    theta0 = init_params(rng)
    data = [sample_data(rng, batch) for _ in range(steps)]
    probes = [rng.choice([-1.0, 1.0], size=(batch, 2)) for _ in range(steps)]  # Rademacher
    held_out = sample_data(rng, 1000)
    errors: list[float] = []
    every = max(1, steps // 6)

    def log(t, losses, err):
        if t % every == 0 or t == steps - 1:
            errors.append(err())
            if verbose:
                recent = np.mean(losses[-every:])
                print(f"step {t:4d}  loss {recent:9.4f}  score error {errors[-1]:8.4f}")

    t0 = time.perf_counter()
    if backend == "torch":
        import torch

        # The model is tiny: intra-op threads cost more than they save (and on a busy
        # machine far more). One thread while training, the caller's setting restored.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            losses = train_torch(theta0, data, probes, held_out, steps, lr, log)
        finally:
            torch.set_num_threads(threads)
    else:
        losses = train_jax(theta0, data, probes, held_out, steps, lr, log)
    if verbose:
        print(f"{backend}: {steps} steps in {time.perf_counter() - t0:.1f} s")
    return {"losses": losses, "score_errors": errors}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="sliced score matching with hessop")
    p.add_argument("--backend", default="torch", choices=["torch", "jax"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    main(a.backend, a.steps, seed=a.seed)

"""The same loss under PyTorch and JAX: the same numbers, side by side.

One argument switches the framework. The parameters are a nested pytree (a dict holding a
list and a 0-d leaf); its flat layout is hessop's, identical in both backends (dict entries
in insertion order), so entry i of ``H @ v`` is the same parameter in both.

Run: ``python examples/switch_backend.py``
"""

from __future__ import annotations

import sys

import array_api_compat
import numpy as np

import hessop


def loss(params, X, y):
    """A one-hidden-layer tanh network with a learned output scale, array-API style."""
    xp = array_api_compat.array_namespace(X)
    W1, b1 = params["layer"]
    h = xp.tanh(X @ W1 + b1)
    pred = params["scale"] * (h @ params["head"])
    return xp.mean((pred - y) ** 2)


def require(framework: str) -> None:
    """Exit with the install command (not a bare ModuleNotFoundError) if it is missing."""
    if framework not in hessop.available_backends(installed=True):
        sys.exit(
            f"this example needs {framework}, which is not installed; from the repository "
            f'root: pip install -c constraints.txt -e ".[{framework}]"'
        )


def main() -> float:
    require("torch")
    require("jax")
    import jax

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 5)), rng.standard_normal(64)
    params = {
        "layer": [0.5 * rng.standard_normal((5, 8)), np.zeros(8)],
        "scale": np.float64(1.5),
        "head": rng.standard_normal(8),
    }
    H_torch = hessop.hessian(loss, params, X, y, backend="torch")
    H_jax = hessop.hessian(loss, params, X, y, backend="jax")
    v = rng.standard_normal(H_torch.shape[0])
    hv_torch = H_torch.to_scipy() @ v
    hv_jax = H_jax.to_scipy() @ v
    print(f"{'i':>3} {'torch (' + H_torch.mode + ')':>32} {'jax (' + H_jax.mode + ')':>32}")
    for i in range(0, len(v), 10):
        print(f"{i:>3} {hv_torch[i]:>32.15f} {hv_jax[i]:>32.15f}")
    err = float(np.max(np.abs(hv_torch - hv_jax)) / np.max(np.abs(hv_torch)))
    print(f"max relative difference over {len(v)} entries: {err:.2e}")
    assert err < 1e-12, err
    return err


if __name__ == "__main__":
    main()

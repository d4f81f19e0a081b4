"""Wrap any loss as a scipy LinearOperator and find its extreme eigenvalues.

The Hessian of an L2-regularized logistic regression, never materialized: scipy's ARPACK
(``eigsh``) only sees matrix-vector products, each one a Hessian-vector product computed by
automatic differentiation. The result is checked against the dense Hessian.

Run: ``python examples/scipy_operator.py [--backend torch|jax]``
"""

from __future__ import annotations

import argparse
import sys

import array_api_compat
import numpy as np
import scipy.sparse.linalg as spla

import hessop


def loss(w, X, y):
    """Logistic loss written once with the array API: runs in torch and in JAX."""
    xp = array_api_compat.array_namespace(w)
    z = X @ w
    return xp.mean(xp.log(1 + xp.exp(-z)) + (1 - y) * z) + 0.05 * xp.sum(w * w)


def require(framework: str) -> None:
    """Exit with the install command (not a bare ModuleNotFoundError) if it is missing."""
    if framework not in hessop.available_backends(installed=True):
        sys.exit(
            f"this example needs {framework}, which is not installed; from the repository "
            f'root: pip install -c constraints.txt -e ".[{framework}]"'
        )


def main(backend: str = "torch") -> dict[str, np.ndarray]:
    require(backend)
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 50))
    y = (rng.random(200) < 0.5).astype(np.float64)
    w0 = 0.1 * rng.standard_normal(50)

    H = hessop.hessian(loss, w0, X, y, backend=backend)
    A = H.to_scipy()  # numpy in, numpy out
    largest = spla.eigsh(A, k=3, which="LA", return_eigenvectors=False)
    smallest = spla.eigsh(A, k=3, which="SA", return_eigenvectors=False)
    dense = np.linalg.eigvalsh(np.asarray(H.to_dense()))
    print(f"backend={backend} mode={H.mode} d={H.shape[0]}")
    print("largest  (eigsh):", np.sort(largest)[::-1])
    print("largest  (dense):", dense[::-1][:3])
    print("smallest (eigsh):", np.sort(smallest))
    print("smallest (dense):", dense[:3])
    assert np.allclose(np.sort(largest), dense[-3:], rtol=1e-8)
    assert np.allclose(np.sort(smallest), dense[:3], rtol=1e-8)
    return {"largest": np.sort(largest), "smallest": np.sort(smallest)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "jax"])
    main(parser.parse_args().backend)

"""Where the algorithms spend their time: in the operator's products, or between them.

    python benchmarks/algorithms.py                        # torch and JAX, float32
    python benchmarks/algorithms.py --dtype float64 --only eigsh,scipy-eigsh
    python benchmarks/algorithms.py --quick                # a small MLP, a smoke test

The operator is the Hessian of an MLP 784-256-256-10 (269k parameters) on a batch of 512
random images, written as a function of a params dict with plain torch / jax.numpy ops and
built with ``hessop.hessian(loss, params, X, y)``. Every product goes through a thin
operator that times it (synchronizing JAX's asynchronous dispatch), so that each row says
how much of an algorithm's wall time was spent outside the products. Every algorithm runs
once to warm up (JAX compiles there), then ``--repeats`` rounds in a rotating order; the
table shows medians. ``scipy-eigsh`` is ``scipy.sparse.linalg.eigsh(H.to_scipy())`` at the
same tolerance. Writes a JSON report with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg as spla

import hessop

SIZES = (784, 256, 256, 10)
BATCH = 512


def mlp_hessian(framework: str, dtype: str, sizes: tuple[int, ...], batch: int) -> Any:
    """The Hessian operator of a tanh MLP with a softmax cross-entropy loss."""
    rng = np.random.default_rng(0)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"W{i}"] = (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(dtype)
        params[f"b{i}"] = (0.1 * rng.standard_normal(fan_out)).astype(dtype)
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    labels = rng.integers(0, sizes[-1], batch)
    Y = np.eye(sizes[-1], dtype=dtype)[labels]
    n = len(sizes) - 1
    if framework == "torch":
        import torch

        def loss(p: dict, X: Any, Y: Any) -> Any:
            h = X
            for i in range(n):
                h = h @ p[f"W{i}"].T + p[f"b{i}"]
                h = torch.tanh(h) if i < n - 1 else h
            return -(torch.log_softmax(h, dim=1) * Y).sum(dim=1).mean()

        conv = torch.as_tensor
    else:
        import jax
        import jax.numpy as jnp

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)

        def loss(p: dict, X: Any, Y: Any) -> Any:
            h = X
            for i in range(n):
                h = h @ p[f"W{i}"].T + p[f"b{i}"]
                h = jnp.tanh(h) if i < n - 1 else h
            return -(jax.nn.log_softmax(h, axis=1) * Y).sum(axis=1).mean()

        conv = jnp.asarray
    P = {k: conv(v) for k, v in params.items()}
    return hessop.hessian(loss, P, conv(X), conv(Y), backend=framework)


class Timed(hessop.LinearOperator):
    """``H`` whose products are timed (and counted, a matmat column counting one)."""

    def __init__(self, H: Any, sync: Callable[[Any], Any]) -> None:
        super().__init__(H.shape, H.dtype, H.backend, H.device, symmetric=True)
        self.H, self.sync = H, sync
        self.seconds, self.count = 0.0, 0

    def _timed(self, fn: Callable[[Any], Any], x: Any, n: int) -> Any:
        start = time.perf_counter()
        y = self.sync(fn(x))
        self.seconds += time.perf_counter() - start
        self.count += n
        return y

    def _matvec(self, v: Any) -> Any:
        return self._timed(self.H.matvec, v, 1)

    def _matmat(self, V: Any) -> Any:
        return self._timed(self.H.matmat, V, int(V.shape[1]))


def cases(H: Any, quick: bool) -> dict[str, Callable[[Any], Any]]:
    """name -> run(op): each algorithm as a user would call it on these sizes."""
    d = H.shape[0]
    b = H.asarray(np.random.default_rng(1).standard_normal(d))
    m = 8 if quick else 30
    return {
        "eigsh": lambda A: hessop.eigsh(A, 5, tol=1e-4),
        "scipy-eigsh": lambda A: spla.eigsh(A.to_scipy(), 5, which="LA", tol=1e-4),
        "lanczos": lambda A: hessop.lanczos(A, 2 * m),
        "power_iteration": lambda A: hessop.power_iteration(A, 1, tol=1e-4, maxiter=2 * m),
        "cg": lambda A: hessop.cg(A, b, damping=1.0, tol=1e-8, maxiter=2 * m),
        "trace:hutchinson": lambda A: hessop.trace(A, m),
        "trace:hutch++": lambda A: hessop.trace(A, m, method="hutch++"),
        "trace:xtrace": lambda A: hessop.trace(A, m, method="xtrace"),
        "diagonal:hutchinson": lambda A: hessop.diagonal(A, m),
        "diagonal:xdiag": lambda A: hessop.diagonal(A, m, method="xdiag"),
        "spectral_density": lambda A: hessop.spectral_density(A, num_probes=4, num_iter=m),
    }


def top_eigenvalues(result: Any, H: Any) -> list[float]:
    vals = result[0] if isinstance(result, tuple) else H.to_numpy(result.eigenvalues)
    return sorted(float(x) for x in np.asarray(vals))


def measure(framework: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes, batch = ((64, 32, 10), 64) if args.quick else (SIZES, BATCH)
    H = mlp_hessian(framework, args.dtype, sizes, batch)
    if framework == "jax":
        import jax

        sync = jax.block_until_ready
    else:
        sync = lambda y: y  # noqa: E731 - torch on the CPU is synchronous
    todo = cases(H, args.quick)
    names = [n for n in todo if not args.only or n in args.only]
    runs: dict[str, list[tuple[float, float, int]]] = {n: [] for n in names}
    eigenvalues: dict[str, list[float]] = {}
    for r in range(args.repeats + 1):  # round 0 warms up
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            op = Timed(H, sync)
            start = time.perf_counter()
            res = todo[name](op)
            wall = time.perf_counter() - start
            if r:
                runs[name].append((wall, op.seconds, op.count))
            if "eigsh" in name:
                eigenvalues[name] = top_eigenvalues(res, H)
            print(f"  {framework} round {r} {name}: {wall:.2f} s", file=sys.stderr)
    rows = []
    for name in names:
        wall, inside, count = (np.array(x) for x in zip(*runs[name]))
        outside = wall - inside
        rows.append(
            {
                "framework": framework,
                "dtype": args.dtype,
                "algorithm": name,
                "wall_s": float(np.median(wall)),
                "products": int(np.median(count)),
                "product_ms": float(np.median(inside / count) * 1e3),
                "outside_fraction": float(np.median(outside / wall)),
                "outside_ms_per_product": float(np.median(outside / count) * 1e3),
                "eigenvalues": eigenvalues.get(name),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| framework | dtype | algorithm | wall (s) | products | ms / product | "
        "outside products | outside ms / product |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['dtype']} | {r['algorithm']} | {r['wall_s']:.2f} | "
            f"{r['products']} | {r['product_ms']:.1f} | {r['outside_fraction']:.0%} | "
            f"{r['outside_ms_per_product']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="torch,jax")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", type=lambda s: s.split(","), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for framework in args.frameworks.split(","):
        if framework == "torch" and args.threads:
            import torch

            torch.set_num_threads(args.threads)
        rows += measure(framework, args)
    print(table(rows))
    if args.json:
        meta = {"python": platform.python_version(), "argv": argv, "rows": rows}
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Per-sample Hessians: hessop's vmap path against a Python loop and the summed-gradient trick.

The users' case (REFERENCES.md): a batch of B = 500 inputs of dimension n = 200, a 3-layer
MLP applied to each sample with a scalar head, f(x) = w3 . tanh(W2 tanh(W1 x + b1) + b2),
and the per-sample Hessians d^2 f / dx^2 of shape (B, n, n).

Methods (torch; JAX too unless --no-jax):
  hessop            hessop.per_sample_hessians(f, X)  (also with chunk_size = 10^4 // n)
  vmap(hessian)     torch.func.vmap(torch.func.hessian(f))(X), the textbook vmap
  loop func.hessian for x in X: torch.func.hessian(f)(x)        (vectorized per sample)
  loop plain        for x in X: torch.autograd.functional.hessian(f, x)  (no vectorize)
  summed-grad trick torch.autograd.functional.jacobian(x -> sum_i grad f(x_i), X,
                    vectorize=True): (n, B, n), since d grad f(x_i) / d x_j = 0 for i != j
Per-sample Jacobians (--jacobians, on by default): a 3-layer tanh MLP R^n -> R^m per
sample (hidden 200), for a wide (n=200, m=10), a tall (n=10, m=200) and a square (n=m=100)
Jacobian, B = --jac-batch samples, every strategy hessop.per_sample_jacobians can run:
  hessop auto               what hessop picks (the mode by n <= m, the strategy per framework)
  forward/summed-output     one JVP of the whole batch per input coordinate, vmapped
  forward/vmap-jacobian     vmap(jacfwd(f))
  reverse/summed-output     one VJP of the whole batch per output coordinate, vmapped
  reverse/vmap-jacobian     vmap(jacrev(f))
and the two strategies of hessop.output_hessians on one sample (n=50, m=20):
  forward-over-reverse      jacfwd(jacrev(f))
  reverse-over-reverse      a vmap over outputs k of jacrev(grad(<e_k, f>))
Each method is timed in interleaved rounds (one call of each per round) and the median is
reported. Slow methods can be timed on the first --subset samples and scaled by B / subset;
the output marks those rows "extrapolated". All results are checked against hessop's.

    python benchmarks/per_sample.py            # B=500, n=200
    python benchmarks/per_sample.py --quick    # small sizes, a few seconds
    python benchmarks/per_sample.py --no-hessians --jac-batch 256   # the Jacobian tables
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np

import hessop


def torch_methods(B: int, n: int, dtype: str, seed: int) -> tuple[dict, Callable]:
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    W1, W2 = (torch.randn(n, n, generator=g, dtype=dt) / n**0.5 for _ in range(2))
    b1, b2, w3 = (torch.randn(n, generator=g, dtype=dt) for _ in range(3))
    X = torch.randn(B, n, generator=g, dtype=dt)

    def f(x):  # one sample
        return w3 @ torch.tanh(W2 @ torch.tanh(W1 @ x + b1) + b2)

    def summed_grad(Xb):
        (gr,) = torch.autograd.grad(torch.func.vmap(f)(Xb).sum(), Xb, create_graph=True)
        return gr.sum(0)

    chunk = max(1, 10_000 // n)  # ~10^4 product rows per chunk: cache-sized on a CPU
    methods = {
        "hessop": lambda Xs: hessop.per_sample_hessians(f, Xs),
        f"hessop chunk_size={chunk}": lambda Xs: hessop.per_sample_hessians(
            f, Xs, chunk_size=chunk
        ),
        "vmap(hessian)": lambda Xs: torch.func.vmap(torch.func.hessian(f))(Xs),
        "loop func.hessian": lambda Xs: torch.stack([torch.func.hessian(f)(x) for x in Xs]),
        "loop plain": lambda Xs: torch.stack([torch.autograd.functional.hessian(f, x) for x in Xs]),
        "summed-grad trick": lambda Xs: torch.autograd.functional.jacobian(
            summed_grad, Xs, vectorize=True
        ).permute(1, 0, 2),
    }
    return methods, X


def jax_methods(B: int, n: int, dtype: str, seed: int) -> tuple[dict, object]:
    import jax
    import jax.numpy as jnp

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(seed)
    W1, W2 = (jnp.asarray(rng.standard_normal((n, n)) / n**0.5, dtype=dtype) for _ in range(2))
    b1, b2, w3 = (jnp.asarray(rng.standard_normal(n), dtype=dtype) for _ in range(3))
    X = jnp.asarray(rng.standard_normal((B, n)), dtype=dtype)

    def f(x):
        return w3 @ jnp.tanh(W2 @ jnp.tanh(W1 @ x + b1) + b2)

    hess = jax.jit(jax.hessian(f))
    hessop_jit = jax.jit(lambda Xs: hessop.per_sample_hessians(f, Xs))
    vmap_jit = jax.jit(jax.vmap(jax.hessian(f)))

    def block(fn):
        return lambda Xs: jax.block_until_ready(fn(Xs))

    methods = {
        "jax hessop (eager)": block(lambda Xs: hessop.per_sample_hessians(f, Xs)),
        "jax hessop (jit)": block(hessop_jit),
        "jax vmap(hessian) (jit)": block(vmap_jit),
        "jax loop hessian (jit)": block(lambda Xs: jnp.stack([hess(x) for x in Xs])),
    }
    return methods, X


@contextlib.contextmanager
def strategy(framework: str, **attributes: str) -> Iterator[None]:
    """Make hessop use the given strategies (Transforms class attributes) inside."""
    cls = type(hessop.get_backend(framework).transforms)
    saved = {k: getattr(cls, k) for k in attributes}
    for k, v in attributes.items():
        setattr(cls, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(cls, k, v)


def mlp(framework: str, sizes: tuple[int, ...], B: int, dtype: str, seed: int):
    """A tanh MLP for one sample, ``f(x) = W_L tanh(... tanh(W_1 x))`` with layer sizes
    ``sizes``, a batch X (B, sizes[0]) and the call that waits for the result."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((b, a)) / a**0.5 for a, b in zip(sizes, sizes[1:])]
    X = rng.standard_normal((B, sizes[0]))
    if framework == "torch":
        import torch

        Ws = [torch.as_tensor(a, dtype=getattr(torch, dtype)) for a in arrays]
        X, tanh, finish = torch.as_tensor(X, dtype=getattr(torch, dtype)), torch.tanh, None
    else:
        import jax
        import jax.numpy as jnp

        Ws = [jnp.asarray(a, dtype=dtype) for a in arrays]
        X, tanh, finish = jnp.asarray(X, dtype=dtype), jnp.tanh, jax.block_until_ready

    def f(x):
        for W in Ws[:-1]:
            x = tanh(W @ x)
        return Ws[-1] @ x

    return f, X, finish or (lambda y: y)


def with_strategy(framework: str, call: Callable, finish: Callable, **strategies) -> Callable:
    """``call`` run with hessop's strategies set (jitted in JAX: set while tracing)."""

    def inner(*a):
        with strategy(framework, **strategies):
            return call(*a)

    if framework == "jax":
        import jax

        inner = jax.jit(inner)  # the warm-up call of run() traces and compiles it
    return lambda *a: finish(inner(*a))


def jacobian_methods(framework: str, B: int, n: int, m: int, dtype: str, seed: int):
    """Every per-sample Jacobian strategy of hessop, on an MLP R^n -> 200 -> 200 -> R^m."""
    f, X, finish = mlp(framework, (n, 200, 200, m), B, dtype, seed)
    auto = with_strategy(framework, lambda Xs: hessop.per_sample_jacobians(f, Xs), finish)
    methods = {"hessop auto": auto}
    for mode in ("forward", "reverse"):
        for kind in ("summed-output", "vmap-jacobian"):
            methods[f"{mode}/{kind}"] = with_strategy(
                framework,
                lambda Xs, mode=mode: hessop.per_sample_jacobians(f, Xs, mode=mode),
                finish,
                **{"per_sample_jacfwd" if mode == "forward" else "per_sample_jacrev": kind},
            )
    return methods, X


def output_hessian_methods(framework: str, n: int, m: int, dtype: str, seed: int):
    """Both strategies of hessop.output_hessians, on one sample of an MLP R^n -> 100 -> R^m
    (the methods take a batch of one and return its Hessians with a leading 1)."""
    f, X, finish = mlp(framework, (n, 100, m), 1, dtype, seed)
    return {
        kind: with_strategy(
            framework,
            lambda Xs: hessop.output_hessians(f, Xs[0])[None],
            finish,
            output_hessian=kind,
        )
        for kind in ("forward-over-reverse", "reverse-over-reverse")
    }, X


def run(methods: dict, X, subsets: dict[str, int], repeats: int, ref_name: str) -> list[dict]:
    B = X.shape[0]
    sizes = {k: min(B, subsets.get(k, B)) for k in methods}
    results = {k: methods[k](X[: sizes[k]]) for k in methods}  # warm-up (compiles in JAX)
    ref = np.asarray(_numpy(results[ref_name]))
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):  # interleaved: every method once per round
        for k, fn in methods.items():
            Xs = X[: sizes[k]]
            t0 = time.perf_counter()
            fn(Xs)
            times[k].append(time.perf_counter() - t0)
    rows = []
    for k in methods:
        err = np.abs(_numpy(results[k]) - ref[: sizes[k]]).max() / np.abs(ref).max()
        med = statistics.median(times[k]) * B / sizes[k]
        rows.append({"method": k, "seconds": med, "samples_timed": sizes[k], "rel_err": err})
    return rows


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def report(rows: list[dict], ref_name: str, B: int) -> None:
    base = next(r["seconds"] for r in rows if r["method"] == ref_name)
    # speedup: this method's time over the reference's (how much faster the reference is)
    print(f"{'method':26s} {'median s':>10s} {'speedup':>9s}  rel. error   (reference: {ref_name})")
    for r in rows:
        note = "" if r["samples_timed"] == B else f"  (extrapolated from {r['samples_timed']})"
        print(
            f"{r['method']:26s} {r['seconds']:10.4f} {r['seconds'] / base:8.1f}x  "
            f"{r['rel_err']:.1e}{note}"
        )


def hessian_tables(a, B: int, n: int, frameworks: list[str]) -> dict:
    subsets = {} if a.quick else {
        "loop func.hessian": a.subset,
        "loop plain": max(1, a.subset // 5),
        "vmap(hessian)": a.vmap_subset,
        "jax loop hessian (jit)": a.subset,
    }  # fmt: skip
    out = {}
    print(f"per-sample Hessians, B={B}, n={n}, 3-layer tanh MLP, {a.dtype}")
    methods, X = torch_methods(B, n, a.dtype, a.seed)
    rows = run(methods, X, subsets, a.repeats, "hessop")
    report(rows, "hessop", B)
    out["torch"] = rows
    if "jax" in frameworks:
        print("\njax")
        methods, X = jax_methods(B, n, a.dtype, a.seed)
        rows = run(methods, X, subsets, a.repeats, "jax hessop (jit)")
        report(rows, "jax hessop (jit)", B)
        out["jax"] = rows
    return out


def jacobian_tables(a, frameworks: list[str]) -> dict:
    B = 16 if a.quick else a.jac_batch
    shapes = [(8, 3), (3, 8)] if a.quick else [(200, 10), (10, 200), (100, 100)]
    out = {}
    for fw in frameworks:
        jit = " (jit)" if fw == "jax" else ""
        for n, m in shapes:
            print(f"\n{fw}{jit}: per-sample Jacobians, B={B}, n={n} -> m={m}, {a.dtype}")
            methods, X = jacobian_methods(fw, B, n, m, a.dtype, a.seed)
            rows = run(methods, X, {}, a.repeats, "hessop auto")
            report(rows, "hessop auto", B)
            out[f"{fw} jacobians n={n} m={m}"] = rows
        n, m = (6, 3) if a.quick else (50, 20)
        print(f"\n{fw}{jit}: output_hessians of one sample, n={n} -> m={m}, {a.dtype}")
        methods, X = output_hessian_methods(fw, n, m, a.dtype, a.seed)
        ref = "forward-over-reverse"
        rows = run(methods, X, {}, a.repeats, ref)
        report(rows, ref, 1)
        out[f"{fw} output_hessians n={n} m={m}"] = rows
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--dim", type=int, default=200)
    p.add_argument("--jac-batch", type=int, default=256, help="samples for the Jacobians")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--subset", type=int, default=50, help="samples timed for the loops")
    p.add_argument("--vmap-subset", type=int, default=100, help="samples for vmap(hessian)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--no-jax", action="store_true")
    p.add_argument("--no-hessians", action="store_true")
    p.add_argument("--no-jacobians", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    a = p.parse_args(argv)
    B, n = (16, 8) if a.quick else (a.batch, a.dim)
    import torch

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    frameworks = ["torch"]
    if not a.no_jax:
        try:
            import jax
        except ImportError:
            print("jax not installed: skipped")
        else:
            print(f"jax {jax.__version__}")
            frameworks.append("jax")
            if a.dtype == "float64":
                jax.config.update("jax_enable_x64", True)
    out = {}
    if not a.no_hessians:
        out.update(hessian_tables(a, B, n, frameworks))
    if not a.no_jacobians:
        out.update(jacobian_tables(a, frameworks))
    return out


if __name__ == "__main__":
    main()

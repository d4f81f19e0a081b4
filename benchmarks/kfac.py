"""What KFAC costs next to a gradient, how close it is to curvlinops, and what it does to CG.

    python benchmarks/kfac.py                      # reference MLP and CNN, torch and JAX
    python benchmarks/kfac.py --models cnn --frameworks torch --repeats 3
    python benchmarks/kfac.py --json benchmarks/results/kfac.json

For each reference model (``hessop.bench.reference``, default sizes, one batch of
``--batch`` samples, float32 for the timings) and framework it times

* ``gradient``: one loss-and-gradient pass (torch autograd / ``jax.jit(jax.grad)``),
* ``factors``: ``hessop.model_kfac`` (KFAC, type-2 Fisher), the pass that computes the
  factors (its first call, which compiles in JAX, is a warm-up); ``factors+eigh`` adds the
  factors' eigendecompositions (done once, on the first inverse, trace, logdet or diagonal),
* ``product`` and ``inverse product``: ``K @ v`` and ``K.inverse(1e-3) @ v``,

each the median of ``--repeats`` interleaved rounds, and prints them with their ratio to
the gradient. Then, in float64: the largest difference to curvlinops' ``KFACLinearOperator``
(torch, 3 random vectors, relative to the largest entry) and between torch and JAX, and
the CG iterations to a relative residual of 1e-6 on the CNN's exact GGN with and without
``M=K.inverse(damping)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import hessop
from hessop.bench import reference as R


def median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Seconds per call of each function: medians of interleaved rounds (after a warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def setup(name: str, framework: str, dtype: str, batch: int) -> tuple:
    """``(model, loss, data, extra kwargs, gradient pass, a vector)`` of a reference model."""
    import torch

    spec = R.get_reference(name)
    model = spec.torch_model(seed=0, dtype=getattr(torch, dtype))
    v = np.random.default_rng(0).standard_normal(spec.num_params).astype(dtype)
    if framework == "torch":
        x, y = spec.make_batch(batch, seed=1, framework="torch", dtype=dtype)

        def grad() -> Any:
            model.zero_grad(set_to_none=True)
            spec.torch_loss(model(x), y).backward()
            return [p.grad for p in model.parameters()]

        return model, spec.torch_loss, (x, y), {}, grad, torch.from_numpy(v)
    import jax

    x, y = spec.make_batch(batch, seed=1, framework="jax", dtype=dtype)
    params = spec.jax_params_from_torch(model)
    g = jax.jit(jax.grad(lambda p: spec.jax_loss(spec.jax_apply(p, x), y)))

    def jgrad() -> Any:
        return jax.block_until_ready(g(params))

    extra = {"params": params}
    return spec.jax_apply, spec.jax_loss, (x, y), extra, jgrad, jax.numpy.asarray(v)


def costs(name: str, framework: str, batch: int, repeats: int) -> dict[str, float]:
    model, loss, data, extra, grad, v = setup(name, framework, "float32", batch)
    K = hessop.model_kfac(model, loss, data, **extra)
    inv = K.inverse(1e-3)
    if framework == "jax":
        import jax

        sync = jax.block_until_ready
    else:
        sync = lambda a: a  # noqa: E731
    t = median_times(
        {
            "gradient": grad,
            "factors": lambda: sync(hessop.model_kfac(model, loss, data, **extra).factors),
            "factors+eigh": lambda: sync(hessop.model_kfac(model, loss, data, **extra).trace()),
            "product": lambda: sync(K @ v),
            "inverse product": lambda: sync(inv @ v),
        },
        repeats,
    )
    return t


def agreement(name: str, batch: int) -> dict[str, float]:
    """float64: KFAC products of hessop (torch, JAX) and curvlinops with 3 random vectors."""
    import torch

    model, _, data, _, _, _ = setup(name, "torch", "float64", batch)
    loss = torch.nn.CrossEntropyLoss()  # curvlinops wants the module
    K = hessop.model_kfac(model, loss, data)
    V = torch.from_numpy(np.random.default_rng(2).standard_normal((K.shape[0], 3)))
    KV = (K @ V).numpy()
    out: dict[str, float] = {}
    try:
        import curvlinops

        C = curvlinops.KFACLinearOperator(  # its default fisher_type is "mc"
            model, loss, list(model.parameters()), [data],
            fisher_type="type-2", check_deterministic=False,
        )  # fmt: skip
        CV = (C @ V).numpy()
        out["vs curvlinops"] = float(np.abs(KV - CV).max() / np.abs(CV).max())
    except ImportError:
        pass
    try:
        jm, jl, jdata, extra, _, _ = setup(name, "jax", "float64", batch)
        Kj = hessop.model_kfac(jm, jl, jdata, **extra)
        JV = np.asarray(Kj @ Kj.asarray(V.numpy()))
        out["torch vs jax"] = float(np.abs(KV - JV).max() / np.abs(KV).max())
    except ImportError:
        pass
    return out


def cg_iterations(batch: int, dampings: tuple[float, ...]) -> list[dict[str, Any]]:
    """CG on the reference CNN's exact GGN, with and without the KFAC preconditioner."""
    import torch

    model, loss, data, _, _, _ = setup("cnn", "torch", "float64", batch)
    G = hessop.model_ggn(model, loss, data)
    K = hessop.model_kfac(model, loss, data)
    b = torch.from_numpy(np.random.default_rng(3).standard_normal(K.shape[0]))
    rows = []
    for d in dampings:
        plain = hessop.cg(G, b, damping=d, tol=1e-6, maxiter=2000)
        pre = hessop.cg(G, b, damping=d, tol=1e-6, maxiter=2000, M=K.inverse(d))
        rows.append(
            {"damping": d, "plain": plain.iterations, "kfac": pre.iterations,
             "converged": bool(plain.converged and pre.converged)}
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--frameworks", default="torch,jax")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dampings", default="1e-2,1e-3")
    ap.add_argument("--no-cg", action="store_true", help="skip the CG comparison")
    ap.add_argument("--no-costs", action="store_true", help="skip the timings")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
    except ImportError:
        pass
    report: dict[str, Any] = {"machine": platform.platform(), "batch": args.batch, "costs": {}}
    heads = ("factors", "factors+eigh", "product", "inverse prod.")
    print(f"{'model':5} {'framework':9} {'gradient':>10} " + " ".join(f"{h:>20}" for h in heads))
    for name in [] if args.no_costs else args.models.split(","):
        for fw in args.frameworks.split(","):
            t = costs(name, fw, args.batch, args.repeats)
            report["costs"][f"{name}/{fw}"] = t
            cells = [f"{t[k] * 1e3:9.2f} ms ({t[k] / t['gradient']:5.2f}x)" for k in list(t)[1:]]
            print(f"{name:5} {fw:9} {t['gradient'] * 1e3:7.2f} ms " + " ".join(cells), flush=True)
    report["agreement"] = {name: agreement(name, args.batch) for name in args.models.split(",")}
    print("float64 agreement (max |difference| / max |entry|):", report["agreement"])
    if not args.no_cg:
        dampings = tuple(float(d) for d in args.dampings.split(","))
        report["cg"] = cg_iterations(args.batch, dampings)
        for row in report["cg"]:
            print(f"CG on the CNN's GGN, damping {row['damping']:g}: {row['plain']} iterations, "
                  f"{row['kfac']} with M=K.inverse(damping)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

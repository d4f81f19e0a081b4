"""What the model-level API costs next to a gradient and to the hand-written product.

    python benchmarks/model_level.py                        # torch and JAX, MLP, CNN, transformer
    python benchmarks/model_level.py --frameworks torch --models mlp --repeats 21
    python benchmarks/model_level.py --json benchmarks/results/model-level.json

For each reference model (``hessop.bench.reference``, float32, one batch of 128 / 32 / 32
samples for the MLP / CNN / transformer, the issue's sizes) and framework it times, each as
the median of ``--repeats`` interleaved rounds and as a ratio to the gradient measured in
the same round loop:

* ``gradient``: one gradient of ``loss_fn(model(x), y)`` (torch autograd; ``jax.jit(jax.grad)``),
* ``hand``: the hand-written HVP of the mode hessop's ``auto`` picks (torch: double backward,
  reverse-over-reverse; JAX: the jitted ``jax.jvp`` of ``jax.grad``, forward-over-reverse),
  on parameter-shaped tensors; ``hand flat``: the same with a flat vector in and out, as
  ``H @ v`` takes and returns (torch: plus one ``torch.cat``; JAX: ravel inside the jit),
* ``build``: ``hessop.model_hessian(model, loss_fn, (x, y))`` alone (a new operator: what a
  training loop, a per-batch sharpness probe or a Newton step pays per batch),
* ``build+mv``: the same and one product ``H @ v`` (flat ``v``),
* ``model_hvp``: ``hessop.model_hvp(model, loss_fn, x, y, v)`` (flat ``v``),
* ``ggn build`` and ``fisher build``: ``hessop.model_ggn`` / ``hessop.model_fisher`` alone.

The targets (issue #15): every build <= 0.05x a gradient; ``build+mv`` and ``model_hvp``
within 5% of ``hand``. Use one intra-op thread (``--threads 1``, the default) on a shared
machine: the figures are steadier.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import hessop
from hessop.bench import reference as R

BATCH = {"mlp": 128, "cnn": 32, "transformer": 32}
COLUMNS = (
    "gradient",
    "hand",
    "hand flat",
    "build",
    "build+mv",
    "model_hvp",
    "ggn build",
    "fisher build",
)


def torch_cases(name: str) -> dict[str, Callable[[], Any]]:
    import torch

    spec = R.get_reference(name)
    model = spec.torch_model(seed=0)
    x, y = spec.make_batch(BATCH[name], seed=0, framework="torch")
    loss_fn = torch.nn.CrossEntropyLoss()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(p.shape, generator=gen) for p in params]
    v = torch.cat([t.reshape(-1) for t in vs])

    def gradient() -> Any:
        return torch.autograd.grad(loss_fn(model(x), y), params)

    def hand() -> Any:
        g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        return torch.autograd.grad(g, params, vs)

    def hand_flat() -> Any:  # flat in and out, like H @ v
        return torch.cat([t.reshape(-1) for t in hand()])

    cases = _hessop_cases(model, loss_fn, (x, y), v, {}, gradient, hand, lambda out: out)
    return {**cases, "hand flat": hand_flat}


def jax_cases(name: str) -> dict[str, Callable[[], Any]]:
    import jax
    import jax.flatten_util
    import numpy as np

    spec = R.get_reference(name)
    params = spec.jax_params(seed=0)
    x, y = spec.make_batch(BATCH[name], seed=0, framework="jax")
    objective = spec.jax_objective
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    rng = np.random.default_rng(0)
    v = jax.numpy.asarray(rng.standard_normal(flat.shape[0]).astype(np.float32))
    vt = unravel(v)
    grad = jax.jit(jax.grad(objective))
    hvp = jax.jit(lambda p, t, x, y: jax.jvp(lambda q: grad(q, x, y), (p,), (t,))[1])
    hvp_flat = jax.jit(
        lambda p, v, x, y: jax.flatten_util.ravel_pytree(hvp(p, unravel(v), x, y))[0]
    )

    def ready(out: Any) -> Any:
        return jax.block_until_ready(out)

    cases = _hessop_cases(
        spec.jax_apply,
        spec.jax_loss,
        (x, y),
        v,
        {"params": params},
        lambda: ready(grad(params, x, y)),
        lambda: ready(hvp(params, vt, x, y)),
        ready,
    )
    return {**cases, "hand flat": lambda: ready(hvp_flat(params, v, x, y))}


def _hessop_cases(
    model: Any,
    loss_fn: Any,
    batch: tuple[Any, Any],
    v: Any,
    kw: dict[str, Any],
    gradient: Callable[[], Any],
    hand: Callable[[], Any],
    ready: Callable[[Any], Any],
) -> dict[str, Callable[[], Any]]:
    x, y = batch
    return {
        "gradient": gradient,
        "hand": hand,
        "build": lambda: hessop.model_hessian(model, loss_fn, batch, **kw),
        "build+mv": lambda: ready(hessop.model_hessian(model, loss_fn, batch, **kw) @ v),
        "model_hvp": lambda: ready(hessop.model_hvp(model, loss_fn, x, y, v, **kw)),
        "ggn build": lambda: hessop.model_ggn(model, loss_fn, batch, **kw),
        "fisher build": lambda: hessop.model_fisher(model, loss_fn, batch, **kw),
    }


def measure(
    cases: dict[str, Callable[[], Any]],
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per case over ``repeats`` interleaved rounds (after two warm-ups)."""
    for fn in cases.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t = clock()
            fn()
            times[k].append(clock() - t)
    return {k: statistics.median(t) for k, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frameworks", nargs="+", default=["torch", "jax"])
    ap.add_argument("--models", nargs="+", default=list(BATCH))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time, the process's CPU time, "
        "which a loaded machine inflates less (torch with one thread computes in the caller's "
        "thread; XLA's threads are summed)",
    )
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if "torch" in args.frameworks:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'':22s}" + "".join(f"{c:>13s}" for c in COLUMNS))
    for fw in args.frameworks:
        for name in args.models:
            cases = (torch_cases if fw == "torch" else jax_cases)(name)
            clock = time.perf_counter if args.clock == "wall" else time.process_time
            t = measure(cases, args.repeats, clock)
            ratios = {k: t[k] / t["gradient"] for k in COLUMNS}
            rows.append({"framework": fw, "model": name, "seconds": t, "ratio": ratios})
            head = f"{fw} {name} ({t['gradient'] * 1e3:.1f} ms)"
            print(f"{head:22s}" + "".join(f"{ratios[c]:13.3f}" for c in COLUMNS), flush=True)
    report = {
        "what": "median seconds and ratio to the gradient; interleaved rounds",
        "repeats": args.repeats,
        "threads": args.threads,
        "clock": args.clock,
        "machine": platform.platform(),
        "versions": {"hessop": getattr(hessop, "__version__", "?")},
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()

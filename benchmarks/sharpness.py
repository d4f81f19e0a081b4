"""SharpnessTracker on the reference MLP: HVPs per measurement warm vs cold, and the error.

Trains the reference MLP (784-512-512-10, tanh, float64, one batch of 128 with
cross-entropy) with SGD and measures the top Hessian eigenvalue every ``--every`` steps with
three solvers at the same steps:

* ``warm``: ``hessop.SharpnessTracker`` (starts from the previous measurement's vectors);
* ``cold``: the same tracker with ``warm_start=False`` (random start every time);
* ``eigsh``: ``hessop.eigsh(H, k=1, tol=1e-10)`` from a random start, the reference.

Reports the products per measurement (the first, then the median and maximum of the rest)
and the largest relative error of each tracker against eigsh.

Run: ``python benchmarks/sharpness.py [--framework torch|jax] [--steps 20] [--every 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import hessop
from hessop.bench import reference as R


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--framework", default="torch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--sizes", default="784,512,512,10")
    args = ap.parse_args()
    spec = R.get_reference("mlp", sizes=tuple(int(s) for s in args.sizes.split(",")))
    fw = args.framework
    x, y = spec.make_batch(128, seed=0, framework=fw, dtype="float64")
    kw = {"k": args.k, "tol": args.tol, "every": args.every}
    warm = hessop.SharpnessTracker(**kw)
    cold = hessop.SharpnessTracker(warm_start=False, **kw)
    ref, errors = [], {"warm": [], "cold": []}
    if fw == "torch":
        import torch

        torch.set_num_threads(1)
        model = spec.torch_model(seed=0, dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        measure = lambda tracker: tracker(model, spec.torch_loss, (x, y))  # noqa: E731
        operator = lambda: hessop.model_hessian(model, spec.torch_loss, (x, y))  # noqa: E731

        def step():
            opt.zero_grad()
            spec.torch_loss(model(x), y).backward()
            opt.step()
    else:
        import jax

        jax.config.update("jax_enable_x64", True)
        state = {"p": spec.jax_params(seed=0, dtype="float64")}
        x, y = spec.make_batch(128, seed=0, framework=fw, dtype="float64")
        grad = jax.jit(jax.grad(spec.jax_objective))
        measure = lambda tracker: tracker(  # noqa: E731
            spec.jax_apply, spec.jax_loss, (x, y), params=state["p"]
        )
        operator = lambda: hessop.model_hessian(  # noqa: E731
            spec.jax_apply, spec.jax_loss, (x, y), params=state["p"]
        )

        def step():
            g = grad(state["p"], x, y)
            state["p"] = {n: v - args.lr * g[n] for n, v in state["p"].items()}

    seconds = {"warm": [], "cold": [], "eigsh": []}
    for i in range(args.steps):
        recs = {}
        for name, tracker in (("warm", warm), ("cold", cold)):
            recs[name] = measure(tracker)
            if recs[name] is not None:
                seconds[name].append(recs[name].seconds)
        if recs["warm"] is not None:
            t = time.perf_counter()
            res = hessop.eigsh(operator(), k=args.k, tol=1e-10)
            seconds["eigsh"].append(time.perf_counter() - t)
            top = float(np.sort(operator().to_numpy(res.eigenvalues))[-1])
            ref.append(res.num_matvecs)
            for name in ("warm", "cold"):
                errors[name].append(abs(recs[name].sharpness - top) / abs(top))
            print(f"step {i}: sharpness {top:.6f}; HVPs warm {recs['warm'].num_matvecs}, "
                  f"cold {recs['cold'].num_matvecs}, eigsh {res.num_matvecs}; relative error "
                  f"warm {errors['warm'][-1]:.1e}, cold {errors['cold'][-1]:.1e}")  # fmt: skip
        step()
    for name, tracker in (("warm", warm), ("cold", cold)):
        cost = [r.num_matvecs for r in tracker.history]
        print(f"{name}: first {cost[0]} HVPs, then median {statistics.median(cost[1:])}, "
              f"max {max(cost[1:])}; median {statistics.median(seconds[name]):.2f} s per "
              f"measurement; max relative error vs eigsh {max(errors[name]):.1e}")  # fmt: skip
    print(f"eigsh (tol 1e-10): median {statistics.median(ref)} HVPs, "
          f"{statistics.median(seconds['eigsh']):.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()

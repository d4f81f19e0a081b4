"""curvature_by_layer: three ways to organize the products of the diagonal blocks.

All three compute the same numbers for each group g of the reference MLP (784-512-512-10,
one module per group): the top eigenvalue of the diagonal block ``H_gg`` by the same
Rayleigh-Ritz solver from the same start vectors, and a Hutchinson trace.

* ``blocks`` (what ``hessop.curvature_by_layer`` does): every round, one call of the
  operator's ``diagonal_block_products`` for all unfinished groups, one pass over the data;
  each block differentiated with respect to its own parameters only (torch: one gradient
  graph per batch, a restricted backward per block; JAX: a compiled function per group).
  Each group's trace probes (in the group's own coordinates) join the first round.
* ``masked``: the same rounds, but each group's vector scattered into a full-model vector
  (zeros elsewhere) and multiplied by the full Hessian (``matmat``): every column costs a
  full Hessian-vector product.
* ``per-group``: ``model_hessian`` of each group's parameters alone (the others closed over
  in JAX), solved one group after the other, with its own probes.

Run: ``python benchmarks/layers.py [--framework torch|jax] [--repeats 3] [--batches 1]``.
Times are medians over interleaved repeats (one warm-up round first, which compiles in JAX).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import hessop
import hessop.models.layers as layers
from hessop.algorithms._subspace import RitzProblem, lockstep, random_block
from hessop.bench import reference as R


def per_group(model, loss, data, groups, tol, num_probes, kw):
    """One operator per group, each solved on its own."""
    rng = np.random.default_rng(0)
    passes, products = 0, 0
    for names in groups.values():
        if "params" in kw:  # a pytree: close over the other entries
            params = kw["params"]
            rest = {n: v for n, v in params.items() if n not in names}
            H = hessop.model_hessian(
                lambda sub, x, rest=rest: model({**rest, **sub}, x),
                loss,
                data,
                params={n: params[n] for n in names},
            )
        else:
            H = hessop.model_hessian(model, loss, data, params=names)
        p = RitzProblem(H, H.asarray(random_block(rng, H.shape[0], 1)), 1, tol=tol, ncv=20,
                        max_matvecs=500)  # fmt: skip
        passes += lockstep([p], lambda blocks, _, H=H: [H.matmat(blocks[0])])
        Z = H.asarray(rng.integers(0, 2, size=(H.shape[0], num_probes)) * 2.0 - 1.0)
        float(H.xp.mean(H.xp.sum(Z * H.matmat(Z), axis=0)))
        passes += 1
        products += p.num_matvecs + num_probes
    return passes, products


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--framework", default="torch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--only", default="blocks,masked,per-group")
    args = ap.parse_args()
    spec = R.get_reference("mlp")
    fw = args.framework
    batches = [spec.make_batch(args.batch_size, seed=i, framework=fw, dtype="float32")
               for i in range(args.batches)]  # fmt: skip
    data = batches[0] if args.batches == 1 else batches
    if fw == "torch":
        import torch

        torch.set_num_threads(1)
        model, loss, kw = spec.torch_model(seed=0, dtype=torch.float32), spec.torch_loss, {}
    else:
        model, loss = spec.jax_apply, spec.jax_loss
        kw = {"params": spec.jax_params(seed=0, dtype="float32")}
    groups = {f"layers.{i}": [f"layers.{i}.weight", f"layers.{i}.bias"] for i in range(3)}
    by_module = {n: g for g, names in groups.items() for n in names}
    original = layers.curvature_operator

    def run(masked: bool):
        def operator(*a, **k):
            A = original(*a, **k)
            if masked:
                A._kernel.block_products = False  # the generic path: full products
            return A

        layers.curvature_operator = operator
        try:
            res = hessop.curvature_by_layer(model, loss, data, groups=by_module, tol=args.tol,
                                            num_probes=args.probes, **kw)  # fmt: skip
        finally:
            layers.curvature_operator = original
        return res.num_passes, res.num_matvecs, res

    strategies = {
        "blocks": lambda: run(False),
        "masked": lambda: run(True),
        "per-group": lambda: per_group(model, loss, data, groups, args.tol, args.probes, kw),
    }
    chosen = args.only.split(",")
    times: dict[str, list[float]] = {name: [] for name in chosen}
    for r in range(args.repeats + 1):
        for name in chosen:
            t = time.perf_counter()
            out = strategies[name]()
            if r == 0:
                print(f"{name}: {out[0]} passes, {out[1]} products")
                if name == "blocks":
                    print(out[2])
                continue  # warm-up
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.2f} s over {len(ts)} ({fw}, "
              f"{args.batches} batch(es) of {args.batch_size})")  # fmt: skip


if __name__ == "__main__":
    main()

"""Cold and warm ``compile_time`` of ``compile=True`` in fresh processes.

Each measurement is a new Python process that builds ``hessop.hessian(..., compile=True)`` for
a reference model (float32, CPU) with ``hessop.enable_compilation_cache(folder)`` and prints
``H.compile_time``. "cold": a new empty folder; "warm": a folder that an earlier process
filled. Rounds interleave the cases: round r runs, per framework and model, one cold process
(in a fresh folder) and one warm process (in the folder of round 0's cold process).

    python benchmarks/compile_cache.py --models mlp cnn --frameworks torch jax --rounds 2

Prints one JSON line per process, then the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time
import hessop
from hessop.bench.reference import get_reference

fw, model, batch, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
hessop.enable_compilation_cache(folder)
spec = get_reference(model)
if fw == "torch":
    import torch
    from torch.func import functional_call

    net = spec.torch_model(seed=0, dtype=torch.float32)
    params = {n: p.detach() for n, p in net.named_parameters()}
    x, y = spec.make_batch(batch, framework="torch", dtype="float32")

    def f(p, x, y):
        return spec.torch_loss(functional_call(net, p, (x,)), y)
else:
    params = spec.jax_params(seed=0, dtype="float32")
    x, y = spec.make_batch(batch, framework="jax", dtype="float32")
    f = spec.jax_objective
start = time.perf_counter()
H = hessop.hessian(f, params, x, y, backend=fw, compile=True)
print(json.dumps({"compile_time": H.compile_time, "build": time.perf_counter() - start}))
"""


def run_child(fw: str, model: str, batch: int, folder: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, fw, model, str(batch), folder],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cases = [(fw, m) for m in args.models for fw in args.frameworks]
    warm_folder = {}
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for fw, model in cases:
            cold = tempfile.mkdtemp(prefix="hessop-cold-")
            warm_folder.setdefault((fw, model), cold)
            runs = [("cold", cold), ("warm", warm_folder[(fw, model)])]
            for kind, folder in runs:  # round 0: the cold process fills the warm folder
                res = run_child(fw, model, args.batch, folder)
                res.update(framework=fw, model=model, kind=kind, round=r)
                print(json.dumps(res), flush=True)
                times.setdefault((fw, model, kind), []).append(res["compile_time"])
    print("\nmedian compile_time (s), batch", args.batch)
    for (fw, model, kind), ts in times.items():
        print(f"{fw:6} {model:5} {kind:5} {statistics.median(ts):7.1f}  ({len(ts)} runs: {ts})")


if __name__ == "__main__":
    main()

"""Peak memory of a torch HVP at a new point, next to what the framework itself needs.

    python benchmarks/memory.py                          # the bench's MLP, CNN, transformer
    python benchmarks/memory.py --models mlp --json benchmarks/results/memory-cpu.json

Each figure is the peak memory one call adds (``hessop.bench.memory``: the growth of the
resident set size over the call after a warm-up call, on a CPU; one fresh process per row
and model), as a ratio to a gradient's, on the models and batches of ``hessop bench``
(float32). The rows break an HVP down into what the framework cannot avoid and what hessop
adds:

* ``gradient``: ``torch.autograd.grad(loss, params)``, the unit;
* ``gradient graph``: the same with ``create_graph=True``, returned: the first pass of a
  reverse-over-reverse product, whose graph the second pass walks;
* ``hand``: the hand-written double backward, ``grad(grad(loss, create_graph=True), v)``
  on parameter-shaped tensors (results per leaf);
* ``hand flat``: the same and one ``torch.cat`` of the results: a flat vector out, as
  ``H @ v`` returns;
* ``hvp:<mode>``: ``hessop.hessian(...)`` and one product ``H @ v``, per AD mode.

The target (issue #15) is an HVP at most 2x a gradient, or, where the framework's own double
backward (``hand``) needs more, no more than it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

ROWS = (
    "gradient",
    "gradient graph",
    "hand",
    "hand flat",
    "hvp:rev-rev",
    "hvp:fwd-rev",
    "hvp:rev-fwd",
)
MODELS = ("mlp", "cnn", "transformer")


def row_fn(model: str, row: str) -> Callable[[], Any]:
    import torch

    from hessop.bench.cases import build_case
    from hessop.bench.config import BenchConfig

    torch.set_num_threads(1)
    s = build_case("torch", model, BenchConfig()).setup
    hand = s.hand["rev-rev"]
    if row == "gradient":
        return s.gradient
    if row == "gradient graph":

        def gradient_graph() -> Any:
            ws = {k: p.detach().requires_grad_(True) for k, p in s.params.items()}
            return torch.autograd.grad(s.f(ws, s.x, s.y), list(ws.values()), create_graph=True)

        return gradient_graph
    if row == "hand":
        return hand
    if row == "hand flat":
        return lambda: torch.cat([r.reshape(-1) for r in hand()])
    mode = row.removeprefix("hvp:")
    return lambda: s.hessian(mode=mode).matvec(s.v)


def measure(model: str, row: str) -> int:
    """Bytes one call of ``row`` adds at its peak (run in a fresh process)."""
    from hessop.bench.memory import _reset_peak_rss, _status_bytes

    fn = row_fn(model, row)
    fn()  # warm-up: lazy initialization, allocator
    gc.collect()
    if not _reset_peak_rss():
        raise OSError("cannot reset the peak RSS (/proc/self/clear_refs): Linux only")
    base = _status_bytes("VmRSS")
    out = fn()
    peak = _status_bytes("VmHWM") - base
    del out
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("PEAK", measure(*args.child))
        return
    # Large blocks get their own mmap and go back to the system when freed (glibc), so that
    # the resident set size follows what is live.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results: dict[str, dict[str, int]] = {}
    print("| model | " + " | ".join(ROWS) + " |")
    print("|---" * (len(ROWS) + 1) + "|")
    for model in args.models.split(","):
        peaks = {}
        for row in ROWS:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", model, row],
                capture_output=True,
                text=True,
                env=env,
            )
            line = [s for s in proc.stdout.splitlines() if s.startswith("PEAK ")]
            if proc.returncode or not line:
                raise RuntimeError(f"{model} {row}: {proc.stderr.strip()[-500:]}")
            peaks[row] = int(line[0].split()[1])
        results[model] = peaks
        unit = peaks["gradient"]
        cells = [f"{unit / 2**20:.1f} MB"] + [f"{peaks[r] / unit:.2f}" for r in ROWS[1:]]
        print(f"| {model} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"peak_bytes": results, "rows": ROWS}, fh, indent=1)


if __name__ == "__main__":
    main()

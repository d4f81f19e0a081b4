"""Reproduce the figures of benchmarks/README.md.

    python benchmarks/run.py                 # the default `hessop bench` (3 min on idle cores)
    python benchmarks/run.py --reference     # the issue's reference batch sizes, k = 16
    python benchmarks/run.py --peers         # also curvlinops, PyHessian, hessian-eigenthings
    python benchmarks/run.py --compile       # also hessian(..., compile=True)

Writes benchmarks/results/<name>.json and .png, and prints the table of benchmarks/README.md
(the same as ``python benchmarks/table.py benchmarks/results/<name>.json``). Any other option
is passed to ``hessop bench``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hessop import cli

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from table import markdown_table  # noqa: E402

REFERENCE = ["--batch-size", "mlp=128,cnn=32,transformer=32", "--k", "16"]


def main(argv: list[str]) -> int:
    name = "cpu-default"
    extra = list(argv)
    if "--reference" in extra:
        extra.remove("--reference")
        extra += REFERENCE
        name = "cpu-reference"
    for flag in ("--peers", "--compile"):
        if flag in extra:
            name += "-" + flag[2:]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    status = cli.main(["bench", "--json", str(path), "--plot", str(out / f"{name}.png"), *extra])
    if status == 0:
        print()
        print(markdown_table(json.loads(path.read_text())))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

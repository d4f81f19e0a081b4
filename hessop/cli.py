"""The ``hessop`` command line (argparse only; the work is in :mod:`hessop.bench`).

``hessop bench`` measures what a Hessian-vector product (HVP) costs next to a gradient on
the reference models in every installed framework, prints a table per model and a short
summary, and saves the JSON report and a figure to ``./hessop-bench/``. Run
``hessop bench --help`` for the options.

Examples
--------
>>> from hessop.cli import build_parser, config_from_args
>>> config = config_from_args(build_parser().parse_args(["bench", "--quick", "--repeats", "2"]))
>>> config.models, config.repeats, config.memory
(['mlp'], 2, 'off')
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hessop import __version__
from hessop.bench.config import (
    BENCH_MODES,
    DEFAULT_BATCH_SIZES,
    DEFAULT_K,
    DEFAULT_REPEATS,
    FRAMEWORKS,
    MODELS,
    QUICK_BATCH_SIZE,
    QUICK_K,
    QUICK_MODELS,
    QUICK_REPEATS,
    BenchConfig,
    installed,
)

_DESCRIPTION = """\
Time a gradient and Hessian-vector products (HVPs: every AD mode at a new point, a reused
operator, k columns at once, the same products written by hand) on the reference models
(MLP, residual CNN, transformer) in each installed framework, and measure their peak
memory in fresh processes. Prints a table per model and ends with a summary: the fastest
mode per framework and model and its cost as a multiple of a gradient, hessop against the
hand-written code (and the peer libraries with --peers), the peak memory. Saves the JSON
report and a figure to ./hessop-bench/ unless --no-save.

The defaults take about 2 minutes on 2 idle CPU cores and several times longer when other
jobs share them (17-26 minutes at a load of 5-13 on 2 cores); --quick is a smoke test
of every mode on a tiny MLP (about 10 s)."""


def _csv(valid: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"invalid choice {', '.join(bad) or repr(text)}; choose from {', '.join(valid)} "
                "(comma-separated)"
            )
        return list(dict.fromkeys(items))

    return parse


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _batch_sizes(text: str) -> dict[str, int] | int:
    """``128`` (every model) or ``mlp=128,cnn=32``."""
    if "=" not in text:
        return _positive(text)
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MODELS:
            raise argparse.ArgumentTypeError(
                f"unknown model {name!r} in --batch-size; choose from {', '.join(MODELS)}"
            )
        out[name] = _positive(value)
    return out


def _add_what_options(bench: argparse.ArgumentParser) -> None:
    """Options that choose what is measured."""
    defaults = ",".join(f"{k}={v}" for k, v in DEFAULT_BATCH_SIZES.items())
    bench.add_argument(
        "--models",
        type=_csv(MODELS),
        default=None,
        help=f"comma-separated models (default: {','.join(MODELS)}; "
        f"{','.join(QUICK_MODELS)} with --quick)",
    )
    bench.add_argument(
        "--frameworks",
        type=_csv(FRAMEWORKS),
        default=list(FRAMEWORKS),
        help=f"comma-separated frameworks (default: {','.join(FRAMEWORKS)}; those not "
        "installed are skipped)",
    )
    bench.add_argument(
        "--modes",
        type=_csv(BENCH_MODES),
        default=list(BENCH_MODES),
        help=f"comma-separated AD modes (default: {','.join(BENCH_MODES)})",
    )
    bench.add_argument(
        "--batch-size",
        type=_batch_sizes,
        default=None,
        help="one batch size for every model, or per model: mlp=128,cnn=32,transformer=32 "
        f"(default {defaults}; {QUICK_BATCH_SIZE} with --quick)",
    )
    bench.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        help=f"timed rounds (default {DEFAULT_REPEATS}; {QUICK_REPEATS} with --quick)",
    )
    bench.add_argument(
        "--k",
        type=_positive,
        default=None,
        help=f"columns of the matmat (default {DEFAULT_K}; {QUICK_K} with --quick)",
    )
    bench.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="(default: float32)"
    )
    bench.add_argument(
        "--memory",
        choices=("isolated", "grouped", "off"),
        default=None,
        help="peak memory: one fresh process per measurement (isolated, the default), one "
        "per framework and model (grouped), or not at all (off, the --quick default)",
    )
    bench.add_argument(
        "--memory-reused",
        action="store_true",
        help="also measure the memory of a reused operator (its kept state and two products)",
    )
    bench.add_argument(
        "--peers",
        action="store_true",
        help="also time curvlinops, PyHessian and hessian-eigenthings (torch) when installed",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="also time HVPs at a new point with hessian(..., compile=True) and report the "
        "one-time compilation (torch.compile takes 10-60 s per model on 2 CPU cores)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test in seconds: the tiny MLP only (add --models for the tiny CNN and "
        "transformer, whose JAX compilations take about a minute), "
        f"{QUICK_REPEATS} rounds, no memory processes, one torch thread",
    )
    bench.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch intra-op threads (default: torch's own choice; 1 with --quick); 1 is "
        "steadier on a machine shared with other jobs. JAX's CPU threads are set by XLA at "
        "startup.",
    )
    bench.add_argument("--seed", type=int, default=0, help="seed of weights, data and vectors")


def _add_output_options(bench: argparse.ArgumentParser) -> None:
    """Options that choose what is printed and saved."""
    bench.add_argument(
        "--out",
        metavar="DIR",
        default="hessop-bench",
        help="folder of the saved results, <date>-<time>-<machine>.json and .png "
        "(default: ./hessop-bench)",
    )
    bench.add_argument("--no-save", action="store_true", help="save nothing by default")
    bench.add_argument("--json", metavar="PATH", help="write the JSON report to PATH instead")
    bench.add_argument(
        "--plot", metavar="PNG", help="write the figure to PNG instead (needs matplotlib)"
    )
    bench.add_argument(
        "--targets",
        action="store_true",
        help="also print the project's performance goals (for example a new-point HVP at "
        "most 2.5x a gradient in torch, 2.2x in JAX; hessop at most 5%% slower than the "
        "hand-written product) and whether this run met each; benchmarks/README.md "
        "explains them and the misses on a CPU",
    )
    bench.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (a bar on a terminal, otherwise a line per phase)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``hessop`` argument parser (one command, ``bench``)."""
    parser = argparse.ArgumentParser(
        prog="hessop", description="Matrix-free Hessian operators for PyTorch and JAX."
    )
    parser.add_argument("--version", action="version", version=f"hessop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench}", required=True)
    bench = sub.add_parser(
        "bench",
        help="time HVPs against a gradient on the reference models",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_what_options(bench)
    _add_output_options(bench)
    bench.set_defaults(func=_cmd_bench)
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`~hessop.bench.config.BenchConfig` of parsed ``bench`` arguments."""
    base = BenchConfig.quick_defaults() if args.quick else BenchConfig()
    batch = dict(base.batch_sizes)
    if isinstance(args.batch_size, int):
        batch = {m: args.batch_size for m in MODELS}
    elif isinstance(args.batch_size, dict):
        batch.update(args.batch_size)
    return BenchConfig(
        models=args.models or base.models,
        frameworks=args.frameworks,
        modes=args.modes,
        batch_sizes=batch,
        repeats=args.repeats or base.repeats,
        k=args.k or base.k,
        dtype=args.dtype,
        memory=args.memory or base.memory,
        memory_reused=bool(args.memory_reused),
        threads=args.threads or base.threads,
        peers=bool(args.peers),
        compile=bool(args.compile),
        quick=base.quick,
        seed=args.seed,
    )


def _save(report: dict, args: argparse.Namespace) -> list[str]:
    """Write the JSON report and the figure; return what was written (or why not)."""
    from hessop.bench.plot import plot_report
    from hessop.bench.report import default_paths

    json_path, png_path = default_paths(report, args.out)
    json_path = Path(args.json) if args.json else None if args.no_save else json_path
    png_path = Path(args.plot) if args.plot else None if args.no_save else png_path
    written = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
        written.append(str(json_path))
    if png_path is not None and installed("matplotlib"):
        png_path.parent.mkdir(parents=True, exist_ok=True)
        plot_report(report, str(png_path))
        written.append(str(png_path))
    elif png_path is not None:
        report["notes"].append("no figure: matplotlib is not installed (pip install hessop[plot])")
    return written


def _cmd_bench(args: argparse.Namespace) -> int:
    from hessop.bench.report import format_summary, format_table, format_targets
    from hessop.bench.runner import run_bench

    if args.plot and not installed("matplotlib"):
        print("hessop bench: --plot needs matplotlib (pip install hessop[plot])", file=sys.stderr)
        return 2
    report = run_bench(config_from_args(args), progress=not args.no_progress)
    written = _save(report, args)
    m = report["machine"]
    lines = [format_table(report), "", format_summary(report, targets_hint=not args.targets)]
    if args.targets:
        lines += ["", format_targets(report)]
    lines += [f"note: {note}" for note in report["notes"]]
    lines.append(
        f"machine: {m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, load "
        f"{m.get('load_average', '?')}; torch {m.get('torch', '-')}, jax {m.get('jax', '-')}; "
        f"run took {report['wall_time_s']:.0f} s"
    )
    lines.append(
        f"results: {' and '.join(written)}" if written else "results: not saved (--no-save)"
    )
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hessop`` command line; return the exit status.

    A missing or unknown command, or a bad option, prints the usage and exits with
    status 2 (argparse's ``SystemExit``).
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

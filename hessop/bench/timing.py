"""Interleaved timing: every round runs each row once, in a rotating order, in one process;
medians and percentiles of the times and of their ratios to the gradient of the same round.

Examples
--------
>>> from hessop.bench.timing import summarize
>>> s = summarize([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
>>> s["median_s"], s["ratio"], s["ratio_p20"]
(4.0, 2.0, 2.0)
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from hessop.bench.cases import Case


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 20)
    1.6
    """
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Median, 20th and 80th percentiles of ``samples``, and of their ratios to
    ``reference`` taken repeat by repeat (the same round of the interleaved loop)."""
    ratios = [a / b for a, b in zip(samples, reference)]
    return {
        "median_s": statistics.median(samples),
        "p20_s": percentile(samples, 20),
        "p80_s": percentile(samples, 80),
        "ratio": statistics.median(ratios),
        "ratio_p20": percentile(ratios, 20),
        "ratio_p80": percentile(ratios, 80),
        "repeats": len(samples),
    }


def _warm_up(case: Case, tick: Callable[[str], None]) -> dict[str, float]:
    """One call of every row (JAX compiles here); a peer that fails is dropped with a note.
    Returns the first-call time of each row that works."""
    first: dict[str, float] = {}
    for name, row in list(case.rows.items()):
        t0 = time.perf_counter()
        try:
            case.sync(row.run())
        except Exception as err:
            if not name.startswith("peer:"):
                raise
            del case.rows[name]
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            case.notes.append(
                f"{name[5:]} failed on the {case.model} ({type(err).__name__}: {msg}); skipped"
            )
            continue
        first[name] = time.perf_counter() - t0
        tick(f"{case.framework} {case.model}: warm-up {name}")
    return first


def time_case(
    case: Case,
    repeats: int,
    tick: Callable[[str], None],
    phase: Callable[[str, int], None] = lambda kind, steps: None,
) -> dict[str, dict[str, Any]]:
    """Time every row of ``case``: one warm-up call each, then ``repeats`` rounds.

    Each round runs every row once; the order rotates from round to round so that no row
    always follows the same one. ``tick`` is called after every call, ``phase(kind, steps)``
    when the warm-up and the rounds begin.
    """
    phase("warm-up", len(case.rows))
    first = _warm_up(case, tick)
    names = list(first)
    samples: dict[str, list[float]] = {name: [] for name in names}
    phase("timing", repeats * len(names))
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = case.rows[name].run
            t0 = time.perf_counter()
            case.sync(fn())
            samples[name].append(time.perf_counter() - t0)
            tick(f"{case.framework} {case.model}: {name}")
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        stats: dict[str, Any] = summarize(samples[name], samples["gradient"])
        stats["first_call_s"] = first[name]
        out[name] = stats
    return out

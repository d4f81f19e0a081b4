"""Progress of a bench run: one bar on a terminal, a line per phase otherwise.

A run is a list of phases (per framework and model: building the case, the warm-up calls,
the timed rounds, the memory processes). The time left is the sum over the phases left of
their steps times an estimate of the seconds per step: a prior for that kind of phase,
framework and model (a JAX warm-up call compiles, a memory step is a fresh process),
scaled by how much slower than its prior the same kind of phase ran so far in this
framework, else by the typical slowdown of the kinds run so far (the machine's load). The
memory phase thus counts in the bar with its real weight.

Examples
--------
>>> import io
>>> from hessop.bench.progress import Progress, format_duration
>>> out = io.StringIO()
>>> p = Progress([("timing", "torch", "mlp", 2)], stream=out)
>>> p.phase("timing", "torch", "mlp", 2); p.tick("a"); p.tick("b"); p.close()
>>> out.getvalue().splitlines()[-1].startswith("hessop bench: torch mlp: timing, 2 calls in")
True
>>> format_duration(125.0)
'2 min 5 s'
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections import defaultdict
from typing import Any, TextIO

#: seconds per step of (kind, framework) per model, at the default sizes on two quiet CPU
#: cores (a memory step: one fresh process, two running side by side)
_PRIOR_S: dict[tuple[str, str], dict[str, float]] = {
    # building the first case imports the framework
    ("build", "torch"): {"mlp": 1.5, "cnn": 0.05, "transformer": 0.05},
    ("build", "jax"): {"mlp": 1.5, "cnn": 0.05, "transformer": 0.05},
    ("warm-up", "torch"): {"mlp": 0.05, "cnn": 0.04, "transformer": 0.05},
    ("warm-up", "jax"): {"mlp": 0.5, "cnn": 1.75, "transformer": 4.1},
    ("timing", "torch"): {"mlp": 0.015, "cnn": 0.035, "transformer": 0.04},
    ("timing", "jax"): {"mlp": 0.012, "cnn": 0.033, "transformer": 0.03},
    ("memory", "torch"): {"mlp": 2.0, "cnn": 3.5, "transformer": 3.5},
    ("memory", "jax"): {"mlp": 2.5, "cnn": 4.5, "transformer": 7.0},
}
_UNITS = {"build": "case", "warm-up": "calls", "timing": "calls", "memory": "processes"}

#: (kind, framework, model, steps) of one phase of the plan
Phase = tuple[str, str, str, int]


def prior_s(kind: str, framework: str, model: str) -> float:
    """The prior seconds per step of a phase (1 s for a kind or framework without one).

    >>> prior_s("memory", "jax", "transformer"), prior_s("timing", "numpy", "mlp")
    (7.0, 1.0)
    """
    table = _PRIOR_S.get((kind, framework), {})
    return table.get(model, sum(table.values()) / len(table) if table else 1.0)


def format_duration(seconds: float) -> str:
    """``'45 s'``, ``'2 min 5 s'``."""
    s = max(0, round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60} s"


class Progress:
    """Progress over the phases of ``plan``, shown on ``stream`` (stderr by default).

    ``enabled=False`` shows nothing; a stream that is not a terminal gets a line per phase
    instead of a bar (no carriage returns in a log file).
    """

    def __init__(
        self, plan: list[Phase], enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self._plan = list(plan)
        self._stream = sys.stderr if stream is None else stream
        self._enabled = enabled
        self._lock = threading.Lock()
        # (kind, framework) -> each step's seconds over its prior
        self._ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
        self._start = time.perf_counter()
        self._current: dict[str, Any] | None = None
        self._bar = self._make_bar() if enabled and _isatty(self._stream) else None
        self._shown = 0

    def _make_bar(self) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return None
        return tqdm(
            total=1000,
            file=self._stream,
            leave=False,
            dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}{postfix}",
        )

    # ---------------------------------------------------------------- estimates
    def _factor(self, kind: str, framework: str) -> float:
        """How much slower than its priors a kind of phase runs here: the median over its
        steps so far (one step that imports a module is no trend); for a kind not run yet,
        the median over the kinds run so far (one kind that suffers most from a busy
        machine, such as torch's timed calls with two threads on shared cores, is no
        measure of the others)."""
        own = self._ratios.get((kind, framework))
        if own:
            return statistics.median(own)
        others = [statistics.median(rs) for rs in self._ratios.values() if rs]
        return statistics.median(others) if others else 1.0

    def _phase_s(self, kind: str, framework: str, model: str, steps: float) -> float:
        return steps * prior_s(kind, framework, model) * self._factor(kind, framework)

    def remaining_s(self) -> float:
        """Estimated seconds left in the run."""
        cur = self._current
        left = 0.0
        if cur is not None:
            steps = cur["steps"] - cur["done"]
            left += self._phase_s(cur["kind"], cur["framework"], cur["model"], steps)
        return left + sum(self._phase_s(*phase) for phase in self._plan)

    # ---------------------------------------------------------------- events
    def phase(self, kind: str, framework: str, model: str, steps: int) -> None:
        """End the current phase and begin the next one of the plan (``steps`` known now)."""
        label = f"{framework} {model}"
        with self._lock:
            self._end_phase()
            if self._plan:
                self._plan.pop(0)
            now = time.perf_counter()
            self._current = {
                "label": label,
                "kind": kind,
                "framework": framework,
                "model": model,
                "steps": steps,
                "done": 0,
                "t0": now,
                "last": now,
            }
            self._refresh(f"{label}: {kind}")

    def tick(self, desc: str) -> None:
        """One step of the current phase is done."""
        with self._lock:
            cur = self._current
            if cur is None:
                return
            now = time.perf_counter()
            prior = prior_s(cur["kind"], cur["framework"], cur["model"])
            self._ratios[(cur["kind"], cur["framework"])].append((now - cur["last"]) / prior)
            cur["done"] += 1
            cur["last"] = now
            self._refresh(desc)

    def close(self) -> None:
        """End the last phase and remove the bar."""
        with self._lock:
            self._end_phase()
            self._current = None
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _end_phase(self) -> None:
        cur = self._current
        if cur is None or not self._enabled or self._bar is not None:
            return
        took = time.perf_counter() - cur["t0"]
        line = (
            f"hessop bench: {cur['label']}: {cur['kind']}, {cur['done']} "
            f"{_UNITS[cur['kind']]} in {took:.1f} s"
        )
        if self._plan:
            line += f"; about {format_duration(self.remaining_s())} left"
        print(line, file=self._stream, flush=True)

    def _refresh(self, desc: str) -> None:
        if self._bar is None:
            return
        elapsed = time.perf_counter() - self._start
        left = self.remaining_s()
        shown = max(self._shown, min(999, int(1000 * elapsed / max(elapsed + left, 1e-9))))
        self._shown = shown
        self._bar.set_description_str(desc[:48], refresh=False)
        self._bar.set_postfix_str(f"~{format_duration(left)} left", refresh=False)
        self._bar.update(shown - self._bar.n)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False

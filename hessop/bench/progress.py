"""Progress of a bench run: one bar on a terminal, a line per phase otherwise.

A run is a list of phases (per framework and model: the warm-up calls, the timed rounds,
the memory processes). The time left is estimated per phase from the seconds per step
measured so far for the same kind of phase and framework (a JAX warm-up compiles, a memory
step starts a process), so the memory phase counts in the bar with its real weight.

Examples
--------
>>> import io
>>> from hessop.bench.progress import Progress, format_duration
>>> out = io.StringIO()
>>> p = Progress([("timing", "torch", 2)], stream=out)
>>> p.phase("timing", "torch", "mlp", 2); p.tick("a"); p.tick("b"); p.close()
>>> out.getvalue().splitlines()[-1].startswith("hessop bench: torch mlp: timing, 2 calls in")
True
>>> format_duration(125.0)
'2 min 5 s'
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from typing import Any, TextIO

#: seconds per step of (kind, framework) on the default models on two quiet CPU cores;
#: scaled by how fast the steps measured so far ran against these figures (JAX's warm-up
#: calls compile; a memory step is a fresh process)
_PRIOR_S = {
    ("warm-up", "torch"): 0.1,
    ("warm-up", "jax"): 2.0,
    ("timing", "torch"): 0.05,
    ("timing", "jax"): 0.05,
    ("memory", "torch"): 2.5,
    ("memory", "jax"): 5.0,
}
_UNITS = {"warm-up": "calls", "timing": "calls", "memory": "processes"}

#: (kind, framework, steps) of one phase of the plan
Phase = tuple[str, str, int]


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
        self._spent: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
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
            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}, {postfix}",
        )

    # ---------------------------------------------------------------- estimates
    def _rate(self, kind: str, framework: str) -> float:
        """Seconds per step of ``kind`` in ``framework``: as measured so far, else the prior
        scaled by the speed of the steps measured so far."""
        secs, steps = self._spent[(kind, framework)]
        if steps:
            return secs / steps
        prior = _PRIOR_S.get((kind, framework), 1.0)
        spent = sum(v[0] for v in self._spent.values())
        expected = sum(v[1] * _PRIOR_S.get(key, 1.0) for key, v in self._spent.items())
        return prior * spent / expected if expected else prior

    def remaining_s(self) -> float:
        """Estimated seconds left in the run."""
        left = 0.0
        cur = self._current
        if cur is not None:
            left += (cur["steps"] - cur["done"]) * self._rate(cur["kind"], cur["framework"])
        for kind, framework, steps in self._plan:
            left += steps * self._rate(kind, framework)
        return left

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
            key = (cur["kind"], cur["framework"])
            self._spent[key][0] += now - cur["last"]
            self._spent[key][1] += 1
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

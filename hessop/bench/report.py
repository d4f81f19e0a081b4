"""What ``hessop bench`` prints and saves: derived figures, the per-case tables, the
summary, the project's targets, and the default result paths.

Examples
--------
>>> from hessop.bench.report import format_ratio_range
>>> format_ratio_range([2.8, 3.85, 3.1])
'2.80-3.85x'
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hessop.bench.config import PEERS

#: The project's performance goals (ratios to a gradient unless stated); ``--targets``.
TARGETS: dict[str, dict[str, float]] = {
    "new-point HVP / gradient": {"jax": 2.2, "torch": 2.5},
    "reused matvec / gradient": {"jax": 1.5, "torch": 2.0},
    "matmat per column / matvec": {"jax": 1.0, "torch": 1.0},
    "overhead vs hand-written": {"jax": 0.05, "torch": 0.05},
    "HVP peak memory / gradient": {"jax": 2.0, "torch": 2.0},
}

DEFAULT_OUT_DIR = "hessop-bench"


# --------------------------------------------------------------------------------------
# derived figures
# --------------------------------------------------------------------------------------


def derive(entry: dict[str, Any]) -> None:
    """Per-column matmat figures, and hessop's overhead over each hand-written row
    (``hvp:<mode>`` over ``hand:<mode>``, ``matvec`` over ``hand:matvec``)."""
    ms = entry["measurements"]
    k = entry["k"]
    mm = ms.get("matmat", {})
    if "median_s" in mm:
        mm["per_column_median_s"] = mm["median_s"] / k
        mm["per_column_ratio"] = mm["ratio"] / k
        if "median_s" in ms.get("matvec", {}):
            mm["per_column_over_matvec"] = mm["per_column_median_s"] / ms["matvec"]["median_s"]
    overhead = {}
    for name, hand in ms.items():
        if not name.startswith("hand:") or "median_s" not in hand:
            continue
        mode = name[5:]
        ours = ms.get("matvec" if mode == "matvec" else f"hvp:{mode}", {})
        if "median_s" in ours:
            overhead[mode] = ours["median_s"] / hand["median_s"] - 1.0
    entry["overhead"] = overhead


def _modes(entry: dict[str, Any]) -> list[str]:
    return [
        n[4:]
        for n, s in entry["measurements"].items()
        if n.startswith("hvp:") and "ratio" in s and n != "hvp:compiled"
    ]


def summarize_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """The answers for one framework and model: the fastest mode at a new point and its
    ratio to a gradient, the auto mode's, the reused matvec's, the overhead over the
    hand-written product, the peak memory ratio, and the time relative to each peer."""
    ms = entry["measurements"]
    modes = _modes(entry)
    out: dict[str, Any] = {
        "framework": entry["framework"],
        "model": entry["model"],
        "batch_size": entry["batch_size"],
        "auto_mode": entry["auto_mode"],
    }
    if not modes:
        return out
    best = min(modes, key=lambda m: ms[f"hvp:{m}"]["ratio"])
    hvp = ms[f"hvp:{best}"]
    out.update(best_mode=best, best_ratio=hvp["ratio"])
    auto = ms.get(f"hvp:{entry['auto_mode']}", {})
    out["auto_ratio"] = auto.get("ratio")
    out["matvec_ratio"] = ms.get("matvec", {}).get("ratio")
    out["overhead"] = entry.get("overhead", {}).get(best)
    if "peak_bytes" in hvp:
        out["memory_ratio"] = hvp.get("memory_ratio")
        out["memory_resolved"] = bool(hvp.get("memory_resolved")) and ("memory_ratio" in hvp)
    peers = {}
    for name, s in ms.items():
        if name.startswith("peer:") and "ratio" in s:
            peers[name[5:]] = hvp["ratio"] / s["ratio"]
    if peers:
        out["vs_peers"] = peers
    out.update(break_even(entry))
    return out


def break_even(entry: dict[str, Any]) -> dict[str, Any]:
    """When ``compile=True`` pays (``--compile`` rows): the one-time compilation over the
    time it saves per product at a new point, against the eager auto mode (or the fastest
    eager mode when auto was not measured). ``break_even`` is None when compiling saves
    nothing per product; no keys when nothing compiled was measured.

    >>> entry = {"auto_mode": "rev-rev", "compile_time_s": 12.0, "measurements": {
    ...     "hvp:rev-rev": {"median_s": 0.030}, "hvp:compiled": {"median_s": 0.024}}}
    >>> round(break_even(entry)["break_even"])
    2000
    """
    ms = entry["measurements"]
    compiled, seconds = ms.get("hvp:compiled", {}).get("median_s"), entry.get("compile_time_s")
    eager = ms.get(f"hvp:{entry['auto_mode']}", {}).get("median_s")
    if eager is None:
        eager = min((ms[f"hvp:{m}"]["median_s"] for m in _modes(entry)), default=None)
    if compiled is None or seconds is None or eager is None:
        return {}
    saved = eager - compiled
    return {
        "compile_time_s": seconds,
        "compiled_saves_s": saved,
        "break_even": seconds / saved if saved > 0 else None,
    }


def summarize_report(report: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`summarize_entry` of every framework and model."""
    return [summarize_entry(e) for e in report["results"]]


# --------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare the measured figures with :data:`TARGETS` (one row per model and framework).
    A figure that was not measured, or is below its instrument's resolution, gets no row."""
    rows = []

    def add(name: str, entry: dict[str, Any], what: str, value: float | None) -> None:
        if value is None:
            return
        limit = TARGETS[name][entry["framework"]]
        rows.append(
            {
                "target": name,
                "framework": entry["framework"],
                "model": entry["model"],
                "what": what,
                "value": value,
                "limit": limit,
                "met": bool(value <= limit),
            }
        )

    for e in report["results"]:
        ms = e["measurements"]
        auto = e["auto_mode"]
        hvp = ms.get(f"hvp:{auto}", {})
        add("new-point HVP / gradient", e, f"hvp:{auto}", hvp.get("ratio"))
        compiled = ms.get("hvp:compiled", {}).get("ratio")
        add("new-point HVP / gradient", e, "compile=True", compiled)
        add("reused matvec / gradient", e, "matvec", ms.get("matvec", {}).get("ratio"))
        per_col = ms.get("matmat", {}).get("per_column_over_matvec")
        add("matmat per column / matvec", e, f"matmat k={e['k']}", per_col)
        for mode, value in e.get("overhead", {}).items():
            add("overhead vs hand-written", e, mode, value)
        add("HVP peak memory / gradient", e, f"hvp:{auto}", hvp.get("memory_ratio"))
    return rows


def format_targets(report: dict[str, Any]) -> str:
    """The ``--targets`` table, with what it means."""
    lines = [
        "Targets: the project's goals for these figures (benchmarks/README.md explains each "
        "and why some are missed on a CPU). 'missed' means the measured figure is above the "
        "goal, not that anything failed.",
    ]
    if report["config"].get("quick"):
        lines.append("(--quick: tiny models, not comparable with the goals.)")
    lines.append(
        f"{'target':<30}{'framework':<10}{'model':<13}{'what':<16}{'value':>8}{'goal':>8}  result"
    )
    for t in report.get("targets", []):
        pct = t["target"].startswith("overhead")
        val = f"{100 * t['value']:+.1f}%" if pct else f"{t['value']:.2f}"
        lim = f"{100 * t['limit']:.0f}%" if pct else f"{t['limit']:.2f}"
        lines.append(
            f"{t['target']:<30}{t['framework']:<10}{t['model']:<13}{t['what']:<16}"
            f"{val:>8}{lim:>8}  {'met' if t['met'] else 'missed'}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the per-case tables
# --------------------------------------------------------------------------------------

_ORDER = ("gradient", "hvp", "hand", "matvec", "hand:matvec", "matmat", "peer")


def _row_order(name: str) -> tuple[int, str]:
    if name in ("gradient", "matvec", "hand:matvec", "matmat"):
        return (_ORDER.index(name), "")
    kind, _, rest = name.partition(":")
    return (_ORDER.index(kind) if kind in _ORDER else len(_ORDER), rest)


def _memory_cells(s: dict[str, Any]) -> str:
    if "peak_bytes" not in s:
        return f"{'':20}"
    if not s.get("memory_resolved"):
        return f"{'<res':>9}{'-':>11}"
    ratio = s.get("memory_ratio")
    return f"{s['peak_bytes'] / 1e6:9.1f}" + (
        f"{ratio:11.2f}" if ratio is not None else f"{'-':>11}"
    )


def _table_line(entry: dict[str, Any], name: str, s: dict[str, Any]) -> str:
    label = name
    med, lo, hi = s["median_s"], s["p20_s"], s["p80_s"]
    ratio, rlo, rhi = s["ratio"], s["ratio_p20"], s["ratio_p80"]
    if name == "matmat":
        k = entry["k"]
        label = f"matmat/col (k={k})"
        med, lo, hi, ratio, rlo, rhi = (x / k for x in (med, lo, hi, ratio, rlo, rhi))
    key = name[4:] if name.startswith("hvp:") else name
    own = name.startswith("hvp:") or name == "matvec"
    ov = entry.get("overhead", {}).get(key) if own else None
    ov_s = f"{100 * ov:+9.1f}%" if ov is not None else f"{'':10}"
    return (
        f"{label:<24}{1e3 * med:11.2f}{f'{1e3 * lo:.2f}-{1e3 * hi:.2f}':>19}"
        f"{ratio:8.2f}{f'{rlo:.2f}-{rhi:.2f}':>13}{_memory_cells(s)}{ov_s}"
    )


def format_table(report: dict[str, Any]) -> str:
    """Every measurement of every framework and model, as plain text."""
    lines = []
    header = (
        f"{'measurement':<24}{'median ms':>11}{'p20-p80 ms':>19}{'x grad':>8}"
        f"{'p20-p80':>13}{'peak MB':>9}{'mem x grad':>11}{'overhead':>10}"
    )
    for e in report["results"]:
        lines += [
            "",
            f"{e['framework']} / {e['model']}  (batch {e['batch_size']}, {e['num_params']:,} "
            f"parameters, {e['device']}, auto mode = {e['auto_mode']})",
        ]
        if e.get("compile_time_s") is not None:
            lines.append(
                f"compile=True: {e['compiled_mode']}, compiled once in "
                f"{e['compile_time_s']:.1f} s (then shared by every new point)"
            )
        lines += [header, "-" * len(header)]
        ms = e["measurements"]
        for name in sorted(ms, key=_row_order):
            if "median_s" in ms[name]:
                lines.append(_table_line(e, name, ms[name]))
        if any(not s.get("memory_resolved", True) for s in ms.values()):
            res = e.get("memory_resolution_bytes", 0) / 2**20
            lines.append(
                f"<res: the call's memory growth is under {res:g} MiB, which "
                f"{e.get('memory_method', 'the method')} does not resolve: no ratio is formed"
            )
    return "\n".join(lines).lstrip("\n")


# --------------------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------------------


def format_ratio_range(values: Iterable[float]) -> str:
    """``'a-bx'`` for the smallest and largest of ``values`` (``'ax'`` for one)."""
    vs = sorted(values)
    return f"{vs[0]:.2f}x" if len(vs) == 1 or vs[0] == vs[-1] else f"{vs[0]:.2f}-{vs[-1]:.2f}x"


#: the summary table's columns: (header line 1, header line 2, width); a negative width
#: left-aligns (text), a positive one right-aligns (figures)
_SUMMARY_COLUMNS = (
    ("", "framework", -9),
    ("", "model", -18),
    ("fastest", "mode", -7),
    ("HVP", "x grad", 7),
    ("auto mode", "x grad", -12),
    ("reused", "matvec", 6),
    ("vs hand-", "written", 8),
    ("peak mem", "x grad", 8),
)


def _cells(values: Iterable[str]) -> str:
    return "  ".join(
        f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, (_, _, w) in zip(values, _SUMMARY_COLUMNS)
    ).rstrip()


def _summary_row(s: dict[str, Any]) -> str:
    if s["auto_mode"] == s["best_mode"]:
        auto = "same"
    else:  # "-": the auto mode was not among --modes
        ratio = s.get("auto_ratio")
        auto = f"{s['auto_mode']} {'-' if ratio is None else f'{ratio:.2f}'}"
    matvec = f"{s['matvec_ratio']:.2f}" if s.get("matvec_ratio") is not None else "-"
    over = f"{100 * s['overhead']:+.0f}%" if s.get("overhead") is not None else "-"
    if "memory_resolved" not in s:
        mem = "-"
    else:
        mem = f"{s['memory_ratio']:.2f}" if s["memory_resolved"] else "<res"
    model = f"{s['model']} (b={s['batch_size']})"
    best = f"{s['best_ratio']:.2f}"
    return _cells([s["framework"], model, s["best_mode"], best, auto, matvec, over, mem])


def _by_framework(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in rows:
        out.setdefault(s["framework"], []).append(s)
    return out


def _mode_advice(fw: str, rows: list[dict[str, Any]]) -> str:
    wins: dict[str, list[str]] = {}
    for s in rows:
        wins.setdefault(s["best_mode"], []).append(s["model"])
    fastest = "; ".join(f"{m} on {', '.join(models)}" for m, models in wins.items())
    auto = rows[0]["auto_mode"]
    gaps = [s["auto_ratio"] / s["best_ratio"] - 1 for s in rows if s.get("auto_ratio")]
    verdict = f"mode='auto' ({auto})"
    if not gaps:
        verdict += " was not among --modes"
    elif max(gaps) >= 0.01:
        verdict += f" is at most {100 * max(gaps):.0f}% slower than the fastest"
    elif max(gaps) > 0:
        verdict += " is within 1% of the fastest"
    else:
        verdict += " is the fastest"
    return f"which mode in {fw}: fastest {fastest}; {verdict}"


def _ranges(groups: dict[str, list[dict[str, Any]]], key: str) -> str:
    """``'2.82-3.85x in torch, 2.05-2.50x in jax'`` for summary field ``key``."""
    parts = []
    for fw, g in groups.items():
        values = [s[key] for s in g if s.get(key) is not None]
        if values:
            parts.append(f"{format_ratio_range(values)} in {fw}")
    return ", ".join(parts)


def _peer_lines(report: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    if not report["config"].get("peers"):
        dists = " ".join(d for _, d in PEERS.values())
        return [f"peers: not measured; add --peers (torch; pip install {dists})"]
    lines = []
    for s in rows:
        if s.get("vs_peers"):
            cmp = ", ".join(f"{p} {r:.2f}" for p, r in s["vs_peers"].items())
            lines.append(f"  {s['framework']} {s['model']}: {cmp}")
    if not lines:
        return ["peers: none measured (see the notes)"]
    return [
        "hessop's fastest new-point HVP, time relative to each peer's product (below 1: "
        "hessop is faster):",
        *lines,
    ]


def _break_even_lines(rows: list[dict[str, Any]]) -> list[str]:
    measured = [s for s in rows if "compile_time_s" in s]
    if not measured:
        return []
    lines = [
        "compile=True pays after this many products at new points (one-time compilation / "
        "time saved per product against the eager operator):"
    ]
    for s in measured:
        saved = s["compiled_saves_s"]
        n = s["break_even"]
        verdict = f"{n:,.0f} products" if n is not None else "never (not faster per product)"
        lines.append(
            f"  {s['framework']} {s['model']}: {verdict} (compiled in {s['compile_time_s']:.1f} "
            f"s, {1e3 * saved:.2f} ms saved per product)"
        )
    return lines


def _memory_line(rows: list[dict[str, Any]]) -> str:
    measured = [s for s in rows if "memory_resolved" in s]
    if not measured:
        return "peak memory: not measured (--memory isolated or grouped)"
    parts = []
    for fw, group in _by_framework(measured).items():
        resolved = [s["memory_ratio"] for s in group if s["memory_resolved"]]
        below = [s["model"] for s in group if not s["memory_resolved"]]
        part = f"{format_ratio_range(resolved)} in {fw}" if resolved else f"in {fw}"
        if below:
            part += f" ({', '.join(below)}: below the instrument's resolution, no ratio)"
        parts.append(part)
    return "peak memory of the fastest HVP, in gradients: " + ", ".join(parts)


def format_summary(report: dict[str, Any], targets_hint: bool = True) -> str:
    """The short answer at the end of a run: per framework and model, the fastest mode at
    a new point and its ratio to a gradient, the auto mode, the reused product, hessop vs
    the hand-written product and vs the peers, the peak memory."""
    rows = [s for s in report.get("summary") or summarize_report(report) if "best_mode" in s]
    if not rows:
        return "Summary: nothing was measured (see the notes)."
    rounds = report["config"]["repeats"]
    lines = [
        f"Summary: time as a multiple of one gradient's, median of {rounds} interleaved rounds",
        "(HVP: a fresh operator and one Hessian-vector product at a new point; reused matvec: "
        "the next product of an operator)",
        _cells(c[0] for c in _SUMMARY_COLUMNS),
        _cells(c[1] for c in _SUMMARY_COLUMNS),
    ]
    lines += [_summary_row(s) for s in rows]
    groups = _by_framework(rows)
    lines += [_mode_advice(fw, g) for fw, g in groups.items()]
    lines.append(f"an HVP at a new point, in gradients: {_ranges(groups, 'best_ratio')}")
    if _ranges(groups, "matvec_ratio"):
        lines.append(
            "a product with a reused operator (CG, Lanczos), in gradients: "
            + _ranges(groups, "matvec_ratio")
        )
    over = []
    for fw, g in groups.items():
        values = [s["overhead"] for s in g if s.get("overhead") is not None]
        if values:
            lo, hi = f"{100 * min(values):+.0f}%", f"{100 * max(values):+.0f}%"
            over.append(f"{lo if lo == hi else f'{lo} to {hi}'} in {fw}")
    if over:
        lines.append(
            "hessop's time over the same product written by hand (fastest mode): " + ", ".join(over)
        )
    lines += _peer_lines(report, rows)
    lines += _break_even_lines(rows)
    lines.append(_memory_line(rows))
    if report["config"].get("quick"):
        lines.append(
            "--quick: tiny models, where fixed per-call costs dominate: these figures show "
            "that everything runs, not what an HVP costs on a real model"
        )
    if targets_hint:
        lines.append("--targets compares these figures with the project's goals")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# where results go
# --------------------------------------------------------------------------------------


def default_stem(report: dict[str, Any]) -> str:
    """``<date>-<time>-<machine>`` (``-quick`` for ``--quick``), safe as a file name.

    >>> default_stem({"date": "2026-12-01T23:59:07", "machine": {"node": "my box"},
    ...               "config": {"quick": True}})
    '20261201-235907-my-box-quick'
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.strptime(report["date"], "%Y-%m-%dT%H:%M:%S"))
    node = re.sub(r"[^A-Za-z0-9._-]+", "-", report["machine"].get("node") or "machine")
    return f"{stamp}-{node.strip('-') or 'machine'}" + (
        "-quick" if report["config"].get("quick") else ""
    )


def default_paths(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """The JSON and PNG paths of ``report`` under ``out_dir``."""
    stem = default_stem(report)
    return Path(out_dir) / f"{stem}.json", Path(out_dir) / f"{stem}.png"

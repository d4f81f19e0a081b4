"""Markdown tables of a `hessop bench --json` report (used for benchmarks/README.md).

python benchmarks/table.py benchmarks/results/cpu-default.json
"""

from __future__ import annotations

import json
import sys


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.0f}%" if pct else f"{x:.2f}"


def markdown_table(report: dict) -> str:
    """One row per framework, model and measurement: time and memory ratios to a gradient."""
    rows = [
        "| framework | model | measurement | median x grad (p20-p80) | hand-written x grad "
        "| overhead | peak memory x grad |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in report["results"]:
        ms = e["measurements"]
        model = f"{e['model']} (b={e['batch_size']})"
        peak = ms["gradient"].get("peak_bytes")
        rows.append(
            f"| {e['framework']} | {model} | gradient: {1e3 * ms['gradient']['median_s']:.1f} ms "
            f"| 1.00 | | | {'' if peak is None else f'{peak / 1e6:.1f} MB'} |"
        )
        names = ["hvp:compiled"] if "hvp:compiled" in ms else []
        names += [f"hvp:{m}" for m in report["config"]["modes"]] + ["matvec", "matmat"]
        names += sorted(n for n in ms if n.startswith("peer:"))
        for name in names:
            s = ms.get(name)
            if not s or "ratio" not in s:
                continue
            scale = e["k"] if name == "matmat" else 1
            label = {
                "matvec": f"reused matvec ({e['auto_mode']})",
                "matmat": f"matmat per column (k={e['k']})",
                "hvp:compiled": f"new-point HVP, compile=True ({e.get('compiled_mode', '?')})",
            }.get(name, name.replace("hvp:", "new-point HVP, "))
            hand_name = f"hand:{name[4:]}" if name.startswith("hvp:") else f"hand:{name}"
            hand = ms.get(hand_name, {}).get("ratio")
            key = name[4:] if name.startswith("hvp:") else name
            over = e.get("overhead", {}).get(key)
            ratio = (
                f"{s['ratio'] / scale:.2f} ({s['ratio_p20'] / scale:.2f}-"
                f"{s['ratio_p80'] / scale:.2f})"
            )
            rows.append(
                f"| {e['framework']} | {model} | {label} | {ratio} | {_fmt(hand)} "
                f"| {_fmt(over, pct=True)} | {_fmt(s.get('memory_ratio'))} |"
            )
    return "\n".join(rows)


def targets_table(report: dict) -> str:
    rows = ["| target | framework | model | measured | limit | |", "|---|---|---|---|---|---|"]
    for t in report["targets"]:
        pct = t["target"].startswith("overhead")
        rows.append(
            f"| {t['target']} ({t['what']}) | {t['framework']} | {t['model']} "
            f"| {_fmt(t['value'], pct)} | {_fmt(t['limit'], pct).lstrip('+')} "
            f"| {'met' if t['met'] else '**missed**'} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    rep = json.loads(open(sys.argv[1]).read())
    print(markdown_table(rep))
    print()
    print(targets_table(rep))

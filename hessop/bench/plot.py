"""The figure of a bench report: ratios to a gradient (time, and peak memory when measured)
as bars per model and mode, one panel per framework, dots for the hand-written products,
like the figure of the ICLR 2024 HVP blog post. Needs matplotlib.
"""

from __future__ import annotations

from typing import Any


def _bars(report: dict[str, Any]) -> list[tuple[str, str]]:
    modes = report["config"]["modes"]
    return [(f"hvp:{m}", f"{m} (new point)") for m in modes] + [
        ("matvec", "reused matvec"),
        ("matmat", "matmat / column"),
    ]


def _time_bar(e: dict[str, Any], name: str) -> tuple[float, float, float, float | None] | None:
    """(ratio, lower error, upper error, hand-written ratio) of one bar, per column for matmat."""
    s = e["measurements"].get(name, {})
    if "ratio" not in s:
        return None
    scale = e["k"] if name == "matmat" else 1
    r = s["ratio"] / scale
    hand_name = f"hand:{name[4:]}" if name.startswith("hvp:") else f"hand:{name}"
    hand = e["measurements"].get(hand_name, {}).get("ratio") if name != "matmat" else None
    return r, r - s["ratio_p20"] / scale, s["ratio_p80"] / scale - r, hand


def _panel(ax: Any, entries: list[dict[str, Any]], bars: list[tuple[str, str]], memory: bool):
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(bars)
    for b, (name, label) in enumerate(bars):
        offset = (b - (len(bars) - 1) / 2) * width
        xs, hs, lo, hi, dots = [], [], [], [], []
        for i, e in enumerate(entries):
            if memory:
                ratio = e["measurements"].get(name, {}).get("memory_ratio")
                if ratio is not None:
                    xs.append(i + offset)
                    hs.append(ratio)
                continue
            bar = _time_bar(e, name)
            if bar is not None:
                xs.append(i + offset)
                hs.append(bar[0])
                lo.append(bar[1])
                hi.append(bar[2])
                dots.append((i + offset, bar[3]))
        if not xs:
            continue
        kw = {} if memory else {"yerr": [lo, hi], "capsize": 2}
        ax.bar(xs, hs, width, label=label, color=colors[b % len(colors)], **kw)
        pts = [(x, d) for x, d in dots if d is not None]
        if pts:
            ax.plot(*zip(*pts), "k.", label="hand-written" if b == 0 else None)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(2.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([e["model"] for e in entries])


def plot_report(report: dict[str, Any], path: str) -> None:
    """Write the figure of ``report`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    frameworks = list(dict.fromkeys(e["framework"] for e in results)) or ["-"]
    has_mem = any("memory_ratio" in s for e in results for s in e["measurements"].values())
    rows = 2 if has_mem else 1
    fig, axes = plt.subplots(
        rows, len(frameworks), figsize=(6 * len(frameworks), 4 * rows), squeeze=False
    )
    bars = _bars(report)
    for j, fw in enumerate(frameworks):
        entries = [e for e in results if e["framework"] == fw]
        for row in range(rows):
            ax = axes[row][j]
            _panel(ax, entries, bars, memory=row == 1)
            what = "time" if row == 0 else "peak memory"
            ax.set_ylabel(f"{what} / gradient")
            ax.set_title(f"{fw}: {what} relative to a gradient")
            if j == 0 and row == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

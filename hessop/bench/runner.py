"""``hessop bench``'s main loop: per framework and model, build the case, time its rows,
measure their memory in fresh processes, and collect the report.

Examples
--------
>>> from hessop.bench.config import BenchConfig
>>> from hessop.bench.runner import run_bench
>>> config = BenchConfig.quick_defaults(frameworks=["torch"], modes=["rev-rev"], repeats=1)
>>> report = run_bench(config, progress=False)
>>> [(e["framework"], e["model"], e["auto_mode"]) for e in report["results"]]
[('torch', 'mlp', 'rev-rev')]
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import os
import platform
import time
from typing import Any, TextIO

from hessop.bench.cases import build_case
from hessop.bench.config import FRAMEWORKS, PEERS, BenchConfig, installed
from hessop.bench.memory import measure_memory, resolution_bytes
from hessop.bench.progress import Phase, Progress
from hessop.bench.report import check_targets, derive, summarize_report
from hessop.bench.timing import time_case


def _set_torch_threads(n: int | None) -> int | None:
    """Set torch's intra-op thread count; return the previous one (None: nothing changed)."""
    if n is None:
        return None
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def machine_info() -> dict[str, Any]:
    """Python, platform, CPU count, load and framework versions."""
    from hessop import __version__

    info: dict[str, Any] = {
        "node": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "hessop": __version__,
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    for module in FRAMEWORKS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[module] = importlib.metadata.version(module)
    return info


def _plan(config: BenchConfig, frameworks: list[str]) -> list[Phase]:
    """The phases of the run with estimated step counts (for the progress estimate only;
    each phase states its real count when it begins)."""
    rows = 4 + 2 * len(config.modes) + int(config.compile)
    memory = 1 if config.memory == "grouped" else 1 + len(config.modes) + config.memory_reused
    plan: list[Phase] = []
    for fw in frameworks:
        n = rows + (len(PEERS) if config.peers and fw == "torch" else 0)
        for model in config.models:
            plan.append(("build", fw, model, 1))
            plan += [("warm-up", fw, model, n), ("timing", fw, model, config.repeats * n)]
            if config.memory != "off":
                plan.append(("memory", fw, model, memory))
    return plan


def _add_memory(entry: dict[str, Any], mem: dict[str, tuple[int, int]], method: str) -> None:
    """Peak = growth + resident per row; ratios to the gradient only where both growths
    are above the method's resolution."""
    ms = entry["measurements"]
    res = resolution_bytes(method)
    entry["memory_method"], entry["memory_resolution_bytes"] = method, res
    for name, (growth, resident) in mem.items():
        stats = ms.setdefault(name, {})
        stats["peak_bytes"] = growth + resident
        stats["growth_bytes"], stats["resident_bytes"] = growth, resident
        stats["memory_resolved"] = growth >= res
    grad = ms.get("gradient", {})
    for name in mem:
        stats = ms[name]
        if stats["memory_resolved"] and grad.get("memory_resolved"):
            stats["memory_ratio"] = stats["peak_bytes"] / grad["peak_bytes"]
            stats["growth_ratio"] = stats["growth_bytes"] / grad["growth_bytes"]


def _run_case(
    framework: str, model: str, config: BenchConfig, progress: Progress, notes: list[str]
) -> dict[str, Any]:
    progress.phase("build", framework, model, 1)
    case = build_case(framework, model, config)
    progress.tick(f"{framework} {model}: built")
    timings = time_case(
        case,
        config.repeats,
        progress.tick,
        lambda kind, steps: progress.phase(kind, framework, model, steps),
    )
    notes.extend(case.notes)
    entry: dict[str, Any] = {
        "framework": framework,
        "model": model,
        "batch_size": case.batch_size,
        "num_params": case.setup.num_params,
        "auto_mode": case.setup.auto_mode,
        "device": case.setup.device,
        "k": config.k,
        "measurements": timings,
        **case.setup.extra,
    }
    names = case.memory_names()
    del case
    gc.collect()
    if config.memory != "off" and names:
        on_cpu = "cpu" in entry["device"].lower()
        jobs = min(2, os.cpu_count() or 1) if on_cpu else 1
        groups = 1 if config.memory == "grouped" else len(names)
        progress.phase("memory", framework, model, groups)
        mem, method, mem_notes = measure_memory(
            framework, model, names, config, progress.tick, jobs
        )
        notes.extend(mem_notes)
        _add_memory(entry, mem, method)
    derive(entry)
    return entry


def run_bench(
    config: BenchConfig, progress: bool = True, stream: TextIO | None = None
) -> dict[str, Any]:
    """Run ``hessop bench`` with ``config``; return the report (what the JSON file holds).

    ``progress`` shows a bar on ``stream`` (stderr) when it is a terminal, a line per
    phase otherwise. torch's thread count is restored afterwards.
    """
    from hessop import __version__

    t0 = time.perf_counter()
    notes: list[str] = []
    frameworks = []
    for fw in config.frameworks:
        if installed(fw):
            frameworks.append(fw)
        else:
            notes.append(f"{fw} is not installed (pip install hessop[{fw}]); skipped")
    bar = Progress(_plan(config, frameworks), enabled=progress, stream=stream)
    restore = _set_torch_threads(config.threads) if "torch" in frameworks else None
    results = []
    try:
        for fw in frameworks:
            for model in config.models:
                results.append(_run_case(fw, model, config, bar, notes))
    finally:
        bar.close()
        if restore is not None:
            _set_torch_threads(restore)
    report: dict[str, Any] = {
        "hessop_version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": config.to_json(),
        "machine": machine_info(),
        "results": results,
        "notes": notes,
        "wall_time_s": time.perf_counter() - t0,
    }
    report["targets"] = check_targets(report)
    report["summary"] = summarize_report(report)
    return report

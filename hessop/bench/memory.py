"""Peak memory, one fresh process per measurement (or per framework and model).

Reported as a device allocator sees the measuring process: the arrays the call needs
before it runs (parameters, batch, vectors: ``resident_bytes``) plus what the call adds at
its peak (``growth_bytes``). The addition is read on a GPU from the framework's allocator
statistics, on a CPU as the growth of the resident set size over one call after a warm-up
call: the kernel's high-water mark (``VmHWM``) reset right before the call, with large
allocations forced to ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed memory leaves
the process.

Every instrument has a resolution: on a CPU, blocks under 64 KiB come from heap memory the
process already holds and are not seen at all, so a small model reads a growth near zero
whatever it allocates. A growth under :func:`resolution_bytes` is reported as below the
resolution, and no ratio is formed from it.

Examples
--------
>>> from hessop.bench.memory import resolution_bytes
>>> resolution_bytes("peak RSS growth (VmHWM)") // 1024
1024
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hessop.bench.cases import Case, build_case
from hessop.bench.config import BenchConfig

RSS_METHOD = "peak RSS growth (VmHWM)"
#: a growth under this many bytes is below the method's resolution: 16 blocks of the
#: smallest allocation the method sees (the 64 KiB mmap threshold on a CPU, the 512-byte
#: rounding of the GPU allocators)
_RESOLUTION = {RSS_METHOD: 16 * 65536}
_GPU_RESOLUTION = 16 * 512
_MARK = "HESSOP-MEMORY "


def resolution_bytes(method: str) -> int:
    """The smallest growth ``method`` resolves, in bytes."""
    return _RESOLUTION.get(method, _GPU_RESOLUTION)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def _torch_cuda_peak(case: Case, fn: Callable[[], Any]) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    case.sync(fn())
    return torch.cuda.max_memory_allocated() - base


def _jax_device_peak(case: Case, fn: Callable[[], Any]) -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None  # CPU: no allocator statistics
    # The peak cannot be reset; the warm-up ran the same computation, so the peak since
    # then is the peak of this computation.
    base = stats["bytes_in_use"]
    case.sync(fn())
    return jax.devices()[0].memory_stats()["peak_bytes_in_use"] - base


def measure_peak(case: Case, name: str) -> tuple[int, str]:
    """Peak memory (bytes) that one call of row ``name``'s memory callable adds, and the
    method. The call runs once first (compilation, lazy initialization, allocator warm-up)."""
    fn = case.rows[name].memory
    if fn is None:
        raise ValueError(
            f"row {name!r} has no memory callable; measured rows: {case.memory_names()}"
        )
    case.sync(fn())
    gc.collect()
    if case.framework == "torch" and case.setup.device.startswith("cuda"):
        return _torch_cuda_peak(case, fn), "torch.cuda.max_memory_allocated"
    if case.framework == "jax":
        peak = _jax_device_peak(case, fn)
        if peak is not None:
            return peak, "jax memory_stats peak_bytes_in_use"
    if not _reset_peak_rss():
        raise OSError("cannot reset the peak RSS (/proc/self/clear_refs): Linux only")
    base = _status_bytes("VmRSS")
    out = case.sync(fn())
    peak = _status_bytes("VmHWM") - base
    del out
    return peak, RSS_METHOD


def worker(payload: str) -> int:
    """Entry point of the measuring subprocess: print ``{name: [growth, method, resident]}``
    as JSON on a line that starts with a marker."""
    req = json.loads(payload)
    config = BenchConfig(**req["config"])
    if req["framework"] == "torch" and config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    case = build_case(req["framework"], req["model"], config)
    result = {}
    for name in req["names"]:
        growth, method = measure_peak(case, name)
        result[name] = (growth, method, case.resident_bytes(name))
    print(_MARK + json.dumps(result))
    return 0


_WORKER = "import sys; from hessop.bench.memory import worker; sys.exit(worker(sys.argv[1]))"


def measure_memory(
    framework: str,
    model: str,
    names: list[str],
    config: BenchConfig,
    tick: Callable[[str], None],
    jobs: int = 1,
) -> tuple[dict[str, tuple[int, int]], str, list[str]]:
    """Run the memory measurements of ``names`` in fresh processes (one per name, or one in
    all when ``config.memory == "grouped"``), ``jobs`` at a time.

    Returns (growth over the call, arrays resident before it) in bytes per name, the
    method, and notes. Each process measures its own memory, so CPU measurements may run
    side by side; on a GPU they must not (JAX preallocates most of the device).
    """
    groups = [names] if config.memory == "grouped" else [[n] for n in names]
    env = dict(os.environ)
    # Large blocks get their own mmap and go back to the system when freed, so that the
    # resident set size follows what is live (glibc; ignored elsewhere).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    request = {"framework": framework, "model": model, "config": config.to_json()}

    def run(group: list[str]) -> subprocess.CompletedProcess:
        payload = json.dumps({**request, "names": group})
        proc = subprocess.run(
            [sys.executable, "-c", _WORKER, payload], capture_output=True, text=True, env=env
        )
        tick(f"{framework} {model}: memory {', '.join(group)}")
        return proc

    out: dict[str, tuple[int, int]] = {}
    notes: list[str] = []
    method = ""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        procs = list(zip(groups, pool.map(run, groups)))
    for group, proc in procs:
        line = [s for s in proc.stdout.splitlines() if s.startswith(_MARK)]
        if proc.returncode != 0 or not line:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            notes.append(f"memory of {framework} {model} {group} failed: {err}")
            continue
        for name, (growth, how, resident) in json.loads(line[0][len(_MARK) :]).items():
            out[name] = (int(growth), int(resident))
            method = how
    return out, method, notes

"""The ``hessop`` command line and the ``hessop bench`` harness.

Two real ``--quick`` runs are shared by the module: ``python -m hessop bench --quick`` in a
subprocess (both frameworks, default saving, stderr not a terminal), and an in-process
torch run with memory measurements. Everything else is checked on synthetic reports. No
timing assertions: the figures depend on the machine; the tests check that every
requested measurement is there, positive and consistent.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hessop import __version__, cli
from hessop.bench import cases, report, runner
from hessop.bench.config import BENCH_MODES, PEERS, QUICK_BATCH_SIZE, BenchConfig
from hessop.bench.memory import RSS_METHOD, resolution_bytes
from hessop.bench.progress import Progress, prior_s
from hessop.bench.timing import percentile, summarize

HAS_TORCH = runner.installed("torch")
HAS_JAX = runner.installed("jax")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")


# ------------------------------------------------------------------ the two real runs


@pytest.fixture(scope="module")
def quick_subprocess(tmp_path_factory):
    """``python -m hessop bench --quick`` with an output folder: (process, folder)."""
    if not (HAS_TORCH or HAS_JAX):
        pytest.skip("neither framework is installed")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "hessop", "bench", "--quick", "--out", str(out / "results")],
        capture_output=True,
        text=True,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, out / "results"


@pytest.fixture(scope="module")
def torch_memory_run(tmp_path_factory):
    """In process: torch only (JAX reported as not installed), memory in one process,
    ``--targets``, explicit ``--json`` with ``--no-save``: (report, stdout)."""
    torch = pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("bench") / "out.json"
    argv = ["bench", "--quick", "--modes", "rev-rev,fwd-rev", "--memory", "grouped"]
    argv += ["--memory-reused", "--targets", "--no-save", "--json", str(path), "--no-progress"]
    threads = torch.get_num_threads()
    real = runner.installed
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "installed", lambda name: name != "jax" and real(name))
        mp.setattr(sys, "stdout", buf)
        assert cli.main(argv) == 0
    assert torch.get_num_threads() == threads  # --quick's one thread is restored
    return json.loads(path.read_text()), buf.getvalue()


def _check_entry(entry: dict, modes: list[str]) -> None:
    ms = entry["measurements"]
    expected = ["gradient", "matvec", "hand:matvec", "matmat"]
    for mode in modes:
        expected += [f"hvp:{mode}", f"hand:{mode}"]
    assert set(expected) <= set(ms)
    for name in expected:
        stats = ms[name]
        for key in ("median_s", "p20_s", "p80_s", "ratio", "ratio_p20", "ratio_p80"):
            assert math.isfinite(stats[key]) and stats[key] > 0, (name, key, stats)
        assert stats["p20_s"] <= stats["median_s"] <= stats["p80_s"]
        assert stats["ratio_p20"] <= stats["ratio"] <= stats["ratio_p80"]
    assert ms["gradient"]["ratio"] == 1.0
    mm = ms["matmat"]
    assert mm["per_column_median_s"] == pytest.approx(mm["median_s"] / entry["k"])
    assert set(entry["overhead"]) == {*modes, "matvec"}
    for mode in modes:
        assert entry["overhead"][mode] == pytest.approx(
            ms[f"hvp:{mode}"]["median_s"] / ms[f"hand:{mode}"]["median_s"] - 1
        )


def test_quick_saves_results_and_says_where(quick_subprocess):
    proc, folder = quick_subprocess
    json_files = list(folder.glob("*-quick.json"))
    png_files = list(folder.glob("*-quick.png"))
    assert len(json_files) == 1 and len(png_files) == 1
    assert png_files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"results: {json_files[0]} and {png_files[0]}"
    rep = json.loads(json_files[0].read_text())
    frameworks = [fw for fw, ok in (("torch", HAS_TORCH), ("jax", HAS_JAX)) if ok]
    assert [(e["framework"], e["model"]) for e in rep["results"]] == [
        (f, "mlp") for f in frameworks
    ]
    for entry in rep["results"]:
        assert entry["batch_size"] == QUICK_BATCH_SIZE and entry["num_params"] == 970
        assert entry["auto_mode"] == {"torch": "rev-rev", "jax": "fwd-rev"}[entry["framework"]]
        _check_entry(entry, list(BENCH_MODES))
        assert not any("peak_bytes" in s for s in entry["measurements"].values())
    assert rep["config"]["memory"] == "off" and rep["config"]["threads"] == 1
    assert rep["summary"] == report.summarize_report(rep)


def test_quick_prints_a_summary_not_the_targets(quick_subprocess):
    out = quick_subprocess[0].stdout
    assert "Summary: time as a multiple of one gradient's" in out
    assert "which mode in" in out and "an HVP at a new point, in gradients:" in out
    assert "--targets compares" in out
    assert "missed" not in out.lower() and "Targets:" not in out


def test_progress_without_a_terminal_is_a_line_per_phase(quick_subprocess):
    err = quick_subprocess[0].stderr
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("hessop bench: ")]
    # per framework: building the case, the warm-up calls, the timed rounds
    assert len(lines) == 3 * len(quick_subprocess[0].stdout.split(" / mlp")[:-1])
    assert re.match(r"hessop bench: (torch|jax) mlp: build, 1 case in", lines[0])
    assert "warm-up, 13 calls in" in lines[1] and "timing, 65 calls in" in lines[2]
    assert all("left" in line for line in lines[:-1])


@needs_torch
def test_memory_below_resolution_gives_no_ratio(torch_memory_run):
    rep, out = torch_memory_run
    (entry,) = rep["results"]
    _check_entry(entry, ["rev-rev", "fwd-rev"])
    ms = entry["measurements"]
    assert entry["memory_method"] == RSS_METHOD
    assert entry["memory_resolution_bytes"] == resolution_bytes(RSS_METHOD)
    measured = ["gradient", "hvp:rev-rev", "hvp:fwd-rev", "matvec"]
    assert {n for n, s in ms.items() if "peak_bytes" in s} == set(measured)
    # The quick MLP (32-16-16-10) in float32, batch 4 of 32 features and int64 labels: the
    # arrays a device allocator would already hold before each call.
    params_bytes = 4 * ((32 * 16 + 16) + (16 * 16 + 16) + (16 * 10 + 10))
    batch_bytes = 4 * 4 * 32 + 8 * 4
    assert ms["gradient"]["resident_bytes"] == params_bytes + batch_bytes
    for name in measured:
        s = ms[name]
        if name != "gradient":
            assert s["resident_bytes"] == params_bytes + batch_bytes + params_bytes
        assert s["peak_bytes"] == s["growth_bytes"] + s["resident_bytes"]
        # a tiny model allocates only blocks the CPU method cannot see
        assert s["growth_bytes"] < entry["memory_resolution_bytes"]
        assert s["memory_resolved"] is False and "memory_ratio" not in s
    assert not any(t["target"].startswith("HVP peak memory") for t in rep["targets"])
    assert "<res" in out and "does not resolve" in out
    assert "below the instrument's resolution, no ratio" in out


@needs_torch
def test_targets_are_explained_and_missing_framework_noted(torch_memory_run):
    rep, out = torch_memory_run
    assert [e["framework"] for e in rep["results"]] == ["torch"]
    assert any("jax is not installed" in n for n in rep["notes"])
    assert "Targets: the project's goals" in out and "not comparable" in out
    results = [line for line in out.splitlines() if line.endswith(("  met", "  missed"))]
    assert len(results) == len(rep["targets"]) > 0
    assert out.strip().splitlines()[-1].startswith("results: ")
    assert "results: not saved" not in out  # --json still writes


# ------------------------------------------------------------------ command line


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"hessop {__version__}"


def test_bare_command_prints_usage_and_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hessop") and "required" in err


def test_python_dash_m_hessop():
    out = subprocess.run([sys.executable, "-m", "hessop"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: hessop" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "hessop", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and __version__ in out.stdout


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in (
        *("--models", "--frameworks", "--modes", "--batch-size", "--repeats", "--k"),
        *("--json", "--plot", "--peers", "--quick", "--out", "--no-save", "--targets"),
    ):
        assert option in text
    assert "about 2 minutes" in text and "performance goals" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--models", "resnet"],
        ["bench", "--modes", "fwd-fwd"],
        ["bench", "--batch-size", "0"],
        ["bench", "--batch-size", "vit=3"],
        ["bench", "--frameworks", "tensorflow"],
        ["frobnicate"],
    ],
)
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_options_make_the_config():
    parse = cli.build_parser().parse_args
    config = cli.config_from_args(parse(["bench", "--batch-size", "mlp=7,cnn=3"]))
    assert config.batch_sizes == {**BenchConfig().batch_sizes, "mlp": 7, "cnn": 3}
    assert config.models == ["mlp", "cnn", "transformer"] and config.memory == "isolated"
    assert config.threads is None and not config.quick
    config = cli.config_from_args(
        parse(["bench", "--quick", "--batch-size", "5", "--threads", "2"])
    )
    assert config.batch_sizes == {m: 5 for m in ("mlp", "cnn", "transformer")}
    assert (config.models, config.threads, config.memory) == (["mlp"], 2, "off")
    config = cli.config_from_args(
        parse(["bench", "--quick", "--models", "cnn", "--memory", "grouped"])
    )
    assert (config.models, config.memory, config.quick) == (["cnn"], "grouped", True)
    assert config == BenchConfig(**config.to_json())


# ------------------------------------------------------------------ pieces


def test_summarize_pairs_repeats():
    # the ratio is taken round by round: a slow round for both gives the same ratio
    s = summarize([2.0, 20.0, 4.0], [1.0, 10.0, 1.0])
    assert s["median_s"] == 4.0
    assert s["ratio"] == 2.0
    assert s["ratio_p80"] == pytest.approx(3.2)  # numpy's linear interpolation of (2, 2, 4)
    assert percentile([1.0, 2.0, 3.0, 4.0], 20) == pytest.approx(1.6)


def _stats(ratio: float, grad_s: float = 0.01) -> dict:
    return {
        "median_s": ratio * grad_s,
        "p20_s": ratio * grad_s,
        "p80_s": ratio * grad_s,
        "ratio": ratio,
        "ratio_p20": ratio,
        "ratio_p80": ratio,
    }


def _entry(framework: str, model: str, ratios: dict[str, float], auto: str) -> dict:
    entry = {
        "framework": framework,
        "model": model,
        "batch_size": 8,
        "num_params": 100,
        "device": "cpu",
        "auto_mode": auto,
        "k": 4,
        "measurements": {name: _stats(r) for name, r in ratios.items()},
    }
    report.derive(entry)
    return entry


def _report(*entries: dict, peers: bool = False) -> dict:
    rep = {
        "config": {**BenchConfig().to_json(), "peers": peers},
        "results": list(entries),
        "notes": [],
        "machine": {},
    }
    rep["targets"] = report.check_targets(rep)
    rep["summary"] = report.summarize_report(rep)
    return rep


def test_summary_picks_the_fastest_mode_and_compares():
    base = {"gradient": 1.0, "matvec": 1.5, "hand:matvec": 1.4, "matmat": 6.0}
    torch_mlp = _entry(
        "torch",
        "mlp",
        {
            **base,
            "hvp:rev-rev": 2.4,
            "hand:rev-rev": 2.0,
            "hvp:fwd-rev": 3.0,
            "hand:fwd-rev": 3.0,
            "peer:curvlinops": 4.8,
            "peer:pyhessian": 2.4,
        },
        auto="rev-rev",
    )
    jax_cnn = _entry(
        "jax",
        "cnn",
        {**base, "hvp:rev-rev": 2.0, "hand:rev-rev": 2.0, "hvp:fwd-rev": 2.5, "hand:fwd-rev": 2.5},
        auto="fwd-rev",
    )
    rep = _report(torch_mlp, jax_cnn, peers=True)
    s_torch, s_jax = rep["summary"]
    assert (s_torch["best_mode"], s_torch["best_ratio"]) == ("rev-rev", 2.4)
    assert s_torch["overhead"] == pytest.approx(0.2)
    assert s_torch["vs_peers"] == pytest.approx({"curvlinops": 0.5, "pyhessian": 1.0})
    assert (s_jax["best_mode"], s_jax["auto_ratio"]) == ("rev-rev", 2.5)
    text = report.format_summary(rep)
    assert "mode='auto' (rev-rev) is the fastest" in text
    assert "mode='auto' (fwd-rev) is at most 25% slower than the fastest" in text
    assert "2.40x in torch, 2.00x in jax" in text
    assert "torch mlp: curvlinops 0.50, pyhessian 1.00" in text
    assert "written by hand (fastest mode): +20% in torch, +0% in jax" in text
    assert "peak memory: not measured" in text
    # no peers asked for: say how to get them
    assert "add --peers" in report.format_summary(_report(torch_mlp))
    # the auto mode not among --modes
    jax_cnn["measurements"].pop("hvp:fwd-rev")
    text = report.format_summary(_report(jax_cnn))
    assert "fwd-rev -" in text and "mode='auto' (fwd-rev) was not among --modes" in text


def test_summary_says_when_compile_pays():
    base = {"gradient": 1.0, "hvp:rev-rev": 3.0, "hand:rev-rev": 3.0, "hvp:fwd-rev": 2.8}
    torch_mlp = _entry("torch", "mlp", {**base, "hvp:compiled": 2.5}, auto="rev-rev")
    torch_mlp["compile_time_s"] = 20.0
    torch_cnn = _entry("torch", "cnn", {**base, "hvp:compiled": 3.2}, auto="rev-rev")
    torch_cnn["compile_time_s"] = 30.0
    jax_mlp = _entry("jax", "mlp", base, auto="fwd-rev")  # no --compile rows
    rep = _report(torch_mlp, torch_cnn, jax_mlp)
    s_mlp, s_cnn, s_jax = rep["summary"]
    # 20 s over (30 - 25) ms per product, against the auto mode's eager product
    assert s_mlp["break_even"] == pytest.approx(4000.0)
    assert s_cnn["break_even"] is None and s_cnn["compiled_saves_s"] == pytest.approx(-0.002)
    assert "break_even" not in s_jax
    text = report.format_summary(rep)
    assert "torch mlp: 4,000 products (compiled in 20.0 s, 5.00 ms saved per product)" in text
    assert "torch cnn: never (not faster per product)" in text
    assert "jax mlp:" not in text
    assert "compile=True pays" not in report.format_summary(_report(jax_mlp))


def test_memory_ratio_only_above_resolution():
    res = resolution_bytes(RSS_METHOD)
    entry = _entry("torch", "mlp", {"gradient": 1.0, "hvp:rev-rev": 2.0}, auto="rev-rev")
    runner._add_memory(
        entry, {"gradient": (2 * res, 100), "hvp:rev-rev": (5 * res, 100)}, RSS_METHOD
    )
    hvp = entry["measurements"]["hvp:rev-rev"]
    assert hvp["memory_ratio"] == pytest.approx((5 * res + 100) / (2 * res + 100))
    assert hvp["growth_ratio"] == pytest.approx(2.5)
    entry = _entry("torch", "mlp", {"gradient": 1.0, "hvp:rev-rev": 2.0}, auto="rev-rev")
    runner._add_memory(
        entry, {"gradient": (res - 1, 100), "hvp:rev-rev": (5 * res, 100)}, RSS_METHOD
    )
    ms = entry["measurements"]
    assert ms["hvp:rev-rev"]["memory_resolved"] and not ms["gradient"]["memory_resolved"]
    assert "memory_ratio" not in ms["hvp:rev-rev"]  # the denominator is not resolved
    assert not report.check_targets(_report(entry))[-1]["target"].startswith("HVP peak")


def test_default_paths_are_dated_and_per_machine():
    rep = {"date": "2026-12-01T08:05:09", "machine": {"node": "lab/gpu 1"}, "config": {}}
    json_path, png_path = report.default_paths(rep, "hessop-bench")
    assert json_path == Path("hessop-bench/20261201-080509-lab-gpu-1.json")
    assert png_path == json_path.with_suffix(".png")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_counts_every_phase():
    plan = [("warm-up", "torch", "mlp", 3), ("timing", "torch", "mlp", 6)]
    plan += [("memory", "torch", "mlp", 2), ("warm-up", "jax", "mlp", 3)]
    log = io.StringIO()
    p = Progress(plan, stream=log)
    # the memory phase weighs in with its own cost per step
    expected = {(kind, fw): steps * prior_s(kind, fw, model) for kind, fw, model, steps in plan}
    assert p.remaining_s() == pytest.approx(sum(expected.values()))
    assert expected[("memory", "torch")] > 10 * expected[("timing", "torch")]
    p.phase("warm-up", "torch", "mlp", 3)
    for _ in range(3):
        p.tick("call")
    p.phase("timing", "torch", "mlp", 6)
    p.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("hessop bench: torch mlp: warm-up, 3 calls in")
    assert "left" in lines[0] and lines[1].startswith("hessop bench: torch mlp: timing, 0 calls")
    tty = _Tty()
    p = Progress(plan, stream=tty)
    p.phase("warm-up", "torch", "mlp", 3)
    p.tick("call")
    p.close()
    assert "\r" in tty.getvalue() and "hessop bench:" not in tty.getvalue()
    silent = io.StringIO()
    p = Progress(plan, enabled=False, stream=silent)
    p.phase("warm-up", "torch", "mlp", 3)
    p.close()
    assert silent.getvalue() == ""


def test_progress_learns_the_speed_of_each_kind(monkeypatch):
    from hessop.bench import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    plan = [("warm-up", "torch", "mlp", 3), ("timing", "torch", "mlp", 3)]
    plan += [("memory", "torch", "mlp", 1), ("warm-up", "jax", "cnn", 1)]
    p = Progress(plan, enabled=False)
    warm_up, timing = prior_s("warm-up", "torch", "mlp"), prior_s("timing", "torch", "mlp")
    memory, jax_warm_up = prior_s("memory", "torch", "mlp"), prior_s("warm-up", "jax", "cnn")

    def step(seconds: float) -> None:
        clock[0] += seconds
        p.tick("call")

    p.phase("warm-up", "torch", "mlp", 3)
    step(40 * warm_up)  # a first call that imports a module is no trend ...
    step(4 * warm_up)
    step(4 * warm_up)  # ... the other calls are: 4x slower than their prior
    assert p._factor("warm-up", "torch") == pytest.approx(4)
    # the kinds not run yet are expected 4x slower too
    assert p.remaining_s() == pytest.approx(4 * (3 * timing + memory + jax_warm_up))
    p.phase("timing", "torch", "mlp", 3)
    step(50 * timing)  # torch's timed calls suffer most on a busy machine
    p.phase("memory", "torch", "mlp", 1)
    step(3 * memory)
    # JAX's warm-up: the median of the three kinds' slowdowns (4, 50, 3), not the 50
    assert p.remaining_s() == pytest.approx(4 * jax_warm_up)


@needs_torch
def test_new_rows_plug_into_the_registry(monkeypatch):
    def double_gradient(setup, config):
        yield cases.Row("custom:double-gradient", lambda: (setup.gradient(), setup.gradient()))

    monkeypatch.setattr(cases, "ROWS", [*cases.ROWS, double_gradient])
    config = BenchConfig.quick_defaults(modes=["rev-rev"], repeats=2)
    case = cases.build_case("torch", "mlp", config)
    assert list(case.rows) == [
        "gradient",
        "hvp:rev-rev",
        "hand:rev-rev",
        "matvec",
        "hand:matvec",
        "matmat",
        "model:build",
        "model:hvp",
        "model:model_hvp",
        "custom:double-gradient",
    ]
    assert case.memory_names() == ["gradient", "hvp:rev-rev"]
    from hessop.bench.timing import time_case

    stats = time_case(case, 2, lambda desc: None)
    assert stats["custom:double-gradient"]["repeats"] == 2
    assert "custom:double-gradient" in report.format_table(
        _report({**_entry("torch", "mlp", {"gradient": 1.0}, "rev-rev"), "measurements": stats})
    )


@pytest.mark.parametrize(("present", "absent"), [("torch", "jax"), ("jax", "torch")])
def test_each_framework_alone(present, absent):
    # hessop, the command line and a case of the present framework never import the other
    if not runner.installed(present):
        pytest.skip(f"{present} not installed")
    code = f"""
import sys
sys.modules[{absent!r}] = None
import hessop.cli
from hessop.bench.cases import build_case
from hessop.bench.config import BenchConfig
case = build_case({present!r}, "mlp", BenchConfig.quick_defaults())
assert case.setup.auto_mode and "gradient" in case.rows
assert not [m for m in sys.modules if m.startswith({absent!r} + ".")]
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@needs_torch
def test_missing_peers_are_noted(monkeypatch):
    import torch

    from hessop.bench import peers

    monkeypatch.setattr(peers, "installed", lambda name: False)
    notes: list[str] = []
    model = torch.nn.Linear(3, 2)
    x, y, v = torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.randn(8)
    assert peers.torch_peers(model, torch.nn.CrossEntropyLoss(), x, y, v, notes) == {}
    assert [n.split(" is not installed")[0] for n in notes] == list(PEERS)
    assert all("pip install" in n for n in notes)

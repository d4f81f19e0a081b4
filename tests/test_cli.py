"""The ``hessop`` command line: ``--version``, ``--help`` and ``hessop bench``.

No timing assertions: the benchmark's numbers depend on the machine; these tests check that
every requested measurement is there, positive and consistent.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from hessop import __version__, cli


def _bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "out.json"
    status = cli.main(["bench", "--quick", "--no-progress", "--json", str(out), *extra])
    assert status == 0
    return json.loads(out.read_text())


def _check_entry(entry: dict, modes: list[str]) -> None:
    ms = entry["measurements"]
    expected = ["gradient", "matvec", "matmat"]
    for mode in modes:
        expected += [f"hvp:{mode}", f"hand:{mode}"]
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


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"hessop {__version__}"


def test_help_lists_bench(capsys):
    assert cli.main([]) == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--models",
        "--frameworks",
        "--modes",
        "--batch-size",
        "--repeats",
        "--k",
        "--json",
        "--plot",
        "--peers",
        "--quick",
    ):
        assert option in text


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "hessop.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and __version__ in out.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--models", "resnet"],
        ["bench", "--modes", "fwd-fwd"],
        ["bench", "--batch-size", "0"],
        ["bench", "--batch-size", "vit=3"],
        ["bench", "--frameworks", "tensorflow"],
    ],
)
def test_bad_options_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_batch_size_option_per_model():
    args = cli.build_parser().parse_args(["bench", "--batch-size", "mlp=7,cnn=3"])
    config = cli.config_from_args(args)
    assert config.batch_sizes == {**cli.DEFAULT_BATCH_SIZES, "mlp": 7, "cnn": 3}
    assert config.threads is None
    args = cli.build_parser().parse_args(
        ["bench", "--quick", "--batch-size", "5", "--threads", "1"]
    )
    config = cli.config_from_args(args)
    assert config.batch_sizes == {m: 5 for m in cli.MODELS}
    assert config.threads == 1
    assert (config.repeats, config.k, config.memory) == (cli.QUICK_REPEATS, cli.QUICK_K, "grouped")


def test_summarize_pairs_repeats():
    # the ratio is taken round by round: a slow round for both gives the same ratio
    s = cli.summarize([2.0, 20.0, 4.0], [1.0, 10.0, 1.0])
    assert s["median_s"] == 4.0
    assert s["ratio"] == 2.0
    assert s["ratio_p80"] == pytest.approx(3.2)  # numpy's linear interpolation of (2, 2, 4)
    assert cli._percentile([1.0, 2.0, 3.0, 4.0], 20) == pytest.approx(1.6)


def test_bench_quick_torch_all_models(tmp_path, capsys):
    pytest.importorskip("torch")
    report = _bench(tmp_path, "--frameworks", "torch", "--memory", "off", "--repeats", "1")
    assert [e["model"] for e in report["results"]] == list(cli.MODELS)
    for entry in report["results"]:
        assert entry["framework"] == "torch"
        assert entry["auto_mode"] == "rev-rev"
        assert entry["batch_size"] == cli.QUICK_BATCH_SIZE
        assert entry["num_params"] > 0
        _check_entry(entry, list(cli.BENCH_MODES))
        assert entry["measurements"]["gradient"]["repeats"] == 1
    names = {(t["framework"], t["model"], t["target"]) for t in report["targets"]}
    assert ("torch", "mlp", "new-point HVP / gradient") in names
    text = capsys.readouterr().out
    assert "torch / transformer" in text and "targets" in text


def test_bench_quick_memory_and_plot(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    report = _bench(
        tmp_path,
        *("--frameworks", "torch", "--models", "mlp", "--modes", "rev-rev"),
        *("--batch-size", "64", "--memory-reused", "--plot", str(png)),
    )
    (entry,) = report["results"]
    _check_entry(entry, ["rev-rev"])
    ms = entry["measurements"]
    # The quick MLP (32-16-16-10) in float32, batch 64 of 32 features and int64 labels:
    # the arrays a device allocator would already hold before each call.
    params_bytes = 4 * ((32 * 16 + 16) + (16 * 16 + 16) + (16 * 10 + 10))
    batch_bytes = 4 * 64 * 32 + 8 * 64
    v_bytes = params_bytes
    assert ms["gradient"]["resident_bytes"] == params_bytes + batch_bytes
    for name in ("hvp:rev-rev", "matvec"):
        assert ms[name]["resident_bytes"] == params_bytes + batch_bytes + v_bytes
    for name in ("gradient", "hvp:rev-rev", "matvec"):
        # tiny models may stay within memory the process already holds: >= 0, not > 0
        assert ms[name]["growth_bytes"] >= 0
        assert ms[name]["peak_bytes"] == ms[name]["growth_bytes"] + ms[name]["resident_bytes"]
    assert ms["gradient"]["memory_ratio"] == 1.0
    assert ms["hvp:rev-rev"]["memory_ratio"] == pytest.approx(
        ms["hvp:rev-rev"]["peak_bytes"] / ms["gradient"]["peak_bytes"]
    )
    assert entry["memory_method"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_quick_jax(tmp_path):
    pytest.importorskip("jax")
    report = _bench(
        tmp_path,
        *("--frameworks", "jax", "--models", "mlp", "--modes", "fwd-rev,rev-rev"),
        *("--memory", "off", "--repeats", "1"),
    )
    (entry,) = report["results"]
    assert entry["framework"] == "jax" and entry["auto_mode"] == "fwd-rev"
    _check_entry(entry, ["fwd-rev", "rev-rev"])


def test_missing_framework_is_skipped_with_a_note(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    real = cli.installed
    monkeypatch.setattr(cli, "installed", lambda name: name != "jax" and real(name))
    threads = torch.get_num_threads()
    report = _bench(
        tmp_path,
        *("--models", "mlp", "--modes", "rev-rev", "--memory", "off", "--repeats", "1"),
        *("--threads", "1"),
    )
    assert torch.get_num_threads() == threads  # the bench restores torch's setting
    assert report["config"]["threads"] == 1
    assert {e["framework"] for e in report["results"]} == {"torch"}
    assert any("jax is not installed" in n for n in report["notes"])


def test_peers_missing_are_noted(monkeypatch, tmp_path):
    pytest.importorskip("torch")
    real = cli.installed
    monkeypatch.setattr(
        cli,
        "installed",
        lambda name: name not in ("curvlinops", "pyhessian", "hessian_eigenthings") and real(name),
    )
    report = _bench(
        tmp_path,
        *("--frameworks", "torch", "--models", "mlp", "--modes", "rev-rev"),
        *("--memory", "off", "--repeats", "1", "--peers"),
    )
    for peer in cli.PEERS:
        assert any(n.startswith(f"{peer} is not installed") for n in report["notes"])
    assert not any(k.startswith("peer:") for k in report["results"][0]["measurements"])

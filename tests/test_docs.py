"""The documentation builds without warnings, with the guide's figures; the README's quick
start runs. (The guide's examples themselves run as doctests: docs/**/*.md.)"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


GUIDE_FIGURES = [
    "cg_preconditioning.png",
    "eigenvalue_convergence.png",
    "trace_error.png",
    "spectral_density.png",
    "bench_cpu.png",  # committed: from a real `hessop bench` run
]


@pytest.mark.slow  # 20-35 s of the default run; CI (.ci/run) builds the docs with -W itself
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    pytest.importorskip("matplotlib")  # the guide's figures are drawn during the build
    pytest.importorskip("torch")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "-q",
            "-b",
            "html",
            str(ROOT / "docs"),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    html = tmp_path / "html"
    assert (html / "index.html").exists()
    images = {p.name for p in (html / "_images").iterdir()}
    assert set(GUIDE_FIGURES) <= images, set(GUIDE_FIGURES) - images
    for page in (ROOT / "docs" / "guide").glob("*.md"):  # every page reachable from the index
        assert f"guide/{page.stem}" in (ROOT / "docs" / "index.rst").read_text()
        assert (html / "guide" / f"{page.stem}.html").exists()


def test_readme_gives_the_docs_build_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert any("sphinx-build -W -b html docs docs/_build/html" in c for c in commands)


def test_readme_quick_start_runs():
    pytest.importorskip("torch")
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quick start\s+```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    H = namespace["H"]
    dense = H.to_dense().numpy()
    hv = (H @ H.ravel(namespace["np"].ones(20))).numpy()
    assert abs(hv - dense.sum(axis=1)).max() < 1e-12


def test_readme_has_the_two_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert any(c.strip().endswith("hessop bench") and "venv" in c for c in commands)
    assert any(c.strip().endswith("pytest") and "venv" in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    assert [c for c in commands if c.strip().endswith("pytest")][0] in ci

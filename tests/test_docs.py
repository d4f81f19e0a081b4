"""The documentation builds without warnings, and the README's quick start runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
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
    assert (tmp_path / "html" / "index.html").exists()


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

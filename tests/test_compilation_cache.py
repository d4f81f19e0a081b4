"""hessop.enable_compilation_cache: compiled products on disk, for later processes.

The switch is checked where it acts (the folder, torch's TORCHINDUCTOR_CACHE_DIR, JAX's
cache settings), with every global it sets restored after each test. Whether torch's
AOTAutograd cache accepts hessop's compiled product is read off the dynamo graph of the
product (a trace, no compilation); ``-m slow`` adds two real processes, the second of
which must load the first one's compilation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hessop
from hessop import backends
from hessop._compilation_cache import default_cache_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restored(monkeypatch):
    """The registry's folder and the frameworks' cache settings, put back after the test."""
    monkeypatch.setattr(backends, "_CACHE_FOLDER", [])
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv(backends.CACHE_ENV, raising=False)
    jax = sys.modules.get("jax")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {n: getattr(jax.config, n) for n in names} if jax else {}
    yield monkeypatch
    if jax:
        from jax.experimental.compilation_cache import compilation_cache

        for n, value in before.items():
            jax.config.update(n, value)
        compilation_cache.reset_cache()


def test_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_folder() == tmp_path / "hessop"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_folder() == Path.home().resolve() / ".cache" / "hessop"


def test_enable_sets_each_loaded_framework(restored, tmp_path):
    pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    hessop.get_backend("torch"), hessop.get_backend("jax")
    folder = hessop.enable_compilation_cache(tmp_path / "new" / "cache")
    assert folder == (tmp_path / "new" / "cache").resolve() and folder.is_dir()
    assert folder.stat().st_mode & 0o077 == 0  # created for its owner only
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "torch")
    assert jax.config.jax_compilation_cache_dir == str(folder / "jax")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


def test_enable_rejects_what_is_not_a_folder(restored, tmp_path):
    with pytest.raises(TypeError, match="path must be a folder"):
        hessop.enable_compilation_cache(3)
    afile = tmp_path / "f"
    afile.write_text("")
    with pytest.raises(ValueError, match="path must be a folder.*is a file"):
        hessop.enable_compilation_cache(afile)
    assert backends._CACHE_FOLDER == []  # nothing half-done


def test_a_backend_loaded_later_and_the_environment_variable(restored, tmp_path):
    pytest.importorskip("torch")
    # a backend loaded after the call gets its folder when it loads
    restored.setattr(backends, "_LOADED", {})
    hessop.enable_compilation_cache(tmp_path)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    hessop.get_backend("torch")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve() / "torch")
    # HESSOP_COMPILATION_CACHE: the same, without a call
    restored.setattr(backends, "_LOADED", {})
    restored.setattr(backends, "_CACHE_FOLDER", [])
    restored.setenv(backends.CACHE_ENV, str(tmp_path / "env"))
    hessop.get_backend("torch")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve() / "env" / "torch")


def test_torch_func_graph_enters_the_aot_autograd_cache():
    """dynamo's graph of hessop's product calls functorch's nesting functions, which the
    AOTAutograd cache refuses unless hessop marks them (it does, while it compiles)."""
    torch = pytest.importorskip("torch")
    from torch._functorch._aot_autograd.autograd_cache import (
        BypassAOTAutogradCache,
        check_cacheable,
    )

    from hessop._loss import Loss
    from hessop.backends.torch._compile import _CACHEABLE, _build

    def loss(w, x):
        return (torch.tanh(x @ w) ** 2).mean()

    w, x = torch.ones(3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    H = hessop.hessian(loss, w, x)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for mode in ("reverse-over-forward", "forward-over-reverse"):
        product = _build(Loss(loss, H.spec, hessop.get_backend("torch")), mode).eager
        torch.compile(product, backend=capture, fullgraph=True)((w,), (w,), (x,))
        gm = graphs[-1]
        with pytest.raises(BypassAOTAutogradCache, match="predispatch"):
            check_cacheable(gm)
        with torch._inductor.config.patch(unsafe_marked_cacheable_functions=_CACHEABLE):
            check_cacheable(gm)  # no exception: cacheable


CHILD = """
import json, sys, torch, hessop
from torch._dynamo.utils import counters
hessop.enable_compilation_cache(sys.argv[1])
w, x = torch.linspace(0.1, 1, 5, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64)
H = hessop.hessian(lambda w, x: (torch.tanh(x @ w) ** 2).sum(), w, x, compile=True)
print(json.dumps({"compile_time": H.compile_time, "hv": (H @ w).tolist(),
                  "aot": dict(counters["aot_autograd"]), "fx": dict(counters["inductor"])}))
"""


@pytest.mark.slow
def test_a_second_process_loads_the_compilation(tmp_path):
    pytest.importorskip("torch")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=600,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["aot"].get("autograd_cache_miss") == 1 and cold["aot"].get("autograd_cache_saved")
    assert warm["aot"].get("autograd_cache_hit") == 1 and not warm["aot"].get(
        "autograd_cache_bypass"
    )
    assert warm["hv"] == cold["hv"]
    assert any((tmp_path / "torch").iterdir())

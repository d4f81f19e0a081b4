"""The backend registry: which backends exist, and which ones are installed."""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

import hessop
from hessop import backends as registry


def test_available_backends_lists_every_registered_name():
    assert hessop.available_backends() == ["numpy", "torch", "jax"]
    assert hessop.available_backends(installed=False) == ["numpy", "torch", "jax"]


def test_installed_matches_find_spec():
    expected = ["numpy"]
    expected += ["torch"] if importlib.util.find_spec("torch") else []
    jax_ok = importlib.util.find_spec("jax") and importlib.util.find_spec("jaxlib")
    expected += ["jax"] if jax_ok else []
    assert hessop.available_backends(installed=True) == expected


@pytest.mark.parametrize(
    "hidden, expected",
    [
        (("torch",), ["numpy", "jax"]),
        (("jax",), ["numpy", "torch"]),
        (("jaxlib",), ["numpy", "torch"]),  # jax without jaxlib cannot run
        (("torch", "jax"), ["numpy"]),
    ],
)
def test_installed_leaves_out_a_missing_framework(monkeypatch, hidden, expected):
    # The frameworks are installed here; a None entry in sys.modules makes find_spec (and
    # import) report them missing, as in an environment without them.
    for name in ("torch", "jax", "jaxlib"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name} installed, to hide it")
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)
    assert hessop.available_backends(installed=True) == expected
    assert hessop.available_backends() == ["numpy", "torch", "jax"]  # still accepted names


def test_installed_keeps_user_registered_backends(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "mine", (lambda: None, lambda x: False, "mine"))
    assert "mine" in hessop.available_backends(installed=True)


def test_installed_must_be_a_bool():
    with pytest.raises(TypeError, match="installed must be True or False"):
        hessop.available_backends(installed="yes")


def test_installed_imports_no_framework():
    code = textwrap.dedent(
        """
        import json, sys, hessop
        names = hessop.available_backends(installed=True)
        print(json.dumps([names, [m for m in ("torch", "jax") if m in sys.modules]]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names, imported = json.loads(out.stdout)
    assert names == hessop.available_backends(installed=True)
    assert imported == [], f"available_backends(installed=True) imported {imported}"

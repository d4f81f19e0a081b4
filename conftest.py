"""Doctest collection: skip modules and guide pages whose framework is not installed."""

import importlib.util
import re

collect_ignore = ["setup.py", "examples", "benchmarks"]
collect_ignore_glob = ["docs/*.py"]  # Sphinx configuration and the figures, not tests
if importlib.util.find_spec("torch") is None:
    collect_ignore += ["hessop/backends/_torch.py"]
if importlib.util.find_spec("jax") is None:
    collect_ignore += ["hessop/backends/_jax.py"]


def needs(text: str, name: str) -> bool:
    """Whether doctest ``text`` uses framework ``name`` (a backend= or an import of it)."""
    imports = re.compile(rf"^\s*>>> (?:import|from) [^\n]*\b{name}\b", re.MULTILINE)
    return f'backend="{name}"' in text or imports.search(text) is not None


def pytest_collection_modifyitems(config, items):
    """Skip doctests that need a framework which is not installed."""
    import pytest

    missing = [n for n in ("torch", "jax") if importlib.util.find_spec(n) is None]
    for item in items:
        text = getattr(getattr(item, "dtest", None), "docstring", None) or ""
        for name in missing:
            if needs(text, name):
                item.add_marker(pytest.mark.skip(reason=f"needs {name}"))

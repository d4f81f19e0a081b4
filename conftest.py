"""Doctest collection: skip modules whose framework is not installed."""

import importlib.util

collect_ignore = ["setup.py", "docs/conf.py", "examples", "benchmarks"]
if importlib.util.find_spec("torch") is None:
    collect_ignore += ["hessop/backends/_torch.py"]
if importlib.util.find_spec("jax") is None:
    collect_ignore += ["hessop/backends/_jax.py"]


def pytest_collection_modifyitems(config, items):
    """Skip doctests that need a framework which is not installed."""
    import pytest

    missing = [n for n in ("torch", "jax") if importlib.util.find_spec(n) is None]
    for item in items:
        text = getattr(getattr(item, "dtest", None), "docstring", None) or ""
        for name in missing:
            if f'backend="{name}"' in text or f"import {name}" in text:
                item.add_marker(pytest.mark.skip(reason=f"needs {name}"))

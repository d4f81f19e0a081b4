"""Sphinx configuration: API reference generated from the docstrings."""

import importlib.metadata

project = "hessop"
author = "hessop developers"
release = importlib.metadata.version("hessop")
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
# The frameworks are optional; documenting them must not need them installed.
autodoc_mock_imports = []
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header"]

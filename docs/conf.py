"""Sphinx configuration: the user guide (Markdown, with figures drawn at build time) and the
API reference generated from the docstrings."""

import datetime
import importlib.metadata
import os
import sys

# The guide's figures are drawn by docs/figures.py when the docs are built (matplotlib's
# plot directive), into the build folder: nothing generated lives in the source tree.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

project = "hessop"
author = "hessop developers"
copyright = f"2026-{datetime.date.today().year}, {author}"
release = importlib.metadata.version("hessop")
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    "matplotlib.sphinxext.plot_directive",
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
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]

"""Sphinx configuration: the user guide (Markdown, with figures drawn at build time) and the
API reference generated from the docstrings."""

import importlib.metadata
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The figures' matrices are tiny: BLAS threads only fight over the cores (on a busy 2-core
# machine they made the figures 30 times slower). Set before numpy is first imported; a
# value set by the caller wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, HERE)

project = "hessop"
author = "hessop developers"
copyright = "2026, hessop developers"
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
exclude_patterns = ["_build", "_figures"]
suppress_warnings = ["myst.header"]


def draw_figures(app) -> None:
    """Draw the guide's figures (docs/figures.py) into docs/_figures/, git-ignored."""
    import figures

    figures.draw_all(os.path.join(HERE, "_figures"))


def strip_trailing_blank_lines(app, doctree) -> None:
    """Drop the blank line that ends each doctest block of the guide (doctest needs it
    before the closing fence, the reader does not)."""
    from docutils import nodes

    for node in doctree.findall(nodes.literal_block):
        text = node.astext()
        if text.endswith("\n") and node.rawsource == text:
            node.rawsource = text.rstrip("\n")
            node.children = [nodes.Text(node.rawsource)]


def setup(app) -> None:
    app.connect("builder-inited", draw_figures)
    app.connect("doctree-read", strip_trailing_blank_lines)

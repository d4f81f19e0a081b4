"""A matplotlib figure on the non-interactive Agg canvas, without pyplot's global state."""

from __future__ import annotations

from typing import Any


def new_figure(what: str, size: tuple[float, float] = (6.0, 4.0)) -> Any:
    """A ``matplotlib.figure.Figure`` with an Agg canvas; a clear ImportError naming the
    extra to install when matplotlib is missing (``what`` names the caller)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            f"{what} needs matplotlib, which is not installed; install it with: "
            "pip install 'hessop[plot]'"
        ) from err
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig

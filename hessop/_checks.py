"""Validation of scalar options, shared by every public function.

Each check returns the value converted to its Python type or raises a ``ValueError`` (or
``TypeError`` for the wrong kind of value) that names the argument and its valid range, so
that a meaningless option fails at the call instead of deep inside an algorithm.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    # 0-d arrays of any framework (float(x) works on them)
    return getattr(value, "shape", None) == () and hasattr(value, "dtype")


def integer(value: Any, name: str, minimum: int | None = None) -> int:
    """``value`` as an int ``>= minimum``.

    >>> integer(3, "k", minimum=1)
    3
    >>> integer(0, "k", minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: k must be an integer >= 1, got 0
    """
    want = "an integer" if minimum is None else f"an integer >= {minimum}"
    if not is_int(value):
        raise TypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return int(value)


def optional_integer(value: Any, name: str, minimum: int | None = None) -> int | None:
    """Like :func:`integer`, with None passed through."""
    return None if value is None else integer(value, name, minimum)


def real(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    positive: bool = False,
) -> float:
    """``value`` as a finite float; ``positive`` asks ``> 0``, ``minimum`` asks ``>= minimum``.

    >>> real(1e-6, "tol", positive=True)
    1e-06
    >>> real(float("nan"), "sigma", positive=True)
    Traceback (most recent call last):
    ...
    ValueError: sigma must be a finite number > 0, got nan
    """
    if positive:
        want = "a finite number > 0"
    elif minimum is not None:
        want = f"a finite number >= {minimum:g}"
    else:
        want = "a finite number"
    if not _is_real(value):
        raise TypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x) or (positive and x <= 0) or (minimum is not None and x < minimum):
        raise ValueError(f"{name} must be {want}, got {x!r}")
    return x


def optional_real(value: Any, name: str, **kw: Any) -> float | None:
    """Like :func:`real`, with None passed through."""
    return None if value is None else real(value, name, **kw)


def flag(value: Any, name: str) -> bool:
    """``value`` as a bool; only True and False (numpy's too) are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)

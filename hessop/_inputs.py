"""User inputs as arrays of the computing framework: one place for every conversion.

numpy arrays are converted (floating ones to the computation's dtype, onto its device);
arrays of the computing framework pass through; arrays of another framework are refused,
since converting them silently would copy (and maybe move) every batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _pytree
from .backends import Backend, infer_backend


def check_framework(bk: Backend, x: Any, what: str, hint: str = "") -> str | None:
    """The framework of ``x`` (None for non-arrays); a ``TypeError`` naming ``what`` when it
    is neither numpy nor ``bk``'s: silently converting across frameworks would copy (and
    maybe move) every batch."""
    name = infer_backend(x)
    if name not in (None, "numpy", bk.name):
        raise TypeError(
            f"{what} is a {name} array but the operator uses {bk.name}; pass {bk.name} or "
            f"numpy arrays{hint}"
        )
    return name


#: what to do with a DataLoader of the other framework
BATCH_HINT = " (for a torch DataLoader feeding JAX, convert each batch to numpy)"


def convert_arg(bk: Backend, x: Any, dtype: Any, device: Any) -> Any:
    """An argument of the loss as the backend's array: numpy floats in the operator's
    dtype, other numpy arrays as they are; native arrays untouched."""
    if bk.owns(x):
        return x
    if check_framework(bk, x, "an argument of the loss", BATCH_HINT) == "numpy":
        kind = np.asarray(x).dtype.kind
        return bk.asarray(x, dtype=dtype if kind == "f" else None, device=device)
    return x


def native(bk: Backend, x: Any, what: str, floating: bool = True, like: Any = None) -> Any:
    """``x`` as a native array of ``bk``'s framework.

    A numpy array is converted: floating ones to ``like``'s dtype when given (else their
    own), onto ``like``'s device.
    """
    if not bk.owns(x):
        kind = infer_backend(x)
        if kind != "numpy" or not hasattr(x, "dtype"):
            got = type(x).__module__.split(".")[0] + "." + type(x).__name__
            raise TypeError(
                f"{what} must be a {bk.name} or numpy array, got {got}; convert it first or "
                "pass the matching backend="
            )
        dtype = None
        if x.dtype.kind == "f":
            dtype = like.dtype if like is not None else x.dtype
        dev = _device(bk, like)
        x = bk.asarray(x, dtype=dtype, device=dev)
    if floating:
        bk.check_floating(x.dtype, what)
    return x


def native_args(bk: Backend, args: tuple[Any, ...], like: Any) -> tuple[Any, ...]:
    """Convert numpy arrays in ``args`` (floating ones to ``like``'s dtype and device)."""
    dev = _device(bk, like)
    return tuple(_pytree.map_arrays(lambda a: convert_arg(bk, a, like.dtype, dev), args))


def _device(bk: Backend, like: Any) -> Any:
    # A tracer (inside a JAX transformation) has no device: let the framework place it.
    if like is None or bk.is_tracer(like):
        return None
    return bk.device_of(like)

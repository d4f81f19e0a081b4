"""What every backend provides: one framework's arrays, devices and (optionally) AD."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import DeviceError, DTypeError


class Backend:
    """One array framework as hessop sees it.

    Array-only backends (numpy) implement the array methods; autodiff backends (torch, JAX)
    also implement :meth:`hessian_operator`. A third framework is added by subclassing this
    and calling :func:`hessop.backends.register_backend`.
    """

    name: str = "?"
    #: the array-API namespace of the framework (array_api_compat's wrapper or jax.numpy)
    xp: Any = None
    #: True when the backend implements automatic differentiation
    differentiable: bool = False

    # --- arrays ---------------------------------------------------------------------------
    def owns(self, x: Any) -> bool:
        """Whether ``x`` is a native array of this framework."""
        raise NotImplementedError

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Any:
        """Convert ``x`` (numpy, python scalar or native) to a native array."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def device_of(self, x: Any) -> Any:
        return None

    def default_device(self) -> Any:
        return None

    def resolve_device(self, device: Any) -> Any:
        """Turn a user's ``device=`` (string or native) into the native device object."""
        return device

    def dtype(self, dtype: Any) -> Any:
        """Turn a dtype given by name, numpy dtype or native dtype into the native dtype."""
        raise NotImplementedError

    def dtype_name(self, dtype: Any) -> str:
        return str(dtype).replace("torch.", "")

    def is_floating(self, dtype: Any) -> bool:
        return self.dtype_name(dtype) in ("float16", "bfloat16", "float32", "float64")

    def eps(self, dtype: Any) -> float:
        return float(np.finfo(self.dtype_name(dtype)).eps)

    def stop_gradient(self, x: Any) -> Any:
        return x

    def jit(self, fn: Callable[..., Any], device: Any) -> Callable[..., Any]:
        """``fn(xp, *arrays)`` bound to this namespace, compiled where that pays.

        The default runs eagerly; a framework with a tracing compiler (JAX) compiles it
        once per ``fn`` and shapes.
        """
        return functools.partial(fn, self.xp)

    # --- checks shared by every operator --------------------------------------------------
    def check_floating(self, dtype: Any, what: str) -> None:
        if not self.is_floating(dtype):
            raise DTypeError(
                f"{what} has dtype {self.dtype_name(dtype)}; hessop works on real floating "
                "point arrays (float32 or float64). Convert it first, e.g. x.astype('float64')."
            )

    def check_device(self, x: Any, device: Any, what: str) -> None:
        have = self.device_of(x)
        if device is not None and have is not None and have != device:
            raise DeviceError(
                f"{what} is on device {have} but the operator is on {device}; "
                f"move it first (e.g. x.to({str(device)!r}) in torch, jax.device_put in JAX)."
            )

    # --- autodiff -------------------------------------------------------------------------
    def hessian_operator(self, problem: Any, mode: str, **options: Any) -> Any:
        raise NotImplementedError(f"the {self.name!r} backend has no automatic differentiation")

    def __repr__(self) -> str:
        return f"<hessop backend {self.name!r}>"

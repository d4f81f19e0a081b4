"""numpy as an array-only backend: dense and scipy operators, no differentiation."""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np

from ._base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    xp = xp_numpy

    def owns(self, x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Any:
        return np.asarray(x, dtype=dtype)

    def device_of(self, x: Any) -> Any:
        return "cpu"

    def default_device(self) -> Any:
        return "cpu"

    def resolve_device(self, device: Any) -> Any:
        return "cpu"

    def dtype(self, dtype: Any) -> Any:
        return np.dtype(dtype)

    def dtype_name(self, dtype: Any) -> str:
        return np.dtype(dtype).name


BACKEND = NumpyBackend()

"""hessop: matrix-free Hessian operators for PyTorch and JAX.

Examples
--------
>>> import numpy as np, hessop
>>> H = hessop.hessian(lambda w: (w**4).sum(), np.array([1.0, 2.0]), backend="torch")
>>> H @ H.ravel(np.ones(2))
tensor([12., 48.], dtype=torch.float64)
"""

from ._errors import (
    BackendNotAvailableError,
    DeviceError,
    DTypeError,
    EmptyDataError,
    ForwardModeUnsupportedError,
    HessopError,
    LossError,
    ShapeError,
    UnknownOptionError,
)
from ._hessian import MODES, HessianOperator, hessian
from ._operator import (
    CallableOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    aslinearoperator,
)
from .backends import available_backends, get_backend, register_backend

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "BackendNotAvailableError",
    "CallableOperator",
    "DTypeError",
    "DenseOperator",
    "DeviceError",
    "EmptyDataError",
    "ForwardModeUnsupportedError",
    "HessianOperator",
    "HessopError",
    "IdentityOperator",
    "LinearOperator",
    "LossError",
    "ShapeError",
    "UnknownOptionError",
    "aslinearoperator",
    "available_backends",
    "get_backend",
    "hessian",
    "register_backend",
]

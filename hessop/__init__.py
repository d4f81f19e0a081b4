"""hessop: matrix-free Hessian operators for PyTorch and JAX.

Examples
--------
>>> import numpy as np, hessop
>>> H = hessop.hessian(lambda w: (w**4).sum(), np.array([1.0, 2.0]), backend="torch")
>>> H @ H.ravel(np.ones(2))
tensor([12., 48.], dtype=torch.float64)
"""

from ._compilation_cache import enable_compilation_cache
from ._errors import (
    BackendNotAvailableError,
    DeviceError,
    DistributedError,
    DTypeError,
    EmptyDataError,
    ForwardModeUnsupportedError,
    HessopError,
    LossError,
    NonFiniteError,
    RandomnessError,
    ShapeError,
    StaleOperatorError,
    UnknownOptionError,
)
from ._hessian import MODES, HessianOperator, hessian
from ._hvp import hvp
from ._operator import (
    CallableOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    aslinearoperator,
)
from ._streamed import CurvatureOperator
from .algorithms import (
    CGResult,
    DiagonalResult,
    EigshResult,
    InverseHVPResult,
    LanczosResult,
    PowerIterationResult,
    SpectralDensity,
    TraceResult,
    cg,
    diagonal,
    eigsh,
    inverse_hvp,
    lanczos,
    plot_spectral_density,
    power_iteration,
    spectral_density,
    trace,
)
from .backends import available_backends, get_backend, register_backend
from .models._api import model_hessian, model_hvp
from .models.fisher import FisherOperator, model_fisher
from .models.ggn import GGNOperator, model_ggn
from .per_sample import jacobian, per_sample_gradients, per_sample_hessians

__version__ = "0.1.0"

__all__ = [
    "MODES",
    # algorithms
    "CGResult",
    "DiagonalResult",
    "EigshResult",
    "InverseHVPResult",
    "LanczosResult",
    "PowerIterationResult",
    "SpectralDensity",
    "TraceResult",
    "cg",
    "diagonal",
    "eigsh",
    "inverse_hvp",
    "lanczos",
    "plot_spectral_density",
    "power_iteration",
    "spectral_density",
    "trace",
    # per-sample quantities and functional derivatives
    "hvp",
    "jacobian",
    "per_sample_gradients",
    "per_sample_hessians",
    # core
    "BackendNotAvailableError",
    "CallableOperator",
    "CurvatureOperator",
    "DTypeError",
    "DenseOperator",
    "DeviceError",
    "DistributedError",
    "EmptyDataError",
    "FisherOperator",
    "ForwardModeUnsupportedError",
    "GGNOperator",
    "HessianOperator",
    "HessopError",
    "IdentityOperator",
    "LinearOperator",
    "LossError",
    "NonFiniteError",
    "RandomnessError",
    "ShapeError",
    "StaleOperatorError",
    "UnknownOptionError",
    "aslinearoperator",
    "available_backends",
    "enable_compilation_cache",
    "get_backend",
    "hessian",
    "model_fisher",
    "model_ggn",
    "model_hessian",
    "model_hvp",
    "register_backend",
]

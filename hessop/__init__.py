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
    UnsupportedLayerError,
)
from ._hessian import MODES, HessianOperator, hessian
from ._hvp import hvp
from ._jacobian_operator import JacobianOperator, jacobian_operator
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
from .jacobians import jacobian, output_hessians
from .models._api import model_hessian, model_hvp
from .models.fisher import FisherOperator, model_fisher
from .models.ggn import GGNOperator, model_ggn
from .models.kfac import KFACInverseOperator, KFACOperator, model_kfac
from .models.layers import CurvatureByLayerResult, LayerCurvature, curvature_by_layer
from .models.sharpness import SharpnessRecord, SharpnessTracker, plot_sharpness
from .per_sample import per_sample_gradients, per_sample_hessians, per_sample_jacobians

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
    "jacobian_operator",
    "output_hessians",
    "per_sample_gradients",
    "per_sample_hessians",
    "per_sample_jacobians",
    # core
    "BackendNotAvailableError",
    "CallableOperator",
    "CurvatureByLayerResult",
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
    "JacobianOperator",
    "LayerCurvature",
    "KFACInverseOperator",
    "KFACOperator",
    "LinearOperator",
    "LossError",
    "NonFiniteError",
    "RandomnessError",
    "ShapeError",
    "SharpnessRecord",
    "SharpnessTracker",
    "StaleOperatorError",
    "UnknownOptionError",
    "UnsupportedLayerError",
    "aslinearoperator",
    "available_backends",
    "curvature_by_layer",
    "enable_compilation_cache",
    "get_backend",
    "hessian",
    "model_fisher",
    "model_ggn",
    "model_hessian",
    "model_hvp",
    "plot_sharpness",
    "model_kfac",
    "register_backend",
]

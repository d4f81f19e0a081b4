"""Algorithms on linear operators, written once against the array API.

They accept any :class:`hessop.LinearOperator` (and dense arrays, scipy operators or, where
the size is known, matvec callables), run on the operator's framework and device, take an
explicit ``seed`` for any randomness, and return small typed result objects.
"""

from .cg import CGResult, cg
from .density import SpectralDensity, plot_spectral_density, spectral_density
from .diagonal import DiagonalResult, diagonal
from .eig import EigshResult, PowerIterationResult, eigsh, power_iteration
from .inverse import InverseHVPResult, inverse_hvp
from .lanczos import LanczosResult, lanczos
from .trace import TraceResult, trace

__all__ = [
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
]

"""Spectral density by stochastic Lanczos quadrature (SLQ), and a plot helper."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks
from ._common import as_operator, check_finite_input, host, new_rng, random_probes
from .lanczos import lanczos_block, tridiagonal_eigh


@dataclass(frozen=True)
class SpectralDensity:
    """What :func:`spectral_density` returns.

    Attributes
    ----------
    grid :
        ``(num_points,)`` points where the density is evaluated (operator's framework).
    density :
        ``(num_points,)`` the smoothed eigenvalue density on ``grid``; it integrates to 1
        (the grid extends far enough beyond the extreme nodes for the Gaussian tails).
    nodes :
        ``(num_probes, num_iter)`` Ritz values of each probe's Lanczos run (the quadrature
        nodes); entries past a run's breakdown are 0 with weight 0.
    weights :
        ``(num_probes, num_iter)`` quadrature weights (squared first components of the
        Ritz vectors); each row sums to 1.
    sigma : float
        Standard deviation of the Gaussian broadening.
    num_matvecs : int
        Products with the operator.
    """

    grid: Any
    density: Any
    nodes: Any
    weights: Any
    sigma: float
    num_matvecs: int


def spectral_density(
    A: Any,
    *,
    num_probes: int = 8,
    num_iter: int = 64,
    seed: Any = 0,
    grid: Any = None,
    num_points: int = 1024,
    sigma: float | None = None,
    reorthogonalize: bool = True,
    progress: bool = False,
) -> SpectralDensity:
    """Estimate the eigenvalue density of a symmetric operator (stochastic Lanczos quadrature).

    Each of ``num_probes`` Rademacher probes runs ``num_iter`` Lanczos steps; the Ritz
    values ``theta_j`` and squared first eigenvector components ``tau_j`` of its tridiagonal
    matrix are a Gauss quadrature of the spectral measure seen from the probe, and
    ``phi(t) = mean over probes of sum_j tau_j N(t; theta_j, sigma^2)`` (Lin, Saad & Yang,
    2016; Ghorbani, Krishnan & Xiao, 2019 for neural-network Hessians). All probes run in
    lockstep, so each Lanczos step is one ``A.matmat`` with ``num_probes`` columns.

    Parameters
    ----------
    A :
        A symmetric :class:`hessop.LinearOperator`, dense array or scipy operator.
    num_probes : int
        Random probe vectors (the estimate's variance falls as 1 / num_probes).
    num_iter : int
        Lanczos steps per probe (capped at d); more resolves finer spectral detail.
    seed :
        Seed of the private numpy generator drawing the probes; global RNG state is
        untouched.
    grid :
        Points where to evaluate the density (1-D array); default ``num_points`` evenly
        spaced points from ``min(theta) - 6 sigma`` to ``max(theta) + 6 sigma``.
    num_points : int
        Size of the default grid, at least 2.
    sigma : float, optional
        Gaussian broadening; default 1% of the spread of the nodes (or of their magnitude
        when they all coincide).
    reorthogonalize : bool
        Full reorthogonalization in Lanczos (recommended: without it, converged
        eigenvalues get spurious copies that distort the weights).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    SpectralDensity

    Raises
    ------
    NonFiniteError
        When the grid or a product of the operator holds NaN or infinity.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> A = np.diag(np.repeat([1.0, 5.0], 50))
    >>> res = hessop.spectral_density(A, num_probes=4, num_iter=10, sigma=0.1)
    >>> g, p = np.asarray(res.grid), np.asarray(res.density)
    >>> round(float(np.sum(p) * (g[1] - g[0])), 6)
    1.0
    >>> round(float(np.sum(p[g < 3]) * (g[1] - g[0])), 1)   # half the mass near 1
    0.5
    """
    A = as_operator(A)
    d = A.shape[0]
    num_probes = _checks.integer(num_probes, "num_probes", minimum=1)
    m = min(_checks.integer(num_iter, "num_iter", minimum=1), d)
    sigma = _checks.optional_real(sigma, "sigma", positive=True)
    num_points = _checks.integer(num_points, "num_points", minimum=2)
    reorth = _checks.flag(reorthogonalize, "reorthogonalize")
    t = None if grid is None else _grid(A, grid)
    V0 = A.asarray(random_probes(new_rng(seed), d, num_probes, "rademacher").T)
    run = lanczos_block(A, V0, m, reorthogonalize=reorth, progress=progress, algo="slq")
    nodes = np.zeros((num_probes, m))
    weights = np.zeros((num_probes, m))
    for i in range(num_probes):
        n = int(run.lengths[i])
        theta, U = tridiagonal_eigh(run.alpha[i, :n], run.beta[i, :n])
        nodes[i, :n] = theta
        weights[i, :n] = U[0, :] ** 2
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    if sigma is None:
        spread = hi - lo
        sigma = 0.01 * spread if spread > 0 else 0.01 * max(abs(hi), 1.0)
    if t is None:
        t = np.linspace(lo - 6 * sigma, hi + 6 * sigma, num_points)
    # Sum the Gaussians in chunks of the grid: (points x nodes) stays small.
    flat_nodes, flat_w = nodes[used], weights[used] / num_probes
    density = np.empty_like(t)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    for s in range(0, len(t), 4096):
        diff = (t[s : s + 4096, None] - flat_nodes[None, :]) / sigma
        density[s : s + 4096] = norm * (np.exp(-0.5 * diff * diff) @ flat_w)
    return SpectralDensity(
        grid=A.asarray(t),
        density=A.asarray(density),
        nodes=A.asarray(nodes),
        weights=A.asarray(weights),
        sigma=sigma,
        num_matvecs=run.num_matvecs,
    )


def _grid(A: Any, grid: Any) -> np.ndarray:
    """A user's grid as float64 numpy: a non-empty 1-D array of finite real numbers."""
    try:
        arr = host(grid, dtype=None)
    except (TypeError, ValueError) as err:  # ragged nesting, an object numpy cannot read
        raise TypeError(f"grid must be a 1-D array of real numbers: {err}") from None
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"grid must be a 1-D array of real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"grid must be a non-empty 1-D array, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    check_finite_input(A, A.asarray(arr), "spectral_density", "grid")
    return arr


def plot_spectral_density(
    result: SpectralDensity,
    path: str | os.PathLike[str],
    *,
    log: bool = False,
    title: str | None = None,
) -> str:
    """Plot a :class:`SpectralDensity` to an image file (PNG by the extension) and return the path.

    matplotlib is imported here only, with its non-interactive Agg canvas and no pyplot
    state: install it with ``pip install 'hessop[plot]'``.

    Parameters
    ----------
    result : SpectralDensity
    path : str or path-like
        Output file.
    log : bool
        Logarithmic density axis (the usual view of Hessian spectra, whose outliers
        carry little mass); values are floored at ``1e-12`` of the peak.
    title : str, optional

    Examples
    --------
    >>> import numpy as np, hessop, tempfile, os
    >>> res = hessop.spectral_density(np.diag(np.arange(1.0, 21.0)), num_iter=10)
    >>> path = hessop.plot_spectral_density(res, os.path.join(tempfile.mkdtemp(), "d.png"))
    >>> os.path.getsize(path) > 0
    True
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plot_spectral_density needs matplotlib, which is not installed; install it "
            "with: pip install 'hessop[plot]'"
        ) from err
    t, p = host(result.grid), host(result.density)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if log:
        ax.semilogy(t, np.maximum(p, 1e-12 * max(p.max(), np.finfo(float).tiny)))
    else:
        ax.plot(t, p)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log else "density")
    ax.set_title(title or f"spectral density (SLQ, sigma={result.sigma:.3g})")
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return os.fspath(path)

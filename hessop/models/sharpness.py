"""Sharpness during training: the top Hessian eigenvalues, warm-started from step to step.

Edge-of-stability studies (Cohen et al., 2021) follow the largest eigenvalue of the training
loss's Hessian along gradient descent and compare it with ``2 / learning rate``. Computed
cold, each measurement is a Lanczos run of 30-60 Hessian-vector products. Between two
nearby steps the top eigenvectors barely move, so :class:`SharpnessTracker` starts each
solve from the previous step's Ritz vectors (plus ``oversample`` extra ones, which keep it
on the top eigenvalue when two eigenvalues cross): a Rayleigh-Ritz step on that block, grown
by residuals until the residuals meet ``tol`` (see :mod:`hessop.algorithms._subspace`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks
from .._errors import unknown
from ..algorithms._subspace import RitzProblem, lockstep, random_block
from ._plot import new_figure
from .layers import CURVATURES, curvature_operator


@dataclass(frozen=True)
class SharpnessRecord:
    """One measurement of a :class:`SharpnessTracker`.

    Attributes
    ----------
    step : int
        The training step (the call's ``step=``, else the number of earlier calls).
    eigenvalues : numpy.ndarray
        The ``k`` largest eigenvalues, **largest first**; ``eigenvalues[0]`` is the
        sharpness.
    residual_norms : numpy.ndarray
        ``||H y_i - lambda_i y_i||``, computed exactly: an eigenvalue of H lies within it of
        ``eigenvalues[i]``.
    converged : numpy.ndarray
        Per pair, whether the residual met the tracker's ``tol``.
    num_matvecs : int
        Hessian-vector products spent on this measurement.
    warm : bool
        Whether it started from the previous measurement's eigenvectors.
    seconds : float
        Wall time of the measurement.
    """

    step: int
    eigenvalues: np.ndarray
    residual_norms: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    warm: bool
    seconds: float

    @property
    def sharpness(self) -> float:
        """The largest eigenvalue."""
        return float(self.eigenvalues[0])


class SharpnessTracker:
    """The top ``k`` Hessian eigenvalues of a model's loss, measured inside a training loop.

    Call it at every step with the model (or ``apply`` and ``params=``), the loss and the
    batch to measure on; at every ``every``-th step it measures and returns a
    :class:`SharpnessRecord` (other calls return None and cost nothing). Each measurement
    after the first starts from the previous one's eigenvectors, so on a slowly changing
    model it costs a few Hessian-vector products instead of a cold Lanczos run. The model is
    never changed (see :func:`hessop.model_hessian`); :attr:`history` keeps every record and
    :meth:`plot` draws the sharpness against ``2 / lr``.

    Parameters
    ----------
    k : int
        Eigenvalues per measurement.
    every : int
        Measure at steps 0, ``every``, ``2 every``, ... (the call's ``step=``, else the
        number of earlier calls).
    tol : float
        Relative residual of each pair: ``||H y - lambda y|| <= tol * |lambda|`` (relative
        to ``||H||`` for eigenvalues near zero). The eigenvalue's error is then about
        ``tol^2 |lambda|`` over the relative gap to the next eigenvalue.
    curvature : {"hessian", "ggn"}
        Track the Hessian, or the generalized Gauss-Newton matrix.
    max_matvecs : int
        Products per measurement, at most (a pair that did not converge by then is
        flagged in ``converged``).
    oversample : int
        Extra Ritz vectors carried from one measurement to the next (each costs one
        product per measurement; one is enough to follow the top eigenvalue through a
        crossing with the next one).
    warm_start : bool
        Start from the previous eigenvectors (False: every measurement is cold, from
        random vectors).
    ncv : int
        Largest subspace before a thick restart.
    seed : int
        Seed of the numpy generator of the cold start vectors (global RNG state is
        untouched).
    lr : float, optional
        The learning rate, for the ``2 / lr`` line of :meth:`plot`.
    label : str, optional
        The curve's name in :meth:`plot`.

    Examples
    --------
    >>> import torch, hessop
    >>> _ = torch.manual_seed(0)                            # the model's initial weights
    >>> g = torch.Generator().manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
    ...                             torch.nn.Linear(8, 1)).double()
    >>> x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    >>> y = torch.randn(64, 1, generator=g, dtype=torch.float64)
    >>> loss_fn = torch.nn.MSELoss()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
    >>> tracker = hessop.SharpnessTracker(k=1, every=5, lr=0.05)
    >>> for step in range(20):
    ...     rec = tracker(model, loss_fn, (x, y))          # None except every 5th step
    ...     opt.zero_grad()
    ...     loss_fn(model(x), y).backward()
    ...     opt.step()
    >>> [r.step for r in tracker.history], [r.warm for r in tracker.history]
    ([0, 5, 10, 15], [False, True, True, True])
    >>> H = hessop.model_hessian(model, loss_fn, (x, y)).to_dense()   # the final model
    >>> rec = tracker(model, loss_fn, (x, y), step=20)
    >>> bool(abs(rec.sharpness - torch.linalg.eigvalsh(H)[-1]) < 1e-5 * rec.sharpness)
    True
    """

    def __init__(
        self,
        k: int = 1,
        every: int = 1,
        *,
        tol: float = 1e-3,
        curvature: str = "hessian",
        max_matvecs: int = 200,
        oversample: int = 1,
        warm_start: bool = True,
        ncv: int = 20,
        seed: int = 0,
        lr: float | None = None,
        label: str | None = None,
    ) -> None:
        self.k = _checks.integer(k, "k", minimum=1)
        self.every = _checks.integer(every, "every", minimum=1)
        self.tol = _checks.real(tol, "tol", positive=True)
        if curvature not in CURVATURES:
            raise unknown("curvature", curvature, CURVATURES)
        self.curvature = curvature
        self.max_matvecs = _checks.integer(max_matvecs, "max_matvecs", minimum=1)
        self.oversample = _checks.integer(oversample, "oversample", minimum=0)
        self.warm_start = _checks.flag(warm_start, "warm_start")
        self.ncv = _checks.integer(ncv, "ncv", minimum=2)
        self.seed = _checks.integer(seed, "seed", minimum=0)
        self.lr = _checks.optional_real(lr, "lr", positive=True)
        if label is not None and not isinstance(label, str):
            raise TypeError(f"label must be a string, got {type(label).__name__}")
        self.label = label
        self.history: list[SharpnessRecord] = []
        self._calls = 0
        self._vectors: Any = None  # the last Ritz vectors, (d, k + oversample)
        self._where: Any = None  # (backend, size, dtype) they belong to

    def __call__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any],
        data: Any,
        *,
        params: Any = None,
        step: int | None = None,
        mode: str = "auto",
        **options: Any,
    ) -> SharpnessRecord | None:
        """Measure if ``step`` is a multiple of ``every``; else return None at no cost.

        ``model``, ``loss_fn``, ``data``, ``params``, ``mode`` and ``**options`` (``backend``,
        ``dtype``, ``batch_size``, ``reduction``, ...) are those of
        :func:`hessop.model_hessian` (:func:`hessop.model_ggn` with ``curvature="ggn"``).
        ``step`` is the training step (default: the number of earlier calls).
        """
        step = self._calls if step is None else _checks.integer(step, "step")
        self._calls += 1
        if step % self.every:
            return None
        start = time.perf_counter()
        A = curvature_operator(self.curvature, model, loss_fn, data, params, mode, options)
        where = (A.backend, A.shape[0], str(A.dtype), str(A.device))
        warm = self.warm_start and self._where == where
        if warm:
            X0 = self._vectors
        else:
            X0 = A.asarray(random_block(np.random.default_rng(self.seed), A.shape[0], self.k))
        problem = RitzProblem(
            A,
            X0,
            self.k,
            tol=self.tol,
            ncv=self.ncv,
            max_matvecs=self.max_matvecs,
            keep=self.k + self.oversample,
            rng=np.random.default_rng(self.seed),
            expand=1,  # one residual per round: the fewest products
        )
        lockstep([problem], lambda blocks, _: [A.matmat(blocks[0])])
        self._vectors, self._where = problem.vectors, where
        record = SharpnessRecord(
            step=step,
            eigenvalues=problem.values[: problem.k].copy(),
            residual_norms=problem.residual_norms.copy(),
            converged=problem.converged.copy(),
            num_matvecs=problem.num_matvecs,
            warm=warm,
            seconds=time.perf_counter() - start,
        )
        self.history.append(record)
        return record

    @property
    def steps(self) -> np.ndarray:
        """The steps measured."""
        return np.array([r.step for r in self.history], dtype=np.int64)

    @property
    def sharpness(self) -> np.ndarray:
        """The largest eigenvalue at each measured step."""
        return np.array([r.sharpness for r in self.history])

    def reset(self) -> None:
        """Forget the history, the call count and the warm start."""
        self.history.clear()
        self._calls, self._vectors, self._where = 0, None, None

    def plot(self, path: str | os.PathLike[str], **kw: Any) -> str:
        """:func:`plot_sharpness` of this tracker alone."""
        return plot_sharpness(self, path, **kw)


def plot_sharpness(
    trackers: SharpnessTracker | Sequence[SharpnessTracker],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    log: bool = False,
) -> str:
    """Plot the sharpness of one or more trackers against the step, each with its
    ``2 / lr`` line (when the tracker knows ``lr``), to an image file; returns the path.

    Needs matplotlib (``pip install 'hessop[plot]'``); draws on its Agg canvas without
    pyplot's global state.

    Parameters
    ----------
    trackers : SharpnessTracker or sequence of them
    path : str or path-like
        Output file (PNG by the extension).
    title : str, optional
    log : bool
        Logarithmic eigenvalue axis.

    Examples
    --------
    >>> import os, tempfile, torch, hessop
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> x = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    >>> tracker = hessop.SharpnessTracker(lr=0.1)
    >>> rec = tracker(model, torch.nn.MSELoss(), (x, torch.zeros(3, 1, dtype=torch.float64)))
    >>> round(rec.sharpness, 9)   # the Hessian of mean((x w)^2) is 2 x^T x / 3
    6.0
    >>> path = hessop.plot_sharpness(tracker, os.path.join(tempfile.mkdtemp(), "s.png"))
    >>> os.path.getsize(path) > 0
    True
    """
    if isinstance(trackers, SharpnessTracker):
        trackers = [trackers]
    fig = new_figure("plot_sharpness")
    ax = fig.add_subplot(1, 1, 1)
    for i, tr in enumerate(trackers):
        color = f"C{i}"
        name = tr.label or (f"lr={tr.lr:g}" if tr.lr else f"run {i}")
        if tr.history:
            values = np.stack([r.eigenvalues for r in tr.history])
            ax.plot(tr.steps, values[:, 0], color=color, marker=".", label=f"{name}: sharpness")
            for j in range(1, values.shape[1]):
                ax.plot(tr.steps, values[:, j], color=color, lw=0.7, alpha=0.5)
        if tr.lr:
            ax.axhline(2.0 / tr.lr, color=color, ls="--", lw=1, label=f"{name}: 2 / lr")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_title(title or "sharpness during training")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    return os.fspath(path)

"""The base of model-level curvature operators other than the Hessian (GGN, Fisher).

A :class:`CurvatureOperator` lives at one point of one model and loss, like a
:class:`~hessop.HessianOperator`, and shares its machinery: the :class:`~hessop._hessian.Problem`
built by :func:`hessop.hessian` (point, flat layout, converted batches, sizes), the
size-weighted streaming over ``data=`` and ``params``/``ravel``/``unravel``. A concrete
operator supplies the per-batch products ``_batch_mv`` and ``_batch_mm``, which must return
the batch's matrix for the batch-mean loss (``reduction="mean"``) or the batch-sum loss
(``"sum"``), exactly as a Hessian would.
"""

from __future__ import annotations

from typing import Any

from .._hessian import HessianOperator
from .._operator import LinearOperator


class CurvatureOperator(LinearOperator):
    """A symmetric positive semi-definite curvature matrix of a model's loss.

    Not built directly: see :func:`hessop.model_ggn` and :func:`hessop.model_fisher`.
    ``params`` is the point, as a params-shaped pytree (for an ``nn.Module``: a dict by
    name).

    Attributes
    ----------
    cache : bool
        Whether work independent of the vector is kept between products (one batch only).
    """

    def __init__(
        self,
        adapter: Any,
        hessian_op: HessianOperator,
        cache: bool | None = None,
        chunk_size: int | None = None,
    ) -> None:
        problem = hessian_op.problem
        d = problem.spec.size
        super().__init__(
            (d, d), hessian_op.dtype, hessian_op._bk, hessian_op.device, symmetric=True
        )
        self.adapter, self.problem, self._hessian = adapter, problem, hessian_op
        # Caching for a dataset would keep one state per batch alive: single batch only.
        self.cache = (not problem.streamed) and (True if cache is None else bool(cache))
        self.chunk_size = None if chunk_size is None else max(1, int(chunk_size))

    # The point, the layout and the dataset reduction are the Hessian's: these only read
    # ``self.problem`` (and the LinearOperator attributes).
    _reduce = HessianOperator._reduce
    params = HessianOperator.params
    ravel = HessianOperator.ravel
    unravel = HessianOperator.unravel

    def _batch_mv(self, args: tuple[Any, ...], v: Any) -> Any:
        raise NotImplementedError

    def _batch_mm(self, args: tuple[Any, ...], V: Any) -> Any:
        raise NotImplementedError

    def _check_point(self) -> None:
        self._hessian._check_point()

    def _matvec(self, v: Any) -> Any:
        return self._reduce(lambda args: self._batch_mv(args, v))

    def _matmat(self, V: Any) -> Any:
        step = self.chunk_size or V.shape[1]
        if step >= V.shape[1]:
            return self._reduce(lambda args: self._batch_mm(args, V))
        blocks = [self._matmat(V[:, j : j + step]) for j in range(0, V.shape[1], step)]
        return self.xp.concat(blocks, axis=1)

    def loss_and_gradient(self) -> tuple[Any, Any]:
        """The loss (0-d array) and its flat gradient at the point (over all the data)."""
        return self._hessian.loss_and_gradient()

    def gradient(self) -> Any:
        """The flat gradient of the loss at the point (over all the data)."""
        return self.loss_and_gradient()[1]


def split_columns(xp: Any, spec: Any, V: Any) -> list[Any]:
    """A ``(d, k)`` matrix as parameter-shaped leaves with the batch first, ``(k, *shape)``."""
    k, Vt = V.shape[1], xp.permute_dims(V, (1, 0))
    out, start = [], 0
    for shape, n in zip(spec.shapes, spec.sizes):
        out.append(xp.reshape(Vt[:, start : start + n], (k, *shape)))
        start += n
    return out


def join_columns(xp: Any, leaves: list[Any]) -> Any:
    """Inverse of :func:`split_columns`: leaves ``(k, *shape)`` to a ``(d, k)`` matrix."""
    k = leaves[0].shape[0]
    flat = xp.concat([xp.reshape(x, (k, -1)) for x in leaves], axis=1)
    return xp.permute_dims(flat, (1, 0))

"""The empirical Fisher matrix ``F = (1/N) sum_i g_i g_i^T`` of a model's loss.

``g_i`` is the gradient of the loss of sample ``i`` alone, ``loss_fn(model(x_i), y_i)``
evaluated on a batch of one, computed for every sample at once with ``vmap`` of the gradient
(the backend's :class:`~hessop.backends._base.Transforms`). A product is
``F v = (1/N) G^T (G v)`` with ``G`` the ``(n, d)`` matrix of a batch's per-sample
gradients, streamed batch by batch.

Normalization: with ``reduction="mean"`` the sum is divided by the number of samples ``N``
(over the whole dataset), with ``reduction="sum"`` it is not: ``F = sum_i g_i g_i^T``, the
Fisher of the summed loss, as its Hessian is the Hessian of the summed loss. The reduction
is read from ``loss_fn.reduction`` when the loss declares one.

Memory: a batch's ``G`` holds ``n * d`` numbers; with the cache (one batch, the default)
it is kept from the second product on, so each later product is two matrix products.
``chunk_size`` bounds the samples per vmapped call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _checks, _pytree
from .._sharing import SharedFunctions
from .._streamed import CurvatureOperator
from ..backends._base import CurvatureKernel, KernelOptions
from ._api import prepare, share_key
from ._data import batch_axes, converter, sample_count

#: per-sample gradient functions, shared by the Fisher operators of the same model
_SHARED = SharedFunctions(maxsize=16)


class FisherKernel(CurvatureKernel):
    """Per-batch empirical Fisher products from per-sample gradients (any framework)."""

    linearizable = True

    def __init__(self, model: Any, loss: Any, backend: Any, options: KernelOptions) -> None:
        self.model, self.spec, self.backend = model, loss.spec, backend
        self.transforms = backend.transforms
        self.chunk_size = options.chunk_size
        self.hessian = backend.hessian_kernel(loss, backend.auto_mode, options)
        self.randomness = "error" if getattr(model, "seed", None) is None else "different"
        self.mean = True  # set by model_fisher from the reduction
        # an operator per batch compiles once (its function is the same)
        self._grads = _SHARED.get(options.share_key, lambda: self.transforms.jit(self._per_sample))

    def _per_sample(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        tr, xp, spec, model = self.transforms, self.backend.xp, self.spec, self.model
        n = rows(args)
        dims = batch_axes(args, n)

        def sample_loss(leaves: Any, sample: Any) -> Any:
            # Inside vmap the batch axis is gone; give the model a batch of one.
            one = _pytree.tree_map(lambda a, d: a[None] if d == 0 else a, sample, dims)
            return model.loss(_pytree.unflatten(spec, list(leaves)), *one)

        G = tr.vmap(tr.grad(sample_loss), in_axes=(None, dims), randomness=self.randomness)(
            point, args
        )
        return xp.concat([xp.reshape(g, (n, -1)) for g in G], axis=1)

    def per_sample(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        """The ``(n, d)`` per-sample gradients of one batch, ``chunk_size`` samples a call."""
        n, step = rows(args), self.chunk_size
        with self.transforms.context(), self.model.scope():
            if step is None or step >= n:
                return self._grads(point, args)
            dims = batch_axes(args, n)

            def rows_of(j: int) -> Any:
                return _pytree.tree_map(lambda a, d: a[j : j + step] if d == 0 else a, args, dims)

            parts = [self._grads(point, rows_of(j)) for j in range(0, n, step)]
        return self.backend.xp.concat(parts, axis=0)

    def apply(self, G: Any, V: Any) -> Any:
        out = self.backend.xp.permute_dims(G, (1, 0)) @ (G @ V)
        return out / G.shape[0] if self.mean else out

    def product(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> Any:
        return self.apply(self.per_sample(point, args), V)

    def linearize(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> tuple[Any, Any]:
        G = self.per_sample(point, args)
        return self.apply(G, V), G

    def gradient(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> tuple[Any, Any]:
        return self.hessian.gradient(point, args)

    def depends_on_point(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> bool:
        return self.hessian.depends_on_point(point, args)


class FisherOperator(CurvatureOperator):
    """The empirical Fisher matrix of a model's loss (see :func:`model_fisher`)."""

    def per_sample_gradients(self, x: Any, y: Any) -> Any:
        """The ``(n, d)`` gradients of the samples of one batch, one per row, flat layout."""
        self.watch.check()
        args = converter(self._bk, self.dtype, self.device)((x, y))
        return self._kernel.per_sample(self._point, args)

    # Column chunks would recompute the per-sample gradients: one block per batch.
    def _batch_product(self, args: tuple[Any, ...], V: Any) -> Any:
        out = self._product(args, V)
        if not self._verified:
            self._verify(out, args, V)
        return out


def rows(args: tuple[Any, ...]) -> int:
    """The number of samples of a batch: the leading dimension of its first array."""
    n = sample_count(args)
    if n is not None:
        return n
    raise ValueError(
        f"cannot split the batch into samples: no array of the batch (x: "
        f"{type(args[0]).__name__}) has a leading dimension"
    )


def model_fisher(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    data: Any,
    *,
    params: Any = None,
    backend: str | None = None,
    dtype: Any = None,
    device: Any = None,
    batch_size: Callable[..., int] | None = None,
    reduction: str | None = None,
    cache: bool | None = None,
    chunk_size: int | None = None,
    allow_randomness: str | None = None,
    seed: int = 0,
    distributed: bool = False,
    process_group: Any = None,
) -> FisherOperator:
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` of ``loss_fn(model(x), y)``.

    ``g_i`` is the gradient of sample ``i``'s loss (``loss_fn`` on a batch of one), from
    ``vmap`` of the gradient; ``N`` the number of samples over the whole ``data``.
    ``reduction="sum"`` (the default when ``loss_fn.reduction`` is ``"sum"``) drops the
    ``1/N``. Positive semi-definite, of rank at most ``N``.
    Samples are the rows of the arrays of ``x`` and ``y`` whose leading dimension is the
    batch size (other arrays are passed whole to every sample).

    Arguments are those of :func:`hessop.model_hessian` (including ``distributed``);
    ``cache`` keeps the per-sample
    gradients of a single batch (default on), ``chunk_size`` is the number of samples per
    vmapped call. A torch model with BatchNorm in training mode is refused: its loss does
    not split into per-sample losses (call ``model.eval()``).

    Returns
    -------
    FisherOperator
        A symmetric :class:`hessop.LinearOperator` (``matvec``, ``matmat``, ``@``,
        ``to_dense``, ``to_scipy``, ``ravel``/``unravel``, ``per_sample_gradients``).

    Examples
    --------
    >>> import torch, hessop
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    >>> F = hessop.model_fisher(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> G = F.per_sample_gradients(x, y)             # (6, 8): one gradient per row
    >>> torch.allclose(F.to_dense(), G.T @ G / 6)
    True
    """
    p = prepare(
        model,
        loss_fn,
        data,
        params=params,
        backend=backend,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        reduction=reduction,
        allow_randomness=allow_randomness,
        seed=seed,
        distributed=distributed,
        process_group=process_group,
    )
    why = p.model.per_sample_error()
    if why is not None:
        raise ValueError(
            "the empirical Fisher needs per-sample losses, but " + why + " (or use "
            "hessop.model_ggn / model_hessian, which are defined on whole batches)"
        )
    cache = not p.batches.streamed if cache is None else _checks.flag(cache, "cache")
    chunk_size = _checks.optional_integer(chunk_size, "chunk_size", minimum=1)
    options = KernelOptions(
        p.device, cache=cache, chunk_size=chunk_size, share_key=share_key(p, "fisher")
    )
    kernel = FisherKernel(p.model, p.loss, p.backend, options)
    kernel.mean = p.batches.reduction == "mean"
    return FisherOperator(
        p.leaves,
        p.loss.spec,
        p.batches,
        kernel,
        backend=p.backend,
        device=p.device,
        watch=p.watch,
        loss=p.loss,
        cache=cache,
    )

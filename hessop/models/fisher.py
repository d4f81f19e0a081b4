"""The empirical Fisher matrix ``F = (1/N) sum_i g_i g_i^T`` of a model's loss.

``g_i`` is the gradient of the loss of sample ``i`` alone, ``loss_fn(model(x_i), y_i)``
evaluated on a batch of one, computed for every sample at once with ``torch.func.vmap`` /
``jax.vmap`` of the gradient. A product is ``F v = (1/N) G^T (G v)`` with ``G`` the
``(n, d)`` matrix of a batch's per-sample gradients, streamed batch by batch.

Normalization: ``reduction="mean"`` (the default) divides by the number of samples ``N``
(over the whole dataset), ``reduction="sum"`` does not: ``F = sum_i g_i g_i^T``. The loss of
one sample is the same whichever way ``loss_fn`` reduces a batch (mean or sum).

Memory: a batch's ``G`` holds ``n * d`` numbers; with the cache (one batch, the default)
it is kept, so each later product is two matrix products. ``chunk_size`` bounds the
samples per vmapped call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _pytree
from ._api import prepare
from ._curvature import CurvatureOperator
from ._data import batch_axes, tree_map


class FisherOperator(CurvatureOperator):
    """The empirical Fisher matrix of a model's loss (see :func:`model_fisher`)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self._G: Any = None
        if self.backend == "jax":
            import jax

            self._grads_jax = jax.jit(self._per_sample_jax)

    # --- per-sample gradients ---------------------------------------------------------------
    def _sample_loss(self, dims: Any) -> Callable[..., Any]:
        spec, adapter = self.problem.spec, self.adapter

        def loss(leaves: Any, args: Any) -> Any:
            # Inside vmap the batch axis is gone; give the model a batch of one.
            one = tree_map(lambda a, d: a[None] if d == 0 else a, args, dims)
            return adapter.loss(_pytree.unflatten(spec, list(leaves)), *one)

        return loss

    def _per_sample_torch(self, args: tuple[Any, ...]) -> Any:
        import torch

        from ..backends._torch import autodiff_context

        n = _rows(args)
        dims = batch_axes(args, n)
        grad = torch.func.grad(self._sample_loss(dims))
        randomness = "different" if getattr(self.adapter, "seed", None) is not None else "error"
        with autodiff_context():
            G = torch.func.vmap(
                grad, in_dims=(None, dims), chunk_size=self.chunk_size, randomness=randomness
            )(tuple(self.problem.leaves), args)
        return torch.cat([g.reshape(n, -1) for g in G], dim=1)

    def _per_sample_jax(self, leaves: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        import jax
        import jax.numpy as jnp

        n = _rows(args)
        dims = batch_axes(args, n)
        G = jax.vmap(jax.grad(self._sample_loss(dims)), in_axes=(None, dims))(leaves, args)
        return jnp.concatenate([g.reshape(n, -1) for g in G], axis=1)

    def _per_sample(self, args: tuple[Any, ...]) -> Any:
        if self.backend == "torch":
            return self._per_sample_torch(args)
        leaves = tuple(self.problem.leaves)
        step = self.chunk_size
        n = _rows(args)
        if step is None or step >= n:
            return self._grads_jax(leaves, args)
        dims = batch_axes(args, n)

        def rows(j: int) -> Any:
            return tree_map(lambda a, d: a[j : j + step] if d == 0 else a, args, dims)

        parts = [self._grads_jax(leaves, rows(j)) for j in range(0, n, step)]
        return self.xp.concat(parts, axis=0)

    def per_sample_gradients(self, x: Any, y: Any) -> Any:
        """The ``(n, d)`` gradients of the samples of one batch, one per row, flat layout."""
        from ._data import converter

        return self._per_sample(converter(self._bk, self.dtype, self.device)((x, y)))

    # --- products ---------------------------------------------------------------------------
    def _gram(self, args: tuple[Any, ...], V: Any) -> Any:
        if self.cache:
            if self._G is None:
                self._G = self._per_sample(args)
            G = self._G
        else:
            G = self._per_sample(args)
        out = self.xp.permute_dims(G, (1, 0)) @ (G @ V)
        return out / G.shape[0] if self.problem.reduction == "mean" else out

    def _batch_mv(self, args: tuple[Any, ...], v: Any) -> Any:
        return self._gram(args, v)

    def _batch_mm(self, args: tuple[Any, ...], V: Any) -> Any:
        return self._gram(args, V)

    # LinearOperator's column chunking is pointless here: G is computed once per batch.
    def _matmat(self, V: Any) -> Any:
        return self._reduce(lambda args: self._batch_mm(args, V))


def _rows(args: tuple[Any, ...]) -> int:
    x = args[0]
    for leaf in _leaves(args):
        if len(getattr(leaf, "shape", ())) >= 1:
            return int(leaf.shape[0])
    raise ValueError(
        f"cannot split the batch into samples: no array of the batch (x: {type(x).__name__}) "
        "has a leading dimension"
    )


def _leaves(tree: Any) -> list[Any]:
    out: list[Any] = []
    tree_map(lambda a: out.append(a), tree)
    return out


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
    reduction: str = "mean",
    cache: bool | None = None,
    chunk_size: int | None = None,
    allow_randomness: str | None = None,
    seed: int = 0,
) -> FisherOperator:
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` of ``loss_fn(model(x), y)``.

    ``g_i`` is the gradient of sample ``i``'s loss (``loss_fn`` on a batch of one), from
    ``vmap`` of the gradient; ``N`` the number of samples over the whole ``data``.
    ``reduction="sum"`` drops the ``1/N``. Positive semi-definite, of rank at most ``N``.
    Samples are the rows of the arrays of ``x`` and ``y`` whose leading dimension is the
    batch size (other arrays are passed whole to every sample).

    Arguments are those of :func:`hessop.model_hessian`; ``cache`` keeps the per-sample
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
    from ._api import is_torch_module

    if is_torch_module(model):
        from ._torch_module import batchnorm_modules

        found = batchnorm_modules(model)
        if found:
            raise ValueError(
                "the empirical Fisher needs per-sample losses, but BatchNorm in training mode "
                "couples the samples of a batch: " + "; ".join(found) + ". Call model.eval() "
                "(or use hessop.model_ggn / model_hessian, which are defined on whole batches)"
            )
    adapter, H = prepare(
        model,
        loss_fn,
        data,
        params=params,
        backend=backend,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        reduction=reduction,
        cache=False,
        allow_randomness=allow_randomness,
        seed=seed,
        own_norms="reverse-over-reverse",  # batched backward passes (is_grads_batched)
    )
    return FisherOperator(adapter, H, cache=cache, chunk_size=chunk_size)

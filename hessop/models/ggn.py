"""The generalized Gauss-Newton matrix ``G = J^T H_loss J`` of a model's loss.

``J`` is the Jacobian of the model's output (the whole batch's output, flattened) with
respect to the parameters and ``H_loss`` the Hessian of ``loss_fn(output, y)`` with respect to
the output. ``G`` drops the term of the Hessian that carries the model's second derivatives,
so it is positive semi-definite whenever the loss is convex in the output (cross-entropy,
squared error, ...), and equals the Hessian for a model that is linear in its parameters.
Nothing here is specific to a loss: ``H_loss`` is applied by automatic differentiation.

Products
--------
* torch: reverse mode only. The output and ``J^T u`` (a function of a dummy ``u``, with its
  graph) are built once per batch; then ``J v`` is the backward pass of ``J^T u`` with
  respect to ``u`` (the "double-vjp" trick), ``H_loss`` the double backward of the loss and
  ``J^T`` a backward pass of the output. With the cache (one batch) the graphs are kept and
  each product is three backward passes; ``matmat`` batches them
  (``is_grads_batched``).
* JAX: ``jax.linearize`` of the output, its transpose, and ``jax.jvp`` of the loss
  gradient, in one jitted function; ``matmat`` is that function ``vmap``-ed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _checks
from .._streamed import CurvatureOperator
from ..backends._base import KernelOptions
from ._api import prepare, share_key


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton matrix of a model's loss (see :func:`model_ggn`)."""


def model_ggn(
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
) -> GGNOperator:
    """The generalized Gauss-Newton matrix ``J^T H_loss J`` of ``loss_fn(model(x), y)``.

    ``J`` is the Jacobian of the model's output with respect to the (selected) parameters,
    ``H_loss`` the Hessian of ``loss_fn`` with respect to the output. Positive
    semi-definite for a loss convex in the output (cross-entropy, MSE): the usual
    curvature for Gauss-Newton and K-FAC-style methods, and for CG on a damped system.
    For cross-entropy it equals the (true) Fisher information of the model's predictive
    distribution.

    Arguments are those of :func:`hessop.model_hessian` (``model``, ``loss_fn``, ``data``
    with its single-batch / dataset rule, ``params``, ``backend``, ``dtype``, ``device``,
    ``batch_size``, ``reduction``, ``allow_randomness``, ``seed``, ``distributed``). Over a
    dataset the batches are weighted by size like the Hessian: ``sum_b n_b G_b / N`` for
    ``reduction="mean"``. ``cache`` keeps the per-batch graphs between products (default:
    on for one batch); ``chunk_size`` bounds the columns per batched ``matmat``. The model
    must return one tensor / array.

    Returns
    -------
    GGNOperator
        A symmetric :class:`hessop.LinearOperator` with ``matvec``, ``matmat``, ``@``,
        ``to_dense``, ``to_scipy``, ``ravel``/``unravel``, ``params`` and
        ``loss_and_gradient()``.

    Examples
    --------
    >>> import torch, hessop
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> model = model.double()
    >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    >>> G = hessop.model_ggn(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> G.shape
    (26, 26)
    >>> bool(torch.linalg.eigvalsh(G.to_dense()).min() > -1e-12)   # PSD
    True

    For a model linear in its parameters the GGN is the Hessian:

    >>> lin = torch.nn.Linear(3, 2).double()
    >>> G = hessop.model_ggn(lin, torch.nn.CrossEntropyLoss(), (x, y))
    >>> H = hessop.model_hessian(lin, torch.nn.CrossEntropyLoss(), (x, y))
    >>> torch.allclose(G.to_dense(), H.to_dense())
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
    cache = not p.batches.streamed if cache is None else _checks.flag(cache, "cache")
    chunk_size = _checks.optional_integer(chunk_size, "chunk_size", minimum=1)
    options = KernelOptions(
        p.device, cache=cache, chunk_size=chunk_size, share_key=share_key(p, "ggn")
    )
    kernel = p.backend.ggn_kernel(p.model, p.loss, options)
    return GGNOperator(
        p.leaves,
        p.loss.spec,
        p.batches,
        kernel,
        backend=p.backend,
        device=p.device,
        watch=p.watch,
        loss=p.loss,
        cache=cache,
        chunk_size=chunk_size,
    )

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

from .. import _pytree
from ._api import prepare
from ._curvature import CurvatureOperator, join_columns, split_columns


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton matrix of a model's loss (see :func:`model_ggn`)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self._graph: Any = None
        if self.backend == "jax":
            self._build_jax()

    # --- torch ----------------------------------------------------------------------------
    def _torch_graph(self, args: tuple[Any, ...]) -> Any:
        import torch

        x, y = args
        leaves = [t.detach().requires_grad_(True) for t in self.problem.leaves]
        out = self.adapter.output(_pytree.unflatten(self.problem.spec, leaves), x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"model_ggn needs the model to return one tensor, got {type(out).__name__}; "
                "wrap the model so that it returns the tensor that loss_fn takes"
            )
        live: list[int] = []
        jtu: Any = ()
        u = None
        if out.requires_grad:
            # J^T u as a function of u: its derivative with respect to u, applied to v, is J v.
            u = torch.zeros_like(out, requires_grad=True)
            grads = torch.autograd.grad(out, leaves, u, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            jtu = [grads[i] for i in live]
        o = out.detach().requires_grad_(True)
        with self.adapter.rng():
            loss = self.adapter.loss_fn(o, y)
        if tuple(getattr(loss, "shape", ())) != ():
            from .._errors import LossError

            raise LossError(
                f"loss_fn must return a scalar, got shape {tuple(loss.shape)}; reduce it"
            )
        gl = torch.autograd.grad(loss, o, create_graph=True)[0]
        return leaves, out, u, jtu, live, o, gl

    def _torch_product(self, args: tuple[Any, ...], V: Any, batched: bool) -> Any:
        import torch

        from ..backends._torch import autodiff_context

        xp, spec = self.xp, self.problem.spec
        vs = split_columns(xp, spec, V) if batched else _pytree.unravel(xp, spec, V)
        with autodiff_context():
            keep = self.cache
            if keep:
                if self._graph is None:
                    self._graph = self._torch_graph(args)
                graph = self._graph
            else:
                graph = self._torch_graph(args)
            leaves, out, u, jtu, live, o, gl = graph
            if not live or not gl.requires_grad:  # the output or the loss is linear
                return torch.zeros_like(V)
            Jv = torch.autograd.grad(
                jtu, u, [vs[i] for i in live], retain_graph=True, is_grads_batched=batched
            )[0]
            HJv = torch.autograd.grad(gl, o, Jv, retain_graph=keep, is_grads_batched=batched)[0]
            res = torch.autograd.grad(
                out,
                leaves,
                HJv,
                retain_graph=keep,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=batched,
            )
        if batched:
            return join_columns(xp, list(res))
        return torch.cat([r.reshape(-1) for r in res])

    # --- JAX ------------------------------------------------------------------------------
    def _build_jax(self) -> None:
        import jax

        spec, adapter = self.problem.spec, self.adapter
        xp = self.xp

        def mv(w: Any, v: Any, args: tuple[Any, ...]) -> Any:
            x, y = args

            def output(w: Any) -> Any:
                return adapter.output(_pytree.unflatten(spec, _pytree.unravel(xp, spec, w)), x)

            out, lin = jax.linearize(output, w)
            grad_loss = jax.grad(lambda o: adapter.loss_fn(o, y))
            HJv = jax.jvp(grad_loss, (out,), (lin(v),))[1]
            return jax.linear_transpose(lin, w)(HJv)[0]

        self._w = _pytree.ravel(xp, spec, self.problem.leaves)
        self._mv = jax.jit(mv)
        self._mm = jax.jit(jax.vmap(mv, in_axes=(None, 1, None), out_axes=1))

    # --- per-batch products ---------------------------------------------------------------
    def _batch_mv(self, args: tuple[Any, ...], v: Any) -> Any:
        if self.backend == "jax":
            return self._mv(self._w, v, args)
        return self._torch_product(args, v, batched=False)

    def _batch_mm(self, args: tuple[Any, ...], V: Any) -> Any:
        if self.backend == "jax":
            return self._mm(self._w, V, args)
        return self._torch_product(args, V, batched=True)


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
    reduction: str = "mean",
    cache: bool | None = None,
    chunk_size: int | None = None,
    allow_randomness: str | None = None,
    seed: int = 0,
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
    ``batch_size``, ``reduction``, ``allow_randomness``, ``seed``). Over a dataset the
    batches are weighted by size like the Hessian: ``sum_b n_b G_b / N`` for
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
    return GGNOperator(adapter, H, cache=cache, chunk_size=chunk_size)

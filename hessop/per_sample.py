"""Per-sample Hessians and gradients through vmap, and Jacobians that pick their AD mode.

Conventions shared by :func:`per_sample_hessians` and :func:`per_sample_gradients`:

* ``f`` is written for **one** sample: it sees ``x[i]`` (shape ``x.shape[1:]``) and the
  ``i``-th slice of every *mapped* argument, and returns a scalar.
* **Which ``*args`` are mapped.** With ``in_axes=None`` (the default) every array in
  ``*args`` (also inside dicts, lists and tuples) whose leading dimension equals the batch
  size ``B = x.shape[0]`` is mapped over that dimension, and everything else (0-d arrays,
  arrays of another leading size, non-arrays) is passed to every sample unchanged. When a
  shared array happens to have a leading dimension ``B``, say so explicitly with
  ``in_axes``: one entry per argument, ``0`` (map the leading axis of all its arrays) or
  ``None`` (broadcast), as in ``jax.vmap`` and ``torch.func.vmap``.
* ``chunk_size`` processes the batch ``chunk_size`` samples at a time (torch: one call per
  chunk; JAX: ``jax.lax.map`` over chunks, also under ``jax.jit``), so memory is bounded by
  one chunk instead of the whole batch. The results do not depend on it (up to rounding).
* **Gradients through the results.** As with ``torch.func``: in torch the results keep a
  graph to the inputs and to tensors ``f`` closes over that require grad, when grad mode
  is on; call under ``torch.no_grad()`` (or pass detached tensors) to skip it. In JAX the
  functions are pure and traceable: ``jax.grad``, ``jax.jit`` and ``jax.vmap`` apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from . import _checks, _pytree
from ._errors import ForwardModeUnsupportedError, ShapeError, unknown
from ._inputs import native, native_args
from ._loss import check_scalar
from ._pytree import collect_arrays, map_arrays
from .backends import resolve_backend

__all__ = ["per_sample_hessians", "per_sample_gradients", "jacobian", "JACOBIAN_MODES"]

#: the modes of :func:`jacobian`
JACOBIAN_MODES = ("auto", "forward", "reverse")


# --- argument batching --------------------------------------------------------------------
def _split_args(
    args: tuple[Any, ...], in_axes: Sequence[int | None] | None, size: int
) -> tuple[list[Any], list[int | None]]:
    """The array leaves of ``args`` and, for each, 0 (mapped) or None (broadcast)."""
    leaves = collect_arrays(args)
    if in_axes is None:
        axes = [0 if len(x.shape) >= 1 and int(x.shape[0]) == size else None for x in leaves]
        return leaves, axes
    if not isinstance(in_axes, (list, tuple)) or len(in_axes) != len(args):
        raise ShapeError(
            f"in_axes must have one entry (0 or None) per extra argument: {len(args)} "
            f"argument(s), got in_axes={in_axes!r}"
        )
    axes = []
    for j, (arg, ax) in enumerate(zip(args, in_axes)):
        if ax not in (0, None):
            raise ValueError(f"in_axes[{j}] must be 0 (map) or None (broadcast), got {ax!r}")
        sub = collect_arrays(arg)
        if ax == 0 and not sub:
            raise ShapeError(
                f"argument {j} is mapped (in_axes[{j}]=0) but holds no array; use in_axes[{j}]=None"
            )
        for x in sub:
            if ax == 0 and (len(x.shape) == 0 or int(x.shape[0]) != size):
                raise ShapeError(
                    f"argument {j} is mapped (in_axes[{j}]=0) but has an array of shape "
                    f"{tuple(x.shape)}, whose leading dimension is not the batch size {size}"
                )
            axes.append(ax)
    return leaves, axes


def _per_sample_call(
    f: Callable[..., Any], args: tuple[Any, ...], leaves: list[Any], axes: list[int | None]
) -> Callable[..., Any]:
    """``call(*head, *mapped_leaves) -> f(*head, *args with the mapped leaves replaced)``."""
    n_mapped = sum(a == 0 for a in axes)

    def call(*inputs: Any) -> Any:
        head, mapped = inputs[: len(inputs) - n_mapped], iter(inputs[len(inputs) - n_mapped :])
        new = iter([next(mapped) if a == 0 else x for x, a in zip(leaves, axes)])
        return f(*head, *map_arrays(lambda _: next(new), args))

    return call


def _batch_size(x: Any, what: str = "x") -> int:
    if len(x.shape) < 1:
        raise ShapeError(
            f"{what} must be a batch with a leading sample dimension, got a 0-d array; "
            f"use {what}[None] for a batch of one"
        )
    size = int(x.shape[0])
    if size == 0:
        raise ShapeError(f"{what} is an empty batch (leading dimension 0)")
    return size


def _check_chunk(chunk_size: int | None) -> int | None:
    return _checks.optional_integer(chunk_size, "chunk_size", minimum=1)


# --- per-sample Hessians -------------------------------------------------------------------
def per_sample_hessians(
    f: Callable[..., Any],
    x: Any,
    *args: Any,
    backend: str | None = None,
    in_axes: Sequence[int | None] | None = None,
    chunk_size: int | None = None,
) -> Any:
    """The Hessian of ``f(x[i], *args_i)`` with respect to ``x[i]``, for every sample ``i``.

    Returns shape ``(B, *s, *s)`` for ``x`` of shape ``(B, *s)``: ``(B, n, n)`` for a batch
    of vectors, never the ``(B, n, B, n)`` of a Hessian of the whole batch.

    All ``B`` Hessians come from one batched computation, ``n`` Hessian-vector products
    of the whole batch, the strategy chosen per framework by measurement (B=500, n=200,
    3-layer MLP, CPU; ``benchmarks/per_sample.py``):

    * torch: the summed-gradient trick. Samples are independent, so the gradient
      ``g(X) = grad_X sum_i f(x_i)`` holds each sample's gradient in its own row, and one
      reverse-mode product of ``g`` with the cotangent ``e_k`` in every row gives row ``k``
      of every ``H_i``; the ``n`` rows are one ``vmap``. Every torch operation with a
      double-backward derivative works (no forward mode needed), and it is 5-10 times
      faster than ``torch.func.vmap(torch.func.hessian(f))``, whose nested batching
      rules handle this case poorly.
    * JAX: ``jax.vmap(jax.hessian(f))``, which XLA (and even eager JAX) runs faster than
      the trick.

    Parameters
    ----------
    f : callable
        ``f(x_i, *args_i) -> scalar`` for **one** sample ``x_i`` of shape ``x.shape[1:]``.
    x : array
        The batch, shape ``(B, *s)``, floating point (torch, JAX, or numpy with
        ``backend=``).
    *args :
        Extra arguments of ``f``; see the module docstring for which are mapped over the
        batch (by default: arrays whose leading dimension is ``B``).
    backend : {"torch", "jax"}, optional
        Inferred from the arrays when omitted (numpy alone needs it).
    in_axes : sequence of {0, None}, optional
        One entry per extra argument: ``0`` maps it over its leading axis, ``None``
        broadcasts it. Default: the leading-dimension rule above.
    chunk_size : int, optional
        Samples per batched call (bounds memory); default the whole batch at once. On a
        CPU, chunks of about ``10_000 // n`` samples also run faster (the batched
        products stay cache-sized): 25-40% at B=500, n=200.

    Returns
    -------
    array of shape ``(B, *s, *s)``, in ``x``'s framework, dtype and device.

    Examples
    --------
    >>> import torch, hessop
    >>> W = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    >>> f = lambda x, y: ((W @ x - y) ** 2).sum() / 2      # one sample: H_i = W^T W
    >>> x, y = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    >>> H = hessop.per_sample_hessians(f, x, y)            # y is mapped: leading dim 3
    >>> H.shape
    torch.Size([3, 2, 2])
    >>> H[0]
    tensor([[1.2500, 1.5000],
            [1.5000, 5.0000]], dtype=torch.float64)
    """
    bk = resolve_backend(backend, x, args)
    tr = bk.transforms
    x = native(bk, x, "x")
    size = _batch_size(x)
    shape = tuple(int(s) for s in x.shape[1:])
    m = math.prod(shape)
    args = native_args(bk, args, x)
    leaves, axes = _split_args(args, in_axes, size)
    chunk = _check_chunk(chunk_size)
    call = _per_sample_call(f, args, leaves, axes)
    n_mapped = sum(a == 0 for a in axes)
    xp = bk.xp

    def one(xi: Any, *mapped_i: Any) -> Any:
        return check_scalar(
            call(xp.reshape(xi, shape), *mapped_i),
            f"f (called on one sample x[i] of shape {shape}; for a vector-valued f use "
            "hessop.jacobian)",
            bk,
        )

    in_axes_ = (0,) * (1 + n_mapped)

    def summed_gradient_trick(X: Any, *M: Any) -> Any:
        batched = tr.vmap(one, in_axes=in_axes_)
        g = tr.grad(lambda Z: xp.sum(batched(Z, *M)))
        # Cotangent k is e_k in every row; rows never mix, so its pullback is row k of
        # every sample's Hessian.
        C = xp.broadcast_to(tr.eye(m, X)[:, None, :], (m, X.shape[0], m))
        rows = tr.vmap(tr.vjp(g, X)[1], in_axes=0)(C)
        return xp.permute_dims(rows, (1, 0, 2))

    def vmap_hessian(X: Any, *M: Any) -> Any:
        return tr.vmap(tr.jacfwd(tr.jacrev(one)), in_axes=in_axes_)(X, *M)

    kernel = summed_gradient_trick if tr.per_sample_hessian == "summed-gradient" else vmap_hessian
    mapped = [xp.reshape(x, (size, m))] + [x_ for x_, a in zip(leaves, axes) if a == 0]
    with tr.context():
        H = tr.chunked(kernel, mapped, size, chunk)
    return xp.reshape(H, (size, *shape, *shape))


# --- per-sample gradients ------------------------------------------------------------------
def per_sample_gradients(
    f: Callable[..., Any],
    params: Any,
    x: Any,
    *args: Any,
    backend: str | None = None,
    in_axes: Sequence[int | None] | None = None,
    chunk_size: int | None = None,
    flat: bool = True,
) -> Any:
    """The gradient of ``f(params, x[i], *args_i)`` with respect to ``params``, per sample.

    Parameters
    ----------
    f : callable
        ``f(params, x_i, *args_i) -> scalar`` for **one** sample ``x_i``.
    params :
        An array or a pytree (dict / list / tuple) of arrays; shared by all samples. In
        torch, pass detached tensors (``{k: p.detach() for k, p in
        model.named_parameters()}``) unless you want to differentiate the result.
    x : array
        The batch, shape ``(B, ...)``; any dtype (integer token ids are fine: ``x`` is not
        differentiated).
    *args, backend, in_axes, chunk_size :
        As in :func:`per_sample_hessians` (and the module docstring).
    flat : bool
        ``True`` (default): one ``(B, d)`` array, row ``i`` the gradient of sample ``i`` in
        hessop's flat layout, the layout of :meth:`HessianOperator.ravel` (depth-first,
        dict entries in insertion order, row-major leaves). ``False``: a pytree shaped like
        ``params`` whose leaves have a leading dimension ``B``.

    Examples
    --------
    >>> import torch, hessop
    >>> f = lambda p, x, y: (p["w"] @ x + p["b"] - y) ** 2
    >>> p = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
    >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 2.0])
    >>> hessop.per_sample_gradients(f, p, x, y)       # [2 r x, 2 r] with r = w.x + b - y
    tensor([[1., 0., 1.],
            [0., 1., 1.]])
    """
    flat = _checks.flag(flat, "flat")
    p_leaves, spec = _pytree.flatten(params)
    bk = resolve_backend(backend, p_leaves, x, args)
    tr = bk.transforms
    p_leaves = [native(bk, p, f"parameter leaf {i}") for i, p in enumerate(p_leaves)]
    # numpy floating data takes the parameters' dtype, as the extra arguments do
    x = native(bk, x, "x", floating=False, like=p_leaves[0])
    size = _batch_size(x)
    args = native_args(bk, args, p_leaves[0])
    leaves, axes = _split_args(args, in_axes, size)
    chunk = _check_chunk(chunk_size)
    call = _per_sample_call(f, args, leaves, axes)
    n_mapped = sum(a == 0 for a in axes)
    xp = tr.xp

    def one(p: list[Any], xi: Any, *mapped_i: Any) -> Any:
        out = call(_pytree.unflatten(spec, list(p)), xi, *mapped_i)
        return check_scalar(out, "f (called on one sample x[i])", bk)

    def kernel(X: Any, *M: Any) -> Any:
        grads = tr.vmap(tr.grad(one), in_axes=(None, 0) + (0,) * n_mapped)(p_leaves, X, *M)
        return list(grads)

    mapped = [x] + [x_ for x_, a in zip(leaves, axes) if a == 0]
    with tr.context():
        grads = tr.chunked(kernel, mapped, size, chunk)
    if flat:
        return xp.concat([xp.reshape(g, (size, -1)) for g in grads], axis=1)
    return _pytree.unflatten(spec, list(grads))


# --- Jacobians -----------------------------------------------------------------------------
def jacobian(
    f: Callable[..., Any],
    x: Any,
    *args: Any,
    backend: str | None = None,
    mode: str = "auto",
) -> Any:
    """The Jacobian of ``f(x, *args)`` with respect to ``x``, shape ``(*out, *x.shape)``.

    Parameters
    ----------
    f : callable
        ``f(x, *args) -> array`` (any shape; a scalar gives the gradient).
    x : array
        The point, floating point (torch, JAX, or numpy with ``backend=``).
    *args :
        Extra arguments of ``f``, not differentiated.
    backend : {"torch", "jax"}, optional
        Inferred from the arrays when omitted.
    mode : {"auto", "forward", "reverse"}
        ``"forward"`` builds the Jacobian one input direction at a time (``jacfwd``: one
        JVP per input), ``"reverse"`` one output at a time (``jacrev``: one VJP per
        output), each batched with vmap. ``"auto"`` (default) counts both sides and uses
        forward mode when ``x.size <= f(x).size`` (a square or tall Jacobian: no more
        JVPs than VJPs, and a JVP is the cheaper of the two), reverse mode otherwise (a
        wide Jacobian, e.g. few outputs of many inputs). In JAX the output size is read
        without computing (``jax.eval_shape``); torch evaluates ``f`` once to know it,
        and falls back to reverse mode when an operation has no forward-mode derivative.

    Examples
    --------
    >>> import torch, hessop
    >>> f = lambda x: torch.stack([x[0] * x[1], x[0] + 2 * x[1], x[1] ** 2])
    >>> hessop.jacobian(f, torch.tensor([1.0, 3.0]))    # tall (3 x 2): forward mode
    tensor([[3., 1.],
            [1., 2.],
            [0., 6.]])
    """
    if mode not in JACOBIAN_MODES:
        raise unknown("mode", mode, JACOBIAN_MODES)
    bk = resolve_backend(backend, x, args)
    tr = bk.transforms
    x = native(bk, x, "x")
    args = native_args(bk, args, x)

    def fn(z: Any) -> Any:
        out = f(z, *args)
        if not (hasattr(out, "shape") and hasattr(out, "dtype")):
            raise TypeError(
                f"f must return one array, got {type(out).__name__}; stack the outputs "
                "into one array (or call jacobian once per output)"
            )
        bk.check_floating(out.dtype, "the output of f")
        return out

    with tr.context():
        if mode == "auto":
            out_size = math.prod(tr.output_shape(fn, x))
            mode = "forward" if math.prod(x.shape) <= out_size else "reverse"
            if mode == "forward":
                try:
                    return tr.jacfwd(fn)(x)
                except (RuntimeError, NotImplementedError) as err:
                    if not isinstance(
                        tr.translate_error(err, "forward-over-reverse"),
                        ForwardModeUnsupportedError,
                    ):
                        raise
                    mode = "reverse"
        if mode == "forward":
            try:
                return tr.jacfwd(fn)(x)
            except (RuntimeError, NotImplementedError) as err:
                if isinstance(
                    tr.translate_error(err, "forward-over-reverse"), ForwardModeUnsupportedError
                ):
                    raise ForwardModeUnsupportedError(
                        "mode='forward' needs forward-mode AD, which an operation in f does "
                        f"not support ({str(err).strip().splitlines()[0]}); use "
                        "mode='reverse' (or mode='auto', which falls back to it)"
                    ) from err
                raise
        return tr.jacrev(fn)(x)

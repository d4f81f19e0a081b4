"""Per-sample gradients, Hessians and Jacobians of a batch, each by one batched computation.

Conventions shared by :func:`per_sample_hessians`, :func:`per_sample_gradients` and
:func:`per_sample_jacobians`:

* ``f`` is written for **one** sample: it sees ``x[i]`` (shape ``x.shape[1:]``) and the
  ``i``-th slice of every *mapped* argument.
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
* **Randomness.** A function that draws random numbers (dropout in training mode) is
  refused with :class:`~hessop.RandomnessError`: every sample would be differentiated
  through different draws, and vmap cannot batch them. ``allow_randomness="fixed-seed"``
  evaluates it instead with the global generators seeded with ``seed`` (and restored
  afterwards) and every sample seeing the **same** draws (``torch.func.vmap``'s
  ``randomness="same"``): sample ``i``'s result is that of ``f`` evaluated alone on sample
  ``i`` right after ``torch.manual_seed(seed)``, whatever the ``chunk_size``. numpy's and
  Python's generators are seeded alike; JAX has no global generator of its own (its keys
  are arguments).
* **Gradients through the results.** As with ``torch.func``: in torch the results keep a
  graph to the inputs and to tensors ``f`` closes over that require grad, when grad mode
  is on; call under ``torch.no_grad()`` (or pass detached tensors) to skip it. In JAX the
  functions are pure and traceable: ``jax.grad``, ``jax.jit`` and ``jax.vmap`` apply.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import _checks, _pytree, _rng
from ._errors import RandomnessError, ShapeError, unknown
from ._inputs import native, native_args
from ._loss import RANDOMNESS_OPTIONS, check_scalar
from ._pytree import collect_arrays, map_arrays
from .backends import Backend, resolve_backend
from .jacobians import JACOBIAN_MODES, forward_or_reverse, output_array

__all__ = ["per_sample_hessians", "per_sample_gradients", "per_sample_jacobians"]


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


# --- randomness -----------------------------------------------------------------------------
class _Randomness:
    """``allow_randomness`` of the per-sample functions: every evaluation of ``f`` (one per
    chunk) runs in :meth:`scope`, which either refuses random draws or seeds them."""

    def __init__(self, bk: Backend, allow_randomness: str | None, seed: int, like: Any) -> None:
        if allow_randomness not in RANDOMNESS_OPTIONS:
            raise unknown("allow_randomness option", allow_randomness, ["fixed-seed"])
        self.bk, self.device = bk, None if bk.is_tracer(like) else bk.device_of(like)
        self.seed = None if allow_randomness is None else _checks.integer(seed, "seed")
        #: the ``randomness`` of every vmap over samples (or rows, or tangents)
        self.vmap = "error" if self.seed is None else "same"

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        if self.seed is not None:
            with _rng.preserve(self.bk, self.device, self.seed):
                yield
            return
        try:
            with _rng.refuse_draws(
                self.bk, lambda which: RandomnessError(_message(f"from {which} global generator"))
            ):
                yield
        except (RuntimeError, NotImplementedError) as err:
            translated = self.bk.transforms.translate_error(err, "reverse-over-reverse")
            if isinstance(translated, RandomnessError):
                raise RandomnessError(_message("a random operation under vmap")) from err
            raise

    def wrap(self, kernel: Callable[..., Any]) -> Callable[..., Any]:
        """``kernel`` (one chunk's computation) evaluated in :meth:`scope`."""

        def scoped(*arrays: Any) -> Any:
            with self.scope():
                return kernel(*arrays)

        return scoped


def _message(what: str) -> str:
    return (
        f"f draws random numbers ({what}: dropout in training mode, torch.randn, "
        "np.random, ...). Each sample would be differentiated through other draws, so the "
        "results would not be the derivatives of one function. Fix: make f deterministic "
        "(model.eval()), or pass allow_randomness='fixed-seed': every sample then sees the "
        "same draws (the same dropout mask) from a fixed local seed (seed=...), and the "
        "global generators are left as they were."
    )


def _prepare(
    bk: Backend,
    f: Callable[..., Any],
    x: Any,
    args: tuple[Any, ...],
    in_axes: Sequence[int | None] | None,
    chunk_size: int | None,
    like: Any,
) -> tuple[int, Callable[..., Any], list[Any], int | None]:
    """``(B, call, mapped arrays of args, chunk)`` for a batch ``x`` (see _per_sample_call)."""
    size = _batch_size(x)
    args = native_args(bk, args, like)
    leaves, axes = _split_args(args, in_axes, size)
    chunk = _checks.optional_integer(chunk_size, "chunk_size", minimum=1)
    mapped = [a for a, ax in zip(leaves, axes) if ax == 0]
    return size, _per_sample_call(f, args, leaves, axes), mapped, chunk


# --- per-sample Hessians -------------------------------------------------------------------
def per_sample_hessians(
    f: Callable[..., Any],
    x: Any,
    *args: Any,
    backend: str | None = None,
    in_axes: Sequence[int | None] | None = None,
    chunk_size: int | None = None,
    allow_randomness: str | None = None,
    seed: int = 0,
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
    allow_randomness : {None, "fixed-seed"}
        None (default) refuses an ``f`` that draws random numbers
        (:class:`~hessop.RandomnessError`); ``"fixed-seed"`` gives every sample the same
        draws from ``seed`` (see the module docstring).
    seed : int
        The seed of ``allow_randomness="fixed-seed"``.

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
    tr, xp = bk.transforms, bk.xp
    x = native(bk, x, "x")
    size, call, mapped, chunk = _prepare(bk, f, x, args, in_axes, chunk_size, x)
    rand = _Randomness(bk, allow_randomness, seed, x)
    shape = tuple(int(s) for s in x.shape[1:])
    m = math.prod(shape)

    def one(xi: Any, *mapped_i: Any) -> Any:
        return check_scalar(
            call(xp.reshape(xi, shape), *mapped_i),
            f"f (called on one sample x[i] of shape {shape}; for a vector-valued f use "
            "hessop.per_sample_jacobians)",
            bk,
        )

    in_axes_ = (0,) * (1 + len(mapped))

    def summed_gradient_trick(X: Any, *M: Any) -> Any:
        batched = tr.vmap(one, in_axes=in_axes_, randomness=rand.vmap)
        g = tr.grad(lambda Z: xp.sum(batched(Z, *M)))
        # Cotangent k is e_k in every row; rows never mix, so its pullback is row k of
        # every sample's Hessian.
        C = xp.broadcast_to(tr.eye(m, X)[:, None, :], (m, X.shape[0], m))
        rows = tr.vmap(tr.vjp(g, X)[1], in_axes=0, randomness=rand.vmap)(C)
        return xp.permute_dims(rows, (1, 0, 2))

    def vmap_hessian(X: Any, *M: Any) -> Any:
        hess = tr.jacfwd(tr.jacrev(one), randomness=rand.vmap)
        return tr.vmap(hess, in_axes=in_axes_, randomness=rand.vmap)(X, *M)

    kernel = summed_gradient_trick if tr.per_sample_hessian == "summed-gradient" else vmap_hessian
    with tr.context():
        H = tr.chunked(rand.wrap(kernel), [xp.reshape(x, (size, m)), *mapped], size, chunk)
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
    allow_randomness: str | None = None,
    seed: int = 0,
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
    *args, backend, in_axes, chunk_size, allow_randomness, seed :
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
    tr, xp = bk.transforms, bk.xp
    p_leaves = [native(bk, p, f"parameter leaf {i}") for i, p in enumerate(p_leaves)]
    # numpy floating data takes the parameters' dtype, as the extra arguments do
    x = native(bk, x, "x", floating=False, like=p_leaves[0])
    size, call, mapped, chunk = _prepare(bk, f, x, args, in_axes, chunk_size, p_leaves[0])
    rand = _Randomness(bk, allow_randomness, seed, p_leaves[0])

    def one(p: list[Any], xi: Any, *mapped_i: Any) -> Any:
        out = call(_pytree.unflatten(spec, list(p)), xi, *mapped_i)
        return check_scalar(out, "f (called on one sample x[i])", bk)

    def kernel(X: Any, *M: Any) -> Any:
        axes = (None, 0) + (0,) * len(M)
        return list(tr.vmap(tr.grad(one), in_axes=axes, randomness=rand.vmap)(p_leaves, X, *M))

    with tr.context():
        grads = tr.chunked(rand.wrap(kernel), [x, *mapped], size, chunk)
    if flat:
        return xp.concat([xp.reshape(g, (size, -1)) for g in grads], axis=1)
    return _pytree.unflatten(spec, list(grads))


# --- per-sample Jacobians ------------------------------------------------------------------
def per_sample_jacobians(
    f: Callable[..., Any],
    x: Any,
    *args: Any,
    backend: str | None = None,
    in_axes: Sequence[int | None] | None = None,
    chunk_size: int | None = None,
    mode: str = "auto",
    allow_randomness: str | None = None,
    seed: int = 0,
) -> Any:
    """The Jacobian of ``f(x[i], *args_i)`` with respect to ``x[i]``, for every sample ``i``.

    Returns shape ``(B, *o, *s)`` for ``x`` of shape ``(B, *s)`` and an output of shape
    ``o`` per sample: ``(B, m, n)`` for vectors, never the ``(B, m, B, n)`` Jacobian of the
    whole batch (whose off-diagonal blocks are zero).

    All ``B`` Jacobians come from one batched computation. Forward mode takes one JVP per
    input coordinate, reverse mode one VJP per output coordinate; ``mode="auto"`` picks
    forward mode when ``n <= m``, as :func:`hessop.jacobian` does. How each mode is batched
    was chosen per framework by measurement (B=256, 3-layer MLP, CPU;
    ``benchmarks/per_sample.py``):

    * torch, forward mode: the summed-output trick. Samples are independent, so one JVP of
      the whole batch with the tangent ``e_j`` in every row gives column ``j`` of every
      sample's Jacobian; the ``n`` columns are one ``vmap``. ``torch.func.vmap(jacfwd(f))``
      was 7-30 times slower. Reverse mode: ``torch.func.vmap(jacrev(f))``, as fast as the
      summed trick with cotangents ``e_k`` or up to 3 times faster. When an operation has
      no forward-mode derivative, ``"auto"`` falls back to reverse mode.
    * JAX: ``jax.vmap(jax.jacfwd(f))`` / ``jax.vmap(jax.jacrev(f))``, which XLA runs as
      fast as the trick or faster.

    Parameters
    ----------
    f : callable
        ``f(x_i, *args_i) -> array`` for **one** sample ``x_i`` of shape ``x.shape[1:]``.
    x : array
        The batch, shape ``(B, *s)``, floating point (torch, JAX, or numpy with
        ``backend=``).
    *args, backend, in_axes, chunk_size, allow_randomness, seed :
        As in :func:`per_sample_hessians` (and the module docstring).
    mode : {"auto", "forward", "reverse"}
        As in :func:`hessop.jacobian`.

    Returns
    -------
    array of shape ``(B, *o, *s)``, in ``x``'s framework and device.

    Examples
    --------
    >>> import torch, hessop
    >>> W = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]], dtype=torch.float64)
    >>> f = lambda x: torch.tanh(W @ x)                    # one sample: R^2 -> R^3
    >>> x = torch.zeros(4, 2, dtype=torch.float64)
    >>> J = hessop.per_sample_jacobians(f, x)
    >>> J.shape                                           # (B, m, n)
    torch.Size([4, 3, 2])
    >>> torch.equal(J[1], W)                              # tanh'(0) = 1: J_i = W
    True
    """
    if mode not in JACOBIAN_MODES:
        raise unknown("mode", mode, JACOBIAN_MODES)
    bk = resolve_backend(backend, x, args)
    tr, xp = bk.transforms, bk.xp
    x = native(bk, x, "x")
    size, call, mapped, chunk = _prepare(bk, f, x, args, in_axes, chunk_size, x)
    rand = _Randomness(bk, allow_randomness, seed, x)
    shape = tuple(int(s) for s in x.shape[1:])
    n = math.prod(shape)
    what = f"f (called on one sample x[i] of shape {shape})"

    def one(xi: Any, *mapped_i: Any) -> Any:
        return xp.reshape(output_array(bk, call(xp.reshape(xi, shape), *mapped_i), what), (-1,))

    with tr.context():
        with rand.scope():
            first = [a[0] for a in mapped]
            out_shape = tr.output_shape(lambda z: output_array(bk, call(z, *first), what), x[0])
        m = math.prod(out_shape)
        kernels = _jacobian_kernels(tr, xp, one, rand.vmap, n, m, len(mapped))

        def run(how: str) -> Any:
            strategy = tr.per_sample_jacfwd if how == "forward" else tr.per_sample_jacrev
            kernel = rand.wrap(kernels[how, strategy])
            return tr.chunked(kernel, [xp.reshape(x, (size, n)), *mapped], size, chunk)

        J = forward_or_reverse(tr, mode, n <= m, run)
    return xp.reshape(J, (size, *out_shape, *shape))


def _jacobian_kernels(
    tr: Any, xp: Any, one: Callable[..., Any], randomness: str, n: int, m: int, n_mapped: int
) -> dict[tuple[str, str], Callable[..., Any]]:
    """The ``(b, m, n)`` Jacobians of a chunk ``X`` (``(b, n)``) of samples of ``one``
    (``(n,) -> (m,)``), by (mode, strategy)."""
    in_axes = (0,) * (1 + n_mapped)
    batched = tr.vmap(one, in_axes=in_axes, randomness=randomness)

    def summed_forward(X: Any, *M: Any) -> Any:
        # Tangent j is e_j in every row; rows never mix, so its push-forward is column j
        # of every sample's Jacobian.
        T = xp.broadcast_to(tr.eye(n, X)[:, None, :], (n, X.shape[0], n))

        def push(t: Any) -> Any:
            return tr.jvp(lambda Z: batched(Z, *M), X, t)[1]

        return xp.permute_dims(tr.vmap(push, in_axes=0, randomness=randomness)(T), (1, 2, 0))

    def summed_reverse(X: Any, *M: Any) -> Any:
        out, pull = tr.vjp(lambda Z: batched(Z, *M), X)
        C = xp.broadcast_to(tr.eye(m, out)[:, None, :], (m, X.shape[0], m))
        return xp.permute_dims(tr.vmap(pull, in_axes=0, randomness=randomness)(C), (1, 0, 2))

    def vmap_forward(X: Any, *M: Any) -> Any:
        jac = tr.jacfwd(one, randomness=randomness)
        return tr.vmap(jac, in_axes=in_axes, randomness=randomness)(X, *M)

    def vmap_reverse(X: Any, *M: Any) -> Any:
        return tr.vmap(tr.jacrev(one), in_axes=in_axes, randomness=randomness)(X, *M)

    return {
        ("forward", "summed-output"): summed_forward,
        ("reverse", "summed-output"): summed_reverse,
        ("forward", "vmap-jacobian"): vmap_forward,
        ("reverse", "vmap-jacobian"): vmap_reverse,
    }

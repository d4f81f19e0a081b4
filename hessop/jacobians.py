"""Derivatives of vector-valued functions: :func:`jacobian` and :func:`output_hessians`.

:func:`hessop.hessian` is for scalar losses. For ``f: R^n -> R^m`` hessop offers the
Jacobian (here, dense, with the AD mode chosen by the shape), one Hessian per output (here),
the Jacobian of every sample of a batch (:func:`hessop.per_sample_jacobians`) and the
Jacobian as a matrix-free operator (:func:`hessop.jacobian_operator`). This module also
holds what those share: the check that ``f`` returns one floating array, the choice
between forward and reverse mode with its fallback, and the translation of framework
errors into hessop's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

from . import _pytree, _rng
from ._errors import ForwardModeUnsupportedError, HessopError, RandomnessError, unknown
from ._inputs import native, native_args
from .backends import Backend, resolve_backend
from .backends._base import Transforms

__all__ = ["jacobian", "output_hessians", "JACOBIAN_MODES"]

#: the modes of :func:`jacobian` and :func:`hessop.per_sample_jacobians`
JACOBIAN_MODES = ("auto", "forward", "reverse")


# --- shared by every Jacobian in hessop ---------------------------------------------------
def output_array(bk: Backend, out: Any, what: str = "f") -> Any:
    """``out`` if it is one floating array (what a Jacobian is taken of), else the error."""
    if not _pytree.is_array(out):
        raise TypeError(
            f"{what} must return one array, got {type(out).__name__}; stack the outputs "
            "into one array (or call once per output)"
        )
    bk.check_floating(out.dtype, f"the output of {what}")
    return out


@contextlib.contextmanager
def translated(tr: Transforms, mode: str = "reverse-over-reverse") -> Iterator[None]:
    """hessop's error for a framework error raised inside a transform (a random operation
    under vmap, a missing forward-mode rule, ``.item()`` on a traced value)."""
    try:
        yield
    except HessopError:
        raise  # already hessop's (a ForwardModeUnsupportedError is a RuntimeError too)
    except (RuntimeError, NotImplementedError, TypeError) as err:
        new = tr.translate_error(err, mode)
        if new is err:
            raise
        raise new from err


def random_function(which: str) -> RandomnessError:
    """The error for an ``f`` that drew from ``which`` global generator (see
    :func:`hessop._rng.refuse_draws`)."""
    return RandomnessError(
        f"f draws random numbers (from {which} global generator: dropout in training mode, "
        "torch.randn, np.random, ...), so it is not one function to differentiate. Make f "
        "deterministic (model.eval()), or draw the random numbers once outside f and pass "
        "them in as an argument"
    )


def forward_or_reverse(
    tr: Transforms, mode: str, forward_first: bool, run: Callable[[str], Any]
) -> Any:
    """``run("forward")`` or ``run("reverse")``, as ``mode`` says; ``"auto"`` runs forward
    mode when ``forward_first`` and falls back to reverse mode when an operation has no
    forward-mode derivative (torch)."""
    if mode == "forward" or (mode == "auto" and forward_first):
        try:
            with translated(tr, "forward-over-reverse"):
                return run("forward")
        except ForwardModeUnsupportedError as err:
            if mode == "forward":
                cause = err.__cause__ or err
                first = (str(cause).strip().splitlines() or [""])[0]
                raise ForwardModeUnsupportedError(
                    "mode='forward' needs forward-mode AD, which an operation in f does not "
                    f"support ({first}); use mode='reverse' (or mode='auto', which falls "
                    "back to it)"
                ) from cause
    with translated(tr):
        return run("reverse")


def _positions(argnums: Any, count: int) -> tuple[tuple[int, ...], bool]:
    """The checked ``argnums`` as a tuple, and whether a single int was given."""

    def check(i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"argnums must be an int or a tuple of ints, got {argnums!r}")
        if not 0 <= i < count:
            raise ValueError(
                f"argnums={argnums!r} is out of range: f is called with {count} positional "
                f"argument(s) (x and *args), so argnums must lie in 0..{count - 1}"
            )
        return i

    if isinstance(argnums, tuple):
        if not argnums:
            raise ValueError("argnums=() selects no argument; pass an int or a non-empty tuple")
        positions = tuple(check(i) for i in argnums)
        if len(set(positions)) != len(positions):
            raise ValueError(f"argnums={argnums!r} repeats an argument")
        return positions, False
    return (check(argnums),), True


# --- jacobian ----------------------------------------------------------------------------
def jacobian(
    f: Callable[..., Any],
    x: Any,
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    backend: str | None = None,
    mode: str = "auto",
) -> Any:
    """The Jacobian of ``f(x, *args)`` with respect to ``x`` (or the arguments ``argnums``).

    For an array ``x`` of shape ``s`` and an output of shape ``o`` the Jacobian has shape
    ``(*o, *s)``. A pytree ``x`` (dict / list / tuple of arrays) gives a pytree of the
    same structure whose leaves are the Jacobians with respect to each leaf, ``(*o,
    *leaf.shape)`` (as ``jax.jacobian``).

    Parameters
    ----------
    f : callable
        ``f(x, *args) -> array`` (any shape; a scalar gives the gradient).
    x : array or pytree of arrays
        The point, floating point (torch, JAX, or numpy with ``backend=``).
    *args :
        Extra arguments of ``f``, not differentiated unless ``argnums`` names them.
    argnums : int or tuple of int
        Which positional arguments of ``f`` to differentiate: ``0`` is ``x``, ``1`` the
        first of ``*args``, and so on (floating arrays or pytrees of them). A tuple gives a
        tuple of Jacobians, one per argument, in the order of ``argnums``.
    backend : {"torch", "jax"}, optional
        Inferred from the arrays when omitted.
    mode : {"auto", "forward", "reverse"}
        ``"forward"`` builds the Jacobian one input direction at a time (``jacfwd``: one
        JVP per input), ``"reverse"`` one output at a time (``jacrev``: one VJP per
        output), each batched with vmap. ``"auto"`` (default) counts both sides and uses
        forward mode when the inputs are no more than the outputs (a square or tall
        Jacobian: no more JVPs than VJPs, and a JVP is the cheaper of the two), reverse
        mode otherwise (a wide Jacobian, e.g. few outputs of many inputs). In JAX the
        output size is read without computing (``jax.eval_shape``); torch evaluates ``f``
        once to know it, and falls back to reverse mode when an operation has no
        forward-mode derivative.

    Returns
    -------
    array, pytree, or tuple of them
        In the framework of the arrays. In torch the result keeps a graph to tensors that
        require grad when grad mode is on, as ``torch.func`` does.

    Examples
    --------
    >>> import torch, hessop
    >>> f = lambda x: torch.stack([x[0] * x[1], x[0] + 2 * x[1], x[1] ** 2])
    >>> hessop.jacobian(f, torch.tensor([1.0, 3.0]))    # tall (3 x 2): forward mode
    tensor([[3., 1.],
            [1., 2.],
            [0., 6.]])
    >>> g = lambda p, c: p["w"] * c + p["b"]            # a pytree point, two arguments
    >>> p, c = {"w": torch.tensor([2.0, 3.0]), "b": torch.tensor(1.0)}, torch.tensor(0.5)
    >>> Jp, Jc = hessop.jacobian(g, p, c, argnums=(0, 1))
    >>> Jp["w"], Jp["b"], Jc
    (tensor([[0.5000, 0.0000],
            [0.0000, 0.5000]]), tensor([1., 1.]), tensor([2., 3.]))
    """
    if mode not in JACOBIAN_MODES:
        raise unknown("mode", mode, JACOBIAN_MODES)
    everything = (x, *args)
    positions, single = _positions(argnums, len(everything))
    bk = resolve_backend(backend, everything)
    tr = bk.transforms
    leaves: list[Any] = []
    specs = []
    for i in positions:
        label = "x" if i == 0 else f"args[{i - 1}]"
        sub, spec = _pytree.flatten(everything[i])
        leaves += [native(bk, a, f"{label}{path}") for a, path in zip(sub, spec.paths)]
        specs.append(spec)
    rest = list(native_args(bk, everything, leaves[0]))

    def split(flat: list[Any]) -> list[Any]:
        out, start = [], 0
        for spec in specs:
            out.append(_pytree.unflatten(spec, list(flat[start : start + spec.num_leaves])))
            start += spec.num_leaves
        return out

    def fn(flat: list[Any]) -> Any:
        call = list(rest)
        for i, value in zip(positions, split(flat)):
            call[i] = value
        return output_array(bk, f(*call))

    with tr.context(), _rng.refuse_draws(bk, random_function):
        with translated(tr):
            out_size = math.prod(tr.output_shape(fn, leaves))
        n_in = sum(math.prod(a.shape) for a in leaves)
        J = forward_or_reverse(
            tr,
            mode,
            n_in <= out_size,
            lambda m: (tr.jacfwd if m == "forward" else tr.jacrev)(fn)(leaves),
        )
    parts = split(list(J))
    return parts[0] if single else tuple(parts)


# --- one Hessian per output ---------------------------------------------------------------
def output_hessians(f: Callable[..., Any], x: Any, *args: Any, backend: str | None = None) -> Any:
    """The Hessian of every output of a vector-valued ``f(x, *args)`` with respect to ``x``.

    For an output of shape ``o`` and ``x`` of shape ``s`` the result has shape ``(*o, *s,
    *s)``: entry ``[k]`` is the ``(n, n)`` Hessian of output ``k``, ``d^2 f_k / dx^2`` (a
    scalar ``f`` gives its Hessian). This is the dense, one-shot companion of
    :func:`hessop.hessian`, which is for scalar losses and returns an operator.

    One batched computation: a vmap over the outputs ``k`` of the reverse-mode Jacobian of
    the gradient of ``<e_k, f>``, chosen by measurement (``benchmarks/per_sample.py``, 2
    CPU cores): it needs no forward-mode derivative (every torch operation with a double
    backward works) and ran 1.2-1.5x faster than ``torch.func.jacfwd(torch.func.jacrev(f))``
    in torch and 1.4-3x faster than ``jax.jacfwd(jax.jacrev(f))`` under ``jax.jit`` (eager
    JAX: within 1.3x either way). Memory grows with ``m * n`` products of one evaluation
    of ``f``.

    Parameters
    ----------
    f : callable
        ``f(x, *args) -> array`` of any shape.
    x : array
        The point, floating point (torch, JAX, or numpy with ``backend=``). For a pytree
        of parameters, ravel it into one vector first.
    *args :
        Extra arguments of ``f``, not differentiated.
    backend : {"torch", "jax"}, optional
        Inferred from the arrays when omitted.

    Returns
    -------
    array of shape ``(*f(x).shape, *x.shape, *x.shape)``, in ``x``'s framework.

    Examples
    --------
    >>> import torch, hessop
    >>> f = lambda x: torch.stack([x[0] ** 2 * x[1], torch.sin(x[1])])
    >>> H = hessop.output_hessians(f, torch.tensor([1.0, 0.0], dtype=torch.float64))
    >>> H.shape
    torch.Size([2, 2, 2])
    >>> H[0]                                   # [[2 x1, 2 x0], [2 x0, 0]]
    tensor([[0., 2.],
            [2., 0.]], dtype=torch.float64)
    """
    if isinstance(x, (dict, list, tuple)):
        raise TypeError(
            "output_hessians differentiates with respect to one array x, got a "
            f"{type(x).__name__}; ravel a pytree of parameters into one vector first"
        )
    bk = resolve_backend(backend, x, args)
    tr = bk.transforms
    xp = bk.xp
    x = native(bk, x, "x")
    args = native_args(bk, args, x)

    def fn(z: Any) -> Any:
        return output_array(bk, f(z, *args))

    with tr.context(), _rng.refuse_draws(bk, random_function):
        with translated(tr):
            out_shape = tr.output_shape(fn, x)
        m = math.prod(out_shape)

        def reverse_over_reverse() -> Any:
            def hessian_of(e: Any) -> Any:
                return tr.jacrev(tr.grad(lambda z: xp.sum(xp.reshape(fn(z), (-1,)) * e)))(x)

            eye = tr.eye(m, x)
            return xp.reshape(tr.vmap(hessian_of, in_axes=0)(eye), (*out_shape, *x.shape, *x.shape))

        return forward_or_reverse(
            tr,
            "auto",
            tr.output_hessian == "forward-over-reverse",
            lambda how: tr.jacfwd(tr.jacrev(fn))(x) if how == "forward" else reverse_over_reverse(),
        )

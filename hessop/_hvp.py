"""One Hessian-vector product as a pure function of its inputs: :func:`hvp`.

Unlike :func:`hessop.hessian`, which fixes a point and reuses work across many products,
:func:`hvp` recomputes everything from ``params``, ``v`` and ``*args`` each call and keeps
the derivatives to all of them: it is the building block for losses that contain
curvature (sliced score matching, Hutchinson trace penalties, MAML-style updates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _pytree
from ._errors import ShapeError
from ._hessian import canonical_mode
from ._inputs import native, native_args
from ._loss import check_scalar
from .backends import resolve_backend

#: the modes :func:`hvp` accepts (aliases "fwd-rev", "rev-fwd", "rev-rev" too)
HVP_MODES = ("auto", "forward-over-reverse", "reverse-over-forward", "reverse-over-reverse")


def hvp(
    f: Callable[..., Any],
    params: Any,
    v: Any,
    *args: Any,
    backend: str | None = None,
    mode: str = "auto",
) -> Any:
    """The Hessian-vector product ``H(params) v`` of ``f(params, *args)``, differentiably.

    A pure function of ``params``, ``v``, ``*args`` and what ``f`` closes over. In JAX it
    can be differentiated (``jax.grad``), jitted and vmapped like any JAX function. In
    torch it is built from ``torch.func`` transforms, so with grad mode on the result keeps
    the autograd graph to every input and closed-over tensor that requires grad:
    ``loss = v @ hvp(...)`` then ``loss.backward()`` differentiates through the product
    (third derivatives of ``f``). Call under ``torch.no_grad()`` to keep no graph.

    Parameters
    ----------
    f : callable
        ``f(params, *args) -> scalar``.
    params :
        An array or a pytree (dict / list / tuple) of arrays: the point.
    v :
        The direction: a pytree shaped like ``params`` (then the result has that shape
        too), or a flat vector of length ``d`` in hessop's layout (that of
        :meth:`HessianOperator.ravel`; then the result is flat too).
    *args :
        Extra arguments of ``f`` (data, targets, other parameters).
    backend : {"torch", "jax"}, optional
        Inferred from the arrays when omitted (numpy alone needs it).
    mode : str
        ``"forward-over-reverse"`` (``jvp`` of ``grad``), ``"reverse-over-forward"``
        (``grad`` of ``jvp``), ``"reverse-over-reverse"`` (``grad`` of ``<grad f, v>``) or
        ``"auto"``: forward-over-reverse in JAX, reverse-over-reverse in torch (every
        torch operation has a double-backward derivative, not all have a forward one).

    Examples
    --------
    >>> import torch, hessop
    >>> f = lambda w, a: a * (w**3).sum()                 # H = diag(6 a w)
    >>> w, v = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])
    >>> a = torch.tensor(0.5, requires_grad=True)
    >>> Hv = hessop.hvp(f, w, v, a)
    >>> Hv.detach(), Hv.requires_grad
    (tensor([3., 6.]), True)
    >>> torch.autograd.grad(Hv.sum(), a)[0]               # d/da sum(6 a w) = 18
    tensor(18.)
    """
    name = canonical_mode(mode, HVP_MODES)
    p_leaves, spec = _pytree.flatten(params)
    bk = resolve_backend(backend, p_leaves, v, args)
    tr = bk.transforms
    p_leaves = [native(bk, p, f"parameter leaf {i}") for i, p in enumerate(p_leaves)]
    xp = bk.xp
    v_leaves, flat = _direction(bk, spec, p_leaves, v)
    args = native_args(bk, args, p_leaves[0])
    if name == "auto":
        name = bk.auto_mode

    def loss(leaves: list[Any]) -> Any:
        return check_scalar(f(_pytree.unflatten(spec, list(leaves)), *args), "f", bk)

    with tr.context():
        try:
            if name == "forward-over-reverse":
                out = tr.jvp(tr.grad(loss), p_leaves, v_leaves)[1]
            elif name == "reverse-over-forward":
                out = tr.grad(lambda L: tr.jvp(loss, L, v_leaves)[1])(p_leaves)
            else:

                def directional(L: list[Any]) -> Any:
                    g = tr.grad(loss)(L)
                    return sum(xp.sum(gi * vi) for gi, vi in zip(g, v_leaves))

                out = tr.grad(directional)(p_leaves)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            translated = tr.translate_error(err, name)
            if translated is err:
                raise
            raise translated from err
    out = list(out)
    if flat:
        return xp.concat([xp.reshape(o, (-1,)) for o in out])
    return _pytree.unflatten(spec, out)


def _direction(bk: Any, spec: _pytree.TreeSpec, p_leaves: list[Any], v: Any) -> tuple[list, bool]:
    """``v`` as leaves shaped and typed like the parameters, and whether it was flat."""
    shape = tuple(getattr(v, "shape", (None, None)))
    flat = _pytree.is_array(v) and len(shape) == 1 and spec.root is not None
    flat = flat or (_pytree.is_array(v) and spec.root is None and shape != spec.shapes[0])
    if flat:
        if len(shape) != 1 or shape[0] != spec.size:
            raise ShapeError(
                f"v must be shaped like params (a {spec.describe()}) or be a flat vector of "
                f"length {spec.size}; got shape {shape}"
            )
        v = native(bk, v, "v", like=p_leaves[0])
        leaves = _pytree.unravel(bk.xp, spec, v)
    else:
        leaves = _pytree.leaves_like(spec, v, "v")
    out = []
    for i, (vi, p) in enumerate(zip(leaves, p_leaves)):
        vi = native(bk, vi, f"leaf {i} of v", like=p)
        out.append(vi if vi.dtype == p.dtype else bk.xp.astype(vi, p.dtype))
    return out, flat

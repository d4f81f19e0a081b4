"""Function transforms (vmap, grad, jvp, vjp) of one framework, behind one interface.

The functional helpers (:mod:`hessop.per_sample`, :func:`hessop.hvp`) are written once
against :class:`Transforms`; ``torch.func`` and ``jax`` provide near-identical APIs, so each
adapter is a thin shim. Inputs are resolved here too: the backend is inferred from the
arrays (numpy needs ``backend=``), numpy arrays are converted, dtypes are checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ._errors import DTypeError, LossError
from ._hessian import _collect_arrays, _convert_arg, map_arrays
from .backends import Backend, get_backend, infer_backend


class Transforms:
    """vmap / grad / jvp / vjp / jacfwd / jacrev of one framework, plus array helpers."""

    name = "?"
    #: how :func:`hessop.per_sample_hessians` batches: "summed-gradient" or "vmap-hessian"
    per_sample_hessian = "vmap-hessian"

    def __init__(self, bk: Backend) -> None:
        self.bk = bk
        self.xp = bk.xp

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def vmap(self, fn: Callable, in_axes: Any) -> Callable:
        raise NotImplementedError

    def grad(self, fn: Callable) -> Callable:
        raise NotImplementedError

    def jvp(self, fn: Callable, primal: Any, tangent: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def vjp(self, fn: Callable, primal: Any) -> tuple[Any, Callable]:
        """``(fn(primal), pullback)``; ``pullback(cotangent)`` returns the primal's cotangent."""
        raise NotImplementedError

    def jacfwd(self, fn: Callable) -> Callable:
        raise NotImplementedError

    def jacrev(self, fn: Callable) -> Callable:
        raise NotImplementedError

    def eye(self, m: int, like: Any) -> Any:
        """The ``(m, m)`` identity in ``like``'s dtype (and device)."""
        raise NotImplementedError

    def chunked(
        self, kernel: Callable[..., Any], mapped: list[Any], size: int, chunk: int | None
    ) -> Any:
        """``kernel(*mapped)`` (a pytree of arrays with leading ``size``), ``chunk`` rows at a
        time along the leading axis of every array in ``mapped``."""
        raise NotImplementedError

    def forward_mode_error(self, err: Exception) -> bool:
        """Whether ``err`` says that an operation has no forward-mode derivative."""
        return False


class _TorchTransforms(Transforms):
    name = "torch"
    # vmap(jacfwd(jacrev(f))) is 5-10x slower than the summed-gradient trick in torch 2.x
    per_sample_hessian = "summed-gradient"

    def __init__(self, bk: Backend) -> None:
        super().__init__(bk)
        import torch
        import torch.func

        self._torch, self._func = torch, torch.func

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        # The math attention kernel (the fused ones have no forward-mode or double-backward
        # derivatives), but the *caller's* grad mode: torch.func differentiates inside either
        # way, and the outer mode decides only whether results keep a graph to the inputs.
        from .backends._torch import autodiff_context

        enabled = self._torch.is_grad_enabled()
        with autodiff_context(), self._torch.set_grad_enabled(enabled):
            yield

    def vmap(self, fn: Callable, in_axes: Any) -> Callable:
        return self._func.vmap(fn, in_dims=in_axes)

    def grad(self, fn: Callable) -> Callable:
        return self._func.grad(fn)

    def jvp(self, fn: Callable, primal: Any, tangent: Any) -> tuple[Any, Any]:
        return self._func.jvp(fn, (primal,), (tangent,))

    def vjp(self, fn: Callable, primal: Any) -> tuple[Any, Callable]:
        out, pull = self._func.vjp(fn, primal)
        return out, lambda ct: pull(ct)[0]

    def jacfwd(self, fn: Callable) -> Callable:
        return self._func.jacfwd(fn)

    def jacrev(self, fn: Callable) -> Callable:
        return self._func.jacrev(fn)

    def eye(self, m: int, like: Any) -> Any:
        return self._torch.eye(m, dtype=like.dtype, device=like.device)

    def chunked(self, kernel, mapped, size, chunk):
        if chunk is None or chunk >= size:
            return kernel(*mapped)
        parts = [kernel(*[m[i : i + chunk] for m in mapped]) for i in range(0, size, chunk)]
        return _concat_trees(parts, lambda xs: self._torch.cat(xs, dim=0))

    def forward_mode_error(self, err: Exception) -> bool:
        from ._errors import ForwardModeUnsupportedError
        from .backends._torch import _forward_mode_error

        return isinstance(_forward_mode_error(err, "?"), ForwardModeUnsupportedError)


class _JaxTransforms(Transforms):
    name = "jax"

    def __init__(self, bk: Backend) -> None:
        super().__init__(bk)
        import jax

        self._jax = jax

    def vmap(self, fn: Callable, in_axes: Any) -> Callable:
        return self._jax.vmap(fn, in_axes=in_axes)

    def grad(self, fn: Callable) -> Callable:
        return self._jax.grad(fn)

    def jvp(self, fn: Callable, primal: Any, tangent: Any) -> tuple[Any, Any]:
        return self._jax.jvp(fn, (primal,), (tangent,))

    def vjp(self, fn: Callable, primal: Any) -> tuple[Any, Callable]:
        out, pull = self._jax.vjp(fn, primal)
        return out, lambda ct: pull(ct)[0]

    def jacfwd(self, fn: Callable) -> Callable:
        return self._jax.jacfwd(fn)

    def jacrev(self, fn: Callable) -> Callable:
        return self._jax.jacrev(fn)

    def eye(self, m: int, like: Any) -> Any:
        return self._jax.numpy.eye(m, dtype=like.dtype)

    def chunked(self, kernel, mapped, size, chunk):
        if chunk is None or chunk >= size:
            return kernel(*mapped)
        # lax.map runs the chunks one after another, also under jit, so memory stays
        # bounded by one chunk; a leftover partial chunk is one extra call.
        jax, tree = self._jax, self._jax.tree_util
        full = (size // chunk) * chunk
        stacked = [m[:full].reshape(size // chunk, chunk, *m.shape[1:]) for m in mapped]
        out = jax.lax.map(lambda ms: kernel(*ms), stacked)
        out = tree.tree_map(lambda a: a.reshape(full, *a.shape[2:]), out)
        if full == size:
            return out
        rest = kernel(*[m[full:] for m in mapped])
        return _concat_trees([out, rest], lambda xs: jax.numpy.concatenate(xs, axis=0))


def _concat_trees(parts: list[Any], cat: Callable[[list[Any]], Any]) -> Any:
    first = parts[0]
    if isinstance(first, (list, tuple)):
        return type(first)(_concat_trees([p[i] for p in parts], cat) for i in range(len(first)))
    return cat(parts)


_ADAPTERS: dict[str, type[Transforms]] = {"torch": _TorchTransforms, "jax": _JaxTransforms}


def transforms_for(name: str) -> Transforms:
    """The :class:`Transforms` of a backend name; a clear error for backends without one."""
    bk = get_backend(name)
    if name not in _ADAPTERS:
        raise TypeError(
            f"the {name!r} backend cannot differentiate; pass backend='torch' or backend='jax'"
        )
    return _ADAPTERS[name](bk)


def resolve_backend(backend: str | None, *arrays: Any) -> str:
    """The backend name: ``backend`` if given, else the one framework of ``arrays``."""
    if backend is not None:
        return backend
    leaves: list[Any] = []
    _collect_arrays(arrays, leaves)
    names = {infer_backend(x) for x in leaves} - {"numpy", None}
    if len(names) > 1:
        raise TypeError(f"the arrays mix frameworks ({sorted(names)}); use arrays of one framework")
    if names:
        return names.pop()
    raise TypeError(
        "cannot infer the backend from numpy arrays (or no arrays); "
        "pass backend='torch' or backend='jax'"
    )


def native(tr: Transforms, x: Any, what: str, floating: bool = True, like: Any = None) -> Any:
    """``x`` as a native array of ``tr``'s framework.

    A numpy array is converted: floating ones to ``like``'s dtype when given (else their
    own), onto ``like``'s device in torch.
    """
    bk = tr.bk
    if not bk.owns(x):
        kind = infer_backend(x)
        if kind != "numpy" or not hasattr(x, "dtype"):
            got = type(x).__module__.split(".")[0] + "." + type(x).__name__
            raise TypeError(
                f"{what} must be a {tr.name} or numpy array, got {got}; "
                f"convert it first or pass the matching backend="
            )
        dtype = None
        if x.dtype.kind == "f":
            dtype = like.dtype if like is not None else x.dtype
        dev = bk.device_of(like) if like is not None and tr.name == "torch" else None
        x = bk.asarray(x, dtype=dtype, device=dev)
    if floating:
        bk.check_floating(x.dtype, what)
    return x


def native_args(tr: Transforms, args: tuple[Any, ...], like: Any) -> tuple[Any, ...]:
    """Convert numpy arrays in ``args`` (floating ones to ``like``'s dtype and device)."""
    bk = tr.bk
    dev = None
    if tr.name == "torch":  # JAX places numpy inputs itself; tracers have no device
        dev = bk.device_of(like)
    return tuple(map_arrays(lambda a: _convert_arg(bk, a, like.dtype, dev), args))


def check_scalar(out: Any, what: str) -> Any:
    """Raise :class:`LossError` unless ``out`` is a real scalar."""
    shape = tuple(getattr(out, "shape", ()))
    if shape != ():
        raise LossError(f"{what} must return a scalar, but it returned shape {shape}")
    dtype = str(getattr(out, "dtype", ""))
    if "complex" in dtype or "int" in dtype or "bool" in dtype:
        raise DTypeError(f"{what} must return a real floating scalar, got dtype {dtype}")
    return out

"""The interface a framework implements: arrays, state, and the per-batch derivatives.

hessop's framework-neutral core (operators, streaming, algorithms, model adapters) talks to
a framework only through the three classes here:

* :class:`Backend` — the framework's arrays (conversion, devices, dtypes), its global state
  (random generators, in-place mutation fingerprints), and factories for the pieces below;
* :class:`CurvatureKernel` — the products of one curvature matrix (a Hessian in one AD
  mode, a GGN) of one loss, on one batch at a time;
* :class:`Transforms` — ``grad`` / ``jvp`` / ``vjp`` / ``vmap`` / Jacobians, for the functional
  helpers (:func:`hessop.hvp`, per-sample quantities, Jacobians, the empirical Fisher);
* :class:`LayerCapture` — the inputs and output gradients of a model's linear and
  convolution layers, from which :func:`hessop.model_kfac` builds Kronecker factors.

Adding a framework means subclassing these in a sub-package of ``hessop.backends`` and
registering it (:func:`hessop.backends.register_backend`); see ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import DeviceError, DTypeError, EmptyDataError

#: whether a dtype is a real floating type, by dtype object (asked on every call)
_FLOATING: dict[Any, bool] = {}


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How an operator wants its kernel: where, and with which guarantees."""

    #: the native device of the point and the vectors
    device: Any = None
    #: keep products differentiable with respect to the loss's arguments and closure
    differentiable: bool = False
    #: compile the product ahead of the first use (``compile=True``)
    compile: bool = False
    #: whether the operator will keep a linearization between products (one batch)
    cache: bool = True
    #: columns per batched call in ``hmm`` (None: all at once)
    chunk_size: int | None = None
    #: the key under which compiled functions may be shared between operators
    #: (see :mod:`hessop._sharing`); None: compile for this operator only
    share_key: Any = None


class Backend:
    """One array framework as hessop sees it.

    Array-only backends (numpy) implement the array methods; autodiff backends (torch, JAX)
    also implement the factories at the end (:meth:`hessian_kernel`, :attr:`transforms`,
    ...).
    """

    name: str = "?"
    #: the array-API namespace of the framework (array_api_compat's wrapper or jax.numpy)
    xp: Any = None
    #: True when the backend implements automatic differentiation
    differentiable: bool = False
    #: the AD mode ``mode="auto"`` means (and with ``compile=True``)
    auto_mode: str = "reverse-over-reverse"
    auto_compiled_mode: str = "reverse-over-forward"
    #: the modes ``compile=True`` can compile, and whether compiled products keep graphs
    compilable_modes: tuple[str, ...] = ()
    compiled_products_differentiable: bool = False

    # --- arrays ---------------------------------------------------------------------------
    def owns(self, x: Any) -> bool:
        """Whether ``x`` is a native array of this framework."""
        raise NotImplementedError

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Any:
        """Convert ``x`` (numpy, python scalar or native) to a native array."""
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def device_of(self, x: Any) -> Any:
        return None

    def default_device(self) -> Any:
        return None

    def resolve_device(self, device: Any) -> Any:
        """Turn a user's ``device=`` (string or native) into the native device object;
        :class:`~hessop.DeviceError` when there is no such device."""
        return device

    def dtype(self, dtype: Any) -> Any:
        """Turn a dtype given by name, numpy dtype or native dtype into the native dtype."""
        raise NotImplementedError

    def dtype_name(self, dtype: Any) -> str:
        return str(dtype).replace("torch.", "")

    def is_floating(self, dtype: Any) -> bool:
        try:
            return _FLOATING[dtype]
        except (KeyError, TypeError):  # a dtype not seen yet (or unhashable)
            answer = self.dtype_name(dtype) in ("float16", "bfloat16", "float32", "float64")
        try:
            _FLOATING[dtype] = answer
        except TypeError:
            pass
        return answer

    def eps(self, dtype: Any) -> float:
        return float(np.finfo(self.dtype_name(dtype)).eps)

    def stop_gradient(self, x: Any) -> Any:
        return x

    def jit(
        self, fn: Callable[..., Any], device: Any, donate: tuple[int, ...] = ()
    ) -> Callable[..., Any]:
        """``fn(xp, *arrays)`` bound to this namespace, compiled where that pays.

        The default runs eagerly; a framework with a tracing compiler (JAX) compiles it
        once per ``fn`` and shapes. ``donate``: positions (among the arrays) of arguments
        the caller never uses again, whose memory a compiled kernel may reuse for its
        results (an immutable array then updated in place); eager kernels ignore it.
        """
        return functools.partial(fn, self.xp)

    # --- checks shared by every operator --------------------------------------------------
    def check_floating(self, dtype: Any, what: str) -> None:
        if not self.is_floating(dtype):
            raise DTypeError(
                f"{what} has dtype {self.dtype_name(dtype)}; hessop works on real floating "
                "point arrays (float32 or float64). Convert it first, e.g. x.astype('float64')."
            )

    def check_argument(self, x: Any, what: str) -> None:
        """Raise a ``TypeError`` naming ``what`` for a parameter or an argument of the loss
        (any leaf, arrays or not) that this framework cannot differentiate or compile with."""

    def check_device(self, x: Any, device: Any, what: str) -> None:
        have = self.device_of(x)
        if device is not None and have is not None and have != device:
            raise DeviceError(
                f"{what} is on device {have} but the operator is on {device}; "
                f"move it first (e.g. x.to({str(device)!r}) in torch, jax.device_put in JAX)."
            )

    # --- state: what hessop must notice or leave as it was --------------------------------
    def fingerprint(self, x: Any) -> Any:
        """A cheap summary of a mutable array's contents that changes when they change
        (None for immutable arrays, whose identity says everything)."""
        return None

    def memory_key(self, x: Any) -> Any:
        """What identifies the memory a mutable array views (None: nothing to share), so
        that two views of the same memory are fingerprinted once."""
        return None

    def is_tracer(self, x: Any) -> bool:
        """Whether ``x`` is an abstract value inside a transformation (never shared)."""
        return False

    def watch_object(self, watch: Any, obj: Any, label: str) -> bool:
        """Record in ``watch`` (a :class:`hessop._state.StateWatch`) the state of a
        framework object the loss reads (an ``nn.Module``); False when ``obj`` is not one."""
        return False

    def rng_state(self) -> Any:
        """The framework's global random state, comparable with ``==`` (None: none)."""
        return None

    def rng_moved(self, state: Any) -> bool:
        """Whether the global random state moved since :meth:`rng_state` returned ``state``."""
        return False

    def restore_rng_state(self, state: Any) -> None:
        """Put back a state returned by :meth:`rng_state`."""

    def first_call_checks(self) -> Any:
        """A context for the loss's first evaluations that raises
        :class:`~hessop.LossError` when the loss takes a Python number out of an array it
        differentiates (``.item()``)."""
        return contextlib.nullcontext()

    def rng_scope(self, device: Any = None, seed: int | None = None) -> Any:
        """A context that restores the framework's global generators on exit and, with a
        ``seed``, seeds them on entry."""
        return contextlib.nullcontext()

    def use_compilation_cache(self, folder: Any) -> bool:
        """Keep this framework's compiled functions on disk under ``folder`` (a
        :class:`pathlib.Path`), for later processes; False when it compiles nothing worth
        keeping. Called by :func:`hessop.enable_compilation_cache`."""
        return False

    # --- automatic differentiation --------------------------------------------------------
    def hessian_kernel(self, loss: Any, mode: str, options: KernelOptions) -> CurvatureKernel:
        """The Hessian :class:`CurvatureKernel` of ``loss`` (a :class:`hessop._loss.Loss`) in a
        canonical ``mode`` (never ``"auto"``, ``"dense"`` or ``"finite-difference"``, which
        the core composes from the kernel's products)."""
        raise NotImplementedError(f"the {self.name!r} backend has no automatic differentiation")

    @property
    def transforms(self) -> Transforms:
        raise NotImplementedError(f"the {self.name!r} backend has no automatic differentiation")

    def reducer(self, process_group: Any) -> Any:
        """The :class:`Reducer` for ``distributed=True``."""
        from .._errors import DistributedError

        raise DistributedError(f"distributed=True is not implemented for the {self.name!r} backend")

    def module_model(self, model: Any, loss_fn: Any, **options: Any) -> Any:
        """A model adapter for a framework module (an ``nn.Module``), or None if ``model``
        is not one (then it must be a function ``apply(params, x)``)."""
        return None

    def module_groups(self, model: Any, names: list[str]) -> dict[str, list[str]] | None:
        """The parameters ``names`` of a framework module (an ``nn.Module``) grouped by the
        submodule that holds each directly, groups in the order of their first parameter;
        None when ``model`` is not a module of this framework."""
        return None

    def ggn_kernel(self, model: Any, loss: Any, options: KernelOptions) -> CurvatureKernel:
        """The generalized Gauss-Newton :class:`CurvatureKernel` of a model adapter."""
        raise NotImplementedError(f"the {self.name!r} backend has no GGN product")

    def kfac_capture(self, model: Any, spec: Any, example: tuple[Any, Any]) -> LayerCapture:
        """The :class:`LayerCapture` of a model adapter whose parameter leaves have the layout
        ``spec``, its layers found on the batch ``example`` ``(x, y)``."""
        raise NotImplementedError(f"the {self.name!r} backend has no Kronecker factors")

    def loss_likelihood(self, loss_fn: Any) -> str | None:
        """The distribution whose negative log-likelihood ``loss_fn`` is, when the framework
        can tell (a torch loss module): ``"categorical"``, ``"gaussian"``, ``"bernoulli"``;
        None otherwise."""
        return None

    def __repr__(self) -> str:
        return f"<hessop backend {self.name!r}>"


class CurvatureKernel:
    """The products of one curvature matrix (a Hessian in one AD mode, a GGN, a Fisher) of
    one loss, on one batch at a time.

    ``point`` is the tuple of parameter leaves (native arrays), ``args`` one batch's
    arguments, vectors flat in hessop's layout and blocks ``(d, k)``. The core
    (:class:`hessop._streamed.StreamedOperator`) owns the streaming and the caching policy:
    a one-off product calls :meth:`product`; an operator's second product calls
    :meth:`linearize`, which also returns the work that does not depend on the vector (a
    kept gradient graph, a linearization, per-sample gradients), and later products
    :meth:`apply` it.
    """

    #: whether :meth:`linearize` / :meth:`apply` exist
    linearizable: bool = False
    #: whether the kernel shares compiled functions under its share key (else the operator
    #: skips re-keying them after its first uses, a rescan of what the loss reads)
    shares_compilations: bool = True

    def product(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> Any:
        """The batch's matrix times a vector ``(d,)`` or a block ``(d, k)``."""
        raise NotImplementedError

    def linearize(self, point: tuple[Any, ...], args: tuple[Any, ...], V: Any) -> tuple[Any, Any]:
        """``(product, cache)`` for a vector or a block ``V``."""
        raise NotImplementedError

    def apply(self, cache: Any, V: Any) -> Any:
        """The product from a cache of :meth:`linearize` (vector or block)."""
        raise NotImplementedError

    #: whether :meth:`block_product` exists (else the operator scatters the blocks into
    #: full columns, zero outside their leaves, for one :meth:`product`)
    block_products: bool = False

    def block_product(
        self,
        point: tuple[Any, ...],
        args: tuple[Any, ...],
        blocks: list[tuple[tuple[int, ...], Any]],
        cache: Any = None,
    ) -> tuple[list[Any], Any]:
        """Products of diagonal blocks of the batch's matrix, ``(products, cache)``.

        Each block is ``(leaves, V)``: indices of parameter leaves and an ``(n, u)`` block
        over their coordinates; its product is the matrix restricted to those coordinates
        (rows and columns) times ``V``. ``cache`` is what :meth:`linearize` or an earlier
        call returned (None: none yet); the returned cache is kept by a caching operator.
        """
        raise NotImplementedError

    def gradient(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> tuple[Any, Any]:
        """``(loss, flat gradient)`` of the batch."""
        raise NotImplementedError

    def dense(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        """The ``(d, d)`` matrix of the batch (Hessian kernels)."""
        raise NotImplementedError

    def depends_on_point(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> bool:
        """Whether the loss depends on the parameters at all (asked only when a product
        came out exactly zero, to tell a loss that ignores them from a flat one)."""
        return True

    def dependence_known(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> bool | None:
        """Whether the loss depends on the parameters, when the kernel knows it cheaply (its
        products raise for a loss that does not, or it cached the answer); None otherwise,
        and the operator examines its first product instead."""
        return None

    def warm_up(self, point: tuple[Any, ...], args: tuple[Any, ...]) -> float:
        """Compile everything a product will run, for this batch's shapes; return the
        seconds it took (0.0 when nothing had to be compiled)."""
        return 0.0

    def share_as(self, key: Any) -> None:
        """Offer this kernel's compiled functions under another share key (the state the
        loss left behind after its own evaluation)."""


class Reducer:
    """How a process's share of a product becomes the product over all the data.

    :class:`~hessop.HessianOperator` calls these hooks; the defaults do nothing, which is
    the single-process operator. A reducer for another framework or transport subclasses
    this and implements the hooks it needs.
    """

    def prepare(self, leaves: list[Any], device: Any) -> tuple[list[Any], Any]:
        """Once, at construction: check the setup; return the leaves and the operator's
        device (where its vectors live)."""
        return leaves, device

    def shard_batch(self, args: tuple[Any, ...], dtype: Any) -> tuple[Any, ...]:
        """Place one local batch where the per-batch functions expect it."""
        return args

    def replicate(self, x: Any) -> Any:
        """Place an input vector (or block) where the per-batch functions expect it."""
        return x

    def reduce(self, acc: Any, total: int, zero: Callable[[], Any]) -> tuple[Any, float]:
        """Combine the local size-weighted sum ``acc`` (None when this process had no
        batch; ``zero()`` builds its zeros) and the local number of samples ``total``."""
        if acc is None:
            raise EmptyDataError("data= yielded no batch; pass a non-empty iterable of batches")
        return acc, total


class Transforms:
    """vmap / grad / jvp / vjp / jacfwd / jacrev of one framework, plus array helpers."""

    name = "?"
    #: whether :meth:`jit` compiles (then compiled functions are worth sharing)
    compiles = False
    #: how :func:`hessop.per_sample_hessians` batches: "summed-gradient" or "vmap-hessian"
    per_sample_hessian = "vmap-hessian"
    #: how :func:`hessop.per_sample_jacobians` batches each AD mode: "summed-output" (one
    #: JVP or VJP of the whole batch per coordinate) or "vmap-jacobian" (vmap of jacfwd or
    #: jacrev); chosen by measurement (benchmarks/per_sample.py)
    per_sample_jacfwd = "vmap-jacobian"
    per_sample_jacrev = "vmap-jacobian"
    #: how :func:`hessop.output_hessians` differentiates: "reverse-over-reverse" (a vmap
    #: over outputs of jacrev of a gradient) or "forward-over-reverse" (jacfwd of jacrev).
    #: Reverse-over-reverse needs no forward-mode rule and ran faster in torch (1.2-1.5x)
    #: and under jax.jit (1.4-3x; eager JAX within 1.3x either way; benchmarks/per_sample.py)
    output_hessian = "reverse-over-reverse"

    def __init__(self, bk: Backend) -> None:
        self.bk = bk
        self.xp = bk.xp

    def context(self, graph: bool = True) -> contextlib.AbstractContextManager:
        """The framework settings every transform runs under (restored on exit).

        ``graph=False``: the results keep no graph to the inputs or to what the function
        closes over (torch: no autograd graph is recorded outside the transforms)."""
        return contextlib.nullcontext()

    def vmap(self, fn: Callable, in_axes: Any, randomness: str = "error") -> Callable:
        raise NotImplementedError

    def jit(self, fn: Callable) -> Callable:
        """``fn`` compiled by the framework's tracing compiler where it has one."""
        return fn

    def grad(self, fn: Callable) -> Callable:
        raise NotImplementedError

    def jvp(self, fn: Callable, primal: Any, tangent: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def vjp(self, fn: Callable, primal: Any) -> tuple[Any, Callable]:
        """``(fn(primal), pullback)``; ``pullback(cotangent)`` returns the primal's cotangent."""
        raise NotImplementedError

    def linearize(self, fn: Callable, primal: Any) -> Callable:
        """The JVP map ``tangent -> J tangent`` of ``fn`` at ``primal``, for many
        applications: the work that does not depend on the tangent is done once where the
        framework can (the default recomputes it per application). Where :meth:`jit`
        compiles, the map is a pytree that compiled functions take and return."""
        return lambda tangent: self.jvp(fn, primal, tangent)[1]

    def pullback(self, fn: Callable, primal: Any) -> Callable:
        """The VJP map ``cotangent -> J^T cotangent`` of ``fn`` at ``primal``, for many
        applications (it keeps what the forward pass saved); a pytree as in
        :meth:`linearize`."""
        return self.vjp(fn, primal)[1]

    def jacfwd(self, fn: Callable, randomness: str = "error") -> Callable:
        raise NotImplementedError

    def jacrev(self, fn: Callable) -> Callable:
        raise NotImplementedError

    def eye(self, m: int, like: Any) -> Any:
        """The ``(m, m)`` identity in ``like``'s dtype (and device)."""
        raise NotImplementedError

    def output_spec(self, fn: Callable[[Any], Any], x: Any) -> tuple[tuple[int, ...], Any]:
        """The shape and dtype of ``fn(x)``, computed as cheaply as the framework allows."""
        raise NotImplementedError

    def output_shape(self, fn: Callable[[Any], Any], x: Any) -> tuple[int, ...]:
        """The shape of ``fn(x)`` (see :meth:`output_spec`)."""
        return self.output_spec(fn, x)[0]

    def chunked(
        self, kernel: Callable[..., Any], mapped: list[Any], size: int, chunk: int | None
    ) -> Any:
        """``kernel(*mapped)`` (a pytree of arrays with leading ``size``), ``chunk`` rows at a
        time along the leading axis of every array in ``mapped``."""
        raise NotImplementedError

    def translate_error(self, err: Exception, mode: str) -> Exception:
        """The hessop error for a framework error raised inside a transform (``err`` itself
        when there is none): a missing forward-mode rule, a Python value taken from a traced
        array (``.item()``)."""
        return err


@dataclasses.dataclass(frozen=True)
class KFACLayer:
    """A layer ``out = W a (+ b)`` whose weight is a parameter leaf, as KFAC sees it.

    The weight leaf, with its axes permuted by ``perm`` and reshaped, is the
    ``(d_out, d_in)`` matrix ``W``; the layer's input, reshaped to ``(samples, positions,
    d_in)``, is ``a`` (for a convolution: the patches its kernel sees, channel-major); its
    output gradient has shape ``(samples, positions, d_out)``. ``positions`` are the
    weight-sharing dimensions (1 for a plain linear layer on vectors).
    """

    #: a human-readable name (the module's, or the weight leaf's path)
    name: str
    #: ``"linear"`` or ``"conv"``
    kind: str
    #: index of the weight leaf (None: only the bias is differentiated)
    weight: int | None
    #: index of the bias leaf (None: no bias, or not differentiated)
    bias: int | None
    #: the weight leaf's axes in ``(out axes..., in axes...)`` order
    perm: tuple[int, ...]
    d_out: int
    d_in: int


def layer_name(param: str) -> str:
    """The name of the layer that owns a parameter, from the parameter's name or pytree path:
    ``"layers.0.weight"`` and ``"['layers.0.weight']"`` -> ``"layers.0"`` (torch's module name),
    ``"['Dense_0']['kernel']"`` -> ``"Dense_0"``, ``"['W1']"`` -> ``"W1"``.

    >>> layer_name("['Dense_0']['kernel']"), layer_name("head.bias")
    ('Dense_0', 'head')
    """
    keys = [k or i for k, i in re.findall(r"\['(.*?)'\]|\[(\d+)\]", param)] or [param]
    name = ".".join(keys)
    head, _, last = name.rpartition(".")
    return head if head and last in ("weight", "bias", "kernel") else name


class LayerCapture:
    """The inputs and output gradients of a model's layers, one batch at a time.

    Built by :meth:`Backend.kfac_capture`. ``layers`` lists the layers found (in the order
    the model calls them), ``unsupported`` maps the index of every other parameter leaf to
    the reason it belongs to no supported layer.
    """

    layers: tuple[KFACLayer, ...] = ()
    unsupported: dict[int, str] = {}

    def run(
        self, fn: Callable[..., Any], point: tuple[Any, ...], args: tuple[Any, Any], *extra: Any
    ) -> Any:
        """``fn(out, args, inputs, pullback, *extra)`` for one batch ``args = (x, y)``.

        ``out`` is the model's output at ``point`` (no gradient attached), ``inputs`` a tuple
        with one ``(n, positions, d_in)`` array per layer (None for a layer whose weight is
        not differentiated), and ``pullback(V)`` maps ``k`` output cotangents ``V`` of shape
        ``(k, *out.shape)`` to one ``(k, n, positions, d_out)`` array per layer: the
        gradients of ``<out, V[j]>`` with respect to the layers' outputs. ``fn`` is written
        with the array API and the backend's :class:`Transforms`; a backend may compile the
        whole call (JAX does), so ``fn`` must be a pure function of its arguments and the
        same object across calls.
        """
        raise NotImplementedError

"""The JAX backend: arrays, and derivatives by jax.jvp / jax.grad / jax.linearize, jitted.

The pieces: :mod:`._kernel` (Hessian products in every mode), :mod:`._transforms` (function
transforms for the functional helpers), :mod:`._ggn` (Gauss-Newton products), :mod:`._kfac`
(the layers of a traced model, for Kronecker factors),
:mod:`._distributed` (batches sharded over a device mesh) and :mod:`._dependence` (data
flow in a jaxpr). JAX arrays are immutable, and JAX has no global random generator: the
state hooks of :class:`~hessop.backends._base.Backend` keep their defaults. float64 needs
``jax_enable_x64``; without it hessop raises instead of silently computing in float32.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..._errors import DeviceError, DTypeError
from .._base import Backend, KernelOptions

#: algorithm kernels compiled once per function (see Backend.jit)
_JITTED_KERNELS: dict[Any, Any] = {}


@functools.partial(jax.jit, static_argnums=1)
def _transposed(x: Any, dtype: Any) -> Any:
    return x.astype(dtype).T


class JaxBackend(Backend):
    name = "jax"
    xp = jnp
    differentiable = True
    auto_mode = "forward-over-reverse"  # with the linearization reused across products
    auto_compiled_mode = "forward-over-reverse"
    # every product is jitted anyway: compile=True compiles them ahead of the first use
    compilable_modes = (
        "forward-over-reverse",
        "reverse-over-forward",
        "reverse-over-reverse",
        "dense",
        "finite-difference",
    )
    compiled_products_differentiable = True

    def owns(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Any:
        if dtype is not None:
            dtype = self.dtype(dtype)
        if isinstance(x, jax.Array) and (dtype is None or x.dtype == dtype):
            arr = x  # immutable: neither a conversion nor a copy is needed
        elif isinstance(x, np.ndarray):
            numeric = x.dtype.kind in "biuf"
            if numeric and x.ndim == 2 and x.flags.f_contiguous and not x.flags.c_contiguous:
                # A column-major block (the estimators' probes, drawn probe after probe):
                # its row-major transpose is copied as is and converted and transposed back
                # by one compiled kernel (int8 269k x 30 -> float32: 4.8 ms; converting it
                # into row-major order with numpy first: 21.7 ms)
                arr = jnp.array(x.T, copy=True)
                arr = _transposed(arr, arr.dtype if dtype is None else dtype)
            else:
                if dtype is not None and numeric:
                    # numpy converts into row-major order faster than jnp.array does
                    x = np.asarray(x, dtype=np.dtype(dtype), order="C")
                # A copy: on CPU jnp.asarray may alias a numpy array the caller can mutate.
                arr = jnp.array(x, dtype=dtype, copy=True)
        else:
            arr = jnp.asarray(x, dtype=dtype)
        if device is None or (isinstance(device, jax.Device) and _only_on(arr, device)):
            return arr  # already there: skip device_put, which costs ~0.1 ms per leaf
        return jax.device_put(arr, device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def device_of(self, x: Any) -> Any:
        try:
            return x.device
        except (AttributeError, ValueError):  # sharded over several devices
            return None

    def check_argument(self, x: Any, what: str) -> None:
        # The loss is compiled with its arguments as inputs: every leaf must be an array.
        if not isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number, type(None))):
            raise TypeError(
                f"{what} is a {type(x).__name__}; JAX compiles the loss with its arguments as "
                "arrays, so they must be arrays or numbers: bind other values in a closure "
                "(functools.partial(f, value=...))"
            )

    def check_device(self, x: Any, device: Any, what: str) -> None:
        # A data-parallel operator lives on a replicated sharding (hessop.distributed); an
        # array on some of its devices is fine: the operator replicates it before use.
        if isinstance(device, jax.sharding.Sharding) and isinstance(x, jax.Array):
            try:
                placed = x.sharding.device_set
            except AttributeError:  # a tracer (inside jit or grad): placement is not known
                return
            if placed <= device.device_set:
                return
        super().check_device(x, device, what)

    def default_device(self) -> Any:
        return jax.devices()[0]

    def resolve_device(self, device: Any) -> Any:
        if isinstance(device, str):
            kind, _, index = device.partition(":")
            kind = {"cuda": "gpu"}.get(kind, kind)
            try:
                found = jax.devices(kind)
            except RuntimeError:
                found = []
            i = int(index or 0) if index.isdigit() or not index else -1
            if not 0 <= i < len(found):
                have = ", ".join(sorted({d.platform for d in jax.devices()}))
                raise DeviceError(
                    f"device={device!r}: JAX has no such device (available platforms: "
                    f"{have}); use one of jax.devices(), or install jax with GPU support"
                )
            return found[i]
        if not isinstance(device, (jax.Device, jax.sharding.Sharding)):
            raise DeviceError(
                f"device={device!r} is not a JAX device: pass a name ('cpu', 'gpu', 'gpu:1') "
                "or one of jax.devices()"
            )
        return device

    def dtype(self, dtype: Any) -> Any:
        native = jnp.dtype(dtype)
        if native.itemsize == 8 and native.kind in "fc" and not jax.config.jax_enable_x64:
            raise DTypeError(
                f"{native.name} in JAX needs 64-bit mode, which is off: call "
                "jax.config.update('jax_enable_x64', True) at startup (or set "
                "JAX_ENABLE_X64=1), or pass dtype='float32'. hessop does not silently "
                "downcast."
            )
        return native

    def dtype_name(self, dtype: Any) -> str:
        return jnp.dtype(dtype).name

    def stop_gradient(self, x: Any) -> Any:
        # Only a tracer carries gradients; a concrete array is immutable and, when it came
        # from numpy, already a copy (asarray): no per-leaf dispatch or copy per operator.
        return jax.lax.stop_gradient(x) if isinstance(x, jax.core.Tracer) else x

    def jit(self, fn: Any, device: Any, donate: tuple[int, ...] = ()) -> Any:
        jitted = _JITTED_KERNELS.get((fn, donate))
        if jitted is None:
            donated = tuple(i + 1 for i in donate)  # argument 0 is the namespace
            jitted = jax.jit(fn, static_argnums=0, donate_argnums=donated)
            _JITTED_KERNELS[(fn, donate)] = jitted

        def call(*args: Any) -> Any:
            # Commit every array to the operator's device: a mix of committed and
            # uncommitted arguments would compile the kernel a second time.
            if device is not None:
                args = tuple(_committed(a, device) for a in args)
            return jitted(jnp, *args)

        return call

    def is_tracer(self, x: Any) -> bool:
        return isinstance(x, jax.core.Tracer)

    # --- automatic differentiation --------------------------------------------------------
    def use_compilation_cache(self, folder: Any) -> bool:
        from jax.experimental.compilation_cache import compilation_cache

        # every compiled function, however quick to compile: hessop's products compile in
        # well under the default threshold of 1 s each, yet add up to seconds per loss
        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        compilation_cache.reset_cache()  # takes effect even after earlier compilations
        return True

    def hessian_kernel(self, loss: Any, mode: str, options: KernelOptions) -> Any:
        from ._kernel import JaxHessianKernel

        return JaxHessianKernel(loss, mode, options)

    @property
    def transforms(self) -> Any:
        from ._transforms import JaxTransforms

        return JaxTransforms(self)

    def reducer(self, process_group: Any) -> Any:
        from ._distributed import MeshReducer

        return MeshReducer(process_group)

    def ggn_kernel(self, model: Any, loss: Any, options: KernelOptions) -> Any:
        from ._ggn import JaxGGNKernel

        return JaxGGNKernel(model, loss, options)

    def kfac_capture(self, model: Any, spec: Any, example: Any) -> Any:
        from ._kfac import JaxLayerCapture

        return JaxLayerCapture(model, spec, example)


def _committed(x: Any, device: Any) -> Any:
    """``x`` committed to ``device`` (``device_put`` costs ~0.1 ms: only when needed)."""
    if not isinstance(x, jax.Array):
        return x
    if getattr(x, "_committed", False) and _only_on(x, device):
        return x
    return jax.device_put(x, device)


def _only_on(x: Any, device: Any) -> bool:
    try:
        return x.devices() == {device}
    except (AttributeError, ValueError):  # a tracer, or not a jax.Array
        return False


BACKEND = JaxBackend()

"""The PyTorch backend: tensors, torch's global state, and derivatives by torch.autograd
and torch.func.

The pieces: :mod:`._context` (the settings every computation runs under, thread-safe),
:mod:`._kernel` (Hessian products in every mode), :mod:`._compile` (``compile=True``),
:mod:`._transforms` (function transforms for the functional helpers), :mod:`._module`
(``nn.Module`` models), :mod:`._ggn` (Gauss-Newton products), :mod:`._kfac` (layer
inputs and output gradients for Kronecker factors), :mod:`._distributed`
(``torch.distributed`` reduction) and :mod:`._norms` (normalization layers in elementary
ops, where torch.func's second-order rules are wrong).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import array_api_compat.torch as xp_torch
import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor

from ..._errors import DeviceError, LossError
from .._base import Backend

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "bool": torch.bool,
}


def bit_sum(x: torch.Tensor) -> int:
    """The sum of a tensor's contents read as 64-bit integers (wrapping): exact,
    independent of the summation order, and changed by any change of a single element."""
    t = x.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.view(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes % 8 == 0 and flat.data_ptr() % 8 == 0:
        return int(flat.view(torch.int64).sum()) if nbytes else 0
    raw = flat.view(torch.uint8)  # odd sizes and unaligned views: 8-byte words, then bytes
    n8 = nbytes // 8 * 8
    head = int(raw[:n8].view(torch.int32).to(torch.int64).sum()) if n8 else 0
    return head + 257 * int(raw[n8:].to(torch.int64).sum())


class TorchBackend(Backend):
    name = "torch"
    xp = xp_torch
    differentiable = True
    auto_mode = "reverse-over-reverse"  # every op has a double backward, not all a jvp
    auto_compiled_mode = "reverse-over-forward"  # as fast as fwd-rev and quicker to compile
    compilable_modes = ("forward-over-reverse", "reverse-over-forward")  # the torch.func ones

    # --- arrays ---------------------------------------------------------------------------
    def owns(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any, dtype: Any = None, device: Any = None) -> Any:
        if isinstance(x, torch.Tensor):
            dtype = self.dtype(dtype) if dtype is not None else x.dtype
            if x.dtype == dtype and (device is None or x.device == device):
                return x  # already there (the common case: no dispatch)
            return x.to(dtype=dtype, device=device or x.device)
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            x = x.copy()  # torch warns on read-only buffers (e.g. from JAX)
        dtype = self.dtype(dtype) if dtype is not None else None
        # hessop's own copy must be differentiable, also when made under inference mode
        with torch.inference_mode(False):
            if isinstance(x, np.ndarray) and x.dtype.isnative and x.dtype.kind in "biuf":
                try:  # shares the buffer as as_tensor does; a conversion keeps the strides
                    # and runs as one torch kernel (int8 -> float32 of 8M numbers: 5 ms;
                    # as_tensor: 32 ms)
                    return torch.from_numpy(x).to(dtype=dtype, device=device)
                except (TypeError, ValueError):  # negative strides, unsupported dtypes
                    pass
            return torch.as_tensor(x, dtype=dtype, device=device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    def device_of(self, x: Any) -> Any:
        return x.device

    def default_device(self) -> Any:
        return self.resolve_device("cuda" if torch.cuda.is_available() else "cpu")

    def resolve_device(self, device: Any) -> Any:
        if isinstance(device, str) and device.split(":")[0] == "gpu":
            device = "cuda" + device[3:]
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise DeviceError(
                f"unknown torch device {device!r} ({err}); use 'cpu' or 'cuda'"
            ) from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(
                    f"device={str(device)!r} asks for CUDA, but torch sees no CUDA device "
                    "(torch.cuda.is_available() is False); use device='cpu', or install a "
                    "CUDA build of torch on a machine with a GPU"
                )
            if device.index is None:  # tensors report "cuda:0": pin the index
                device = torch.device("cuda", torch.cuda.current_device())
            elif device.index >= torch.cuda.device_count():
                raise DeviceError(
                    f"device={str(device)!r}: there are only {torch.cuda.device_count()} CUDA "
                    "devices"
                )
        return device

    def dtype(self, dtype: Any) -> Any:
        if isinstance(dtype, torch.dtype):
            return dtype
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        try:
            return _DTYPES[name]
        except KeyError:
            raise TypeError(f"unsupported dtype {dtype!r} for torch") from None

    def check_argument(self, x: Any, what: str) -> None:
        if isinstance(x, torch.Tensor) and x.is_inference():
            raise TypeError(
                f"{what} is an inference tensor (made under torch.inference_mode()), which "
                "autograd cannot differentiate through; make it outside inference mode (or "
                "pass x.clone() taken outside it)"
            )

    def stop_gradient(self, x: Any) -> Any:
        # No copy (a copy of the parameters would cost their memory): the operator watches
        # the tensor's contents instead (hessop._state).
        return x.detach()

    # --- state ----------------------------------------------------------------------------
    def fingerprint(self, x: Any) -> Any:
        if self.is_tracer(x) or x.is_meta:
            return None
        return bit_sum(x)

    def memory_key(self, x: Any) -> Any:
        if self.is_tracer(x) or x.is_meta:
            return None
        return (x.data_ptr(), x.dtype, tuple(x.shape), x.stride(), x.device)

    def is_tracer(self, x: Any) -> bool:
        return bool(_is_wrapped(x)) or isinstance(x, _FakeTensor)

    def watch_object(self, watch: Any, obj: Any, label: str) -> bool:
        if not isinstance(obj, torch.nn.Module):
            return False
        for name, p in obj.named_parameters():
            owner, _, leaf = name.rpartition(".")
            mod = obj.get_submodule(owner) if owner else obj
            watch.add_binding(
                f"parameter {name!r} of {label}",
                lambda m=mod, n=leaf: m._parameters.get(n),
                p,
                refresh=False,
            )
        for name, b in obj.named_buffers():
            owner, _, leaf = name.rpartition(".")
            mod = obj.get_submodule(owner) if owner else obj
            watch.add_binding(
                f"buffer {name!r} of {label}", lambda m=mod, n=leaf: m._buffers.get(n), b
            )
        watch.add_flags(
            f"the train/eval mode of {label}", lambda: tuple(m.training for m in obj.modules())
        )
        return True

    def rng_state(self) -> Any:
        states = [torch.default_generator.get_state()]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states += [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return states

    def rng_moved(self, state: Any) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(state, self.rng_state()))

    def restore_rng_state(self, state: Any) -> None:
        torch.default_generator.set_state(state[0])
        for i, s in enumerate(state[1:]):
            torch.cuda.set_rng_state(s, i)

    @contextlib.contextmanager
    def rng_scope(self, device: Any = None, seed: int | None = None) -> Iterator[None]:
        # fork_rng forks every visible CUDA device by default (and warns when there are
        # many); only the operator's own accelerator can be touched by its computations.
        kind = getattr(device, "type", str(device).split(":")[0]) if device is not None else "cpu"
        devices = [] if kind == "cpu" else [device]
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.default_generator.manual_seed(int(seed))
                for dev in devices:
                    with torch.cuda.device(dev):
                        torch.cuda.manual_seed(int(seed))
            yield

    def first_call_checks(self) -> Any:
        return _NoPythonNumbers()

    # --- automatic differentiation --------------------------------------------------------
    def use_compilation_cache(self, folder: Any) -> bool:
        from ._compile import use_compilation_cache

        return use_compilation_cache(folder)

    def hessian_kernel(self, loss: Any, mode: str, options: Any) -> Any:
        if options.compile:
            from ._compile import CompiledKernel

            return CompiledKernel(loss, mode, options)
        from ._kernel import TorchHessianKernel

        return TorchHessianKernel(loss, mode, options)

    @property
    def transforms(self) -> Any:
        from ._transforms import TorchTransforms

        return TorchTransforms(self)

    def reducer(self, process_group: Any) -> Any:
        from ._distributed import TorchReducer

        return TorchReducer(process_group)

    def module_model(self, model: Any, loss_fn: Any, **options: Any) -> Any:
        if not isinstance(model, torch.nn.Module):
            return None
        from ._module import TorchModuleModel

        return TorchModuleModel(self, model, loss_fn, **options)

    def module_groups(self, model: Any, names: list[str]) -> dict[str, list[str]] | None:
        if not isinstance(model, torch.nn.Module):
            return None
        from ._module import module_groups

        return module_groups(model, names)

    def ggn_kernel(self, model: Any, loss: Any, options: Any) -> Any:
        from ._ggn import TorchGGNKernel

        return TorchGGNKernel(model, loss, options)

    def kfac_capture(self, model: Any, spec: Any, example: Any) -> Any:
        from ._kfac import TorchLayerCapture

        return TorchLayerCapture(model, spec, example)

    def loss_likelihood(self, loss_fn: Any) -> str | None:
        nn, F = torch.nn, torch.nn.functional
        for cls, fn, name in (
            (nn.CrossEntropyLoss, F.cross_entropy, "categorical"),
            (nn.MSELoss, F.mse_loss, "gaussian"),
            (nn.BCEWithLogitsLoss, F.binary_cross_entropy_with_logits, "bernoulli"),
        ):
            if isinstance(loss_fn, cls) or loss_fn is fn:
                return name
        return None


def _differentiated(t: Any) -> bool:
    """Whether autograd or a torch.func transform is differentiating ``t``."""
    if not isinstance(t, torch.Tensor):
        return False
    return t.requires_grad or bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


class _NoPythonNumbers(torch.overrides.TorchFunctionMode):
    """Refuse Python numbers taken out of tensors being differentiated (first calls only)."""

    _METHODS = frozenset(
        {
            torch.Tensor.item,
            torch.Tensor.tolist,
            torch.Tensor.numpy,
            torch.Tensor.__float__,
            torch.Tensor.__int__,
        }
    )

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        if func in self._METHODS and args and _differentiated(args[0]):
            raise LossError(
                f"the loss calls {func.__name__}() on a tensor that depends on the "
                "parameters: the Python number it returns is a constant to autograd, so the "
                "derivatives would silently miss its dependence. Keep the computation in "
                "tensors (use the tensor itself instead of its .item())"
            )
        return func(*args, **(kwargs or {}))


BACKEND = TorchBackend()

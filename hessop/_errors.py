"""The few exception types hessop raises, each with a message that names the fix."""

from __future__ import annotations


class HessopError(Exception):
    """Base class of every exception raised by hessop."""


class BackendNotAvailableError(HessopError, ImportError):
    """A backend was requested whose framework is not installed."""


class UnknownOptionError(HessopError, ValueError):
    """An unknown backend, mode or method name; the message lists the valid ones."""


class ShapeError(HessopError, ValueError):
    """A vector, matrix or pytree does not match the operator."""


class DTypeError(HessopError, TypeError):
    """An integer, complex or otherwise unusable dtype."""


class DeviceError(HessopError, ValueError):
    """An array lives on a different device than the operator."""


class LossError(HessopError, ValueError):
    """The loss function does not return a real scalar."""


class ForwardModeUnsupportedError(HessopError, RuntimeError):
    """An operation in the loss has no forward-mode derivative."""


class EmptyDataError(HessopError, ValueError):
    """``data=`` yielded no batch."""


class RandomnessError(HessopError, ValueError):
    """The loss draws random numbers (dropout in training mode), so it has no Hessian."""


class StaleOperatorError(HessopError, RuntimeError):
    """The parameters an operator was built at were changed in place (an optimizer step)."""


class DistributedError(HessopError, RuntimeError):
    """``distributed=True`` without a usable process group, or ranks that disagree."""


class UnsupportedLayerError(HessopError, ValueError):
    """A parameter belongs to no layer that Kronecker factors support (``hessop.model_kfac``)."""


class NonFiniteError(HessopError, FloatingPointError):
    """An input, a product or a gradient holds NaN or infinity, so no result can be trusted."""


def unknown(kind: str, value: object, valid: list[str] | tuple[str, ...]) -> UnknownOptionError:
    """Build the error for an unknown option, listing the valid choices."""
    choices = ", ".join(repr(v) for v in valid)
    return UnknownOptionError(f"unknown {kind} {value!r}; valid {kind}s are: {choices}")

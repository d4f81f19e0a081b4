"""The user's loss as hessop evaluates it: a function of the parameter leaves, checked.

:class:`Loss` turns ``f(params, *args)`` into ``loss(leaves, args)`` for the backends'
kernels, and checks what a kernel cannot: that ``f`` returns a real scalar array (not a
Python number, which cannot be differentiated), and, on its first evaluations, that it
draws no random numbers and takes no Python numbers out of arrays it differentiates
(``.item()``). Random losses are refused, or made deterministic with
``allow_randomness="fixed-seed"``: each evaluation then runs with the global generators
seeded (and restored afterwards), so every product sees the same draws.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from . import _checks, _pytree, _rng
from ._errors import DTypeError, LossError, RandomnessError, unknown
from ._sharing import SharedFunctions

#: values of ``allow_randomness``
RANDOMNESS_OPTIONS = (None, "fixed-seed")
#: evaluations checked for randomness and ``.item()``: a loss does either every time
_CHECKED_CALLS = 2
#: checked evaluations so far, by loss and state (see Loss.skip_checks_if_seen): a counter
#: per key, for the few most recent keys (each key holds the objects its ids name)
_CHECKED = SharedFunctions(maxsize=64)


def randomness_message(what: str) -> str:
    return (
        f"the loss is random: {what}. Each product would differentiate a different function, "
        "so the operator would not be a fixed matrix. Fix: call model.eval() (to "
        "differentiate the deterministic network), or pass allow_randomness='fixed-seed' to "
        "draw the same random numbers (the same dropout mask) in every evaluation, from a "
        "fixed local seed (seed=...)."
    )


class Loss:
    """``f(params, *args)`` as ``loss(leaves, args)`` for one parameter layout.

    Parameters
    ----------
    f : callable
        The user's function.
    spec : TreeSpec
        The layout of the parameters (``leaves`` are rebuilt into that pytree).
    backend : Backend
        The framework (for its random state and first-call checks).
    allow_randomness : {None, "fixed-seed"}
        None refuses a loss that draws random numbers; "fixed-seed" seeds the global
        generators with ``seed`` for every evaluation (restoring them afterwards).
    device :
        The device whose generator is preserved besides the CPU's.
    what : str
        How error messages name ``f``.
    key : hashable, optional
        What identifies the function when operators share compilations; default ``f``.
        Model adapters build a new ``f`` per operator and pass the model and loss instead.
    checks_key : hashable, optional
        What identifies the function's behaviour for :meth:`skip_checks_if_seen`; default
        ``key``. A module adapter passes its model's identity and structure here, but no
        ``key``: a compilation must not outlive the adapter's tensors, a passed check may.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        spec: _pytree.TreeSpec,
        backend: Any,
        *,
        allow_randomness: str | None = None,
        seed: int = 0,
        device: Any = None,
        what: str = "the loss",
        key: Any = None,
        checks_key: Any = None,
    ) -> None:
        if allow_randomness not in RANDOMNESS_OPTIONS:
            raise unknown("allow_randomness option", allow_randomness, ["fixed-seed"])
        self.f, self.spec, self.backend = f, spec, backend
        seed = _checks.integer(seed, "seed")
        self.seed = seed if allow_randomness == "fixed-seed" else None
        self.device, self.what = device, what
        #: what identifies the function for sharing compilations (default: ``f`` itself)
        self.key = f if key is None else key
        self.checks_key = self.key if checks_key is None else checks_key
        self._unchecked = 0 if self.seed is not None else _CHECKED_CALLS
        #: False inside compiled code, where nothing but the function itself may run
        self.checks = True
        self._seen_key: Any = None

    def skip_checks_if_seen(self, key: Any) -> None:
        """Operators of the same loss in the same state (``key``) check it once: the first
        evaluations of a later one are not checked again (a Newton loop builds an operator
        per step)."""
        self._seen_key = key
        if key is not None and _CHECKED.get(key, lambda: [0])[0] >= _CHECKED_CALLS:
            self._unchecked = 0

    def __call__(self, leaves: Any, args: tuple[Any, ...]) -> Any:
        tree = _pytree.unflatten(self.spec, list(leaves))
        if self.seed is not None and self.checks:
            with _rng.preserve(self.backend, self.device, self.seed):
                return self.check_output(self.f(tree, *args))
        if self._unchecked > 0 and self.checks:
            self._unchecked -= 1
            out = self._checked_call(tree, args)
            if self._seen_key is not None:
                _CHECKED.get(self._seen_key, lambda: [0])[0] += 1
            return out
        return self.check_output(self.f(tree, *args))

    def _checked_call(self, tree: Any, args: tuple[Any, ...]) -> Any:
        states = _rng.capture(self.backend)
        try:
            with self.backend.first_call_checks():
                out = self.f(tree, *args)
        finally:
            moved = _rng.moved(self.backend, states)
            _rng.restore(self.backend, states)
        if moved:
            raise RandomnessError(
                randomness_message(
                    f"{self.what} drew from the global random generator ({moved}), e.g. "
                    "torch.randn, F.dropout(..., training=True) or np.random inside it"
                )
            )
        return self.check_output(out)

    def check_output(self, out: Any) -> Any:
        """Raise :class:`~hessop.LossError` unless ``out`` is a real scalar array."""
        return check_scalar(out, self.what, self.backend)

    def independent_error(self) -> LossError:
        """The error for a loss that does not depend on the parameters at all."""
        return LossError(
            f"{self.what} does not depend on the parameters: its gradient and Hessian are "
            "zero. hessop differentiates with respect to the params it passes to f (f(params, "
            "*args)); a function that ignores them, e.g. reading a model's own weights or "
            "turning them into Python numbers (.item(), float(), np.asarray), has nothing to "
            "differentiate. Compute the loss from the params argument"
        )


def check_scalar(out: Any, what: str, backend: Any) -> Any:
    """``out`` if it is a real floating scalar array; else a :class:`~hessop.LossError`
    (or :class:`~hessop.DTypeError`) naming ``what`` returned it."""
    if isinstance(out, numbers.Number) and not _pytree.is_array(out):
        raise LossError(
            f"{what} returned a Python {type(out).__name__}, which cannot be "
            "differentiated: return the array itself (no .item() or float()), computed "
            "from the params hessop passes"
        )
    if not _pytree.is_array(out):
        raise LossError(
            f"{what} must return a scalar array, got {type(out).__name__}; return "
            "one loss value (for several outputs see hessop.jacobian)"
        )
    if not backend.owns(out):
        got = type(out).__module__.split(".")[0] + "." + type(out).__name__
        raise LossError(
            f"{what} returned a {got}, not a {backend.name} array: it was not computed from "
            f"the params hessop passes, so it cannot be differentiated; compute the loss "
            f"with {backend.name} operations on them"
        )
    shape = tuple(out.shape)
    if shape != ():
        raise LossError(
            f"{what} must return a scalar, but it returned shape {shape}; reduce it "
            "with .mean() or .sum() (for one Hessian per output of a vector-valued function "
            "use hessop.output_hessians, for its Jacobian hessop.jacobian or "
            "hessop.jacobian_operator; for per-sample quantities see "
            "hessop.per_sample_hessians)"
        )
    dtype = str(out.dtype)
    if "complex" in dtype:
        raise LossError(
            f"{what} must return a real scalar, but it returned a complex one; return "
            "its real part or its absolute value (e.g. abs(z) ** 2)"
        )
    if not backend.is_floating(out.dtype):
        raise DTypeError(
            f"{what} must return a floating point scalar, got dtype {dtype}; compute "
            "it in float32 or float64"
        )
    return out

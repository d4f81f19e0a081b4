"""The torch settings every hessop computation runs under, safe under threads.

* Grad mode on (thread-local in torch).
* The math attention kernel and the multi-head-attention fast path off: the fused kernels
  have no forward-mode or double-backward derivatives. Both switches are **process-wide**
  in torch, so they are reference-counted here: the first computation to enter saves the
  user's settings and turns them off, the last one to leave puts them back. While any
  hessop computation runs, attention elsewhere in the process uses the math kernel (same
  numbers, slower); afterwards every setting is as the user left it, whatever the
  interleaving of threads.
* Forward-mode AD (``torch.func.jvp``) keeps its state process-wide in torch, and two
  threads in forward mode at once fail inside torch ("no level exists"). Forward-mode
  computations therefore hold :data:`FORWARD_AD_LOCK`: they run one at a time, each
  correct. Reverse-over-reverse (the default mode) needs no lock and runs in parallel.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ..._errors import ForwardModeUnsupportedError, LossError, RandomnessError

#: serializes torch's process-wide forward-mode AD state (see the module docstring)
FORWARD_AD_LOCK = threading.RLock()

_flags_lock = threading.Lock()
_flags_depth = 0
_saved: dict[str, Any] = {}


def _sdpa_flags() -> dict[str, bool]:
    b = torch.backends.cuda
    return {
        "flash": b.flash_sdp_enabled(),
        "mem_efficient": b.mem_efficient_sdp_enabled(),
        "math": b.math_sdp_enabled(),
        "cudnn": b.cudnn_sdp_enabled(),
    }


def _set_sdpa_flags(flags: dict[str, bool]) -> None:
    b = torch.backends.cuda
    b.enable_flash_sdp(flags["flash"])
    b.enable_mem_efficient_sdp(flags["mem_efficient"])
    b.enable_math_sdp(flags["math"])
    b.enable_cudnn_sdp(flags["cudnn"])


def _enter_global() -> None:
    global _flags_depth
    with _flags_lock:
        if _flags_depth == 0:
            _saved["fastpath"] = torch.backends.mha.get_fastpath_enabled()
            _saved["sdpa"] = _sdpa_flags()
            torch.backends.mha.set_fastpath_enabled(False)
            _set_sdpa_flags({"flash": False, "mem_efficient": False, "math": True, "cudnn": False})
        _flags_depth += 1


def _leave_global() -> None:
    global _flags_depth
    with _flags_lock:
        _flags_depth -= 1
        if _flags_depth == 0:
            torch.backends.mha.set_fastpath_enabled(_saved["fastpath"])
            _set_sdpa_flags(_saved["sdpa"])


@contextlib.contextmanager
def autodiff_context(mode: str | None = None, grad: bool | None = True) -> Iterator[None]:
    """Grad mode on (``grad=None``: the caller's), math attention, MHA fast path off; with
    a ``mode``, the normalization layers whose second-order rules are wrong in that mode
    computed from elementary ops (:mod:`hessop.backends.torch._norms`). Forward modes hold
    :data:`FORWARD_AD_LOCK`."""
    from ._norms import CompositeNorms, for_mode

    kinds = for_mode(mode) if mode is not None else frozenset()
    norms = CompositeNorms(kinds) if kinds else contextlib.nullcontext()
    forward = mode in ("forward-over-reverse", "reverse-over-forward", "dense")
    lock = FORWARD_AD_LOCK if forward else contextlib.nullcontext()
    grad_mode = torch.enable_grad() if grad else contextlib.nullcontext()
    # Inference mode turns autograd off below grad mode: enable_grad alone does not undo it.
    inference = torch.inference_mode(False) if grad else contextlib.nullcontext()
    with lock:
        _enter_global()
        try:
            with inference, grad_mode, norms:
                yield
        finally:
            _leave_global()


_FORWARD = re.compile(r"forward AD|forward-mode|forward mode|jvp|dual", re.IGNORECASE)
_ITEM = re.compile(r"\.item\(\)|data-dependent|Cannot access data pointer|storage", re.I)


def translate_error(err: Exception, mode: str) -> Exception:
    """The hessop error for a torch error raised while differentiating the loss."""
    msg = str(err)
    first = (msg.strip().splitlines() or [""])[0]
    if "vmap" in msg and "randomness" in msg:
        return RandomnessError(
            "the function draws random numbers (dropout in training mode, torch.randn, ...) "
            f"inside a vmap-batched computation ({first}), so it is not one fixed function "
            "to differentiate; make it deterministic (model.eval()), or draw the random "
            "numbers outside it and pass them in as an argument"
        )
    if _ITEM.search(msg) and "item" in msg:
        return LossError(
            f"the loss takes a Python number out of a tensor (.item(), float(), .tolist() or "
            f"numpy()), which torch cannot differentiate through ({first}); keep the "
            "computation in tensors"
        )
    if _FORWARD.search(msg) and mode in ("forward-over-reverse", "reverse-over-forward", "dense"):
        return ForwardModeUnsupportedError(
            f"mode={mode!r} needs forward-mode AD, which an operation in the loss does not "
            f"support ({first}); use mode='reverse-over-reverse' (or mode='auto', which uses "
            "it)"
        )
    return err

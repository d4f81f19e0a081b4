"""Keep the global random number generators out of reach of the user's loss and data.

hessop evaluates the user's loss (and iterates the user's data) many times. Either may draw
from a global generator: dropout draws from torch's, a shuffling ``DataLoader`` draws its
permutation seed from torch's, a dataset may augment with numpy's or Python's. :func:`preserve`
snapshots numpy's, Python's and the framework's global generators (the CPU's and the
operator's accelerator's) and puts them back on exit, so that no hessop call advances them.
With a ``seed`` it seeds them on entry, so that every evaluation draws the same numbers
(``allow_randomness="fixed-seed"``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


@contextlib.contextmanager
def preserve(backend: Any = None, device: Any = None, seed: int | None = None) -> Iterator[None]:
    """Restore numpy's, Python's and ``backend``'s global RNG states on exit.

    Examples
    --------
    >>> import numpy as np
    >>> before = np.random.get_state()[1].copy()
    >>> with preserve():
    ...     _ = np.random.standard_normal(3)
    >>> bool((np.random.get_state()[1] == before).all())
    True
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    scope = backend.rng_scope(device, seed) if backend is not None else contextlib.nullcontext()
    try:
        with scope:
            if seed is not None:
                np.random.seed(int(seed) % 2**32)
                random.seed(int(seed))
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def capture(backend: Any) -> tuple[Any, Any, Any]:
    """The global RNG states: numpy's, Python's and the framework's."""
    return np.random.get_state(), random.getstate(), backend.rng_state()


def restore(backend: Any, states: tuple[Any, Any, Any]) -> None:
    np.random.set_state(states[0])
    random.setstate(states[1])
    backend.restore_rng_state(states[2])


def moved(backend: Any, states: tuple[Any, Any, Any]) -> str:
    """Which generators moved since :func:`capture` ("" when none did)."""
    out = []
    now = np.random.get_state()
    if now[2] != states[0][2] or not np.array_equal(now[1], states[0][1]):
        out.append("numpy's")
    if random.getstate() != states[1]:
        out.append("Python's")
    if backend.rng_moved(states[2]):
        out.append(f"{backend.name}'s")
    return " and ".join(out)


@contextlib.contextmanager
def refuse_draws(backend: Any, error: Callable[[str], Exception]) -> Iterator[None]:
    """Raise ``error(which)`` after the block if it drew from a global generator (``which``
    names them, as :func:`moved` does), having put the generators back.

    Examples
    --------
    >>> import numpy as np
    >>> from hessop.backends import get_backend
    >>> with refuse_draws(get_backend("numpy"), RuntimeError):
    ...     _ = np.random.standard_normal(2)
    Traceback (most recent call last):
    ...
    RuntimeError: numpy's
    """
    states = capture(backend)
    which = ""
    try:
        yield
    finally:
        which = moved(backend, states)
        if which:
            restore(backend, states)
    if which:
        raise error(which)

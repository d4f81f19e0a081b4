"""Compiled functions shared between operators of the same loss.

Compiling (``jax.jit``, ``torch.compile``) costs far more than a product, and a Newton loop
or a training loop builds a new operator at every step. Operators of the same loss therefore
share their compiled functions, found under a key that names everything the compilation
depends on: the loss function, the parameter layout, the mode, and the values the loss
reads from outside its arguments (see :mod:`hessop._state`), so that a loss whose
closed-over data changed never reuses a stale compilation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class ShareKey:
    """A key for :class:`SharedFunctions`: hashable ``parts``, plus the objects whose
    identity (``id``) the parts use, held so that their ids cannot be reused while an
    entry under this key lives."""

    __slots__ = ("parts", "keep")

    def __init__(self, parts: Hashable, keep: tuple[Any, ...] = ()) -> None:
        self.parts, self.keep = parts, keep

    def __hash__(self) -> int:
        return hash(self.parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShareKey) and self.parts == other.parts


class SharedFunctions:
    """A small least-recently-used map ``key -> built object``, safe to use from threads.

    ``get(key, build)`` returns the entry for ``key``, building it with ``build()`` on a
    miss. ``None`` (an operator that shares nothing) and an unhashable key (a callable
    that defines ``__eq__`` but no ``__hash__``) are never shared: ``build()`` runs for that
    caller alone.

    Examples
    --------
    >>> shared = SharedFunctions(maxsize=2)
    >>> shared.get("a", lambda: [1]) is shared.get("a", lambda: [2])
    True
    >>> shared.get(None, lambda: [1]) is shared.get(None, lambda: [1])
    False
    """

    def __init__(self, maxsize: int = 16) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable | None, build: Callable[[], Any]) -> Any:
        if key is None:
            return build()
        try:
            hash(key)
        except TypeError:
            return build()
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)  # most recently used last
                return self._entries[key]
        value = build()  # outside the lock: compiling may take long
        with self._lock:
            self._entries[key] = value
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return value

    def alias(self, key: Hashable, value: Any) -> None:
        """Make ``value`` also the entry for ``key`` (an operator's loss changed what it
        reads during its own evaluation: a later operator in that state may reuse it)."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

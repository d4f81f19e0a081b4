"""Ravel and unravel parameter pytrees, with one flat layout for every backend.

A pytree is an array (a leaf), or a ``dict``, ``list`` or ``tuple`` (named tuples too)
whose values are pytrees. The flat layout is depth-first: **dict entries in insertion
order** (the order of ``model.named_parameters()``), list and tuple entries in order, each
leaf raveled in row-major (C) order. The layout never depends on the framework: JAX's own
``tree_flatten`` sorts dict keys and torch's pytree does not, so hessop uses neither, and
entry ``i`` of ``H @ v`` means the same parameter under every backend.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ._errors import ShapeError

_CONTAINERS = (dict, list, tuple)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


@dataclass(frozen=True)
class _Node:
    """Structure of one container: its type, keys (for dicts) and children."""

    kind: type
    keys: tuple[Any, ...]
    children: tuple[Any, ...]  # _Node or None (None marks a leaf)


@dataclass(frozen=True)
class TreeSpec:
    """The structure of a pytree plus the shape of each leaf: enough to rebuild it.

    Examples
    --------
    >>> import numpy as np
    >>> leaves, spec = flatten({"w": np.zeros((2, 3)), "b": np.zeros(3)})
    >>> spec.shapes, spec.size
    (((2, 3), (3,)), 9)
    """

    root: _Node | None  # None: the tree is a single leaf
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def num_leaves(self) -> int:
        return len(self.shapes)

    def describe(self) -> str:
        """A short human-readable description, used in error messages."""
        return f"pytree with {self.num_leaves} leaves of shapes {list(self.shapes)}"


def _flatten(tree: Any, leaves: list) -> _Node | None:
    if isinstance(tree, dict):
        keys = tuple(tree.keys())
        kind = type(tree) if type(tree) in (dict, OrderedDict) else dict
        return _Node(kind, keys, tuple(_flatten(tree[k], leaves) for k in keys))
    if isinstance(tree, (list, tuple)):
        kind = type(tree) if (_is_namedtuple(tree) or type(tree) in (list, tuple)) else tuple
        return _Node(kind, (), tuple(_flatten(c, leaves) for c in tree))
    if tree is None:
        raise ShapeError("pytree leaves must be arrays, got None")
    leaves.append(tree)
    return None


def flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """Flatten a pytree into its leaves (in hessop's order) and a :class:`TreeSpec`.

    Examples
    --------
    >>> import numpy as np
    >>> leaves, spec = flatten({"b": [np.ones(2), np.float64(3.0)], "a": np.zeros(1)})
    >>> [np.shape(x) for x in leaves]   # insertion order, not sorted: "b" comes first
    [(2,), (), (1,)]
    """
    leaves: list[Any] = []
    root = _flatten(tree, leaves)
    if not leaves:
        raise ShapeError("the parameter pytree has no array leaves")
    shapes = tuple(tuple(int(n) for n in getattr(x, "shape", ())) for x in leaves)
    return leaves, TreeSpec(root if isinstance(root, _Node) else None, shapes)


def _unflatten(node: _Node | None, it) -> Any:
    if node is None:
        return next(it)
    children = [_unflatten(c, it) for c in node.children]
    if issubclass(node.kind, dict):
        return node.kind(zip(node.keys, children))
    if _is_namedtuple_type(node.kind):
        return node.kind(*children)
    return node.kind(children)


def _is_namedtuple_type(kind: type) -> bool:
    return issubclass(kind, tuple) and hasattr(kind, "_fields")


def unflatten(spec: TreeSpec, leaves: list[Any]) -> Any:
    """Rebuild the pytree described by ``spec`` from its leaves (inverse of :func:`flatten`)."""
    if len(leaves) != spec.num_leaves:
        raise ShapeError(f"expected {spec.num_leaves} leaves, got {len(leaves)}")
    return _unflatten(spec.root, iter(leaves))


def same_structure(spec: TreeSpec, tree: Any) -> tuple[bool, list[Any]]:
    """Flatten ``tree`` and tell whether it has the structure and leaf shapes of ``spec``."""
    try:
        leaves, other = flatten(tree)
    except ShapeError:
        return False, []
    return other == spec, leaves


def ravel(xp: Any, spec: TreeSpec, leaves: list[Any]) -> Any:
    """Concatenate leaves into one flat vector with the array namespace ``xp``."""
    return xp.concat([xp.reshape(x, (-1,)) for x in leaves])


def unravel(xp: Any, spec: TreeSpec, flat: Any) -> list[Any]:
    """Split a flat vector into leaves of the shapes in ``spec`` (views where possible)."""
    out, start = [], 0
    for shape, n in zip(spec.shapes, spec.sizes):
        out.append(xp.reshape(flat[start : start + n], shape))
        start += n
    return out

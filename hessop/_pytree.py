"""Every walk over pytrees and flat layouts in hessop, with one layout for every backend.

A pytree is an array (a leaf), or a ``dict``, ``list`` or ``tuple`` (named tuples too)
whose values are pytrees. The flat layout is depth-first: **dict entries in insertion
order** (the order of ``model.named_parameters()``), list and tuple entries in order, each
leaf raveled in row-major (C) order. The layout never depends on the framework: JAX's own
``tree_flatten`` sorts dict keys and torch's pytree does not, so hessop uses neither, and
entry ``i`` of ``H @ v`` means the same parameter under every backend. A tree given back
to hessop (a vector to ravel) is matched to the parameters **by key**, so a dict whose
keys come in another order (every ``jax.tree`` result has sorted keys) means the same.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ShapeError


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array of some framework (it has a shape and a dtype)."""
    return hasattr(x, "shape") and hasattr(x, "dtype")


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
    >>> spec.shapes, spec.size, spec.paths
    (((2, 3), (3,)), 9, ("['w']", "['b']"))
    """

    root: _Node | None  # None: the tree is a single leaf
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        # Hashed whenever compiled functions are looked up: hash the nested nodes once.
        object.__setattr__(self, "_hash", hash((self.root, self.shapes)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def num_leaves(self) -> int:
        return len(self.shapes)

    @property
    def paths(self) -> tuple[str, ...]:
        """Where each leaf sits, as Python indexing (``"['w']"``, ``"[0]"``; ``""`` for a
        single array)."""
        out: list[str] = []
        _paths(self.root, "", out)
        return tuple(out)

    def describe(self) -> str:
        """A short human-readable description, used in error messages."""
        if self.root is None:
            return f"single array of shape {self.shapes[0]}"
        items = ", ".join(f"{p}: {s}" for p, s in zip(self.paths, self.shapes))
        return f"pytree with {self.num_leaves} leaves ({items})"


def key_paths(spec: TreeSpec) -> tuple[tuple[Any, ...], ...]:
    """The keys (dict keys and sequence indices) leading to each leaf, in layout order.

    >>> import numpy as np
    >>> _, spec = flatten({"w": [np.zeros(2), np.zeros(1)], "b": np.zeros(1)})
    >>> key_paths(spec)
    (('w', 0), ('w', 1), ('b',))
    """
    out: list[tuple[Any, ...]] = []

    def walk(node: _Node | None, prefix: tuple[Any, ...]) -> None:
        if node is None:
            out.append(prefix)
            return
        labels = node.keys if issubclass(node.kind, dict) else range(len(node.children))
        for label, child in zip(labels, node.children):
            walk(child, (*prefix, label))

    walk(spec.root, ())
    return tuple(out)


def _paths(node: _Node | None, prefix: str, out: list[str]) -> None:
    if node is None:
        out.append(prefix)
        return
    labels = node.keys if issubclass(node.kind, dict) else range(len(node.children))
    for label, child in zip(labels, node.children):
        _paths(child, f"{prefix}[{label!r}]", out)


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


def leaves_like(spec: TreeSpec, tree: Any, what: str = "the pytree") -> list[Any]:
    """The leaves of ``tree`` in ``spec``'s order, or a :class:`ShapeError` saying exactly
    where ``tree`` differs from the parameters.

    Dicts are matched by key, so their order does not matter; lists and tuples by position.

    Examples
    --------
    >>> import numpy as np
    >>> _, spec = flatten({"w": np.zeros(2), "b": np.zeros(1)})
    >>> [x.tolist() for x in leaves_like(spec, {"b": np.ones(1), "w": np.arange(2.0)})]
    [[0.0, 1.0], [1.0]]
    >>> leaves_like(spec, {"w": np.zeros(2), "c": np.zeros(1)})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hessop._errors.ShapeError: ... keys missing: ['b']; keys not in the parameters: ['c']
    """
    out: list[Any] = []
    _match(spec.root, tree, "", out, what)
    for path, x, shape in zip(spec.paths, out, spec.shapes):
        got = tuple(int(n) for n in getattr(x, "shape", ()))
        if got != shape:
            where = f"leaf {path}" if path else "the array"
            raise ShapeError(
                f"{what} does not match the parameters: {where} has shape {got}, expected {shape}"
            )
    return out


def _match(node: _Node | None, tree: Any, path: str, out: list[Any], what: str) -> None:
    where = f"at {path}" if path else "at the top level"
    if node is None:
        if not (is_array(tree) or isinstance(tree, numbers.Real)) or isinstance(tree, bool):
            raise ShapeError(
                f"{what} does not match the parameters: {where} expected an array, got "
                f"{type(tree).__name__}"
            )
        out.append(tree)
        return
    if issubclass(node.kind, dict):
        if not isinstance(tree, Mapping):
            raise ShapeError(
                f"{what} does not match the parameters: {where} expected a dict with keys "
                f"{list(node.keys)}, got {type(tree).__name__}"
            )
        missing = [k for k in node.keys if k not in tree]
        extra = [k for k in tree if k not in node.keys]
        if missing or extra:
            parts = [f"keys missing: {missing}"] if missing else []
            parts += [f"keys not in the parameters: {extra}"] if extra else []
            raise ShapeError(f"{what} does not match the parameters: {where}, " + "; ".join(parts))
        for k, child in zip(node.keys, node.children):
            _match(child, tree[k], f"{path}[{k!r}]", out, what)
        return
    if not isinstance(tree, (list, tuple)) or len(tree) != len(node.children):
        got = f"a {type(tree).__name__}" + (
            f" of length {len(tree)}" if isinstance(tree, (list, tuple)) else ""
        )
        raise ShapeError(
            f"{what} does not match the parameters: {where} expected a sequence of "
            f"{len(node.children)} entries, got {got}"
        )
    for i, (child, sub) in enumerate(zip(node.children, tree)):
        _match(child, sub, f"{path}[{i}]", out, what)


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


def split_columns(xp: Any, spec: TreeSpec, V: Any) -> list[Any]:
    """A ``(d, k)`` matrix as parameter-shaped leaves with the batch first, ``(k, *shape)``."""
    k, Vt = V.shape[1], xp.permute_dims(V, (1, 0))
    out, start = [], 0
    for shape, n in zip(spec.shapes, spec.sizes):
        out.append(xp.reshape(Vt[:, start : start + n], (k, *shape)))
        start += n
    return out


def join_columns(xp: Any, leaves: list[Any]) -> Any:
    """Inverse of :func:`split_columns`: leaves ``(k, *shape)`` to a ``(d, k)`` matrix."""
    k = leaves[0].shape[0]
    flat = xp.concat([xp.reshape(x, (k, -1)) for x in leaves], axis=1)
    return xp.permute_dims(flat, (1, 0))


# --- walks over arbitrary nested arguments (batches, extra arguments) ---------------------
def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Map ``fn`` over the leaves of nested dicts/lists/tuples (``rest`` shaped alike).

    >>> tree_map(lambda a, b: a + b, {"x": [1, 2]}, {"x": [10, 20]})
    {'x': [11, 22]}
    """
    if isinstance(tree, Mapping):
        return type(tree)((k, tree_map(fn, v, *(r[k] for r in rest))) for k, v in tree.items())
    if _is_namedtuple(tree):
        return type(tree)(*(tree_map(fn, *vs) for vs in zip(tree, *rest)))
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, *vs) for vs in zip(tree, *rest))
    return fn(tree, *rest)


def map_arrays(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every array leaf of a nested dict/list/tuple, keep the rest."""
    return tree_map(lambda x: fn(x) if is_array(x) else x, tree)


def collect_arrays(tree: Any, out: list[Any] | None = None) -> list[Any]:
    """The array leaves of a nested dict/list/tuple, depth-first."""
    out = [] if out is None else out
    if isinstance(tree, Mapping):
        for v in tree.values():
            collect_arrays(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            collect_arrays(v, out)
    elif is_array(tree):
        out.append(tree)
    return out

"""The flat layout of an operator whose input vectors are a pytree point, raveled.

:class:`PointLayout` gives :class:`~hessop._streamed.StreamedOperator` (the curvature
matrices) and :class:`~hessop._jacobian_operator.JacobianOperator` the same ``params`` /
``ravel`` / ``unravel``, so that a vector means the same thing to both.
"""

from __future__ import annotations

from typing import Any

from . import _pytree


class PointLayout:
    """``ravel`` / ``unravel`` / ``params`` of an operator whose input vectors are flat in the
    layout of a pytree point (mixed into a :class:`~hessop._operator.LinearOperator` that
    holds ``spec``, ``_leaves`` and a ``watch``)."""

    spec: _pytree.TreeSpec
    _leaves: list[Any]
    watch: Any

    @property
    def params(self) -> Any:
        """The point at which the operator is taken, as a params-shaped pytree."""
        self.watch.check()
        return _pytree.unflatten(self.spec, list(self._leaves))

    def ravel(self, tree: Any) -> Any:
        """Flatten a params-shaped pytree into a vector in this operator's layout.

        The layout is depth-first, dict entries in insertion order, each leaf in row-major
        order; it is the same in every backend. Dicts are matched by key: a tree whose keys
        come in another order (``jax.tree`` results are sorted) means the same vector.
        """
        leaves = _pytree.leaves_like(self.spec, tree)
        for i, x in enumerate(leaves):
            if self._bk.owns(x):
                self._bk.check_device(x, self.device, f"leaf {i} of the pytree")
        leaves = [self.asarray(x) for x in leaves]
        return _pytree.ravel(self.xp, self.spec, leaves)

    def unravel(self, v: Any) -> Any:
        """Split a flat vector into a params-shaped pytree (inverse of :meth:`ravel`)."""
        v = self._check(v, 1, self.spec.size, "unravel")
        return _pytree.unflatten(self.spec, _pytree.unravel(self.xp, self.spec, v))

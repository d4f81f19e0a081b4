"""The one framework-neutral streaming operator, on which every curvature matrix is built.

A :class:`StreamedOperator` is a curvature matrix (Hessian, GGN, empirical Fisher) of a
loss over its batches, at one point. It owns everything that is not a per-batch product:

* the point (the parameter leaves) and its flat layout (``ravel`` / ``unravel``);
* the batches (:class:`Batches`): one batch of ``*args``, or a dataset streamed again at
  every product, each batch weighted by its size;
* the distributed reduction of a process's share (:mod:`hessop.distributed`);
* the caching policy: with the cache on (one batch), the first product is a plain one (a
  one-off product pays nothing for a cache it will not use), the second also keeps the work
  that does not depend on the vector (:meth:`CurvatureKernel.linearize
  <hessop.backends._base.CurvatureKernel.linearize>`), and later products reuse it;
* the snapshot contract (:mod:`hessop._state`): every use first checks that the state the
  operator was built in still holds.

The per-batch products come from a :class:`~hessop.backends._base.CurvatureKernel` of the
framework. The path of a vector through ``H @ v``: :meth:`LinearOperator.matvec` (checks)
-> :meth:`StreamedOperator._matvec` (watch, stream, weight, reduce) -> the kernel's batch
product -> back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from . import _pytree
from ._errors import EmptyDataError, ShapeError
from ._layout import PointLayout
from ._operator import LinearOperator
from ._sharing import ShareKey

#: how batches combine over a dataset
REDUCTIONS = ("mean", "sum")


class Batches:
    """The loss's arguments: one batch (``*args``) or a dataset (``data=``).

    Iterating yields ``(args, size)`` per batch; a single batch has size 1 (its weight is
    irrelevant). ``convert`` turns a raw batch into native arrays on the operator's device.
    """

    def __init__(
        self,
        args: tuple[Any, ...] | None,
        data: Iterable[Any] | None,
        *,
        reduction: str = "mean",
        batch_size: Callable[[tuple[Any, ...]], int] | None = None,
        convert: Callable[[tuple[Any, ...]], tuple[Any, ...]] = tuple,
        reducer: Any = None,
    ) -> None:
        self.args, self.data, self.reduction = args, data, reduction
        self._batch_size, self._convert = batch_size, convert
        self.reducer = reducer

    @property
    def streamed(self) -> bool:
        return self.data is not None

    def __iter__(self) -> Iterator[tuple[tuple[Any, ...], int]]:
        if self.data is None:
            yield self.args, 1
            return
        empty = True
        for item in self.data:
            empty = False
            # DataLoader's default collate turns a (x, y) sample into a [x, y] list.
            args = self._convert(tuple(item) if isinstance(item, (tuple, list)) else (item,))
            yield args, self.size_of(args)
        if empty and self.reducer is None:  # a reducer decides whether all ranks are empty
            raise EmptyDataError("data= yielded no batch; pass a non-empty iterable of batches")

    def first(self) -> tuple[Any, ...] | None:
        """The first batch's arguments (None when this process has none)."""
        for args, _ in self:
            return args
        return None

    def size_of(self, args: tuple[Any, ...]) -> int:
        if self._batch_size is not None:
            n = self._batch_size(args)
            if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
                raise TypeError(f"batch_size(...) must return an int, got {n!r}")
            if int(n) < 1:
                raise ValueError(
                    f"batch_size(...) returned {int(n)} for a batch; a batch's size (its "
                    "weight in the dataset's mean) must be an integer >= 1"
                )
            return int(n)
        for x in _pytree.collect_arrays(args):
            if len(getattr(x, "shape", ())) >= 1:
                if int(x.shape[0]) == 0:
                    raise EmptyDataError(
                        "a batch of data= has no samples (leading dimension 0); drop empty batches"
                    )
                return int(x.shape[0])
        raise ShapeError(
            "cannot find the batch size: no argument of the batch is an array with a leading "
            "dimension; pass batch_size=lambda args: ... to hessian()"
        )


class StreamedOperator(PointLayout, LinearOperator):
    """A symmetric curvature matrix of a loss over its batches, at one point.

    Not built directly: see :func:`hessop.hessian`, :func:`hessop.model_ggn`,
    :func:`hessop.model_fisher`.

    Attributes
    ----------
    cache : bool
        Whether work independent of the vector is kept between products (one batch only).
    chunk_size : int or None
        Columns per batch product in ``matmat`` (bounds memory).
    """

    def __init__(
        self,
        leaves: list[Any],
        spec: _pytree.TreeSpec,
        batches: Batches,
        kernel: Any,
        *,
        backend: Any,
        device: Any,
        watch: Any,
        loss: Any,
        cache: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        d = spec.size
        super().__init__((d, d), leaves[0].dtype, backend, device, symmetric=True)
        self._leaves, self._point, self.spec = leaves, tuple(leaves), spec
        self.batches, self._kernel, self.watch, self.loss = batches, kernel, watch, loss
        self.cache = bool(cache) and kernel.linearizable and not batches.streamed
        self.chunk_size = chunk_size
        self._linearization: Any = None  # the kernel's cache, from the second product on
        self._products = 0
        self._uses = 0  # streams run (products and gradients)
        self._verified = False  # whether a product or gradient proved the loss depends on p
        self._lock = threading.Lock()
        #: the key under which the kernel's compiled functions are shared (None: they are
        #: not), and the part of it that does not depend on the watched state
        self._share: Any = None
        self._share_prefix: tuple[Any, ...] = ()

    # --- products -------------------------------------------------------------------------
    def _matvec(self, v: Any) -> Any:
        return self._matmat(v)  # the kernels take vectors and blocks alike

    def _matmat(self, V: Any) -> Any:
        if self.batches.reducer is not None:
            V = self.batches.reducer.replicate(V)
        return self._stream(lambda args: self._batch_product(args, V), V)

    def _batch_product(self, args: tuple[Any, ...], V: Any) -> Any:
        step = self.chunk_size
        if V.ndim == 2 and step is not None and step < V.shape[1]:
            blocks = [
                self._batch_product(args, V[:, j : j + step]) for j in range(0, V.shape[1], step)
            ]
            return self.xp.concat(blocks, axis=1)
        out = self._product(args, V)
        if not self._verified:
            self._verify(out, args, V)
        return out

    def _product(self, args: tuple[Any, ...], V: Any) -> Any:
        """One batch's product, through the caching policy (see the module docstring)."""
        if not self.cache:
            return self._kernel.product(self._point, args, V)
        lin = self._linearization
        if lin is not None:
            return self._kernel.apply(lin, V)
        if self._bk.is_tracer(V):  # under a JAX transformation the cache would keep tracers
            return self._kernel.product(self._point, args, V)
        with self._lock:
            first = self._products == 0
            self._products += 1
        if first and (V.ndim == 1 or V.shape[1] == 1):
            # A one-off product must not pay for the cache; a block's later columns use it.
            return self._kernel.product(self._point, args, V)
        out, lin = self._kernel.linearize(self._point, args, V)
        self._linearization = lin
        return out

    def _verify(self, out: Any, args: tuple[Any, ...], V: Any = None) -> None:
        """After the first product (of a nonzero ``V``) or gradient: an exactly zero result
        raises when the loss does not depend on the parameters at all (a function that
        ignores them); a loss that is flat at the point passes."""
        known = self._kernel.dependence_known(self._point, args)
        if known is not None:
            self._verified = True
            if not known:
                raise self.loss.independent_error()
            return
        xp = self.xp
        if self._bk.is_tracer(out) or (V is not None and self._bk.is_tracer(V)):
            return  # inside a transformation: values are not known
        if bool(xp.any(out != 0)):
            self._verified = True  # the usual case: one pass over the result, none over V
            return
        if V is not None and not bool(xp.any(V != 0)):
            return  # a zero vector proves nothing
        self._verified = True
        if not self._kernel.depends_on_point(self._point, args):
            raise self.loss.independent_error()

    def _stream(self, per_batch: Callable[[tuple[Any, ...]], Any], like: Any = None) -> Any:
        """``per_batch`` over the batches, size-weighted, reduced over processes."""
        self.watch.check()
        reducer, batches = self.batches.reducer, self.batches
        mean = batches.streamed and batches.reduction == "mean"
        total, acc = 0, None
        for args, n in batches:
            y = per_batch(args)
            if mean:
                y = _scale(y, n)
            acc = y if acc is None else _add(acc, y)
            total += n
        if reducer is not None:  # the other processes' shares (hessop.distributed)
            acc, total = reducer.reduce(acc, total, lambda: self._zero(like))
        if mean:
            acc = _scale(acc, 1.0 / total)
        self.watch.after_use()
        self._uses += 1
        if self._share is not None and self._uses <= 2:
            self._rekey()
        return acc

    def _rekey(self) -> None:
        """After the uses that compile (a plain product, then a linearization): if the loss
        changed what it reads while being traced (a call counter, a log), offer the
        compiled functions under the state it left behind, so the next operator in that
        state reuses them."""
        now = self.watch.rescanned()
        parts = (*self._share_prefix, now.key())
        if parts != self._share.parts:
            self._share = ShareKey(parts, now.kept())
            self._kernel.share_as(self._share)

    def _zero(self, like: Any) -> Any:
        if like is None:  # the gradient: (loss, flat gradient)
            return self.zeros(()), self.zeros((self.shape[0],))
        return self.xp.zeros_like(like)

    # --- diagonal blocks -------------------------------------------------------------------
    def diagonal_block_products(self, blocks: Sequence[tuple[Sequence[int], Any]]) -> list[Any]:
        """Products with diagonal blocks of the matrix, all in one pass over the data.

        Parameters
        ----------
        blocks :
            ``(leaves, V)`` pairs: indices of parameter leaves (in the order of
            :attr:`spec`) and an ``(n, u)`` array over their coordinates, ``n`` their total
            size, in layout order.

        Returns
        -------
        list
            Per pair, ``M[S, S] @ V`` with ``S`` the coordinates of ``leaves``: the curvature
            of the loss as a function of those leaves alone, the others held fixed.

        Notes
        -----
        Where the kernel allows (torch: the Hessian in reverse-over-reverse and the GGN,
        through one set of graphs per batch; JAX: the Hessian in every AD mode, compiled
        once per set of leaves), each block is differentiated with respect to its own leaves
        only, so the other parameters' second derivatives are never computed; elsewhere the
        blocks are padded with zeros to full columns for one ``matmat``, whose rows of each
        block's leaves are its product.

        Examples
        --------
        >>> import numpy as np, hessop
        >>> H = hessop.hessian(lambda p: (p["a"] ** 2 * p["b"]).sum(),
        ...                    {"a": np.ones(2), "b": 3.0 * np.ones(2)}, backend="torch")
        >>> H.diagonal_block_products([((0,), H.asarray(np.eye(2)))])[0]  # d2/da2 = 2b
        tensor([[6., 0.],
                [0., 6.]], dtype=torch.float64)
        """
        offsets = [0]
        for n in self.spec.sizes:
            offsets.append(offsets[-1] + n)
        checked = [self._block(leaves, V, offsets) for leaves, V in blocks]
        if not checked:
            return []
        if not self._kernel.block_products or self.batches.reducer is not None:
            return self._blocks_by_matmat(checked, offsets)
        return list(self._stream(lambda args: tuple(self._batch_blocks(args, checked))))

    def _block(self, leaves: Sequence[int], V: Any, offsets: list[int]) -> tuple[Any, Any]:
        n_leaves = self.spec.num_leaves
        idx = tuple(int(i) for i in leaves)
        if not idx or any(not 0 <= i < n_leaves for i in idx) or len(set(idx)) != len(idx):
            raise ValueError(
                f"a block's leaves must be distinct indices in [0, {n_leaves}), got {leaves!r}"
            )
        idx = tuple(sorted(idx))
        n = sum(offsets[i + 1] - offsets[i] for i in idx)
        V = self._check(V, 2, n, "diagonal_block_products")
        return idx, V

    def _blocks_by_matmat(self, blocks: list[tuple[Any, Any]], offsets: list[int]) -> list[Any]:
        """The generic way: every block scattered into full columns, one ``matmat``."""
        xp, d = self.xp, self.shape[0]
        columns = []
        for idx, V in blocks:
            pieces, start, used = [], 0, 0
            for i in idx:
                if offsets[i] > start:
                    pieces.append(self.zeros((offsets[i] - start, V.shape[1])))
                n = offsets[i + 1] - offsets[i]
                pieces.append(V[used : used + n])
                start, used = offsets[i + 1], used + n
            if start < d:
                pieces.append(self.zeros((d - start, V.shape[1])))
            columns.append(xp.concat(pieces, axis=0))
        out = self.matmat(xp.concat(columns, axis=1))
        products, col = [], 0
        for idx, V in blocks:
            u = V.shape[1]
            rows = [out[offsets[i] : offsets[i + 1], col : col + u] for i in idx]
            products.append(rows[0] if len(rows) == 1 else xp.concat(rows, axis=0))
            col += u
        return products

    def _batch_blocks(self, args: tuple[Any, ...], blocks: list[tuple[Any, Any]]) -> list[Any]:
        if not self.cache:
            return self._kernel.block_product(self._point, args, blocks)[0]
        with self._lock:
            self._products += 1
        out, lin = self._kernel.block_product(self._point, args, blocks, self._linearization)
        if lin is not None:
            self._linearization = lin
        return out

    # --- the loss at the point ------------------------------------------------------------
    def loss_and_gradient(self) -> tuple[Any, Any]:
        """The loss (0-d array) and its flat gradient at the point (over all the data)."""

        def per_batch(args: tuple[Any, ...]) -> Any:
            value, g = self._kernel.gradient(self._point, args)
            if not self._verified:
                self._verify(g, args)
            return value, g

        return self._stream(per_batch)

    def gradient(self) -> Any:
        """The flat gradient of the loss at the point (over all the data)."""
        return self.loss_and_gradient()[1]


def _scale(y: Any, a: float) -> Any:
    return tuple(_scale(t, a) for t in y) if isinstance(y, tuple) else y * a


def _add(a: Any, b: Any) -> Any:
    return tuple(_add(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else a + b


class CurvatureOperator(StreamedOperator):
    """The base of the model-level curvature operators other than the Hessian (the GGN, the
    empirical Fisher): symmetric positive semi-definite matrices of a model's loss."""

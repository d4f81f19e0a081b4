"""How model-level operators read ``data``: one ``(x, y)`` batch, or an iterable of them.

The rule that tells the two apart (documented on :func:`hessop.model_hessian`):

* ``data`` is **one batch** when it is a ``tuple`` or ``list`` of exactly two items whose
  first item, the input ``x``, is an array (numpy, torch, JAX) or a mapping (a dict of
  arrays);
* anything else is an **iterable of batches** (a list of ``(x, y)`` pairs, a
  ``DataLoader``, ...), each batch a ``tuple`` or ``list`` ``(x, y)``.

So ``(x, y)`` and ``[x, y]`` are one batch and ``[(x1, y1), (x2, y2)]`` two. An input that is
itself a tuple of arrays (a multi-input model) would be ambiguous: pass it inside a list of
batches, ``[((x1, x2), y)]``, or as a dict.

The input ``x`` is handed to the model as one positional argument (a dict stays a dict).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .. import _rng
from .._errors import EmptyDataError
from .._inputs import BATCH_HINT, check_framework
from .._pytree import collect_arrays, is_array, map_arrays, tree_map


def is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one ``(x, y)`` batch rather than an iterable of batches.

    Examples
    --------
    >>> import numpy as np
    >>> x, y = np.zeros((4, 3)), np.zeros(4)
    >>> is_single_batch((x, y)), is_single_batch([x, y]), is_single_batch([(x, y), (x, y)])
    (True, True, False)
    >>> is_single_batch(({"ids": x}, y))
    True
    """
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and (is_array(data[0]) or isinstance(data[0], Mapping))
    )


def as_pair(item: Any) -> tuple[Any, Any]:
    """One batch as an ``(x, y)`` tuple (a ``DataLoader`` yields lists)."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    what = f"a {type(item).__name__}" + (
        f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
    )
    raise TypeError(
        f"each batch must be an (inputs, targets) pair, got {what}; make the data yield "
        "(x, y) tuples (for a dict batch: (batch, batch['labels']) or similar)"
    )


class ModelBatches:
    """A re-iterable view of the user's batches as converted ``(x, y)`` tuples.

    Iterating it iterates ``data`` once with the global RNG states preserved (a shuffling
    ``DataLoader`` draws its permutation from torch's generator), so every pass sees the
    same order and the user's generators are left as they were. A list or tuple of batches
    draws nothing when iterated: it is iterated as it is.
    """

    def __init__(
        self, data: Iterable[Any], convert: Callable[[Any], Any], backend: Any, device: Any = None
    ) -> None:
        with _rng.preserve(backend, device):  # a DataLoader's iterator draws its base seed
            one_shot = iter(data) is data
        if one_shot:
            raise TypeError(
                "data= must be re-iterable (a list, tuple or DataLoader): every "
                "matrix-vector product streams it again, and a one-shot iterator or "
                "generator would be exhausted after the first; wrap it with list(...) if it "
                "fits in memory"
            )
        if hasattr(data, "__len__") and len(data) == 0:  # type: ignore[arg-type]
            raise EmptyDataError("data= is empty; pass at least one batch")
        self.data, self.convert, self.backend, self.device = data, convert, backend, device
        self._plain = isinstance(data, (list, tuple))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self._plain:
            for item in self.data:
                yield self.convert(as_pair(item))
            return
        with _rng.preserve(self.backend, self.device):
            for item in self.data:
                yield self.convert(as_pair(item))

    def first(self) -> tuple[Any, Any]:
        """The first batch, converted."""
        it = iter(self)
        try:
            return next(it)
        except StopIteration:
            raise EmptyDataError(
                "data= yielded no batch; pass a non-empty iterable of batches"
            ) from None
        finally:
            it.close()  # leave the RNG scope now, not when the generator is collected


def converter(bk: Any, dtype: Any, device: Any) -> Callable[[Any], Any]:
    """Convert every array of a batch to ``bk``'s arrays on ``device``; floats to ``dtype``.

    Integer arrays (class labels, token ids) keep their dtype.
    """

    def one(x: Any) -> Any:
        check_framework(bk, x, "an array of the batch", BATCH_HINT)
        bk.check_argument(x, "an array of the batch")
        floating = bk.is_floating(x.dtype) if hasattr(x, "dtype") else False
        return bk.asarray(x, dtype=dtype if floating else None, device=device)

    def convert(batch: Any) -> Any:
        return map_arrays(one, batch)

    return convert


def sample_count(batch: Any) -> int | None:
    """The leading dimension of the first array of a batch with one (None: no such array).

    >>> import numpy as np
    >>> sample_count((np.zeros((0, 3)), np.zeros(0))), sample_count((np.float64(1.0), 2))
    (0, None)
    """
    for a in collect_arrays(batch):
        if len(a.shape) >= 1:
            return int(a.shape[0])
    return None


def batch_axes(args: Any, n: int) -> Any:
    """0 for every array whose leading dimension is the batch size ``n``, else None.

    The per-sample map (Fisher) splits exactly these arrays into samples; anything else (a
    shared mask, a scalar option) is passed whole to every sample.
    """
    return tree_map(
        lambda a: 0 if is_array(a) and len(a.shape) >= 1 and a.shape[0] == n else None, args
    )

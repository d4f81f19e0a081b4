"""Data-parallel Hessian operators: the loss over the union of every rank's data.

``hessop.hessian(f, params, data=local_batches, distributed=True)`` builds, on every rank,
the operator of the loss over all ranks' data. Each rank streams its own batches exactly as
a single process would; a :class:`Reducer` then turns the rank's share into the whole. That
hook is all that differs from the single-process operator, so every algorithm (``cg``,
``eigsh``, ``trace``, ...) runs unchanged and returns the same numbers on every rank.

PyTorch (``hessop.backends.torch._distributed.TorchReducer``)
    One ``torch.distributed.all_reduce`` per product: the size-weighted sum of the rank's
    products and its number of samples, packed into one tensor of ``d + 1`` numbers
    (``d * k + 1`` for ``matmat``, ``d + 2`` for the gradient and loss). gloo on the CPU,
    NCCL on GPUs. Shards may be uneven, and a rank may hold no data at all: it contributes
    zeros and size 0 (every rank must still call every product, since each one is a
    collective). Only when all ranks are empty is it an error.

JAX (``hessop.backends.jax._distributed.MeshReducer``)
    Each batch array becomes one global array sharded over a :class:`jax.sharding.Mesh`
    along its leading (batch) axis, the parameters and vectors are replicated, and the
    jitted per-batch functions run on the sharded arrays: XLA inserts the reduction.
    Each process passes its own local batch (``jax.make_array_from_process_local_data``),
    so the same call works on one host with several devices and across hosts after
    ``jax.distributed.initialize()``. Arrays that are already sharded over several devices
    are used as they are.

See ``docs/distributed.md`` for launching, the communication volume and its cost.

Examples
--------
A world of one process (``torchrun`` starts several; see ``examples/distributed_eigsh.py``):

>>> import numpy as np, torch, torch.distributed as dist, hessop
>>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> X = np.arange(6.0).reshape(3, 2)
>>> def f(w, X):
...     return ((X @ w) ** 2).mean()
>>> H = hessop.hessian(f, np.zeros(2), data=[(X[:2],), (X[2:],)], backend="torch",
...                    distributed=True)
>>> H.to_dense()                    # 2 X^T X / 3: both batches, weighted by size
tensor([[13.3333, 17.3333],
        [17.3333, 23.3333]], dtype=torch.float64)
>>> dist.destroy_process_group()
"""

from __future__ import annotations

from typing import Any

from .backends._base import Reducer

__all__ = ["Reducer", "make_reducer"]


def make_reducer(backend: Any, process_group: Any = None) -> Reducer:
    """The reducer for ``distributed=True`` in ``backend`` (a name or a backend).

    Parameters
    ----------
    backend :
        ``"torch"`` or ``"jax"`` (or their backend objects).
    process_group :
        torch: a ``torch.distributed`` process group (default: the world). JAX: a
        :class:`jax.sharding.Mesh` whose devices share each batch (default: a 1-D mesh
        over ``jax.devices()``, every device of every process).
    """
    from .backends import get_backend

    return get_backend(backend).reducer(process_group)

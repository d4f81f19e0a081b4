"""Data-parallel Hessian operators: the loss over the union of every rank's data.

``hessop.hessian(f, params, data=local_batches, distributed=True)`` builds, on every rank,
the operator of the loss over all ranks' data. Each rank streams its own batches exactly as
a single process would; a :class:`Reducer` then turns the rank's share into the whole. That
hook is all that differs from the single-process operator, so every algorithm (``cg``,
``eigsh``, ``trace``, ...) runs unchanged and returns the same numbers on every rank.

PyTorch (:class:`TorchReducer`)
    One ``torch.distributed.all_reduce`` per product: the size-weighted sum of the rank's
    products and its number of samples, packed into one tensor of ``d + 1`` numbers
    (``d * k + 1`` for ``matmat``, ``d + 2`` for the gradient and loss). gloo on the CPU,
    NCCL on GPUs. Shards may be uneven, and a rank may hold no data at all: it contributes
    zeros and size 0 (every rank must still call every product, since each one is a
    collective). Only when all ranks are empty is it an error.

JAX (:class:`MeshReducer`)
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

from collections.abc import Callable
from typing import Any

import numpy as np

from ._errors import DistributedError, EmptyDataError, ShapeError

__all__ = ["MeshReducer", "Reducer", "TorchReducer", "make_reducer"]


class Reducer:
    """How a process's share of a product becomes the product over all the data.

    :class:`~hessop.HessianOperator` calls these hooks; the defaults do nothing, which is
    the single-process operator. A reducer for another framework or transport subclasses
    this and implements the hooks it needs.
    """

    def prepare(self, leaves: list[Any], device: Any) -> tuple[list[Any], Any]:
        """Once, at construction: check the setup; return the leaves and the operator's
        device (where its vectors live)."""
        return leaves, device

    def shard_batch(self, args: tuple[Any, ...], dtype: Any) -> tuple[Any, ...]:
        """Place one local batch where the per-batch functions expect it."""
        return args

    def replicate(self, x: Any) -> Any:
        """Place an input vector (or block) where the per-batch functions expect it."""
        return x

    def reduce(self, acc: Any, total: int, zero: Callable[[], Any]) -> tuple[Any, float]:
        """Combine the local size-weighted sum ``acc`` (None when this process had no
        batch; ``zero()`` builds its zeros) and the local number of samples ``total``."""
        if acc is None:
            raise EmptyDataError("data= yielded no batch; pass a non-empty iterable of batches")
        return acc, total


def make_reducer(backend: str, process_group: Any = None) -> Reducer:
    """The reducer for ``distributed=True`` in ``backend``.

    Parameters
    ----------
    backend : str
        ``"torch"`` or ``"jax"``.
    process_group :
        torch: a ``torch.distributed`` process group (default: the world). JAX: a
        :class:`jax.sharding.Mesh` whose devices share each batch (default: a 1-D mesh
        over ``jax.devices()``, every device of every process).
    """
    if backend == "torch":
        return TorchReducer(process_group)
    if backend == "jax":
        return MeshReducer(process_group)
    raise DistributedError(
        f"distributed=True is implemented for the 'torch' and 'jax' backends, not {backend!r}"
    )


# --- PyTorch: one all-reduce per product ------------------------------------------------
class TorchReducer(Reducer):
    """Sum each product over the ranks of a ``torch.distributed`` process group.

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup, optional
        The ranks that share the data; default the world group. Must be initialized
        (``torch.distributed.init_process_group``, which ``torchrun`` needs too).
    """

    def __init__(self, process_group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise DistributedError(
                "distributed=True needs torch.distributed, which this PyTorch build lacks"
            )
        if not dist.is_initialized():
            raise DistributedError(
                "distributed=True needs an initialized torch.distributed process group; call "
                "torch.distributed.init_process_group('gloo' on CPU or 'nccl' on GPU) first, "
                "e.g. in a script launched by torchrun"
            )
        if process_group is dist.GroupMember.NON_GROUP_MEMBER or (
            process_group is not None and dist.get_rank(process_group) < 0
        ):
            raise DistributedError(
                "this rank is not a member of process_group; build the operator only on the "
                "group's ranks, or pass process_group=None for the world"
            )
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)

    def prepare(self, leaves: list[Any], device: Any) -> tuple[list[Any], Any]:
        import torch
        import torch.distributed as dist

        backend = str(dist.get_backend(self.group))
        if backend == "nccl" and torch.device(device).type != "cuda":
            raise DistributedError(
                f"the process group uses NCCL, which needs CUDA tensors, but the operator is "
                f"on {device}; move the parameters to torch.device('cuda', local_rank) or "
                "initialize the group with 'gloo' for CPU"
            )
        self._check_same_point(leaves, device)
        return leaves, device

    def _check_same_point(self, leaves: list[Any], device: Any) -> None:
        # Ranks at different points would sum Hessians of different functions, silently.
        # One tiny all-reduce at construction compares the size and two checksums.
        import torch
        import torch.distributed as dist

        w = torch.cat([x.reshape(-1) for x in leaves]).to(torch.float64)
        ramp = torch.linspace(1.0, 2.0, w.numel(), dtype=torch.float64, device=w.device)
        stats = torch.stack(
            [
                torch.tensor(float(w.numel()), dtype=torch.float64, device=w.device),
                w.abs().sum(),
                (w * ramp).sum(),
            ]
        )
        both = torch.cat([stats, -stats])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        hi, lo = both[:3], -both[3:]
        if hi[0] != lo[0]:
            raise DistributedError(
                f"the ranks have different numbers of parameters ({int(lo[0])} to "
                f"{int(hi[0])}); every rank must pass the same params"
            )
        if bool(((hi - lo).abs() > 1e-9 * (1.0 + hi.abs())).any()):
            raise DistributedError(
                "the ranks' parameters differ; every rank must pass the same point (broadcast "
                "them from rank 0 with torch.distributed.broadcast, as DDP does)"
            )

    def reduce(self, acc: Any, total: int, zero: Callable[[], Any]) -> tuple[Any, float]:
        import torch
        import torch.distributed as dist

        local = zero() if acc is None else acc
        parts = list(local) if isinstance(local, tuple) else [local]
        ref = parts[-1]
        # The sample count rides in the same message: one collective per product. It is
        # exact as a float up to 2^24 samples in float32 and 2^53 in float64.
        size = torch.full((1,), float(total), dtype=ref.dtype, device=ref.device)
        flat = torch.cat([p.reshape(-1) for p in parts] + [size])
        if flat.requires_grad:
            # all_reduce is invisible to autograd: gradients would silently see one rank.
            raise DistributedError(
                "differentiable=True is not supported with distributed=True in torch; build "
                "the differentiable product on each rank's data and reduce the loss yourself"
            )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        total_all = float(flat[-1])
        if total_all == 0:
            raise EmptyDataError(
                "data= is empty on every rank; pass at least one batch on some rank"
            )
        out, start = [], 0
        for p in parts:
            out.append(flat[start : start + p.numel()].reshape(p.shape))
            start += p.numel()
        return (tuple(out) if isinstance(local, tuple) else out[0]), total_all


# --- JAX: batches sharded over a mesh, the reduction left to XLA -------------------------
class MeshReducer(Reducer):
    """Shard each batch over a :class:`jax.sharding.Mesh`; XLA reduces inside the products.

    Parameters
    ----------
    mesh : jax.sharding.Mesh, optional
        The devices that share each batch; its leading axis (all its axes, flattened) splits
        the batch dimension. Default: a 1-D mesh over ``jax.devices()``.
    """

    def __init__(self, mesh: Any = None) -> None:
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if mesh is None:
            mesh = Mesh(np.array(jax.devices()), ("batch",))
        if not isinstance(mesh, Mesh):
            raise TypeError(
                "in JAX, process_group= takes a jax.sharding.Mesh (the devices that share "
                f"each batch), got {type(mesh).__name__}"
            )
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.batched = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
        self.local_shards = len(mesh.local_devices)

    def prepare(self, leaves: list[Any], device: Any) -> tuple[list[Any], Any]:
        import jax

        return [jax.device_put(x, self.replicated) for x in leaves], self.replicated

    def shard_batch(self, args: tuple[Any, ...], dtype: Any) -> tuple[Any, ...]:
        from ._hessian import _collect_arrays, map_arrays

        arrays: list[Any] = []
        _collect_arrays(args, arrays)
        sizes = [x.shape[0] for x in arrays if len(x.shape) >= 1 and not self._is_global(x)]
        n = sizes[0] if sizes else None
        if n is not None and n % self.local_shards:
            raise ShapeError(
                f"a batch of {n} samples cannot be split evenly over this process's "
                f"{self.local_shards} devices; use batch sizes divisible by "
                f"{self.local_shards} (drop or re-batch the remainder)"
            )
        return map_arrays(lambda x: self._place(x, n, dtype), args)

    @staticmethod
    def _is_global(x: Any) -> bool:
        import jax

        return isinstance(x, jax.Array) and len(x.sharding.device_set) > 1

    def _place(self, x: Any, n: int | None, dtype: Any) -> Any:
        import jax

        if self._is_global(x):
            return x  # already one global array: the caller chose its sharding
        local = np.asarray(x)
        if local.dtype.kind == "f":
            local = local.astype(np.dtype(dtype))
        if local.ndim >= 1 and local.shape[0] == n:
            # this process's rows of the global batch
            return jax.make_array_from_process_local_data(self.batched, local)
        return jax.device_put(local, self.replicated)  # same on every process

    def replicate(self, x: Any) -> Any:
        import jax

        # An uncommitted or single-device vector would clash with the replicated point
        # inside jit ("incompatible devices"); one copy of d numbers is negligible.
        if x.sharding == self.replicated:
            return x
        return jax.device_put(x, self.replicated)

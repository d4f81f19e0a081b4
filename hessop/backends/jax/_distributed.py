"""Data parallelism in JAX: batches sharded over a device mesh, the reduction left to XLA.

Each batch array becomes one global array sharded over a :class:`jax.sharding.Mesh` along
its leading (batch) axis, the parameters and vectors are replicated, and the jitted
per-batch functions run on the sharded arrays: XLA inserts the reduction. Each process
passes its own local batch (``jax.make_array_from_process_local_data``), so the same call
works on one host with several devices and across hosts after
``jax.distributed.initialize()``. Arrays that are already sharded over several devices are
used as they are.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..._errors import ShapeError
from ..._pytree import collect_arrays, map_arrays
from .._base import Reducer


class MeshReducer(Reducer):
    """Shard each batch over a :class:`jax.sharding.Mesh`; XLA reduces inside the products.

    Parameters
    ----------
    mesh : jax.sharding.Mesh, optional
        The devices that share each batch; its leading axis (all its axes, flattened) splits
        the batch dimension. Default: a 1-D mesh over ``jax.devices()``.
    """

    def __init__(self, mesh: Any = None) -> None:
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
        return [jax.device_put(x, self.replicated) for x in leaves], self.replicated

    def shard_batch(self, args: tuple[Any, ...], dtype: Any) -> tuple[Any, ...]:
        arrays = collect_arrays(args)
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
        return isinstance(x, jax.Array) and len(x.sharding.device_set) > 1

    def _place(self, x: Any, n: int | None, dtype: Any) -> Any:
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
        # An uncommitted or single-device vector would clash with the replicated point
        # inside jit ("incompatible devices"); one copy of d numbers is negligible.
        if x.sharding == self.replicated:
            return x
        return jax.device_put(x, self.replicated)

"""Data parallelism in torch: one ``torch.distributed.all_reduce`` per product.

The size-weighted sum of the rank's products and its number of samples travel in one tensor
of ``d + 1`` numbers (``d * k + 1`` for ``matmat``, ``d + 2`` for the gradient and loss).
gloo on the CPU, NCCL on GPUs. Shards may be uneven, and a rank may hold no data at all: it
contributes zeros and size 0 (every rank must still call every product, since each one is a
collective). Only when all ranks are empty is it an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..._errors import DistributedError, EmptyDataError
from .._base import Reducer


class TorchReducer(Reducer):
    """Sum each product over the ranks of a ``torch.distributed`` process group.

    Parameters
    ----------
    process_group : torch.distributed.ProcessGroup, optional
        The ranks that share the data; default the world group. Must be initialized
        (``torch.distributed.init_process_group``, which ``torchrun`` needs too).
    """

    def __init__(self, process_group: Any = None) -> None:
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

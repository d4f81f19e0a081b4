"""Top Hessian eigenvalues of a model whose data is split over several processes.

Each process (rank) holds only its shard of the dataset; ``distributed=True`` makes every
rank's operator the Hessian of the loss over *all* the data, at the cost of one all-reduce
of ``d + 1`` numbers per Hessian-vector product. ``hessop.eigsh`` then runs unchanged, in
lockstep on every rank, and every rank gets the same eigenvalues. Rank 0 checks them
against one process that holds all the data.

Run on one machine, CPU (gloo)::

    torchrun --nproc_per_node=2 examples/distributed_eigsh.py

On two machines with 4 GPUs each (NCCL), run on each machine::

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST_OF_NODE_0:29500 examples/distributed_eigsh.py

Started without torchrun (``python examples/distributed_eigsh.py``), it prints the command
above and exits with status 2.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import hessop

TORCHRUN = "torchrun --nproc_per_node=2 examples/distributed_eigsh.py"


def make_data(n: int = 1000, d_in: int = 10, classes: int = 3) -> tuple[np.ndarray, ...]:
    """A synthetic classification set, the same on every rank (fixed seed)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d_in))
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 + 0.3 * rng.standard_normal(n) > 0.5).astype(np.int64)
    y += (X[:, 2] > 1.0).astype(np.int64) * (classes - 2)
    return X, y


def batches(X: np.ndarray, y: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]


def require(framework: str) -> None:
    """Exit with the install command (not a bare ModuleNotFoundError) if it is missing."""
    if framework not in hessop.available_backends(installed=True):
        sys.exit(
            f"this example needs {framework}, which is not installed; from the repository "
            f'root: pip install -c constraints.txt -e ".[{framework}]"'
        )


def check_launch() -> None:
    """Exit with code 2 and the torchrun command when not started by torchrun.

    torchrun sets RANK and WORLD_SIZE (with MASTER_ADDR/PORT) for every process; without
    them ``init_process_group`` would fail with a rendezvous error that says none of this.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in os.environ]
    if missing:
        print(
            f"this example runs one process per rank, started by torchrun ({', '.join(missing)} "
            f"not set); from the repository root run:\n    {TORCHRUN}",
            file=sys.stderr,
        )
        sys.exit(2)


def main() -> np.ndarray:
    require("torch")
    check_launch()
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # a reproducible model, whatever the number of ranks
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)
    ).to(device, torch.float64)
    # The operator must be built at the same point on every rank, as DDP ensures by
    # broadcasting rank 0's weights (hessop checks it and raises otherwise).
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p, src=0)
    loss_fn = torch.nn.CrossEntropyLoss()

    X, y = make_data()
    # Rank r takes every world-th sample: shards of uneven size when world does not
    # divide n, batched locally.
    shard = batches(X[rank::world], y[rank::world], size=64)

    H = hessop.model_hessian(model, loss_fn, shard, distributed=True)
    result = hessop.eigsh(H, k=2, which="LA", seed=0)
    top = result.eigenvalues.cpu().numpy()
    print(f"rank {rank}/{world}: {len(shard)} batches, top eigenvalues {top}", flush=True)

    if rank == 0:  # one process with all the data gives the same numbers
        H_all = hessop.model_hessian(model, loss_fn, batches(X, y, size=64))
        ref = hessop.eigsh(H_all, k=2, which="LA", seed=0).eigenvalues.cpu().numpy()
        assert np.allclose(top, ref, rtol=1e-8, atol=0), (top, ref)
        print(f"rank 0: matches one process over all the data: {ref}", flush=True)
    dist.destroy_process_group()
    return top


if __name__ == "__main__":
    main()

"""The peer libraries' Hessian-vector products on a torch model (``hessop bench --peers``):
curvlinops, PyHessian and hessian-eigenthings, each on its own copy of the model (they
change model state: train flags, ``.grad``). A peer that is not installed, or whose API
changed, is skipped with a note.

Examples
--------
>>> import torch
>>> from hessop.bench.peers import torch_peers
>>> model = torch.nn.Linear(3, 2)
>>> x, y, v = torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.randn(8)
>>> notes = []
>>> fns = torch_peers(model, torch.nn.CrossEntropyLoss(), x, y, v, notes, peers=())
>>> fns, notes
({}, [])
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from hessop.bench.cases import Thunk
from hessop.bench.config import PEERS, installed


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    """Silence the peers' deprecation warnings while they run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _curvlinops(m: Any, loss_of: Any, x: Any, y: Any, v: Any) -> Thunk:
    from curvlinops import HessianLinearOperator

    ps = [p for p in m.parameters() if p.requires_grad]

    def run() -> Any:
        op = HessianLinearOperator(m, loss_of, ps, [(x, y)], check_deterministic=False)
        return op @ v

    return run


def _pyhessian(m: Any, loss_of: Any, x: Any, y: Any, v: Any) -> Thunk:
    from pyhessian import hessian as pyhessian_op
    from pyhessian.utils import hessian_vector_product

    v_list = [
        t.view(p.shape)
        for t, p in zip(v.split([p.numel() for p in m.parameters()]), m.parameters())
    ]

    def run() -> Any:
        for p in m.parameters():
            p.grad = None  # PyHessian reads (and accumulates into) .grad
        with warnings_off():
            op = pyhessian_op(m, loss_of, data=(x, y), cuda=x.is_cuda)
        out = hessian_vector_product(op.gradsH, op.params, v_list)
        for p in m.parameters():
            p.grad = None  # its graph would leak otherwise
        return out

    return run


def _hessian_eigenthings(m: Any, loss_of: Any, x: Any, y: Any, v: Any) -> Thunk:
    from hessian_eigenthings import HessianOperator, supervised_loss

    op = HessianOperator(m, [(x, y)], supervised_loss(loss_of), full_dataset=True)
    return lambda: op.matvec(v)


_BUILDERS = {
    "curvlinops": _curvlinops,
    "pyhessian": _pyhessian,
    "hessian-eigenthings": _hessian_eigenthings,
}


def torch_peers(
    model: Any,
    loss_of: Any,
    x: Any,
    y: Any,
    v: Any,
    notes: list[str],
    peers: Iterable[str] = tuple(PEERS),
) -> dict[str, Thunk]:
    """One product per installed peer, ``{name: thunk}``; what is skipped goes to ``notes``."""
    fns: dict[str, Thunk] = {}
    for peer in peers:
        module, dist = PEERS[peer]
        if not installed(module):
            notes.append(f"{peer} is not installed (pip install {dist}); skipped")
            continue
        try:
            fns[peer] = _BUILDERS[peer](copy.deepcopy(model), loss_of, x, y, v)
        except Exception as err:  # a peer's API changed: report, keep benchmarking
            notes.append(f"{peer} failed to set up ({type(err).__name__}: {err}); skipped")
    return fns

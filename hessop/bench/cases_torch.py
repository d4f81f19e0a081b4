"""The torch :class:`~hessop.bench.cases.Setup` of a reference model: the loss through
``torch.func.functional_call``, the gradient on the module, the hand-written products
(double backward, ``torch.func.jvp(grad(f))``, ``grad(jvp(f))``) and the peer libraries.

Examples
--------
>>> from hessop.bench.cases_torch import build_setup
>>> from hessop.bench.config import BenchConfig
>>> s = build_setup("mlp", BenchConfig.quick_defaults())
>>> s.framework, s.num_params, tuple(s.V.shape), sorted(s.hand)
('torch', 970, (970, 4), ['fwd-rev', 'rev-fwd', 'rev-rev'])
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call, grad, jvp

from hessop.bench.cases import Setup, Thunk
from hessop.bench.config import BenchConfig
from hessop.bench.peers import torch_peers
from hessop.bench.reference import get_reference


def build_setup(model_name: str, config: BenchConfig) -> Setup:
    """The torch setup of reference model ``model_name`` (on CUDA when torch sees one)."""
    spec = get_reference(model_name, **config.overrides(model_name))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.dtype)
    model = spec.torch_model(seed=config.seed, dtype=dtype, device=device)
    x, y = spec.make_batch(
        config.batch_sizes[model_name], seed=config.seed, framework="torch", dtype=config.dtype
    )
    x, y = x.to(device), y.to(device)
    names = [n for n, _ in model.named_parameters()]
    leaves = list(model.parameters())
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_of = spec.torch_loss

    def f(p: dict[str, Any], x: Any, y: Any) -> Any:
        return loss_of(functional_call(model, p, (x,)), y)

    d = sum(p.numel() for p in leaves)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    v = torch.randn(d, generator=gen, dtype=dtype).to(device)
    V = torch.randn(d, config.k, generator=gen, dtype=dtype).to(device)
    v_leaves = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in leaves]), leaves)]
    v_dict = dict(zip(names, v_leaves))

    def sync(out: Any) -> Any:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def gradient() -> Any:
        return torch.autograd.grad(loss_of(model(x), y), leaves)

    def functional_leaves() -> tuple[list[Any], Any]:
        ws = [p.detach().requires_grad_(True) for p in leaves]
        return ws, f(dict(zip(names, ws)), x, y)

    def hand_rev_rev() -> Any:
        ws, loss = functional_leaves()
        g = torch.autograd.grad(loss, ws, create_graph=True)
        return torch.autograd.grad(g, ws, grad_outputs=v_leaves)

    def hand_fwd_rev() -> Any:
        return jvp(grad(lambda p: f(p, x, y)), (params,), (v_dict,))[1]

    def hand_rev_fwd() -> Any:
        return grad(lambda p: jvp(lambda q: f(q, x, y), (p,), (v_dict,))[1])(params)

    kept: dict[str, Any] = {}

    def hand_reused() -> Any:
        # The hand-written reused product: the gradient graph kept, one backward per product.
        if "graph" not in kept:
            ws, loss = functional_leaves()
            kept["graph"] = (ws, torch.autograd.grad(loss, ws, create_graph=True))
        ws, g = kept["graph"]
        return torch.autograd.grad(g, ws, grad_outputs=v_leaves, retain_graph=True)

    def peers(config: BenchConfig, notes: list[str]) -> dict[str, Thunk]:
        # the peers want a loss module (curvlinops reads its .reduction); the same loss
        return torch_peers(model, torch.nn.CrossEntropyLoss(), x, y, v, notes)

    return Setup(
        framework="torch",
        model_name=model_name,
        f=f,
        params=params,
        x=x,
        y=y,
        v=v,
        V=V,
        model=model,
        loss_fn=loss_of,
        model_params=None,
        device=str(device),
        num_params=d,
        gradient=gradient,
        hand={"fwd-rev": hand_fwd_rev, "rev-fwd": hand_rev_fwd, "rev-rev": hand_rev_rev},
        hand_reused=hand_reused,
        reused_mode="rev-rev",
        sync=sync,
        nbytes=lambda t: t.numel() * t.element_size(),
        peers=peers,
    )

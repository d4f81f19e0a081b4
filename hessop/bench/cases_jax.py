"""The JAX :class:`~hessop.bench.cases.Setup` of a reference model: the loss as a bound
method of the spec (a module-level loss, as users pass, so hessop shares one compilation
between operators at different points), ``jax.jit(jax.grad(f))`` and the hand-written
jitted products (``jvp(grad)``, ``grad(jvp)``, ``grad(<grad, v>)``, ``jax.linearize``).

Examples
--------
>>> from hessop.bench.cases_jax import build_setup
>>> from hessop.bench.config import BenchConfig
>>> s = build_setup("mlp", BenchConfig.quick_defaults())
>>> s.framework, s.num_params, s.V.shape, s.reused_mode
('jax', 970, (970, 4), 'fwd-rev')
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessop.bench.cases import Setup, Thunk
from hessop.bench.config import BenchConfig
from hessop.bench.reference import get_reference


def _tree_vdot(a: Any, b: Any) -> Any:
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return sum(jnp.vdot(s, t) for s, t in leaves)


def _hand_products(f: Any) -> dict[str, Any]:
    """The three modes written by hand, jitted: ``fn(params, v_tree, x, y)``."""
    grad_f = jax.grad(f)

    @jax.jit
    def fwd_rev(p, t, x, y):
        return jax.jvp(lambda q: grad_f(q, x, y), (p,), (t,))[1]

    @jax.jit
    def rev_fwd(p, t, x, y):
        return jax.grad(lambda q: jax.jvp(lambda r: f(r, x, y), (q,), (t,))[1])(p)

    @jax.jit
    def rev_rev(p, t, x, y):
        return jax.grad(lambda q: _tree_vdot(grad_f(q, x, y), t))(p)

    return {"fwd-rev": fwd_rev, "rev-fwd": rev_fwd, "rev-rev": rev_rev}


def _hand_reused(f: Any, params: Any, v_tree: Any, x: Any, y: Any) -> Thunk:
    """``jax.linearize`` of the gradient once, then its jitted linear map per product."""
    grad_f = jax.grad(f)

    @jax.jit
    def linearized(p, x, y):
        return jax.linearize(lambda q: grad_f(q, x, y), p)[1]

    apply = jax.jit(lambda lin, t: lin(t))
    kept: dict[str, Any] = {}

    def run() -> Any:
        if "lin" not in kept:
            kept["lin"] = linearized(params, x, y)
        return apply(kept["lin"], v_tree)

    return run


def build_setup(model_name: str, config: BenchConfig) -> Setup:
    """The JAX setup of reference model ``model_name`` on JAX's default device."""
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    spec = get_reference(model_name, **config.overrides(model_name))
    params = spec.jax_params(seed=config.seed, dtype=config.dtype)
    x, y = spec.make_batch(
        config.batch_sizes[model_name], seed=config.seed, framework="jax", dtype=config.dtype
    )
    f = spec.jax_objective
    sizes = [int(p.size) for p in params.values()]
    d = sum(sizes)
    rng = np.random.default_rng(config.seed + 1)
    v = jnp.asarray(rng.standard_normal(d), dtype=config.dtype)
    V = jnp.asarray(rng.standard_normal((d, config.k)), dtype=config.dtype)
    offsets = np.cumsum([0, *sizes])
    v_tree = {
        n: v[offsets[i] : offsets[i + 1]].reshape(p.shape)
        for i, (n, p) in enumerate(params.items())
    }
    jit_grad = jax.jit(jax.grad(f))
    hand = {mode: (lambda h=h: h(params, v_tree, x, y)) for mode, h in _hand_products(f).items()}
    return Setup(
        framework="jax",
        model_name=model_name,
        f=f,
        params=params,
        x=x,
        y=y,
        v=v,
        V=V,
        model=spec.jax_apply,
        loss_fn=spec.jax_loss,
        model_params=params,
        device=str(jax.devices()[0]),
        num_params=d,
        gradient=lambda: jit_grad(params, x, y),
        hand=hand,
        hand_reused=_hand_reused(f, params, v_tree, x, y),
        reused_mode="fwd-rev",
        sync=jax.block_until_ready,
        nbytes=lambda t: int(t.nbytes),
    )

"""What a loop that builds a new operator at every point pays: per step, hessop's build and
one product against the hand-written product (JAX: jitted jvp of grad; torch: double
backward), for a logistic loss that reads a closed-over array (d=200, n=512, float64).
Interleaved medians of 60 steps.

    python benchmarks/newton_loop.py jax
    python benchmarks/newton_loop.py torch
"""

import statistics
import sys
import time

import numpy as np

import hessop

fw = sys.argv[1] if len(sys.argv) > 1 else "torch"
d, n = 200, 512
rng = np.random.default_rng(0)
Xn, yn = rng.standard_normal((n, d)), rng.standard_normal(n)

if fw == "jax":
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    SCALE = jnp.asarray(rng.standard_normal(d))  # a closed-over array the loss reads
    X, y = jnp.asarray(Xn), jnp.asarray(yn)

    def loss(w, X, y):
        return jnp.mean(jnp.log1p(jnp.exp(-(X @ (w * SCALE)) * y))) + 1e-3 * jnp.sum(w**4)

    hand = jax.jit(lambda w, v, X, y: jax.jvp(lambda u: jax.grad(loss)(u, X, y), (w,), (v,))[1])
    w0 = jnp.zeros(d) + 0.1
    sync = lambda a: a.block_until_ready()
else:
    import torch

    torch.set_num_threads(1)
    SCALE = torch.tensor(rng.standard_normal(d))
    X, y = torch.tensor(Xn), torch.tensor(yn)

    def loss(w, X, y):
        return torch.mean(torch.log1p(torch.exp(-(X @ (w * SCALE)) * y))) + 1e-3 * torch.sum(w**4)

    def hand(w, v, X, y):
        w = w.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss(w, X, y), w, create_graph=True)
        return torch.autograd.grad(g, w, v)[0]

    w0 = torch.zeros(d, dtype=torch.float64) + 0.1
    sync = lambda a: a
v = w0 * 0 + 1


def step_hessop(i):
    w = w0 + 1e-3 * i
    H = hessop.hessian(loss, w, X, y)
    return sync(H @ v)


def step_hand(i):
    w = w0 + 1e-3 * i
    return sync(hand(w, v, X, y))


for f in (step_hessop, step_hand):
    f(0)
    f(1)
T = {"hessop": [], "hand": []}
for i in range(60):
    for k, f in (("hessop", step_hessop), ("hand", step_hand)):
        t = time.perf_counter()
        f(i + 2)
        T[k].append(time.perf_counter() - t)
m = {k: statistics.median(v) * 1e3 for k, v in T.items()}
ours, hand = m["hessop"], m["hand"]
print(f"{fw}: per step hessop {ours:.3f} ms, hand-written {hand:.3f} ms, ratio {ours / hand:.2f}")

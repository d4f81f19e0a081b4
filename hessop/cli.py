"""The ``hessop`` command line.

``hessop bench`` measures what a Hessian-vector product (HVP) costs next to a gradient, on
the reference models of :mod:`hessop.bench.reference`, in every installed framework:

* ``gradient``: the fastest plain gradient (torch: ``torch.autograd.grad`` on the module;
  JAX: ``jax.jit(jax.grad(f))``), the unit of every ratio;
* ``hvp:<mode>``: one HVP at a new point, through a fresh operator
  (``hessop.hessian(f, params, x, y, mode=...) @ v``), for each AD mode;
* ``hand:<mode>``: the same product written by hand with torch.autograd / torch.func / JAX,
  to measure the library's overhead;
* ``matvec``: a product with an operator that was used once already (the regime of CG and
  Lanczos), in the backend's default mode, and ``hand:matvec`` its hand-written twin;
* ``matmat``: ``k`` columns at once through that operator (reported per column);
* ``peer:<name>``: curvlinops, PyHessian and hessian-eigenthings on the same torch model
  (``--peers``, when they are installed).

Times are interleaved: every repeat runs each measurement once, in a rotating order, in one
process; the report gives medians, 20th and 80th percentiles and the ratio to the gradient
of the same repeat. Peak memory is measured in a fresh process per measurement, as what
a device allocator reports for that process: the arrays the measurement needs before its
call (parameters, batch, vector) plus what the call adds at its peak. The addition is read
on a GPU from the framework's allocator statistics, on a CPU as the growth of the resident
set size (the kernel's high-water mark, reset right before the call, with large
allocations forced to ``mmap`` so that freed memory leaves the process). The JSON keeps
both parts (``resident_bytes``, ``growth_bytes``) and the ratio of the growths alone.

Run ``hessop bench --help`` for the options.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import __version__

#: the AD modes measured by default (hessop's aliases)
BENCH_MODES: tuple[str, ...] = ("fwd-rev", "rev-fwd", "rev-rev")
FRAMEWORKS: tuple[str, ...] = ("torch", "jax")
MODELS: tuple[str, ...] = ("mlp", "cnn", "transformer")
PEERS: tuple[str, ...] = ("curvlinops", "pyhessian", "hessian-eigenthings")
_PEER_MODULES = {
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
    "pyhessian": ("pyhessian", "pyhessian"),
    "hessian-eigenthings": ("hessian_eigenthings", "hessian-eigenthings"),
}
_CANONICAL = {
    "fwd-rev": "forward-over-reverse",
    "rev-fwd": "reverse-over-forward",
    "rev-rev": "reverse-over-reverse",
}
_SHORT = {v: k for k, v in _CANONICAL.items()}

#: default batch sizes: the reference sizes (MLP 128, CNN 32, transformer 32) where a run
#: of the whole default benchmark still fits in about three minutes on two CPU cores
DEFAULT_BATCH_SIZES: dict[str, int] = {"mlp": 128, "cnn": 8, "transformer": 16}
DEFAULT_REPEATS = 4
DEFAULT_K = 8

#: tiny models for ``--quick`` (tests, smoke runs)
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "mlp": {"sizes": (32, 16, 16, 10)},
    "cnn": {"image_size": 6, "channels": 4, "num_blocks": 1},
    "transformer": {
        "vocab_size": 20,
        "seq_len": 6,
        "d_model": 8,
        "num_heads": 2,
        "num_layers": 1,
    },
}
QUICK_BATCH_SIZE = 4
QUICK_REPEATS = 3
QUICK_K = 4

#: the project's performance targets (ratios to a gradient unless stated)
TARGETS: dict[str, dict[str, float]] = {
    "new-point HVP / gradient": {"jax": 2.2, "torch": 2.5},
    "reused matvec / gradient": {"jax": 1.5, "torch": 2.0},
    "matmat per column / matvec": {"jax": 1.0, "torch": 1.0},
    "overhead vs hand-written": {"jax": 0.05, "torch": 0.05},
    "HVP peak memory / gradient": {"jax": 2.0, "torch": 2.0},
}


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What ``hessop bench`` measures; built from the command line by :func:`main`."""

    models: list[str] = field(default_factory=lambda: list(MODELS))
    frameworks: list[str] = field(default_factory=lambda: list(FRAMEWORKS))
    modes: list[str] = field(default_factory=lambda: list(BENCH_MODES))
    batch_sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BATCH_SIZES))
    repeats: int = DEFAULT_REPEATS
    k: int = DEFAULT_K
    dtype: str = "float32"
    memory: str = "isolated"  # "isolated" | "grouped" | "off"
    memory_reused: bool = False
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    peers: bool = False
    compile: bool = False
    quick: bool = False
    seed: int = 0
    progress: bool = True

    def overrides(self, model: str) -> dict[str, Any]:
        return dict(QUICK_OVERRIDES[model]) if self.quick else {}

    def to_json(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "frameworks": self.frameworks,
            "modes": self.modes,
            "batch_sizes": self.batch_sizes,
            "repeats": self.repeats,
            "k": self.k,
            "dtype": self.dtype,
            "memory": self.memory,
            "memory_reused": self.memory_reused,
            "threads": self.threads,
            "peers": self.peers,
            "compile": self.compile,
            "quick": self.quick,
            "seed": self.seed,
        }


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------
# benchmark cases: one framework x one model, as named zero-argument callables
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    """The callables measured for one framework and one model.

    ``fns`` maps a measurement name to a zero-argument callable that runs it once and waits
    for the result (``sync``); ``memory_fns`` are the callables measured for peak memory.
    """

    framework: str
    model: str
    batch_size: int
    num_params: int
    auto_mode: str
    device: str
    fns: dict[str, Callable[[], Any]]
    memory_fns: dict[str, Callable[[], Any]]
    sync: Callable[[Any], Any]
    notes: list[str] = field(default_factory=list)
    #: bytes of the arrays a memory measurement needs before its call (parameters, batch,
    #: vectors): a device allocator counts them in the peak, as in the ICLR 2024 blog post
    resident: dict[str, int] = field(default_factory=dict)
    #: figures the callables record while they run (``compile_time_s``), for the report
    extra: dict[str, Any] = field(default_factory=dict)


def build_case(framework: str, model: str, config: BenchConfig) -> Case:
    """Build the measured callables of ``model`` in ``framework`` (nothing is run yet)."""
    if framework == "torch":
        return _torch_case(model, config)
    if framework == "jax":
        return _jax_case(model, config)
    raise ValueError(f"unknown framework {framework!r}; valid ones are {', '.join(FRAMEWORKS)}")


def _torch_case(model_name: str, config: BenchConfig) -> Case:
    import torch
    from torch.func import functional_call, grad, jvp

    import hessop
    from hessop.bench import reference as R

    spec = R.get_reference(model_name, **config.overrides(model_name))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, config.dtype)
    model = spec.torch_model(seed=config.seed, dtype=dtype, device=device)
    B = config.batch_sizes[model_name]
    x, y = spec.make_batch(B, seed=config.seed, framework="torch", dtype=config.dtype)
    x, y = x.to(device), y.to(device)
    names = [n for n, _ in model.named_parameters()]
    leaves = list(model.parameters())
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss_of = spec.torch_loss
    d = sum(p.numel() for p in leaves)

    def f(p: dict[str, Any], x: Any, y: Any) -> Any:
        return loss_of(functional_call(model, p, (x,)), y)

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

    hand = {"fwd-rev": hand_fwd_rev, "rev-fwd": hand_rev_fwd, "rev-rev": hand_rev_rev}

    def new_point(mode: str) -> Callable[[], Any]:
        def run() -> Any:
            return hessop.hessian(f, params, x, y, backend="torch", mode=mode).matvec(v)

        return run

    fns: dict[str, Callable[[], Any]] = {"gradient": gradient}
    for mode in config.modes:
        fns[f"hvp:{mode}"] = new_point(mode)
        fns[f"hand:{mode}"] = hand[mode]
    extra: dict[str, Any] = {}
    if config.compile:
        fns["hvp:compiled"] = _compiled_new_point(f, params, (x, y), v, extra)

    H = hessop.hessian(f, params, x, y, backend="torch")
    auto = _SHORT.get(H.mode, H.mode)
    kept: dict[str, Any] = {}

    def hand_matvec() -> Any:
        # The hand-written reused product: the gradient graph kept, one backward per product.
        if "graph" not in kept:
            ws, loss = functional_leaves()
            kept["graph"] = (ws, torch.autograd.grad(loss, ws, create_graph=True))
        ws, g = kept["graph"]
        return torch.autograd.grad(g, ws, grad_outputs=v_leaves, retain_graph=True)

    matvec, matmat = _reused(H, v, V)
    fns["matvec"] = matvec
    fns["hand:matvec"] = hand_matvec if auto == "rev-rev" else hand[auto]
    fns["matmat"] = matmat

    notes: list[str] = []
    if config.peers:
        # the peers want a loss module (curvlinops reads its .reduction); the same loss
        fns.update(_torch_peers(model, torch.nn.CrossEntropyLoss(), x, y, v, notes))

    memory_fns = {"gradient": gradient}
    for mode in config.modes:
        memory_fns[f"hvp:{mode}"] = fns[f"hvp:{mode}"]

    def fresh_matvec() -> Any:  # an operator's whole life: state kept + two products
        op = hessop.hessian(f, params, x, y, backend="torch")
        op.matvec(v)
        return op.matvec(v)

    memory_fns["matvec"] = fresh_matvec
    memory_fns["matmat"] = lambda: hessop.hessian(f, params, x, y, backend="torch").matmat(V)
    resident = _resident(memory_fns, [*leaves, x, y], v, V, lambda t: t.numel() * t.element_size())
    return Case(
        "torch", model_name, B, d, auto, str(device), fns, memory_fns, sync, notes, resident, extra
    )


def _compiled_new_point(
    f: Any, params: Any, args: tuple[Any, ...], v: Any, extra: dict[str, Any]
) -> Callable[[], Any]:
    """One HVP at a new point through ``hessian(..., compile=True)``; the first operator's
    one-time compilation cost goes to ``extra``."""

    import hessop

    def run() -> Any:
        H = hessop.hessian(f, params, *args, compile=True)
        if "compile_time_s" not in extra:
            extra["compile_time_s"], extra["compiled_mode"] = H.compile_time, H.mode
        return H.matvec(v)

    return run


def _resident(
    memory_fns: dict[str, Any], base: list[Any], v: Any, V: Any, nbytes: Callable[[Any], int]
) -> dict[str, int]:
    """Bytes each memory measurement needs before its call: parameters and batch, plus the
    vector (or the k columns) of the products."""
    common = sum(nbytes(t) for t in base)
    extra = {"gradient": 0, "matmat": nbytes(V)}
    return {name: common + extra.get(name, nbytes(v)) for name in memory_fns}


def _reused(H: Any, v: Any, V: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """matvec and matmat of an operator that has made a product before (built lazily, so
    that the warm-up call also compiles the reused path rather than the first product)."""
    used: list[bool] = []

    def first_use() -> None:
        if not used:
            H.matvec(v)
            used.append(True)

    def matvec() -> Any:
        first_use()
        return H.matvec(v)

    def matmat() -> Any:
        first_use()
        return H.matmat(V)

    return matvec, matmat


def _torch_peers(model: Any, loss_of: Any, x: Any, y: Any, v: Any, notes: list[str]):
    """The peers' HVPs on copies of the model (they change model state: train flags, .grad)."""
    fns: dict[str, Callable[[], Any]] = {}
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    v_list = [t.view(s) for t, s in zip(v.split(sizes), shapes)]
    for peer in PEERS:
        module, dist = _PEER_MODULES[peer]
        if not installed(module):
            notes.append(f"{peer} is not installed (pip install {dist}); skipped")
            continue
        m = copy.deepcopy(model)
        try:
            if peer == "curvlinops":
                from curvlinops import HessianLinearOperator

                ps = [p for p in m.parameters() if p.requires_grad]

                def run_curvlinops(m=m, ps=ps) -> Any:
                    op = HessianLinearOperator(m, loss_of, ps, [(x, y)], check_deterministic=False)
                    return op @ v

                fns["peer:curvlinops"] = run_curvlinops
            elif peer == "pyhessian":
                from pyhessian import hessian as pyhessian_op
                from pyhessian.utils import hessian_vector_product

                def run_pyhessian(m=m) -> Any:
                    for p in m.parameters():
                        p.grad = None  # PyHessian reads (and accumulates into) .grad
                    with warnings_off():
                        op = pyhessian_op(m, loss_of, data=(x, y), cuda=x.is_cuda)
                    out = hessian_vector_product(op.gradsH, op.params, v_list)
                    for p in m.parameters():
                        p.grad = None  # its graph would leak otherwise
                    return out

                fns["peer:pyhessian"] = run_pyhessian
            else:
                from hessian_eigenthings import HessianOperator, supervised_loss

                op = HessianOperator(m, [(x, y)], supervised_loss(loss_of), full_dataset=True)
                fns["peer:hessian-eigenthings"] = lambda op=op: op.matvec(v)
        except Exception as err:  # a peer's API changed: report, keep benchmarking
            notes.append(f"{peer} failed to set up ({type(err).__name__}: {err}); skipped")
    return fns


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _jax_case(model_name: str, config: BenchConfig) -> Case:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import hessop
    from hessop.bench import reference as R

    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    spec = R.get_reference(model_name, **config.overrides(model_name))
    params = spec.jax_params(seed=config.seed, dtype=config.dtype)
    B = config.batch_sizes[model_name]
    x, y = spec.make_batch(B, seed=config.seed, framework="jax", dtype=config.dtype)
    # A module-level loss (here a bound method) is what users pass: hessop then shares one
    # compilation between operators at different points.
    f = spec.jax_objective
    d = sum(int(p.size) for p in params.values())
    rng = np.random.default_rng(config.seed + 1)
    v = jnp.asarray(rng.standard_normal(d), dtype=config.dtype)
    V = jnp.asarray(rng.standard_normal((d, config.k)), dtype=config.dtype)
    offsets = np.cumsum([0] + [int(p.size) for p in params.values()])
    v_tree = {
        n: v[offsets[i] : offsets[i + 1]].reshape(p.shape)
        for i, (n, p) in enumerate(params.items())
    }

    def sync(out: Any) -> Any:
        return jax.block_until_ready(out)

    grad_f = jax.grad(f)
    jit_grad = jax.jit(grad_f)

    def tree_vdot(a: Any, b: Any) -> Any:
        return sum(
            jnp.vdot(s, t)
            for s, t in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
        )

    @jax.jit
    def hand_fwd_rev(p, t, x, y):
        return jax.jvp(lambda q: grad_f(q, x, y), (p,), (t,))[1]

    @jax.jit
    def hand_rev_fwd(p, t, x, y):
        return jax.grad(lambda q: jax.jvp(lambda r: f(r, x, y), (q,), (t,))[1])(p)

    @jax.jit
    def hand_rev_rev(p, t, x, y):
        return jax.grad(lambda q: tree_vdot(grad_f(q, x, y), t))(p)

    hand = {"fwd-rev": hand_fwd_rev, "rev-fwd": hand_rev_fwd, "rev-rev": hand_rev_rev}

    def new_point(mode: str) -> Callable[[], Any]:
        def run() -> Any:
            return hessop.hessian(f, params, x, y, backend="jax", mode=mode).matvec(v)

        return run

    fns: dict[str, Callable[[], Any]] = {"gradient": lambda: jit_grad(params, x, y)}
    for mode in config.modes:
        fns[f"hvp:{mode}"] = new_point(mode)
        fns[f"hand:{mode}"] = lambda h=hand[mode]: h(params, v_tree, x, y)
    extra: dict[str, Any] = {}
    if config.compile:
        fns["hvp:compiled"] = _compiled_new_point(f, params, (x, y), v, extra)

    H = hessop.hessian(f, params, x, y, backend="jax")
    auto = _SHORT.get(H.mode, H.mode)

    @jax.jit
    def linearized(p, x, y):
        return jax.linearize(lambda q: grad_f(q, x, y), p)[1]

    apply = jax.jit(lambda lin, t: lin(t))
    kept: dict[str, Any] = {}

    def hand_matvec() -> Any:  # jax.linearize of the gradient once, then its linear map
        if "lin" not in kept:
            kept["lin"] = linearized(params, x, y)
        return apply(kept["lin"], v_tree)

    matvec, matmat = _reused(H, v, V)
    fns["matvec"] = matvec
    fns["hand:matvec"] = hand_matvec if auto == "fwd-rev" else fns[f"hand:{auto}"]
    fns["matmat"] = matmat

    memory_fns = {"gradient": fns["gradient"]}
    for mode in config.modes:
        memory_fns[f"hvp:{mode}"] = fns[f"hvp:{mode}"]

    def fresh_matvec() -> Any:
        op = hessop.hessian(f, params, x, y, backend="jax")
        jax.block_until_ready(op.matvec(v))
        return op.matvec(v)

    memory_fns["matvec"] = fresh_matvec
    memory_fns["matmat"] = lambda: hessop.hessian(f, params, x, y, backend="jax").matmat(V)
    device = str(jax.devices()[0])
    notes = []
    if config.peers:
        notes.append("the peers are torch libraries; none is measured in JAX")
    resident = _resident(memory_fns, [*params.values(), x, y], v, V, lambda t: int(t.nbytes))
    return Case(
        "jax", model_name, B, d, auto, device, fns, memory_fns, sync, notes, resident, extra
    )


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def _percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Median, 20th and 80th percentiles of ``samples``, and of their ratios to
    ``reference`` taken repeat by repeat (the same round of the interleaved loop).

    >>> s = summarize([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    >>> s["median_s"], s["ratio"], s["ratio_p20"]
    (4.0, 2.0, 2.0)
    """
    ratios = [a / b for a, b in zip(samples, reference)]
    return {
        "median_s": statistics.median(samples),
        "p20_s": _percentile(samples, 20),
        "p80_s": _percentile(samples, 80),
        "ratio": statistics.median(ratios),
        "ratio_p20": _percentile(ratios, 20),
        "ratio_p80": _percentile(ratios, 80),
        "repeats": len(samples),
    }


def time_case(case: Case, repeats: int, tick: Callable[[str], None]) -> dict[str, dict]:
    """Time every callable of ``case``: one warm-up call each, then ``repeats`` rounds.

    Each round runs every measurement once; the order rotates from round to round so that
    no measurement always follows the same one.
    """
    names = list(case.fns)
    first: dict[str, float] = {}
    for name in list(names):
        t0 = time.perf_counter()
        try:
            case.sync(case.fns[name]())
        except Exception as err:
            if not name.startswith("peer:"):
                raise
            # A peer library that fails on this model is reported, not fatal.
            names.remove(name)
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else ""
            case.notes.append(
                f"{name[5:]} failed on the {case.model} ({type(err).__name__}: {msg}); skipped"
            )
            continue
        first[name] = time.perf_counter() - t0
        tick(f"{case.framework} {case.model}: warm-up {name}")
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = case.fns[name]
            t0 = time.perf_counter()
            case.sync(fn())
            samples[name].append(time.perf_counter() - t0)
            tick(f"{case.framework} {case.model}: {name}")
    out: dict[str, dict] = {}
    for name in names:
        stats = summarize(samples[name], samples["gradient"])
        stats["first_call_s"] = first[name]
        out[name] = stats
    return out


# --------------------------------------------------------------------------------------
# peak memory, one fresh process per measurement
# --------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def measure_peak(case: Case, name: str) -> tuple[int, str]:
    """Peak memory (bytes) that one call of ``case.memory_fns[name]`` adds, and the method.

    The call runs once first (compilation, lazy initialization, allocator warm-up), then
    is measured. GPU: the framework's allocator statistics. CPU: growth of the resident set
    size over the call (Linux only), which counts every allocation the call makes.
    """
    fn = case.memory_fns[name]
    case.sync(fn())
    gc.collect()
    if case.framework == "torch" and case.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        case.sync(fn())
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    if case.framework == "jax":
        import jax

        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            # The peak cannot be reset; the warm-up ran the same computation, so the peak
            # since then is the peak of this computation.
            base = stats["bytes_in_use"]
            case.sync(fn())
            peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
            return peak - base, "jax memory_stats peak_bytes_in_use"
    if not _reset_peak_rss():
        raise OSError("cannot reset the peak RSS (/proc/self/clear_refs): Linux only")
    base = _status_bytes("VmRSS")
    out = case.sync(fn())
    peak = _status_bytes("VmHWM") - base
    del out
    return peak, "peak RSS growth (VmHWM)"


def _memory_worker(payload: str) -> int:
    """Entry point of the measuring subprocess: print {name: [bytes, method]} as JSON."""
    req = json.loads(payload)
    config = BenchConfig(**req["config"])
    if req["framework"] == "torch":
        _set_torch_threads(config.threads)
    case = build_case(req["framework"], req["model"], config)
    result = {}
    for name in req["names"]:
        growth, method = measure_peak(case, name)
        result[name] = (growth, method, case.resident.get(name, 0))
    print("HESSOP-MEMORY " + json.dumps(result))
    return 0


def measure_memory(
    framework: str,
    model: str,
    names: list[str],
    config: BenchConfig,
    tick: Callable[[str], None],
    jobs: int = 1,
) -> tuple[dict[str, tuple[int, int]], str, list[str]]:
    """Run the memory measurements in fresh processes (one per name, or one in all when
    ``config.memory == "grouped"``), ``jobs`` at a time; return (growth over the call,
    arrays resident before it) in bytes per name, the method, and notes. Each process
    measures its own memory, so CPU measurements may run side by side; on a GPU they must
    not (JAX preallocates most of the device)."""
    from concurrent.futures import ThreadPoolExecutor

    groups = [names] if config.memory == "grouped" else [[n] for n in names]
    env = dict(os.environ)
    # Large blocks get their own mmap and go back to the system when freed, so that the
    # resident set size follows what is live (glibc; ignored elsewhere).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    out: dict[str, tuple[int, int]] = {}
    notes: list[str] = []
    method = ""

    def run(group: list[str]) -> subprocess.CompletedProcess:
        payload = json.dumps(
            {
                "framework": framework,
                "model": model,
                "names": group,
                "config": {**config.to_json(), "peers": False, "progress": False},
            }
        )
        return subprocess.run(
            [sys.executable, "-m", "hessop.cli", "_memory-worker", payload],
            capture_output=True,
            text=True,
            env=env,
        )

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        procs = list(zip(groups, pool.map(run, groups)))
    for group, proc in procs:
        line = [s for s in proc.stdout.splitlines() if s.startswith("HESSOP-MEMORY ")]
        if proc.returncode != 0 or not line:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            notes.append(f"memory of {framework} {model} {group} failed: {err}")
        else:
            for name, (growth, how, resident) in json.loads(line[0].split(" ", 1)[1]).items():
                out[name] = (int(growth), int(resident))
                method = how
        tick(f"{framework} {model}: memory {', '.join(group)}")
    return out, method, notes


# --------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------


def _set_torch_threads(n: int | None) -> int | None:
    """Set torch's intra-op thread count; return the previous one (None: nothing changed)."""
    if n is None:
        return None
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "hessop": __version__,
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    for module in FRAMEWORKS:
        if installed(module):
            mod = __import__(module)
            info[module] = mod.__version__
    return info


def _memory_names(config: BenchConfig) -> list[str]:
    # The reused operator ("matvec": its kept state and two products) costs one more fresh
    # process per model; it is measured with --memory-reused. The k-column matmat is left
    # out: its memory grows with k by design.
    names = ["gradient"] + [f"hvp:{m}" for m in config.modes]
    return names + ["matvec"] if config.memory_reused else names


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run ``hessop bench`` with ``config`` and return the report (what ``--json`` writes)."""
    notes: list[str] = []
    frameworks = []
    for fw in config.frameworks:
        if installed(fw):
            frameworks.append(fw)
        else:
            notes.append(f"{fw} is not installed (pip install hessop[{fw}]); skipped")
    cases = [(fw, m) for fw in frameworks for m in config.models]
    # progress: warm-up + repeats per callable (a rough count before the cases exist)
    calls = 4 + 2 * len(config.modes) + (3 if config.peers else 0) + int(config.compile)
    per_case = (1 + config.repeats) * calls
    mem_steps = 0
    if config.memory != "off":
        mem_steps = 1 if config.memory == "grouped" else len(_memory_names(config))
    bar = _progress(len(cases) * (per_case + mem_steps), config.progress)

    def tick(desc: str) -> None:
        bar.set_description(desc[:60], refresh=False)
        bar.update(1)

    results = []
    restore_threads = _set_torch_threads(config.threads) if "torch" in frameworks else None
    try:
        for fw, model in cases:
            case = build_case(fw, model, config)
            timings = time_case(case, config.repeats, tick)
            notes.extend(case.notes)
            entry: dict[str, Any] = {
                "framework": fw,
                "model": model,
                "batch_size": case.batch_size,
                "num_params": case.num_params,
                "auto_mode": case.auto_mode,
                "device": case.device,
                "k": config.k,
                "measurements": timings,
                **case.extra,
            }
            del case
            gc.collect()
            if config.memory != "off":
                on_cpu = "cpu" in entry["device"].lower()
                jobs = min(2, os.cpu_count() or 1) if on_cpu else 1
                mem, method, mem_notes = measure_memory(
                    fw, model, _memory_names(config), config, tick, jobs
                )
                notes.extend(mem_notes)
                entry["memory_method"] = method
                for name, (growth, resident) in mem.items():
                    stats = timings.setdefault(name, {})
                    stats["peak_bytes"] = growth + resident
                    stats["growth_bytes"], stats["resident_bytes"] = growth, resident
                grad = timings.get("gradient", {})
                for name in mem:
                    stats = timings[name]
                    for key, ratio in (
                        ("peak_bytes", "memory_ratio"),
                        ("growth_bytes", "growth_ratio"),
                    ):
                        if grad.get(key):
                            stats[ratio] = stats[key] / grad[key]
            _derive(entry, config)
            results.append(entry)
    finally:
        bar.close()
        if restore_threads is not None:
            _set_torch_threads(restore_threads)
    report = {
        "hessop_version": __version__,
        "config": config.to_json(),
        "machine": machine_info(),
        "results": results,
        "notes": notes,
    }
    report["targets"] = check_targets(report)
    return report


def _derive(entry: dict[str, Any], config: BenchConfig) -> None:
    """Per-column matmat figures and the overheads over the hand-written products."""
    ms = entry["measurements"]
    if "matmat" in ms and "median_s" in ms["matmat"]:
        mm = ms["matmat"]
        mm["per_column_median_s"] = mm["median_s"] / config.k
        mm["per_column_ratio"] = mm["ratio"] / config.k
        if "matvec" in ms:
            mm["per_column_over_matvec"] = mm["per_column_median_s"] / ms["matvec"]["median_s"]
    overhead = {}
    for mode in [*config.modes, "matvec"]:
        ours = ms.get(f"hvp:{mode}" if mode != "matvec" else "matvec", {})
        hand = ms.get(f"hand:{mode}", {})
        if "median_s" in ours and "median_s" in hand:
            overhead[mode] = ours["median_s"] / hand["median_s"] - 1.0
    entry["overhead"] = overhead


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare the measured figures with :data:`TARGETS` (one row per model and framework)."""
    rows = []

    def add(name: str, entry: dict[str, Any], what: str, value: float | None) -> None:
        if value is None:
            return
        limit = TARGETS[name][entry["framework"]]
        rows.append(
            {
                "target": name,
                "framework": entry["framework"],
                "model": entry["model"],
                "what": what,
                "value": value,
                "limit": limit,
                "met": bool(value <= limit),
            }
        )

    for e in report["results"]:
        ms = e["measurements"]
        auto = e["auto_mode"]
        hvp = ms.get(f"hvp:{auto}", {})
        add("new-point HVP / gradient", e, f"hvp:{auto}", hvp.get("ratio"))
        compiled = ms.get("hvp:compiled", {}).get("ratio")
        add("new-point HVP / gradient", e, "compile=True", compiled)
        add("reused matvec / gradient", e, "matvec", ms.get("matvec", {}).get("ratio"))
        add(
            "matmat per column / matvec",
            e,
            f"matmat k={e['k']}",
            ms.get("matmat", {}).get("per_column_over_matvec"),
        )
        for mode, value in e.get("overhead", {}).items():
            add("overhead vs hand-written", e, mode, value)
        add("HVP peak memory / gradient", e, f"hvp:{auto}", hvp.get("memory_ratio"))
    return rows


class _NoBar:
    def set_description(self, *a: Any, **k: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True, unit="run")


# --------------------------------------------------------------------------------------
# output: table, plot
# --------------------------------------------------------------------------------------

_ORDER = ("gradient", "hvp", "hand", "matvec", "hand:matvec", "matmat", "peer")


def _row_order(name: str) -> tuple[int, str]:
    if name in ("gradient", "matvec", "hand:matvec", "matmat"):
        return (_ORDER.index(name), "")
    kind, _, rest = name.partition(":")
    return (_ORDER.index(kind) if kind in _ORDER else len(_ORDER), rest)


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what ``hessop bench`` prints)."""
    lines = []
    header = (
        f"{'measurement':<24}{'median ms':>11}{'p20-p80 ms':>19}{'x grad':>8}"
        f"{'p20-p80':>13}{'peak MB':>9}{'mem x grad':>11}{'overhead':>10}"
    )
    for e in report["results"]:
        ms = e["measurements"]
        lines.append("")
        lines.append(
            f"{e['framework']} / {e['model']}  (batch {e['batch_size']}, {e['num_params']:,} "
            f"parameters, {e['device']}, auto mode = {e['auto_mode']})"
        )
        if e.get("compile_time_s") is not None:
            lines.append(
                f"compile=True: {e['compiled_mode']}, compiled once in "
                f"{e['compile_time_s']:.1f} s (then shared by every new point)"
            )
        lines.append(header)
        lines.append("-" * len(header))
        for name in sorted(ms, key=_row_order):
            s = ms[name]
            if "median_s" not in s:
                continue
            label = name
            med, lo, hi = s["median_s"], s["p20_s"], s["p80_s"]
            ratio, rlo, rhi = s["ratio"], s["ratio_p20"], s["ratio_p80"]
            if name == "matmat":
                k = e["k"]
                label = f"matmat/col (k={k})"
                med, lo, hi = med / k, lo / k, hi / k
                ratio, rlo, rhi = ratio / k, rlo / k, rhi / k
            mem = s.get("peak_bytes")
            mem_s = f"{mem / 1e6:9.1f}" if mem is not None else f"{'':9}"
            mr = s.get("memory_ratio")
            mr_s = f"{mr:11.2f}" if mr is not None else f"{'':11}"
            key = name[4:] if name.startswith("hvp:") else name
            ov = (
                e.get("overhead", {}).get(key)
                if name.startswith("hvp:") or name == "matvec"
                else None
            )
            ov_s = f"{100 * ov:+9.1f}%" if ov is not None else f"{'':10}"
            lines.append(
                f"{label:<24}{1e3 * med:11.2f}{f'{1e3 * lo:.2f}-{1e3 * hi:.2f}':>19}"
                f"{ratio:8.2f}{f'{rlo:.2f}-{rhi:.2f}':>13}{mem_s}{mr_s}{ov_s}"
            )
    if report.get("targets"):
        lines.append("")
        lines.append("targets")
        lines.append(
            f"{'target':<30}{'framework':<10}{'model':<13}{'what':<16}{'value':>8}"
            f"{'limit':>8}  result"
        )
        for t in report["targets"]:
            pct = t["target"].startswith("overhead")
            val = f"{100 * t['value']:+.1f}%" if pct else f"{t['value']:.2f}"
            lim = f"{100 * t['limit']:.0f}%" if pct else f"{t['limit']:.2f}"
            lines.append(
                f"{t['target']:<30}{t['framework']:<10}{t['model']:<13}{t['what']:<16}"
                f"{val:>8}{lim:>8}  {'met' if t['met'] else 'MISSED'}"
            )
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    m = report.get("machine", {})
    lines.append(
        f"machine: {m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, load "
        f"{m.get('load_average', '?')}; torch {m.get('torch', '-')}, jax {m.get('jax', '-')}"
    )
    return "\n".join(lines).lstrip("\n")


def plot_report(report: dict[str, Any], path: str) -> None:
    """Bar chart of the ratios to a gradient (time, and memory when measured), like the
    figure of the ICLR 2024 HVP blog post: one panel per framework, bars per model and
    mode, dots for the hand-written products."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    frameworks = list(dict.fromkeys(e["framework"] for e in results))
    has_mem = any("memory_ratio" in s for e in results for s in e["measurements"].values())
    rows = 2 if has_mem else 1
    fig, axes = plt.subplots(
        rows,
        max(1, len(frameworks)),
        figsize=(6 * max(1, len(frameworks)), 4 * rows),
        squeeze=False,
    )
    modes = report["config"]["modes"]
    bars = [f"hvp:{m}" for m in modes] + ["matvec", "matmat"]
    labels = [f"{m} (new point)" for m in modes] + ["reused matvec", "matmat / column"]
    colors = plt.get_cmap("tab10").colors
    for j, fw in enumerate(frameworks):
        entries = [e for e in results if e["framework"] == fw]
        models = [e["model"] for e in entries]
        width = 0.8 / len(bars)
        for row in range(rows):
            ax = axes[row][j]
            for b, (name, label) in enumerate(zip(bars, labels)):
                xs, hs, lo, hi, dots = [], [], [], [], []
                for i, e in enumerate(entries):
                    s = e["measurements"].get(name, {})
                    if row == 0 and "ratio" in s:
                        scale = e["k"] if name == "matmat" else 1
                        r = s["ratio"] / scale
                        xs.append(i + (b - (len(bars) - 1) / 2) * width)
                        hs.append(r)
                        lo.append(r - s["ratio_p20"] / scale)
                        hi.append(s["ratio_p80"] / scale - r)
                        hand = e["measurements"].get(
                            f"hand:{name[4:]}" if name.startswith("hvp:") else f"hand:{name}",
                            {},
                        )
                        dots.append(hand.get("ratio") if name != "matmat" else None)
                    elif row == 1 and "memory_ratio" in s:
                        xs.append(i + (b - (len(bars) - 1) / 2) * width)
                        hs.append(s["memory_ratio"])
                if not xs:
                    continue
                kw = {"yerr": [lo, hi], "capsize": 2} if row == 0 else {}
                ax.bar(xs, hs, width, label=label, color=colors[b % len(colors)], **kw)
                if row == 0:
                    pts = [(x, d) for x, d in zip(xs, dots) if d is not None]
                    if pts:
                        ax.plot(
                            [p[0] for p in pts],
                            [p[1] for p in pts],
                            "k.",
                            label="hand-written" if b == 0 else None,
                        )
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.axhline(2.0, color="gray", lw=0.8, ls="--")
            ax.set_xticks(range(len(models)))
            ax.set_xticklabels(models)
            what = "time" if row == 0 else "peak memory"
            ax.set_ylabel(f"{what} / gradient")
            ax.set_title(f"{fw}: {what} relative to a gradient")
            if j == 0 and row == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------


def _csv(valid: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"invalid choice {', '.join(bad) or repr(text)}; choose from {', '.join(valid)} "
                "(comma-separated)"
            )
        return list(dict.fromkeys(items))

    return parse


def _batch_sizes(text: str) -> dict[str, int] | int:
    """``128`` (every model) or ``mlp=128,cnn=32``."""
    if "=" not in text:
        return _positive(text)
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in MODELS:
            raise argparse.ArgumentTypeError(
                f"unknown model {name!r} in --batch-size; choose from {', '.join(MODELS)}"
            )
        out[name] = _positive(value)
    return out


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessop",
        description="Matrix-free Hessian operators for PyTorch and JAX.",
    )
    parser.add_argument("--version", action="version", version=f"hessop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{bench}")
    bench = sub.add_parser(
        "bench",
        help="time HVPs against a gradient on the reference models",
        description=(
            "Time a gradient and Hessian-vector products (every AD mode, at a new point and "
            "with a reused operator, and k columns at once) on the reference models (MLP, "
            "residual CNN, transformer) in each installed framework; report medians, "
            "20th-80th percentiles, ratios to the gradient, peak memory, the overhead over "
            "hand-written torch.func / JAX code, and the project's targets."
        ),
    )
    bench.add_argument(
        "--models",
        type=_csv(MODELS),
        default=list(MODELS),
        help=f"comma-separated models (default: {','.join(MODELS)})",
    )
    bench.add_argument(
        "--frameworks",
        type=_csv(FRAMEWORKS),
        default=list(FRAMEWORKS),
        help=f"comma-separated frameworks (default: {','.join(FRAMEWORKS)}; those not "
        "installed are skipped)",
    )
    bench.add_argument(
        "--modes",
        type=_csv(BENCH_MODES),
        default=list(BENCH_MODES),
        help=f"comma-separated AD modes (default: {','.join(BENCH_MODES)})",
    )
    bench.add_argument(
        "--batch-size",
        type=_batch_sizes,
        default=None,
        help="one batch size for every model, or per model: mlp=128,cnn=32,transformer=32 "
        f"(default {','.join(f'{k}={v}' for k, v in DEFAULT_BATCH_SIZES.items())}; "
        f"{QUICK_BATCH_SIZE} with --quick)",
    )
    bench.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        help=f"timed rounds (default {DEFAULT_REPEATS}; {QUICK_REPEATS} quick)",
    )
    bench.add_argument(
        "--k",
        type=_positive,
        default=None,
        help=f"columns of the matmat (default {DEFAULT_K}; {QUICK_K} quick)",
    )
    bench.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32", help="(default: float32)"
    )
    bench.add_argument(
        "--memory",
        choices=("isolated", "grouped", "off"),
        default=None,
        help="peak memory: one fresh process per measurement (isolated), one per framework "
        "and model (grouped, the --quick default), or not at all",
    )
    bench.add_argument(
        "--memory-reused",
        action="store_true",
        help="also measure the memory of a reused operator (its kept state and two products)",
    )
    bench.add_argument(
        "--peers",
        action="store_true",
        help="also time curvlinops, PyHessian and hessian-eigenthings (torch) when installed",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="also time HVPs at a new point with hessian(..., compile=True) and report the "
        "one-time compilation (torch.compile takes 10-60 s per model on 2 CPU cores)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="tiny models and few repeats (smoke tests)"
    )
    bench.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch intra-op threads (default: torch's own choice); 1 is steadier on a "
        "machine shared with other jobs. JAX's CPU threads are set by XLA at startup.",
    )
    bench.add_argument("--seed", type=int, default=0, help="seed of weights, data and vectors")
    bench.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    bench.add_argument("--plot", metavar="PNG", help="write a bar chart (needs matplotlib)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.set_defaults(func=_cmd_bench)
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    batch: dict[str, int] = (
        {m: QUICK_BATCH_SIZE for m in MODELS} if quick else dict(DEFAULT_BATCH_SIZES)
    )
    if isinstance(args.batch_size, int):
        batch = {m: args.batch_size for m in MODELS}
    elif isinstance(args.batch_size, dict):
        batch.update(args.batch_size)
    return BenchConfig(
        models=args.models,
        frameworks=args.frameworks,
        modes=args.modes,
        batch_sizes=batch,
        repeats=args.repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS),
        k=args.k or (QUICK_K if quick else DEFAULT_K),
        dtype=args.dtype,
        memory=args.memory or ("grouped" if quick else "isolated"),
        memory_reused=bool(args.memory_reused),
        threads=args.threads,
        peers=bool(args.peers),
        compile=bool(args.compile),
        quick=quick,
        seed=args.seed,
        progress=not args.no_progress,
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.plot and not installed("matplotlib"):
        print("hessop bench: --plot needs matplotlib (pip install hessop[plot])", file=sys.stderr)
        return 2
    report = run_bench(config)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hessop`` command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_memory-worker"]:  # internal: the measuring subprocess
        return _memory_worker(argv[1])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

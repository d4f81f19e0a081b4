"""Data-parallel operators (hessop.distributed): several processes, one answer.

torch: two gloo ranks on loopback, each a separate process running this module as a script,
hold uneven shards (one holds nothing in one case) and are checked against one process
holding all the data and against a dense ``torch.func.hessian``. JAX: four host devices
(``XLA_FLAGS`` set before JAX is imported, in a subprocess) against one device and
``jax.hessian``. Both run in the default suite, in well under a minute together.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve()
TIMEOUT = 120  # seconds for a whole multi-process run: a hang must fail, not block

BATCH_SIZES = (5, 4, 3, 7, 4)  # 23 samples
RANK_BATCHES = ((0, 1, 2), (3, 4))  # uneven shards: 3 batches / 12 samples, 2 / 11
JAX_BATCH_SIZES = (8, 4)  # divisible by the 4 devices; each new shape costs a compile
SHAPES = {"W1": (4, 3), "b1": (4,), "W2": (2, 4), "b2": (2,)}  # insertion order = layout


# --- the problem, shared by the workers ---------------------------------------------------
def make_problem(sizes: tuple[int, ...] = BATCH_SIZES) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = sum(sizes)
    X = rng.standard_normal((n, 3))
    Y = rng.standard_normal((n, 2))
    params = {
        "W1": 0.7 * rng.standard_normal((4, 3)),
        "b1": 0.2 * rng.standard_normal(4),
        "W2": 0.7 * rng.standard_normal((2, 4)),
        "b2": 0.2 * rng.standard_normal(2),
    }
    return params, X, Y


def split(X: np.ndarray, Y: np.ndarray, sizes: tuple[int, ...]) -> list[tuple[Any, Any]]:
    cuts = np.cumsum(sizes)[:-1]
    return list(zip(np.split(X, cuts), np.split(Y, cuts)))


def mlp_loss(p: dict, X: Any, Y: Any) -> Any:
    """Batch-mean squared error of a tanh MLP, written once with the array API."""
    import array_api_compat

    xp = array_api_compat.array_namespace(X)
    h = xp.tanh(X @ p["W1"].T + p["b1"])
    out = h @ p["W2"].T + p["b2"]
    return xp.mean(xp.sum((out - Y) ** 2, axis=1))


def flat_loss(w: Any, X: Any, Y: Any) -> Any:
    """``mlp_loss`` of a flat vector: the dense references' input, independent of hessop."""
    p, start = {}, 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        p[name] = w[start : start + size].reshape(shape)
        start += size
    return mlp_loss(p, X, Y)


def flat_point(params: dict) -> np.ndarray:
    return np.concatenate([params[name].ravel() for name in SHAPES])


def mlp_loss_sum(p: dict, X: Any, Y: Any) -> Any:
    return mlp_loss(p, X, Y) * X.shape[0]


def _algorithms() -> Any:
    try:
        import hessop.algorithms as alg

        return alg
    except ImportError:  # pragma: no cover - the algorithms are written in parallel
        return None


# --- torch worker: one rank of two ---------------------------------------------------------
def torch_worker(rank: int, store: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    import hessop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    params, X, Y = make_problem()
    batches = split(X, Y, BATCH_SIZES)
    local = [batches[i] for i in RANK_BATCHES[rank]]
    res: dict[str, Any] = {}

    H = hessop.hessian(mlp_loss, params, data=local, backend="torch", distributed=True)
    one = hessop.hessian(mlp_loss, params, data=batches, backend="torch")
    d = H.shape[0]
    rng = np.random.default_rng(1)
    v = torch.as_tensor(rng.standard_normal(d))
    V = torch.as_tensor(rng.standard_normal((d, 3)))
    res["v"], res["V"] = v, V

    calls = []
    all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    res["hv"], res["hv_calls"] = H @ v, list(calls)
    calls.clear()
    res["hV"], res["hV_calls"] = H @ V, list(calls)
    calls.clear()
    loss, grad = H.loss_and_gradient()
    res["loss"], res["grad"], res["grad_calls"] = loss, grad, list(calls)
    dist.all_reduce = all_reduce

    res["hv_one"], res["hV_one"] = one @ v, one @ V
    res["loss_one"], res["grad_one"] = one.loss_and_gradient()
    w0, Xt, Yt = (torch.as_tensor(a) for a in (flat_point(params), X, Y))
    res["dense"] = torch.func.hessian(flat_loss)(w0, Xt, Yt)

    alg = _algorithms()
    if alg is not None:
        res["eig"] = alg.eigsh(H, k=2, which="LA", tol=1e-13, seed=0).eigenvalues
        res["eig_one"] = alg.eigsh(one, k=2, which="LA", tol=1e-13, seed=0).eigenvalues
        b = torch.as_tensor(rng.standard_normal(d))
        res["cg"] = alg.cg(H, b, damping=5.0, tol=1e-12).x
        res["cg_one"] = alg.cg(one, b, damping=5.0, tol=1e-12).x
        res["trace"] = alg.trace(H, 6, seed=3).estimate
        res["trace_one"] = alg.trace(one, 6, seed=3).estimate
        res["density"] = alg.spectral_density(H, num_probes=2, num_iter=8, seed=0).density
        res["density_one"] = alg.spectral_density(one, num_probes=2, num_iter=8, seed=0).density
    else:  # pragma: no cover
        import scipy.sparse.linalg as spla

        v0 = np.ones(d)
        res["eig"] = spla.eigsh(H.to_scipy(), k=2, which="LA", tol=1e-13, v0=v0)[0]
        res["eig_one"] = spla.eigsh(one.to_scipy(), k=2, which="LA", tol=1e-13, v0=v0)[0]

    # rank 1 holds nothing: it contributes zeros and size 0 to each product
    H_empty = hessop.hessian(
        mlp_loss, params, data=batches if rank == 0 else [], backend="torch", distributed=True
    )
    res["hv_empty"], res["grad_empty"] = H_empty @ v, H_empty.gradient()
    # reduction="sum": the plain sum over both ranks
    H_sum = hessop.hessian(
        mlp_loss_sum, params, data=local, backend="torch", reduction="sum", distributed=True
    )
    one_sum = hessop.hessian(mlp_loss_sum, params, data=batches, backend="torch", reduction="sum")
    res["hv_sum"], res["hv_sum_one"] = H_sum @ v, one_sum @ v
    # an explicit process group, and forward-over-reverse
    group = dist.new_group([0, 1])
    H_group = hessop.hessian(
        mlp_loss, params, data=local, backend="torch", mode="fwd-rev",
        distributed=True, process_group=group,
    )  # fmt: skip
    res["hv_group"] = H_group @ v
    # the model adapter forwards distributed= to hessian()
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    with torch.no_grad():
        for prm, name in zip(model.parameters(), ("W1", "b1", "W2", "b2")):
            prm.copy_(torch.as_tensor(params[name]))
    before = [p.detach().clone() for p in model.parameters()]

    def mse(out, y):
        return ((out - y) ** 2).sum(dim=1).mean()

    Hm = hessop.model_hessian(model, mse, local, distributed=True)
    res["hv_model"] = Hm @ v
    res["model_unchanged"] = all(
        torch.equal(a, b) for a, b in zip(before, model.parameters())
    ) and all(p.grad is None for p in model.parameters())
    # ranks at different points: an error on every rank, not a silent wrong answer
    bad = dict(params, b2=params["b2"] + 0.1 * rank)
    try:
        hessop.hessian(mlp_loss, bad, data=local, backend="torch", distributed=True)
        res["mismatch"] = ""
    except hessop.DistributedError as err:
        res["mismatch"] = str(err)

    # all_reduce is invisible to autograd: refuse rather than return one rank's gradients
    try:
        hessop.hessian(
            mlp_loss, params, data=local, backend="torch", distributed=True, differentiable=True
        ) @ v
        res["differentiable"] = ""
    except hessop.DistributedError as err:
        res["differentiable"] = str(err)

    dist.destroy_process_group()
    np.savez(out, **{k: _np(x) for k, x in res.items()})


# --- JAX worker: four host devices --------------------------------------------------------
def jax_worker(out: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import hessop

    devices = jax.devices()
    assert len(devices) == 4, devices
    params, X, Y = make_problem(JAX_BATCH_SIZES)
    batches = split(X, Y, JAX_BATCH_SIZES)
    res: dict[str, Any] = {}

    H = hessop.hessian(mlp_loss, params, data=batches, backend="jax", distributed=True)
    one = hessop.hessian(mlp_loss, params, data=batches, backend="jax")
    res["one_device"] = one.device == devices[0]
    res["op_devices"] = len(H.device.device_set)
    args = H.batches.first()
    res["batch_devices"] = len(args[0].sharding.device_set)
    res["batch_spec"] = str(args[0].sharding.spec)
    d = H.shape[0]
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.standard_normal(d))  # uncommitted, on device 0
    V = jnp.asarray(rng.standard_normal((d, 3)))
    res["v"], res["V"] = v, V
    res["hv"] = H @ v
    res["hv_devices"] = len((H @ v).sharding.device_set)
    res["hv_committed"] = H @ jax.device_put(v, devices[0])  # committed to one device
    res["hV"] = H @ V
    res["loss"], res["grad"] = H.loss_and_gradient()
    res["hv_one"], res["hV_one"] = one @ v, one @ V
    res["loss_one"], res["grad_one"] = one.loss_and_gradient()
    # XLA, not hessop, reduces over the devices: the compiled product holds an all-reduce
    hlo = (
        H._kernel.fns.hvp.lower(H._point, H.batches.reducer.replicate(v), args).compile().as_text()
    )
    res["hlo_all_reduce"] = "all-reduce" in hlo
    res["w_devices"] = len(H.ravel(params).sharding.device_set)
    res["dense"] = jax.jit(jax.hessian(flat_loss))(flat_point(params), X, Y)
    alg = _algorithms()
    if alg is not None:
        res["eig"] = alg.eigsh(H, k=2, which="LA", tol=1e-13, seed=0).eigenvalues
    # arrays the caller already sharded are used as they are
    mesh = Mesh(np.array(devices), ("batch",))
    rows = NamedSharding(mesh, PartitionSpec("batch"))
    pre = [tuple(jax.device_put(a, rows) for a in b) for b in batches]
    res["hv_presharded"] = (
        hessop.hessian(mlp_loss, params, data=pre, backend="jax", distributed=True) @ v
    )
    # a mesh of two of the four devices
    two = Mesh(np.array(devices[:2]), ("data",))
    H2 = hessop.hessian(
        mlp_loss, params, data=batches, backend="jax", distributed=True, process_group=two
    )
    res["hv_two"], res["two_devices"] = H2 @ v, len(H2.device.device_set)
    # a batch that does not split evenly over the devices
    try:
        odd = split(X[:5], Y[:5], (5,))
        hessop.hessian(mlp_loss, params, data=odd, backend="jax", distributed=True) @ v
        res["indivisible"] = ""
    except hessop.ShapeError as err:
        res["indivisible"] = str(err)
    np.savez(out, **{k: _np(x) for k, x in res.items()})


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


# --- launching ----------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1]), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def _start(*argv: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE), *argv],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(procs: list[subprocess.Popen]) -> str | None:
    """None when every process exits 0, else the output of the first that failed."""
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return f"the distributed workers did not finish within {TIMEOUT} s"
    return next((text for p, text in zip(procs, outs) if p.returncode != 0), None)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> dict[str, Any]:
    """Run the torch ranks and the JAX process at once (their start-up costs overlap)."""
    tmp = tmp_path_factory.mktemp("distributed")
    runs: dict[str, tuple[list[subprocess.Popen], list[Path]]] = {}
    if _has("torch"):
        outs = [tmp / f"rank{r}.npz" for r in (0, 1)]
        store = str(tmp / "store")
        runs["torch"] = ([_start("torch", str(r), store, str(outs[r])) for r in (0, 1)], outs)
    if _has("jax"):
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        out = tmp / "jax.npz"
        runs["jax"] = ([_start("jax", str(out), XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")],
                       [out])  # fmt: skip
    results: dict[str, Any] = {}
    for name, (procs, outs) in runs.items():
        failure = _wait(procs)
        results[name] = failure if failure else [dict(np.load(o)) for o in outs]
    return results


def _results(workers: dict[str, Any], name: str) -> Any:
    if name not in workers:
        pytest.skip(f"{name} is not installed")
    if isinstance(workers[name], str):
        pytest.fail(workers[name])
    return workers[name]


@pytest.fixture(scope="module")
def torch_ranks(workers) -> list[dict[str, np.ndarray]]:
    return _results(workers, "torch")


@pytest.fixture(scope="module")
def jax_devices(workers) -> dict[str, np.ndarray]:
    return _results(workers, "jax")[0]


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-12) -> None:
    scale = max(float(np.abs(b).max()), 1e-300)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


# --- torch ---------------------------------------------------------------------------------
def test_torch_products_match_one_process(torch_ranks):
    for r in torch_ranks:
        for key in ("hv", "hV", "loss", "grad"):
            close(r[key], r[key + "_one"])
        close(r["hv"], r["dense"] @ r["v"])
        close(r["hV"], r["dense"] @ r["V"])


def test_torch_one_all_reduce_per_product(torch_ranks):
    d = torch_ranks[0]["dense"].shape[0]
    for r in torch_ranks:
        assert list(r["hv_calls"]) == [d + 1]  # the product and the sample count
        assert list(r["hV_calls"]) == [3 * d + 1]  # the whole block at once
        assert list(r["grad_calls"]) == [d + 2]  # gradient, loss and count


def test_torch_ranks_agree_bitwise(torch_ranks):
    r0, r1 = torch_ranks
    assert set(r0) == set(r1)
    for key in r0:
        if key != "mismatch":
            np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)


def test_torch_algorithms_run_unchanged(torch_ranks):
    for r in torch_ranks:
        close(r["eig"], r["eig_one"])
        close(r["eig"], np.linalg.eigvalsh(r["dense"])[-2:], rtol=1e-10)
        if "cg" in r:
            close(r["cg"], r["cg_one"], rtol=1e-10)
            close(r["trace"], r["trace_one"])
            close(r["density"], r["density_one"], rtol=1e-9)


def test_torch_uneven_empty_sum_group_and_model(torch_ranks):
    for r in torch_ranks:
        close(r["hv_empty"], r["hv_one"])
        close(r["grad_empty"], r["grad_one"])
        close(r["hv_sum"], r["hv_sum_one"])
        close(r["hv_sum"], sum(BATCH_SIZES) * r["hv_one"])
        close(r["hv_group"], r["hv_one"])
        close(r["hv_model"], r["hv_one"])
        assert bool(r["model_unchanged"])


def test_torch_ranks_at_different_points_raise(torch_ranks):
    for r in torch_ranks:
        assert "parameters differ" in str(r["mismatch"])
        assert "differentiable=True is not supported" in str(r["differentiable"])


def test_torch_without_process_group_raises():
    torch = pytest.importorskip("torch")
    import torch.distributed as dist

    import hessop

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    w = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(hessop.DistributedError, match="init_process_group"):
        hessop.hessian(lambda w, x: (x @ w).sum(), w, data=[(torch.ones(3, 2),)],
                       distributed=True)  # fmt: skip
    with pytest.raises(TypeError, match="distributed=True"):
        hessop.hessian(lambda w, x: (x @ w).sum(), w, data=[(torch.ones(3, 2),)],
                       process_group=object())  # fmt: skip


# --- JAX ------------------------------------------------------------------------------------
def test_jax_sharded_batches_match_one_device(jax_devices):
    r = jax_devices
    assert bool(r["one_device"])
    assert int(r["op_devices"]) == 4 and int(r["w_devices"]) == 4
    assert int(r["batch_devices"]) == 4 and "batch" in str(r["batch_spec"])
    assert int(r["hv_devices"]) == 4
    assert bool(r["hlo_all_reduce"])
    for key in ("hv", "hV", "loss", "grad"):
        close(r[key], r[key + "_one"])
    close(r["hv"], r["dense"] @ r["v"])
    close(r["hV"], r["dense"] @ r["V"])
    for key in ("hv_committed", "hv_presharded", "hv_two"):
        close(r[key], r["hv_one"])
    assert int(r["two_devices"]) == 2
    if "eig" in r:
        close(r["eig"], np.linalg.eigvalsh(r["dense"])[-2:], rtol=1e-10)


def test_jax_indivisible_batch_is_a_clear_error(jax_devices):
    msg = str(jax_devices["indivisible"])
    assert "5 samples" in msg and "divisible by 4" in msg


def test_jax_distributed_on_one_device():
    jax = pytest.importorskip("jax")
    import hessop

    params, X, Y = make_problem((6, 6))
    batches = split(X, Y, (6, 6))
    ndev = len(jax.devices())
    if 6 % ndev:
        pytest.skip("needs a device count dividing the batch sizes")
    H = hessop.hessian(mlp_loss, params, data=batches, backend="jax", distributed=True)
    one = hessop.hessian(mlp_loss, params, data=batches, backend="jax")
    v = jax.numpy.asarray(np.random.default_rng(1).standard_normal(H.shape[0]))
    close(_np(H @ v), _np(one @ v))
    with pytest.raises(TypeError, match="Mesh"):
        hessop.hessian(mlp_loss, params, data=batches, backend="jax", distributed=True,
                       process_group="world")  # fmt: skip


@pytest.mark.slow
def test_example_runs_under_torchrun():
    pytest.importorskip("torch")
    example = HERE.parents[1] / "examples" / "distributed_eigsh.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(example)], env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches one process over all the data" in proc.stdout


if __name__ == "__main__":
    if sys.argv[1] == "torch":
        torch_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        jax_worker(sys.argv[2])
    print(json.dumps({"ok": True}))

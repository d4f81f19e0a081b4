"""The misuse suite, part 2: model-level operators, state changed after construction, and
threads (see ``misuse.py`` for the table machinery).

References: dense Hessians by ``torch.func.hessian`` / ``jax.hessian`` of the loss written
by hand, closed forms, and per-sample gradients by ``torch.func`` directly.
"""

from __future__ import annotations

import threading
from functools import cache

import numpy as np
import pytest
from misuse import (
    A3,
    QUAD_H,
    V3,
    W3,
    close,
    err,
    is_true,
    nat,
    ok,
    only,
    other,
    params,
    quad,
    run_case,
)

import hessop
from conftest import to_numpy

torch = pytest.importorskip("torch")
nn = torch.nn
E = hessop

RNG = np.random.default_rng(11)
X = RNG.standard_normal((6, 3))
Y = np.array([0, 1, 1, 0, 1, 0])
D = 26  # parameters of the MLP below
V26 = RNG.standard_normal(D)
WEIGHTS = {
    "0.weight": 0.5 * RNG.standard_normal((4, 3)),
    "0.bias": 0.1 * RNG.standard_normal(4),
    "2.weight": 0.5 * RNG.standard_normal((2, 4)),
    "2.bias": 0.1 * RNG.standard_normal(2),
}


def mlp(*extra: nn.Module) -> nn.Module:
    """A fresh 3-4-2 tanh MLP with the fixed WEIGHTS (float64)."""
    with torch.random.fork_rng(devices=[]):  # module construction draws from torch's RNG
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), *extra).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.as_tensor(WEIGHTS[name]))
    return model


def data(n=6):
    return torch.as_tensor(X[:n]), torch.as_tensor(Y[:n])


CE = nn.CrossEntropyLoss()


def flat_loss(theta, x, y, reduction="mean"):
    """The MLP's cross-entropy as a function of the flat parameters, by hand."""
    W1, b1 = theta[:12].reshape(4, 3), theta[12:16]
    W2, b2 = theta[16:24].reshape(2, 4), theta[24:26]
    out = torch.tanh(x @ W1.T + b1) @ W2.T + b2
    return nn.functional.cross_entropy(out, y, reduction=reduction)


THETA = np.concatenate([WEIGHTS[k].ravel() for k in ("0.weight", "0.bias", "2.weight", "2.bias")])


@cache
def hessian_ref(n=6):
    x, y = data(n)
    return torch.func.hessian(flat_loss)(torch.as_tensor(THETA), x, y).numpy()


@cache
def per_sample_grads():
    x, y = data()
    g = torch.func.vmap(torch.func.grad(flat_loss), in_dims=(None, 0, 0))
    return g(torch.as_tensor(THETA), x[:, None], y[:, None]).numpy()


def ggn_ref():
    """J^T H_out J by hand from torch.func Jacobians (the output's and the loss's)."""
    x, y = data()

    def out(theta):
        W1, b1 = theta[:12].reshape(4, 3), theta[12:16]
        W2, b2 = theta[16:24].reshape(2, 4), theta[24:26]
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    theta = torch.as_tensor(THETA)
    J = torch.func.jacrev(out)(theta).reshape(-1, D)
    Hout = torch.func.hessian(lambda o: CE(o.reshape(6, 2), y))(out(theta).reshape(-1))
    return (J.T @ Hout @ J).numpy()


def v26():
    return torch.as_tensor(V26)


def mh(model=None, loss=CE, batch=None, **kw):
    model = mlp() if model is None else model
    return hessop.model_hessian(model, loss, data() if batch is None else batch, **kw)


def first(H):
    return H @ torch.ones(H.shape[0], dtype=torch.float64)


def batches():
    x, y = data()
    return [(x[:2], y[:2]), (x[2:], y[2:])]


def torch_rows(*cases):
    return only(("torch",), *cases)


# --- M. model_hessian / model_hvp / model_ggn / model_fisher: misuse -------------------------
MODELS = torch_rows(
    err(
        "model-not-callable",
        lambda b: hessop.model_hessian(3, CE, data()),
        TypeError,
        r"model must be a torch nn.Module or a function apply\(params, x\); got int",
    ),
    err(
        "functional-without-params",
        lambda b: hessop.model_hessian(lambda p, x: x, CE, data()),
        TypeError,
        r"needs its parameters: pass params=",
    ),
    err(
        "loss-fn-not-callable",
        lambda b: mh(loss=3),
        TypeError,
        r"loss_fn must be a function loss_fn\(output, target\)",
    ),
    err(
        "loss-fn-reduction-none",
        lambda b: mh(loss=nn.CrossEntropyLoss(reduction="none")),
        E.LossError,
        "loss_fn has reduction='none'",
    ),
    err(
        "reduction-unknown",
        lambda b: mh(reduction="avg"),
        E.UnknownOptionError,
        r"unknown reduction 'avg'; valid reductions are: 'mean', 'sum'",
    ),
    err(
        "reduction-contradicts",
        lambda b: mh(reduction="sum"),
        ValueError,
        r"reduction='mean', but reduction='sum' was passed",
    ),
    err(
        "data-int",
        lambda b: mh(batch=5),
        TypeError,
        r"data must be one \(x, y\) batch or an iterable of \(x, y\) batches, got int",
    ),
    err("data-empty", lambda b: mh(batch=[]), E.EmptyDataError, "data= is empty"),
    err(
        "data-iterator", lambda b: mh(batch=iter(batches())), TypeError, "data= must be re-iterable"
    ),
    err(
        "data-triple",
        lambda b: mh(batch=[(*data(), data()[1])]),
        TypeError,
        r"each batch must be an \(inputs, targets\) pair, got a tuple of length 3",
    ),
    err(
        "data-empty-single-batch",
        lambda b: mh(batch=data(0)),
        E.EmptyDataError,
        r"the batch \(x, y\) has no samples",
    ),
    err(
        "data-empty-batch-in-list",
        lambda b: first(mh(batch=[data(0)])),
        E.EmptyDataError,
        "a batch of data= has no samples",
    ),
    err(
        "data-foreign-framework",
        lambda b: mh(batch=(nat("jax", X), nat("jax", Y))),
        TypeError,
        "an array of the batch is a jax array but the operator uses torch",
        backends=("both",),
    ),
    err(
        "data-inference-tensor",
        lambda b: mh(batch=inference(data())),
        TypeError,
        "an array of the batch is an inference tensor",
    ),
    err(
        "params-unknown-name",
        lambda b: mh(params=["nope"]),
        ValueError,
        r"params= names unknown parameters 'nope'; the model's parameters are: 0.weight",
    ),
    err(
        "params-none-selected",
        lambda b: mh(params=lambda n, p: False),
        ValueError,
        "the params= predicate selected no parameter",
    ),
    err(
        "params-int",
        lambda b: mh(params=3),
        TypeError,
        r"params= must be None, a list of parameter names",
    ),
    err(
        "params-foreign-tensor",
        lambda b: mh(params=[torch.ones(2)]),
        ValueError,
        r"unknown parameters <tensor of shape \(2,\)>",
    ),
    err(
        "no-trainable-parameter",
        lambda b: mh(model=mlp().requires_grad_(False)),
        ValueError,
        "the model has no parameter with requires_grad=True",
    ),
    err(
        "backend-contradicts-model",
        lambda b: mh(backend="jax"),
        ValueError,
        "the model is a torch module, but backend='jax'",
    ),
    err(
        "dtype-unknown",
        lambda b: mh(dtype="foo"),
        E.DTypeError,
        "dtype= 'foo' is not a dtype torch knows",
    ),
    err("dtype-int", lambda b: mh(dtype="int64"), E.DTypeError, "dtype= has dtype int64"),
    err("device-unknown", lambda b: mh(device="foo"), E.DeviceError, "unknown torch device 'foo'"),
    err("mode-unknown", lambda b: mh(mode="bad"), E.UnknownOptionError, "unknown mode 'bad'"),
    err(
        "seed-not-int",
        lambda b: mh(allow_randomness="fixed-seed", seed="abc"),
        TypeError,
        "seed must be an integer, got 'abc'",
    ),
    err(
        "allow-randomness-unknown",
        lambda b: mh(allow_randomness="yes"),
        E.UnknownOptionError,
        "unknown allow_randomness option 'yes'",
    ),
    err(
        "compile-with-randomness",
        lambda b: mh(compile=True, allow_randomness="fixed-seed"),
        ValueError,
        "compile=True cannot be combined with allow_randomness",
    ),
    err(
        "dropout-in-training",
        lambda b: mh(model=mlp(nn.Dropout(0.3))),
        E.RandomnessError,
        r"3 \(Dropout, p=0.3\)",
    ),
    err(
        "loss-not-scalar",
        lambda b: first(mh(loss=lambda o, t: o.sum(1))),
        E.LossError,
        r"loss_fn\(model\(x\), y\) must return a scalar, but it returned shape \(6,\)",
    ),
    err(
        "hessian-chunk-zero",
        lambda b: mh(chunk_size=0),
        ValueError,
        "chunk_size must be an integer >= 1, got 0",
    ),
    err(
        "ggn-chunk-zero",
        lambda b: hessop.model_ggn(mlp(), CE, data(), chunk_size=0),
        ValueError,
        "chunk_size must be an integer >= 1, got 0",
    ),
    err(
        "fisher-chunk-zero",
        lambda b: hessop.model_fisher(mlp(), CE, data(), chunk_size=-2),
        ValueError,
        "chunk_size must be an integer >= 1, got -2",
    ),
    err(
        "ggn-cache-not-bool",
        lambda b: hessop.model_ggn(mlp(), CE, data(), cache="yes"),
        TypeError,
        "cache must be True or False",
    ),
    err(
        "ggn-tuple-output",
        lambda b: first(
            hessop.model_ggn(
                lambda p, x: (x @ p, x),
                lambda o, t: ((o[0] - t) ** 2).mean(),
                data(),
                params=torch.zeros(3, 2, dtype=torch.float64),
            )
        ),
        TypeError,
        "model_ggn needs the model to return one tensor, got tuple",
    ),
    err(
        "fisher-batchnorm-training",
        lambda b: hessop.model_fisher(
            mlp(nn.BatchNorm1d(2, affine=False)),
            nn.MSELoss(),
            (data()[0], torch.zeros(6, 2, dtype=torch.float64)),
        ),
        ValueError,
        "the empirical Fisher needs per-sample losses, but BatchNorm in training mode",
    ),
    err(
        "hvp-v-length",
        lambda b: model_hvp(torch.ones(5, dtype=torch.float64)),
        E.ShapeError,
        r"v has shape \(5,\); pass a flat vector of length 26",
    ),
    err(
        "hvp-v-2d",
        lambda b: model_hvp(torch.ones(26, 1, dtype=torch.float64)),
        E.ShapeError,
        r"v has shape \(26, 1\); pass a flat vector of length 26",
    ),
    err(
        "hvp-v-numpy",
        lambda b: model_hvp(V26),
        TypeError,
        r"matvec of a torch operator needs a torch array, got numpy.ndarray",
    ),
    err(
        "hvp-v-list-short",
        lambda b: model_hvp([torch.ones(4, 3, dtype=torch.float64)]),
        E.ShapeError,
        "v has 1 entries but 4 parameters are selected",
    ),
    err(
        "hvp-v-dict-missing",
        lambda b: model_hvp({"0.weight": torch.ones(4, 3)}),
        E.ShapeError,
        r"keys missing: \['0.bias', '2.weight', '2.bias'\]",
    ),
    err(
        "hvp-v-list-shapes",
        lambda b: model_hvp([torch.ones(3, 4), torch.ones(4), torch.ones(2, 4), torch.ones(2)]),
        E.ShapeError,
        r"leaf \['0.weight'\] has shape \(3, 4\), expected \(4, 3\)",
    ),
    err(
        "functional-foreign-params",
        lambda b: hessop.model_hessian(
            linear_apply, mse, (X, X[:, :2]), params=nat("jax", np.zeros((3, 2))), backend="torch"
        ),
        TypeError,
        "parameter leaf 0 is a jax array but the operator uses torch",
        backends=("both",),
    ),
    err(
        "functional-mixed-frameworks",
        lambda b: hessop.model_hessian(
            linear_apply, mse, data(), params=nat("jax", np.zeros((3, 2)))
        ),
        TypeError,
        "the arrays mix frameworks",
        backends=("both",),
    ),
)


def inference(batch):
    with torch.inference_mode():
        return tuple(t.clone() for t in batch)


def model_hvp(v):
    return hessop.model_hvp(mlp(), CE, *data(), v)


def linear_apply(p, x):
    return x @ p


def mse(o, t):
    return ((o - t) ** 2).mean()


def tree_of(flat):
    out, i = {}, 0
    for k, w in WEIGHTS.items():
        out[k] = torch.as_tensor(flat[i : i + w.size].reshape(w.shape))
        i += w.size
    return out


# --- M'. model-level right numbers ----------------------------------------------------------
def jax_functional():
    """model_hessian of a JAX apply(params, x) @ v, and jax.hessian of the loss by hand @ v."""
    import jax
    import jax.numpy as jnp

    def apply(p, x):
        return jnp.tanh(x @ p["W"]) @ p["v"]

    def loss(o, t):
        return jnp.mean((o - t) ** 2)

    p = {"W": jnp.asarray(WEIGHTS["0.weight"].T), "v": jnp.asarray(WEIGHTS["2.weight"][0])}
    x, t = jnp.asarray(X), jnp.asarray(X[:, 0])
    v = jnp.asarray(V26[:16])
    H = hessop.model_hessian(apply, loss, (x, t), params=p)

    def flat(theta):
        return loss(apply({"W": theta[:12].reshape(3, 4), "v": theta[12:]}, x), t)

    theta = jnp.concatenate([p["W"].ravel(), p["v"]])
    return to_numpy(H @ v), np.asarray(jax.jit(jax.hessian(flat))(theta) @ v)


MODEL_NUMBERS = torch_rows(
    ok("hessian", lambda b: mh() @ v26(), close(lambda b: hessian_ref() @ V26)),
    ok(
        "hessian-numpy-batch",
        lambda b: mh(batch=(X, Y)) @ v26(),
        close(lambda b: hessian_ref() @ V26),
    ),
    ok(
        "hessian-streamed-uneven",
        lambda b: mh(batch=batches()) @ v26(),
        close(lambda b: hessian_ref() @ V26),
    ),
    ok(
        "hessian-sum-reduction",
        lambda b: mh(loss=nn.CrossEntropyLoss(reduction="sum"), batch=batches()) @ v26(),
        close(lambda b: 6 * hessian_ref() @ V26),
    ),
    ok(
        "hessian-float32-model",
        lambda b: mh(model=mlp().float()) @ v26().float(),
        close(lambda b: hessian_ref() @ V26, rtol=1e-4, atol=1e-5),
    ),
    ok(
        "hessian-select-by-tensor",
        lambda b: (lambda m: mh(model=m, params=[m[2].bias]).to_dense())(mlp()),
        close(lambda b: hessian_ref()[24:, 24:]),
    ),
    ok("hvp-flat", lambda b: model_hvp(v26()), close(lambda b: hessian_ref() @ V26)),
    ok(
        "hvp-dict",
        lambda b: model_hvp(tree_of(V26))["2.weight"],
        close(lambda b: (hessian_ref() @ V26)[16:24].reshape(2, 4)),
    ),
    ok(
        "hvp-list",
        lambda b: model_hvp(list(tree_of(V26).values()))[1],
        close(lambda b: (hessian_ref() @ V26)[12:16]),
    ),
    ok("ggn", lambda b: hessop.model_ggn(mlp(), CE, data()).to_dense(), close(lambda b: ggn_ref())),
    ok(
        "ggn-streamed",
        lambda b: hessop.model_ggn(mlp(), CE, batches()) @ v26(),
        close(lambda b: ggn_ref() @ V26),
    ),
    ok(
        "fisher",
        lambda b: hessop.model_fisher(mlp(), CE, data()).to_dense(),
        close(lambda b: per_sample_grads().T @ per_sample_grads() / 6),
    ),
    ok(
        "fisher-per-sample-gradients",
        lambda b: hessop.model_fisher(mlp(), CE, data()).per_sample_gradients(*data()),
        close(lambda b: per_sample_grads()),
    ),
    ok("model-left-alone", lambda b: model_left_alone(), is_true),
)
MODEL_NUMBERS += [
    ok(
        "jax-functional",
        lambda b: np.subtract(*jax_functional()),
        close(np.zeros(16), atol=1e-12),
        backends=("jax",),
    ),
]


def model_left_alone():
    model = mlp(nn.BatchNorm1d(2, affine=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = list(model.parameters())
    for fn in (hessop.model_hessian, hessop.model_ggn):
        op = fn(model, CE, data())
        op @ v26()
        op @ v26()
    sd = model.state_dict()
    assert all(torch.equal(before[k], sd[k]) for k in before), "state changed"
    assert all(a is b for a, b in zip(tensors, model.parameters())) and model.training
    return all(p.grad is None for p in model.parameters())


# --- S. state changed after construction: every use refuses ---------------------------------
def torch_quad(**kw):
    w = torch.tensor(W3, requires_grad=True)
    return w, hessop.hessian(quad, w, torch.as_tensor(A3), **kw)


def stale_torch(use, how="data"):
    """Build at W3, take two products (the cache exists), change the point, then use."""
    w, H = torch_quad()
    H @ torch.as_tensor(V3)
    H @ torch.as_tensor(V3)
    if how == "data":
        w.data.mul_(2.0)
    else:
        w.grad = torch.ones_like(w)
        torch.optim.SGD([w], lr=0.1).step()
    return use(H)


def vec(H):
    return H.asarray(V3)


STALE_USES = {
    "matvec": lambda H: H @ vec(H),
    "matmat": lambda H: H @ H.asarray(np.eye(3)),
    "rmatvec": lambda H: vec(H) @ H,
    "to-dense": lambda H: H.to_dense(),
    "gradient": lambda H: H.gradient(),
    "loss-and-gradient": lambda H: H.loss_and_gradient(),
    "params": lambda H: H.params,
    "damped": lambda H: H.damped(1.0) @ vec(H),
    "scaled": lambda H: (2 * H) @ vec(H),
    "sum": lambda H: (H + H) @ vec(H),
    "composed": lambda H: (H @ H) @ vec(H),
    "transpose": lambda H: H.T @ vec(H),
    "to-scipy": lambda H: H.to_scipy() @ V3,
    "cg": lambda H: hessop.cg(H, vec(H)),
    "trace": lambda H: hessop.trace(H, 2),
    "eigsh": lambda H: hessop.eigsh(H, 1, ncv=3),
}


def stale_jax_closure(use):
    """A JAX loss reading a numpy array that is then changed in place."""
    import jax.numpy as jnp

    B = A3.copy()
    H = hessop.hessian(lambda w: 0.5 * w @ jnp.asarray(B) @ w, jnp.asarray(W3))
    H @ jnp.asarray(V3)
    B[0, 0] += 1.0
    return use(H)


def stale_attribute(b, on_class):
    class Holder:
        scale = 1.0  # a class default the instance reads

    holder = Holder()
    H = hessop.hessian(lambda w, A: holder.scale * quad(w, A), nat(b, W3), nat(b, A3))
    H @ nat(b, V3)
    if on_class:
        Holder.scale = 2.0
    else:
        holder.scale = 2.0  # shadows the class default
    return H @ nat(b, V3)


def stale_model(change, kind=hessop.model_hessian, model=None):
    model = mlp() if model is None else model
    op = kind(model, CE, data())
    first(op)
    first(op)
    change(model)
    return first(op)


def bump_running_mean(model):
    with torch.no_grad():
        model[3].running_mean.add_(1.0)


def bump(p):
    with torch.no_grad():
        p.add_(0.1)


STALE = [
    err(
        f"stale-torch-{name}",
        lambda b, u=use: stale_torch(u),
        E.StaleOperatorError,
        r"parameter leaf 0 was changed in place since the operator was built",
        backends=("torch",),
    )
    for name, use in STALE_USES.items()
]
STALE += [
    err(
        f"stale-jax-{name}",
        lambda b, u=use: stale_jax_closure(u),
        E.StaleOperatorError,
        r"closed-over 'B' was changed in place",
        backends=("jax",),
    )
    for name, use in STALE_USES.items()
    if name in ("matvec", "matmat", "gradient", "params", "damped", "cg")
]
STALE += [
    err(
        "stale-optimizer-step",
        lambda b: stale_torch(STALE_USES["matvec"], how="sgd"),
        E.StaleOperatorError,
        "changed in place",
        backends=("torch",),
    ),
    err(
        "stale-argument",
        lambda b: stale_argument(),
        E.StaleOperatorError,
        "array 0 of the arguments was changed in place",
        backends=("torch",),
    ),
    err(
        "stale-class-attribute",
        lambda b: stale_attribute(b, True),
        E.StaleOperatorError,
        r"closed-over 'holder'.scale was 1.0 and is now 2.0",
    ),
    err(
        "stale-object-attribute",
        lambda b: stale_attribute(b, False),
        E.StaleOperatorError,
        r"closed-over 'holder'.scale was 1.0 and is now 2.0",
    ),
]
STALE += torch_rows(
    err(
        "stale-model-parameter",
        lambda b: stale_model(lambda m: bump(m[0].weight)),
        E.StaleOperatorError,
        r"parameter \['0.weight'\] was changed in place",
    ),
    err(
        "stale-fixed-parameter",
        lambda b: stale_model(
            lambda m: bump(m[0].weight), kind=lambda *a: hessop.model_hessian(*a, params=["2.bias"])
        ),
        E.StaleOperatorError,
        r"parameter '0.weight' was changed in place",
    ),
    err(
        "stale-model-eval",
        lambda b: stale_model(lambda m: m.eval()),
        E.StaleOperatorError,
        "the train/eval mode of the Sequential",
    ),
    err(
        "stale-buffer",
        lambda b: stale_model(bump_running_mean, model=mlp(nn.BatchNorm1d(2, affine=False)).eval()),
        E.StaleOperatorError,
        r"buffer '3.running_mean' was changed in place",
    ),
    err(
        "stale-ggn-parameter",
        lambda b: stale_model(lambda m: bump(m[2].bias), kind=hessop.model_ggn),
        E.StaleOperatorError,
        r"parameter \['2.bias'\] was changed in place",
    ),
    err(
        "stale-ggn-eval",
        lambda b: stale_model(lambda m: m.eval(), kind=hessop.model_ggn),
        E.StaleOperatorError,
        "train/eval mode",
    ),
    err(
        "stale-fisher-parameter",
        lambda b: stale_model(lambda m: bump(m[2].bias), kind=hessop.model_fisher),
        E.StaleOperatorError,
        r"parameter \['2.bias'\] was changed in place",
    ),
    err(
        "stale-fisher-per-sample",
        lambda b: stale_fisher_per_sample(),
        E.StaleOperatorError,
        "changed in place",
    ),
)


def stale_argument():
    A = torch.as_tensor(A3.copy())
    H = hessop.hessian(quad, torch.as_tensor(W3), A)
    A[0, 0] += 1.0
    return H @ torch.as_tensor(V3)


def stale_fisher_per_sample():
    model = mlp()
    F = hessop.model_fisher(model, CE, data())
    bump(model[0].bias)
    return F.per_sample_gradients(*data())


# --- T. threads: every product right, nothing of the user's changed -------------------------
def threaded(op, vectors, native, n=4):
    """``op @ v`` for every v, from ``n`` threads at once; the results by vector."""
    results, errors = {}, []

    def work(k):
        try:
            for i in range(k, len(vectors), n):
                results[i] = to_numpy(op @ native(vectors[i]))
        except Exception as e:  # noqa: BLE001 - reported by the check
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return np.stack([results[i] for i in range(len(vectors))])


PROBES = RNG.standard_normal((12, D))


def threaded_model(kind, batch):
    model = mlp()
    before = list(model.parameters())
    out = threaded(kind(model, CE, batch), PROBES, torch.as_tensor)
    # the regression: concurrent functional_call left plain tensors in the model
    assert all(a is b for a, b in zip(before, model.parameters()))
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    return out


def threaded_jax():
    import jax.numpy as jnp

    ops = [
        hessop.hessian(quad, jnp.asarray(W3), jnp.asarray(A3), mode=m)
        for m in ("fwd-rev", "rev-fwd", "rev-rev", "dense")
    ]
    return np.stack([threaded(H, PROBES[:, :3], jnp.asarray) for H in ops])


def threaded_per_sample():
    x = torch.as_tensor(X)
    out, errors = [None] * 4, []

    def work(k):
        try:
            out[k] = hessop.per_sample_hessians(lambda s: (s**4).sum() / 12, x * (k + 1)).numpy()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return np.stack(out)


THREADS = torch_rows(
    ok(
        "threads-hessian-streamed",
        lambda b: threaded_model(hessop.model_hessian, batches()),
        close(lambda b: PROBES @ hessian_ref()),
    ),
    ok(
        "threads-hessian-cached",
        lambda b: threaded_model(hessop.model_hessian, data()),
        close(lambda b: PROBES @ hessian_ref()),
    ),
    ok(
        "threads-ggn-cached",
        lambda b: threaded_model(hessop.model_ggn, data()),
        close(lambda b: PROBES @ ggn_ref()),
    ),
    ok(
        "threads-ggn-streamed",
        lambda b: threaded_model(hessop.model_ggn, batches()),
        close(lambda b: PROBES @ ggn_ref()),
    ),
    ok(
        "threads-fisher-streamed",
        lambda b: threaded_model(hessop.model_fisher, batches()),
        close(lambda b: PROBES @ per_sample_grads().T @ per_sample_grads() / 6),
    ),
    ok(
        "threads-per-sample-hessians",
        lambda b: threaded_per_sample(),
        close(np.stack([[np.diag((k + 1) ** 2 * x**2) for x in X] for k in range(4)])),
    ),
)
THREADS += [
    ok(
        "threads-jax-every-mode",
        lambda b: threaded_jax(),
        close(np.stack([PROBES[:, :3] @ QUAD_H] * 4)),
        backends=("jax",),
    ),
]

CASES = MODELS + MODEL_NUMBERS + STALE + THREADS


@pytest.mark.parametrize("case, backend", params(CASES))
def test_misuse(case, backend):
    run_case(case, backend)


def test_other_is_the_other_backend():
    # guards a helper of the table
    assert other("torch") == "jax" and other("jax") == "torch"

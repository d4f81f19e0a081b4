"""One batch's share of KFAC's Kronecker factors and of EKFAC's eigenvalues.

Everything here is written once with the array API and the backend's
:class:`~hessop.backends._base.Transforms`, and runs inside
:meth:`LayerCapture.run <hessop.backends._base.LayerCapture.run>` (compiled as one function
in JAX). Notation: a batch of ``n`` samples with model output ``out`` of shape ``(n, ...)``
and loss ``L = beta * sum_i l_i`` (``beta = 1/n`` for ``reduction="mean"``, 1 for ``"sum"``);
a layer's inputs ``a`` (``(n, positions, d_in)``) and the gradients ``g`` of
``<out, v>`` with respect to its outputs (``(k, n, positions, d_out)``) for ``k`` output
cotangents ``v``:

* ``fisher="type-2"``: the ``v`` are the columns of a square root ``S_i S_i^T = beta H_i`` of
  each sample's block of the loss Hessian with respect to the output (``P`` columns, ``P``
  the size of one sample's output), computed by automatic differentiation for any loss;
* ``fisher="mc"``: ``v = grad_out L(out, y~) / sqrt(kappa)`` for labels ``y~`` drawn from
  the model's predictive distribution (``mc_samples`` draws), ``kappa`` the scale of the
  loss against the likelihood's negative log-likelihood, read from one Hessian column;
* ``fisher="empirical"``: ``v = grad_out L(out, y)``, the true labels.

Each batch returns its factors in "per-sample mean" form (summed over its samples and
divided by ``n`` for ``reduction="mean"``), so that the size-weighted mean over batches of
:class:`~hessop._streamed.StreamedOperator` gives the dataset's factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import LossError, ShapeError

FISHER_TYPES = ("type-2", "mc", "empirical")
KINDS = ("kfac", "ekfac")
WEIGHT_SHARING = ("expand", "reduce")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")
#: elements of one per-sample-gradient chunk in EKFAC's refit (bounds its memory)
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Config:
    """The options that decide a batch's factors."""

    fisher: str
    weight_sharing: str
    separate_bias: bool
    mean: bool
    mc_samples: int
    likelihood: str | None


class _Pass:
    """One of the per-batch functions of :class:`BatchFactors`, equal to the same function
    of an equal :class:`BatchFactors`: a backend that compiles ``fn`` may then share the
    compilation between operators of the same model, loss and options."""

    def __init__(self, owner: BatchFactors, method: Callable[..., Any]) -> None:
        self.owner, self.method = owner, method

    def __call__(self, *args: Any) -> Any:
        return self.method(*args)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Pass)
            and self.method.__name__ == other.method.__name__
            and self.owner.key == other.owner.key
        )

    def __hash__(self) -> int:
        return hash((self.method.__name__, self.owner.key))


class BatchFactors:
    """The per-batch functions handed to ``LayerCapture.run`` (:attr:`factors`,
    :attr:`eigenvalues`): the same objects for every batch, so that a compiled version is
    reused."""

    def __init__(self, config: Config, layers: Any, loss_fn: Callable, backend: Any) -> None:
        self.config, self.layers, self.loss_fn = config, layers, loss_fn
        self.tr, self.xp = backend.transforms, backend.xp
        #: what decides the functions (the loss by identity)
        self.key = (config, layers, loss_fn, backend.name)
        self.factors = _Pass(self, self._factors)
        self.eigenvalues = _Pass(self, self._eigenvalues)

    # --- the two passes -------------------------------------------------------------------
    def _factors(self, out: Any, args: Any, inputs: Any, pullback: Any, noise: Any) -> Any:
        """``(A_0, G_0, A_1, G_1, ..., n)`` (no ``A`` for a layer without weight) and the
        checks of the cotangents."""
        xp, cfg = self.xp, self.config
        V, checks = self.cotangents(out, args[1], noise)
        grads = pullback(V)
        n = out.shape[0]
        scale_a, scale_g = (1.0 / n if cfg.mean else 1.0), self._grad_scale(n)
        parts: list[Any] = []
        for layer, a, g in zip(self.layers, inputs, grads):
            self._check_samples(layer, a, g, n)
            if layer.weight is not None:
                parts.append(self._input_cov(self._augment(layer, a)) * scale_a)
            parts.append(self._grad_cov(g) * scale_g)
        parts.append(xp.zeros_like(xp.sum(out)) + n)
        return tuple(parts), checks

    def _eigenvalues(
        self, out: Any, args: Any, inputs: Any, pullback: Any, noise: Any, bases: Any
    ) -> Any:
        """EKFAC: the squared per-sample gradients in the Kronecker eigenbasis ``bases``
        (``(Q_A, Q_G)`` per layer), one array per block, and the checks."""
        xp = self.xp
        V, checks = self.cotangents(out, args[1], noise)
        grads = pullback(V)
        n = out.shape[0]
        scale = self._grad_scale(n)
        parts: list[Any] = []
        for layer, a, g, (QA, QG) in zip(self.layers, inputs, grads, bases):
            self._check_samples(layer, a, g, n, per_sample=True)
            gt = g @ QG
            if layer.weight is not None:
                at = self._augment(layer, a) @ QA
                parts.append(_squared_rotated_gradients(xp, gt, at) * scale)
            if self.separate_bias_block(layer):
                gb = xp.sum(gt, axis=2)
                parts.append(xp.sum(xp.reshape(gb * gb, (-1, gb.shape[-1])), axis=0) * scale)
        return tuple(parts), checks

    def _grad_scale(self, n: int) -> float:
        # type-2 cotangents carry sqrt(beta), the others beta: back to per-sample means
        cfg = self.config
        scale = float(n) if cfg.mean and cfg.fisher != "type-2" else 1.0
        return scale / cfg.mc_samples if cfg.fisher == "mc" else scale

    def separate_bias_block(self, layer: Any) -> bool:
        return layer.bias is not None and (self.config.separate_bias or layer.weight is None)

    def _augment(self, layer: Any, a: Any) -> Any:
        """The layer input with a column of ones when the bias joins the weight's block."""
        if layer.bias is None or self.config.separate_bias:
            return a
        return self.xp.concat([a, self.xp.ones_like(a[..., :1])], axis=-1)

    def _input_cov(self, a: Any) -> Any:
        xp = self.xp
        if self.config.weight_sharing == "reduce":
            a = xp.mean(a, axis=1)
            return xp.matrix_transpose(a) @ a
        a2 = xp.reshape(a, (-1, a.shape[-1]))
        return (xp.matrix_transpose(a2) @ a2) / a.shape[1]

    def _grad_cov(self, g: Any) -> Any:
        xp = self.xp
        if self.config.weight_sharing == "reduce":
            g = xp.sum(g, axis=2)
        g2 = xp.reshape(g, (-1, g.shape[-1]))
        return xp.matrix_transpose(g2) @ g2

    def _check_samples(self, layer: Any, a: Any, g: Any, n: int, per_sample: bool = False) -> None:
        if not (per_sample or self.config.weight_sharing == "reduce"):
            return  # "expand" sums over every row: which axis holds the samples is moot
        rows = {int(g.shape[1])} | ({int(a.shape[0])} if a is not None else set())
        if rows != {n}:
            raise ShapeError(
                f"layer {layer.name!r}: the leading axis of its input / output has size "
                f"{sorted(rows)}, but the batch has {n} samples; weight_sharing='reduce' and "
                "kind='ekfac' need the samples on the leading axis of every layer (use "
                "batch-first layouts), or use weight_sharing='expand' with kind='kfac'"
            )

    # --- output cotangents ----------------------------------------------------------------
    def cotangents(self, out: Any, y: Any, noise: Any) -> tuple[Any, dict[str, Any]]:
        """``(k, *out.shape)`` output cotangents for the configured Fisher type, and checks
        (0-d arrays by name, see :func:`check`)."""
        fisher = self.config.fisher
        if fisher == "empirical":
            g = self.tr.grad(lambda o: self.loss_fn(o, y))(out)
            return g[None, ...], {}
        if fisher == "type-2":
            return self._type2(out, y)
        return self._sampled(out, y, noise)

    def _hvp(self, out: Any, y: Any) -> Callable[[Any], Any]:
        """Products with the loss Hessian with respect to the output, reverse over reverse
        (every op has a double backward; torch lacks some forward-mode rules)."""
        return self.tr.vjp(self.tr.grad(lambda o: self.loss_fn(o, y)), out)[1]

    def _type2(self, out: Any, y: Any) -> tuple[Any, dict[str, Any]]:
        xp, tr = self.xp, self.tr
        n, rest = out.shape[0], tuple(out.shape[1:])
        P = math.prod(rest)
        hvp = self._hvp(out, y)
        basis = xp.reshape(tr.eye(P, like=out), (P, 1, *rest))
        basis = xp.broadcast_to(basis, (P, *out.shape))
        HV = tr.vmap(hvp, in_axes=0)(basis)  # column j of every sample's block
        blocks = xp.permute_dims(xp.reshape(HV, (P, n, P)), (1, 2, 0))
        coupled = _coupling(xp, hvp, basis[0], HV[0], n)
        lam, U = _eigh(xp, blocks)
        S = U * xp.sqrt(xp.clip(lam, min=0.0))[:, None, :]
        V = xp.reshape(xp.permute_dims(S, (2, 0, 1)), (P, *out.shape))
        top = xp.max(xp.abs(lam))
        negative = -xp.min(lam) / xp.where(top > 0, top, 1.0)
        return V, {"coupled": coupled, "negative": negative}

    def _sampled(self, out: Any, y: Any, noise: Any) -> tuple[Any, dict[str, Any]]:
        """Monte-Carlo cotangents: gradients of the loss at labels drawn from the model's
        predictive distribution, rescaled so that their second moment is the loss Hessian."""
        xp, tr, kind = self.xp, self.tr, self.config.likelihood
        n, rest = out.shape[0], tuple(out.shape[1:])
        if noise.shape[1] != n:
            raise ShapeError(
                f"the model's output has {n} rows but the batch {noise.shape[1]} samples; "
                "fisher='mc' needs one output row per sample"
            )
        if kind == "categorical" and len(out.shape) != 2:
            raise ShapeError(
                f"likelihood='categorical' needs outputs of shape (samples, classes), got "
                f"{tuple(out.shape)}; use fisher='type-2' for other outputs"
            )
        # kappa, and a check that the loss has the likelihood's Hessian: one product with
        # the loss Hessian, on the distinct entries 1..P of the first sample's output
        P = math.prod(rest)
        row = xp.reshape(out[0], (P,))
        u = _iota(xp, row) + 1.0
        if kind == "categorical":
            p = _softmax(xp, row, axis=0)
            column = p * u - p * xp.sum(p * u)
        elif kind == "bernoulli":
            p = 1 / (1 + xp.exp(-row))
            column = p * (1 - p) * u
        else:
            column = u
        got = xp.reshape(self._hvp(out, y)(xp.reshape(_first_row(xp, u, n), out.shape)), (n, P))
        norm = xp.sum(column * column)
        fit = xp.sum(got[0] * column) / xp.where(norm > 0, norm, 1.0)  # kappa * beta
        expected = _first_row(xp, fit * column, n)
        top = xp.max(xp.abs(got))
        misfit = xp.max(xp.abs(got - expected)) / xp.where(top > 0, top, 1.0)
        kappa = fit * (n if self.config.mean else 1)
        labels = self._labels(out, y, noise)
        grads = tr.vmap(tr.grad(lambda o, t: self.loss_fn(o, t)), in_axes=(None, 0))(out, labels)
        scale = xp.sqrt(xp.where(kappa > 0, kappa, 1.0))
        return grads / scale, {"likelihood": misfit, "kappa": -kappa}

    def _labels(self, out: Any, y: Any, noise: Any) -> Any:
        """``mc_samples`` label draws of the batch's shape, in ``y``'s format."""
        xp, kind = self.xp, self.config.likelihood
        if kind == "gaussian":
            return out[None, ...] + noise
        if kind == "bernoulli":
            return xp.astype(noise < 1 / (1 + xp.exp(-out[None, ...])), out.dtype)
        C = out.shape[1]
        cdf = xp.cumulative_sum(_softmax(xp, out, axis=1), axis=1)
        # inverse CDF; the clip guards against a last CDF entry that rounds below 1
        idx = xp.sum(xp.astype(cdf[None, :, :] < noise[..., None], out.dtype), axis=-1)
        idx = xp.clip(idx, max=C - 1)
        if tuple(y.shape) == tuple(out.shape):  # one-hot targets
            return xp.astype(idx[..., None] == _iota(xp, out[0])[None, None, :], out.dtype)
        return xp.astype(idx, y.dtype)


def _iota(xp: Any, v: Any) -> Any:
    """``0, 1, ..., len(v) - 1`` in ``v``'s dtype, on ``v``'s device (under any transform)."""
    return xp.cumulative_sum(xp.ones_like(v)) - 1


def _first_row(xp: Any, v: Any, n: int) -> Any:
    """``(n, len(v))``: ``v`` in the first row, zeros below."""
    return xp.concat([v[None, :], xp.zeros_like(xp.broadcast_to(v[None, :], (n - 1, v.shape[0])))])


def _softmax(xp: Any, x: Any, axis: int) -> Any:
    z = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return z / xp.sum(z, axis=axis, keepdims=True)


def _eigh(xp: Any, M: Any) -> tuple[Any, Any]:
    res = xp.linalg.eigh(M)
    return res.eigenvalues, res.eigenvectors


def _coupling(xp: Any, hvp: Callable, e: Any, column: Any, n: int) -> Any:
    """How far the loss is from a sum of per-sample losses: one Hessian product with the
    probe of every sample's first output entry, signs alternating over the samples,
    against the per-sample columns (0 when the loss Hessian is block-diagonal)."""
    if n == 1:
        return xp.zeros_like(xp.sum(column))
    shape = (n,) + (1,) * (len(column.shape) - 1)
    first = xp.reshape(column, (n, -1))[:, 0]
    signs = xp.reshape(1.0 - 2.0 * (_iota(xp, first) % 2), shape)
    got = hvp(e * signs)
    top = xp.max(xp.abs(column))
    return xp.max(xp.abs(got - column * signs)) / xp.where(top > 0, top, 1.0)


def _squared_rotated_gradients(xp: Any, gt: Any, at: Any) -> Any:
    """``sum_{j,i} (sum_s gt[j,i,s] at[i,s]^T)^2``: the squared per-sample gradients in the
    eigenbasis, without materializing all of them at once."""
    k, n, S, d_out = gt.shape
    d_in = at.shape[-1]
    if S * S * (d_out + d_in) <= d_out * d_in:  # Gramians over positions are smaller
        Xg = xp.reshape(at[:, :, None, :] * at[:, None, :, :], (-1, d_in))
        Yg = xp.sum(gt[:, :, :, None, :] * gt[:, :, None, :, :], axis=0)
        return xp.matrix_transpose(xp.reshape(Yg, (-1, d_out))) @ Xg
    step = max(1, _CHUNK_ELEMENTS // (d_out * d_in))
    total = None
    for j in range(k):
        gj = xp.permute_dims(gt[j], (0, 2, 1))
        for i in range(0, n, step):
            grads = gj[i : i + step] @ at[i : i + step]
            part = xp.sum(grads * grads, axis=0)
            total = part if total is None else total + part
    return total


def check(checks: Any, dtype_eps: float, loss_name: str, likelihood: str | None) -> None:
    """Raise :class:`~hessop.LossError` when a batch's cotangents cannot be trusted."""
    tol = 10 * math.sqrt(dtype_eps)
    for name, value in checks.items():
        v = float(value)
        if name == "coupled" and v > tol:
            raise LossError(
                f"{loss_name} couples the samples of a batch (its Hessian with respect to the "
                "output is not block-diagonal over samples, relative misfit "
                f"{v:.2g}); Kronecker factors need a sum or mean of per-sample losses"
            )
        if name == "negative" and v > tol:
            raise LossError(
                f"{loss_name} is not convex in the model's output (a per-sample Hessian has "
                f"an eigenvalue {-v:.2g} times its largest), so it has no type-2 Fisher; use "
                "fisher='empirical', or a convex loss (cross-entropy, squared error)"
            )
        if name == "likelihood" and not v <= tol or name == "kappa" and not v < 0:
            raise LossError(
                f"fisher='mc' draws labels from a {likelihood} distribution, but {loss_name} "
                f"is not a multiple of its negative log-likelihood (its Hessian with respect "
                "to the output does not have that form); pass the matching likelihood= "
                "('categorical' for cross-entropy on logits, 'gaussian' for squared error, "
                "'bernoulli' for binary cross-entropy on logits) or use fisher='type-2'"
            )

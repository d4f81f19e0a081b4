"""Kronecker-factored curvature: KFAC and EKFAC, as operators in either framework.

KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) approximates the
generalized Gauss-Newton matrix (or a Fisher) of a network by a block-diagonal matrix with
one block per layer, each a Kronecker product ``G (x) A`` of two small matrices: ``A`` the
second moment of the layer's inputs and ``G`` that of the gradients with respect to its
outputs. EKFAC (George et al. 2018) keeps the Kronecker eigenbasis and refits the
eigenvalues from per-sample gradients. Weight sharing (a linear layer on sequences, the
positions of a convolution) follows Eschenhagen et al. (2023): "expand" treats every
position as a sample (the default, and what a convolution usually gets), "reduce" sums the
output gradients and averages the inputs over the positions first.

The layers are found without annotations (see :class:`~hessop.backends._base.LayerCapture`):
torch ``nn.Linear`` / ``nn.Conv2d`` (any ``F.linear`` / ``F.conv2d`` call on a parameter), and
in JAX every ``dot_general`` / ``conv_general_dilated`` of a parameter in the traced model.
The factors use the data rules of the other model operators (:func:`hessop.model_ggn`):
batches weighted by their sizes, ``reduction`` read from the loss. Everything else here is
framework-neutral: the factors, their eigendecompositions, products, inverses, traces and
log-determinants are computed with the array API, so the numbers agree across frameworks.

Conventions (those of curvlinops' ``KFACLinearOperator``): for ``reduction="mean"`` over
``N`` samples, ``A = (1/N) sum_i a_i a_i^T`` (over positions: divided by their number for
"expand", of the position mean for "reduce") and ``G = (1/N) sum_i sum_c g_ic g_ic^T``
with ``g_ic`` the output gradient of sample ``i``'s loss for cotangent ``c``; for
``reduction="sum"``, ``G`` drops the ``1/N`` (``A`` keeps it). ``fisher="empirical"`` uses the
gradient of each sample's loss as hessop's :func:`hessop.model_fisher` defines it (``loss_fn``
on a batch of one), which for a loss that also averages over the output entries (``MSELoss``
with ``reduction="mean"``) is curvlinops' figure divided by the number of entries.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _checks, _pytree
from .._errors import UnsupportedLayerError, unknown
from .._operator import LinearOperator
from .._streamed import CurvatureOperator
from ..backends._base import KernelOptions
from . import _kfac_batch
from ._api import Prepared, prepare
from ._kfac_blocks import DenseBlock, KronBlock, compiled, leaves_of
from .fisher import FisherKernel, FisherOperator, rows
from .ggn import GGNOperator

UNSUPPORTED = ("error", "exact")


class KFACOperator(CurvatureOperator):
    """The Kronecker-factored approximation of a model's GGN or Fisher (see
    :func:`model_kfac`): a symmetric positive semi-definite :class:`hessop.LinearOperator`
    in the flat layout of :func:`hessop.model_hessian`.

    Attributes
    ----------
    kind, fisher, weight_sharing : str
        The options it was built with.
    layers : tuple of KFACLayer
        The layers found, in the order the model calls them.
    """

    def __init__(self, p: Prepared, capture: Any, config: Any, kind: str) -> None:
        kernel = p.backend.hessian_kernel(p.loss, p.backend.auto_mode, KernelOptions(p.device))
        super().__init__(
            p.leaves,
            p.loss.spec,
            p.batches,
            kernel,
            backend=p.backend,
            device=p.device,
            watch=p.watch,
            loss=p.loss,
        )
        self.kind, self.fisher = kind, config.fisher
        self.weight_sharing, self.config = config.weight_sharing, config
        self.layers = capture.layers
        self._capture, self._seed = capture, 0
        self._fns = _kfac_batch.BatchFactors(config, capture.layers, p.model.loss_fn, p.backend)
        self._out_rest: tuple[int, ...] = ()
        self._blocks: tuple[Any, ...] = ()
        self._states: list[dict[str, Any]] = []
        self._eig_states: list[dict[str, Any]] | None = None

    # --- construction: the passes over the data -------------------------------------------
    def _build(self, p: Prepared, exact: list[int], seed: int) -> None:
        self._seed = seed
        if self.fisher == "mc":
            x = p.batches.first()[0]
            params = _pytree.unflatten(self.spec, list(self._leaves))
            with p.model.scope():
                shape = self._bk.transforms.output_shape(lambda x: p.model.output(params, x), x)
            self._out_rest = tuple(shape[1:])
        parts = list(self._pass(self._fns.factors))
        count = parts.pop()
        if not self.config.mean:  # A is a mean over the samples for either reduction
            parts = _divide_inputs(self.layers, parts, count)
        self._kron_blocks(parts)
        if self.kind == "ekfac":
            self._refit()
        if exact:
            leaves = leaves_of(self.spec)
            self._blocks += (DenseBlock(tuple(leaves[i] for i in exact)),)
            self._states.append({"D": self._exact_block(p, self._blocks[-1])})
            self._eig_states = None

    def _pass(self, fn: Callable[..., Any], *extra: Any) -> tuple[Any, ...]:
        """``fn`` over the batches through the capture, size-weighted like every product."""
        counter = itertools.count()
        eps = self.eps

        def per_batch(args: tuple[Any, ...]) -> Any:
            noise = self._noise(next(counter), args)
            parts, checks = self._capture.run(fn, self._point, args, noise, *extra)
            _kfac_batch.check(checks, eps, self.loss.what, self.config.likelihood)
            return parts

        return self._stream(per_batch)

    def _noise(self, index: int, args: tuple[Any, ...]) -> Any:
        """The random numbers of fisher='mc' for the ``index``-th batch: drawn with numpy
        from ``(seed, index)``, so both frameworks (and both passes of EKFAC) see the same."""
        if self.fisher != "mc":
            return None
        rng = np.random.default_rng([self._seed, index])
        n, m = rows(args), self.config.mc_samples
        if self.config.likelihood == "gaussian":
            draw = rng.standard_normal((m, n, *self._out_rest))
        elif self.config.likelihood == "bernoulli":
            draw = rng.random((m, n, *self._out_rest))
        else:
            draw = rng.random((m, n))
        return self.asarray(draw)

    def _kron_blocks(self, parts: list[Any]) -> None:
        leaves, blocks, states = leaves_of(self.spec), [], []
        it = iter(parts)
        for layer in self.layers:
            A = next(it) if layer.weight is not None else None
            G = next(it)
            w = leaves[layer.weight] if layer.weight is not None else None
            b = leaves[layer.bias] if layer.bias is not None else None
            joint = not self.config.separate_bias and w is not None
            if w is not None:
                blocks.append(KronBlock(layer.name, w, b if joint else None, layer.perm, len(G)))
                states.append({"G": G, "A": A})
            if b is not None and not joint:
                blocks.append(KronBlock(layer.name + " (bias)", None, b, (), len(G)))
                states.append({"G": G, "A": self.xp.ones_like(G[:1, :1])})
        self._blocks, self._states = tuple(blocks), states

    def _refit(self) -> None:
        """EKFAC's second pass: eigenvalues from the per-sample gradients in the eigenbasis."""
        states, bases = self._eigen(), []
        it = iter(states)
        for layer in self.layers:
            QA = QG = None
            if layer.weight is not None:
                s = next(it)
                QG, QA = s["QG"], s["QA"]
            if self._fns.separate_bias_block(layer):
                QG = next(it)["QG"]
            bases.append((QA, QG))
        parts = self._pass(self._fns.eigenvalues, tuple(bases))
        for s, E in zip(states, parts):
            s["E"] = E if len(E.shape) == 2 else E[:, None]
        self._states = states  # EKFAC's products need the eigenbases

    def _exact_block(self, p: Prepared, block: DenseBlock) -> Any:
        """The exact block of the approximated matrix (GGN, or the empirical Fisher) over
        the parameters that belong to no supported layer."""
        options = KernelOptions(p.device, cache=False)
        if self.fisher == "empirical":
            kernel = FisherKernel(p.model, p.loss, p.backend, options)
            kernel.mean = self.config.mean
            cls: Any = FisherOperator
        else:
            kernel, cls = p.backend.ggn_kernel(p.model, p.loss, options), GGNOperator
        op = cls(
            p.leaves, self.spec, p.batches, kernel,
            backend=p.backend, device=p.device, watch=p.watch, loss=p.loss,
        )  # fmt: skip
        index = np.concatenate([np.arange(lf.offset, lf.offset + lf.size) for lf in block.leaves])
        E = np.zeros((self.shape[0], len(index)))
        E[index, np.arange(len(index))] = 1.0
        D = self.xp.take(op @ self.asarray(E), self.asarray(index, dtype="int64"), axis=0)
        return (D + self.xp.matrix_transpose(D)) / 2

    # --- the matrix -----------------------------------------------------------------------
    def _compiled(self, op: str) -> Callable[..., Any]:
        return compiled(self._bk, self.device, self._blocks, self.spec.num_leaves, op)

    def _eigen(self) -> list[dict[str, Any]]:
        """The blocks' states with their eigendecompositions (computed once)."""
        if self._eig_states is None:
            self._eig_states = self._compiled("eig")(self._states)
        return self._eig_states

    def _summary(self, damping: float = 0.0) -> tuple[Any, Any, Any, Any]:
        self.watch.check()
        return self._compiled("summary")(self._eigen(), damping)

    def _matmat(self, V: Any) -> Any:
        self.watch.check()
        return self._compiled("mul")(V, self._states, 0.0)

    def _matvec(self, v: Any) -> Any:
        return self._matmat(v)

    def inverse(self, damping: float) -> KFACInverseOperator:
        """The exact inverse ``(K + damping I)^{-1}`` of the damped factored matrix ``K``,
        from the eigendecompositions of its factors (products cost about as much as ``K``'s).

        Parameters
        ----------
        damping : float
            ``>= 0``; ``K + damping I`` must be non-singular (``damping > 0`` always is).

        Examples
        --------
        >>> import torch, hessop
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> K = hessop.model_kfac(model, torch.nn.CrossEntropyLoss(), (x, y))
        >>> v = torch.ones(8, dtype=torch.float64)
        >>> torch.allclose(K.inverse(0.1) @ (K @ v + 0.1 * v), v)
        True
        """
        damping = _checks.real(damping, "damping", minimum=0.0)
        low = float(self._summary()[2]) + damping
        if low <= 0:
            raise ValueError(
                f"K + damping I is singular (its smallest eigenvalue is {low:.3g}); pass "
                "damping > 0"
            )
        return KFACInverseOperator(self, damping)

    def trace(self) -> Any:
        """The exact trace of the factored matrix (a 0-d array): ``sum tr(G) tr(A)``.

        >>> import torch, hessop
        >>> model = torch.nn.Linear(3, 2, bias=False).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> K = hessop.model_kfac(model, torch.nn.MSELoss(reduction="sum"), (x, y))
        >>> bool(torch.isclose(K.trace(), torch.trace(K.to_dense())))
        True
        """
        return self._summary()[0]

    def logdet(self, damping: float = 0.0) -> Any:
        """``log det(K + damping I)`` (a 0-d array), exact, from the factors' eigenvalues
        (round-off negatives count as 0, so ``damping=0`` gives ``-inf`` for a singular K).

        >>> import torch, hessop
        >>> model = torch.nn.Linear(3, 2, bias=False).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> K = hessop.model_kfac(model, torch.nn.MSELoss(reduction="sum"), (x, y))
        >>> bool(torch.isclose(K.logdet(0.5), torch.logdet(K.to_dense() + 0.5 * torch.eye(6))))
        True
        """
        damping = _checks.real(damping, "damping", minimum=0.0)
        return self._summary(damping)[1]

    def diagonal(self) -> Any:
        """The exact diagonal of the factored matrix, a ``(d,)`` array in the flat layout.

        >>> import torch, hessop
        >>> model = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> K = hessop.model_kfac(model, torch.nn.MSELoss(), (x, y), kind="ekfac")
        >>> torch.allclose(K.diagonal(), torch.diagonal(K.to_dense()))
        True
        """
        return self._summary()[3]

    @property
    def factors(self) -> dict[str, dict[str, Any]]:
        """Per block (named after its layer): ``"A"`` and ``"G"`` (and EKFAC's
        ``"eigenvalues"``, shaped ``(d_out, d_r)``); the exact block under ``"D"``."""
        self.watch.check()
        names = {"A": "A", "G": "G", "E": "eigenvalues", "D": "D"}
        return {
            b.name: {names[k]: v for k, v in s.items() if k in names}
            for b, s in zip(self._blocks, self._states)
        }


class KFACInverseOperator(LinearOperator):
    """``(K + damping I)^{-1}`` of a :class:`KFACOperator` ``K`` (see
    :meth:`KFACOperator.inverse`): symmetric positive definite, a preconditioner for
    :func:`hessop.cg` (``M=``)."""

    def __init__(self, K: KFACOperator, damping: float) -> None:
        super().__init__(K.shape, K.dtype, K._bk, K.device, symmetric=True)
        self.K, self.damping = K, damping

    def _matmat(self, V: Any) -> Any:
        K = self.K
        K.watch.check()
        return K._compiled("inv")(V, K._eigen(), self.damping)

    def _matvec(self, v: Any) -> Any:
        return self._matmat(v)


def _divide_inputs(layers: Any, parts: list[Any], count: Any) -> list[Any]:
    out, it = [], iter(parts)
    for layer in layers:
        if layer.weight is not None:
            out.append(next(it) / count)
        out.append(next(it))
    return out


def model_kfac(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    data: Any,
    *,
    params: Any = None,
    kind: str = "kfac",
    fisher: str = "type-2",
    weight_sharing: str = "expand",
    separate_bias: bool = True,
    mc_samples: int = 1,
    likelihood: str | None = None,
    unsupported: str = "error",
    seed: int = 0,
    backend: str | None = None,
    dtype: Any = None,
    device: Any = None,
    batch_size: Callable[..., int] | None = None,
    reduction: str | None = None,
    allow_randomness: str | None = None,
) -> KFACOperator:
    """The Kronecker-factored approximation (KFAC or EKFAC) of a model's GGN or Fisher.

    One block per layer, ``G (x) A``: ``A`` the second moment of the layer's inputs (for a
    convolution: of the patches its kernel sees), ``G`` that of the gradients with respect to
    its outputs, both accumulated over ``data`` with the weighting rules of
    :func:`hessop.model_ggn`. Computing them costs one forward and one backward pass per
    output cotangent over the data (EKFAC: twice). Products, :meth:`~KFACOperator.inverse`,
    :meth:`~KFACOperator.trace`, :meth:`~KFACOperator.logdet` and
    :meth:`~KFACOperator.diagonal` are exact for the factored matrix.

    Parameters
    ----------
    model, loss_fn, data, params, backend, dtype, device, batch_size, reduction, allow_randomness :
        As in :func:`hessop.model_hessian`. ``loss_fn`` must be a sum or mean of per-sample
        losses (checked). Layers: torch ``nn.Linear`` / ``nn.Conv2d`` (any
        ``F.linear`` / ``F.conv2d`` call whose weight or bias is a parameter); in JAX every
        ``dot_general`` / ``conv_general_dilated`` that applies a parameter (possibly
        transposed) to an activation, with an optional bias added right after, found in the
        traced model: no annotation is needed.
    kind : {"kfac", "ekfac"}
        ``"ekfac"`` refits the eigenvalues in the Kronecker eigenbasis from per-sample
        gradients (a second pass over the data).
    fisher : {"type-2", "mc", "empirical"}
        What ``G`` is built from: ``"type-2"`` the exact loss Hessian with respect to the
        output (one backward pass per entry of a sample's output; KFAC then approximates the
        GGN), ``"mc"`` gradients at ``mc_samples`` labels drawn from the model's predictive
        distribution (the GGN in expectation, one backward pass per draw), ``"empirical"``
        gradients at the true labels (the empirical Fisher of :func:`hessop.model_fisher`).
    weight_sharing : {"expand", "reduce"}
        For layers applied at several positions (sequences, convolutions): ``"expand"``
        (default) treats each position as a sample, ``"reduce"`` sums the output gradients
        and averages the inputs over the positions per sample.
    separate_bias : bool
        True (default): weight and bias get separate blocks, ``G (x) A`` and ``G``; False:
        one block ``G (x) A`` with ``A`` the moment of the input extended by a 1.
    mc_samples : int
        Label draws per sample for ``fisher="mc"``.
    likelihood : {"categorical", "gaussian", "bernoulli"}, optional
        The distribution ``fisher="mc"`` draws from, whose negative log-likelihood
        ``loss_fn`` must be (up to a positive factor, measured and checked on every batch).
        Read from torch loss modules (``CrossEntropyLoss``, ``MSELoss``,
        ``BCEWithLogitsLoss``); required for other losses.
    unsupported : {"error", "exact"}
        Parameters in no supported layer (a LayerNorm, an embedding, a weight used twice):
        ``"error"`` raises :class:`hessop.UnsupportedLayerError` naming each one and why;
        ``"exact"`` gives them together one dense block, the exact block of the GGN (of
        the empirical Fisher for ``fisher="empirical"``).
    seed : int
        Seeds the label draws of ``fisher="mc"`` (numpy, so both frameworks draw the same)
        and ``allow_randomness="fixed-seed"``. No global generator is touched.

    Returns
    -------
    KFACOperator

    Examples
    --------
    >>> import torch, hessop
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> model = model.double()
    >>> x, y = torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    >>> K = hessop.model_kfac(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> K.shape, [layer.name for layer in K.layers]
    ((26, 26), ['0', '2'])
    >>> G = hessop.model_ggn(model, torch.nn.CrossEntropyLoss(), (x, y))
    >>> res = hessop.cg(G, torch.ones(26, dtype=torch.float64), damping=1e-3,
    ...                 M=K.inverse(1e-3), tol=1e-8)
    >>> bool(res.converged)
    True
    """
    kind, fisher, weight_sharing, unsupported = _options(kind, fisher, weight_sharing, unsupported)
    separate_bias = _checks.flag(separate_bias, "separate_bias")
    mc_samples = _checks.integer(mc_samples, "mc_samples", minimum=1)
    seed = _checks.integer(seed, "seed")
    if mc_samples != 1 and fisher != "mc":
        raise ValueError(f"mc_samples={mc_samples} applies to fisher='mc' only")
    p = prepare(
        model,
        loss_fn,
        data,
        params=params,
        backend=backend,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        reduction=reduction,
        allow_randomness=allow_randomness,
        seed=seed,
    )
    why = p.model.per_sample_error()
    if why is not None:
        raise ValueError("Kronecker factors need per-sample losses, but " + why)
    likelihood = _likelihood(p, fisher, likelihood)
    capture = p.backend.kfac_capture(p.model, p.loss.spec, p.batches.first())
    exact = _unsupported(p, capture, unsupported)
    config = _kfac_batch.Config(
        fisher, weight_sharing, separate_bias, p.batches.reduction == "mean", mc_samples, likelihood
    )
    K = KFACOperator(p, capture, config, kind)
    K._build(p, exact, seed)
    return K


def _options(kind: str, fisher: str, sharing: str, unsupported: str) -> tuple[str, ...]:
    for name, value, valid in (
        ("kind", kind, _kfac_batch.KINDS),
        ("fisher", fisher, _kfac_batch.FISHER_TYPES),
        ("weight_sharing", sharing, _kfac_batch.WEIGHT_SHARING),
        ("unsupported", unsupported, UNSUPPORTED),
    ):
        if value not in valid:
            raise unknown(f"{name} option", value, valid)
    return kind, fisher, sharing, unsupported


def _likelihood(p: Prepared, fisher: str, likelihood: str | None) -> str | None:
    if likelihood is not None and likelihood not in _kfac_batch.LIKELIHOODS:
        raise unknown("likelihood", likelihood, _kfac_batch.LIKELIHOODS)
    if fisher != "mc":
        return likelihood
    found = likelihood or p.backend.loss_likelihood(p.model.loss_fn)
    if found is None:
        raise ValueError(
            "fisher='mc' draws labels from the model's predictive distribution, which "
            "hessop cannot read from this loss_fn; pass likelihood='categorical' "
            "(cross-entropy on logits), 'gaussian' (squared error) or 'bernoulli' (binary "
            "cross-entropy on logits)"
        )
    return found


def _unsupported(p: Prepared, capture: Any, unsupported: str) -> list[int]:
    """The leaves that get the exact block (or the error naming them)."""
    found = capture.unsupported
    names = list(getattr(p.model, "names", None) or p.loss.spec.paths)
    items = "; ".join(f"{names[i]} ({why})" for i, why in found.items())
    if not capture.layers:
        raise UnsupportedLayerError(
            "model_kfac found no supported layer (torch nn.Linear / nn.Conv2d; in JAX a "
            "dot_general or conv_general_dilated applying a parameter to an activation) among "
            f"the differentiated parameters: {items}"
        )
    if found and unsupported == "error":
        raise UnsupportedLayerError(
            f"model_kfac: these parameters belong to no supported layer: {items}. Exclude "
            "them with params=, or pass unsupported='exact' to give them their exact block "
            "of the GGN (of the empirical Fisher for fisher='empirical')"
        )
    return sorted(found)

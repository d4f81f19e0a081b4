"""Reference models with the same architecture and weights in PyTorch and JAX.

Three small, smooth classifiers are used by the tests, the benchmarks and ``hessop bench``:

* ``"mlp"``: a multilayer perceptron, 784-512-512-10 with tanh by default.
* ``"cnn"``: a residual CNN without BatchNorm (stem convolution, residual blocks,
  global average pooling, linear head) on 3x32x32 images.
* ``"transformer"``: a pre-LayerNorm transformer encoder on token ids, with attention
  written out (q/k/v projections and a softmax), so both frameworks compute the same math.

The torch side is an ``nn.Module`` (:mod:`hessop.bench.reference_torch`); the JAX side is a
pure function on a plain dict whose keys are torch's ``named_parameters()`` names, in the
same order and with the same shapes (:mod:`hessop.bench.reference_jax`), so flattened
parameter vectors line up across frameworks. Initial weights are drawn with numpy from the
seed (:mod:`hessop.bench.reference_layout`), hence identical in both frameworks and
independent of any global RNG state.

Neither framework is needed to import this module: each framework's module is imported by
the methods that use it.

Examples
--------
>>> from hessop.bench import reference as R
>>> spec = R.get_reference("mlp", sizes=(6, 8, 3))
>>> model = spec.torch_model(seed=0)
>>> x, y = spec.make_batch(4, seed=0, framework="torch")
>>> tuple(model(x).shape)
(4, 3)
>>> params = spec.jax_params_from_torch(model)
>>> list(params) == [name for name, _ in model.named_parameters()]
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hessop.bench.reference_layout import (
    REFERENCE_MODELS,
    as_numpy_dtype,
    draw_params,
    param_layout,
    resolve_config,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DEFAULT_BATCH_SIZES", "REFERENCE_MODELS", "ReferenceSpec", "get_reference"]

# Default batch sizes of the benchmark setting each model was sized for.
DEFAULT_BATCH_SIZES: dict[str, int] = {"mlp": 128, "cnn": 32, "transformer": 32}

_FRAMEWORKS = ("numpy", "torch", "jax")


@dataclass(frozen=True)
class ReferenceSpec:
    """A reference architecture with its configuration, in both frameworks.

    Build one with :func:`get_reference`. ``config`` holds the resolved options; treat it as
    read-only.

    Examples
    --------
    >>> from hessop.bench.reference import get_reference
    >>> spec = get_reference("cnn", image_size=8, channels=4)
    >>> spec.input_shape, spec.num_classes, spec.num_params
    ((3, 8, 8), 10, 754)
    """

    name: str
    config: dict[str, Any]

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.config.items()))))

    # ----------------------------------------------------------------- description
    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        if self.name == "mlp":
            return self.config["sizes"][-1]
        return self.config["num_classes"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (without the batch dimension)."""
        c = self.config
        if self.name == "mlp":
            return (c["sizes"][0],)
        if self.name == "cnn":
            return (c["in_channels"], c["image_size"], c["image_size"])
        return (c["seq_len"],)

    @property
    def integer_inputs(self) -> bool:
        """True when the inputs are token ids (transformer), False for real-valued inputs."""
        return self.name == "transformer"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in torch ``named_parameters()`` order.

        Examples
        --------
        >>> from hessop.bench.reference import get_reference
        >>> get_reference("mlp", sizes=(4, 3)).param_shapes()
        {'layers.0.weight': (3, 4), 'layers.0.bias': (3,)}
        """
        return {name: shape for name, shape, _ in param_layout(self.name, self.config)}

    @property
    def num_params(self) -> int:
        """Total number of scalar parameters."""
        return sum(math.prod(s) for s in self.param_shapes().values())

    # ----------------------------------------------------------------- parameters
    def numpy_params(self, seed: int = 0, dtype: Any = np.float64) -> dict[str, np.ndarray]:
        """Initial parameters drawn from ``seed`` with a local numpy Generator.

        The same seed gives the same weights as :meth:`torch_model` and :meth:`jax_params`
        (values are drawn in float64, then cast to ``dtype``).

        Examples
        --------
        >>> from hessop.bench.reference import get_reference
        >>> p = get_reference("mlp", sizes=(4, 3)).numpy_params(seed=1)
        >>> p["layers.0.weight"].shape, p["layers.0.weight"].dtype
        ((3, 4), dtype('float64'))
        """
        return draw_params(param_layout(self.name, self.config), seed, as_numpy_dtype(dtype))

    def torch_model(
        self,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> torch.nn.Module:
        """The torch ``nn.Module``, with weights from ``seed`` (or from ``params``).

        Parameters
        ----------
        seed
            Seed of the initial weights; global RNG states are left untouched.
        dtype
            Parameter dtype; ``None`` means ``torch.get_default_dtype()``.
        device
            Device of the parameters; ``None`` means CPU.
        params
            Optional mapping from parameter names to arrays (numpy, JAX or torch), e.g. the
            output of :meth:`jax_params`, loaded instead of the seeded weights.

        Examples
        --------
        >>> import torch
        >>> from hessop.bench.reference import get_reference
        >>> spec = get_reference("transformer", d_model=8, num_heads=2, seq_len=5)
        >>> model = spec.torch_model(seed=0, dtype=torch.float64)
        >>> x, _ = spec.make_batch(3, framework="torch")
        >>> tuple(model(x).shape), model.head.weight.dtype
        ((3, 10), torch.float64)
        """
        from hessop.bench import reference_torch

        values = self.numpy_params(seed) if params is None else params
        self._check_names(values, "params")
        return reference_torch.build(self.name, self.config, values, dtype, device)

    def jax_params(self, seed: int = 0, dtype: Any = None, device: Any = None) -> dict[str, Any]:
        """Initial parameters as a dict of JAX arrays, without needing torch.

        Equal to ``jax_params_from_torch(torch_model(seed, ...))`` for the same seed and dtype.
        ``dtype=None`` means JAX's default float (float64 only with ``jax_enable_x64``).

        Examples
        --------
        >>> from hessop.bench.reference import get_reference
        >>> spec = get_reference("mlp", sizes=(4, 3))
        >>> params = spec.jax_params(seed=0, dtype="float32")
        >>> params["layers.0.weight"].shape
        (3, 4)
        """
        from hessop.bench import reference_jax

        dt = reference_jax.default_float() if dtype is None else as_numpy_dtype(dtype)
        return reference_jax.to_jax(self.numpy_params(seed, dt), device)

    def jax_params_from_torch(self, model: torch.nn.Module, device: Any = None) -> dict[str, Any]:
        """Copy the weights of ``model`` into a dict of JAX arrays keyed by torch names.

        The dtype is kept; float64 needs ``jax_enable_x64`` (a clear error otherwise, never a
        silent downcast).

        Examples
        --------
        >>> from hessop.bench.reference import get_reference
        >>> spec = get_reference("mlp", sizes=(4, 3))
        >>> params = spec.jax_params_from_torch(spec.torch_model(seed=0))
        >>> list(params)
        ['layers.0.weight', 'layers.0.bias']
        """
        from hessop.bench import reference_jax

        values = {name: p.detach().cpu().numpy() for name, p in model.named_parameters()}
        self._check_names(values, "model.named_parameters()")
        shapes = self.param_shapes()
        for name, v in values.items():
            if v.shape != shapes[name]:
                raise ValueError(
                    f"{name!r} has shape {v.shape} but the {self.name!r} spec expects "
                    f"{shapes[name]}; build the model with this spec."
                )
        return reference_jax.to_jax(values, device)

    def _check_names(self, values: Mapping[str, Any], what: str) -> None:
        expected = list(self.param_shapes())
        got = list(values)
        if sorted(got) != sorted(expected):
            missing = [n for n in expected if n not in values]
            extra = [n for n in got if n not in expected]
            raise ValueError(
                f"{what} does not match the {self.name!r} reference model: "
                f"missing {missing}, unexpected {extra}."
            )

    # ----------------------------------------------------------------- forward and loss
    def jax_apply(self, params: Mapping[str, Any], x: Any) -> Any:
        """Logits of the JAX model: the same math as ``torch_model()(x)``.

        Pure and jit-friendly (the configuration is static). Float32 matmuls follow JAX's
        default precision, which may use TF32 on GPUs; wrap calls in
        ``jax.default_matmul_precision("highest")`` for full float32 parity with torch.

        Examples
        --------
        >>> from hessop.bench.reference import get_reference
        >>> spec = get_reference("mlp", sizes=(6, 8, 3))
        >>> params = spec.jax_params(seed=0, dtype="float32")
        >>> x, _ = spec.make_batch(2, framework="jax", dtype="float32")
        >>> spec.jax_apply(params, x).shape
        (2, 3)
        """
        from hessop.bench import reference_jax

        return reference_jax.apply(self.name, self.config, params, x)

    @staticmethod
    def torch_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits`` (batch, classes) and integer labels, mean over the batch.

        Examples
        --------
        >>> import torch
        >>> from hessop.bench.reference import ReferenceSpec
        >>> loss = ReferenceSpec.torch_loss(torch.zeros(2, 4), torch.tensor([0, 3]))
        >>> round(loss.item(), 6) == round(math.log(4), 6)
        True
        """
        from hessop.bench import reference_torch

        return reference_torch.loss(logits, y)

    @staticmethod
    def jax_loss(logits: Any, y: Any) -> Any:
        """Cross-entropy of ``logits`` (batch, classes) and integer labels, mean over the batch.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from hessop.bench.reference import ReferenceSpec
        >>> loss = ReferenceSpec.jax_loss(jnp.zeros((2, 4)), jnp.array([0, 3]))
        >>> bool(jnp.isclose(loss, jnp.log(4.0)))
        True
        """
        from hessop.bench import reference_jax

        return reference_jax.loss(logits, y)

    def jax_objective(self, params: Mapping[str, Any], x: Any, y: Any) -> Any:
        """The scalar training loss as a function of ``params``: ``f(params, x, y)``.

        Examples
        --------
        >>> import jax
        >>> from hessop.bench.reference import get_reference
        >>> spec = get_reference("mlp", sizes=(4, 3))
        >>> params = spec.jax_params(seed=0, dtype="float32")
        >>> x, y = spec.make_batch(5, framework="jax", dtype="float32")
        >>> grads = jax.grad(spec.jax_objective)(params, x, y)
        >>> grads["layers.0.bias"].shape
        (3,)
        """
        return self.jax_loss(self.jax_apply(params, x), y)

    # ----------------------------------------------------------------- data
    def make_batch(
        self,
        batch_size: int | None = None,
        seed: int = 0,
        framework: str = "numpy",
        dtype: Any = None,
        device: Any = None,
    ) -> tuple[Any, Any]:
        """A synthetic batch ``(x, y)``: standard-normal inputs (token ids for the
        transformer) and uniform integer class labels, from a local numpy Generator.

        Parameters
        ----------
        batch_size
            Number of examples; ``None`` means the benchmark default of this model.
        seed
            Seed of the batch; the same seed gives the same numbers in every framework.
        framework
            ``"numpy"``, ``"torch"`` or ``"jax"``.
        dtype
            Float dtype of ``x`` (ignored for token ids). ``None`` means float64 for numpy,
            ``torch.get_default_dtype()`` for torch, JAX's default float for JAX.
        device
            Device of the arrays (torch device or JAX device); ``None`` means the default.

        Examples
        --------
        >>> from hessop.bench.reference import get_reference
        >>> spec = get_reference("transformer", vocab_size=7, seq_len=5, d_model=8)
        >>> x, y = spec.make_batch(3, seed=0)
        >>> x.shape, x.dtype, y.shape, int(x.max()) < 7
        ((3, 5), dtype('int64'), (3,), True)
        """
        if framework not in _FRAMEWORKS:
            raise ValueError(
                f"Unknown framework {framework!r}; valid ones are 'numpy', 'torch', 'jax'."
            )
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZES[self.name]
        rng = np.random.default_rng(seed)
        shape = (batch_size, *self.input_shape)
        if self.integer_inputs:
            x = rng.integers(0, self.config["vocab_size"], size=shape, dtype=np.int64)
        else:
            x = rng.standard_normal(shape)
        y = rng.integers(0, self.num_classes, size=(batch_size,), dtype=np.int64)
        if framework == "torch":
            from hessop.bench import reference_torch

            return reference_torch.batch(x, y, self.integer_inputs, dtype, device)
        if framework == "jax":
            from hessop.bench import reference_jax

            return reference_jax.batch(x, y, self.integer_inputs, dtype, device)
        if not self.integer_inputs:
            x = x.astype(np.float64 if dtype is None else as_numpy_dtype(dtype))
        return x, y


def get_reference(name: str, **overrides: Any) -> ReferenceSpec:
    """The reference model ``name`` (one of :data:`REFERENCE_MODELS`) with options overridden.

    Options and defaults:

    * ``"mlp"``: ``sizes=(784, 512, 512, 10)``, ``activation="tanh"``.
    * ``"cnn"``: ``in_channels=3``, ``image_size=32``, ``channels=16``, ``num_blocks=2``,
      ``num_classes=10``, ``activation="gelu"``.
    * ``"transformer"``: ``vocab_size=100``, ``seq_len=32``, ``d_model=64``,
      ``num_heads=4``, ``num_layers=2``, ``d_ff=4 * d_model``, ``num_classes=10``,
      ``activation="gelu"``, ``eps=1e-5``.

    ``activation`` is one of ``"tanh"``, ``"gelu"`` (erf form) and ``"gelu_tanh"``.

    Raises
    ------
    ValueError
        For an unknown model name or activation, or inconsistent sizes.
    TypeError
        For an option the model does not have.

    Examples
    --------
    >>> from hessop.bench.reference import get_reference
    >>> spec = get_reference("mlp", sizes=(10, 20, 3))
    >>> spec.name, spec.config["sizes"], spec.num_params
    ('mlp', (10, 20, 3), 283)
    """
    return ReferenceSpec(name, resolve_config(name, overrides))

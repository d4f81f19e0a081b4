"""What ``hessop bench`` measures: the options of a run and their defaults.

Examples
--------
>>> from hessop.bench.config import BenchConfig
>>> config = BenchConfig.quick_defaults()
>>> config.models, config.memory, config.repeats
(['mlp'], 'off', 5)
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

#: the AD modes measured by default (hessop's aliases)
BENCH_MODES: tuple[str, ...] = ("fwd-rev", "rev-fwd", "rev-rev")
FRAMEWORKS: tuple[str, ...] = ("torch", "jax")
MODELS: tuple[str, ...] = ("mlp", "cnn", "transformer")
#: peer libraries (torch) and their (module, pip distribution)
PEERS: dict[str, tuple[str, str]] = {
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
    "pyhessian": ("pyhessian", "pyhessian"),
    "hessian-eigenthings": ("hessian_eigenthings", "hessian-eigenthings"),
}
#: hessop's canonical mode names -> the short aliases used in the report
SHORT_MODES: dict[str, str] = {
    "forward-over-reverse": "fwd-rev",
    "reverse-over-forward": "rev-fwd",
    "reverse-over-reverse": "rev-rev",
}

#: default batch sizes: the reference sizes (MLP 128, CNN 32, transformer 32) where the
#: default run stays in a few minutes on two CPU cores
DEFAULT_BATCH_SIZES: dict[str, int] = {"mlp": 128, "cnn": 8, "transformer": 16}
DEFAULT_REPEATS = 4
DEFAULT_K = 8

#: ``--quick``: a smoke test of the whole harness in seconds. The tiny MLP only: a JAX
#: compilation of the tiny CNN or transformer takes seconds on a CPU, and a case needs a
#: dozen of them (add ``--models`` to run those too). One torch thread: tiny models gain
#: nothing from a second one and lose much when other jobs share the cores.
QUICK_MODELS: tuple[str, ...] = ("mlp",)
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
QUICK_REPEATS = 5
QUICK_K = 4


@dataclass
class BenchConfig:
    """The options of one ``hessop bench`` run (built from the command line by
    :func:`hessop.cli.main`).

    ``memory`` is ``"isolated"`` (one fresh process per measurement), ``"grouped"`` (one
    per framework and model) or ``"off"``. ``threads`` sets torch's intra-op threads for
    the run (``None``: torch's own choice).
    """

    models: list[str] = field(default_factory=lambda: list(MODELS))
    frameworks: list[str] = field(default_factory=lambda: list(FRAMEWORKS))
    modes: list[str] = field(default_factory=lambda: list(BENCH_MODES))
    batch_sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BATCH_SIZES))
    repeats: int = DEFAULT_REPEATS
    k: int = DEFAULT_K
    dtype: str = "float32"
    memory: str = "isolated"
    memory_reused: bool = False
    threads: int | None = None
    peers: bool = False
    compile: bool = False
    quick: bool = False
    seed: int = 0

    @classmethod
    def quick_defaults(cls, **changes: Any) -> BenchConfig:
        """The ``--quick`` configuration, with ``changes`` applied."""
        base = cls(
            models=list(QUICK_MODELS),
            batch_sizes={m: QUICK_BATCH_SIZE for m in MODELS},
            repeats=QUICK_REPEATS,
            k=QUICK_K,
            memory="off",
            threads=1,
            quick=True,
        )
        return dataclasses.replace(base, **changes)

    def overrides(self, model: str) -> dict[str, Any]:
        """Options of the reference model ``model`` in this run (tiny ones with ``quick``)."""
        return dict(QUICK_OVERRIDES[model]) if self.quick else {}

    def to_json(self) -> dict[str, Any]:
        """The options as a JSON-able dict (inverse: ``BenchConfig(**d)``)."""
        return dataclasses.asdict(self)


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it).

    >>> installed("json"), installed("no_such_module_here")
    (True, False)
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False

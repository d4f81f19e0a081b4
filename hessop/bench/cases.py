"""The measured callables ("rows") of one framework and one model, and their registry.

A framework module (:mod:`~hessop.bench.cases_torch`, :mod:`~hessop.bench.cases_jax`)
turns a reference model into a :class:`Setup`: the loss, the point, the batch, the vectors
and the hand-written products of that framework. The row builders in :data:`ROWS` then
turn a setup into named zero-argument callables, most of them framework-neutral since they
only call hessop. Nothing runs while a case is built.

Adding rows
-----------
Write a builder ``rows(setup, config) -> Iterable[Row]`` and append it to :data:`ROWS`
(order = table order). A row is timed in every round; give it ``memory=`` to also measure
its peak memory in a fresh process, and ``inputs=`` to say which vectors it holds before
its call. The report, the summary and the plot pick new rows up by name (``kind:detail``).

Examples
--------
>>> from hessop.bench.cases import ROWS, Row
>>> [builder.__name__ for builder in ROWS]
['gradient_rows', 'new_point_rows', 'compiled_rows', 'reused_rows', 'model_rows', 'peer_rows']
>>> Row("gradient", run=lambda: 0.0).inputs
'v'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hessop.bench.config import FRAMEWORKS, SHORT_MODES, BenchConfig

Thunk = Callable[[], Any]

#: the module that builds the :class:`Setup` of each framework (``build_setup(model, config)``)
SETUP_MODULES: dict[str, str] = {
    "torch": "hessop.bench.cases_torch",
    "jax": "hessop.bench.cases_jax",
}


@dataclass
class Setup:
    """What every row of one framework and model is built from.

    ``f(params, x, y)`` is the scalar loss at the point ``params`` (a dict of the framework's
    arrays); ``v`` a flat vector and ``V`` a ``(d, k)`` matrix of the framework's arrays;
    ``model`` / ``loss_fn`` / ``model_params`` are what :func:`hessop.model_hessian` takes
    (a torch module with ``model_params=None``, or a JAX ``apply(params, x)`` with the
    parameters). ``hand`` maps each AD mode to its hand-written product at the point, and
    ``hand_reused`` is the hand-written product with state kept between calls, mirroring
    an operator in mode ``reused_mode``. ``sync`` waits for a result; ``nbytes`` sizes an
    array.
    """

    framework: str
    model_name: str
    f: Callable[..., Any]
    params: dict[str, Any]
    x: Any
    y: Any
    v: Any
    V: Any
    model: Any
    loss_fn: Callable[[Any, Any], Any]
    model_params: Any
    device: str
    num_params: int
    gradient: Thunk
    hand: dict[str, Thunk]
    hand_reused: Thunk
    reused_mode: str
    sync: Callable[[Any], Any]
    nbytes: Callable[[Any], int]
    peers: Callable[[BenchConfig, list[str]], dict[str, Thunk]] | None = None
    notes: list[str] = field(default_factory=list)
    #: figures the rows record while they run (``compile_time_s``), for the report
    extra: dict[str, Any] = field(default_factory=dict)
    #: the mode hessop's ``"auto"`` chooses here (set by :func:`build_case`)
    auto_mode: str = ""

    def hessian(self, **kw: Any) -> Any:
        """``hessop.hessian`` of the loss at the point, in this framework."""
        import hessop

        return hessop.hessian(self.f, self.params, self.x, self.y, backend=self.framework, **kw)


@dataclass(frozen=True)
class Row:
    """One measurement: ``run`` is timed; ``memory`` (when given) is the call whose peak
    memory is measured; ``inputs`` names what the call holds besides the parameters and the
    batch (``""``, ``"v"`` or ``"V"``), counted in its peak as a device allocator would."""

    name: str
    run: Thunk
    memory: Thunk | None = None
    inputs: str = "v"


RowBuilder = Callable[[Setup, BenchConfig], Iterable[Row]]


def gradient_rows(s: Setup, config: BenchConfig) -> Iterator[Row]:
    """``gradient``: the framework's fastest plain gradient, the unit of every ratio."""
    yield Row("gradient", s.gradient, memory=s.gradient, inputs="")


def new_point_rows(s: Setup, config: BenchConfig) -> Iterator[Row]:
    """``hvp:<mode>``: a fresh operator and one product, per AD mode, each followed by
    ``hand:<mode>``, the same product written by hand in the framework."""
    for mode in config.modes:

        def run(mode: str = mode) -> Any:
            return s.hessian(mode=mode).matvec(s.v)

        yield Row(f"hvp:{mode}", run, memory=run)
        yield Row(f"hand:{mode}", s.hand[mode])


def compiled_rows(s: Setup, config: BenchConfig) -> Iterator[Row]:
    """``hvp:compiled`` (``--compile``): a new-point product with ``compile=True``; the
    first operator's one-time compilation goes to the case's ``extra``."""
    if not config.compile:
        return

    def run() -> Any:
        H = s.hessian(compile=True)
        if "compile_time_s" not in s.extra:
            s.extra.update(compile_time_s=H.compile_time, compiled_mode=H.mode)
        return H.matvec(s.v)

    yield Row("hvp:compiled", run)


def reused_rows(s: Setup, config: BenchConfig) -> Iterator[Row]:
    """``matvec`` / ``matmat``: products of an operator that has made one before (the CG
    and Lanczos regime), in the default mode, and ``hand:matvec``, their hand-written twin.

    The operator makes its first product on the first call (the warm-up), so that the
    warm-up also compiles the reused path.
    """
    H = s.hessian()
    used: list[bool] = []

    def first_use() -> None:
        if not used:
            H.matvec(s.v)
            used.append(True)

    def matvec() -> Any:
        first_use()
        return H.matvec(s.v)

    def matmat() -> Any:
        first_use()
        return H.matmat(s.V)

    def fresh_matvec() -> Any:  # an operator's whole life: state kept + two products
        op = s.hessian()
        s.sync(op.matvec(s.v))
        return op.matvec(s.v)

    memory = fresh_matvec if config.memory_reused else None
    yield Row("matvec", matvec, memory=memory)
    hand = s.hand_reused if s.auto_mode == s.reused_mode else s.hand[s.auto_mode]
    yield Row("hand:matvec", hand)
    yield Row("matmat", matmat, inputs="V")


def model_rows(s: Setup, config: BenchConfig) -> Iterator[Row]:
    """The model-level API where users call it: ``model:build`` (``model_hessian`` on a new
    batch, built alone), ``model:hvp`` (built and one product at the new point, to compare
    with ``hand:<auto mode>``) and ``model:model_hvp`` (the one-call convenience)."""
    import hessop

    data = (s.x, s.y)

    def build() -> Any:
        return hessop.model_hessian(s.model, s.loss_fn, data, params=s.model_params)

    def product() -> Any:
        return build().matvec(s.v)

    def one_call() -> Any:  # v is flat in hessop's layout, the model's layout too
        return hessop.model_hvp(s.model, s.loss_fn, s.x, s.y, s.v, params=s.model_params)

    yield Row("model:build", build, inputs="")
    yield Row("model:hvp", product)
    yield Row("model:model_hvp", one_call)


def peer_rows(s: Setup, config: BenchConfig) -> Iterator[Row]:
    """``peer:<name>`` (``--peers``): the peer libraries' products on the same model."""
    if config.peers and s.peers is not None:
        for name, fn in s.peers(config, s.notes).items():
            yield Row(f"peer:{name}", fn)
    elif config.peers:
        s.notes.append(f"the peers are torch libraries; none is measured in {s.framework}")


#: The row builders of every case, in table order (see "Adding rows" above).
ROWS: list[RowBuilder] = [
    gradient_rows,
    new_point_rows,
    compiled_rows,
    reused_rows,
    model_rows,
    peer_rows,
]


@dataclass
class Case:
    """The rows of one framework and model, ready to run."""

    setup: Setup
    batch_size: int
    rows: dict[str, Row]

    @property
    def framework(self) -> str:
        return self.setup.framework

    @property
    def model(self) -> str:
        return self.setup.model_name

    @property
    def notes(self) -> list[str]:
        return self.setup.notes

    def sync(self, out: Any) -> Any:
        return self.setup.sync(out)

    def memory_names(self) -> list[str]:
        """The rows measured for peak memory."""
        return [name for name, row in self.rows.items() if row.memory is not None]

    def resident_bytes(self, name: str) -> int:
        """Bytes the memory call of row ``name`` needs before it runs: parameters and batch,
        plus its input vectors (as a device allocator counts them in the peak)."""
        s = self.setup
        base = sum(s.nbytes(a) for a in [*s.params.values(), s.x, s.y])
        extra = {"": 0, "v": s.nbytes(s.v), "V": s.nbytes(s.V)}[self.rows[name].inputs]
        return base + extra


def build_case(framework: str, model: str, config: BenchConfig) -> Case:
    """The rows of ``model`` in ``framework`` (nothing is run yet)."""
    if framework not in SETUP_MODULES:
        raise ValueError(f"unknown framework {framework!r}; valid ones are {', '.join(FRAMEWORKS)}")
    setup: Setup = importlib.import_module(SETUP_MODULES[framework]).build_setup(model, config)
    mode = setup.hessian().mode
    setup.auto_mode = SHORT_MODES.get(mode, mode)
    rows: dict[str, Row] = {}
    for builder in ROWS:
        for row in builder(setup, config):
            rows[row.name] = row
    return Case(setup, config.batch_sizes[model], rows)

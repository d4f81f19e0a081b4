"""The diagonal blocks of a Kronecker-factored matrix, with the array API.

A :class:`KronBlock` is one layer's block ``G (x) A`` (KFAC) or its eigenvalue-corrected form
``(Q_G (x) Q_A) diag(E) (Q_G (x) Q_A)^T`` (EKFAC). It acts on the ``(d_out, d_r)`` matrix
view ``M`` of its parameters (the weight with its axes permuted to ``(out..., in...)``; with
the bias as a last column when the two share a block; a bias alone is ``(d_out, 1)`` with
``A = [[1]]``), so that ``(G (x) A) vec(M) = vec(G M A)`` in row-major order. Inverses,
log-determinants and diagonals follow from the eigendecompositions of the factors:
``(G (x) A + d I)^{-1} vec(M) = vec(Q_G [(Q_G^T M Q_A) / (lambda_G lambda_A^T + d)] Q_A^T)``.
A :class:`DenseBlock` is an explicit symmetric matrix over some leaves (the exact block of
parameters that belong to no supported layer).

A block object holds only the static layout (hashable: equal layouts share compiled
products); its arrays travel separately as a ``state`` dict, so that a whole product is one
function of ``(V, states)`` that JAX compiles once (:func:`compiled`). Vectors travel as
rows: ``Vt`` is ``(k, d)``, the transpose of a block of ``k`` columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Leaf:
    """Where a parameter leaf sits in the flat layout."""

    index: int
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def rows(self, Vt: Any) -> Any:
        return Vt[:, self.offset : self.offset + self.size]


def leaves_of(spec: Any) -> list[Leaf]:
    """The position of every leaf of a parameter layout."""
    out, offset = [], 0
    for i, shape in enumerate(spec.shapes):
        out.append(Leaf(i, offset, tuple(shape)))
        offset += out[-1].size
    return out


@dataclass(frozen=True)
class KronBlock:
    """One layer's block (see the module docstring). State: ``G``, ``A``; after
    :meth:`with_eig` also ``lG``, ``QG``, ``lA``, ``QA``; EKFAC adds ``E``."""

    name: str
    weight: Leaf | None
    bias: Leaf | None
    perm: tuple[int, ...]
    d_out: int

    @property
    def d_in(self) -> int:
        return self.weight.size // self.d_out if self.weight is not None else 0

    # --- the matrix view of the parameters ------------------------------------------------
    def gather(self, xp: Any, Vt: Any) -> Any:
        k, parts = Vt.shape[0], []
        if self.weight is not None:
            W = xp.reshape(self.weight.rows(Vt), (k, *self.weight.shape))
            W = xp.permute_dims(W, (0, *(1 + p for p in self.perm)))
            parts.append(xp.reshape(W, (k, self.d_out, self.d_in)))
        if self.bias is not None:
            parts.append(xp.reshape(self.bias.rows(Vt), (k, self.d_out, 1)))
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=2)

    def scatter(self, xp: Any, R: Any, out: list[Any]) -> None:
        k = R.shape[0]
        if self.weight is not None:
            W = R[:, :, : self.d_in] if self.bias is not None else R
            W = xp.reshape(W, (k, *(self.weight.shape[p] for p in self.perm)))
            inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
            W = xp.permute_dims(W, (0, *(1 + q for q in inverse)))
            out[self.weight.index] = xp.reshape(W, (k, self.weight.size))
        if self.bias is not None:
            out[self.bias.index] = R[:, :, -1]

    # --- the matrix, given its state ------------------------------------------------------
    @staticmethod
    def with_eig(xp: Any, s: dict[str, Any]) -> dict[str, Any]:
        """The state with the factors' eigendecompositions."""
        g, a = xp.linalg.eigh(s["G"]), xp.linalg.eigh(s["A"])
        return {**s, "lG": g.eigenvalues, "QG": g.eigenvectors, "lA": a.eigenvalues,
                "QA": a.eigenvectors}  # fmt: skip

    @staticmethod
    def eigenvalues(s: dict[str, Any]) -> Any:
        """The ``(d_out, d_r)`` eigenvalues of the block (EKFAC's refit ones)."""
        return s["E"] if "E" in s else s["lG"][:, None] * s["lA"][None, :]

    def mul(self, xp: Any, s: dict[str, Any], M: Any) -> Any:
        if "E" not in s:
            return s["G"] @ M @ s["A"]
        return _in_eigenbasis(xp, s, M, s["E"], divide=False)

    def inv(self, xp: Any, s: dict[str, Any], M: Any, damping: Any) -> Any:
        return _in_eigenbasis(xp, s, M, self.eigenvalues(s) + damping, divide=True)

    def trace(self, xp: Any, s: dict[str, Any]) -> Any:
        if "E" in s:
            return xp.sum(s["E"])
        return xp.sum(xp.linalg.diagonal(s["G"])) * xp.sum(xp.linalg.diagonal(s["A"]))

    def logdet(self, xp: Any, s: dict[str, Any], damping: Any) -> Any:
        return xp.sum(xp.log(xp.clip(self.eigenvalues(s), min=0.0) + damping))

    def smallest(self, xp: Any, s: dict[str, Any]) -> Any:
        return xp.min(self.eigenvalues(s))

    def diagonal(self, xp: Any, s: dict[str, Any]) -> Any:
        if "E" not in s:
            dg, da = xp.linalg.diagonal(s["G"]), xp.linalg.diagonal(s["A"])
            return (dg[:, None] * da[None, :])[None]
        QG, QA = s["QG"], s["QA"]
        return ((QG * QG) @ s["E"] @ xp.matrix_transpose(QA * QA))[None]


def _in_eigenbasis(xp: Any, s: dict[str, Any], M: Any, scale: Any, divide: bool) -> Any:
    T = xp.matrix_transpose(s["QG"]) @ M @ s["QA"]
    T = T / scale if divide else T * scale
    return s["QG"] @ T @ xp.matrix_transpose(s["QA"])


@dataclass(frozen=True)
class DenseBlock:
    """An explicit symmetric block over some leaves (their entries, in leaf order). State:
    ``D``; after :meth:`with_eig` also ``lD``, ``UD``."""

    leaves: tuple[Leaf, ...]
    name: str = "exact block"

    def gather(self, xp: Any, Vt: Any) -> Any:
        return xp.concat([leaf.rows(Vt) for leaf in self.leaves], axis=1)

    def scatter(self, xp: Any, R: Any, out: list[Any]) -> None:
        start = 0
        for leaf in self.leaves:
            out[leaf.index] = R[:, start : start + leaf.size]
            start += leaf.size

    @staticmethod
    def with_eig(xp: Any, s: dict[str, Any]) -> dict[str, Any]:
        res = xp.linalg.eigh(s["D"])
        return {**s, "lD": res.eigenvalues, "UD": res.eigenvectors}

    def mul(self, xp: Any, s: dict[str, Any], M: Any) -> Any:
        return M @ s["D"]

    def inv(self, xp: Any, s: dict[str, Any], M: Any, damping: Any) -> Any:
        U = s["UD"]
        return ((M @ U) / (s["lD"] + damping)) @ xp.matrix_transpose(U)

    def trace(self, xp: Any, s: dict[str, Any]) -> Any:
        return xp.sum(xp.linalg.diagonal(s["D"]))

    def logdet(self, xp: Any, s: dict[str, Any], damping: Any) -> Any:
        return xp.sum(xp.log(xp.clip(s["lD"], min=0.0) + damping))

    def smallest(self, xp: Any, s: dict[str, Any]) -> Any:
        return xp.min(s["lD"])

    def diagonal(self, xp: Any, s: dict[str, Any]) -> Any:
        return xp.linalg.diagonal(s["D"])[None]


# --- whole-matrix functions, compiled once per layout ---------------------------------------
def _product(blocks: tuple, num_leaves: int, op: str) -> Callable[..., Any]:
    def fn(xp: Any, V: Any, states: list[dict[str, Any]], damping: Any) -> Any:
        vec = len(V.shape) == 1
        Vt = V[None, :] if vec else xp.permute_dims(V, (1, 0))
        out: list[Any] = [None] * num_leaves
        for b, s in zip(blocks, states):
            M = b.gather(xp, Vt)
            b.scatter(xp, b.mul(xp, s, M) if op == "mul" else b.inv(xp, s, M, damping), out)
        R = xp.concat(out, axis=1)
        return R[0] if vec else xp.permute_dims(R, (1, 0))

    return fn


def _eig(blocks: tuple, num_leaves: int, op: str) -> Callable[..., Any]:
    def fn(xp: Any, states: list[dict[str, Any]]) -> Any:
        return [b.with_eig(xp, s) for b, s in zip(blocks, states)]

    return fn


def _summary(blocks: tuple, num_leaves: int, op: str) -> Callable[..., Any]:
    """Trace, log-determinant (at ``damping``), smallest eigenvalue and diagonal."""

    def fn(xp: Any, states: list[dict[str, Any]], damping: Any) -> Any:
        out: list[Any] = [None] * num_leaves
        for b, s in zip(blocks, states):
            b.scatter(xp, b.diagonal(xp, s), out)
        pairs = list(zip(blocks, states))
        trace = sum(b.trace(xp, s) for b, s in pairs)
        logdet = sum(b.logdet(xp, s, damping) for b, s in pairs)
        smallest = xp.min(xp.stack([b.smallest(xp, s) for b, s in pairs]))
        return trace, logdet, smallest, xp.concat(out, axis=1)[0]

    return fn


_FUNCTIONS: dict[Any, Callable[..., Any]] = {}
_BUILDERS = {"mul": _product, "inv": _product, "eig": _eig, "summary": _summary}


def compiled(bk: Any, device: Any, blocks: tuple, num_leaves: int, op: str) -> Callable[..., Any]:
    """``op`` over these blocks as ``fn(*arrays)``, compiled by the backend where that pays
    (JAX: once per layout and shapes, shared by every operator with the same layout)."""
    key = (blocks, num_leaves, op)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        if len(_FUNCTIONS) > 256:  # layouts of operators long gone
            _FUNCTIONS.clear()
        fn = _FUNCTIONS[key] = _BUILDERS[op](blocks, num_leaves, op)
    return bk.jit(fn, device)

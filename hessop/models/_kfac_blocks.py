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

Vectors travel as rows: ``Vt`` is ``(k, d)``, the transpose of a block of ``k`` columns.
"""

from __future__ import annotations

from typing import Any


class _Leaf:
    """Where a parameter leaf sits in the flat layout."""

    def __init__(self, index: int, offset: int, shape: tuple[int, ...]) -> None:
        self.index, self.offset, self.shape = index, offset, tuple(shape)
        self.size = 1
        for s in shape:
            self.size *= int(s)

    def rows(self, Vt: Any) -> Any:
        return Vt[:, self.offset : self.offset + self.size]


class KronBlock:
    """One layer's block (see the module docstring)."""

    def __init__(
        self,
        xp: Any,
        name: str,
        weight: _Leaf | None,
        bias: _Leaf | None,
        perm: tuple[int, ...],
        G: Any,
        A: Any,
    ) -> None:
        self.xp, self.name, self.weight, self.bias, self.perm = xp, name, weight, bias, perm
        self.G, self.A = G, A
        self.E: Any = None  # EKFAC's eigenvalues, (d_out, d_r)
        self._eig: tuple[Any, Any, Any, Any] | None = None
        self.d_out = int(G.shape[0])
        if weight is not None:
            self.permuted = tuple(weight.shape[p] for p in perm)
            self.inverse_perm = tuple(sorted(range(len(perm)), key=perm.__getitem__))
            self.d_in = weight.size // self.d_out

    # --- the matrix view of the parameters ------------------------------------------------
    def gather(self, Vt: Any) -> Any:
        xp, k = self.xp, Vt.shape[0]
        parts = []
        if self.weight is not None:
            W = xp.reshape(self.weight.rows(Vt), (k, *self.weight.shape))
            W = xp.permute_dims(W, (0, *(1 + p for p in self.perm)))
            parts.append(xp.reshape(W, (k, self.d_out, self.d_in)))
        if self.bias is not None:
            parts.append(xp.reshape(self.bias.rows(Vt), (k, self.d_out, 1)))
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=2)

    def scatter(self, R: Any, out: list[Any]) -> None:
        xp, k = self.xp, R.shape[0]
        if self.weight is not None:
            W = R[:, :, : self.d_in] if self.bias is not None else R
            W = xp.reshape(W, (k, *self.permuted))
            W = xp.permute_dims(W, (0, *(1 + q for q in self.inverse_perm)))
            out[self.weight.index] = xp.reshape(W, (k, self.weight.size))
        if self.bias is not None:
            out[self.bias.index] = R[:, :, -1]

    # --- the matrix -----------------------------------------------------------------------
    def eig(self) -> tuple[Any, Any, Any, Any]:
        """``(lambda_G, Q_G, lambda_A, Q_A)``, computed once."""
        if self._eig is None:
            gv = self.xp.linalg.eigh(self.G)
            av = self.xp.linalg.eigh(self.A)
            self._eig = (gv.eigenvalues, gv.eigenvectors, av.eigenvalues, av.eigenvectors)
        return self._eig

    def eigenvalues(self) -> Any:
        """The ``(d_out, d_r)`` eigenvalues of the block (EKFAC's refit ones)."""
        if self.E is not None:
            return self.E
        lg, _, la, _ = self.eig()
        return lg[:, None] * la[None, :]

    def mul(self, M: Any) -> Any:
        if self.E is None:
            return self.G @ M @ self.A
        return self._in_eigenbasis(M, self.E, divide=False)

    def inv(self, M: Any, damping: float) -> Any:
        return self._in_eigenbasis(M, self.eigenvalues() + damping, divide=True)

    def _in_eigenbasis(self, M: Any, scale: Any, divide: bool) -> Any:
        xp = self.xp
        _, QG, _, QA = self.eig()
        T = xp.matrix_transpose(QG) @ M @ QA
        T = T / scale if divide else T * scale
        return QG @ T @ xp.matrix_transpose(QA)

    def trace(self) -> Any:
        xp = self.xp
        if self.E is not None:
            return xp.sum(self.E)
        return xp.sum(xp.linalg.diagonal(self.G)) * xp.sum(xp.linalg.diagonal(self.A))

    def logdet(self, damping: float) -> Any:
        xp = self.xp
        return xp.sum(xp.log(xp.clip(self.eigenvalues(), min=0.0) + damping))

    def min_eigenvalue(self) -> Any:
        return self.xp.min(self.eigenvalues())

    def diagonal(self) -> Any:
        xp = self.xp
        if self.E is None:
            return (xp.linalg.diagonal(self.G)[:, None] * xp.linalg.diagonal(self.A)[None, :])[None]
        _, QG, _, QA = self.eig()
        return ((QG * QG) @ self.E @ xp.matrix_transpose(QA * QA))[None]


class DenseBlock:
    """An explicit symmetric block over some leaves (their flat entries, in leaf order)."""

    def __init__(self, xp: Any, leaves: list[_Leaf], D: Any) -> None:
        self.xp, self.leaves, self.D = xp, leaves, D
        self.name = "exact block"
        self._eig: tuple[Any, Any] | None = None

    def gather(self, Vt: Any) -> Any:
        return self.xp.concat([leaf.rows(Vt) for leaf in self.leaves], axis=1)

    def scatter(self, R: Any, out: list[Any]) -> None:
        start = 0
        for leaf in self.leaves:
            out[leaf.index] = R[:, start : start + leaf.size]
            start += leaf.size

    def eig(self) -> tuple[Any, Any]:
        if self._eig is None:
            res = self.xp.linalg.eigh(self.D)
            self._eig = (res.eigenvalues, res.eigenvectors)
        return self._eig

    def mul(self, M: Any) -> Any:
        return M @ self.D

    def inv(self, M: Any, damping: float) -> Any:
        lam, U = self.eig()
        return ((M @ U) / (lam + damping)) @ self.xp.matrix_transpose(U)

    def trace(self) -> Any:
        return self.xp.sum(self.xp.linalg.diagonal(self.D))

    def logdet(self, damping: float) -> Any:
        xp = self.xp
        return xp.sum(xp.log(xp.clip(self.eig()[0], min=0.0) + damping))

    def min_eigenvalue(self) -> Any:
        return self.xp.min(self.eig()[0])

    def diagonal(self) -> Any:
        return self.xp.linalg.diagonal(self.D)[None]


def leaves_of(spec: Any) -> list[_Leaf]:
    """The position of every leaf of a parameter layout."""
    out, offset = [], 0
    for i, shape in enumerate(spec.shapes):
        out.append(_Leaf(i, offset, shape))
        offset += out[-1].size
    return out


def apply(xp: Any, blocks: list[Any], op: Any, V: Any, num_leaves: int) -> Any:
    """``op(block, M)`` of every block, assembled: a vector ``(d,)`` or a block ``(d, k)``."""
    vec = len(V.shape) == 1
    Vt = V[None, :] if vec else xp.permute_dims(V, (1, 0))
    out: list[Any] = [None] * num_leaves
    for b in blocks:
        b.scatter(op(b, b.gather(Vt)), out)
    R = xp.concat(out, axis=1)
    return R[0] if vec else xp.permute_dims(R, (1, 0))

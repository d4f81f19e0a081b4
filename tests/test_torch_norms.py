"""Normalization layers get right Hessians in every torch mode, through hessian() directly.

torch.func's second-order rules for the fused layer/batch/instance-norm kernels are wrong
in reverse-over-forward and in torch.func.hessian (torch 2.13); the backend computes those
layers from elementary ops in the modes that need it. The reference is a hand-written
normalization differentiated by double backward.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import hessop  # noqa: E402


def _manual_norm(x, dims):
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


NORMS = {
    "layer_norm": (lambda h: F.layer_norm(h, (6,)), lambda h: _manual_norm(h, (-1,))),
    "batch_norm": (
        lambda h: F.batch_norm(h, None, None, training=True),
        lambda h: _manual_norm(h, (0,)),
    ),
    "group_norm": (
        lambda h: F.group_norm(h.reshape(h.shape[0], 6, 1), 2).reshape(h.shape),
        lambda h: _manual_norm(h.reshape(h.shape[0], 2, 3), (-1,)).reshape(h.shape),
    ),
}


def _loss(norm):
    def loss(params, x):
        h = norm(torch.tanh(x @ params["w"]))
        return (torch.tanh(h) @ params["v"]).pow(2).mean()

    return loss


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("mode", ["fwd-rev", "rev-fwd", "rev-rev", "dense"])
def test_normalization_hessian_matches_manual_reference(name, mode):
    fused, manual = NORMS[name]
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 6)), "v": rng.standard_normal(6)}
    x = rng.standard_normal((8, 4))
    reference = hessop.hessian(_loss(manual), params, x, backend="torch", mode="rev-rev")
    H = hessop.hessian(_loss(fused), params, x, backend="torch", mode=mode)
    V = torch.as_tensor(rng.standard_normal((reference.shape[0], 3)))
    expected = torch.stack([reference @ V[:, j] for j in range(3)], dim=1)
    torch.testing.assert_close(H @ V, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(H @ V[:, 0], expected[:, 0], rtol=1e-9, atol=1e-10)

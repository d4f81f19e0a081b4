"""Attention models work in every mode; ops without forward-mode AD fail clearly.

PyTorch's fused attention (the SDPA flash / memory-efficient kernels, the
``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` fast paths) have no forward-mode
or double-backward derivatives; hessop computes with the math kernel and the fast path off,
and restores the user's settings afterwards.
"""

from __future__ import annotations

import pytest

import hessop

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from model_utils import probes, torch_hvps  # noqa: E402

MODES = ["auto", "forward-over-reverse", "reverse-over-forward", "reverse-over-reverse", "dense"]


class EncoderNet(nn.Module):
    """nn.TransformerEncoder: in eval mode its layers would take the fused fast path."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(1))


class SDPANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        heads = [t.unflatten(-1, (2, 2)).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.head(out.transpose(1, 2).flatten(2).mean(1))


def make(cls, dtype):
    torch.manual_seed(0)  # module init draws from the global generator; the test owns it
    model = cls().to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (3,), generator=gen)
    return model, x, y


@pytest.mark.parametrize("cls", [EncoderNet, MHANet, SDPANet])
def test_attention_every_mode_float64_and_float32(cls):
    loss = nn.CrossEntropyLoss()
    model, x, y = make(cls, torch.float64)
    V = probes(sum(p.numel() for p in model.parameters()))
    HV = torch_hvps(model, loss, x, y, V)
    assert HV.abs().max() > 1e-3
    m32, x32 = make(cls, torch.float32)[0], x.float()  # the same float32-drawn weights
    for mode in MODES:
        H = hessop.model_hessian(model, loss, (x, y), mode=mode)
        torch.testing.assert_close(H @ V, HV, rtol=1e-10, atol=1e-12, msg=mode)
        torch.testing.assert_close(H @ V[:, 2], HV[:, 2], rtol=1e-10, atol=1e-12, msg=mode)
        H32 = hessop.model_hessian(m32, loss, (x32, y), mode=mode)
        assert H32.dtype == torch.float32
        torch.testing.assert_close((H32 @ V.float()).double(), HV, rtol=1e-4, atol=1e-4, msg=mode)


def test_transformer_encoder_in_training_mode_and_its_ggn():
    loss = nn.CrossEntropyLoss()
    model, x, y = make(EncoderNet, torch.float64)
    model.train()  # dropout=0.0: deterministic, but a different code path than eval
    V = probes(sum(p.numel() for p in model.parameters()))
    HV = torch_hvps(model, loss, x, y, V)
    for mode in ("auto", "forward-over-reverse"):
        H = hessop.model_hessian(model, loss, (x, y), mode=mode)
        torch.testing.assert_close(H @ V, HV, rtol=1e-10, atol=1e-12)
    G = hessop.model_ggn(model, loss, (x, y))
    Gd = G.to_dense()
    torch.testing.assert_close(Gd, Gd.T, rtol=1e-12, atol=1e-14)
    assert torch.linalg.eigvalsh(Gd).min() > -1e-12


def test_user_attention_settings_are_restored():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    loss = nn.CrossEntropyLoss()
    model, x, y = make(SDPANet, torch.float64)
    original = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(True)
        # A user's kernel choice that has no double backward must not leak into hessop...
        with sdpa_kernel(SDPBackend.MATH):
            H = hessop.model_hessian(model, loss, (x, y), mode="fwd-rev")
            H @ torch.ones(H.shape[0], dtype=torch.float64)
        assert torch.backends.mha.get_fastpath_enabled() is True
    finally:
        torch.backends.mha.set_fastpath_enabled(original)


# --- an op without forward-mode AD: F.grid_sample ---------------------------------------------
class SpatialTransformer(nn.Module):
    """Learns an affine warp of the input: F.affine_grid + F.grid_sample (no forward AD)."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([[0.9, 0.1, 0.05], [-0.1, 1.1, 0.0]]))
        self.head = nn.Linear(9, 2)

    def forward(self, x):
        theta = self.theta.expand(x.shape[0], 2, 3)
        grid = F.affine_grid(theta, [x.shape[0], 1, 3, 3], align_corners=False)
        return self.head(F.grid_sample(x, grid, align_corners=False).flatten(1))


def test_op_without_forward_mode():
    torch.manual_seed(0)
    model = SpatialTransformer().double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (4,), generator=gen)
    loss = nn.CrossEntropyLoss()
    V = probes(sum(p.numel() for p in model.parameters()))
    HV = torch_hvps(model, loss, x, y, V)
    # auto is reverse-over-reverse in torch: it needs no forward mode
    H = hessop.model_hessian(model, loss, (x, y))
    assert H.mode == "reverse-over-reverse"
    torch.testing.assert_close(H @ V, HV, rtol=1e-10, atol=1e-12)
    # theta's own block is non-zero: the warp's second derivative is really there
    assert H.unravel(H @ V[:, 0])["theta"].abs().max() > 1e-3
    for mode in ("forward-over-reverse", "reverse-over-forward", "dense"):
        H = hessop.model_hessian(model, loss, (x, y), mode=mode)
        with pytest.raises(hessop.ForwardModeUnsupportedError) as info:
            H @ V[:, 0]
        msg = str(info.value)
        assert "grid_sampler_2d" in msg and "mode='reverse-over-reverse'" in msg
        assert mode in msg

"""Model-level operators leave the model and the program state exactly as they found them."""

from __future__ import annotations

import random

import numpy as np
import pytest

import hessop

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from model_utils import (  # noqa: E402
    assert_same_state,
    model_state,
    probes,
    rng_states,
    same_rng_states,
    torch_hvps,
)

ALL_MODES = ["auto", "forward-over-reverse", "reverse-over-forward", "dense", "fd"]


def bn_model():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model = model.double().train()
    with torch.no_grad():  # non-trivial running statistics, to notice any update
        model[1].running_mean.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
        model[1].num_batches_tracked.fill_(7)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=gen)
    return model, x, y


class AttentionNet(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.norm(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def attention_model():
    gen = torch.Generator().manual_seed(1)
    model = AttentionNet().double().eval()
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    return model, x, y


def populate_grads(model):
    # A user mid-training: .grad holds something; it must survive untouched.
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)


def exercise(op, d, dense=True):
    """Every kind of call an algorithm makes: products, blocks, a dense matrix, a loop."""
    v = torch.linspace(-1, 1, d, dtype=torch.float64)
    op @ v
    op.matmat(torch.stack([v, v.flip(0)], dim=1))
    if dense:
        op.to_dense()
    for _ in range(3):  # an algorithm-like loop (power iteration)
        v = op @ v
        v = v / torch.linalg.vector_norm(v)
    op.to_scipy().matvec(np.ones(d))


@pytest.mark.parametrize("make", [bn_model, attention_model], ids=["batchnorm", "attention"])
def test_every_call_leaves_model_and_rng_untouched(make):
    model, x, y = make()
    populate_grads(model)
    loss = nn.CrossEntropyLoss()
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    before, rngs = model_state(model), rng_states()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    d = sum(p.numel() for p in model.parameters())
    ops = [lambda m=m: hessop.model_hessian(model, loss, (x, y), mode=m) for m in ALL_MODES]
    ops.append(lambda: hessop.model_ggn(model, loss, (x, y)))
    if make is attention_model:  # per-sample losses need eval-mode BatchNorm
        ops.append(lambda: hessop.model_fisher(model, loss, (x, y)))
    for build in ops:
        op = build()
        assert_same_state(before, model_state(model))  # construction
        assert same_rng_states(rngs, rng_states())
        exercise(op, d, dense=make is bn_model)  # small enough for to_dense in every mode
        assert_same_state(before, model_state(model))
        assert same_rng_states(rngs, rng_states())
    H = hessop.model_hessian(model, loss, [(x[:3], y[:3]), (x[3:], y[3:])])
    exercise(H, d, dense=make is bn_model)
    hessop.model_hvp(model, loss, x, y, torch.ones(d, dtype=torch.float64))
    H.loss_and_gradient()
    assert_same_state(before, model_state(model))
    assert same_rng_states(rngs, rng_states())
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_batchnorm_uses_batch_statistics_without_updating_them():
    model, x, y = bn_model()
    loss = nn.CrossEntropyLoss()
    V = probes(sum(p.numel() for p in model.parameters()))
    ref = torch_hvps(model, loss, x, y, V)  # train-mode BatchNorm: batch statistics
    H = hessop.model_hessian(model, loss, (x, y))
    torch.testing.assert_close(H @ V, ref, rtol=1e-10, atol=1e-12)
    assert int(model[1].num_batches_tracked) == 7
    # eval mode is a different loss (running statistics), and the operator follows it
    H_eval = hessop.model_hessian(model.eval(), loss, (x, y))
    assert not torch.allclose(H_eval @ V, ref)


def test_operator_refuses_to_go_on_when_the_model_moves_on():
    # No copy of the parameters is kept: after an optimizer step the operator raises
    # instead of silently computing at a mix of two points (or at the new one).
    model, x, y = attention_model()
    loss = nn.CrossEntropyLoss()
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for make in (hessop.model_hessian, hessop.model_ggn, hessop.model_fisher):
        op = make(model, loss, (x, y))
        first = op @ v
        with torch.no_grad():  # an optimizer step
            saved = [p.clone() for p in model.parameters()]
            for p in model.parameters():
                p.mul_(1.5)
        with pytest.raises(hessop.StaleOperatorError, match="changed in place"):
            op @ v
        with pytest.raises(hessop.StaleOperatorError):
            op @ torch.stack([v, v], dim=1)
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
        torch.testing.assert_close(make(model, loss, (x, y)) @ v, first, rtol=1e-12, atol=0)


# --- randomness ------------------------------------------------------------------------------
class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(F.dropout(torch.tanh(x), 0.3, training=self.training))


def dropout_model():
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (6,), generator=gen)
    return model, x, y


def test_dropout_in_training_mode_is_refused_with_the_fix():
    model, x, y = dropout_model()
    loss = nn.CrossEntropyLoss()
    mha = AttentionNet(dropout=0.1).double().train()  # construction draws initial weights
    fdrop = FunctionalDropout().double()
    before, rngs = model_state(model), rng_states()
    for make in (hessop.model_hessian, hessop.model_ggn, hessop.model_fisher):
        with pytest.raises(hessop.RandomnessError) as info:
            make(model, loss, (x, y))
        msg = str(info.value)
        assert "2 (Dropout, p=0.5)" in msg
        assert "model.eval()" in msg and "allow_randomness='fixed-seed'" in msg
    with pytest.raises(hessop.RandomnessError, match=r"attn \(MultiheadAttention, p=0.1\)"):
        hessop.model_hessian(mha, loss, (x[:2, None].expand(2, 3, 3)[..., [0, 1, 2, 0]], y[:2]))
    # F.dropout in a custom forward is caught by watching torch's generator on the first
    # evaluation (the first product or gradient), before any result is returned
    H = hessop.model_hessian(fdrop, loss, (x, y))
    with pytest.raises(hessop.RandomnessError, match="drew from the global random generator"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)
    with pytest.raises(hessop.RandomnessError, match="drew from the global random generator"):
        hessop.model_hessian(fdrop, loss, (x, y)).gradient()
    assert_same_state(before, model_state(model))
    assert same_rng_states(rngs, rng_states())


def test_dropout_in_eval_mode_or_with_p_zero_is_fine():
    model, x, y = dropout_model()
    loss = nn.CrossEntropyLoss()
    plain = nn.Sequential(*[m for m in model if not isinstance(m, nn.Dropout)])
    V = probes(sum(p.numel() for p in model.parameters()))
    ref = torch_hvps(plain, loss, x, y, V)
    torch.testing.assert_close(hessop.model_hessian(model.eval(), loss, (x, y)) @ V, ref)
    model.train()[2].p = 0.0
    torch.testing.assert_close(hessop.model_hessian(model, loss, (x, y)) @ V, ref)
    assert model.training


def test_fixed_seed_gives_one_deterministic_mask():
    model, x, y = dropout_model()
    loss = nn.CrossEntropyLoss()
    d = sum(p.numel() for p in model.parameters())
    V = probes(d)
    rngs = rng_states()
    H = hessop.model_hessian(model, loss, (x, y), allow_randomness="fixed-seed", seed=5)
    ref = torch_hvps(model, loss, x, y, V, seed=5)  # the mask drawn after manual_seed(5)
    torch.testing.assert_close(H @ V, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H @ V[:, 0], ref[:, 0], rtol=1e-10, atol=1e-12)
    # rebuilding the graph (no cache) and finite differences see the same mask
    Hn = hessop.model_hessian(
        model, loss, (x, y), allow_randomness="fixed-seed", seed=5, cache=False
    )
    torch.testing.assert_close(Hn @ V, ref, rtol=1e-10, atol=1e-12)
    Hfd = hessop.model_hessian(
        model, loss, (x, y), mode="fd", allow_randomness="fixed-seed", seed=5
    )
    torch.testing.assert_close(Hfd @ V, ref, rtol=1e-5, atol=1e-6)
    other = torch_hvps(model, loss, x, y, V, seed=6)
    assert not torch.allclose(other, ref)  # the seed matters: there is a mask
    G = hessop.model_ggn(model, loss, (x, y), allow_randomness="fixed-seed", seed=5)
    torch.testing.assert_close(G @ V[:, 0], G @ V[:, 0], rtol=0, atol=0)
    assert same_rng_states(rngs, rng_states())
    with pytest.raises(ValueError, match="fixed-seed.*vmap"):
        hessop.model_hessian(model, loss, (x, y), mode="fwd-rev", allow_randomness="fixed-seed")
    with pytest.raises(hessop.UnknownOptionError):
        hessop.model_hessian(model, loss, (x, y), allow_randomness="yes")


def test_shuffling_loader_and_random_dataset_leave_global_rngs_alone():
    model, x, y = bn_model()
    model.eval()

    class Noisy(torch.utils.data.Dataset):  # augments with numpy's and Python's generators
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i] + 0 * np.random.rand() + 0 * random.random(), y[i]

    loader = torch.utils.data.DataLoader(Noisy(), batch_size=3, shuffle=True)
    loss = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    rngs = rng_states()
    H = hessop.model_hessian(model, loss, loader)
    v = torch.ones(H.shape[0], dtype=torch.float64)
    first = H @ v
    torch.testing.assert_close(H @ v, first, rtol=0, atol=0)  # the same order every pass
    torch.testing.assert_close(first, hessop.model_hessian(model, loss, (x, y)) @ v)
    assert same_rng_states(rngs, rng_states())


def test_fastpath_setting_is_restored_either_way():
    model, x, y = attention_model()
    seen = []
    model.attn.register_forward_pre_hook(
        lambda *a: seen.append(torch.backends.mha.get_fastpath_enabled())
    )
    loss = nn.CrossEntropyLoss()
    original = torch.backends.mha.get_fastpath_enabled()
    try:
        for setting in (True, False):
            torch.backends.mha.set_fastpath_enabled(setting)
            H = hessop.model_hessian(model, loss, (x, y), mode="fwd-rev")
            H @ torch.ones(H.shape[0], dtype=torch.float64)
            assert torch.backends.mha.get_fastpath_enabled() is setting
    finally:
        torch.backends.mha.set_fastpath_enabled(original)
    assert seen and not any(seen)  # off inside every evaluation

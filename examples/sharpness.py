"""Sharpness during training: the edge of stability, with a warm-started tracker.

Full-batch gradient descent on the reference MLP (a small one: 16-32-32-4, tanh, squared
error on one-hot labels) at two learning rates. At every third step a
``hessop.SharpnessTracker`` measures the top Hessian eigenvalue, starting from the previous
measurement's eigenvectors. With the small learning rate the sharpness grows slowly and
stays far below ``2 / lr``; with the large one it climbs to ``2 / lr`` and hovers there
(Cohen et al., 2021, "Gradient descent on neural networks typically occurs at the edge of
stability"). The script checks its eigenvalues against a cold ``hessop.eigsh`` at several
steps, prints the cost of the measurements, and saves the figure.

Run: ``python examples/sharpness.py [figure.png]`` (default: a file in a temporary folder).
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

import hessop
from hessop.bench.reference import get_reference

LEARNING_RATES = (0.5, 2.0)
STEPS, EVERY = 150, 3


def train(lr: float, spec, x, y, loss_fn) -> tuple[hessop.SharpnessTracker, list[float]]:
    """Gradient descent at ``lr``; returns the tracker and the relative errors of its
    eigenvalue against a cold eigsh at every tenth measurement."""
    import torch

    model = spec.torch_model(seed=0, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = hessop.SharpnessTracker(k=1, every=EVERY, lr=lr, label=f"lr={lr:g}")
    errors = []
    for _ in range(STEPS):
        rec = tracker(model, loss_fn, (x, y))
        if rec is not None and len(tracker.history) % 10 == 1:
            H = hessop.model_hessian(model, loss_fn, (x, y))
            cold = float(hessop.eigsh(H, k=1, tol=1e-10).eigenvalues[0])
            errors.append(abs(rec.sharpness - cold) / cold)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return tracker, errors


def main(path: str | None = None) -> dict[str, float]:
    if "torch" not in hessop.available_backends(installed=True):
        sys.exit(
            "this example needs torch, which is not installed; from the repository "
            'root: pip install -c constraints.txt -e ".[torch]"'
        )
    import torch

    torch.set_num_threads(1)  # tiny matrices: threads only fight over the cores
    spec = get_reference("mlp", sizes=(16, 32, 32, 4))
    x, labels = spec.make_batch(256, seed=0, framework="torch", dtype="float64")
    y = torch.nn.functional.one_hot(labels, 4).double()
    loss_fn = torch.nn.MSELoss()
    trackers, out = [], {}
    print(f"{'lr':>5} {'2/lr':>6} {'sharpness: first':>17} {'max':>6} {'last':>6}"
          f" {'HVPs: cold':>11} {'warm median':>12} {'warm max':>9}"
          f" {'error vs eigsh':>15}")  # fmt: skip
    for lr in LEARNING_RATES:
        tracker, errors = train(lr, spec, x, y, loss_fn)
        trackers.append(tracker)
        s, cost = tracker.sharpness, [r.num_matvecs for r in tracker.history]
        print(f"{lr:>5g} {2 / lr:>6.2f} {s[0]:>17.3f} {s.max():>6.2f} {s[-1]:>6.2f}"
              f" {cost[0]:>11d} {np.median(cost[1:]):>12.1f} {max(cost[1:]):>9d}"
              f" {max(errors):>15.1e}")  # fmt: skip
        assert all(r.converged.all() for r in tracker.history)
        assert max(errors) < 1e-5, errors  # tol=1e-3 on the residual: about tol^2 here
        assert np.median(cost[1:]) <= 10 < cost[0], cost
        out[f"lr={lr:g}"] = float(s[-1] * lr / 2)  # the last sharpness in units of 2/lr
    # Small step: far below 2/lr all along. Large step: at the edge of stability, the
    # second half of the run hovers around 2/lr.
    small, large = trackers
    assert small.sharpness.max() < 0.5 * 2 / small.lr
    late = large.sharpness[len(large.sharpness) // 2 :] * large.lr / 2
    assert 0.8 < np.median(late) < 2.0, late
    path = path or os.path.join(tempfile.mkdtemp(), "sharpness.png")
    hessop.plot_sharpness(trackers, path, title="sharpness of a tanh MLP under gradient descent")
    print(f"figure: {path}")
    out["figure"] = path
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

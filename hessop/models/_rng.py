"""Keep the global random number generators out of reach of the user's model and data.

Model-level operators evaluate the user's forward pass (and iterate the user's data) many
times. Either may draw from a global generator: dropout draws from torch's, a shuffling
``DataLoader`` draws its permutation seed from torch's, a dataset may augment with numpy's
or Python's. :func:`preserve_rng` snapshots torch's (CPU and the operator's accelerator),
numpy's and Python's global generators and puts them back on exit, so that no hessop call
advances them. As a bonus every product sees the same draws (the same shuffle order, the
same mask under ``allow_randomness="fixed-seed"``).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np


def _torch_devices(device: Any) -> list[Any]:
    # fork_rng forks every visible CUDA device by default (and warns when there are many);
    # only the operator's own accelerator can be touched by its computations.
    if device is None or getattr(device, "type", str(device).split(":")[0]) == "cpu":
        return []
    return [device]


@contextlib.contextmanager
def preserve_rng(device: Any = None, seed: int | None = None) -> Iterator[None]:
    """Restore torch's, numpy's and Python's global RNG states on exit.

    Parameters
    ----------
    device :
        The torch device whose generator is also preserved (CPU is always preserved).
    seed : int, optional
        Seed torch's generators with it on entry (inside the preserved scope), so that a
        random forward pass draws the same numbers every time.

    Examples
    --------
    >>> import numpy as np
    >>> before = np.random.get_state()[1].copy()
    >>> with preserve_rng():
    ...     _ = np.random.standard_normal(3)
    >>> bool((np.random.get_state()[1] == before).all())
    True
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch = sys.modules.get("torch")
    try:
        if torch is None:
            yield
        else:
            devices = _torch_devices(device)
            with torch.random.fork_rng(devices=devices):
                if seed is not None:
                    torch.default_generator.manual_seed(int(seed))
                    for dev in devices:
                        with torch.cuda.device(dev):
                            torch.cuda.manual_seed(int(seed))
                yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

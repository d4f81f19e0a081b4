"""``hessop.enable_compilation_cache``: compiled products kept on disk, for later processes.

Compiling a product (``compile=True``) costs seconds to a minute per model and shapes, and
every new process pays it again unless the framework finds the compilation on disk. torch
keeps its compilations in a temporary folder by default; JAX keeps none. One call turns both
frameworks' on-disk caches on, in a folder of the user's choice. It is off by default: it
writes to the user's home folder (and changes JAX's global cache settings), which hessop does
not do without being asked.
"""

from __future__ import annotations

import os
from pathlib import Path

from .backends import CACHE_ENV, use_compilation_cache


def default_cache_folder() -> Path:
    """``$XDG_CACHE_HOME/hessop``, else ``~/.cache/hessop``.

    Examples
    --------
    >>> from hessop._compilation_cache import default_cache_folder
    >>> default_cache_folder().name
    'hessop'
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser().resolve() / "hessop"


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Keep compiled functions on disk, so that a later process with the same loss, model
    and shapes loads them instead of compiling again.

    Turns on the on-disk caches of each framework, in a sub-folder per backend: torch's
    inductor FX graph and AOTAutograd caches (``torch/``, by setting
    ``TORCHINDUCTOR_CACHE_DIR``) and JAX's persistent compilation cache (``jax/``, by
    setting ``jax_compilation_cache_dir``, and ``jax_persistent_cache_min_compile_time_secs``
    to 0 so that every jitted function is kept). It affects the whole process, compilations
    outside hessop included, for backends loaded now and later. Setting the environment
    variable ``HESSOP_COMPILATION_CACHE`` to a folder does the same when a backend is first
    used. Off by default.

    A later process still traces the loss (torch: dynamo, a few seconds; JAX: a trace), but
    loads the compiled code: see ``H.compile_time`` and docs/modes.rst for measured figures.

    Parameters
    ----------
    path : str or os.PathLike, optional
        The folder; created if missing (readable by its owner only). ``None``: the
        default, ``$XDG_CACHE_HOME/hessop`` or ``~/.cache/hessop``. The frameworks load
        code from it: do not point it at a folder that others can write to.

    Returns
    -------
    pathlib.Path
        The folder, resolved.

    Raises
    ------
    TypeError
        When ``path`` is neither a path nor None.
    ValueError
        When ``path`` exists and is not a folder.

    Examples
    --------
    >>> import hessop
    >>> folder = hessop.enable_compilation_cache()  # doctest: +SKIP
    >>> str(folder)  # doctest: +SKIP
    '/home/me/.cache/hessop'
    """
    if path is None:
        folder = default_cache_folder()
    elif isinstance(path, (str, os.PathLike)):
        folder = Path(path).expanduser().resolve()
    else:
        raise TypeError(f"path must be a folder (str or os.PathLike) or None, got {path!r}")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path must be a folder; {str(folder)!r} is a file")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    use_compilation_cache(folder)
    return folder


__all__ = ["CACHE_ENV", "default_cache_folder", "enable_compilation_cache"]

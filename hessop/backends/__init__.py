"""The backend registry: find the backend for a name or for an array.

Backends are loaded lazily, so ``import hessop`` needs neither torch nor JAX; asking for a
backend whose framework is missing raises :class:`~hessop.BackendNotAvailableError` naming
the extra to install.

Examples
--------
>>> import numpy as np
>>> from hessop.backends import get_backend
>>> get_backend(np.zeros(3)).name
'numpy'
>>> get_backend("numpy").name
'numpy'
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import BackendNotAvailableError, unknown
from .._pytree import collect_arrays
from ._base import Backend

__all__ = [
    "Backend",
    "available_backends",
    "framework_of_object",
    "get_backend",
    "infer_backend",
    "register_backend",
    "resolve_backend",
]

# name -> (module path or loader, predicate telling whether an array belongs to it, extra)
_REGISTRY: dict[str, tuple[str | Callable[[], Backend], Callable[[Any], bool], str]] = {}
_LOADED: dict[str, Backend] = {}
#: the folder of the on-disk compilation caches (see hessop.enable_compilation_cache); each
#: backend gets its own sub-folder, when it is loaded
_CACHE_FOLDER: list[Path] = []


def _module_is(*prefixes: str) -> Callable[[Any], bool]:
    # Look at the type's module instead of importing the framework: detection must work
    # (and stay cheap) when the framework is not installed.
    def detect(x: Any) -> bool:
        mod = type(x).__module__ or ""
        return mod.split(".")[0] in prefixes

    return detect


def register_backend(
    name: str,
    loader: str | Callable[[], Backend],
    detect: Callable[[Any], bool],
    extra: str | None = None,
) -> None:
    """Register a backend.

    Parameters
    ----------
    name : str
        The name users pass as ``backend=``.
    loader : str or callable
        A module path holding a ``BACKEND`` attribute, or a callable returning the
        :class:`Backend`. Called on first use only.
    detect : callable
        ``detect(x) -> bool``: whether array ``x`` belongs to this framework. Must not
        import the framework.
    extra : str, optional
        The pip extra that installs the framework, quoted in error messages.

    Examples
    --------
    >>> from hessop.backends import register_backend, get_backend
    >>> from hessop.backends._numpy import NumpyBackend
    >>> class Mine(NumpyBackend):
    ...     name = "mine"
    >>> register_backend("mine", Mine, detect=lambda x: False)
    >>> get_backend("mine").name
    'mine'
    >>> _ = _REGISTRY.pop("mine"), _LOADED.pop("mine")  # keep the doctest side-effect free
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if not (isinstance(loader, str) or callable(loader)):
        raise TypeError(
            f"loader must be a module path or a function returning the Backend, got {loader!r}"
        )
    if not callable(detect):
        # infer_backend calls every detector on every array: a broken one breaks them all
        raise TypeError(f"detect must be a function detect(x) -> bool, got {detect!r}")
    _REGISTRY[name] = (loader, detect, extra or name)
    _LOADED.pop(name, None)


register_backend("numpy", "hessop.backends._numpy", _module_is("numpy"), extra="")
register_backend("torch", "hessop.backends.torch", _module_is("torch"), extra="torch")
register_backend("jax", "hessop.backends.jax", _module_is("jax", "jaxlib"), extra="jax")


#: the top-level modules a built-in backend's framework needs (numpy is always there)
_FRAMEWORK_MODULES: dict[str, tuple[str, ...]] = {"torch": ("torch",), "jax": ("jax", "jaxlib")}


def available_backends(installed: bool = False) -> list[str]:
    """Names of the registered backends, or only of those whose framework is installed.

    Parameters
    ----------
    installed : bool
        ``False`` (default): every registered name, installed or not (what ``backend=``
        accepts). ``True``: only the backends that can be loaded: ``"numpy"``, ``"torch"``
        when torch is installed, ``"jax"`` when jax and jaxlib are, and every backend
        registered with :func:`register_backend` (its loader is the user's). The check
        asks :func:`importlib.util.find_spec` and imports no framework.

    Returns
    -------
    list of str
        In registration order.

    Examples
    --------
    >>> import hessop
    >>> hessop.available_backends()
    ['numpy', 'torch', 'jax']
    >>> "numpy" in hessop.available_backends(installed=True)
    True
    """
    if not isinstance(installed, bool):
        raise TypeError(f"installed must be True or False, got {installed!r}")
    if not installed:
        return list(_REGISTRY)
    return [n for n in _REGISTRY if all(map(_has_module, _FRAMEWORK_MODULES.get(n, ())))]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules without a spec: imported some other way, so present
        return True


def _load(name: str) -> Backend:
    if name in _LOADED:
        return _LOADED[name]
    if name not in _REGISTRY:
        raise unknown("backend", name, available_backends())
    loader, _, extra = _REGISTRY[name]
    try:
        if callable(loader):
            backend = loader()
        else:
            backend = importlib.import_module(loader).BACKEND
    except ImportError as err:
        raise BackendNotAvailableError(
            f"the {name!r} backend needs {name}, which is not installed ({err}); "
            f"install it with: pip install 'hessop[{extra}]'"
        ) from err
    _LOADED[name] = backend
    if not _CACHE_FOLDER and os.environ.get(CACHE_ENV):
        _CACHE_FOLDER.append(Path(os.environ[CACHE_ENV]).expanduser().resolve())
    if _CACHE_FOLDER:
        backend.use_compilation_cache(_CACHE_FOLDER[0] / name)
    return backend


#: the environment variable that turns the on-disk compilation caches on, in its folder
CACHE_ENV = "HESSOP_COMPILATION_CACHE"


def use_compilation_cache(folder: Path) -> None:
    """Keep compiled functions under ``folder / <backend name>``, for the loaded backends now
    and for the others when they load."""
    _CACHE_FOLDER[:] = [folder]
    for name, backend in _LOADED.items():
        backend.use_compilation_cache(folder / name)


def infer_backend(x: Any) -> str | None:
    """The registered backend name that owns array ``x``, or None."""
    for name, (_, detect, _) in _REGISTRY.items():
        if detect(x):
            return name
    return None


def get_backend(name_or_array: Any) -> Backend:
    """Return the backend for a name (``"torch"``, ``"jax"``, ``"numpy"``) or an array.

    >>> import numpy as np
    >>> get_backend(np.ones(2)).name
    'numpy'
    """
    if isinstance(name_or_array, Backend):
        return name_or_array
    if isinstance(name_or_array, str):
        return _load(name_or_array)
    name = infer_backend(name_or_array)
    if name is None:
        raise TypeError(
            f"cannot tell the framework of {type(name_or_array).__name__}; pass a numpy, "
            "torch or JAX array, or name the backend explicitly"
        )
    return _load(name)


def resolve_backend(backend: str | None, *trees: Any, differentiable: bool = True) -> Backend:
    """The backend a call computes with: ``backend`` when given, else the one framework of
    the arrays in ``trees`` (numpy arrays say nothing), else the only installed framework.

    >>> import numpy as np
    >>> resolve_backend("numpy", np.ones(2), differentiable=False).name
    'numpy'
    """
    if backend is not None:
        if not isinstance(backend, (str, Backend)):
            raise TypeError(
                f"backend must be the name of a backend ({', '.join(map(repr, _REGISTRY))}) "
                f"or None, got {backend!r}"
            )
        bk = get_backend(backend)
    else:
        names = {infer_backend(x) for x in collect_arrays(trees)} - {"numpy", None}
        if len(names) > 1:
            raise TypeError(
                f"the arrays mix frameworks ({sorted(names)}); use arrays of one framework"
            )
        if not names:
            names = {n for n in available_backends(installed=True) if _autodiff(n)}
            if len(names) != 1:
                raise TypeError(
                    "cannot infer the backend from numpy arrays (or no arrays) with "
                    f"{sorted(names) or 'no framework'} installed; pass backend='torch' or "
                    "backend='jax'"
                )
        bk = get_backend(names.pop())
    if differentiable and not bk.differentiable:
        raise TypeError(
            f"the {bk.name!r} backend cannot differentiate; pass backend='torch' or backend='jax'"
        )
    return bk


def _autodiff(name: str) -> bool:
    # Registered autodiff frameworks, decided without importing them.
    return name != "numpy"


def framework_of_object(obj: Any) -> str | None:
    """The registered framework whose classes ``obj``'s class derives from (an
    ``nn.Module`` subclass defined anywhere is torch's), found without importing it."""
    for cls in type(obj).__mro__:
        name = (getattr(cls, "__module__", "") or "").split(".")[0]
        if name in _REGISTRY and name != "numpy":
            return name
    return None


def watch_framework_object(watch: Any, obj: Any, label: str) -> bool:
    """Let the framework that defines ``obj``'s class record its state in ``watch``."""
    name = framework_of_object(obj)
    return name is not None and get_backend(name).watch_object(watch, obj, label)

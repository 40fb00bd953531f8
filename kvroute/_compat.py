"""The one switch between the compiled cores and their pure-Python twins.

Three pairs, each a compiled module and its twin (same names, signatures,
results and errors; the twin's docstrings are the specification):

=========  ====================  =======================
pair       compiled              twin
=========  ====================  =======================
index      ``kvroute._index``    ``kvroute._index_py``
hashing    ``kvroute._hashing``  ``kvroute._hashing_py``
route      ``kvroute._route``    ``kvroute._route_py``
=========  ====================  =======================

The choice is made here, once, when kvroute is first imported: the compiled
module unless :data:`NO_EXTENSIONS`, else the twin. A compiled module that
fails to import (a broken or missing build) falls back to its twin with one
:class:`ExtensionWarning`, so a slow install never passes unnoticed;
``KVROUTE_NO_EXTENSIONS=1`` asks for the twins and stays silent.
:data:`USE_EXTENSIONS` (also ``kvroute.USE_EXTENSIONS``) says what happened.

The modules import the implementation they use from here (``index``,
``hashing``, ``route``). Tests that run a pair's both implementations side by
side take them from :func:`implementations`, without reloading anything.
"""

from __future__ import annotations

import importlib
import os
import platform
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Final, Literal

__all__ = [
    "NO_EXTENSIONS",
    "PAIRS",
    "USE_EXTENSIONS",
    "ExtensionWarning",
    "Pair",
    "compiled",
    "hashing",
    "implementations",
    "index",
    "python_twin",
    "route",
]

#: True when the pure-Python twins must be used: the user asked for it with
#: KVROUTE_NO_EXTENSIONS, or this is not CPython (the Cython modules are CPython-only).
NO_EXTENSIONS: Final[bool] = bool(os.environ.get("KVROUTE_NO_EXTENSIONS")) or (
    platform.python_implementation() != "CPython"
)

#: A pair's name: the compiled module is ``kvroute._<name>``, its twin ``kvroute._<name>_py``.
Pair = Literal["index", "hashing", "route"]
PAIRS: Final[tuple[Pair, ...]] = ("index", "hashing", "route")


class ExtensionWarning(RuntimeWarning):
    """A compiled core failed to import, so its (much slower) pure-Python twin is used."""


def _import_compiled() -> tuple[dict[str, ModuleType], dict[str, ImportError]]:
    loaded: dict[str, ModuleType] = {}
    failed: dict[str, ImportError] = {}
    if NO_EXTENSIONS:  # pragma: no cover - exercised by the twins-only run (scripts/check.py)
        return loaded, failed
    for pair in PAIRS:
        try:
            loaded[pair] = importlib.import_module(f"kvroute._{pair}")
        except ImportError as e:  # a broken build: warned about below, tests/test_build.py fails
            failed[pair] = e
    if failed:
        names = ", ".join(f"kvroute._{p} ({e})" for p, e in failed.items())
        warnings.warn(
            f"kvroute's compiled cores failed to import: {names}. Using the pure-Python "
            "twins: the same results, much slower. Rebuild (pip install --no-build-isolation "
            "-e . in a clone), or set KVROUTE_NO_EXTENSIONS=1 to choose the twins quietly.",
            ExtensionWarning,
            stacklevel=2,
        )
    return loaded, failed


_COMPILED, _FAILED = _import_compiled()

#: True when every compiled core is in use; False with KVROUTE_NO_EXTENSIONS,
#: off CPython, or when a compiled module failed to import (then an
#: :class:`ExtensionWarning` said which).
USE_EXTENSIONS: Final[bool] = len(_COMPILED) == len(PAIRS)


def compiled(pair: Pair) -> ModuleType | None:
    """The compiled module of ``pair`` if it is used, else None.

    None under :data:`NO_EXTENSIONS` (the module is then never imported) and
    when it failed to import.

    >>> compiled("index") is None or compiled("index").__name__ == "kvroute._index"
    True

    :raises KeyError: ``pair`` is not one of :data:`PAIRS`.
    """
    if pair not in PAIRS:
        raise KeyError(f"unknown pair {pair!r}; expected one of {PAIRS}")
    return _COMPILED.get(pair)


def python_twin(pair: Pair) -> ModuleType:
    """The pure-Python twin of ``pair`` (imported on first use).

    >>> python_twin("route").__name__
    'kvroute._route_py'

    :raises KeyError: ``pair`` is not one of :data:`PAIRS`.
    """
    if pair not in PAIRS:
        raise KeyError(f"unknown pair {pair!r}; expected one of {PAIRS}")
    return importlib.import_module(f"kvroute._{pair}_py")


def implementations(pair: Pair) -> tuple[ModuleType, ...]:
    """Every implementation of ``pair`` this process can test: compiled first, then the twin.

    Just the twin under :data:`NO_EXTENSIONS` or when the compiled module
    failed to import (tests/test_build.py fails in that case, so a broken
    build never quietly tests only the twin).

    >>> implementations("hashing")[-1].__name__
    'kvroute._hashing_py'

    :raises KeyError: ``pair`` is not one of :data:`PAIRS`.
    """
    mod = compiled(pair)
    twin = python_twin(pair)
    return (twin,) if mod is None else (mod, twin)


def _used(pair: Pair) -> ModuleType:
    mod = _COMPILED.get(pair)
    return python_twin(pair) if mod is None else mod


# The implementation each pair uses. mypy reads the twins: the compiled
# modules' .pyi files re-export the twins' types, so they are one API.
if TYPE_CHECKING:
    from . import _hashing_py as hashing
    from . import _index_py as index
    from . import _route_py as route
else:
    index = _used("index")
    hashing = _used("hashing")
    route = _used("route")

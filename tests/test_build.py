"""The compiled cores really loaded, unless KVROUTE_NO_EXTENSIONS asks for the twins.

``kvroute`` and the test fixtures fall back to the pure-Python twins when an
extension fails to import. That keeps the library usable, but it would also
let a broken build pass the whole suite while testing only the fallback
(yarl's lesson). These tests fail, never skip, in that case.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
from types import ModuleType

import pytest

import kvroute
import kvroute._compat
import kvroute._hashing_py
import kvroute._index_py
import kvroute.hashing

NO_EXTENSIONS = bool(os.environ.get("KVROUTE_NO_EXTENSIONS"))


def load_extension(name: str) -> ModuleType:
    """Import ``name`` and require it to be a compiled extension module."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        pytest.fail(
            f"{name} did not import ({e}). Build it with "
            "`pip install --no-build-isolation -e .`, or set KVROUTE_NO_EXTENSIONS=1 "
            "to test the pure-Python twins only."
        )
    origin = getattr(module, "__file__", None) or ""
    assert origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), (
        f"{name} was loaded from {origin!r}, not from a compiled extension"
    )
    assert isinstance(module.__loader__, importlib.machinery.ExtensionFileLoader)
    return module


def test_the_package_honours_kvroute_no_extensions() -> None:
    # _compat also falls back on interpreters other than CPython; the suite
    # runs on CPython, so the flag must follow the variable exactly.
    assert kvroute._compat.NO_EXTENSIONS is NO_EXTENSIONS


def test_block_index_is_the_compiled_extension() -> None:
    if NO_EXTENSIONS:
        assert kvroute.BlockIndex is kvroute._index_py.BlockIndex
        assert kvroute.MAX_COPIES == kvroute._index_py.MAX_COPIES
        return
    index = load_extension("kvroute._index")
    assert kvroute.BlockIndex is index.BlockIndex
    assert kvroute.BlockIndex is not kvroute._index_py.BlockIndex
    assert kvroute.MAX_COPIES == index.MAX_COPIES


def _hashing_names() -> list[str]:
    """Public functions the compiled hashing core shares with its twin."""
    names = [
        name
        for name in kvroute._hashing_py.__all__
        if callable(getattr(kvroute._hashing_py, name, None)) and hasattr(kvroute.hashing, name)
    ]
    assert names, "kvroute.hashing re-exports nothing from its cores"
    return names


def test_hashing_uses_the_compiled_extension() -> None:
    names = _hashing_names()
    if NO_EXTENSIONS:
        for name in names:
            assert getattr(kvroute.hashing, name) is getattr(kvroute._hashing_py, name), name
        return
    hashing = load_extension("kvroute._hashing")
    for name in names:
        if hasattr(hashing, name):
            assert getattr(kvroute.hashing, name) is getattr(hashing, name), name
    assert any(hasattr(hashing, name) for name in names)


def test_router_kernels_use_the_compiled_extension() -> None:
    import kvroute._route_py
    import kvroute.approx
    import kvroute.load

    if NO_EXTENSIONS:
        assert kvroute.load.ActivePrefixes is kvroute._route_py.ActivePrefixes
        assert kvroute.approx.fresh_overlay is kvroute._route_py.fresh_overlay
        return
    route = load_extension("kvroute._route")
    assert kvroute.load.ActivePrefixes is route.ActivePrefixes
    assert kvroute.approx.fresh_overlay is route.fresh_overlay
    assert sorted(route.__all__) == sorted(kvroute._route_py.__all__)

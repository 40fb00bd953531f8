"""The compiled cores really loaded, unless KVROUTE_NO_EXTENSIONS asks for the twins.

``kvroute`` and the test fixtures fall back to the pure-Python twins when an
extension fails to import. That keeps the library usable, but it would also
let a broken build pass the whole suite while testing only the fallback
(yarl's lesson). These tests fail, never skip, in that case. The fallback
itself warns once (:class:`kvroute._compat.ExtensionWarning`), which a fresh
interpreter with a blocked extension checks.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path
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
    assert kvroute.USE_EXTENSIONS is (not NO_EXTENSIONS)
    assert "USE_EXTENSIONS" in kvroute.__all__


@pytest.mark.parametrize("pair", kvroute._compat.PAIRS)
def test_every_pair_offers_its_implementations(pair: kvroute._compat.Pair) -> None:
    impls = kvroute._compat.implementations(pair)
    twin = importlib.import_module(f"kvroute._{pair}_py")
    assert impls[-1] is twin is kvroute._compat.python_twin(pair)
    if NO_EXTENSIONS:
        assert impls == (twin,) and kvroute._compat.compiled(pair) is None
    else:
        compiled = load_extension(f"kvroute._{pair}")
        assert impls == (compiled, twin) and kvroute._compat.compiled(pair) is compiled
    assert getattr(kvroute._compat, pair) is impls[0]
    with pytest.raises(KeyError):
        kvroute._compat.implementations("nope")  # type: ignore[arg-type]


_FALLBACK = """if True:
    import json, sys, warnings
    for name in sys.argv[1:]:
        sys.modules[name] = None  # importing it now fails, as a broken build's would
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import kvroute, kvroute.approx, kvroute.hashing, kvroute.load
    print(json.dumps({
        "use_extensions": kvroute.USE_EXTENSIONS,
        "warnings": [(w.category.__name__, str(w.message)) for w in caught],
        "index": kvroute.BlockIndex.__module__,
        "hashing": kvroute.hashing.block_hashes.__module__,
        "route": [kvroute.load.ActivePrefixes.__module__, kvroute.approx.fresh_overlay.__module__],
    }))
"""


def _import_kvroute(*blocked: str, no_extensions: bool = False) -> dict[str, object]:
    """``import kvroute`` in a fresh interpreter with ``blocked`` modules failing to import."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "KVROUTE_NO_EXTENSIONS"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    if no_extensions:
        env["KVROUTE_NO_EXTENSIONS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _FALLBACK, *blocked],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_a_failed_extension_falls_back_to_its_twin_with_one_warning() -> None:
    got = _import_kvroute("kvroute._route", "kvroute._hashing")
    assert got["use_extensions"] is False
    ((category, message),) = got["warnings"]  # type: ignore[misc]
    assert category == "ExtensionWarning"
    assert "kvroute._route" in message and "kvroute._hashing" in message
    assert "KVROUTE_NO_EXTENSIONS=1" in message
    assert got["hashing"] == "kvroute._hashing_py"
    assert got["route"] == ["kvroute._route_py", "kvroute._route_py"]
    if not NO_EXTENSIONS:  # the index's extension was not blocked, and it is built
        assert "kvroute._index " not in message
        assert got["index"] == "kvroute._index"


def test_kvroute_no_extensions_chooses_the_twins_without_a_warning() -> None:
    got = _import_kvroute("kvroute._route", no_extensions=True)
    assert got == {
        "use_extensions": False,
        "warnings": [],
        "index": "kvroute._index_py",
        "hashing": "kvroute._hashing_py",
        "route": ["kvroute._route_py", "kvroute._route_py"],
    }


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

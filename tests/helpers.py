"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

#: True when the suite tests the pure-Python twins only.
NO_EXTENSIONS = bool(os.environ.get("KVROUTE_NO_EXTENSIONS"))


def compiled(name: str) -> ModuleType | None:
    """``kvroute.<name>`` if it is to be tested and imports, else None.

    A missing extension is never skipped silently: tests/test_build.py fails.
    """
    if NO_EXTENSIONS:
        return None
    with contextlib.suppress(ImportError):
        return importlib.import_module(f"kvroute.{name}")
    return None


def twins(base: str) -> list[ModuleType]:
    """The compiled ``kvroute.<base>`` (when tested) and its twin ``kvroute.<base>_py``."""
    mod = compiled(base)
    py = importlib.import_module(f"kvroute.{base}_py")
    return [py] if mod is None else [mod, py]


def twin_ids(mods: list[ModuleType]) -> list[str]:
    """Test ids for :func:`twins`: ``c`` and ``py``."""
    return ["py" if m.__name__.endswith("_py") else "c" for m in mods]


@dataclass(frozen=True)
class Twin:
    """Which implementation of the compiled cores a test runs on (conftest's ``twin``).

    :ivar name: ``"c"`` (the extensions) or ``"py"`` (the pure-Python twins).
    :ivar BlockIndex: that implementation's index class.
    """

    name: str
    BlockIndex: type


#: The compiled cores, each with a pure-Python twin ``kvroute.<core>_py``.
CORES = ("_index", "_route", "_hashing")


def twin_swaps() -> list[tuple[Any, str, object, object]]:
    """Every name an imported kvroute module binds to a compiled core, with its twin's object.

    kvroute's modules choose compiled-or-twin once, when imported (``from
    ._route import ActivePrefixes``, ``from ._index import BlockIndex``), so
    running already-imported code on the twins means rebinding those names:
    each name bound to a compiled core's class or function, or to the core
    module itself, is listed as ``(module, name, compiled, twin)``. Empty when
    no core is compiled (``KVROUTE_NO_EXTENSIONS``: the twins are in use).
    """
    swap: dict[int, tuple[object, object]] = {}
    owners: set[str] = set()
    for core in CORES:
        mod = compiled(core)
        if mod is None:
            continue
        py = importlib.import_module(f"kvroute.{core}_py")
        owners |= {mod.__name__, py.__name__}
        swap[id(mod)] = (mod, py)
        for name, obj in vars(mod).items():
            if getattr(obj, "__module__", None) == mod.__name__ and hasattr(py, name):
                swap[id(obj)] = (obj, getattr(py, name))
    out: list[tuple[Any, str, object, object]] = []
    for modname, module in list(sys.modules.items()):
        if module is None or modname in owners or modname.split(".")[0] != "kvroute":
            continue
        # module globals, and class attributes of the module's own classes (a policy
        # binds its compiled route step as a method: KvRoute.route_step)
        owners_here: list[Any] = [module]
        owners_here += [
            v for v in vars(module).values()
            if isinstance(v, type) and v.__module__ == modname
        ]  # fmt: skip
        for owner in owners_here:
            for name, value in list(vars(owner).items()):
                hit = swap.get(id(value))
                if hit is not None and hit[0] is value:
                    out.append((owner, name, value, hit[1]))
    return out


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def H(*xs: int) -> npt.NDArray[np.uint64]:
    """Block keys from literal ints."""
    return np.array(xs, np.uint64)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` every 20 ms until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@contextlib.contextmanager
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An asyncio event loop running on a thread of its own, for the life of the block.

    kvroute's own :class:`~kvroute._serve.ServerThread`, serving nothing.
    """
    from kvroute._serve import ServerThread

    async def nothing() -> None:
        pass

    server = ServerThread("test-loop", nothing, nothing)
    server.start()
    try:
        assert server.loop is not None
        yield server.loop
    finally:
        server.stop()

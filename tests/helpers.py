"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from collections.abc import Callable
from types import ModuleType

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

"""Lazy package exports: a name's submodule is imported on first use of the name.

A package lists ``{name: submodule}`` and binds the two module hooks::

    __getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())

so ``import kvroute.proxy`` stays cheap (aiohttp loads with the first name
that needs it) while ``from kvroute.proxy import ProxyServer`` still works.

>>> import types
>>> pkg = types.ModuleType("pkg")
>>> get, names = lazy_exports("json", {"dumps": ""}, vars(pkg))
>>> get("dumps")([1])
'[1]'
>>> "dumps" in vars(pkg), "dumps" in names()
(True, True)
>>> get("nope")
Traceback (most recent call last):
...
AttributeError: module 'json' has no attribute 'nope'
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, where: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for the names in ``where``.

    On first use of a name its submodule is imported, and the lazy names of
    every submodule loaded so far are bound in ``namespace`` for good: importing
    a submodule binds it in its package under its own name, which would
    shadow a function of the same name (``kvroute.events.decode``).

    :param package: the package's ``__name__``.
    :param where: each lazy name's submodule, relative to the package (``""``:
        the package itself, for tests).
    :param namespace: the package's ``globals()``.
    """

    def module(sub: str) -> str:
        return f"{package}.{sub}" if sub else package

    def __getattr__(name: str) -> Any:
        sub = where.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        importlib.import_module(module(sub))
        for n, s in where.items():
            loaded = sys.modules.get(module(s))
            if loaded is not None:
                namespace[n] = getattr(loaded, n)
        return namespace[name]

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__

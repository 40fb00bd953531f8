"""The package's modules, found by walking its files (for the doctest and import-walk tests).

Nothing here imports kvroute: the import-walk test needs the names before any
of them is imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
from pathlib import Path

#: True when the suite tests the pure-Python twins only.
NO_EXTENSIONS = bool(os.environ.get("KVROUTE_NO_EXTENSIONS"))

#: Top-level modules of kvroute's optional extras (serve, plot, compare, dev):
#: a module that needs one of them may be skipped when it is not installed.
OPTIONAL = frozenset(
    {"aiohttp", "anthropic", "cbor2", "dynamo", "jinja2", "matplotlib", "msgspec"}
    | {"prometheus_client", "redis", "tokenizers", "zmq"}
)

#: Deprecated aliases of moved modules: importing one warns (DeprecationWarning).
DEPRECATED = frozenset({"kvroute.metrics"})


def package_root() -> Path:
    """The directory of the kvroute package that ``import kvroute`` would load."""
    spec = importlib.util.find_spec("kvroute")
    assert spec is not None and spec.submodule_search_locations, "kvroute is not importable"
    return Path(next(iter(spec.submodule_search_locations)))


def _is_extension(path: Path) -> bool:
    return path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def package_modules(*, extensions: bool | None = None) -> list[str]:
    """Every module of kvroute by dotted name, sorted: its ``.py`` files and built extensions.

    :param extensions: include the compiled modules that are built (default:
        unless ``KVROUTE_NO_EXTENSIONS`` is set).
    """
    if extensions is None:
        extensions = not NO_EXTENSIONS
    root = package_root()
    names = set()
    for path in root.rglob("*"):
        rel = path.relative_to(root.parent)
        if "__pycache__" in rel.parts or not path.is_file():
            continue
        # only inside packages (kvroute/data/ holds no code)
        if not all((root.parent / Path(*rel.parts[:i]) / "__init__.py").exists()
                   for i in range(1, len(rel.parts))):  # fmt: skip
            continue
        if path.suffix == ".py" or (extensions and _is_extension(path)):
            module = inspect.getmodulename(str(path))
            assert module is not None, path
            parts = [*rel.parts[:-1], module]
            names.add(".".join(parts[:-1] if module == "__init__" else parts))
    return sorted(names)

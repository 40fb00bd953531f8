"""Every module imports alone, in a fresh interpreter, with warnings as errors (multidict's test).

One interpreter per module (several run at once), each importing just that
module with ``-W error``. That catches import cycles (a module that only
imports after another has), a warning at import time, and dependencies
leaking into the core: the core's modules may load numpy and xxhash beside
the standard library, nothing else. ``import kvroute`` is the case users
meet first: embedding the router in a proxy costs numpy and xxhash only.

The modules are found by walking the package's files (tests/modules.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from modules import DEPRECATED, OPTIONAL, package_modules

MODULES = package_modules()

#: What the core may import beside the standard library.
CORE_DEPENDENCIES = frozenset({"kvroute", "numpy", "xxhash"})

#: The edge: subpackages and modules that serve engines, HTTP, the simulator,
#: the benchmark or the command line, or talk to Redis (replica sync: the
#: ``fleet`` extra), and may import their extras.
EDGE = (
    "kvroute.events", "kvroute.proxy", "kvroute.sim", "kvroute.testing", "kvroute.bench",
    "kvroute.fleet.sync", "kvroute.fleet.wire", "kvroute.fleet.responses", "kvroute.fleet.share",
)  # fmt: skip
#: Edge modules at the package root: the command line, deprecated aliases,
#: and private helpers the proxy and the test kit share (the chat-template
#: environment needs jinja2). The core never imports them.
EDGE_MODULES = frozenset({"kvroute.__main__", "kvroute._chat_template", *DEPRECATED})

#: The heavy dependencies the issue names; none may load with ``import kvroute``.
HEAVY = ("cbor2", "zmq", "aiohttp", "prometheus_client", "msgspec", "matplotlib")

# Run in the child: import one module; print the top-level names of what the
# import loaded from outside the standard library.
CHILD = """if True:
    import importlib, json, sys
    before = set(sys.modules)
    importlib.import_module(sys.argv[1])
    loaded = {name.partition(".")[0] for name in set(sys.modules) - before}
    # Cython's shared runtime registers itself (cython_runtime, _cython_3_x_y)
    cython = {n for n in loaded if n == "cython_runtime" or n.startswith("_cython_")}
    print(json.dumps(sorted(loaded - cython - set(sys.stdlib_module_names))))
"""


def is_core(module: str) -> bool:
    """True for modules of the core: everything but the edge."""
    return module not in EDGE_MODULES and not module.startswith(EDGE)


@dataclass(frozen=True)
class Imported:
    """What importing one module alone did."""

    returncode: int
    stderr: str
    third_party: tuple[str, ...]


def _import_alone(module: str) -> Imported:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", CHILD, module],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    third = tuple(json.loads(done.stdout)) if done.returncode == 0 else ()
    return Imported(done.returncode, done.stderr, third)


@cache
def imported() -> dict[str, Imported]:
    """Every module imported alone, each in its own interpreter, a few at a time."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(MODULES, pool.map(_import_alone, MODULES), strict=True))


def _missing_extra(stderr: str) -> str | None:
    """The optional dependency a failed import named, if that is why it failed."""
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if last.startswith("ModuleNotFoundError: No module named "):
        name = last.rsplit(" ", 1)[-1].strip("'").partition(".")[0]
        return name if name in OPTIONAL else None
    return None


def test_the_walk_finds_the_core_and_the_edge() -> None:
    assert {"kvroute", "kvroute.hashing", "kvroute.router", "kvroute._compat"} <= set(MODULES)
    assert {"kvroute.events.engine_hashes", "kvroute.proxy.app"} <= set(MODULES)
    assert sum(map(is_core, MODULES)) >= 15


@pytest.mark.parametrize("module", sorted(set(MODULES) - DEPRECATED))
def test_module_imports_alone_with_warnings_as_errors(module: str) -> None:
    got = imported()[module]
    if got.returncode != 0 and not is_core(module) and (extra := _missing_extra(got.stderr)):
        pytest.skip(f"{module} needs {extra}, an optional extra that is not installed")
    assert got.returncode == 0, got.stderr
    if is_core(module):
        assert set(got.third_party) <= CORE_DEPENDENCIES, (
            f"importing {module} loads {sorted(set(got.third_party) - CORE_DEPENDENCIES)}: "
            "the core may need numpy and xxhash only; import the rest where it is used"
        )


def test_import_kvroute_loads_none_of_the_heavy_dependencies() -> None:
    got = imported()["kvroute"]
    assert got.returncode == 0, got.stderr
    assert not set(HEAVY) & set(got.third_party), got.third_party
    assert set(got.third_party) <= CORE_DEPENDENCIES, got.third_party


@pytest.mark.parametrize("module", sorted(DEPRECATED))
def test_a_deprecated_alias_warns_when_imported(module: str) -> None:
    got = imported()[module]
    assert got.returncode != 0
    assert "DeprecationWarning" in got.stderr and "moved to" in got.stderr, got.stderr

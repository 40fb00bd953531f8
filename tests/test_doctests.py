"""Every docstring example in kvroute runs as written.

The modules are found by walking the package's files (tests/modules.py), not
from a list kept by hand, so a new module's examples run from the day it is
added. The compiled cores run theirs too (unless KVROUTE_NO_EXTENSIONS), and
the index's and the route kernels' specifications also run against both twins
beside their own tests. A module that needs an optional extra that is not
installed is skipped, saying which; any other import error fails.
"""

from __future__ import annotations

import doctest
import importlib
import warnings

import pytest
from modules import DEPRECATED, OPTIONAL, package_modules

MODULES = package_modules()


def test_the_walk_finds_the_package() -> None:
    # a walk that silently found nothing would pass every test below
    some = {"kvroute", "kvroute.router", "kvroute.sim.engine", "kvroute.testing.mock_worker"}
    assert some <= set(MODULES)
    assert len(MODULES) >= 50


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    try:
        with warnings.catch_warnings():
            if module in DEPRECATED:  # tests/test_imports.py checks that it warns
                warnings.simplefilter("ignore", DeprecationWarning)
            mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"{module} needs {e.name}, an optional extra that is not installed")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


def test_the_walk_runs_the_examples_of_the_simulator_and_the_test_kit() -> None:
    # the ~50 examples in kvroute.sim and kvroute.testing once ran nowhere
    finder = doctest.DocTestFinder()
    found = 0
    for name in MODULES:
        if name.startswith(("kvroute.sim", "kvroute.testing")):
            found += sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
    assert found >= 40

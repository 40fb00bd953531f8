"""Shared fixtures: every index test runs against both twins (ids c / py)."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
from helpers import twin_ids, twins
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_INDEX_TWINS = twins("_index")


@pytest.fixture(scope="session", params=_INDEX_TWINS, ids=twin_ids(_INDEX_TWINS))
def index_module(request: pytest.FixtureRequest) -> ModuleType:
    """The compiled ``kvroute._index`` and the pure-Python ``kvroute._index_py``."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def BlockIndex(index_module: ModuleType) -> type:
    return index_module.BlockIndex  # type: ignore[no-any-return]

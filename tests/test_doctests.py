"""The examples in the docstrings of the router, the proxy and the event layer run as written.

(The hashing, index, bench and decoder modules run theirs beside their own
tests, against both compiled and pure-Python twins.)
"""

from __future__ import annotations

import doctest
import importlib

import pytest

CORE = [
    "kvroute.router",
    "kvroute.request",
    "kvroute.load",
    "kvroute.approx",
    "kvroute.policies",
    "kvroute.policies.base",
    "kvroute.policies.builtin",
]
# These need the ``serve`` extra (aiohttp, pyzmq, prometheus_client, ...).
SERVE = [
    *(f"kvroute.proxy.{m}" for m in ("anthropic", "app", "call", "cli", "config", "errors")),
    *(f"kvroute.proxy.{m}" for m in ("hints", "models", "openai", "relay", "server", "sse")),
    *(f"kvroute.proxy.{m}" for m in ("tokenize", "upstream", "warmup", "workers")),
    "kvroute.metrics",
    "kvroute.events.zmq",
    "kvroute._serve",
    "kvroute._chat_template",
]


@pytest.mark.parametrize("module", CORE + SERVE)
def test_doctests(module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if module in CORE:
            raise
        pytest.skip(f"{module} needs the serve extra: {e}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

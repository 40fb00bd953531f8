"""The read timeout: a worker silent for ``read_timeout`` fails the request it answers.

Until an answer's headers arrive aiohttp's own timer keeps the timeout; after
them :class:`~kvroute.proxy.idle.ReadIdle` does, for every open answer at
once (aiohttp's timer is re-armed per chunk, a cost per streamed token).
Silence the proxy causes (a slow client: the answer's buffer is full and its
connection is not read) is not the worker's and does not count. Health checks
run too seldom in these tests to see the silence: the timeout alone must.
Real sockets throughout: a real aiohttp server plays a worker that stops
writing, or MockWorkers pause (a stream going silent mid-answer is in
test_proxy_failover.py, noticed by health checks or by the timeout alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from aiohttp import web  # noqa: E402
from test_proxy_support import fleet, post, serving  # noqa: E402

from kvroute import Router  # noqa: E402
from kvroute.events.metrics import Metrics  # noqa: E402
from kvroute.proxy import WORKER_HEADER, ProxyConfig, WorkerSpec  # noqa: E402
from kvroute.proxy.idle import ReadIdle  # noqa: E402
from kvroute.proxy.upstream import Upstream  # noqa: E402
from kvroute.proxy.workers import WorkerPool  # noqa: E402

MODEL = "mock-model"
TIMEOUT = 0.4
#: Health checks that never come round during a test.
NO_HEALTH = {"health_interval": 3600.0, "read_timeout": TIMEOUT}


@contextlib.asynccontextmanager
async def _upstream(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], timeout: float = TIMEOUT
) -> AsyncIterator[Upstream]:
    """Open upstream connections to one worker: ``handler`` answering every POST on loopback."""
    async with serving(handler) as url:
        config = ProxyConfig([WorkerSpec(url)], read_timeout=timeout)
        router = Router(block_size=config.block_size, workers=[0], kv_events=False)
        upstream = Upstream(router, WorkerPool(router, config), config, Metrics(router))
        await upstream.start()
        try:
            yield upstream
        finally:
            await upstream.close()


def test_an_answer_that_stops_after_its_headers_times_out() -> None:
    async def stops(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await asyncio.sleep(0.05)  # after the headers: aiohttp's timer is gone
        await out.write(b"data: 1\n\n")
        await asyncio.sleep(30)  # silent (cancelled when the connection closes)
        return out

    async def scenario() -> None:
        async with _upstream(stops) as upstream:
            response = await upstream.open(0, "/v1/completions", b"{}", {})
            assert response.connection is not None
            assert response.connection.protocol is not None
            assert response.connection.protocol.read_timeout is None  # taken over
            assert await response.content.readany() == b"data: 1\n\n"
            t0 = time.monotonic()
            with pytest.raises(aiohttp.ServerTimeoutError, match="no byte from the worker"):
                await response.content.readany()
            assert time.monotonic() - t0 >= TIMEOUT
            upstream.pool.untrack(0, response)
            response.release()

    asyncio.run(scenario())


def test_a_slow_reader_does_not_time_out_a_worker_that_waits_for_it() -> None:
    size = 4 << 20  # past every buffer on the way: the worker ends up waiting on the reader

    async def floods(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for _ in range(size // 4096):
            await out.write(b"x" * 4096)
        await out.write_eof()
        return out

    async def scenario() -> None:
        async with _upstream(floods) as upstream:
            response = await upstream.open(0, "/v1/completions", b"{}", {})
            await asyncio.sleep(4 * TIMEOUT)  # reads nothing: aiohttp stops reading the socket
            assert response.connection is not None
            assert response.connection.transport is not None
            assert not response.connection.transport.is_reading()
            assert len(await response.read()) == size
            assert upstream.pool.healthy() == [0]
            upstream.pool.untrack(0, response)
            response.release()

    asyncio.run(scenario())


def test_read_idle_sees_each_answer_once_a_check_and_needs_a_positive_timeout() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReadIdle(None, 0)  # type: ignore[arg-type]

    gate = asyncio.Event()

    async def waits(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b"data: 1\n\n")
        await gate.wait()
        await out.write(b"data: 2\n\n")
        await out.write_eof()
        return out

    async def scenario() -> None:
        async with _upstream(waits, timeout=3600.0) as upstream:  # its own never fires here
            idle = ReadIdle(upstream.pool, 3600.0)  # looked at by hand, not by its timer
            with pytest.raises(AssertionError, match="start"):
                idle.check()
            idle.start()
            response = await upstream.open(0, "/v1/completions", b"{}", {})
            assert idle.check() == []  # first seen
            idle.timeout = 0.0
            assert idle.check() == [response]  # no byte since it was first seen
            with pytest.raises(aiohttp.ServerTimeoutError):
                await response.content.read()
            assert idle.check() == []  # told once
            idle.close()
            idle.close()
            gate.set()
            upstream.pool.untrack(0, response)
            response.release()

    asyncio.run(scenario())


def test_a_worker_silent_before_its_headers_is_failed_over_by_the_read_timeout() -> None:
    with fleet(2, **NO_HEALTH) as (proxy, workers):
        prompt = [100 + i % 150 for i in range(128)]
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        status, headers, _ = post(proxy.url + "/v1/completions", body)
        first = int(headers[WORKER_HEADER])
        workers[first].pause()
        # The same prompt goes where it is cached, hears nothing, and is retried.
        status, headers, raw = post(proxy.url + "/v1/completions", body)
        assert status == 200 and int(headers[WORKER_HEADER]) == 1 - first, raw
        assert proxy.router.load(first)["healthy"] is False
        assert proxy.proxy.metrics.value("kvroute_proxy_retries_total") == 1

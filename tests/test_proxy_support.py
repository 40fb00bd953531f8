"""Shared helpers for the proxy tests (no tests here): a fleet of MockWorkers behind a proxy.

Everything runs on loopback: each :class:`~kvroute.testing.MockWorker` is a
real aiohttp server on its own thread, the proxy is a
:class:`~kvroute.proxy.ProxyServer` on another, and the tests talk HTTP to it
with urllib (or the official ``anthropic`` SDK).
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

from kvroute import Router
from kvroute.proxy import ProxyConfig, ProxyServer, WorkerSpec
from kvroute.testing import MockWorker

#: Health checks fast enough for failover tests to take well under a second.
FAST_HEALTH: dict[str, Any] = {
    "health_interval": 0.1,
    "health_timeout": 0.3,
    "unhealthy_after": 2,
    "connect_timeout": 2.0,
    "read_timeout": 20.0,
}

# A system prompt of several KV blocks, so prefix hits are many tokens.
SYSTEM = "You are a careful coding agent. Follow the repository's style guide. " * 8


@contextlib.contextmanager
def fleet(
    n: int = 2,
    *,
    worker_kw: dict[str, Any] | None = None,
    router: Router | None = None,
    **config_kw: Any,
) -> Iterator[tuple[ProxyServer, list[MockWorker]]]:
    """``n`` MockWorkers (no KV events) behind a proxy; everything stopped afterwards."""
    workers: list[MockWorker] = []
    server: ProxyServer | None = None
    try:
        for _ in range(n):
            workers.append(MockWorker(publish_events=False, **(worker_kw or {})).start())
        options = {**FAST_HEALTH, **config_kw}
        config = ProxyConfig([WorkerSpec(w.url) for w in workers], **options)
        if router is None:
            router = Router(block_size=config.block_size, kv_events=False, journal=True)
        server = ProxyServer(config, router=router).start()
        yield server, workers
        server.stop()
        # The proxy's thread (and its executor's) are gone once stop() returns.
        assert not [t for t in threading.enumerate() if t.name == "kvroute-proxy"]
    finally:
        if server is not None:
            server.stop()
        for w in workers:
            if w.paused:
                w.resume()
            w.stop()


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """``handler`` answering every POST on a loopback port (on the running loop): its base URL."""
    app = web.Application()
    app.router.add_post("/{path:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    try:
        await site.start()
        yield f"http://127.0.0.1:{site.port}"
    finally:
        await runner.cleanup()


def post(
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    raw: bytes | None = None,
    timeout: float = 20.0,
) -> tuple[int, dict[str, str], bytes]:
    """POST JSON (or ``raw`` bytes); returns status, headers, body (errors included)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET; returns status, headers, body (errors included)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


def sse_data(body: bytes) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` kept as a string)."""
    out: list[Any] = []
    for event in body.decode().split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def routed_requests(router: Router) -> list[Any]:
    """The :class:`~kvroute.Request` of every ``route()`` call so far (journal order)."""
    return [args[0] for _, op, args, _ in router.journal() if op == "route"]


def chat(turns: int) -> list[dict[str, Any]]:
    """A chat history: the system prompt, then ``turns`` user turns with replies between."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for t in range(turns):
        if t:
            messages.append({"role": "assistant", "content": f"reply {t}"})
        messages.append({"role": "user", "content": f"step {t}: edit the file and run tests"})
    return messages

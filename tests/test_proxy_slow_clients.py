"""Slow and too many clients (issue 16, item 6): deadlines for headers and bodies, a cap.

100 connections trickling partial headers or bodies at a byte a second used
to stay open for as long as they liked (the proxy's file descriptors went
from 27 to 127). Now a request's headers must arrive within
``header_timeout``, its body within ``body_timeout`` (else 408 and the
connection closes), and beyond ``max_connections`` a new connection is
refused with 503 at once. Real sockets, trickling real bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import wait_until
from test_proxy_support import fleet, get, post

from kvroute.proxy import ProxyConfig, WorkerSpec
from kvroute.proxy.connections import ConnectionGuard

MODEL = "mock-model"
BODY = json.dumps({"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 1}).encode()
#: The start of a request whose headers never end (at a byte every 50 ms).
ENDLESS_HEADERS = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"".join(
    b"X-Pad-%d: abcdefgh\r\n" % i for i in range(200)
)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


class Trickle:
    """Clients sending their bytes one at a time, every ``interval`` seconds, until closed."""

    def __init__(self, url: str, payload: bytes, n: int, interval: float = 0.05) -> None:
        self.socks = [_connect(url) for _ in range(n)]
        self.closed_by_peer = [False] * n
        self.answers = [b""] * n
        self._payload = payload
        self._interval = interval
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        sock = self.socks[i]
        sock.settimeout(self._interval)
        for b in self._payload:
            if self._stop.is_set():
                return
            try:
                sock.sendall(bytes([b]))
            except OSError:
                break
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            self.answers[i] += data
            if not data:
                break
        with contextlib.suppress(OSError):
            sock.settimeout(5)
            while data := sock.recv(65536):
                self.answers[i] += data
        self.closed_by_peer[i] = True

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        for s in self.socks:
            s.close()


@contextlib.contextmanager
def trickle(url: str, payload: bytes, n: int) -> Iterator[Trickle]:
    t = Trickle(url, payload, n)
    try:
        yield t
    finally:
        t.close()


def test_trickled_headers_are_cut_off_after_the_header_timeout() -> None:
    with fleet(1, header_timeout=0.3) as (proxy, _):
        with trickle(proxy.url, ENDLESS_HEADERS, 20) as t:
            assert wait_until(lambda: all(t.closed_by_peer), timeout=10)
            assert all(a.startswith(b"HTTP/1.1 408") for a in t.answers), t.answers[0]
            guard = proxy.proxy.connections
            assert wait_until(lambda: guard.open == 0)
            # meanwhile (and after) the proxy answers everyone else
            assert get(proxy.url + "/health")[0] == 200
        assert guard.timeouts["headers"] == 20
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_client_timeouts_total", {"phase": "headers"}) == 20


def test_a_trickled_body_is_cut_off_after_the_body_timeout_with_a_408() -> None:
    head = (
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    with fleet(1, body_timeout=0.3) as (proxy, workers):
        with trickle(proxy.url, head + b" " * 1000, 10) as t:
            assert wait_until(lambda: all(t.closed_by_peer), timeout=10)
            for answer in t.answers:
                status, _, body = answer.partition(b"\r\n\r\n")
                assert status.startswith(b"HTTP/1.1 408"), answer
                err = json.loads(body)
                assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
                assert "did not arrive" in err["error"]["message"]
        guard = proxy.proxy.connections
        assert wait_until(lambda: guard.open == 0)
        assert guard.timeouts["body"] == 10
        assert "/v1/messages" not in workers[0].http_requests()  # nothing went upstream


def test_a_kept_alive_connections_next_request_has_the_same_header_deadline() -> None:
    with fleet(1, header_timeout=0.3) as (proxy, _):
        sock = _connect(proxy.url)
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)  # idle, not late: no request has begun
            sock.sendall(b"GET /hea")  # the next request begins, then stalls
            sock.settimeout(5)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408"), answer
        finally:
            sock.close()


def test_connections_beyond_the_cap_are_refused_with_503_until_some_close() -> None:
    with fleet(1, max_connections=5, header_timeout=30) as (proxy, _):
        idle = [_connect(proxy.url) for _ in range(5)]
        try:
            extra = _connect(proxy.url)
            with extra:
                extra.settimeout(2)
                answer = extra.recv(65536)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
            guard = proxy.proxy.connections
            assert json.loads(body)["error"]["code"] == "overloaded"
            assert guard.open == 5 and guard.refused == 1
            assert proxy.proxy.metrics.value("kvroute_proxy_connections_refused_total") == 1
            assert proxy.proxy.metrics.value("kvroute_proxy_connections") == 5
        finally:
            for s in idle:
                s.close()
        assert wait_until(lambda: guard.open == 0)
        assert post(proxy.url + "/v1/completions", raw=BODY)[0] == 200


def test_slow_clients_under_the_cap_do_not_hold_up_a_normal_request() -> None:
    with fleet(1, header_timeout=5) as (proxy, _), trickle(proxy.url, ENDLESS_HEADERS, 30):
        status, _, raw = post(proxy.url + "/v1/completions", raw=BODY)
        assert status == 200, raw


def test_the_body_deadline_is_armed_only_for_a_body_still_arriving() -> None:
    # a body that came whole with its headers (the usual request) needs no timer
    guard = ConnectionGuard(ProxyConfig([WorkerSpec("http://127.0.0.1:9")], body_timeout=5.0))

    async def armed(whole: bool) -> list[float]:
        loop = asyncio.get_running_loop()
        delays: list[float] = []
        later = loop.call_later

        def spy(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            delays.append(delay)
            return later(delay, callback, *args)

        loop.call_later = spy  # type: ignore[method-assign]
        content = SimpleNamespace(is_eof=lambda: whole)
        request = SimpleNamespace(transport=None, body_exists=True, content=content)

        async def handler(request: Any) -> str:
            return "answered"

        assert await guard.middleware(request, handler) == "answered"  # type: ignore[arg-type]
        return delays

    assert asyncio.run(armed(whole=True)) == []
    assert asyncio.run(armed(whole=False)) == [5.0]

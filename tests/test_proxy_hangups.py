"""A client hanging up stops the worker, in both modes (issue 16, item 10).

A client closing its socket 0.7 s into a 100-token JSON request used to
leave the worker generating all 100 tokens for nobody (a streaming client's
hang-up stopped it at its next write). Now the proxy's handler is cancelled
when the client's connection drops, the upstream connection closes at once
(vLLM, and the MockWorker, abort a request whose connection closes), the
request's load is released at once, and the hang-up is counted.

The lifecycle call: ``finished`` once a token went out (the prompt was
prefilled: its blocks are in the engine's cache, and the router's predicted
residency is true), else ``failed`` (the prefill may not have happened: no
residency is predicted for it).
"""

from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import wait_until
from test_proxy_support import fleet

MODEL = "mock-model"


def _open(url: str, path: str, body: dict[str, object], rid: str) -> socket.socket:
    """A raw client connection that has sent its whole request (and reads nothing yet)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {rid}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def _record(worker, rid: str):  # type: ignore[no-untyped-def]
    return next((r for r in worker.requests() if r.request_id == rid), None)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_client_hanging_up_stops_the_worker_and_releases_the_load(stream: bool) -> None:
    with fleet(1, worker_kw={"token_delay": 0.02}) as (proxy, (worker,)):
        body = {"model": MODEL, "prompt": list(range(1, 65)), "max_tokens": 100, "stream": stream}
        sock = _open(proxy.url, "/v1/completions", body, "h1")
        try:
            assert wait_until(lambda: (r := _record(worker, "h1")) and r.completion_tokens >= 5)
            if stream:
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert proxy.router.load(0)["active_requests"] == 1
        finally:
            sock.close()
        assert wait_until(lambda: _record(worker, "h1").status != "running", timeout=5)
        rec = _record(worker, "h1")
        assert rec.status == "aborted" and rec.completion_tokens < 60, rec
        assert wait_until(lambda: proxy.router.load(0)["active_requests"] == 0, timeout=2)
        m = proxy.proxy.metrics
        stage = "streaming" if stream else "waiting"
        assert wait_until(
            lambda: (
                m.value(
                    "kvroute_proxy_client_disconnects_total",
                    {"endpoint": "/v1/completions", "stage": stage},
                )
                == 1
            )
        )
        assert m.value(
            "kvroute_proxy_requests_total", {"endpoint": "/v1/completions", "status": "499"}
        ) == (0 if stream else 1)
        # a token had gone out on the stream: the prompt is cached there, the
        # request finished; a JSON request's prefill is unknown: it failed
        ends = [op for _, op, _, _ in proxy.router.journal() if op in ("finished", "failed")]
        assert ends == (["finished"] if stream else ["failed"])
        # the worker is not to blame
        assert proxy.proxy.outliers.state(0).consecutive == 0
        assert proxy.router.load(0)["healthy"] is True


def test_a_client_hanging_up_before_the_first_token_fails_the_request() -> None:
    with fleet(1, worker_kw={"prefill_delay_per_token": 0.01}) as (proxy, (worker,)):
        body = {"model": MODEL, "prompt": list(range(1, 201)), "max_tokens": 5, "stream": True}
        sock = _open(proxy.url, "/v1/completions", body, "h2")
        assert wait_until(lambda: _record(worker, "h2") is not None)
        sock.close()  # still prefilling: 200 uncached tokens at 10 ms
        assert wait_until(lambda: _record(worker, "h2").status == "aborted", timeout=5)
        assert _record(worker, "h2").completion_tokens == 0
        assert wait_until(lambda: proxy.router.load(0)["active_requests"] == 0, timeout=2)
        ends = [op for _, op, _, _ in proxy.router.journal() if op in ("finished", "failed")]
        assert ends == ["failed"]

"""Workers at run time, through the proxy: the admin API, draining, the workers file and DNS.

Real parts only: MockWorkers publishing vLLM KV events over ZMQ, the proxy
on its own thread (and once as a ``python -m kvroute proxy`` process), HTTP
from urllib. What is checked is what an operator sees: a worker added at run
time gets requests, its KV events feed the index and the proxy predicts its
hits exactly; a drained worker gets no new request while the ones in flight
finish, then leaves with its blocks; the admin API refuses a request without
its token.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from test_proxy_support import FAST_HEALTH, get, post

from kvroute.fleet import WorkerSpec
from kvroute.proxy import PREDICTED_HEADER, WORKER_HEADER, ProxyConfig, ProxyServer
from kvroute.testing import MockWorker

pytest.importorskip("aiohttp")
pytest.importorskip("zmq")

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HARNESS = "You are a coding agent. Tools: read_file, edit_file, run_tests, grep. " * 6


def spec(w: MockWorker, **kw: Any) -> dict[str, Any]:
    """The admin API's body for a MockWorker (its events and replay endpoints included)."""
    return {"url": w.url, "events": w.events_endpoint, "replay": w.replay_endpoint, **kw}


def chat(session: str, turn: int) -> dict[str, Any]:
    """A session's turn; sessions named ``fresh-*`` share no prefix with any other."""
    system = f"{session} works alone. " * 20 if session.startswith("fresh") else HARNESS
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    for t in range(turn + 1):
        if t:
            messages.append({"role": "assistant", "content": f"done {t}"})
        messages.append({"role": "user", "content": f"{session} step {t}: run the tests " * 3})
    return {"model": "mock-model", "messages": messages, "max_tokens": 4}


def send(
    server: ProxyServer, session: str, turn: int, **kw: Any
) -> tuple[int, dict[str, str], Any]:
    """One turn of a session through the proxy: status, headers, the answer's JSON."""
    status, headers, raw = post(server.url + "/v1/chat/completions", chat(session, turn), **kw)
    return status, headers, json.loads(raw)


def synced(server: ProxyServer, workers: dict[int, MockWorker]) -> bool:
    """True once the proxy applied every batch each of ``workers`` (by id) published."""
    sub = server.proxy.subscriber
    assert sub is not None
    return bool(sub.wait_for(
        lambda streams: all(
            w in streams and streams[w].last_seq == mw.next_seq - 1 for w, mw in workers.items()
        ),
        timeout=10,
    ))  # fmt: skip


def admin(server: ProxyServer, method: str, path: str, body: Any = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    """An admin call with the token (or ``headers``); the answer's JSON."""
    if method == "GET":
        status, h, raw = get(server.url + path, AUTH if headers is None else headers)
    else:
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(AUTH if headers is None else headers)}
        req = urllib.request.Request(server.url + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=20) as r:
                status, h, raw = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            with e:
                status, h, raw = e.code, dict(e.headers), e.read()
    return status, h, json.loads(raw)


@contextlib.contextmanager
def running(n: int, **worker_kw: Any) -> Iterator[list[MockWorker]]:
    workers = [MockWorker(**worker_kw).start() for _ in range(n)]
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()


@contextlib.contextmanager
def proxy(config: ProxyConfig, resolver: Any = None) -> Iterator[ProxyServer]:
    server = ProxyServer(config)
    if resolver is not None:
        assert server.proxy.fleet.dns is not None
        server.proxy.fleet.dns.resolver = resolver
    server.start()
    try:
        yield server
    finally:
        server.stop()


def served_by(server: ProxyServer, sessions: Iterable[str], turn: int = 0) -> dict[str, int]:
    out = {}
    for s in sessions:
        status, headers, body = send(server, s, turn)
        assert status == 200, body
        out[s] = int(headers[WORKER_HEADER])
    return out


# -- the admin API: its token ----------------------------------------------------------------


def test_admin_calls_without_the_token_get_401_and_change_nothing() -> None:
    with running(1, publish_events=False) as (w,), proxy(
        ProxyConfig([WorkerSpec(w.url)], admin_token=TOKEN, **FAST_HEALTH)
    ) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):  # fmt: skip
            for method, path, body in (
                ("GET", "/admin/workers", None),
                ("POST", "/admin/workers", {"url": "http://127.0.0.1:9"}),
                ("DELETE", "/admin/workers/0", None),
                ("POST", "/admin/workers/0/drain", None),
            ):
                status, h, answer = admin(server, method, path, body, headers)
                assert status == 401, (method, path, headers)
                assert h["WWW-Authenticate"].startswith("Bearer")
                assert answer["error"]["code"] == "unauthorized"
        assert server.proxy.fleet.membership.members().keys() == {0}
        assert server.router.workers() == [0]
        status, _, listing = admin(server, "GET", "/admin/workers")
        assert status == 200 and [x["id"] for x in listing["workers"]] == [0]
        assert listing["workers"][0]["source"] == "flag"


def test_without_a_token_there_is_no_admin_api() -> None:
    with running(1, publish_events=False) as (w,), proxy(
        ProxyConfig([WorkerSpec(w.url)], **FAST_HEALTH)
    ) as server:
        status, _, answer = admin(server, "GET", "/admin/workers")
        assert status == 404 and "error" in answer
        assert admin(server, "POST", "/admin/workers", {"url": "h:1"})[0] == 404


def test_admin_errors_are_clear() -> None:
    with running(1, publish_events=False) as (w,), proxy(
        ProxyConfig([WorkerSpec(w.url)], admin_token=TOKEN, **FAST_HEALTH)
    ) as server:
        for body, code in (
            ({"url": "http://h:1", "port": 3}, "invalid_worker"),
            ({"events": "tcp://h:1"}, "invalid_worker"),
            ({"url": "http://h:1", "events_format": "nope"}, "invalid_worker"),
            ([1, 2], "invalid_worker"),
        ):
            status, _, answer = admin(server, "POST", "/admin/workers", body)
            assert (status, answer["error"]["code"]) == (400, code), answer
        for path in ("/admin/workers/7", "/admin/workers/x"):
            status, _, answer = admin(server, "DELETE", path)
            assert (status, answer["error"]["code"]) == (404, "worker_not_found")
        assert admin(server, "POST", "/admin/workers/12/drain")[0] == 404


# -- a proxy that starts empty and is filled through the admin API -----------------------------


def test_a_worker_added_through_the_admin_api_is_used_and_its_events_feed_the_index() -> None:
    with running(2, block_size=16) as (a, b), proxy(
        ProxyConfig(admin_token=TOKEN, **FAST_HEALTH)
    ) as server:
        # empty: requests are refused, plainly, and /health says so
        status, _, answer = send(server, "s0", 0)
        assert status == 503 and "no worker" in answer["error"]["message"]
        assert get(server.url + "/health")[0] == 503
        assert server.router.kv_events  # the fleet comes at run time: events expected
        status, _, added = admin(server, "POST", "/admin/workers", spec(a, name="a"))
        assert status == 201 and added["healthy"] is True and added["source"] == "admin"
        wa = added["id"]
        assert added["name"] == "a" and added["spec"]["events_endpoint"] == a.events_endpoint
        assert get(server.url + "/health")[0] == 200
        # it serves, and its KV events feed the index
        assert served_by(server, ["s0"]) == {"s0": wa}
        assert synced(server, {wa: a})
        assert server.router.index.worker_len(wa) == len(a.cached_block_hashes()) > 0
        # the next turn: the proxy predicts exactly the hit the worker reports
        status, headers, _ = send(server, "s0", 1, headers={"X-Request-Id": "s0-1"})
        assert status == 200 and int(headers[WORKER_HEADER]) == wa
        assert int(headers[PREDICTED_HEADER]) == a.cache_hits()["s0-1"] > len(HARNESS) // 2
        # a second one, added with the same URL spelled otherwise, is the same worker
        again = admin(server, "POST", "/admin/workers", {**spec(a), "url": a.url + "/"})
        assert again[0] == 200 and again[2]["id"] == wa and again[2]["name"] == a.url[7:]
        status, _, added_b = admin(server, "POST", "/admin/workers", spec(b))
        wb = added_b["id"]
        assert status == 201 and wb != wa
        assert synced(server, {wa: a, wb: b})
        # the new worker takes sessions that share nothing (sent one at a time, they may
        # all go to it: it is the emptier); old ones stay where their prefix is
        homes = served_by(server, [f"fresh-{i}" for i in range(8)])
        assert wb in set(homes.values()) <= {wa, wb}
        assert served_by(server, ["s0"], turn=2) == {"s0": wa}
        status, _, listing = admin(server, "GET", "/admin/workers")
        assert {x["id"] for x in listing["workers"]} == {wa, wb}
        assert all(x["active_requests"] == 0 and x["healthy"] for x in listing["workers"])
        # removed: never routed to again, its blocks leave the index at once
        status, _, gone = admin(server, "DELETE", f"/admin/workers/{wa}")
        assert status == 200 and gone["state"] == "removed"
        assert server.router.workers() == [wb]
        assert server.router.index.worker_len(wa) == 0
        assert wa not in server.proxy.subscriber.streams()
        # events it publishes from now on reach nobody: its cache is not resurrected
        seq = a.next_seq
        post(a.url + "/v1/chat/completions", chat("direct", 0))
        assert a.next_seq > seq
        assert served_by(server, ["s0"], turn=3) == {"s0": wb}
        assert synced(server, {wb: b})
        assert server.router.index.worker_len(wa) == 0 and wa not in server.router.index.workers()
        # the metrics follow: the gone worker's series are gone, the info series shows b
        metrics = get(server.url + "/metrics")[2].decode()
        assert f'kvroute_worker_active_requests{{worker="{wa}"}}' not in metrics
        assert f'kvroute_routed_requests_total{{worker="{wa}"}}' not in metrics
        assert f'kvroute_worker_info{{name="{b.url[7:]}",role="both",source="admin"' in metrics


# -- draining ----------------------------------------------------------------------------------


def test_a_drained_worker_finishes_its_requests_takes_no_new_ones_then_leaves() -> None:
    with running(2, block_size=16) as workers:
        specs = [WorkerSpec(w.url, w.events_endpoint, w.replay_endpoint) for w in workers]
        with proxy(ProxyConfig(specs, admin_token=TOKEN, **FAST_HEALTH)) as server:
            assert all(w.wait_for_subscribers(1, timeout=10) for w in workers)
            home = served_by(server, ["s"])["s"]
            other = 1 - home
            assert synced(server, dict(enumerate(workers)))
            # a long streamed answer in flight on the worker about to drain
            workers[home].token_delay = 0.05
            body = {**chat("s", 1), "max_tokens": 20, "stream": True}
            result: dict[str, Any] = {}

            def long_request() -> None:
                result["answer"] = post(server.url + "/v1/chat/completions", body,
                                        {"X-Session-Id": "s"})  # fmt: skip

            t = threading.Thread(target=long_request)
            t.start()
            assert wait_until(lambda: server.router.load(home)["active_requests"] == 1)
            status, _, drained = admin(server, "POST", f"/admin/workers/{home}/drain")
            assert status == 202 and drained["state"] == "draining"
            assert drained["active_requests"] == 1
            # the same session's next turns (its prefix lives there): elsewhere now
            for turn in (2, 3):
                status, headers, _ = send(server, "s", turn, headers={"X-Session-Id": "s"})
                assert status == 200 and int(headers[WORKER_HEADER]) == other
            assert server.proxy.fleet.membership.get(home).state == "draining"  # type: ignore[union-attr]
            t.join(30)
            status, headers, raw = result["answer"]
            assert status == 200 and int(headers[WORKER_HEADER]) == home
            assert raw.decode().rstrip().endswith("data: [DONE]")
            # its last request done, it leaves, and its blocks with it
            assert wait_until(lambda: server.proxy.fleet.membership.get(home) is None)
            assert wait_until(lambda: server.router.workers() == [other])
            assert server.router.index.worker_len(home) == 0
            status, _, listing = admin(server, "GET", "/admin/workers")
            assert [x["id"] for x in listing["workers"]] == [other]
            assert home not in server.proxy.pool.workers


def test_a_drain_times_out() -> None:
    with running(1, block_size=16, publish_events=False) as (w,):
        config = ProxyConfig([WorkerSpec(w.url)], admin_token=TOKEN, drain_timeout=0.2,
                             **FAST_HEALTH)  # fmt: skip
        with proxy(config) as server:
            w.token_delay = 0.05
            body = {**chat("s", 0), "max_tokens": 100, "stream": True}
            result: dict[str, Any] = {}

            def long_request() -> None:
                result["answer"] = post(server.url + "/v1/chat/completions", body)

            t = threading.Thread(target=long_request)
            t.start()
            assert wait_until(lambda: server.router.load(0)["active_requests"] == 1)
            assert admin(server, "POST", "/admin/workers/0/drain")[0] == 202
            # removed with its request still running: the stream is cut, the worker gone
            assert wait_until(lambda: server.router.workers() == [])
            t.join(30)
            status, _, raw = result["answer"]
            assert status == 200 and b"[DONE]" not in raw
            assert b"the worker failed mid-stream" in raw  # the client hears it was cut
            assert send(server, "s", 1)[0] == 503


# -- the workers file --------------------------------------------------------------------------


def write(path: Path, entries: list[Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


def test_workers_in_a_watched_file_join_and_leave(tmp_path: Path) -> None:
    path = tmp_path / "workers.json"
    with running(2, block_size=16) as (a, b):
        write(path, [spec(a)])
        config = ProxyConfig(workers_file=str(path), workers_file_interval=0.05, **FAST_HEALTH)
        with proxy(config) as server:
            membership = server.proxy.fleet.membership
            (wa,) = membership.members()
            assert served_by(server, ["s"]) == {"s": wa}
            write(path, [spec(a), spec(b)])
            assert wait_until(lambda: membership.by_url(b.url) is not None)
            wb = membership.by_url(b.url).id  # type: ignore[union-attr]
            assert wait_until(lambda: server.proxy.pool.workers[wb].healthy)
            # a bad version: logged, nothing changes
            watched = server.proxy.fleet.file
            assert watched is not None and watched.errors == 0
            path.write_text("[{")
            assert wait_until(lambda: watched.errors == 1)
            assert set(membership.members()) == {wa, wb}
            # a drops out: it drains (nothing in flight) and leaves; b takes everything
            write(path, [spec(b)])
            assert wait_until(lambda: server.router.workers() == [wb])
            assert served_by(server, ["s", "t"], turn=1) == {"s": wb, "t": wb}
            assert synced(server, {wb: b})
            status, headers, _ = send(server, "s", 2, headers={"X-Request-Id": "s-2"})
            assert status == 200 and int(headers[PREDICTED_HEADER]) == b.cache_hits()["s-2"] > 0
            assert server.router.index.worker_len(wb) == len(b.cached_block_hashes())


# -- DNS -----------------------------------------------------------------------------------------


def test_dns_adds_and_removes_workers_on_re_resolution() -> None:
    with running(2, block_size=16) as (a, b):
        table: dict[str, list[str]] = {"a.workers.test": ["127.0.0.1"], "b.workers.test": []}

        async def resolver(host: str) -> list[str]:
            return table[host]

        names = [f"a.workers.test:{a.port}={a.events_port},{a.replay_port}",
                 f"b.workers.test:{b.port}={b.events_port},{b.replay_port}"]  # fmt: skip
        config = ProxyConfig(worker_dns=names, worker_dns_interval=0.05, **FAST_HEALTH)
        with proxy(config, resolver) as server:
            m = server.proxy.fleet.membership
            (wa,) = m.members()  # resolved before the proxy listens
            assert m.get(wa).source == "dns" and server.proxy.pool.workers[wa].healthy  # type: ignore[union-attr]
            assert served_by(server, ["s"]) == {"s": wa}
            table["b.workers.test"] = ["127.0.0.1"]
            assert wait_until(lambda: m.by_url(b.url) is not None)
            wb = m.by_url(b.url).id  # type: ignore[union-attr]
            assert wait_until(lambda: server.proxy.pool.workers[wb].healthy)
            table["a.workers.test"] = []
            assert wait_until(lambda: server.router.workers() == [wb])
            assert served_by(server, ["s"], turn=1) == {"s": wb}
            assert synced(server, {wb: b})


# -- the command line ------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_with_dns_through_the_real_resolver_and_the_admin_api() -> None:
    with running(1, block_size=16) as (w,):
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "KVROUTE_ADMIN_TOKEN": TOKEN}
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvroute", "proxy", "--port", str(port),
             "--worker-dns", f"localhost:{w.port}={w.events_port},{w.replay_port}",
             "--health-interval", "0.1", "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"

            def up() -> bool:
                try:
                    return get(url + "/health")[0] == 200
                except OSError:
                    return False

            assert wait_until(up, timeout=30)
            status, headers, raw = post(url + "/v1/chat/completions", chat("c", 0))
            assert status == 200, raw
            assert get(url + "/admin/workers")[0] == 401
            status, _, raw = get(url + "/admin/workers", AUTH)
            listing = json.loads(raw)["workers"]
            mine = [x for x in listing if x["url"] == f"http://127.0.0.1:{w.port}"]
            assert status == 200 and len(mine) == 1 and mine[0]["source"] == "dns"
            assert int(headers[WORKER_HEADER]) == mine[0]["id"]
        finally:
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


def test_cli_refuses_a_bad_workers_file_and_no_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvroute.__main__ import main

    bad = tmp_path / "workers.yaml"
    bad.write_text("- url: http://h:1\n  colour: blue\n")
    assert main(["proxy", "--workers-file", str(bad)]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["proxy"])
    assert info.value.code == 2
    assert "no workers: give --worker" in capsys.readouterr().err


# -- the parts alone -------------------------------------------------------------------------------


def test_a_change_made_on_another_thread_reaches_the_proxy() -> None:
    """What a replica sync does: apply a remote change from its own thread."""
    with running(2, block_size=16) as (a, b), proxy(
        ProxyConfig([WorkerSpec(a.url, a.events_endpoint, a.replay_endpoint)], **FAST_HEALTH)
    ) as server:
        m = server.proxy.fleet.membership
        remote = WorkerSpec(b.url, b.events_endpoint, b.replay_endpoint)
        t = threading.Thread(target=m.add, args=(remote,), kwargs={"source": "sync"})
        t.start()
        t.join()
        wb = m.by_url(b.url).id  # type: ignore[union-attr]
        assert wait_until(lambda: server.proxy.pool.workers.get(wb) is not None
                          and server.proxy.pool.workers[wb].healthy)  # fmt: skip
        assert b.wait_for_subscribers(1, timeout=10)
        threading.Thread(target=m.remove, args=(wb,), kwargs={"source": "sync"}).start()
        assert wait_until(lambda: server.router.workers() == [0])


def test_the_pool_follows_joins_exclusions_and_departures() -> None:
    import asyncio

    from kvroute import Router
    from kvroute.proxy.workers import WorkerPool

    async def scenario() -> None:
        router = Router(block_size=16, workers=[0])
        pool = WorkerPool(router, ProxyConfig([WorkerSpec("http://127.0.0.1:9")]))
        pool.add(5, WorkerSpec("http://127.0.0.1:10"))
        # known to the router, but no request until its health check passes
        assert router.workers() == [0, 5] and not router.load(5)["healthy"]
        assert pool.pick() == 0
        pool.mark_up(5)
        assert router.load(5)["healthy"] and {pool.pick(), pool.pick()} == {0, 5}
        pool.exclude(5)
        assert pool.pick() == 0 == pool.pick() and pool.snapshot()[1]["draining"]
        down = pool.down_future(5)
        pool.remove(5)
        assert down.done() and 5 not in pool.workers and pool.excluded == frozenset()
        assert router.workers() == [0, 5]  # the router's entry is the fleet's to remove
        # a worker that left: calls about it are no-ops, its future is done
        pool.mark_down(5, "gone")
        pool.mark_up(5)
        await pool.check(5)
        assert pool.down_future(5).done()

    asyncio.run(scenario())


def test_config_validates_the_sources_of_workers() -> None:
    config = ProxyConfig(worker_dns=["svc:8000=5557"], admin_token=TOKEN)
    assert config.worker_dns[0].events_port == 5557 and TOKEN not in repr(config)
    with pytest.raises(ValueError, match="at least one worker is needed"):
        ProxyConfig()
    with pytest.raises(ValueError, match="admin_token"):
        ProxyConfig(admin_token=" t ")
    with pytest.raises(ValueError, match="drain_timeout must be > 0"):
        ProxyConfig(admin_token="t", drain_timeout=0)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        ProxyConfig(worker_dns=["svc"])
    with pytest.raises(ValueError, match="given twice"):
        ProxyServer(ProxyConfig([WorkerSpec("http://a:1"), WorkerSpec("a:1/")]))

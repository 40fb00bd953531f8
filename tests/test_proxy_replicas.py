"""A fleet of routing proxies: real ``python -m kvroute proxy`` processes sharing one Redis.

Every test runs the synced fleet (``--sync-url``) beside a control of the
same proxies without it, and the control must fail: each replica sees every
KV event, and a late subscriber replays the engines' history, so these run
event-free (predicted residency is all a router knows of the workers'
caches), or with a replay buffer shorter than the history. The workers are
MockWorkers on loopback; the Redis server is real (``redis_server.py``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("redis")

from proxy_procs import ProxyProcess, chat, conversation, start_all, together, wait_for
from redis_server import RedisServer, redis_binary

from kvroute.testing import MockWorker

ACTIVE = "kvroute_worker_active_requests"


@contextlib.contextmanager
def mock_workers(n: int, **kw: Any) -> Iterator[list[MockWorker]]:
    workers = [MockWorker(**kw).start() for _ in range(n)]
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def fleet(
    redis_process: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """4 event-free workers; replicas a, b, c synced through Redis; x, y the unsynced control."""
    logs = tmp_path_factory.mktemp("proxies")
    url = redis_process.url(5)
    with mock_workers(4, publish_events=False, token_delay=0.02) as workers:
        urls = [w.url for w in workers]
        specs: list[tuple[list[str], list[str], Path]] = [
            (urls, ["--sync-url", url, "--replica-id", n], logs / f"{n}.log") for n in "abc"
        ]
        specs += [(urls, [], logs / f"{n}.log") for n in "xy"]
        procs = start_all(specs)
        try:
            yield {"workers": workers, "urls": urls, "redis": url, "logs": logs,
                   **dict(zip("abcxy", procs, strict=True))}  # fmt: skip
        finally:
            for p in procs:
                p.stop()


def stickiness(replicas: list[ProxyProcess], conversations: range, turns: int) -> float:
    """Turns alternate between replicas: the share of later turns on the first turn's worker."""
    first: dict[int, int] = {}
    same = total = 0
    for t in range(1, turns + 1):
        for c in conversations:
            proxy = replicas[(c + t) % len(replicas)]
            status, worker = chat(proxy, conversation(c, t))
            assert status == 200 and worker is not None
            if t == 1:
                first[c] = worker
            else:
                total += 1
                same += worker == first[c]
    return same / total


def test_a_conversation_alternating_replicas_stays_on_one_worker(fleet: dict[str, Any]) -> None:
    synced = stickiness([fleet["a"], fleet["b"], fleet["c"]], range(0, 5), turns=6)
    control = stickiness([fleet["x"], fleet["y"]], range(100, 105), turns=6)
    assert synced >= 0.9, synced
    assert control < 0.9, control


def _inflight(proxy: ProxyProcess, n: int, tag: str) -> list[threading.Thread]:
    """``n`` long requests (about 2 s each) through ``proxy``, on threads."""
    out: list[Any] = []

    def one(i: int) -> None:
        msgs = [*conversation(10_000 + i, 1), {"role": "user", "content": f"{tag} {i}"}]
        out.append(chat(proxy, msgs, max_tokens=100))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_load_through_one_replica_is_seen_by_the_others(fleet: dict[str, Any]) -> None:
    a, b, c, x, y = (fleet[k] for k in "abcxy")
    threads = _inflight(a, 6, "load")
    try:
        wait_for(lambda: sum(a.per_worker(ACTIVE).values()) == 6, what="6 requests on a")
        mine = a.per_worker(ACTIVE)
        # every replica's /metrics shows the fleet's requests per worker
        for other in (b, c):
            wait_for(lambda o=other: o.per_worker(ACTIVE) == mine, what="a's load on b and c")
            assert other.per_worker("kvroute_worker_remote_active_requests") == mine
            assert other.value("kvroute_sync_up") == 1.0
            assert other.value("kvroute_sync_replicas") >= 1
    finally:
        for t in threads:
            t.join()
    wait_for(lambda: sum(b.per_worker(ACTIVE).values()) == 0, what="finished on b too")
    # the control: x's load never shows on y
    threads = _inflight(x, 6, "control")
    try:
        wait_for(lambda: sum(x.per_worker(ACTIVE).values()) == 6, what="6 requests on x")
        time.sleep(0.3)
        assert sum(y.per_worker(ACTIVE).values()) == 0
    finally:
        for t in threads:
            t.join()


def _burst(first: ProxyProcess, siblings: list[ProxyProcess], k: int,
           propagated: bool) -> set[int]:  # fmt: skip
    """A subagent fan-out: siblings share a long new context and differ at the end.

    The context is long (12k tokens) as an agent's is: a prefix that large buys
    its worker room beyond its fair share of the load (the policy's stake), so
    siblings in flight together may all stay there.
    """
    files = "def handler(request): return respond(request.body)\n" * 240
    # its own first block: nothing any replica routed before shares a block with it
    ctx = [{"role": "system", "content": f"{k:05d} subagents of one task. " * 8},
           {"role": "user", "content": files}]  # fmt: skip
    sib = [[*ctx, {"role": "user", "content": f"subtask {i}"}] for i in range(len(siblings) + 1)]
    if propagated:
        # the first sibling runs a while; the others start once its decision reached them
        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(chat(first, sib[0], max_tokens=20)))
        t.start()
        try:
            wait_for(lambda: all(sum(s.per_worker(ACTIVE).values()) >= 1 for s in siblings)
                     or not t.is_alive(), what="the first sibling's decision")  # fmt: skip
            rest = [chat(s, m) for s, m in zip(siblings, sib[1:], strict=True)]
        finally:
            t.join()
        got = [out[0], *rest]
    else:
        # a quiet fleet (the last burst's load has reached every replica), then all at once
        everyone = [first, *siblings]
        wait_for(lambda: all(sum(p.per_worker(ACTIVE).values()) == 0 for p in everyone),
                 what="a quiet fleet")  # fmt: skip
        calls = [lambda p=p, m=m: chat(p, m) for p, m in zip(everyone, sib, strict=True)]
        got = together(calls)
    assert all(status == 200 for status, _ in got)
    return {w for _, w in got if w is not None}


@pytest.mark.parametrize("propagated", [True, False], ids=["propagated", "simultaneous"])
def test_a_subagent_burst_split_across_replicas_lands_on_one_worker(
    fleet: dict[str, Any], propagated: bool
) -> None:
    a, b, c, x, y = (fleet[k] for k in "abcxy")
    base = 0 if propagated else 100
    # Simultaneous: two siblings, each routed knowing nothing of the other. (A third
    # that hears of two full prefills of the context queued on that worker may rightly
    # go elsewhere, as it would through one router seeing the same queue.)
    others = [b, c] if propagated else [b]
    synced = [_burst(a, others, base + k, propagated) for k in range(6)]
    assert all(len(ws) == 1 for ws in synced), synced
    # the control scatters (a burst lands together by chance with probability 1/4)
    control = [_burst(x, [y], base + 50 + k, propagated) for k in range(6)]
    assert any(len(ws) > 1 for ws in control), control


def test_replicas_that_never_heard_of_each_other_agree_by_the_tie_break(
    fleet: dict[str, Any],
) -> None:
    # two synced replicas under different key prefixes: they share nothing at all
    logs: Path = fleet["logs"]
    p, q = start_all([
        (fleet["urls"], ["--sync-url", fleet["redis"], "--sync-prefix", f"iso{i}"],
         logs / f"iso{i}.log")
        for i in range(2)
    ])  # fmt: skip
    try:
        for k in range(6):
            ws = _burst(p, [q], 900 + k, propagated=False)
            assert len(ws) == 1, ws
    finally:
        p.stop()
        q.stop()


def test_a_replica_with_another_worker_list_is_refused(fleet: dict[str, Any]) -> None:
    logs: Path = fleet["logs"]
    bad = ProxyProcess(fleet["urls"][::-1], ["--sync-url", fleet["redis"]], logs / "bad.log")
    try:
        assert bad.proc.wait(30) == 2
        assert "same workers in the same order" in bad.log_text()
    finally:
        bad.stop()


# -- with KV events, and a replay buffer shorter than the history ------------------------


def test_a_late_replica_starts_warm_from_the_snapshot(
    redis_process: RedisServer, tmp_path: Path
) -> None:
    url = redis_process.url(6)
    # each request is one event batch; the engines keep only their last 4
    with mock_workers(4, token_delay=0.0, buffer_steps=4) as workers:
        urls = [f"{w.url}={w.events_endpoint},{w.replay_endpoint}" for w in workers]
        sync = ["--sync-url", url, "--sync-snapshot-interval", "0.3"]
        (a,) = start_all([(urls, [*sync, "--replica-id", "a"], tmp_path / "a.log")])
        late: list[ProxyProcess] = []
        try:
            first = {}
            for c in range(12):
                for t in (1, 2):
                    status, w = chat(a, conversation(200 + c, t))
                    assert status == 200 and w is not None
                    first.setdefault(c, w)
            for k in range(32):  # other traffic: the engines' buffers turn over
                assert chat(a, conversation(5000 + k, 1))[0] == 200
            # a snapshot written after the last batch
            n = a.value("kvroute_sync_snapshots_total")
            wait_for(lambda: a.value("kvroute_sync_snapshots_total") >= n + 2, what="a snapshot")
            late = start_all([
                (urls, [*sync, "--replica-id", "d"], tmp_path / "d.log"),
                (urls, [], tmp_path / "z.log"),  # the control: no sync
            ])  # fmt: skip
            d, z = late
            held = a.value("kvroute_index_residencies")
            wait_for(lambda: d.value("kvroute_index_residencies") == held, what="d warm")
            assert "loaded the index snapshot" in d.log_text()
            # z replayed what the buffers still had: not the conversations
            assert z.value("kvroute_index_residencies") < held
            warm = [chat(d, conversation(200 + c, 3))[1] == first[c] for c in range(6)]
            cold = [chat(z, conversation(200 + c, 3))[1] == first[c] for c in range(6, 12)]
            assert all(warm), warm
            assert not all(cold), cold
        finally:
            for p in (a, *late):
                p.stop()


def _respond(proxy: ProxyProcess, text: str, previous: str | None = None) -> tuple[int, Any, Any]:
    """One non-streamed Responses request: (status, the answer's id, the worker that served it)."""
    body: dict[str, Any] = {"model": "mock-model", "input": text, "max_output_tokens": 4}
    if previous is not None:
        body["previous_response_id"] = previous
    req = urllib.request.Request(
        proxy.url + "/v1/responses", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())["id"], int(r.headers["X-Kvroute-Worker"])
    except urllib.error.HTTPError as e:
        with e:
            e.read()
            return e.code, None, None


def test_a_late_replica_finds_a_response_made_before_it_started(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    a = fleet["a"]
    made = [_respond(a, f"question {i}: what does file_{i}.py do?") for i in range(6)]
    assert all(status == 200 for status, _, _ in made), made
    # started after the responses were made: only Redis knows where they live
    late = start_all([
        (fleet["urls"], ["--sync-url", fleet["redis"], "--replica-id", "late"], tmp_path / "d.log"),
        (fleet["urls"], [], tmp_path / "z.log"),  # the control: no sync
    ])  # fmt: skip
    try:
        d, z = late
        follow = [_respond(d, "and then?", rid) for _, rid, _ in made]
        assert [(s, w) for s, _, w in follow] == [(200, w) for _, _, w in made], follow
        control = [_respond(z, "and then?", rid) for _, rid, _ in made]
        assert [(s, w) for s, _, w in control] != [(200, w) for _, _, w in made]
    finally:
        for p in late:
            p.stop()


# -- Redis killed mid-run -----------------------------------------------------------------


def test_redis_killed_mid_run_fails_no_request_and_resyncs(tmp_path: Path) -> None:
    binary = redis_binary()
    assert binary is not None
    with RedisServer(binary) as redis, mock_workers(4, publish_events=False) as workers:
        urls = [w.url for w in workers]
        sync = ["--sync-url", redis.url(0)]
        a, b = start_all([(urls, [*sync, "--replica-id", n], tmp_path / f"{n}.log") for n in "ab"])
        try:
            stop = threading.Event()
            statuses: list[int] = []

            def traffic(proxy: ProxyProcess, base: int) -> None:
                i = 0
                while not stop.is_set():
                    statuses.append(chat(proxy, conversation(base + i % 20, 1 + i // 20 % 3))[0])
                    i += 1

            threads = [threading.Thread(target=traffic, args=(p, 700 + 100 * k))
                       for k, p in enumerate((a, b))]  # fmt: skip
            for t in threads:
                t.start()
            try:
                wait_for(lambda: len(statuses) > 20, what="traffic")
                redis.kill()
                wait_for(lambda: a.value("kvroute_sync_up") == 0 == b.value("kvroute_sync_up"),
                         what="sync_up 0")  # fmt: skip
                during = len(statuses)
                wait_for(lambda: len(statuses) > during + 20, what="traffic without Redis")
                # conversations started on a while Redis is away: b cannot know them yet
                first = {c: chat(a, conversation(400 + c, 1))[1] for c in range(12)}
                blind = [chat(b, conversation(400 + c, 2))[1] == first[c] for c in range(6, 12)]
                assert not all(blind), blind
                redis.start()  # empty: no persistence
                wait_for(lambda: a.value("kvroute_sync_up") == 1 == b.value("kvroute_sync_up"),
                         what="sync_up 1")  # fmt: skip
                after = len(statuses)
                wait_for(lambda: len(statuses) > after + 20, what="traffic with Redis back")
            finally:
                stop.set()
                for t in threads:
                    t.join()
            assert statuses and all(s == 200 for s in statuses), set(statuses)
            # a re-published what it decided meanwhile: b sends their next turns there
            nxt = {c: chat(b, conversation(400 + c, 2))[1] for c in range(6)}
            assert nxt == {c: first[c] for c in range(6)}
            assert a.log_text().count("is unreachable") == 1
            assert "is back" in a.log_text()
        finally:
            a.stop()
            b.stop()


# -- workers at run time ----------------------------------------------------------------------

TOKEN = "fleet-admin-token"


def admin(proxy: ProxyProcess, method: str, path: str, body: Any = None,
          token: str | None = TOKEN) -> tuple[int, Any]:  # fmt: skip
    """An admin API call (with the token unless ``token`` is None): status, its JSON."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(proxy.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read() or b"null")


def listed(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    """The proxy's workers by URL, as its admin API lists them."""
    status, answer = admin(proxy, "GET", "/admin/workers")
    assert status == 200, answer
    return {w["url"]: w for w in answer["workers"]}


def residencies(proxy: ProxyProcess) -> float:
    return proxy.value("kvroute_index_residencies")


def test_workers_added_drained_and_removed_at_run_time_reach_every_replica(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with mock_workers(4) as workers:
        flags = [f"{w.url}={w.events_endpoint},{w.replay_endpoint}" for w in workers[:2]]
        late, filed = workers[2], workers[3]
        files = {n: tmp_path / f"workers-{n}.json" for n in "ax"}
        for f in files.values():
            f.write_text("[]")
        common = ["--admin-token", TOKEN, "--workers-file-interval", "0.1"]
        sync = ["--sync-url", redis_server.url(3)]
        a, b, x, y = start_all([
            (flags, [*common, *sync, "--replica-id", "a", "--workers-file", str(files["a"])],
             tmp_path / "a.log"),
            (flags, [*common, *sync, "--replica-id", "b"], tmp_path / "b.log"),
            (flags, [*common, "--workers-file", str(files["x"])], tmp_path / "x.log"),
            (flags, common, tmp_path / "y.log"),
        ])  # fmt: skip
        try:
            # without the token (or with another) the admin API refuses, on every replica
            for p in (a, b):
                assert admin(p, "GET", "/admin/workers", token=None)[0] == 401
                assert admin(p, "POST", "/admin/workers", {"url": late.url}, token="no")[0] == 401
            assert late.url not in listed(b)
            spec = {"url": late.url, "events": late.events_endpoint, "replay": late.replay_endpoint}
            # one worker through a's admin API, one through a's workers file; x, y the control
            for p, f in ((a, files["a"]), (x, files["x"])):
                assert admin(p, "POST", "/admin/workers", spec)[0] == 201
                f.write_text(json.dumps([{"url": filed.url, "events": filed.events_endpoint}]))
            for p in (a, b, x):
                wait_for(lambda p=p: {late.url, filed.url} <= set(listed(p)), what="new workers")
            there = listed(b)
            assert there[late.url]["source"] == "sync" and there[filed.url]["source"] == "sync"
            ids = {there[late.url]["id"], there[filed.url]["id"]}
            assert ids == {listed(a)[late.url]["id"], listed(a)[filed.url]["id"]}
            time.sleep(0.3)
            assert not {late.url, filed.url} & set(listed(y))  # the control never hears of them
            # b routes to both, once healthy (new conversations: rendezvous-spread)
            wait_for(lambda: all(listed(b)[u]["healthy"] for u in (late.url, filed.url)),
                     what="healthy on b")  # fmt: skip
            served = {chat(b, conversation(2000 + c, 1))[1] for c in range(40)}
            assert ids <= served, served
            # the late worker drained through b: it leaves every replica, with its blocks
            wid = there[late.url]["id"]
            blocks = len(late.cached_block_hashes())
            assert blocks > 0
            time.sleep(0.3)  # the last requests' events reach both indexes
            before = {p: residencies(p) for p in (a, b)}
            taken = len(late.requests())
            status, drained = admin(b, "POST", f"/admin/workers/{wid}/drain")
            assert status == 202 and drained["state"] in ("draining", "removed")  # idle: at once
            for p in (a, b):
                wait_for(lambda p=p: late.url not in listed(p), what="drained worker gone")
                wait_for(lambda p=p: residencies(p) == before[p] - blocks,
                         what="its blocks out of the index")  # fmt: skip
            for c in range(20):
                assert chat((a, b)[c % 2], conversation(3000 + c, 1))[1] != wid
            assert len(late.requests()) == taken  # no new request after the drain
        finally:
            for p in (a, b, x, y):
                p.stop()

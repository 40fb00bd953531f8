"""Fault injection: the proxy's peers and the router's picture of the caches, made to go wrong.

Each fault is a function that starts a fleet, does something nasty to it,
measures what happened and returns a :class:`Result`: what was tried, the
counts, what held, and the recovery time. The script prints them as the
Markdown tables docs/reliability.md quotes. Two sides:

- ``proxy`` (this file): ``kvroute proxy`` in its own process, each
  :class:`~kvroute.testing.process.MockWorkerProcess` in its own; slow
  clients, huge bodies, hang-ups, a worker failing every generation,
  ``SIGKILL``, ``SIGSTOP``...
- ``state`` (scripts/_faults_state.py): :class:`~kvroute.testing.MockWorker`
  engines under a :class:`~kvroute.Router` fed by a real ZMQ subscriber; an
  engine restart, a cache reset, lost batches with and without replay, junk
  and oversized frames, another block size or hash seed, events lost
  silently, 200k sessions.

::

    python scripts/faults.py                  # every fault, the proxy's defaults
    python scripts/faults.py --side state     # one side's faults
    python scripts/faults.py sigkill restart  # some of them
    python scripts/faults.py --quick          # shorter timeouts and fewer requests
    python scripts/faults.py --list

Adding a fault: write ``def my_fault(opts: Options) -> Result`` using
:class:`Fleet` (``Fleet(n, events=True)`` gives workers that publish KV
events, wired to the proxy with their event and replay endpoints) or
:class:`~kvroute.testing.StateFleet`, decorate it with ``@fault("my-fault")``
(``side="state"`` for the router's side), and it runs with the others
(scripts/_faults_base.py holds the registry). The fast, deterministic
versions of these cases are the tests (tests/test_proxy_*.py,
tests/test_state_faults.py); this script is for the long runs and the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _faults_base import FAULTS, SIDES, Options, Result, fault, table, timed  # noqa: E402

from kvroute.testing.process import MockWorkerProcess  # noqa: E402

MODEL = "mock-model"


# -- HTTP and metrics helpers ------------------------------------------------------------------


def http(
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    raw: bytes | None = None,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes, float]:
    """GET (no body) or POST JSON; ``(status, headers, body, seconds)``, errors included."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json", **(headers or {})} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers={**hdrs, **(headers or {})})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            out = e.code, dict(e.headers), e.read()
    except OSError as e:
        out = 0, {}, str(e).encode()
    return (*out, time.perf_counter() - t0)


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(url: str) -> dict[str, float]:
    """A Prometheus endpoint's samples: ``'name{labels}' -> value`` (and ``name`` alone)."""
    status, _, body, _ = http(url + "/metrics", timeout=10)
    out: dict[str, float] = {}
    if status != 200:
        return out
    for line in body.decode().splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        with contextlib.suppress(ValueError):
            out[name + labels] = float(value)
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """One sample (0.0 when absent); labels in any order."""
    want = set(f'{k}="{v}"' for k, v in labels.items())
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and set(filter(None, rest.rstrip("}").split(","))) == want:
            return value
    return 0.0


def wait(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> float | None:
    """Seconds until ``cond()`` held, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the fleet ---------------------------------------------------------------------------------


class Fleet:
    """``n`` mock-worker processes behind a ``kvroute proxy`` process.

    :param n: workers.
    :param proxy_args: more ``kvroute proxy`` arguments.
    :param events: workers publish KV events (and the proxy subscribes).
    :param worker_kw: :class:`MockWorkerProcess` arguments, for every worker
        (a callable: per worker index).
    """

    def __init__(
        self,
        n: int,
        proxy_args: Sequence[str] = (),
        *,
        events: bool = False,
        worker_kw: dict[str, Any] | Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        self.n = n
        self.proxy_args = list(proxy_args)
        self.events = events
        self._worker_kw = worker_kw
        self.workers: list[MockWorkerProcess] = []
        self.proxy: subprocess.Popen[str] | None = None
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log: list[str] = []

    def __enter__(self) -> Fleet:
        try:
            for i in range(self.n):
                kw = self._worker_kw(i) if callable(self._worker_kw) else (self._worker_kw or {})
                kw = {"publish_events": self.events, **kw}
                self.workers.append(MockWorkerProcess(**kw).start())
            self.start_proxy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def worker_arg(self, w: MockWorkerProcess) -> str:
        if not self.events or w.events_endpoint is None:
            return w.url
        replay = f",{w.replay_endpoint}" if w.replay_endpoint else ""
        return f"{w.url}={w.events_endpoint}{replay}"

    def start_proxy(self, timeout: float = 30.0) -> None:
        args = [
            sys.executable,
            "-m",
            "kvroute",
            "proxy",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        for w in self.workers:
            args += ["--worker", self.worker_arg(w)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proxy = subprocess.Popen(
            args + self.proxy_args,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._drain, args=(self.proxy,), daemon=True).start()
        if wait(lambda: http(self.url + "/health", timeout=2)[0] == 200, timeout) is None:
            raise RuntimeError("the proxy did not start:\n" + "".join(self._log[-30:]))

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._log.append(line)
            del self._log[:-500]

    def __exit__(self, *exc: object) -> None:
        if self.proxy is not None:
            self.proxy.send_signal(signal.SIGTERM)
            try:
                self.proxy.wait(30)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        for w in self.workers:
            w.stop()

    @property
    def proxy_pid(self) -> int:
        assert self.proxy is not None
        return self.proxy.pid

    def fds(self) -> int:
        """Open file descriptors of the proxy process."""
        return len(os.listdir(f"/proc/{self.proxy_pid}/fd"))

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)

    def health(self) -> dict[str, Any]:
        status, _, body, _ = http(self.url + "/health", timeout=10)
        return json.loads(body) if status in (200, 503) else {}

    def worker_state(self, i: int) -> str:
        workers = self.health().get("workers") or []
        return str(workers[i].get("state", "healthy" if workers[i]["healthy"] else "unhealthy"))

    def log_tail(self, n: int = 20) -> str:
        return "".join(self._log[-n:])


def _completion(prompt: Sequence[int], max_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": list(prompt), "max_tokens": max_tokens, **kw}


def _chat(i: int, max_tokens: int) -> dict[str, Any]:
    system = "You are a careful coding agent. Follow the repository's style guide. " * 8
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": f"step {i}: edit the file and run tests"},
    ]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens}


def _fmt(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f} s"


# -- proxy-side faults -------------------------------------------------------------------------


@fault("slow-clients")
def slow_clients(opts: Options) -> Result:
    """100 connections trickling a byte a second: 50 partial headers, 50 partial bodies."""
    header_t, body_t = (2.0, 4.0) if opts.quick else (10.0, 60.0)
    flags = ["--header-timeout", str(header_t), "--body-timeout", str(body_t)]
    with Fleet(1, flags) as fleet:
        base_fds = fleet.fds()
        host, port = "127.0.0.1", fleet.port
        socks: list[tuple[str, socket.socket]] = []
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 10_000
        body_head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        for i in range(100):
            s = socket.create_connection((host, port))
            s.setblocking(False)
            kind = "headers" if i % 2 == 0 else "body"
            if kind == "body":
                s.sendall(body_head)
            socks.append((kind, s))
        closed: dict[int, float] = {}
        answers: dict[int, bytes] = {}
        peak = fleet.fds()
        t0 = time.monotonic()
        sel = selectors.DefaultSelector()
        for i, (_, s) in enumerate(socks):
            sel.register(s, selectors.EVENT_READ, i)
        sent = 0
        health: list[float] = []
        while len(closed) < len(socks) and time.monotonic() - t0 < body_t + 30:
            for i, (kind, s) in enumerate(socks):
                if i in closed:
                    continue
                with contextlib.suppress(OSError):
                    s.send(
                        head[sent % len(head) : sent % len(head) + 1] if kind == "headers" else b" "
                    )
            sent += 1
            peak = max(peak, fleet.fds())
            health.append(http(fleet.url + "/health", timeout=10)[3])
            deadline = time.monotonic() + 1.0
            while (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    i = key.data
                    try:
                        data = socks[i][1].recv(65536)
                    except OSError:
                        data = b""
                    answers[i] = answers.get(i, b"") + data
                    if not data and i not in closed:
                        closed[i] = time.monotonic() - t0
                        sel.unregister(socks[i][1])
        for _, s in socks:
            s.close()
        after = wait(lambda: fleet.fds() <= base_fds + 2, 10)
        end_fds = fleet.fds()
        heads = [closed[i] for i in closed if socks[i][0] == "headers"]
        bodies = [closed[i] for i in closed if socks[i][0] == "body"]
        timed_408 = sum(1 for a in answers.values() if a.startswith(b"HTTP/1.1 408"))
        m = fleet.metrics()
        ok_request = http(fleet.url + "/v1/completions", _completion([1, 2, 3], 1))[0] == 200
    ok = len(closed) == 100 and after is not None and ok_request
    return Result(
        "slow-clients",
        "proxy",
        f"100 connections at 1 byte/s (50 partial headers, 50 partial bodies);"
        f" --header-timeout {header_t:g} --body-timeout {body_t:g}",
        f"closed by the proxy: {len(heads)}/50 headers, {len(bodies)}/50 bodies ({timed_408}"
        f" answered 408); proxy fds {base_fds} -> {peak} -> {end_fds};"
        f" /health max {max(health) * 1000:.0f} ms meanwhile",
        "every slow connection cut; fds back to baseline; a normal request served"
        if ok
        else "NOT ALL HELD",
        f"headers cut at {max(heads, default=0):.1f} s, bodies at {max(bodies, default=0):.1f} s",
        ok,
        {
            "closed": len(closed),
            "fds": [base_fds, peak, end_fds],
            "timeouts": {
                k: metric(m, "kvroute_proxy_client_timeouts_total", phase=k)
                for k in ("headers", "body")
            },
        },
    )


@fault("connection-flood")
def connection_flood(opts: Options) -> Result:
    """150 idle connections against --max-connections 100."""
    with Fleet(1, ["--max-connections", "100"]) as fleet:
        base = fleet.fds()
        socks = [socket.create_connection(("127.0.0.1", fleet.port)) for _ in range(150)]
        refused = 0
        for s in socks[100:]:
            s.settimeout(5)
            with contextlib.suppress(OSError):
                if s.recv(65536).startswith(b"HTTP/1.1 503"):
                    refused += 1
        time.sleep(0.2)  # the refused ones' closing completes
        peak = fleet.fds()
        for s in socks:
            s.close()
        back = wait(lambda: fleet.fds() <= base + 2, 10)
        ok_request = http(fleet.url + "/v1/completions", _completion([1, 2, 3], 1))[0] == 200
        m = fleet.metrics()
    ok = refused == 50 and peak <= base + 101 and back is not None and ok_request
    return Result(
        "connection-flood",
        "proxy",
        "150 idle connections, --max-connections 100",
        f"{refused}/50 refused with 503 at once; proxy fds {base} -> {peak};"
        f" refused counter {metric(m, 'kvroute_proxy_connections_refused_total'):.0f}",
        "the cap held; served again once they closed" if ok else "NOT ALL HELD",
        f"fds back in {_fmt(back)}",
        ok,
    )


def _token_body(mib: float) -> bytes:
    import random

    rng = random.Random(0)
    n = int(mib * (1 << 20) / 7)
    return json.dumps(_completion([rng.randrange(150_000) for _ in range(n)], 1)).encode()


@fault("big-bodies")
def big_bodies(opts: Options) -> Result:
    """Three concurrent 27 MiB token-id prompts while /health and /v1/models are timed."""
    mib = 8.0 if opts.quick else 27.0
    raw = _token_body(mib)
    tokens = raw.count(b",") - 1  # the prompt's ids ("model", "max_tokens" aside)
    with Fleet(1) as fleet:
        http(fleet.url + "/v1/completions", _completion([1, 2, 3], 1))  # warm
        idle = [http(fleet.url + "/health")[3] for _ in range(20)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            bigs = [
                pool.submit(http, fleet.url + "/v1/completions", raw=raw, timeout=300)
                for _ in range(3)
            ]
            during: list[float] = []
            models: list[float] = []
            while not all(f.done() for f in bigs):
                during.append(http(fleet.url + "/health")[3])
                models.append(http(fleet.url + "/v1/models")[3])
                time.sleep(0.01)
            statuses = [f.result()[0] for f in bigs]
    worst = max(during, default=0.0)
    ok = worst < 0.2 and all(s in (200, 400) for s in statuses)
    median = sorted(during)[len(during) // 2] if during else 0.0
    return Result(
        "big-bodies",
        "proxy",
        f"3 concurrent {len(raw) / (1 << 20):.0f} MiB token-id prompts ({tokens / 1e6:.1f}M ids"
        " each); /health and /v1/models polled meanwhile",
        f"/health: idle max {max(idle) * 1000:.0f} ms, during max {worst * 1000:.0f} ms"
        f" (median {median * 1000:.0f} ms, {len(during)} probes); /v1/models during max"
        f" {max(models, default=0) * 1000:.0f} ms; big answers {statuses} (the worker's"
        " context limit)",
        "the proxy's loop stayed responsive" if ok else "STALLED",
        "-",
        ok,
        {"health_ms_max": worst * 1000, "models_ms_max": max(models, default=0) * 1000},
    )


def _hangup(opts: Options, stream: bool) -> Result:
    name = "hangup-stream" if stream else "hangup-json"
    with Fleet(1, worker_kw={"token_delay": 0.02}) as fleet:
        worker_url = fleet.workers[0].url
        before = metric(scrape(worker_url), "vllm:generation_tokens_total", model_name=MODEL)
        body = json.dumps(_completion(range(1, 65), 100, stream=stream)).encode()
        s = socket.create_connection(("127.0.0.1", fleet.port))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        time.sleep(0.7)
        t_close = time.monotonic()
        s.close()

        def idle() -> bool:
            m = scrape(worker_url)
            return metric(m, "vllm:num_requests_running", model_name=MODEL) == 0

        stopped = wait(idle, 10)
        released = wait(
            lambda: metric(fleet.metrics(), "kvroute_worker_active_requests", worker="0") == 0,
            5,
        )
        time.sleep(0.3)
        tokens = metric(scrape(worker_url), "vllm:generation_tokens_total", model_name=MODEL)
        generated = tokens - before
        m = fleet.metrics()
        stage = "streaming" if stream else "waiting"
        counted = metric(
            m, "kvroute_proxy_client_disconnects_total", endpoint="/v1/completions", stage=stage
        )
    ok = generated < 60 and stopped is not None and counted == 1
    return Result(
        name,
        "proxy",
        f"a {'streamed' if stream else 'JSON'} 100-token request (20 ms/token); the client"
        " closes its socket at 0.7 s",
        f"the worker generated {generated:.0f} of 100 tokens; hang-ups counted: {counted:.0f}",
        "the worker's request aborted; the load released" if ok else "NOT ALL HELD",
        f"worker stopped {_fmt(stopped)} after the hang-up; load released {_fmt(released)}",
        ok,
        {"generated": generated, "since_close": time.monotonic() - t_close},
    )


@fault("hangup-json")
def hangup_json(opts: Options) -> Result:
    """A client hanging up on a non-streaming request."""
    return _hangup(opts, stream=False)


@fault("hangup-stream")
def hangup_stream(opts: Options) -> Result:
    """A client hanging up on a stream."""
    return _hangup(opts, stream=True)


def _wave(url: str, wave: int, n: int = 40) -> list[tuple[int, str]]:
    def one(i: int) -> tuple[int, str]:
        status, headers, _, _ = http(
            url + "/v1/completions",
            _completion([wave, i, *range(40)], 2),
            {"X-Session-Id": f"s{i}"},
        )
        return status, headers.get("X-Kvroute-Worker", "-")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


@fault("worker-5xx")
def worker_5xx(opts: Options) -> Result:
    """A worker answering 500 to every generation while its /health answers 200."""
    ejection = 2.0 if opts.quick else 10.0
    kw = {"fail_next": (100_000, 500)}
    with Fleet(
        3, ["--ejection-time", str(ejection)], worker_kw=lambda i: kw if i == 2 else {}
    ) as fleet:
        attempts: list[int] = []
        errors = 0
        for wave in range(3):
            before = metric(fleet.metrics(), "kvroute_upstream_errors_total", worker="2")
            results = _wave(fleet.url, wave)
            errors += sum(1 for s, _ in results if s != 200)
            after = metric(fleet.metrics(), "kvroute_upstream_errors_total", worker="2")
            attempts.append(int(after - before))
        m = fleet.metrics()
        ejections = metric(m, "kvroute_worker_ejections_total", worker="2")
        state = fleet.worker_state(2)
        # The worker recovers (restarted without its failures): probed back once the time is up.
        bad = fleet.workers[2]
        bad.stop()
        bad.fail_next = None
        bad.start()
        t0 = time.monotonic()

        def serves_again() -> bool:
            return any(w == "2" for _, w in _wave(fleet.url, 9, 8))

        back = wait(serves_again, ejection * 4 + 10, step=0.2)
        recovered = None if back is None else time.monotonic() - t0
    ok = errors == 0 and attempts[0] <= 10 and attempts[1] == 0 and attempts[2] == 0
    return Result(
        "worker-5xx",
        "proxy",
        f"1 of 3 workers answers 500 to every generation, /health 200; 3 waves of 40 requests;"
        f" --ejection-time {ejection:g}",
        f"attempts on it per wave: {attempts}; client errors: {errors}; ejections:"
        f" {ejections:.0f}; /health state: {state}",
        "ejected after 5 failures in a row; no client saw an error" if ok else "NOT ALL HELD",
        f"healed worker served again {_fmt(recovered)} after its restart",
        ok,
        {"attempts": attempts},
    )


def _run_requests(
    url: str, n: int, threads: int, body: Callable[[int], dict[str, Any]], path: str
) -> tuple[concurrent.futures.ThreadPoolExecutor, list[concurrent.futures.Future[Any]]]:
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    futures = [
        pool.submit(http, url + path, body(i), {"X-Session-Id": f"agent-{i % 6}"}) for i in range(n)
    ]
    return pool, futures


def _busy_worker(fleet: Fleet) -> int | None:
    for i, w in enumerate(fleet.workers):
        if metric(scrape(w.url), "vllm:num_requests_running", model_name=MODEL) >= 1:
            return i
    return None


@fault("sigkill")
def sigkill(opts: Options) -> Result:
    """SIGKILL a worker while it serves; restart it."""
    n = 30 if opts.quick else 60
    with Fleet(3, worker_kw={"token_delay": 0.01}) as fleet:
        pool, futures = _run_requests(
            fleet.url, n, 8, lambda i: _chat(i, 40), "/v1/chat/completions"
        )
        victim = None
        if wait(lambda: _busy_worker(fleet) is not None, 20) is not None:
            victim = _busy_worker(fleet)
        assert victim is not None, "no worker got busy"
        t_kill = time.monotonic()
        fleet.workers[victim].kill()
        marked = wait(lambda: fleet.worker_state(victim) != "healthy", 30)
        results = [f.result() for f in futures]
        pool.shutdown()
        errors = sum(1 for r in results if r[0] != 200)
        worst = max(r[3] for r in results)
        fleet.workers[victim].start()
        t_up = time.monotonic()
        healthy = wait(lambda: fleet.worker_state(victim) == "healthy", 30)
        m = fleet.metrics()
        retries = metric(m, "kvroute_proxy_retries_total")
    ok = errors == 0
    return Result(
        "sigkill",
        "proxy",
        f"SIGKILL 1 of 3 workers while {n} chat requests run (8 at a time); restart it",
        f"client errors: {errors}/{n}; retries: {retries:.0f}; slowest request {worst:.2f} s",
        "every request answered 200 (in-flight ones retried elsewhere)" if ok else "ERRORS",
        f"marked unhealthy {_fmt(marked)} after the kill; healthy {_fmt(healthy)} after the"
        " restart",
        ok,
        {"since_kill": time.monotonic() - t_kill, "since_up": time.monotonic() - t_up},
    )


@fault("sigkill-stream")
def sigkill_stream(opts: Options) -> Result:
    """SIGKILL a worker while 8 streams run on it: the streams go on from the other one."""
    with Fleet(2, worker_kw={"token_delay": 0.05}) as fleet:
        body = _completion(range(100, 180), 60, stream=True)

        def stream(i: int) -> tuple[bool, int, str]:
            req = urllib.request.Request(
                fleet.url + "/v1/completions",
                data=json.dumps({**body, "prompt": [i, *body["prompt"]]}).encode(),
                headers={"Content-Type": "application/json"},
            )
            pieces, ids, done, error = 0, set(), False, False
            with urllib.request.urlopen(req, timeout=60) as r:
                worker = r.headers.get("X-Kvroute-Worker", "-")
                for line in r:
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b"data: "):
                        obj = json.loads(line[6:])
                        error = error or "error" in obj
                        ids.add(obj.get("id"))
                        pieces += sum(1 for c in obj.get("choices") or [] if c.get("text"))
            whole = done and not error and pieces == 60 and len(ids) == 1
            return whole, pieces, worker

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stream, i) for i in range(8)]
            wait(lambda: _busy_worker(fleet) is not None, 20)
            time.sleep(0.5)  # some tokens out
            victim = _busy_worker(fleet)
            assert victim is not None
            fleet.workers[victim].kill()
            results = [f.result() for f in futures]
        on_victim = [r for r in results if r[2] == str(victim)]
        m = fleet.metrics()
        continued = metric(m, "kvroute_proxy_migrations_total", outcome="continued")
    whole = sum(1 for r in on_victim if r[0])
    ok = whole == len(on_victim)
    return Result(
        "sigkill-stream",
        "proxy",
        "SIGKILL 1 of 2 workers 0.5 s into 8 streams of 60 tokens (token-id prompts)",
        f"streams on the killed worker: {len(on_victim)}; arrived whole (one id, 60 tokens,"
        f" [DONE], no error): {whole}; migrations counted: {continued:.0f}",
        "every broken stream was continued on the other worker" if ok else "NOT ALL HELD",
        "-",
        ok,
    )


@fault("sigstop")
def sigstop(opts: Options) -> Result:
    """SIGSTOP a worker while it serves (the default health checks find it); SIGCONT it."""
    n = 30 if opts.quick else 60
    with Fleet(3, worker_kw={"token_delay": 0.01}) as fleet:
        pool, futures = _run_requests(
            fleet.url, n, 8, lambda i: _chat(i, 40), "/v1/chat/completions"
        )
        wait(lambda: _busy_worker(fleet) is not None, 20)
        victim = _busy_worker(fleet)
        assert victim is not None
        fleet.workers[victim].pause()
        marked = wait(lambda: fleet.worker_state(victim) != "healthy", 60)
        results = [f.result() for f in futures]
        pool.shutdown()
        errors = sum(1 for r in results if r[0] != 200)
        worst = max(r[3] for r in results)
        fleet.workers[victim].resume()
        healthy = wait(lambda: fleet.worker_state(victim) == "healthy", 30)
    ok = errors == 0 and marked is not None
    return Result(
        "sigstop",
        "proxy",
        f"SIGSTOP 1 of 3 workers while {n} chat requests run; SIGCONT it"
        " (health checks: every 2 s, 2 failures, 2 s timeout)",
        f"client errors: {errors}/{n}; slowest request {worst:.2f} s",
        "every request answered 200 (the hung worker's failed over once it was marked down)"
        if ok
        else "NOT ALL HELD",
        f"marked unhealthy {_fmt(marked)} after the stop; healthy {_fmt(healthy)} after SIGCONT",
        ok,
    )


@fault("sigstop-deadline")
def sigstop_deadline(opts: Options) -> Result:
    """A request to a frozen worker bounded by its deadline instead of the health checks."""
    with Fleet(1, ["--health-interval", "30"], worker_kw={"token_delay": 0.01}) as fleet:
        fleet.workers[0].pause()
        status, _, _, seconds = http(
            fleet.url + "/v1/completions",
            _completion([1, 2, 3], 5),
            {"X-Kvroute-Deadline": "2"},
            timeout=30,
        )
        fleet.workers[0].resume()
        m = fleet.metrics()
        counted = metric(m, "kvroute_proxy_deadlines_exceeded_total", stage="waiting")
    ok = status == 504 and seconds < 3
    return Result(
        "sigstop-deadline",
        "proxy",
        "a request with X-Kvroute-Deadline: 2 to a SIGSTOPped worker (health checks every 30 s)",
        f"answered {status} after {seconds:.2f} s; deadlines counted: {counted:.0f}",
        "the deadline bounded the wait" if ok else "NOT HELD",
        "-",
        ok,
    )


# -- the command --------------------------------------------------------------------------------

# The state side's faults register themselves beside the proxy's (after them, in table order).
import _faults_state  # noqa: E402, F401


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python scripts/faults.py", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("faults", nargs="*", help="faults to run (default: all)")
    p.add_argument("--quick", action="store_true", help="shorter timeouts, fewer requests")
    p.add_argument("--side", choices=SIDES, help="only this side's faults")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (side, fn) in FAULTS.items():
            print(f"{name:18} {side:6} {(fn.__doc__ or '').strip()}")
        return 0
    names = args.faults or [n for n, (s, _) in FAULTS.items() if not args.side or s == args.side]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        p.error(f"unknown faults: {', '.join(unknown)} (see --list)")
    opts = Options(quick=args.quick)
    results = []
    for name in names:
        side, fn = FAULTS[name]
        with timed(name):
            try:
                results.append(fn(opts))
            except Exception as e:  # a fault that crashes is a row too
                results.append(
                    Result(name, side, "-", "-", f"CRASHED: {type(e).__name__} {e}", ok=False)
                )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

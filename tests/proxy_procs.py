"""Real ``python -m kvroute proxy`` processes for the replica tests (no tests here).

Each proxy is its own interpreter: its own router, index, load and policy.
Replicas of one fleet share nothing but the Redis server named by
``--sync-url``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProxyProcess:
    """``python -m kvroute proxy`` on a free loopback port, its log in ``log``.

    :param workers: the ``--worker`` arguments.
    :param args: further arguments (``--sync-url ...``).
    :param log: where its stderr goes.
    """

    def __init__(self, workers: Sequence[str], args: Sequence[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "kvroute", "proxy", "--port", str(self.port),
               "--health-interval", "0.2", "--health-timeout", "0.5",
               "--log-level", "info"]  # fmt: skip
        for w in workers:
            cmd += ["--worker", w]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("KVROUTE_SYNC_URL", None)
        self._err = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*cmd, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self._err
        )

    def wait_ready(self, timeout: float = WAIT) -> ProxyProcess:
        """Wait until ``/health`` answers 200.

        :raises AssertionError: it exited or never became ready (its log attached).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"proxy never became ready:\n{self.log_text()}")

    def log_text(self) -> str:
        self._err.flush()
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics``: (name, sorted labels) -> value."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def per_worker(self, name: str) -> dict[int, float]:
        """One per-worker series of ``/metrics``: worker -> value."""
        return {
            int(dict(labels)["worker"]): v
            for (n, labels), v in self.metrics().items()
            if n == name and "worker" in dict(labels)
        }

    def value(self, name: str) -> float:
        """An unlabelled sample of ``/metrics`` (0.0 if absent)."""
        return self.metrics().get((name, ()), 0.0)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._err.close()


def start_all(specs: Iterable[tuple[Sequence[str], Sequence[str], Path]]) -> list[ProxyProcess]:
    """Start several proxies at once and wait for all (they import in parallel)."""
    procs = [ProxyProcess(*s) for s in specs]
    try:
        for p in procs:
            p.wait_ready()
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def chat(proxy: ProxyProcess, messages: list[dict[str, Any]], *, max_tokens: int = 4,
         headers: dict[str, str] | None = None) -> tuple[int, int | None]:  # fmt: skip
    """One chat completion through ``proxy``: (status, the worker that served it)."""
    body = json.dumps({"model": "mock-model", "messages": messages, "max_tokens": max_tokens})
    req = urllib.request.Request(
        proxy.url + "/v1/chat/completions",
        data=body.encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status, int(r.headers["X-Kvroute-Worker"])
    except urllib.error.HTTPError as e:
        with e:
            e.read()
            return e.code, None
    except (urllib.error.URLError, OSError):
        return 599, None


def together(calls: list[Any]) -> list[Any]:
    """Run the zero-argument ``calls`` at the same moment (a barrier), return their results."""
    barrier = threading.Barrier(len(calls))

    def go(fn: Any) -> Any:
        barrier.wait()
        return fn()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(go, calls))


def conversation(c: int, turns: int) -> list[dict[str, Any]]:
    """Conversation ``c`` after ``turns`` user turns: its own system prompt (a new prefix).

    The number comes first, so no two conversations share even their first
    KV block (a router that knows nothing of one has no reason to prefer a worker).
    """
    system = f"{c:05d} conversation. You are a careful coding agent; follow the style guide. " * 6
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for t in range(turns):
        if t:
            msgs.append({"role": "assistant", "content": f"reply {t}"})
        msgs.append({"role": "user", "content": f"step {t}: edit the file and run the tests"})
    return msgs


def wait_for(pred: Any, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout} s")
        time.sleep(0.02)

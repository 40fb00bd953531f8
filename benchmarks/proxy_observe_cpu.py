"""The proxy's own CPU per streamed request, with the access log on and off, side by side.

Starts two MockWorkers (no KV events, no token delay) in this process and
the proxy (``python -m kvroute proxy``) as a subprocess, sends ``--requests``
streamed chat requests (``--tokens`` output tokens each) from ``--clients``
concurrent clients, and reads the proxy process's user + system CPU time
from ``/proc`` before and after. Runs alternate between the configurations
(``--access-log stderr`` to /dev/null, and ``--access-log off``; the request
metrics are always on), ``--rounds`` times each, each in a fresh proxy.

    python benchmarks/proxy_observe_cpu.py [--requests 400] [--clients 16] [--rounds 3]
    python benchmarks/proxy_observe_cpu.py --baseline /path/to/older/checkout

``--baseline DIR`` adds a third configuration: the proxy of the kvroute
checkout in DIR (its extensions built), run without the access-log flag (a
version from before it, say), to show what observing costs in all.

Not measured: the workers' and the client's CPU (they run in this process),
tracing (off), and anything that only shows with a real engine's latency.
Linux only (``/proc/PID/stat``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvroute.testing import MockWorker  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, tokens: int, i: int) -> None:
    body = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": f"request {i}: " + "word " * 64}],
        "max_tokens": tokens,
        "stream": True,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def run_once(workers: list[MockWorker], access_log: str, a: argparse.Namespace) -> float:
    """CPU seconds per request of one fresh proxy."""
    port = _free_port()
    args = [sys.executable, "-m", "kvroute", "proxy", "--port", str(port), "--log-level", "warning"]
    root = ROOT
    if access_log == "baseline":
        root = Path(a.baseline)
    else:
        args += ["--access-log", access_log]
    for w in workers:
        args += ["--worker", w.url]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(args, env=env, stderr=devnull, stdout=devnull)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(url + "/health", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.05)
            with ThreadPoolExecutor(a.clients) as pool:  # warm up
                list(pool.map(lambda i: _request(url, a.tokens, i), range(a.clients * 2)))
            before = _cpu_seconds(proc.pid)
            with ThreadPoolExecutor(a.clients) as pool:
                list(pool.map(lambda i: _request(url, a.tokens, i), range(a.requests)))
            return (_cpu_seconds(proc.pid) - before) / a.requests
        finally:
            proc.terminate()
            proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", metavar="DIR", help="also run the proxy of this checkout")
    a = p.parse_args(argv)
    workers = [MockWorker(publish_events=False, token_delay=0.0).start() for _ in range(2)]
    results: dict[str, list[float]] = {"stderr": [], "off": []}
    if a.baseline:
        results["baseline"] = []
    try:
        for _ in range(a.rounds):
            for access_log in results:
                results[access_log].append(run_once(workers, access_log, a))
    finally:
        for w in workers:
            w.stop()
    print(f"proxy CPU per streamed request ({a.tokens} tokens, {a.clients} clients,"
          f" {a.requests} requests, median of {a.rounds})")  # fmt: skip
    for access_log, values in results.items():
        ms = [v * 1000 for v in values]
        name = "baseline" if access_log == "baseline" else f"--access-log {access_log}"
        print(f"  {name:<20} {statistics.median(ms):6.3f} ms"
              f"  (runs: {', '.join(f'{m:.3f}' for m in ms)})")  # fmt: skip
    on, off = statistics.median(results["stderr"]), statistics.median(results["off"])
    print(f"  access log on / off: {on / off:.3f}")
    if a.baseline:
        print(f"  access log on / baseline: {on / statistics.median(results['baseline']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

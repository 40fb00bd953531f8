"""``kvroute mock-worker``: a MockWorker from the command line, printing its addresses.

The real entry point (``python -m kvroute mock-worker``) runs in a
subprocess on free loopback ports; it must answer HTTP, publish KV events a
subscriber can read, exit 0 on SIGINT and SIGTERM with its ports released,
and exit 2 naming the problem when a port is taken.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("zmq")

from kvroute import Request, Router
from kvroute.testing.cli import configure, worker_options

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start(args: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
    """``kvroute mock-worker ARGS`` in a subprocess; its first three output lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvroute", "mock-worker", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    return proc, lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_it_serves_prints_its_addresses_and_stops_cleanly(sig: signal.Signals) -> None:
    http, events, replay = free_ports(3)
    proc, lines = start(["--port", str(http), "--events-port", str(events),
                         "--replay-port", str(replay), "--model", "tiny",
                         "--token-delay", "0", "--prefill-speed", "0"])  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http}"
        ev, rp = f"tcp://127.0.0.1:{events}", f"tcp://127.0.0.1:{replay}"
        assert lines[0].startswith(f"mock-worker {url}: serving 'tiny'"), lines
        assert lines[1].strip() == f"KV events: {ev}, replay: {rp}"
        assert lines[2].strip() == f"for the proxy: --worker {url}={ev},{rp}"
        # Its events reach a subscriber, keyed so the router matches the prompt.
        from kvroute.events import ZmqSubscriber

        router = Router(block_size=16, workers=[0])
        sub = ZmqSubscriber(router).start()
        try:
            sub.subscribe(0, ev, rp)
            prompt = list(range(1, 65))
            # two prompts: the second's batch reveals the first's if the
            # subscription was late, and the subscriber replays it
            for p in (prompt, [7] * 32):
                body = json.dumps({"model": "tiny", "prompt": p, "max_tokens": 2}).encode()
                req = urllib.request.Request(url + "/v1/completions", body,
                                             {"Content-Type": "application/json"})  # fmt: skip
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert json.loads(r.read())["usage"]["completion_tokens"] == 2
            assert sub.wait_for(lambda s: 0 in s and s[0].last_seq >= 1, timeout=10)
        finally:
            sub.stop()
        assert router.route(Request("r", tokens=prompt)).matched_blocks == 4
    finally:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopping" in out
    # Nothing listens on its ports any more.
    for port in (http, events, replay):
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))


def test_a_taken_port_exits_2_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        events, replay = free_ports(2)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-m", "kvroute", "mock-worker", "--port", str(port),
             "--events-port", str(events), "--replay-port", str(replay)],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("kvroute mock-worker: error:")
    assert re.search(rf"\b{port}\b|address already in use", done.stderr, re.I), done.stderr


def test_options_map_to_the_workers_settings() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    opts = worker_options(parser.parse_args(
        ["--block-size", "32", "--num-blocks", "64", "--token-delay", "0.5",
         "--lora-adapter", "a", "--lora-adapter", "b", "--max-tokens", "4"]))  # fmt: skip
    assert (opts["block_size"], opts["num_blocks"], opts["token_delay"]) == (32, 64, 0.5)
    assert opts["lora_adapters"] == ("a", "b") and opts["default_max_tokens"] == 4
    assert opts["prefill_delay_per_token"] == pytest.approx(1e-5)
    for bad in (["--token-delay", "-1"], ["--block-size", "0"], ["--prefill-speed", "inf"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)

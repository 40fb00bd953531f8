"""docs/quickstart.md runs as written: its commands start a fleet, its snippets print what it shows.

The page's ``sh`` blocks that start ``python -m kvroute ...`` are run as
subprocesses (the mock workers, then the proxy), its ``python`` blocks in
turn in fresh interpreters, each compared with the ``text`` block after it:
the workers' printed addresses exactly, the proxy's log line as a part of
its log, each snippet's output exactly. The page names fixed ports; the test
gives each its own free port, the same everywhere on the page.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("zmq")
pytest.importorskip("openai")
pytest.importorskip("anthropic")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "quickstart.md"
FENCE = re.compile(r"^```(\S*)[ \t]*(.*)$")
COMMAND = re.compile(r"^python -m kvroute (mock-worker|proxy)\b")
#: The threads reading a process's stderr, by pid (joined before its pipes close).
READERS: dict[int, list[threading.Thread]] = {}


@dataclass
class Block:
    lang: str
    code: str


def blocks(text: str) -> list[Block]:
    """The page's fenced blocks, in order."""
    out: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        out.append(Block(m.group(1), "\n".join(lines[i + 1 : end])))
        i = end + 1
    return out


def commands(code: str) -> list[str]:
    """The ``python -m kvroute ...`` commands of a shell block (continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip().rstrip("&").strip() for line in joined.splitlines()
            if COMMAND.match(line.strip())]  # fmt: skip


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Page:
    """The page with its ports replaced by free ones."""

    def __init__(self, text: str) -> None:
        port = r"(?:--port |--events-port |--replay-port |127\.0\.0\.1:)(\d{4,5})\b"
        fixed = sorted({int(p) for p in re.findall(port, text)})
        self.ports = dict(zip(fixed, free_ports(len(fixed)), strict=True))
        self.blocks = [Block(b.lang, self.sub(b.code)) for b in blocks(text)]

    def sub(self, text: str) -> str:
        for old, new in self.ports.items():
            text = re.sub(rf"(?<!\d){old}(?!\d)", str(new), text)
        return text


def test_the_page_has_what_the_test_runs() -> None:
    page = Page(PAGE.read_text(encoding="utf-8"))
    cmds = [c for b in page.blocks if b.lang == "sh" for c in commands(b.code)]
    assert [c.split()[3] for c in cmds] == ["mock-worker", "mock-worker", "proxy"]
    assert sum(b.lang == "python" for b in page.blocks) == 3
    assert len(page.ports) == 7  # 2 x (HTTP, events, replay), the proxy


def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    page = Page(PAGE.read_text(encoding="utf-8"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[str]] = []
    try:
        seq = page.blocks
        for i, block in enumerate(seq):
            if block.lang == "sh":
                cmds = commands(block.code)
                if not cmds:
                    continue
                expected = seq[i + 1].code.splitlines() if seq[i + 1].lang == "text" else []
                printed: list[str] = []
                for cmd in cmds:
                    proc = subprocess.Popen(
                        shlex.split(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, env=env, cwd=tmp_path,
                    )  # fmt: skip
                    procs.append(proc)
                    if "mock-worker" in cmd:
                        assert proc.stdout is not None
                        printed += [proc.stdout.readline().rstrip("\n") for _ in range(3)]
                    else:
                        _wait_for_proxy(proc, expected, page)
                if printed:
                    assert printed == expected
            elif block.lang == "python":
                want = seq[i + 1]
                assert want.lang == "text", "each snippet is followed by its output"
                done = subprocess.run(
                    [sys.executable, "-W", "error", "-c", block.code], capture_output=True,
                    text=True, env=env, cwd=tmp_path, timeout=120,
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                assert done.stdout.rstrip("\n") == want.code, done.stdout
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                # the proxy's stderr has its own reader thread: only wait for it
                proc.wait(timeout=30) if proc.args[3] == "proxy" else proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for reader in READERS.pop(proc.pid, ()):
                reader.join(timeout=10)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    assert [p.returncode for p in procs] == [0] * len(procs)


def _wait_for_proxy(proc: subprocess.Popen[str], expected: list[str], page: Page) -> None:
    """Until the proxy's /health says both workers are healthy; its log holds the shown line."""
    assert proc.stderr is not None
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stderr.readline, "")),
                              daemon=True)  # fmt: skip
    reader.start()
    READERS[proc.pid] = [reader]
    port = next(new for old, new in page.ports.items() if old == 8080)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "".join(log)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.loads(r.read())["healthy_workers"] == 2:
                    break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("the proxy did not become healthy: " + "".join(log))
    shown = [line.removeprefix("... ") for line in expected]
    while time.monotonic() < deadline and not all(s in "".join(log) for s in shown):
        time.sleep(0.1)
    assert all(s in "".join(log) for s in shown), (shown, log)

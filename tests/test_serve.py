"""kvroute._serve: the background-thread harness the proxy and the mock worker are served by.

Real sockets on loopback: a server whose handler never closes its
connections must still leave no socket open once stopped.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from kvroute._serve import ServerThread, abort_sockets


class _Holder:
    """A TCP server on loopback whose handler keeps every connection open, unanswered."""

    def __init__(self) -> None:
        self.port = 0
        self.events: list[str] = []
        self.fail_startup = False
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []
        self.thread = ServerThread("holder", self._startup, self._shutdown)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        self.events.append("accepted")

    async def _startup(self) -> None:
        self.events.append("startup")
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.fail_startup:
            raise OSError("startup failed after listening")

    async def _shutdown(self) -> None:
        self.events.append("shutdown")
        if self._server is not None:
            # No wait_closed(): from Python 3.12 it waits for the held connections.
            self._server.close()
            self._server = None


def test_start_call_stop_and_restart_on_a_new_thread() -> None:
    holder = _Holder()
    thread = holder.thread
    assert not thread.running and thread.loop is None
    thread.start()
    try:
        assert thread.running and thread.loop is not None
        assert thread.call(lambda: threading.current_thread().name) == "holder"
        with pytest.raises(RuntimeError, match="already running"):
            thread.start()
        first_loop = thread.loop
    finally:
        thread.stop()
    assert not thread.running and thread.loop is None
    assert not [t for t in threading.enumerate() if t.name == "holder"]
    thread.stop()  # idempotent
    # Stopped, a call runs right here and a coroutine cannot run at all.
    assert thread.call(lambda: threading.current_thread().name) == threading.current_thread().name
    with pytest.raises(RuntimeError, match="not running"):
        thread.run(asyncio.sleep(0))
    thread.start()  # a restart: a new loop on the same port
    try:
        assert thread.loop is not None and thread.loop is not first_loop
        with socket.create_connection(("127.0.0.1", holder.port), timeout=5):
            pass
    finally:
        thread.stop()
    assert holder.events.count("startup") == 2 and holder.events.count("shutdown") == 2


def test_a_failed_startup_runs_shutdown_and_raises_in_the_caller() -> None:
    holder = _Holder()
    holder.fail_startup = True
    with pytest.raises(OSError, match="startup failed after listening"):
        holder.thread.start()
    assert holder.events == ["startup", "shutdown"]
    assert not holder.thread.running
    # Its listening socket is closed: the port refuses connections.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", holder.port), timeout=5).close()
    holder.fail_startup = False
    holder.thread.start()
    holder.thread.stop()


def test_stop_closes_connections_the_server_never_closed() -> None:
    holder = _Holder()
    holder.thread.start()
    try:
        client = socket.create_connection(("127.0.0.1", holder.port), timeout=5)
    except BaseException:
        holder.thread.stop()
        raise
    with client:
        client.sendall(b"hello")
        # The handler has the connection, and neither closes nor answers it.
        assert holder.thread.run(_until(lambda: "accepted" in holder.events), timeout=5)
        holder.thread.stop()
        # The server's end of the connection, still referenced, is closed all the same.
        (held,) = holder._held
        assert held.get_extra_info("socket").fileno() == -1
        # Aborted by the harness: the client sees the connection end (FIN or RST).
        try:
            data = client.recv(16)
        except ConnectionResetError:
            data = b""
        assert data == b""


async def _until(condition: object) -> bool:
    assert callable(condition)
    for _ in range(500):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


def test_abort_sockets_needs_the_owning_loop() -> None:
    async def outside() -> None:
        abort_sockets()

    with pytest.raises(TypeError, match="not an OwningLoop"):
        asyncio.run(outside())

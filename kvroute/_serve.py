"""Serve on a background thread with its own event loop, and leave no socket open on stop.

The servers kvroute runs on background threads (the proxy's
:class:`~kvroute.proxy.ProxyServer`, the test fleet's
:class:`~kvroute.testing.MockWorker`) share this harness:
:class:`ServerThread` starts a thread running an :class:`OwningLoop`, runs
the server's startup coroutine there and returns once it listens; its stop
runs the shutdown coroutine, aborts every socket still open, and joins the
thread. A stopped server must leave no socket open, whatever its HTTP stack
did with the connections. asyncio only: the core never imports this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["OwningLoop", "ServerThread", "abort_sockets", "close_loop"]

_T = TypeVar("_T")


class OwningLoop(asyncio.SelectorEventLoop):
    """An event loop that holds every socket transport it makes until :meth:`abort_all`.

    asyncio keeps transports only weakly: one that its protocol drops without
    closing (a connection accepted while the server shuts down, say), or one
    left closing with unsent data when its loop stops, is garbage-collected
    with its socket open, and the ResourceWarning surfaces at some later
    collection, in whatever code runs then. A stopped server's sockets must
    all close, so its loop owns them and closes them itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self._owned: set[asyncio.BaseTransport] = set()
        self._prune_at = 64

    def _make_socket_transport(self, *args: Any, **kwargs: Any) -> Any:
        server = kwargs.get("server")
        if server is not None and not server.is_serving():
            # Accepted just before the server closed, set up after: asyncio's
            # closed Server would refuse to count it (an AssertionError that
            # asyncio swallows, leaking the socket and a half-made transport).
            # Uncounted, it is made as usual and owned here like the rest.
            kwargs["server"] = None
        transport = super()._make_socket_transport(*args, **kwargs)  # type: ignore[misc]
        if len(self._owned) >= self._prune_at:  # amortised: forget the closed ones
            self._owned = {t for t in self._owned if _socket_open(t)}
            self._prune_at = max(64, 2 * len(self._owned))
        self._owned.add(transport)
        return transport

    def abort_all(self) -> None:
        """Abort every transport whose socket is open, closing ones included.

        A transport closed with data still buffered waits for its peer to
        read it, keeping its socket; an aborted one drops the data. The
        sockets close on the loop's next iteration.
        """
        for transport in self._owned:
            if _socket_open(transport):
                transport.abort()  # type: ignore[attr-defined]
        self._owned.clear()


def _socket_open(transport: asyncio.BaseTransport) -> bool:
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.fileno() != -1


def abort_sockets() -> None:
    """Abort every socket the running :class:`OwningLoop` holds (call it on that loop).

    :raises TypeError: the running loop is not an :class:`OwningLoop`.
    """
    loop = asyncio.get_running_loop()
    if not isinstance(loop, OwningLoop):
        raise TypeError(f"the running loop is a {type(loop).__name__}, not an OwningLoop")
    loop.abort_all()


def close_loop(loop: OwningLoop) -> None:
    """Close a stopped ``loop``: cancel its tasks, then abort every socket left open.

    Tasks its last iteration queued (accepting a connection as the server
    stopped, say) start first: a task cancelled before it starts would drop
    the socket it was handed unclosed.
    """
    loop.run_until_complete(asyncio.sleep(0))
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.abort_all()  # anything the cancelled tasks opened
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


class ServerThread:
    """A server's event loop on its own thread, started and stopped from any other thread.

    >>> import asyncio
    >>> events = []
    >>> async def startup(): events.append("listening")
    >>> async def shutdown(): events.append("closed")
    >>> server = ServerThread("example", startup, shutdown)
    >>> server.start()
    >>> server.running, server.call(lambda: events[-1])
    (True, 'listening')
    >>> server.stop()
    >>> server.running, events
    (False, ['listening', 'closed'])

    Each :meth:`start` makes a new :class:`OwningLoop` on a new thread, so a
    stopped server starts again (a restart).

    :param name: the thread's name.
    :param startup: a coroutine function that opens the server (its listening
        sockets...); :meth:`start` returns once it has returned.
    :param shutdown: a coroutine function that closes it; also run after a
        failed ``startup``, so it must cope with a half-made start.
    """

    def __init__(
        self,
        name: str,
        startup: Callable[[], Awaitable[None]],
        shutdown: Callable[[], Awaitable[None]],
    ) -> None:
        self.name = name
        self._startup = startup
        self._shutdown = shutdown
        self._thread: threading.Thread | None = None
        self._loop: OwningLoop | None = None

    @property
    def running(self) -> bool:
        """Whether the thread is up (between :meth:`start` and :meth:`stop`)."""
        return self._thread is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The serving loop, once ``startup`` has returned; None when stopped."""
        return self._loop

    def start(self, timeout: float = 30.0) -> None:
        """Start the thread and run ``startup`` there; return once it has returned.

        :raises RuntimeError: already running.
        :raises BaseException: what ``startup`` raised (``shutdown`` has run
            and the thread is gone), or TimeoutError after ``timeout`` seconds.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already running")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(target=self._main, args=(ready,), name=self.name, daemon=True)
        self._thread = thread
        thread.start()
        try:
            ready.result(timeout)
        except BaseException:
            thread.join(timeout)
            self._thread = None
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Run ``shutdown`` on the loop, abort every socket left open, join the thread.

        Idempotent. What is still running on the loop afterwards is cancelled.
        """
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        try:
            if loop is not None:
                asyncio.run_coroutine_threadsafe(self._stopping(), loop).result(timeout)
        finally:
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            self._thread = None

    def call(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` run on the loop (right here when stopped, or called from the loop)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or threading.current_thread() is thread:
            return fn()

        async def run() -> _T:
            return fn()

        return self.run(run())

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coro`` on the loop and wait for its result.

        :raises RuntimeError: the server is not running.
        """
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def _stopping(self) -> None:
        await self._shutdown()
        # A connection whose handler was cancelled mid-response can outlive the
        # server's shutdown: a stopped server's sockets all close.
        abort_sockets()
        await asyncio.sleep(0)  # let the transports' close callbacks run

    def _main(self, ready: concurrent.futures.Future[None]) -> None:
        loop = OwningLoop()
        try:
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(self._shutdown())
                ready.set_exception(exc)
                return
            self._loop = loop
            ready.set_result(None)
            loop.run_forever()
        finally:
            self._loop = None
            close_loop(loop)

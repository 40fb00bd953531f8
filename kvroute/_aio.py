"""An asyncio event loop that closes every socket it accepted when its owner stops.

Used by the servers kvroute runs on background threads (the proxy's
:class:`~kvroute.proxy.ProxyServer`, the test fleet's
:class:`~kvroute.testing.MockWorker`): a stopped server must leave no socket
open, whatever its HTTP stack did with the connections.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["OwningLoop", "close_loop"]


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

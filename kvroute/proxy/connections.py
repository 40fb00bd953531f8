"""Client connections: a cap, a deadline for the headers and one for the body, and hang-ups.

A client that opens a connection and trickles its request (a byte a second,
partial headers or a partial body: "slowloris") used to hold a connection
and a file descriptor for as long as it liked. :class:`ConnectionGuard`
bounds what such clients can take:

- **a connection cap**: beyond ``max_connections`` open client connections,
  a new one is answered ``503`` (``Retry-After: 1``) and closed at once,
  before a byte of it is read;
- **a header deadline**: a request's headers must arrive whole within
  ``header_timeout`` seconds of the connection opening (or, on a kept-alive
  connection, of the request's first byte), else ``408`` and the connection
  closes;
- **a body deadline**: its body must arrive whole within ``body_timeout``
  seconds of its headers, else ``408`` (in the called API's error shape)
  and the connection closes;
- idle kept-alive connections close after ``idle_timeout`` seconds (aiohttp's
  ``keepalive_timeout``, see :func:`server_options`).

The guard wraps aiohttp's request handler protocol (:class:`GuardedSite`
listens with it), so the cap and the header deadline act before aiohttp has
parsed anything; its :meth:`~ConnectionGuard.middleware` follows each
request from its headers to its end. The server also runs with aiohttp's
``handler_cancellation`` (:func:`server_options`), so a client's hang-up
cancels its handler (see :mod:`~kvroute.proxy.disconnect`).

Exported: ``kvroute_proxy_connections`` (open now),
``kvroute_proxy_connections_refused_total`` and
``kvroute_proxy_client_timeouts_total{phase="headers"|"body"}``.

>>> from kvroute.proxy import ProxyConfig, parse_worker
>>> config = ProxyConfig([parse_worker("http://127.0.0.1:9")], max_connections=2)
>>> server_options(config)
{'handler_cancellation': True, 'keepalive_timeout': 75.0}
>>> ConnectionGuard(config).open
0
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Literal

from aiohttp import web

from .call import Api
from .config import ProxyConfig
from .disconnect import closed_by_proxy
from .errors import ProxyError, error_body

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric


__all__ = ["ConnectionGuard", "GuardedSite", "server_options"]

log = logging.getLogger("kvroute.proxy")


def _raw_response(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", *headers, "Connection: close", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REFUSED: Final = _raw_response(
    "503 Service Unavailable",
    b'{"error": {"message": "too many connections to the routing proxy",'
    b' "type": "server_error", "param": null, "code": "overloaded"}}',
    "Content-Type: application/json",
    "Retry-After: 1",
)
_HEADERS_TIMED_OUT: Final = _raw_response("408 Request Timeout", b"")

Phase = Literal["headers", "body"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_options(config: ProxyConfig) -> dict[str, Any]:
    """The aiohttp server options the proxy runs with (for ``AppRunner`` or ``run_app``).

    Handlers are cancelled when their client's connection drops; idle
    kept-alive connections close after ``idle_timeout``.
    """
    return {"handler_cancellation": True, "keepalive_timeout": config.idle_timeout}


class _Guarded(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the cap and header deadline outside."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: A request of this connection is being handled (its headers came whole).
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        guard = self._guard
        if guard.open >= guard.config.max_connections:
            guard.refuse()
            transport.write(_REFUSED)
            transport.close()
            return
        self._transport = transport
        guard.opened(transport, self)
        self._inner = self._factory()
        self._inner.connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.config.header_timeout, self._headers_late)

    def disarm(self) -> None:
        """Stop the header deadline (the request's headers came whole)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        transport = self._transport
        if self.busy or transport is None or transport.is_closing():
            return
        self._guard.timed_out("headers")
        # No request is being answered on this connection: the 408 is the only output.
        transport.write(_HEADERS_TIMED_OUT)
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._timer is None and not self.busy:
            self._arm()  # a kept-alive connection's next request begins
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self._inner is not None and self._transport is not None:
            self._guard.closed(self._transport)
            self._inner.connection_lost(exc)
            self._inner = None


class ConnectionGuard:
    """Caps client connections and bounds how long a request may take to arrive.

    Use from the proxy's event loop.

    :param config: ``max_connections``, ``header_timeout``, ``body_timeout``.
    :param registry: a Prometheus registry to export into, or None.
    """

    def __init__(self, config: ProxyConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self._conns: dict[asyncio.BaseTransport, _Guarded] = {}
        #: Connections refused for the cap, so far.
        self.refused = 0
        #: Requests closed for arriving too slowly, so far, by phase.
        self.timeouts: dict[Phase, int] = {"headers": 0, "body": 0}
        self._refused_counter: Any = None
        self._timeouts_counter: Any = None
        if registry is not None:
            from prometheus_client import Counter

            self._refused_counter = Counter(
                "kvroute_proxy_connections_refused",
                "Client connections refused because max_connections were open",
                registry=registry,
            )
            self._timeouts_counter = Counter(
                "kvroute_proxy_client_timeouts",
                "Requests whose headers (header_timeout) or body (body_timeout) came too slowly",
                ["phase"],
                registry=registry,
            )
            registry.register(_OpenCollector(self))

    @property
    def open(self) -> int:
        """Client connections open now (refused ones not counted)."""
        return len(self._conns)

    def protocol_factory(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], Any]:
        """A protocol factory for ``loop.create_server``: ``factory``'s protocols, guarded."""
        return lambda: _Guarded(self, factory)

    # -- called by the connections ---------------------------------------------------------

    def opened(self, transport: asyncio.BaseTransport, conn: _Guarded) -> None:
        self._conns[transport] = conn

    def closed(self, transport: asyncio.BaseTransport) -> None:
        self._conns.pop(transport, None)

    def refuse(self) -> None:
        self.refused += 1
        if self._refused_counter is not None:
            self._refused_counter.inc()
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            log.warning(
                "refused a client connection: %d are open (max_connections); %d refused so far",
                self.open, self.refused,
            )  # fmt: skip

    def timed_out(self, phase: Phase) -> None:
        self.timeouts[phase] += 1
        if self._timeouts_counter is not None:
            self._timeouts_counter.labels(phase).inc()

    # -- the requests ----------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Follow a request from its headers to its end; hold its body to ``body_timeout``."""
        conn = self._conns.get(request.transport) if request.transport is not None else None
        if conn is not None:
            conn.disarm()
            conn.busy = True
        timer = None
        if request.body_exists and not request.content.is_eof():  # (usually it came whole)
            timer = asyncio.get_running_loop().call_later(
                self.config.body_timeout, self._body_late, request
            )
        try:
            return await handler(request)
        finally:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                conn.busy = False

    def _body_late(self, request: web.Request) -> None:
        transport = request.transport
        if request.content.is_eof() or transport is None or transport.is_closing():
            return  # the body came whole; the handler is busy with it
        self.timed_out("body")
        # The handler is still waiting for the body, so nothing of an answer has
        # gone out: the 408 is written here, and closing the connection cancels
        # the handler (handler_cancellation) rather than leave aiohttp to linger
        # over the rest of the body.
        message = f"the request body did not arrive within {self.config.body_timeout:g} s"
        api: Api = "anthropic" if request.path.startswith("/v1/messages") else "openai"
        error = ProxyError(408, message, code="request_timeout")
        body = json.dumps(error_body(api, error)).encode()
        closed_by_proxy(request, 408)
        answer = _raw_response("408 Request Timeout", body, "Content-Type: application/json")
        transport.write(answer)
        transport.close()


class GuardedSite(web.TCPSite):
    """A :class:`aiohttp.web.TCPSite` whose connections go through a :class:`ConnectionGuard`.

    :param runner: the application runner (set up).
    :param host: the address to listen on.
    :param port: the port (0: a free one; see :attr:`port` once started).
    :param guard: the guard.
    :param kw: more :class:`~aiohttp.web.TCPSite` options.
    """

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, **kw: Any
    ) -> None:
        super().__init__(runner, host, port, **kw)
        self.guard = guard

    async def start(self) -> None:
        """Listen; each accepted connection is guarded."""
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = listening = await loop.create_server(
            self.guard.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = listening.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class _OpenCollector:
    """``kvroute_proxy_connections``: client connections open now, read at scrape time."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("kvroute_proxy_connections", "Client connections open now")
        g.add_metric([], float(self._guard.open))
        yield g

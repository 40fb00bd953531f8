"""Client hang-ups: the worker stops, the request's load goes at once, and it is counted.

The proxy's server runs with aiohttp's ``handler_cancellation`` (see
:func:`~kvroute.proxy.connections.server_options`): when a client's
connection drops, its request handler is cancelled wherever it waits —
reading the worker's JSON answer, waiting for the next event of its stream,
tokenizing. The cancellation unwinds through the attempt
(:meth:`~kvroute.proxy.upstream.Upstream.send`), which closes the upstream
connection (vLLM, SGLang and the MockWorker abort a request whose
connection closes, streamed or not) and reports the end to the router at
once with :meth:`~kvroute.proxy.upstream.Lifecycle.abandon`: ``finished``
once a token went out, else ``failed``.

:class:`HangUps` tells a hang-up from the other cancellations (a shutdown,
a deadline) and counts it once per request in
``kvroute_proxy_client_disconnects_total{endpoint,stage}``: ``stage`` is
``streaming`` when the answer had begun (its status line went out), else
``waiting``. A request the client left before its answer began is counted
in ``kvroute_proxy_requests_total`` with status 499 (nginx's "client closed
request").

>>> HangUps.stage_of({STREAMING_KEY: True})
'streaming'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

from aiohttp import web

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "CLIENT_CLOSED",
    "STREAMING_KEY",
    "HangUps",
    "Stage",
    "closed_by_proxy",
    "mark_streaming",
    "request_key",
]


def request_key(name: str, kind: type = bool) -> Any:
    """A key for a request's storage: a typed ``web.RequestKey`` where aiohttp has them."""
    key_type = getattr(web, "RequestKey", None)
    return name if key_type is None else key_type(name, kind)


#: The status a request the client left before its answer is counted with.
CLIENT_CLOSED: Final = 499
#: Request key set once the answer to the client has begun (a stream's status line went out).
STREAMING_KEY: Final = request_key("kvroute_streaming")
_COUNTED_KEY: Final = request_key("kvroute_hung_up")
_CLOSED_KEY: Final = request_key("kvroute_closed_by_proxy", int)

#: How far the answer had got when the client left.
Stage = Literal["waiting", "streaming"]


def mark_streaming(request: web.Request) -> None:
    """Note that the answer to ``request`` has begun (the relay calls it)."""
    request[STREAMING_KEY] = True


def closed_by_proxy(request: web.Request, status: int) -> None:
    """Note that the proxy itself answered ``status`` and closed ``request``'s connection.

    Its handler's cancellation is then not the client's hang-up.
    """
    request[_CLOSED_KEY] = status


class HangUps:
    """Tells client hang-ups from other cancellations, and counts them.

    :param registry: a Prometheus registry for the counter, or None (not exported).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._counter: Any = None
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter(
                "kvroute_proxy_client_disconnects",
                "Clients that hung up before their answer ended, by endpoint and by how far"
                " the answer had got (waiting: not begun; streaming: begun)",
                ["endpoint", "stage"],
                registry=registry,
            )
        #: Hang-ups counted so far.
        self.count = 0

    @staticmethod
    def client_gone(request: web.Request) -> bool:
        """Whether ``request``'s client connection is closed or closing."""
        transport = request.transport
        return transport is None or transport.is_closing()

    @staticmethod
    def stage_of(request: Mapping[Any, Any]) -> Stage:
        """How far the answer to ``request`` had got."""
        return "streaming" if request.get(STREAMING_KEY) else "waiting"

    def cancelled(self, request: web.Request) -> int:
        """The status to count ``request`` with, its handler having been cancelled.

        A hang-up (counted, see :meth:`note`): 499, or 200 once a stream's
        status line went out; a connection the proxy closed: the status it
        answered (:func:`closed_by_proxy`); anything else (the server
        stopping): 503.
        """
        self.note(request)
        return self.status_when_cancelled(request)

    @classmethod
    def status_when_cancelled(cls, request: web.Request) -> int:
        """The status :meth:`cancelled` gives ``request``, without counting anything."""
        closed = request.get(_CLOSED_KEY)
        if closed is not None:
            return int(closed)
        if cls.client_gone(request):
            return 200 if cls.stage_of(request) == "streaming" else CLIENT_CLOSED
        return 503

    def note(self, request: web.Request) -> bool:
        """Count ``request``'s hang-up if its client is gone (once per request).

        :returns: whether the client is gone (and the proxy did not close it).
        """
        if not self.client_gone(request) or request.get(_CLOSED_KEY) is not None:
            return False
        if not request.get(_COUNTED_KEY):
            request[_COUNTED_KEY] = True
            self.count += 1
            if self._counter is not None:
                self._counter.labels(request.path, self.stage_of(request)).inc()
        return True

"""Request deadlines: no generation request outlives its time, whatever it waits on.

Without one, a request waited as long as its worker kept the connection
open (a read timeout of 600 s of *silence*, and a hung worker found only by
the health checks). A :class:`Deadline` bounds the whole request, from its
arrival: reading and tokenizing it, every attempt (connecting, waiting for
the first token) and relaying the answer.

- ``deadline`` (a :class:`~kvroute.proxy.config.ProxyConfig` field; None:
  none) applies to every generation request;
- a client may set its own with ``X-Kvroute-Deadline: <seconds>``, longer
  or shorter, up to ``max_deadline``;
- the OpenAI and Anthropic SDKs send their timeout as
  ``X-Stainless-Timeout: <seconds>``; it bounds the time to the answer's
  first byte (what an SDK's read timeout gives up on: a silent answer, not a
  long stream), up to ``max_deadline`` too.

Past its deadline, a request that has sent nothing yet is answered 504
(``deadline_exceeded``; ``timeout_error`` on ``/v1/messages``, with
``x-should-retry: false``); a stream under way ends with an error event.
Either way the worker's connection closes (the engine aborts the request)
and the router hears :meth:`~kvroute.proxy.upstream.Lifecycle.abandon`; the
worker is not blamed. Counted in
``kvroute_proxy_deadlines_exceeded_total{stage="waiting"|"streaming"}``.

The deadline cancels the request's handler task (as a client's hang-up
does) and marks itself :attr:`~Deadline.expired`, so whoever catches the
cancellation can tell it apart.

>>> from kvroute.proxy import ProxyConfig, parse_worker
>>> ds = Deadlines(ProxyConfig([parse_worker("http://127.0.0.1:9")], deadline=30.0))
>>> ds.seconds({"X-Kvroute-Deadline": "5"}), ds.seconds({})
((5.0, None), (30.0, None))
>>> ds.seconds({"X-Stainless-Timeout": "2"})      # the SDK's timeout: to the first byte
(30.0, 2.0)
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from aiohttp import web

from .config import ProxyConfig
from .disconnect import STREAMING_KEY, request_key
from .errors import ProxyError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "DEADLINE_HEADER",
    "SDK_TIMEOUT_HEADER",
    "Deadline",
    "Deadlines",
    "deadline_of",
]

#: A client's own deadline for its request, in seconds.
DEADLINE_HEADER: Final = "X-Kvroute-Deadline"
#: The OpenAI and Anthropic SDKs' timeout, in seconds: a bound on the time to the first byte.
SDK_TIMEOUT_HEADER: Final = "X-Stainless-Timeout"
_KEY: Final = request_key("kvroute_deadline", object)
_T = TypeVar("_T")

Stage = Literal["waiting", "streaming"]


def deadline_of(request: Mapping[Any, Any]) -> Deadline | None:
    """The deadline armed for ``request``, if any."""
    found = request.get(_KEY)
    return found if isinstance(found, Deadline) else None


class Deadline:
    """One request's deadline, armed on the task that handles it.

    :param overall: seconds the whole request may take, or None.
    :param first_byte: seconds until the answer's first byte, or None.
    :param owner: counts the expiries.
    """

    def __init__(
        self, overall: float | None, first_byte: float | None, owner: Deadlines | None = None
    ) -> None:
        self._owner = owner
        loop = asyncio.get_running_loop()
        self._loop = loop
        now = loop.time()
        self.overall = overall
        self.first_byte = first_byte
        self._overall_at = None if overall is None else now + overall
        self._first_byte_at = None if first_byte is None else now + first_byte
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        #: The deadline passed (and cancelled the task).
        self.expired = False
        #: What passed: ``"deadline"`` or ``"first byte"``.
        self.what = ""

    def arm(self) -> None:
        """Cancel the current task when the deadline passes."""
        self._task = asyncio.current_task()
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        times = [t for t in (self._overall_at, self._first_byte_at) if t is not None]
        if times and self._task is not None:
            self._handle = self._loop.call_at(min(times), self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self._task is None or self._task.done():
            return
        now = self._loop.time()
        first = self._first_byte_at is not None and now >= self._first_byte_at
        self.what = "first byte" if first and not self._overall_passed(now) else "deadline"
        self.expired = True
        self._task.cancel()

    def _overall_passed(self, now: float) -> bool:
        return self._overall_at is not None and now >= self._overall_at

    @property
    def seconds(self) -> float:
        """The time that passed, for messages: the bound that fired, else the tighter one."""
        if self.what == "first byte" and self.first_byte is not None:
            return self.first_byte
        bounds = [s for s in (self.overall, self.first_byte) if s is not None]
        return min(bounds) if bounds else math.inf

    def answer_started(self) -> None:
        """The answer's first byte went out: the first-byte bound no longer applies."""
        if self._first_byte_at is not None and not self.expired:
            self._first_byte_at = None
            self._schedule()

    def disarm(self) -> None:
        """Never fire (the request ended)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def uncancel(self) -> None:
        """Withdraw the task's cancellation request, once the expiry is handled."""
        uncancel = getattr(self._task, "uncancel", None)  # Python >= 3.11
        if uncancel is not None:
            uncancel()

    def count(self, stage: Stage) -> None:
        """Count this expiry, at ``stage``."""
        if self._owner is not None:
            self._owner.count(stage)

    def error(self) -> ProxyError:
        """The 504 answering a request whose deadline passed before its answer began."""
        return ProxyError(504, self.message(), code="deadline_exceeded", retry=False)

    def message(self) -> str:
        """Why the request ended."""
        if self.what == "first byte":
            return f"no answer within the client's timeout ({self.seconds:g} s)"
        return f"the request's deadline passed ({self.seconds:g} s)"


class Deadlines:
    """Arms each generation request's deadline from the configuration and its headers.

    :param config: ``deadline`` and ``max_deadline``.
    :param registry: a Prometheus registry to count expiries into, or None.
    """

    def __init__(self, config: ProxyConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self._counter: Any = None
        #: Requests whose deadline passed, by stage.
        self.exceeded: dict[Stage, int] = {"waiting": 0, "streaming": 0}
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter(
                "kvroute_proxy_deadlines_exceeded",
                "Requests ended by their deadline, by how far their answer had got",
                ["stage"],
                registry=registry,
            )

    def seconds(self, headers: Mapping[str, str]) -> tuple[float | None, float | None]:
        """``(overall, first byte)`` seconds for a request with ``headers``.

        :raises ProxyError: 400 for a malformed :data:`DEADLINE_HEADER`.
        """
        cap = self.config.max_deadline
        overall = self.config.deadline
        own = headers.get(DEADLINE_HEADER)
        if own is not None:
            value = _seconds(own)
            if value is None:
                raise ProxyError(
                    400, f"{DEADLINE_HEADER} must be a positive number of seconds, not {own!r}"
                )
            overall = min(value, cap)
        sdk = headers.get(SDK_TIMEOUT_HEADER)
        first = _seconds(sdk) if sdk is not None else None
        return overall, None if first is None else min(first, cap)

    def start(self, request: web.Request) -> Deadline | None:
        """Arm ``request``'s deadline on the current task (None: it has none).

        :raises ProxyError: 400 for a malformed :data:`DEADLINE_HEADER`.
        """
        overall, first = self.seconds(request.headers)
        if overall is None and first is None:
            return None
        deadline = Deadline(overall, first, self)
        request[_KEY] = deadline
        deadline.arm()
        return deadline

    async def run(self, request: web.Request, work: Callable[[], Awaitable[_T]]) -> _T:
        """``work()`` within ``request``'s deadline.

        :raises ProxyError: 504 when the deadline passed before the answer
            began (after, the relay ends the stream); 400 for a malformed
            :data:`DEADLINE_HEADER`.
        """
        deadline = self.start(request)
        try:
            return await work()
        except asyncio.CancelledError:
            if deadline is None or not deadline.expired or request.get(STREAMING_KEY):
                raise
            deadline.uncancel()
            deadline.count("waiting")
            raise deadline.error() from None
        finally:
            if deadline is not None:
                deadline.disarm()

    def count(self, stage: Stage) -> None:
        """Count a request ended by its deadline."""
        self.exceeded[stage] += 1
        if self._counter is not None:
            self._counter.labels(stage).inc()


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None

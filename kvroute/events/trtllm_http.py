"""``HttpEventPoller``: KV events from ``trtllm-serve``'s ``POST /kv_cache_events``, into a Router.

``trtllm-serve`` (with ``kv_cache_config: {event_buffer_max_size: N,
enable_block_reuse: true}``) answers ``POST /kv_cache_events`` with a JSON list
of the KV-cache events buffered since the previous call, in TensorRT-LLM's
dict shape (:mod:`kvroute.events.trtllm`), and **drains** them. So this
endpoint has exactly one consumer: two pollers (two routers, a router and a
dashboard) steal each other's events, and each sees the other's as gaps. A
fleet of router replicas needs every event in every replica: use the ZMQ
stream (``KVEventsConfig``) there; the proxy refuses an HTTP events endpoint
together with replica sync.

One thread per engine polls its endpoint over a kept-alive connection: a
poll that returns events is followed by another at once (draining a
backlog), an empty one waits ``poll_interval``; a failed poll (connection
refused, a timeout, a non-200 answer, a body that is not a JSON list) is
counted ``poll_errors``, logged at most once a minute, and retried with a
backoff up to ``max_backoff``. Each event goes through the engine's
:class:`~kvroute.events.trtllm_apply.TrtllmApplier`, which decodes it and
applies it (windows, attention-DP ranks, partial blocks, tiers) and turns a
gap in a rank's ``event_id`` into the event layer's unrecoverable-gap
handling: the endpoint cannot replay, and events are lost whenever the
engine's buffer overflows or a drained answer never arrives. A restarted
engine (its ids start again at 0 with its ``created`` events, before any
request) is cleared and followed anew, without waiting for traffic.

``route()`` never waits for a poll. Needs ``msgspec`` (the ``serve`` extra);
the HTTP client is the standard library's.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import msgspec

from .._logging import RateLimitedLog
from .trtllm_apply import TrtllmApplier

if TYPE_CHECKING:
    from ..router import Router
    from .metrics import Metrics

__all__ = ["HttpEventPoller", "HttpSource"]

logger = logging.getLogger("kvroute.events")

#: An answer of ``/kv_cache_events``: a JSON list, its events left undecoded.
_ANSWER: Final = msgspec.json.Decoder(list[msgspec.Raw])


@dataclass
class HttpSource:
    """What the poller knows about one engine's endpoint (see :meth:`HttpEventPoller.sources`).

    :ivar worker: the worker the source was subscribed under.
    :ivar url: the ``/kv_cache_events`` URL it polls.
    :ivar counts: ``polls`` answered, ``events`` received, ``poll_errors``,
        ``errors`` (a bug in applying an answer, logged).
    :ivar statuses: per router worker, the applier's outcomes (``ok``,
        ``ignored``, ``gap``, ``restart``, ``malformed``...).
    :ivar last_event_ids: the last ``event_id`` seen per attention-DP rank.
    :ivar hash_algo: the ``hash_algo`` the engine names, or None.
    """

    worker: int
    url: str
    counts: Counter[str] = field(default_factory=Counter)
    statuses: dict[int, Counter[str]] = field(default_factory=dict)
    last_event_ids: dict[int, int] = field(default_factory=dict)
    hash_algo: str | None = None


class _PollFailed(Exception):
    """A poll that brought no usable answer (its events, if any, are lost)."""


class _Source:
    """One engine's endpoint and the thread that polls it."""

    def __init__(
        self,
        worker: int,
        url: str,
        applier: TrtllmApplier,
        headers: Mapping[str, str],
        poller: HttpEventPoller,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL like http://host:8000/kv_cache_events")
        self.worker = worker
        self.url = url
        self.applier = applier
        self._parts = parts
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json", "Content-Length": "0", **headers}
        self._poller = poller
        self._conn: http.client.HTTPConnection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()  # guards counts and the applier against snapshots
        self.counts: Counter[str] = Counter()

    # -- lifecycle (the poller's thread) --

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"kvroute-trtllm-poll-{self.worker}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        conn = self._conn
        sock = None if conn is None else conn.sock
        if sock is not None:  # unblock a poll in flight
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # pragma: no cover - a hung poll; it is a daemon
                logger.warning("the poller of %s did not stop", self.url)
            self._thread = None

    def snapshot(self) -> HttpSource:
        with self.lock:
            return HttpSource(
                self.worker,
                self.url,
                Counter(self.counts),
                {w: Counter(c) for w, c in self.applier.counts.items()},
                self.applier.last_event_ids(),
                self.applier.hash_algo,
            )

    # -- the thread --

    def _run(self) -> None:
        p = self._poller
        backoff = p.poll_interval
        try:
            while not self._stop.is_set():
                try:
                    events = self._poll()
                except (_PollFailed, OSError, http.client.HTTPException) as e:
                    self._close()
                    with self.lock:
                        self.counts["poll_errors"] += 1
                    p._warn.warning(
                        (self.worker, "poll"),
                        "worker %s: polling %s for KV events failed: %s",
                        self.worker,
                        self.url,
                        e or type(e).__name__,
                    )
                    self._stop.wait(backoff)
                    backoff = min(p.max_backoff, max(backoff * 2, p.poll_interval))
                    continue
                backoff = p.poll_interval
                try:
                    with self.lock:
                        for event in events:
                            self.applier.feed(event)
                        self.counts["polls"] += 1
                        self.counts["events"] += len(events)
                except Exception:  # a bug: keep polling, but say so
                    logger.exception(
                        "worker %s: applying KV events from %s failed", self.worker, self.url
                    )
                    with self.lock:
                        self.counts["errors"] += 1
                if p.on_poll is not None:
                    p.on_poll(self.worker, len(events))
                if not events:
                    self._stop.wait(p.poll_interval)
        finally:
            self._close()

    def _connect(self) -> http.client.HTTPConnection:
        parts, timeout = self._parts, self._poller.timeout
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout)
        return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _poll(self) -> list[memoryview]:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        conn.request("POST", self._path, body=b"", headers=self._headers)
        resp = conn.getresponse()
        limit = self._poller.max_response_bytes
        body = resp.read(limit + 1)
        if len(body) > limit:
            raise _PollFailed(f"an answer over max_response_bytes ({limit}); its events are lost")
        if resp.status != 200:
            raise _PollFailed(f"HTTP {resp.status}: {body[:200]!r}")
        try:
            # Split in C, each event kept as its JSON text: the applier decodes
            # them one by one, so a malformed event costs only itself.
            return [memoryview(raw) for raw in _ANSWER.decode(body)]
        except msgspec.DecodeError as e:
            raise _PollFailed(f"an answer that is not a JSON list: {e}") from None


class HttpEventPoller:
    """Poll ``trtllm-serve`` workers' ``/kv_cache_events`` and feed ``router`` on threads.

    >>> from kvroute import Router
    >>> router = Router(block_size=32, workers=[0])
    >>> with HttpEventPoller(router) as poller:            # doctest: +SKIP
    ...     poller.subscribe(0, "http://10.0.0.5:8000/kv_cache_events")
    ...     ...                                             # route() as usual

    Each endpoint must have no other consumer (the module docstring says why).

    :param router: the router whose index the events feed.
    :param metrics: a :class:`kvroute.events.metrics.Metrics` to count into, or None.
    :param poll_interval: seconds between polls that found nothing.
    :param max_backoff: the longest wait (s) after failed polls.
    :param timeout: seconds to connect, and to wait for an answer.
    :param max_response_bytes: a larger answer is refused (its events are lost,
        which the next answer's event ids show as a gap).
    :param window_size: index only this attention window (default: the largest).
    :param on_poll: called on a source's thread after each answered poll as
        ``on_poll(worker, n_events)``; for tests and instrumentation.
    :raises ValueError: an interval, timeout or size out of range.
    """

    def __init__(
        self,
        router: Router,
        *,
        metrics: Metrics | None = None,
        poll_interval: float = 0.05,
        max_backoff: float = 2.0,
        timeout: float = 10.0,
        max_response_bytes: int = 64 << 20,
        window_size: int | None = None,
        on_poll: Callable[[int, int], None] | None = None,
    ) -> None:
        if not (poll_interval > 0 and max_backoff > 0 and timeout > 0):
            raise ValueError("poll_interval, max_backoff and timeout must be > 0")
        if max_response_bytes < 1024:
            raise ValueError("max_response_bytes must be >= 1024")
        self.router = router
        self.metrics = metrics
        self.poll_interval = float(poll_interval)
        self.max_backoff = max(float(max_backoff), self.poll_interval)
        self.timeout = float(timeout)
        self.max_response_bytes = int(max_response_bytes)
        self.window_size = window_size
        self.on_poll = on_poll
        self._sources: dict[int, _Source] = {}
        self._lock = threading.Lock()
        self._running = False
        self._warn = RateLimitedLog(logger)

    def subscribe(
        self,
        worker: int,
        url: str,
        *,
        ranks: Mapping[int, int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Start polling ``url`` for ``worker``'s engine (replacing any earlier source of it).

        :param worker: the router worker every attention-DP rank of the engine
            folds into (and the source's name).
        :param url: the engine's ``/kv_cache_events`` URL.
        :param ranks: ``{rank: worker}`` to give each rank its own router
            worker instead (see :class:`TrtllmApplier`).
        :param headers: extra request headers (e.g. ``Authorization``).
        :raises ValueError: ``url`` is not http(s).
        """
        applier = TrtllmApplier(
            self.router,
            ranks if ranks is not None else worker,
            metrics=self.metrics,
            window_size=self.window_size,
        )
        source = _Source(int(worker), url, applier, dict(headers or {}), self)
        with self._lock:
            old = self._sources.pop(source.worker, None)
            self._sources[source.worker] = source
            running = self._running
        if old is not None:
            old.stop(self.timeout + 1)
        if running:
            source.start()

    def unsubscribe(self, worker: int) -> None:
        """Stop polling ``worker``'s engine (its blocks stay in the index)."""
        with self._lock:
            old = self._sources.pop(int(worker), None)
        if old is not None:
            old.stop(self.timeout + 1)

    def start(self) -> HttpEventPoller:
        """Start polling every subscribed source (idempotent)."""
        with self._lock:
            if self._running:
                return self
            self._running = True
            sources = list(self._sources.values())
        for s in sources:
            s.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every polling thread and close its connection; safe to call twice."""
        with self._lock:
            self._running = False
            sources = list(self._sources.values())
        for s in sources:
            s.stop(timeout)

    def __enter__(self) -> HttpEventPoller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._running

    def sources(self) -> dict[int, HttpSource]:
        """A snapshot of every source's state (copies)."""
        with self._lock:
            sources = list(self._sources.values())
        return {s.worker: s.snapshot() for s in sources}

    def wait_for(
        self, predicate: Callable[[dict[int, HttpSource]], bool], timeout: float = 5.0
    ) -> bool:
        """Poll :meth:`sources` until ``predicate`` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.sources()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

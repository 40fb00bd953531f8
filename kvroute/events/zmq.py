"""``ZmqSubscriber``: KV events from vLLM / SGLang workers over ZMQ, into a Router.

Both engines publish the same framing (vLLM's ``ZmqEventPublisher``, which
SGLang mirrors): a PUB socket sends ``[topic, seq, payload]`` where ``seq`` is
an 8-byte big-endian counter, starting at 0 and +1 per batch, and a ROUTER
socket on a second endpoint replays buffered batches from a requested ``seq``.

Per worker the subscriber tracks the last applied ``seq``:

- the next one applies as is;
- a *gap* (a batch lost in flight, or the subscriber joined late) is filled
  by asking the replay endpoint for ``last + 1 ..`` through a DEALER socket
  and applying the replies that fall in the hole, in order; replies come as
  ``["", topic, seq, payload]`` (or without the empty delimiter) and end with
  ``seq = ff x 8``. If the replay endpoint is missing, times out or cannot
  cover the hole, the worker's blocks are cleared (its state is unknown: a
  lost removal would leave blocks the router believes in but the worker no
  longer has), the worker is *degraded* (:meth:`EventApplier.events_lost`:
  routed on the router's own decisions, its orphaned stores anchored, until
  its index agrees with the engine again) and the subscriber resumes from the
  live batch; it is counted. A subscriber that first meets a running engine
  past ``seq`` 0 with no replay endpoint degrades it the same way (its
  history is unknown), without counting a gap;
- a *backward* jump means the engine restarted (its counter began again):
  the worker's blocks are cleared and rebuilt from the new stream; a batch
  seen twice (live after a replay already applied it) is recognised by its
  payload and skipped;
- every (re)connection to a worker's publisher triggers a *resync* through
  the replay endpoint: the batch at the last applied ``seq`` is asked for
  again and compared with what was applied. The same batch means the engine
  lived on (anything newer is applied); a different one, or none, means it
  restarted while the subscriber was away, and its blocks are cleared and
  rebuilt from the new engine's history — even if it never publishes again.

Everything runs on one background thread that owns every socket, or with
``loop`` on an asyncio event loop (the sockets' descriptors its readers);
``route()`` never waits for it. A replay is one more socket in that poll
loop, not a blocking call: while it is in flight only its own worker's live
batches wait (in ZMQ's queue, unread), so a replay endpoint that hangs
delays that worker by ``replay_timeout`` and no other. Malformed frames or payloads are
counted, logged at most once a minute per worker, and never touch the index.

The index is cleared for three reasons, counted apart: the engine's own
``AllBlocksCleared`` (``cleared``), an engine restart (``restart``) and a gap
that no replay could fill (``replay_failed``).

Needs the ``serve`` extra (``pyzmq``, ``msgspec``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import xxhash
import zmq
from zmq.utils.monitor import recv_monitor_message

from .._logging import RateLimitedLog
from .apply import EventApplier
from .decode import DecodeError, available_formats, decode
from .types import EventBatch

if TYPE_CHECKING:
    from ..router import Router
    from .metrics import Metrics

__all__ = ["END_SEQ", "WorkerStream", "ZmqSubscriber", "payload_digest"]

logger = logging.getLogger("kvroute.events")

#: The sequence number of the replay's end marker (-1 as a signed 64-bit int).
END_SEQ: Final = 0xFFFF_FFFF_FFFF_FFFF

def _check_format(fmt: object) -> str:
    formats = available_formats(zmq=True)
    if not isinstance(fmt, str) or fmt not in formats:
        raise ValueError(f"fmt must be one of the ZMQ event formats {formats}, not {fmt!r}")
    return fmt


#: Replayed batches (seq, payload), or None when the replay failed.
Replayed = list[tuple[int, bytes]] | None


@dataclass
class _Replay:
    """A replay exchange in flight on its own DEALER socket."""

    sock: Any
    start: int
    stop: int
    deadline: float
    then: Callable[[Replayed], None]
    got: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class _Backlog:
    """Replayed batches applied a slice per loop turn, then the live batch that waited."""

    todo: deque[tuple[int, bytes]]
    replayed: int
    live: tuple[int, bytes] | None


@dataclass
class WorkerStream:
    """What the subscriber knows about one worker's event stream.

    :ivar worker: the router's worker id.
    :ivar endpoint: the PUB endpoint it subscribes to.
    :ivar replay_endpoint: the ROUTER endpoint for replays, or None.
    :ivar topic: the topic prefix it subscribes to.
    :ivar fmt: the wire format of the payloads.
    :ivar last_seq: the last applied sequence number (-1 before the first).
    :ivar counts: batches and events by outcome: ``batches``, ``gap``,
        ``replayed`` (batches applied from a replay), ``replay_failed`` and
        ``restart`` (each cleared the worker), ``duplicate``, ``connects``,
        ``disconnects``, ``malformed``, ``rejected`` (messages over
        ``max_message_bytes``), and the applier's per-event statuses (``ok``,
        ``unknown_block``, ``cleared`` for the engine's ``AllBlocksCleared``, ...).
    """

    worker: int
    endpoint: str
    replay_endpoint: str | None
    topic: str
    fmt: str
    last_seq: int = -1
    counts: Counter[str] = field(default_factory=Counter)
    sock: Any = field(default=None, repr=False)
    monitor: Any = field(default=None, repr=False)
    # seq -> digest of the payload applied at that seq, for the last batches
    recent: dict[int, int] = field(default_factory=dict, repr=False)
    # the replay in flight; while there is one, ``sock`` is out of the poller
    replay: _Replay | None = field(default=None, repr=False)
    # a resync was asked for while a replay was in flight: run it after
    resync_due: bool = field(default=False, repr=False)
    # on a loop: replayed batches still to apply, a slice a turn; ``sock`` is
    # out of the poller until they are
    backlog: _Backlog | None = field(default=None, repr=False)


#: What the subscriber watches on each live socket.
_MONITORED: Final = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED

#: How many applied batches a stream remembers, to tell a duplicate from a restart.
_RECENT: Final = 4096

#: On a loop, replayed batches applied per turn of the loop (~10 ms of work).
_SLICE: Final = 256

#: The subscriber's own outcomes that are exported as ``kvroute_events_total``
#: statuses (the applier counts the per-event ones itself).
_METRIC_STATUSES: Final = frozenset(
    {"gap", "replayed", "malformed", "rejected", "replay_failed", "restart"}
)


class _Watch:
    """The sockets the subscriber reads: a ``zmq.Poller``, and on an event loop its readers.

    On an asyncio loop every watched socket's ``zmq.FD`` is a reader of the
    loop calling ``on_ready``. ZMQ signals that descriptor on *edges* (news
    since the socket was last looked at), so ``on_ready`` polls the sockets
    themselves, as the thread does.
    """

    __slots__ = ("_fds", "fresh", "loop", "on_ready", "poller")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.poller = zmq.Poller()
        self.loop = loop
        self.on_ready = on_ready
        self._fds: dict[Any, int] = {}
        #: A socket was registered since the owner last polled on its own.
        self.fresh = False

    def register(self, sock: Any) -> None:
        self.poller.register(sock, zmq.POLLIN)
        self.fresh = True
        if self.loop is not None and self.on_ready is not None:
            fd = self._fds[sock] = sock.getsockopt(zmq.FD)
            self.loop.add_reader(fd, self.on_ready)

    def unregister(self, sock: Any) -> None:
        """Stop watching ``sock`` (before it is closed: its descriptor may be reused)."""
        self.poller.unregister(sock)
        fd = self._fds.pop(sock, None)
        if fd is not None and self.loop is not None:
            self.loop.remove_reader(fd)

    def poll(self, timeout_ms: int) -> list[tuple[Any, int]]:
        return self.poller.poll(timeout_ms)


class ZmqSubscriber:
    """Subscribe to workers' KV events and feed them to ``router``, on a thread or an event loop.

    >>> from kvroute import Router
    >>> router = Router(block_size=16, workers=[0])
    >>> with ZmqSubscriber(router) as sub:          # doctest: +SKIP
    ...     sub.subscribe(0, "tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")
    ...     ...                                      # route() as usual

    By default the subscriber runs on a background thread of its own. With
    ``loop`` it runs on that asyncio event loop instead, between the loop's
    other callbacks: a proxy that routes on its event loop then applies
    events on the same thread, with no second thread to wake and no
    interpreter-lock hand-off per batch (the proxy's CPU per request drops by
    about as much as the thread cost; docs/cluster.md). A batch is then
    applied between two of the loop's callbacks, so ``route()`` on that loop
    always sees whole batches; a long replay (a late joiner's history: up to
    10,000 batches, ~40 us each) is applied 256 batches a turn of the loop,
    its worker's live batches waiting meanwhile as during the replay.
    Its methods may still be called from any thread, except :meth:`wait_for`
    (which would block the loop it waits on).

    :param router: the router whose index the events feed.
    :param fmt: the default wire format: ``"vllm"``, ``"sglang"``, or another
        registered with :func:`kvroute.events.register_decoder` (``zmq=True``).
    :param metrics: a :class:`kvroute.events.metrics.Metrics` to count into, or None.
    :param topic: the default topic prefix (vLLM's and SGLang's default is ``""``).
    :param applier: a configured :class:`EventApplier` (default: one with
        kvroute-keyed blocks for ``router``).
    :param replay_timeout: seconds to wait for each replay reply; the other
        workers' events keep flowing meanwhile.
    :param max_message_bytes: a larger message is rejected undecoded (counted
        ``rejected``); the batch it carried is then a gap, and its replay is
        rejected the same way, so the worker is cleared. It bounds decoding,
        not memory: ZMQ has received the message by then. (Not ZMQ's
        ``MAXMSGSIZE``: libzmq drops a connection over it and never
        reconnects it.)
    :param reconnect_interval: ZMQ's reconnect interval (s) after a worker drops.
    :param poll_interval: how often (s) the subscriber looks at its command
        queue and replay deadlines when no events arrive.
    :param on_batch: called on the subscriber's thread (or loop) after each
        applied batch as ``on_batch(worker, seq)``; for tests and instrumentation.
    :param loop: run on this asyncio event loop instead of a thread of its own.
    """

    def __init__(
        self,
        router: Router,
        *,
        fmt: str = "vllm",
        metrics: Metrics | None = None,
        topic: str = "",
        applier: EventApplier | None = None,
        replay_timeout: float = 2.0,
        max_message_bytes: int = 64 << 20,
        reconnect_interval: float = 0.1,
        poll_interval: float = 0.05,
        on_batch: Callable[[int, int], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        fmt = _check_format(fmt)
        if replay_timeout <= 0 or poll_interval <= 0 or reconnect_interval <= 0:
            raise ValueError("timeouts and intervals must be > 0")
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be >= 1024")
        self.router = router
        self.fmt = fmt
        self.metrics = metrics
        self.topic = topic
        self.applier = applier if applier is not None else EventApplier(router, metrics=metrics)
        self.replay_timeout = float(replay_timeout)
        self.max_message_bytes = int(max_message_bytes)
        self._reconnect_ms = max(1, int(reconnect_interval * 1000))
        self._poll_ms = max(1, int(poll_interval * 1000))
        self._on_batch = on_batch
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._thread: threading.Thread | None = None
        self._loop = loop
        self._attached = False  # running on the loop
        self._tick: asyncio.TimerHandle | None = None
        self._commands: deque[tuple[str, Any]] = deque()  # appended from any thread
        self._more = False  # a round left something to read (see _on_ready)
        self._streams: dict[int, WorkerStream] = {}
        self._by_sock: dict[Any, WorkerStream] = {}
        # workers whose live socket is out of the poller: a replay in flight, or on a
        # loop its batches being applied
        self._replaying: dict[int, WorkerStream] = {}
        self._watch: _Watch | None = None
        self._lock = threading.Lock()  # guards reads of _streams from other threads
        self._warn = RateLimitedLog(logger)
        self._error: BaseException | None = None

    # -- public API (any thread) ---------------------------------------------------

    def subscribe(
        self,
        worker: int,
        endpoint: str,
        replay_endpoint: str | None = None,
        *,
        topic: str | None = None,
        fmt: str | None = None,
        resume: tuple[int, int] | None = None,
    ) -> None:
        """Start following ``worker``'s events at ``endpoint`` (replacing any earlier one).

        The first batch received is checked against ``seq`` 0: a subscriber that
        joins a running engine asks the replay endpoint for the buffered history,
        so the index starts from what the engine still holds.

        :param resume: ``(seq, digest)``: the index already holds the worker's
            blocks up to and including batch ``seq``, whose payload's
            :func:`payload_digest` is ``digest`` (a snapshot taken by
            :meth:`capture`). The stream continues from ``seq + 1``, replaying
            what it missed; if the engine's history no longer has batch ``seq``
            or has another one there (it restarted), the worker is cleared and
            rebuilt from the history, as after any restart; without a replay
            endpoint, the first gap clears it.
        :raises ValueError: an unknown format, or a negative ``seq``.
        """
        f = self.fmt if fmt is None else _check_format(fmt)
        stream = WorkerStream(
            int(worker), endpoint, replay_endpoint, self.topic if topic is None else topic, f
        )
        if resume is not None:
            seq, digest = int(resume[0]), int(resume[1])
            if seq < 0:
                raise ValueError(f"resume seq must be >= 0, got {seq}")
            stream.last_seq = seq
            stream.recent[seq] = digest
        self._command("subscribe", stream)

    def capture(self, fn: Callable[[dict[int, tuple[int, int]]], Any]) -> Future[Any]:
        """Run ``fn(positions)`` on the subscriber's thread (or loop), between two batches.

        ``positions`` maps each worker whose stream applied a batch to
        ``(last applied seq, its payload's digest)``. Nothing is applied to
        the index while ``fn`` runs, so a dump of the index taken in ``fn``
        holds exactly the batches up to those positions: what
        :meth:`subscribe`'s ``resume`` needs to continue from it.

        :returns: a future of ``fn``'s result (or its exception).
        :raises RuntimeError: the subscriber is not running.
        """
        if not self.running:
            raise RuntimeError("the ZMQ subscriber is not running")
        fut: Future[Any] = Future()
        self._command("capture", (fn, fut))
        return fut

    def unsubscribe(self, worker: int) -> threading.Event:
        """Stop following ``worker`` (its blocks stay in the index).

        :returns: an event set once the subscriber has closed the
            worker's sockets: none of its batches is applied after that (set
            at once if the subscriber is not running).
        """
        done = threading.Event()
        if not self._started:
            done.set()
        self._command("unsubscribe", (int(worker), done))
        return done

    def resync(self, worker: int) -> None:
        """Check ``worker``'s engine through its replay endpoint, as after a reconnect.

        Runs on the subscriber's thread (or loop), soon. Useful when something outside ZMQ
        says the engine may have restarted (e.g. its HTTP health check failed
        and recovered); reconnects of the event socket trigger it by themselves.
        """
        self._command("resync", int(worker))

    def start(self) -> ZmqSubscriber:
        """Start following (idempotent): the background thread, or the readers on ``loop``."""
        if self._started:
            return self
        self._ctx = zmq.Context()
        if self._loop is None:
            self._thread = threading.Thread(
                target=self._run, name="kvroute-zmq-subscriber", daemon=True
            )
            self._thread.start()
        else:
            self._attached = True
            self._watch = _Watch(self._loop, self._on_ready)
            self._on_loop(self._schedule_tick)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following and close every socket; safe to call twice.

        On a loop, call it from the loop's thread, or from another while the
        loop runs (it then waits up to ``timeout`` for the loop to do it).
        """
        if self._loop is not None:
            if self._attached:
                done = threading.Event()

                def detach() -> None:
                    self._detach()
                    done.set()

                self._on_loop(detach)
                if not done.wait(timeout):  # pragma: no cover - a wedged loop
                    raise RuntimeError("the event loop did not stop the ZMQ subscriber")
        else:
            thread = self._thread
            if thread is None:
                return
            self._commands.append(("stop", None))
            thread.join(timeout)
            if thread.is_alive():  # pragma: no cover - a wedged replay; sockets close with it
                raise RuntimeError("the ZMQ subscriber thread did not stop")
            self._thread = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> ZmqSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while the subscriber follows its workers (its thread, or its loop's readers)."""
        if self._loop is not None:
            return self._attached
        return self._thread is not None and self._thread.is_alive()

    @property
    def _started(self) -> bool:
        return self._attached or self._thread is not None

    def streams(self) -> dict[int, WorkerStream]:
        """A snapshot of every subscribed worker's stream state (copies)."""
        with self._lock:
            return {
                w: WorkerStream(
                    s.worker,
                    s.endpoint,
                    s.replay_endpoint,
                    s.topic,
                    s.fmt,
                    s.last_seq,
                    Counter(s.counts),
                )
                for w, s in self._streams.items()
            }

    def wait_for(
        self, predicate: Callable[[dict[int, WorkerStream]], bool], timeout: float = 5.0
    ) -> bool:
        """Poll :meth:`streams` until ``predicate`` holds; False on timeout.

        :raises RuntimeError: called on the event loop the subscriber runs on
            (nothing could change while it waits), or the subscriber failed.
        """
        if self._loop is not None and _running_loop() is self._loop:
            raise RuntimeError("wait_for would block the event loop the subscriber runs on")
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.streams()):
                return True
            if self._error is not None:
                raise RuntimeError("the ZMQ subscriber failed") from self._error
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    # -- the thread, or the loop ------------------------------------------------------

    def _command(self, cmd: str, arg: Any) -> None:
        self._commands.append((cmd, arg))
        loop = self._loop
        if self._attached and loop is not None:  # (the thread looks every poll_interval)
            if _running_loop() is loop:
                loop.call_soon(self._on_ready)  # not now: the caller may be inside a round
            else:
                loop.call_soon_threadsafe(self._on_ready)

    def _on_loop(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the subscriber's loop: now if this is its thread (or it is not running)."""
        loop = self._loop
        assert loop is not None
        if _running_loop() is loop or not loop.is_running():
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _run(self) -> None:
        self._watch = _Watch()
        try:
            while self._round(self._poll_ms):
                pass
        except BaseException as e:  # pragma: no cover - surfaced via wait_for / logs
            self._error = e
            logger.exception("ZMQ subscriber thread failed")
        finally:
            for s in list(self._streams.values()):
                self._close(s)

    def _round(self, timeout_ms: int) -> bool:
        """Commands, then what the sockets hold (waiting up to ``timeout_ms``); False on stop."""
        if not self._drain_commands():
            return False
        assert self._watch is not None
        for sock, _ in self._watch.poll(timeout_ms):
            stream = self._by_sock.get(sock)
            if stream is None:  # pragma: no cover - closed earlier in this round
                continue
            if sock is stream.monitor:
                self._on_monitor(stream)
                self._more = True  # one event read: another may wait
            elif stream.replay is not None:
                if sock is stream.replay.sock:
                    self._on_replay(stream)
                # else: a replay began earlier in this round; live waits
            else:
                # Drain what is queued on this socket, bounded so one busy
                # worker cannot starve the others or the command queue.
                for _ in range(256):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(stream, frames)
                    if stream.replay is not None:
                        break  # a gap: the rest waits for the replay
                    if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break  # drained (asking costs less than a recv raising Again)
                else:
                    self._more = True  # the rest next round
        self._expire_replays()
        self._tend_waiting()
        return True

    def _on_ready(self) -> None:
        """On the loop: a socket has news (or a command came, or the tick): one round."""
        if not self._attached:
            return
        watch = self._watch
        assert watch is not None and self._loop is not None
        try:
            self._more = False
            self._round(0)
            # What a round left (a bounded drain, a second monitor event) and
            # what a socket watched anew holds raise no new edge on the
            # descriptors: come back for it.
            if (self._more or watch.fresh) and not self._loop.is_closed():
                watch.fresh = False
                if watch.poll(0):
                    self._loop.call_soon(self._on_ready)
        except Exception as e:  # pragma: no cover - surfaced via wait_for / logs
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        """On the loop: what the thread's end is to a thread (logged, seen by ``wait_for``)."""
        self._error = e
        logger.exception("ZMQ subscriber failed")
        self._detach()

    def _schedule_tick(self) -> None:
        """On the loop: a round every ``poll_interval``, for replay deadlines and commands."""
        assert self._loop is not None
        self._tick = self._loop.call_later(self._poll_ms / 1000, self._ticked)

    def _ticked(self) -> None:
        self._on_ready()
        if self._attached:
            self._schedule_tick()

    def _detach(self) -> None:
        """On the loop: close every socket, take the readers off, stop ticking."""
        if not self._attached:
            return
        self._attached = False
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for s in list(self._streams.values()):
            self._close(s)

    def _drain_commands(self) -> bool:
        while self._commands:  # (only this thread takes them)
            cmd, arg = self._commands.popleft()
            if cmd == "stop":
                return False
            if cmd == "subscribe":
                old = self._streams.get(arg.worker)
                if old is not None:
                    self._close(old)
                    with self._lock:
                        del self._streams[arg.worker]
                try:
                    self._open(arg)
                except zmq.ZMQError as e:  # a bad endpoint must not stop the other workers
                    logger.error(
                        "worker %s: cannot subscribe to %s: %s", arg.worker, arg.endpoint, e
                    )
            elif cmd == "resync":
                stream = self._streams.get(arg)
                if stream is not None and stream.replay_endpoint is not None:
                    self._resync(stream)
            elif cmd == "capture":
                fn, fut = arg
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self._positions()))
                    except BaseException as e:  # handed to the caller, not raised here
                        fut.set_exception(e)
            elif cmd == "unsubscribe":
                worker, done = arg
                old = self._streams.get(worker)
                if old is not None:
                    self._close(old)
                    with self._lock:
                        del self._streams[worker]
                    self.applier.forget(worker)
                done.set()
        return True

    def _positions(self) -> dict[int, tuple[int, int]]:
        out = {}
        for w, st in self._streams.items():
            digest = st.recent.get(st.last_seq)
            if st.last_seq >= 0 and digest is not None:
                out[w] = (st.last_seq, digest)
        return out

    def _open(self, stream: WorkerStream) -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)  # IPv6 endpoints too (a worker found by an AAAA record)
        sock.setsockopt(zmq.RECONNECT_IVL, self._reconnect_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(self._reconnect_ms, 2000))
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.SUBSCRIBE, stream.topic.encode())
        stream.monitor = sock.get_monitor_socket(_MONITORED)
        watch = self._watch
        assert watch is not None
        watch.register(stream.monitor)
        self._by_sock[stream.monitor] = stream
        try:
            sock.connect(stream.endpoint)
        except zmq.ZMQError:  # e.g. a transport ZMQ does not know: undo, tell the caller
            watch.unregister(stream.monitor)
            self._by_sock.pop(stream.monitor, None)
            sock.disable_monitor()
            stream.monitor.close(linger=0)
            stream.monitor = None
            sock.close(linger=0)
            raise
        stream.sock = sock
        watch.register(sock)
        self._by_sock[sock] = stream
        with self._lock:
            self._streams[stream.worker] = stream

    def _close(self, stream: WorkerStream) -> None:
        watch = self._watch
        assert watch is not None
        if stream.monitor is not None:
            watch.unregister(stream.monitor)
            self._by_sock.pop(stream.monitor, None)
            stream.sock.disable_monitor()
            stream.monitor.close(linger=0)
            stream.monitor = None
        if stream.replay is not None:
            self._drop_replay(stream)  # its live socket is out of the poller
        elif stream.backlog is not None:
            stream.backlog = None  # (its live socket too)
            self._replaying.pop(stream.worker, None)
        elif stream.sock is not None:
            watch.unregister(stream.sock)
        if stream.sock is not None:
            self._by_sock.pop(stream.sock, None)
            stream.sock.close(linger=0)
            stream.sock = None

    # -- one message ---------------------------------------------------------------

    def _count(self, stream: WorkerStream, status: str, n: int = 1) -> None:
        with self._lock:
            stream.counts[status] += n
        if self.metrics is not None and status in _METRIC_STATUSES:
            self.metrics.event_applied(stream.worker, status, n)

    def _parse(self, stream: WorkerStream, frames: list[bytes]) -> tuple[int, bytes] | None:
        """``(seq, payload)`` of a live or replayed message, or None if malformed."""
        if len(frames) == 4 and frames[0] == b"":  # a DEALER's view: delimiter first
            frames = frames[1:]
        if len(frames) != 3 or len(frames[1]) != 8:
            self._refused(
                stream, "malformed", f"{len(frames)} frames (expected [topic, seq, payload])"
            )
            return None
        if len(frames[2]) > self.max_message_bytes:
            why = f"{len(frames[2])} bytes, over max_message_bytes ({self.max_message_bytes})"
            self._refused(stream, "rejected", why)
            return None
        return int.from_bytes(frames[1], "big"), frames[2]

    def _refused(self, stream: WorkerStream, status: str, why: str) -> None:
        """Count a message left unapplied (``malformed`` / ``rejected``); warn, rate-limited."""
        self._count(stream, status)
        self._warn.warning(
            (stream.worker, status),
            "worker %s (%s): %s KV event message: %s",
            stream.worker,
            stream.endpoint,
            status,
            why,
        )

    def _on_frames(self, stream: WorkerStream, frames: list[bytes]) -> None:
        parsed = self._parse(stream, frames)
        if parsed is None:
            return
        seq, payload = parsed
        if seq == END_SEQ:  # an end marker on the live socket: nothing to apply
            return
        if seq <= stream.last_seq:
            if stream.recent.get(seq) == _digest(payload):
                self._count(stream, "duplicate")  # already applied from a replay
                return
            # The counter went backwards: the engine restarted with an empty cache.
            self._restarted(stream, f"event seq went back from {stream.last_seq} to {seq}")
        if seq > stream.last_seq + 1:
            self._fill_gap(stream, seq, payload)
            return
        self._apply(stream, seq, payload)

    def _apply(self, stream: WorkerStream, seq: int, payload: bytes) -> None:
        stream.recent[seq] = _digest(payload)
        stream.recent.pop(seq - _RECENT, None)
        batch = self._decode(stream, payload)
        counts = None if batch is None else self.applier.apply_batch(stream.worker, batch)
        # published after the router has the batch: whoever sees the seq sees its blocks
        with self._lock:
            stream.last_seq = seq
            stream.counts["batches"] += 1
            if counts:
                stream.counts.update(counts)
        if self._on_batch is not None:
            self._on_batch(stream.worker, seq)

    def _decode(self, stream: WorkerStream, payload: bytes) -> EventBatch | None:
        try:
            return decode(payload, stream.fmt)
        except DecodeError as e:
            self._refused(stream, "malformed", str(e))
            return None

    def _restarted(self, stream: WorkerStream, why: str) -> None:
        """The engine behind ``stream`` restarted: forget it, follow the new one from 0."""
        self._warn.warning(
            (stream.worker, "restart"),
            "worker %s: engine restart (%s); clearing its blocks",
            stream.worker,
            why,
        )
        self._clear(stream)
        stream.last_seq = -1
        # counted last: whoever sees the count (streams(), wait_for) sees the clear
        self._count(stream, "restart")

    def _clear(self, stream: WorkerStream) -> None:
        # Counted by the caller, under its reason (restart / replay_failed):
        # ``cleared`` is the engine's own AllBlocksCleared.
        stream.recent.clear()
        self.applier.cleared(stream.worker)

    def _replay_failed(self, stream: WorkerStream, what: str, why: str) -> None:
        self._warn.warning(
            (stream.worker, "replay"),
            "worker %s: could not replay KV events %s (%s); clearing its blocks",
            stream.worker,
            what,
            why,
        )
        stream.recent.clear()
        self.applier.events_lost(stream.worker, f"KV events {what} lost: {why}")
        self._count(stream, "replay_failed")

    # -- reconnects -------------------------------------------------------------------

    def _tend_waiting(self) -> None:
        """Let libzmq process the live sockets a replay keeps out of the poller.

        A SUB socket re-sends its subscription on a new connection only when
        its owner touches it (a poll or a read). Unpolled while its worker's
        replay is in flight, a reconnected socket would stay unsubscribed and
        the publisher would drop every batch it sends: a loss nobody sees.
        Reading ``EVENTS`` processes the socket's pending commands and
        leaves its messages queued.
        """
        for stream in self._replaying.values():
            if stream.sock is not None:
                stream.sock.getsockopt(zmq.EVENTS)

    def _on_monitor(self, stream: WorkerStream) -> None:
        try:
            event = recv_monitor_message(stream.monitor, zmq.NOBLOCK)
        except zmq.Again:  # pragma: no cover - poll said readable
            return
        if stream.sock is not None:
            stream.sock.getsockopt(zmq.EVENTS)  # see _tend_waiting
        if event["event"] == zmq.EVENT_CONNECTED:
            self._count(stream, "connects")
            if stream.replay_endpoint is not None:
                self._resync(stream)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            # ZMQ reconnects by itself, with its backoff; what was lost
            # meanwhile shows as a gap. (Reconnecting the socket from here
            # instead trips a libzmq assertion when the drop cut a message.)
            self._count(stream, "disconnects")

    def _resync(self, stream: WorkerStream) -> None:
        """Check, through the replay endpoint, that the engine is the one we followed."""
        if stream.replay is not None or stream.backlog is not None:
            stream.resync_due = True  # after the exchange in flight (and its batches)
            return
        last = stream.last_seq
        self._start_replay(
            stream, max(last, 0), END_SEQ, functools.partial(self._resynced, stream, last)
        )

    def _resynced(self, stream: WorkerStream, last: int, got: Replayed) -> None:
        if got is None:
            self._warn.warning(
                (stream.worker, "resync"),
                "worker %s: its replay endpoint %s did not answer a resync; an engine "
                "restart while disconnected shows only once it publishes again",
                stream.worker,
                stream.replay_endpoint,
            )
            return
        if last >= 0:
            if got and got[0][0] == last and _digest(got[0][1]) == stream.recent.get(last):
                self._apply_run(stream, got[1:], last + 1)  # the same engine: catch up
                return
            # The batch we applied last is gone or different: a new engine.
            self._restarted(stream, f"reconnected and seq {last} is not in its history")
            self._start_replay(stream, 0, END_SEQ, functools.partial(self._rebuild, stream))
            return
        self._rebuild(stream, got)

    def _rebuild(self, stream: WorkerStream, got: Replayed) -> None:
        """Apply an engine's buffered history, from its oldest buffered batch."""
        if got is not None:
            self._apply_run(stream, got, got[0][0] if got else 0)

    def _apply_run(self, stream: WorkerStream, got: list[tuple[int, bytes]], first: int) -> None:
        """Apply replayed batches that continue the stream from ``first`` without a hole."""
        seqs = [s for s, _ in got]
        if seqs != list(range(first, first + len(seqs))):
            self._replay_failed(stream, f"from {first}", f"replies skip from {first} to {seqs}")
            return
        self._apply_replayed(stream, got)

    def _apply_replayed(
        self,
        stream: WorkerStream,
        got: list[tuple[int, bytes]],
        live: tuple[int, bytes] | None = None,
    ) -> None:
        """Apply replayed batches (counted ``replayed``), then the live batch that waited.

        On a loop, a run longer than a slice goes a slice a turn
        (:meth:`_next_slice`), the worker's live socket out of the poller.
        """
        if self._loop is None or len(got) <= _SLICE:
            for s, payload in got:
                self._apply(stream, s, payload)
            self._count(stream, "replayed", len(got))
            if live is not None:
                self._apply(stream, *live)
            return
        stream.backlog = _Backlog(deque(got), len(got), live)
        if stream.sock is not None:
            assert self._watch is not None
            self._watch.unregister(stream.sock)
        self._replaying[stream.worker] = stream  # its live socket is tended meanwhile
        self._loop.call_soon(self._next_slice, stream)

    def _next_slice(self, stream: WorkerStream) -> None:
        backlog = stream.backlog
        if backlog is None or not self._attached:  # closed meanwhile
            return
        try:
            for _ in range(min(_SLICE, len(backlog.todo))):
                self._apply(stream, *backlog.todo.popleft())
            if backlog.todo:
                assert self._loop is not None
                self._loop.call_soon(self._next_slice, stream)
                return
            stream.backlog = None
            self._replaying.pop(stream.worker, None)
            self._count(stream, "replayed", backlog.replayed)
            if backlog.live is not None:
                self._apply(stream, *backlog.live)
            if stream.sock is not None:
                assert self._watch is not None and self._loop is not None
                self._watch.register(stream.sock)
                self._loop.call_soon(self._on_ready)  # what queued meanwhile raised no edge
            self._resync_if_due(stream)
        except Exception as e:  # pragma: no cover - surfaced via wait_for / logs
            self._failed(e)

    # -- gaps -------------------------------------------------------------------------

    def _fill_gap(self, stream: WorkerStream, seq: int, payload: bytes) -> None:
        """Replay ``last_seq + 1 .. seq - 1`` (or clear), then apply the live batch ``seq``."""
        start = stream.last_seq + 1
        joining = stream.last_seq < 0  # first contact with a running engine
        if not joining:
            self._count(stream, "gap")
        if stream.replay_endpoint is not None:
            then = functools.partial(self._gap_replayed, stream, start, seq, payload, joining)
            self._start_replay(stream, start, seq, then)
            return
        if not joining:  # a joiner without history to ask for starts from here
            self._replay_failed(
                stream, f"{start}..{seq - 1}", f"no replay endpoint; resuming at {seq}"
            )
        else:
            self.applier.events_lost(
                stream.worker, f"joined a running engine at seq {seq} with no replay endpoint"
            )
        self._apply(stream, seq, payload)

    def _gap_replayed(
        self,
        stream: WorkerStream,
        start: int,
        seq: int,
        payload: bytes,
        joining: bool,
        got: Replayed,
    ) -> None:
        if got is not None:
            seqs = [s for s, _ in got]
            # A late joiner takes whatever recent history the engine still buffers.
            first = seq - len(seqs) if joining else start
            if seqs == list(range(first, seq)):
                self._apply_replayed(stream, got, (seq, payload))
                return
        self._replay_failed(
            stream, f"{start}..{seq - 1}", f"replay incomplete or timed out; resuming at {seq}"
        )
        self._apply(stream, seq, payload)

    # -- the replay exchange ------------------------------------------------------------

    def _start_replay(
        self, stream: WorkerStream, start: int, stop: int, then: Callable[[Replayed], None]
    ) -> None:
        """Ask for batches from ``start``; ``then`` gets the ones below ``stop``, or None.

        The replies are read by the poll loop; until ``then`` has run, the
        worker's live socket is out of the poller, so its live batches queue
        up behind the replay and the other workers' do not wait.
        """
        assert self._ctx is not None and self._watch is not None
        assert stream.replay is None and stream.replay_endpoint is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(stream.replay_endpoint)
            sock.send_multipart([b"", start.to_bytes(8, "big")], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            self._warn.warning(
                (stream.worker, "replay-error"), "worker %s: replay failed: %s", stream.worker, e
            )
            then(None)
            return
        deadline = time.monotonic() + self.replay_timeout
        stream.replay = _Replay(sock, start, stop, deadline, then)
        self._by_sock[sock] = stream
        self._replaying[stream.worker] = stream
        self._watch.register(sock)
        self._watch.unregister(stream.sock)

    def _on_replay(self, stream: WorkerStream) -> None:
        r = stream.replay
        assert r is not None
        while True:
            try:
                frames = r.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as e:  # pragma: no cover - the context is going away
                self._warn.warning(
                    (stream.worker, "replay-error"),
                    "worker %s: replay failed: %s",
                    stream.worker,
                    e,
                )
                self._end_replay(stream, None)
                return
            r.deadline = time.monotonic() + self.replay_timeout  # it answers: wait anew
            parsed = self._parse(stream, frames)
            if parsed is None:
                self._end_replay(stream, None)
                return
            s, payload = parsed
            if s == END_SEQ:
                self._end_replay(stream, r.got)
                return
            if r.start <= s < r.stop and (not r.got or s > r.got[-1][0]):
                r.got.append((s, payload))

    def _expire_replays(self) -> None:
        if self._replaying:
            now = time.monotonic()
            for stream in list(self._replaying.values()):
                if stream.replay is not None and stream.replay.deadline <= now:
                    self._end_replay(stream, None)

    def _drop_replay(self, stream: WorkerStream) -> _Replay:
        r = stream.replay
        assert r is not None and self._watch is not None
        stream.replay = None
        self._watch.unregister(r.sock)
        self._by_sock.pop(r.sock, None)
        self._replaying.pop(stream.worker, None)
        r.sock.close(linger=0)
        return r

    def _end_replay(self, stream: WorkerStream, got: Replayed) -> None:
        r = self._drop_replay(stream)
        assert self._watch is not None
        self._watch.register(stream.sock)  # a new replay takes it out again
        r.then(got)
        self._resync_if_due(stream)

    def _resync_if_due(self, stream: WorkerStream) -> None:
        """Run the resync asked for while a replay (or its batches) kept the stream busy."""
        if stream.resync_due and stream.replay is None and stream.backlog is None:
            stream.resync_due = False
            self._resync(stream)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def payload_digest(payload: bytes) -> int:
    """The digest the subscriber keeps of each applied batch's payload (XXH3-64).

    >>> payload_digest(b"abc") == payload_digest(b"abc") != payload_digest(b"abd")
    True
    """
    return xxhash.xxh3_64_intdigest(payload)


_digest = payload_digest

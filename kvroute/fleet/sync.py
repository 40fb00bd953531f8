"""Replica sync: router replicas share, through Redis or Valkey, what the KV events don't carry.

Several routers behind one load balancer each keep their own
:class:`~kvroute.BlockIndex`, fed straight from every worker's KV events (the
events already are a replicated log). :class:`ReplicaSync`, one per router,
shares the rest through one Redis or Valkey server (``redis.asyncio``, which
speaks to both):

* each replica's **own load** per worker (requests in flight, queued
  prefill, decode blocks), which the others add to theirs
  (:mod:`kvroute.remote`); it is a heartbeat too, and it stops counting
  ``load_ttl`` seconds after a replica's last message (three heartbeats), so a
  dead replica's load does not stay;
* its **routing decisions**: a sibling routed by another replica follows the
  first one before the engine's first event (fresh decisions), and without
  KV events every replica predicts residency from every decision; with
  them, the session and ``cache_control`` **pins** and their TTLs;
* **worker health** as each replica sees it, **response ids** (which worker
  produced ``previous_response_id``: :class:`~kvroute.fleet.responses.RedisResponseStore`)
  and **membership** changes (:class:`~kvroute.fleet.share.MembershipShare`);
* an **index snapshot** for a replica that starts late: one replica at a
  time (a lease) writes its index and each worker's event position every
  ``snapshot_interval`` seconds; a new replica loads it and follows the
  events from those positions, replaying what it missed through each
  engine's replay endpoint (:meth:`kvroute.events.ZmqSubscriber.subscribe`'s
  ``resume``). It also replays the last ``history`` seconds of the others'
  messages (decisions, pins, load), and reads the pins that outlive them.

Redis is never on the ``route()`` path: the router hands each decision to
this object (:meth:`Router.share <kvroute.router.Router.share>`: a deque
append), a writer task sends it at once with what else is due, and a reader
task blocks on the stream and applies what arrives in batches
(:meth:`Router.apply_remote <kvroute.router.Router.apply_remote>`).

**Staleness bound.** A decision reaches the other replicas one Redis round
trip after it is made, plus the time the reader's event loop takes to get
to it (the writer wakes on every decision; ``XREAD BLOCK`` returns on every
``XADD``): about a millisecond on one host (``benchmarks/bench_sync.py``
measures it). Load changes that are not decisions (first tokens, finishes)
are sent every ``interval`` seconds (20 ms), so they arrive within
``interval`` plus that.

**Failures.** Redis down or unreachable: each replica routes on its own
view (its own load; the others' stops counting after ``load_ttl``), logs one
line, reports ``up`` False (``kvroute_sync_up`` 0 on the proxy's
``/metrics``), keeps its decisions and changes, and retries every
``retry`` seconds. No request waits or fails for it. When Redis returns,
the replica re-publishes its own state (load, the decisions and pins made
meanwhile, health, response ids) and catches up on the stream from where
it stopped.

The same object serves a proxy of one's own: start it beside the router
(asyncio), or use :class:`ReplicaSyncThread`, which runs it on a thread of its
own::

    router = Router(block_size=16, workers=range(4))
    sync = ReplicaSync(router, "redis://10.0.0.9:6379/0", replica_id="edge-1")
    resume = await sync.start()          # before the KV-event subscriber
    ...                                  # route() as usual
    await sync.stop()

Needs the ``fleet`` extra (``redis``) and ``msgspec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..remote import RemoteUpdate, ReplicaLoad, Routed
from .wire import (
    Keys,
    Message,
    WireError,
    decode,
    decode_snapshot,
    encode,
    encode_snapshot,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ..router import Router

__all__ = ["ReplicaSync", "ReplicaSyncThread", "SyncConfigError", "default_replica_id"]

log = logging.getLogger("kvroute.sync")

#: Decisions kept while Redis is away (oldest dropped first), re-sent on its return.
OUTBOX_MAX: Final = 10_000
#: Stream entries read at once.
_READ_COUNT: Final = 1_000
# Redis' own errors and the OS's, whichever the client raises.
_NET_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, asyncio.TimeoutError)


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (redis.exceptions.RedisError, *_NET_ERRORS)


class SyncConfigError(RuntimeError):
    """This replica must not join the fleet's sync: another replica uses its id, or the
    replicas were started with different ``--worker`` lists."""


def default_replica_id() -> str:
    """``HOSTNAME-PID``: unique per process, readable in logs.

    >>> default_replica_id().endswith(str(os.getpid()))
    True
    """
    return f"{socket.gethostname()}-{os.getpid()}"


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def redact(url: str) -> str:
    """The URL without its password, for logs.

    >>> redact("redis://user:secret@10.0.0.9:6379/0")
    'redis://user:***@10.0.0.9:6379/0'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class ReplicaSync:
    """Share one router's state with its replicas through Redis / Valkey (module docstring).

    Use from one asyncio event loop: :meth:`start` on it, then the loop runs
    the sync's tasks. The router may be called from any thread.

    :param router: this replica's router.
    :param url: ``redis://[user:password@]host:port/db`` (``rediss://`` for TLS);
        Valkey takes the same URLs.
    :param replica_id: this replica's name, unique in the fleet (default:
        :func:`default_replica_id`); a restarted replica may reuse its name.
    :param prefix: the keys' prefix (fleets may share a database under
        different prefixes).
    :param workers: the URLs of the workers named at start, in id order:
        every replica must be started with the same list (checked through Redis).
    :param interval: seconds between load updates (decisions go at once).
    :param heartbeat: seconds between messages when nothing changes.
    :param load_ttl: seconds a replica's load counts after its last message
        (default: three heartbeats).
    :param retry: seconds between reconnection attempts while Redis is away.
    :param timeout: seconds a Redis command may take before Redis counts as away.
    :param snapshot_interval: seconds between index snapshots (0: never write
        any); only with KV events, and only once :meth:`attach_subscriber` gave
        the subscriber.
    :param history: seconds of the others' messages a starting replica
        replays (default: the router's predicted-residency TTL without KV
        events, its fresh-decision TTL with them; at least three heartbeats).
    :param stream_maxlen: entries the stream keeps (approximately).
    :param rendezvous_ties: switch a ``kvroute`` policy to rendezvous
        tie-breaks (replicas that have not heard from each other agree).
    :raises ValueError: a bad setting.
    """

    def __init__(
        self,
        router: Router,
        url: str,
        *,
        replica_id: str | None = None,
        prefix: str = "kvroute",
        workers: Sequence[str] = (),
        interval: float = 0.02,
        heartbeat: float = 1.0,
        load_ttl: float | None = None,
        retry: float = 0.5,
        timeout: float = 1.0,
        snapshot_interval: float = 30.0,
        history: float | None = None,
        stream_maxlen: int = 100_000,
        rendezvous_ties: bool = True,
    ) -> None:
        for name, v in (("interval", interval), ("heartbeat", heartbeat), ("retry", retry),
                        ("timeout", timeout)):  # fmt: skip
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not snapshot_interval >= 0:
            raise ValueError(f"snapshot_interval must be >= 0, got {snapshot_interval!r}")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"sync URL must be redis://HOST:PORT/DB (or rediss://), not {url!r}")
        rid = replica_id if replica_id is not None else default_replica_id()
        if not rid or any(c.isspace() for c in rid):
            raise ValueError(f"replica_id must be a non-empty name without spaces, not {rid!r}")
        if not prefix or ":" in prefix:
            raise ValueError(f"prefix must be a non-empty name without ':', not {prefix!r}")
        self.router = router
        self.url = url
        self.replica_id = rid
        self.keys = Keys(prefix)
        self.workers = [str(w) for w in workers]
        self.interval = float(interval)
        self.heartbeat = float(heartbeat)
        self.load_ttl = 3.0 * self.heartbeat if load_ttl is None else float(load_ttl)
        self.retry = float(retry)
        self.timeout = float(timeout)
        self.snapshot_interval = float(snapshot_interval)
        cfg = router.config
        if history is None:
            history = cfg.fresh_ttl if router.kv_events else cfg.predicted_ttl
        self.history = max(float(history), self.load_ttl)
        self.stream_maxlen = int(stream_maxlen)
        self.rendezvous_ties = rendezvous_ties
        #: A token unique to this process's life: its own messages are skipped by it.
        self.instance = uuid.uuid4().hex
        #: Called as ``on_health(replica, worker, healthy)`` for another replica's view.
        self.on_health: Callable[[str, int, bool], None] | None = None
        #: Called as ``on_response(response_id, worker, seconds_left)``.
        self.on_response: Callable[[str, int, float], None] | None = None
        #: Called as ``on_member(replica, kind, member_id, spec, state)``.
        self.on_member: Callable[[str, str, int, Mapping[str, Any], str], None] | None = None
        #: Called after each reconnection (to re-publish what Redis may have lost).
        self.on_reconnect: list[Callable[[], None]] = []
        self._out: deque[tuple[float, Routed]] = deque(maxlen=OUTBOX_MAX)
        self._health: list[tuple[int, bool]] = []
        self._responses: list[tuple[str, int, float, float]] = []  # id, worker, ttl, made (mono)
        self._members: list[tuple[str, int, Mapping[str, Any], str]] = []
        self._own_pins: dict[str, tuple[int, float]] = {}  # session -> worker, expiry (mono)
        self._rw: Redis | None = None
        self._rd: Redis | None = None
        self._big: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake: asyncio.Event | None = None
        self._armed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriber: Any = None
        self._up = False
        self._warned = False
        self._ever_up = False
        self._refused: str | None = None
        self._full_due = False
        self._last_id = "0-0"
        self._offset = 0.0  # Redis' clock minus ours, seconds
        self._last_load: ReplicaLoad | None = None
        self._next_heartbeat = 0.0
        self._stopping = False
        self._snapshot_holder = False
        self.resume: dict[int, tuple[int, int]] = {}
        self.salts: dict[int, dict[int, str]] = {}
        self._stats: dict[str, float] = dict.fromkeys(
            ("sent", "received", "applied_decisions", "malformed", "reconnects", "snapshots",
             "snapshot_bytes", "delay_sum", "delay_max", "delay_n"),
            0,
        )  # fmt: skip

    # -- state ------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether Redis answers and this replica takes part in the sync."""
        return self._up

    def stats(self) -> dict[str, Any]:
        """Counters and state: messages sent / received, decisions applied, malformed
        messages, reconnects, snapshots written, the mean and max delay of applied
        messages (seconds, Redis' clock), ``up``, ``refused`` (why it stopped, or None)."""
        s: dict[str, Any] = dict(self._stats)
        n = s.pop("delay_n")
        s["delay_mean"] = s.pop("delay_sum") / n if n else 0.0
        s["up"] = self._up
        s["refused"] = self._refused
        s["replicas"] = sorted(self.router.remote_load()["replicas"])
        return s

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, *, load_snapshot: bool = True) -> dict[int, tuple[int, int]]:
        """Connect, join the fleet and start sharing; returns where the events resume.

        With KV events and an empty index, loads the last snapshot (if any) into
        the router's index first: pass the returned ``{worker: (seq, digest)}``
        to the event subscriber (``subscribe(..., resume=...)``) before starting
        it, and :attr:`salts` to its applier (``restore_salts``). Redis being
        away is not an error: the replica starts alone and joins when it returns.

        :raises SyncConfigError: another live replica uses this replica id, or
            the fleet was started with another ``--worker`` list.
        :raises ImportError: ``redis`` is not installed (the ``fleet`` extra).
        """
        from redis.asyncio import Redis

        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        # two clients: the reader's blocking XREAD must not hold up the writer
        self._rw = Redis.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
        )
        self._rd = Redis.from_url(
            self.url,
            socket_timeout=self.heartbeat + self.timeout,
            socket_connect_timeout=self.timeout,
        )
        if self.rendezvous_ties and hasattr(self.router.policy, "tie_break"):
            self.router.policy.tie_break = "rendezvous"
        try:
            await self._join(first=True, load_snapshot=load_snapshot)
        except SyncConfigError:
            await self._close_clients()
            raise
        except _redis_errors() as e:
            self._lost(e)
        self.router.share(self._routed)
        self._tasks = [
            asyncio.create_task(self._reader(), name="kvroute-sync-reader"),
            asyncio.create_task(self._writer(), name="kvroute-sync-writer"),
        ]
        if self.snapshot_interval and self.router.kv_events:
            self._tasks.append(asyncio.create_task(self._snapshots(), name="kvroute-sync-snap"))
        return self.resume

    def attach_subscriber(self, subscriber: Any) -> None:
        """The :class:`~kvroute.events.ZmqSubscriber` feeding the router (for snapshots)."""
        self._subscriber = subscriber

    async def stop(self) -> None:
        """Stop sharing: say goodbye (the others drop this replica's load at once), close."""
        self._stopping = True
        self.router.share(None)
        if self._wake is not None:
            self._wake.set()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # the loops also end on their own within a heartbeat (a blocked XREAD's
            # client may swallow the cancellation)
            await asyncio.wait(self._tasks, timeout=self.heartbeat + 2 * self.timeout)
        self._tasks = []
        if self._up and self._rw is not None:
            with contextlib.suppress(*_redis_errors()):
                bye = Message(self.replica_id, self.instance, bye=True)
                pipe = self._rw.pipeline(transaction=False)
                pipe.xadd(self.keys.log, {"m": encode(bye)},
                          maxlen=self.stream_maxlen, approximate=True)  # fmt: skip
                pipe.delete(self.keys.replica(self.replica_id))
                if self._snapshot_holder:
                    pipe.delete(self.keys.snapshot_lease)
                await asyncio.wait_for(pipe.execute(), self.timeout)
        self._up = False
        await self._close_clients()

    def _big_client(self) -> Redis:
        """A client for snapshots: tens of MB take longer than a command's timeout."""
        if self._big is None:
            from redis.asyncio import Redis

            t = max(30.0, 10 * self.timeout)
            self._big = Redis.from_url(
                self.url, socket_timeout=t, socket_connect_timeout=self.timeout
            )
        return self._big

    async def _close_clients(self) -> None:
        for c in (self._rw, self._rd, self._big):
            if c is not None:
                with contextlib.suppress(Exception):
                    await c.aclose()
        self._rw = self._rd = self._big = None

    # -- joining ------------------------------------------------------------------------

    async def _join(self, *, first: bool, load_snapshot: bool = False) -> None:
        """Check in (id, worker list), then catch up: snapshot, history, pins."""
        rw = self._rw
        assert rw is not None
        await asyncio.wait_for(self._measure_offset(), self.timeout)
        await self._claim_id()
        await self._check_workers()
        if first and load_snapshot:
            await self._load_snapshot()
        if not self._ever_up:
            # the others' recent messages: their load, decisions and pins
            since = int((time.time() + self._offset - self.history) * 1000)
            self._last_id = f"{max(since, 0)}-0"
            await self._read_pins()
        self._up = True
        self._warned = False
        self._full_due = self._ever_up  # after an outage: re-publish our own state
        self._ever_up = True
        self._next_heartbeat = 0.0
        self._arm()

    async def _measure_offset(self) -> None:
        assert self._rw is not None
        t0 = time.time()
        secs, us = await self._rw.time()
        t1 = time.time()
        self._offset = secs + us / 1e6 - (t0 + t1) / 2

    async def _claim_id(self) -> None:
        """Hold ``P:replica:ID``; wait out a previous life's key, refuse a live twin."""
        rw = self._rw
        assert rw is not None
        key = self.keys.replica(self.replica_id)
        px = max(int(self.load_ttl * 1000), 1)
        deadline = time.monotonic() + self.load_ttl + self.timeout
        while True:
            if await rw.set(key, self.instance, nx=True, px=px):
                return
            held = await rw.get(key)
            if held is not None and _text(held) == self.instance:
                await rw.pexpire(key, px)
                return
            if time.monotonic() >= deadline:
                raise SyncConfigError(
                    f"replica id {self.replica_id!r} is in use by another live replica"
                    " (give each replica its own --replica-id)"
                )
            await asyncio.sleep(min(0.1, self.load_ttl / 10))

    async def _check_workers(self) -> None:
        """Every replica names the same workers at the same positions (ids are positions)."""
        if not self.workers:
            return
        rw = self._rw
        assert rw is not None
        want = json.dumps(self.workers)
        px = max(int(10 * self.heartbeat * 1000), 1000)
        await rw.set(self.keys.workers, want, nx=True, px=px)
        have = await rw.get(self.keys.workers)
        if have is None or _text(have) == want:
            await rw.set(self.keys.workers, want, px=px)
            return
        theirs = json.loads(_text(have))
        why = (
            f"the other replicas were started with --worker {theirs}, this one with"
            f" {self.workers}: worker ids are positions in that list, so every replica"
            " must name the same workers in the same order (add workers at run time"
            " through the admin API or a workers file instead)"
        )
        self._refused = why
        raise SyncConfigError(why)

    async def _load_snapshot(self) -> None:
        r = self.router
        if not r.kv_events or len(r.index) or r.index.workers():
            return
        try:
            data = await self._big_client().get(self.keys.snapshot)
        except _redis_errors() as e:
            log.warning(
                "replica sync: could not read the index snapshot (%s: %s); following the"
                " events from scratch",
                type(e).__name__,
                e,
            )
            return
        if data is None:
            log.info("replica sync: no index snapshot yet; following the events from scratch")
            return
        try:
            snap = decode_snapshot(data if isinstance(data, bytes) else data.encode())
        except WireError as e:
            log.warning("replica sync: ignoring the index snapshot: %s", e)
            return
        if snap.block_size != r.block_size or (self.workers and snap.workers != self.workers):
            log.warning(
                "replica sync: ignoring the index snapshot of replica %s: another block size"
                " or worker list",
                snap.replica,
            )
            return
        load = getattr(r.index, "load", None)
        if load is None:
            log.warning("replica sync: the router's index has no load(); snapshot not used")
            return
        try:
            # off the event loop: a million residencies take a second or so (the
            # compiled load runs without the GIL), and the loop has sockets to serve
            await asyncio.to_thread(load, snap.index)
        except ValueError as e:
            log.warning("replica sync: ignoring a corrupt index snapshot: %s", e)
            return
        self.resume = dict(snap.positions)
        self.salts = snap.salts
        log.info(
            "replica sync: loaded the index snapshot of replica %s (%.1f s old, %d residencies);"
            " resuming the events from it",
            snap.replica,
            max(time.time() + self._offset - snap.t, 0.0),
            r.index.residencies(),
        )

    async def _read_pins(self) -> None:
        """Pins that outlive the replayed history (a 1 h ``cache_control`` TTL, say)."""
        rw = self._rw
        assert rw is not None
        prefix = self.keys.pin("")
        keys = [k async for k in rw.scan_iter(match=prefix + "*", count=1000)]
        pins: list[tuple[str, int, float]] = []
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            pipe = rw.pipeline(transaction=False)
            for k in chunk:
                pipe.get(k)
                pipe.pttl(k)
            got = await pipe.execute()
            for k, w, ttl in zip(chunk, got[::2], got[1::2], strict=True):
                if w is not None and isinstance(ttl, int) and ttl > 0:
                    with contextlib.suppress(ValueError):
                        pins.append((_text(k)[len(prefix) :], int(w), ttl / 1000))
        if pins:
            self.router.apply_remote(RemoteUpdate("", pins=pins))

    # -- out ------------------------------------------------------------------------------

    def _routed(self, now: float, routed: Routed) -> None:
        # under the router's lock, on the routing thread: queue and wake, nothing more
        self._out.append((now, routed))
        self._arm()

    def _arm(self) -> None:
        if self._armed or self._wake is None or self._loop is None:
            return
        self._armed = True
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._wake.set)

    def publish_health(self, worker: int, healthy: bool) -> None:
        """Tell the other replicas how this one sees a worker (sent with the next message)."""
        self._health.append((int(worker), bool(healthy)))
        self._arm()

    def publish_response(self, response_id: str, worker: int, ttl: float) -> None:
        """Tell the others (and Redis, for later replicas) which worker produced a response."""
        self._responses.append((str(response_id), int(worker), float(ttl), time.monotonic()))
        self._arm()

    def publish_member(
        self, kind: str, member_id: int, spec: Mapping[str, Any], state: str
    ) -> None:
        """Share a membership change (``added``, ``updated``, ``draining``, ``removed``,
        or ``left``: this replica's drain of it ended)."""
        self._members.append((str(kind), int(member_id), dict(spec), str(state)))
        self._arm()

    async def fetch_response(self, response_id: str) -> int | None:
        """The worker Redis holds for a response id (None: unknown, expired or Redis away)."""
        if not self._up or self._rw is None:
            return None
        try:
            w = await asyncio.wait_for(self._rw.get(self.keys.response(response_id)), self.timeout)
        except _redis_errors() as e:
            self._lost(e)
            return None
        return None if w is None else int(w)

    async def members_snapshot(self) -> dict[int, tuple[dict[str, Any], str]]:
        """The runtime members Redis holds: ``{id: (spec mapping, state)}`` ({} if away)."""
        if not self._up or self._rw is None:
            return {}
        try:
            raw = await asyncio.wait_for(self._rw.hgetall(self.keys.members), self.timeout)
        except _redis_errors() as e:
            self._lost(e)
            return {}
        out = {}
        for k, v in raw.items():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                d = json.loads(v)
                out[int(k)] = (dict(d["spec"]), str(d["state"]))
        return out

    def _compose(self) -> tuple[Message, list[Any]] | None:
        """The next message and the durable writes that go with it, or None (nothing due)."""
        clock = self.router.clock
        now = clock()
        mono = time.monotonic()
        m = Message(self.replica_id, self.instance, load_ttl=self.load_ttl)
        writes: list[Any] = []
        while self._out:
            t, r = self._out.popleft()
            age = max(now - t, 0.0)
            m.decisions.append(
                Routed(r.worker, r.hashes, r.segments, r.session_id, r.pin_ttl, age)
            )
            if r.session_id is not None and r.pin_ttl is not None and r.pin_ttl > age:
                left = r.pin_ttl - age
                self._own_pins[r.session_id] = (r.worker, mono + left)
                writes.append(("pin", r.session_id, r.worker, left))
        load = self.router.local_load()
        last = self._last_load
        changed = last is None or not (
            np.array_equal(load.workers, last.workers)
            and np.array_equal(load.active, last.active)
            and np.array_equal(load.prefill_tokens, last.prefill_tokens)
            and np.array_equal(load.decode_blocks, last.decode_blocks)
        )
        if changed or mono >= self._next_heartbeat or self._full_due or m.decisions:
            m.load = load
        if self._health:
            m.health, self._health = self._health, []
        for rid, w, ttl, made in self._responses:
            left = ttl - (mono - made)
            if left > 0:
                m.responses.append((rid, w, left))
                writes.append(("resp", rid, w, left))
        self._responses = []
        if self._members:
            m.members, self._members = self._members, []
            for kind, mid, spec, state in m.members:
                writes.append(("member", kind, mid, spec, state))
        if self._full_due:
            for s, (w, until) in list(self._own_pins.items()):
                if until <= mono:
                    del self._own_pins[s]
                else:
                    m.pins.append((s, w, until - mono))
                    writes.append(("pin", s, w, until - mono))
        if m.empty():
            return None
        return m, writes

    async def _send(self, m: Message, writes: list[Any]) -> None:
        rw = self._rw
        assert rw is not None
        px = max(int(self.load_ttl * 1000), 1)
        pipe = rw.pipeline(transaction=False)
        pipe.xadd(self.keys.log, {"m": encode(m)}, maxlen=self.stream_maxlen, approximate=True)
        if m.load is not None:  # a heartbeat: renew the id, and the worker list's key
            pipe.set(self.keys.replica(self.replica_id), self.instance, px=px)
            if self.workers:
                pipe.pexpire(self.keys.workers, max(int(10 * self.heartbeat * 1000), 1000))
        for w in writes:
            if w[0] == "pin":
                pipe.set(self.keys.pin(w[1]), int(w[2]), px=max(int(w[3] * 1000), 1))
            elif w[0] == "resp":
                pipe.set(self.keys.response(w[1]), int(w[2]), px=max(int(w[3] * 1000), 1))
            elif w[0] == "member":
                _, kind, mid, spec, state = w
                if kind in ("removed", "left"):
                    pipe.hdel(self.keys.members, str(mid))
                else:
                    pipe.hset(self.keys.members, str(mid),
                              json.dumps({"spec": spec, "state": state}))  # fmt: skip
        await asyncio.wait_for(pipe.execute(), self.timeout)
        self._stats["sent"] += 1

    async def _writer(self) -> None:
        wake = self._wake
        assert wake is not None
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(wake.wait(), self.interval)
            wake.clear()
            self._armed = False
            if not self._up:
                continue
            try:
                composed = self._compose()
                if composed is None:
                    continue
                m, writes = composed
                full = self._full_due
                try:
                    await self._send(m, writes)
                except _redis_errors() as e:
                    # keep what was not sent: decisions go back (with their times) and
                    # the next message after the outage re-publishes the rest
                    now = self.router.clock()
                    self._out.extendleft(
                        (now - r.age, Routed(r.worker, r.hashes, r.segments, r.session_id,
                                             r.pin_ttl)) for r in reversed(m.decisions)
                    )  # fmt: skip
                    self._health = m.health + self._health
                    self._requeue_members(m)
                    self._lost(e)
                    continue
                if m.load is not None:
                    self._last_load = m.load
                    self._next_heartbeat = time.monotonic() + self.heartbeat
                if full:
                    self._full_due = False
            except Exception:  # a bug here must not stop the sync
                log.exception("replica sync: writer failed; retrying")
                await asyncio.sleep(self.retry)

    def _requeue_members(self, m: Message) -> None:
        self._members = list(m.members) + self._members

    # -- in -------------------------------------------------------------------------------

    async def _reader(self) -> None:
        while not self._stopping:
            try:
                if not self._up:
                    await asyncio.sleep(self.retry)
                    if self._refused is not None:
                        continue
                    await self._reconnect()
                    continue
                assert self._rd is not None
                got = await self._rd.xread(
                    {self.keys.log: self._last_id},
                    count=_READ_COUNT,
                    block=max(int(self.heartbeat * 1000), 1),
                )
                for _, entries in cast("list[Any]", got or []):
                    await self._apply_entries(entries)
                # at least once a heartbeat: a replica gone silent stops counting
                self.router.apply_remote(None)
            except asyncio.CancelledError:
                raise
            except SyncConfigError as e:
                self._refused = str(e)
                self._lost(e)
                log.error("replica sync: stopped: %s", e)
            except _redis_errors() as e:
                self._lost(e)
            except Exception:  # a bug here must not stop the sync
                log.exception("replica sync: reader failed; retrying")
                await asyncio.sleep(self.retry)

    async def _reconnect(self) -> None:
        try:
            await self._join(first=False)
        except _redis_errors():
            return  # still away: stay quiet, retry
        self._stats["reconnects"] += 1
        log.info(
            "replica sync: Redis at %s is back; re-publishing this replica's state and"
            " catching up",
            redact(self.url),
        )
        for fn in self.on_reconnect:
            try:
                fn()
            except Exception:
                log.exception("replica sync: a reconnect hook failed")

    def _lost(self, e: BaseException) -> None:
        # one line per outage (and one if Redis is away at start)
        if not self._warned:
            self._warned = True
            log.warning(
                "replica sync: Redis at %s is unreachable (%s: %s); routing on this"
                " replica's own view until it returns",
                redact(self.url),
                type(e).__name__,
                e,
            )
        self._up = False

    async def _apply_entries(self, entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]]) -> None:
        now_redis = time.time() + self._offset
        updates: list[tuple[str, Message]] = []
        for eid, fields in entries:
            self._last_id = _text(eid)
            data = fields.get(b"m")
            if data is None:
                continue
            try:
                m = decode(data)
            except WireError as e:
                self._stats["malformed"] += 1
                log.debug("replica sync: skipping a malformed message: %s", e)
                continue
            if m.instance == self.instance:
                continue
            self._stats["received"] += 1
            ms = int(self._last_id.split("-", 1)[0])
            transit = max(now_redis - ms / 1000, 0.0)
            self._stats["delay_sum"] += transit
            self._stats["delay_n"] += 1
            self._stats["delay_max"] = max(self._stats["delay_max"], transit)
            if transit:
                m.decisions = [
                    Routed(r.worker, r.hashes, r.segments, r.session_id, r.pin_ttl,
                           r.age + transit) for r in m.decisions
                ]  # fmt: skip
                m.pins = [(s, w, t - transit) for s, w, t in m.pins]
                m.responses = [(i, w, t - transit) for i, w, t in m.responses]
            if m.replica == self.replica_id:
                # an earlier life of this replica: its beliefs hold, its load is gone
                m.load = None
            updates.append((m.replica, m))
        for i, (replica, m) in enumerate(updates):
            self._apply(replica, m)
            if i % 64 == 63:
                await asyncio.sleep(0)  # a long catch-up must not starve the loop

    def _apply(self, replica: str, m: Message) -> None:
        r = self.router
        if m.bye:
            r.drop_remote(replica)
            return
        if m.replica != self.replica_id or m.decisions or m.pins:
            load_ttl = m.load_ttl
            if m.load is None and m.replica == self.replica_id:
                load_ttl = None
            r.apply_remote(
                RemoteUpdate(
                    replica if m.replica != self.replica_id else "",
                    load=m.load,
                    routed=m.decisions,
                    load_ttl=load_ttl,
                    pins=m.pins,
                )
            )
            self._stats["applied_decisions"] += len(m.decisions)
        for w, healthy in m.health:
            if self.on_health is not None:
                self.on_health(replica, w, healthy)
        for rid, w, left in m.responses:
            if self.on_response is not None and left > 0:
                self.on_response(rid, w, left)
        for kind, mid, spec, state in m.members:
            if self.on_member is not None:
                self.on_member(replica, kind, mid, spec, state)

    # -- snapshots ----------------------------------------------------------------------

    async def _snapshots(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.snapshot_interval)
            if not self._up or self._subscriber is None or self._rw is None:
                continue
            try:
                if await self._hold_lease():
                    await self._write_snapshot()
            except _redis_errors() as e:
                self._lost(e)
            except Exception:
                log.exception("replica sync: snapshot failed; trying again later")

    async def _hold_lease(self) -> bool:
        rw = self._rw
        assert rw is not None
        px = max(int(3 * self.snapshot_interval * 1000), 1000)
        key = self.keys.snapshot_lease
        if await rw.set(key, self.instance, nx=True, px=px):
            self._snapshot_holder = True
            return True
        held = await rw.get(key)
        self._snapshot_holder = held is not None and _text(held) == self.instance
        if self._snapshot_holder:
            await rw.pexpire(key, px)
        return self._snapshot_holder

    async def _write_snapshot(self) -> None:
        sub = self._subscriber
        router = self.router
        applier = getattr(sub, "applier", None)

        dump = getattr(router.index, "dump", None)
        if dump is None:
            return

        def capture(positions: dict[int, tuple[int, int]]) -> tuple[Any, ...]:
            # on the subscriber's thread, between two batches: index and positions agree
            salts = applier.salts() if applier is not None else {}
            return dump(), positions, salts

        fut = sub.capture(capture)
        index, positions, salts = await asyncio.wrap_future(fut)
        data = encode_snapshot(
            replica=self.replica_id,
            t=time.time() + self._offset,
            block_size=router.block_size,
            workers=self.workers,
            positions=positions,
            salts=salts,
            index=index,
        )
        await self._big_client().set(self.keys.snapshot, data)
        self._stats["snapshots"] += 1
        self._stats["snapshot_bytes"] = len(data)

    async def write_snapshot(self) -> bool:
        """Write a snapshot now if this replica holds (or takes) the lease; True if it did.

        For tests and operators; the sync writes one every ``snapshot_interval`` anyway.
        """
        if not self._up or self._subscriber is None:
            return False
        if not await self._hold_lease():
            return False
        await self._write_snapshot()
        return True


class ReplicaSyncThread:
    """A :class:`ReplicaSync` on a thread and event loop of its own, for threaded proxies.

    ``start()`` returns once joined (or once Redis was found away: the sync
    keeps trying on its own); ``stop()`` says goodbye and joins the thread.
    The keyword arguments are :class:`ReplicaSync`'s.

    :param router: this replica's router.
    :param url: the Redis / Valkey URL.
    """

    def __init__(self, router: Router, url: str, **kwargs: Any) -> None:
        from .._serve import ServerThread

        #: The sync itself (its ``resume``, ``salts``, ``stats()``, ``up``).
        self.sync = ReplicaSync(router, url, **kwargs)
        self._load_snapshot = True
        self._thread = ServerThread("kvroute-sync", self._startup, self.sync.stop)

    async def _startup(self) -> None:
        await self.sync.start(load_snapshot=self._load_snapshot)

    def start(
        self, *, load_snapshot: bool = True, timeout: float = 60.0
    ) -> dict[int, tuple[int, int]]:
        """Start the thread and join the fleet; returns the events' resume positions.

        :raises SyncConfigError: as :meth:`ReplicaSync.start`.
        """
        self._load_snapshot = load_snapshot
        self._thread.start(timeout)
        return self.sync.resume

    def stop(self, timeout: float = 30.0) -> None:
        """Stop sharing and join the thread."""
        self._thread.stop(timeout)

    def __enter__(self) -> ReplicaSyncThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

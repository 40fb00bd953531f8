"""``TrtllmApplier``: TensorRT-LLM's dict-shape events into a router's index.

The dict shape (the LLM API's ``get_kv_cache_events()``, ``trtllm-serve``'s
``POST /kv_cache_events``; decoded by
:func:`kvroute.events.trtllm.decode_trtllm_event`) carries more than vLLM's
stream, and has no replay. One :class:`TrtllmApplier` follows one engine,
every attention-DP rank of it, and turns each event into index updates
through an :class:`~kvroute.events.EventApplier` (so keys, salts, block-size
checks and statuses are the same as for every engine):

- **Attention-DP ranks** map to router workers as vLLM's data-parallel ranks
  do: a mapping ``{rank: worker}`` makes each rank its own worker (for a
  router that can aim a request at a rank: ``trtllm-serve`` takes
  ``attention_dp_rank`` in the request body); a single worker id folds every
  rank into it (for a proxy that sends requests to the server, whose own
  scheduler picks the rank). Folded ranks' copies of a block add up, as an
  engine's duplicate copies do. A rank mapped to no worker is counted
  ``ignored``.
- **Windows.** Only the full-attention stream is indexed, since only it holds a
  prompt's whole prefix: a sliding-window layer group evicts the start of
  every long prompt, so its blocks say nothing about which prefix a worker can
  reuse. That stream is the largest ``window_size`` seen (then the lowest
  ``layer_group_id``), learned from the engine's ``created`` events, which come
  first; a larger window seen only later (a late joiner) clears what was
  indexed from the smaller one and switches. ``window_size=`` fixes it
  instead. Events of other windows are counted ``ignored``; events without a
  ``window_size`` (older releases) are indexed.
- **Partial blocks** (a prompt's last, unfilled block) never match: they are
  not indexed, but their handles are kept per rank so their later removal is
  recognised (``ok``), not counted ``unknown_block``.
- **Tiers.** A stored block lands in its ``cache_level``'s tier; an ``updated``
  cache level moves it (a copy is stored in the new tier before the old one
  is removed, so a match never loses it), and the tier is remembered per rank
  so its removal takes it from where it is. A priority-only update changes
  nothing.
- **Capacity.** ``created`` gives each rank's blocks per cache level: the
  worker's device blocks (summed over its ranks) go to
  :meth:`Router.update_worker_metrics` as ``kv_capacity_blocks``;
  :meth:`capacity` reports every tier.
- **Loss.** ``event_id`` counts per rank from 0; TensorRT-LLM drops the oldest
  events when its buffer overflows, and a poll whose answer was lost drops
  what it drained. A jump in a rank's ids is a gap no transport here can
  replay: :meth:`EventApplier.unrecoverable_gap` runs for the rank's worker
  (counted ``gap``, then what that does: today ``replay_failed`` and a clear).
  Ids going back mean a restarted engine: every worker of this engine is
  cleared (counted ``restart``) and followed anew, each of its ranks expected
  to count from 0 again. The first event ever seen of a rank may have any id
  (the engine ran before this applier did). A malformed event is
  counted ``malformed`` and still advances its rank's ids when it names them.

Not thread-safe: one thread (a poller's, or the LLM API's event loop) feeds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .._logging import RateLimitedLog
from .apply import EventApplier
from .decode import DEFAULT_MAX_TOKENS, DecodeError
from .trtllm import BlockUpdated, CacheCreated, TrtllmBatch, decode_trtllm_event
from .types import AllBlocksCleared, BlockRemoved, BlockStored, Tier

if TYPE_CHECKING:
    from ..router import Router
    from .metrics import Metrics

__all__ = ["TrtllmApplier"]

logger = logging.getLogger("kvroute.events")

#: Outcomes that are exported as ``kvroute_events_total`` statuses when this
#: class (not the EventApplier it delegates to) decides them.
_STREAM_STATUSES = frozenset({"gap", "restart", "malformed"})


@dataclass
class _Rank:
    """What is known of one attention-DP rank's stream."""

    last_id: int | None = None
    partial: set[int] = field(default_factory=set)  # handles of partial blocks
    tiers: dict[int, Tier] = field(default_factory=dict)  # handle -> tier, device omitted
    levels: tuple[int, ...] = ()  # blocks per cache level, from `created`

    def forget_blocks(self) -> None:
        self.partial.clear()
        self.tiers.clear()


class TrtllmApplier:
    """Apply one TensorRT-LLM engine's dict-shape events to ``router`` (see the module docstring).

    >>> from kvroute import Router
    >>> router = Router(block_size=4, workers=[0])
    >>> ap = TrtllmApplier(router, 0)
    >>> ap.feed({"event_id": 0, "window_size": 64,
    ...          "data": {"type": "created", "num_blocks_per_cache_level": [100, 50]}})
    'ok'
    >>> ap.feed({"event_id": 1, "window_size": 64, "data": {"type": "stored",
    ...     "parent_hash": None, "blocks": [
    ...         {"block_hash": 11, "tokens": [{"token_id": t} for t in (1, 2, 3, 4)]},
    ...         {"block_hash": 12, "tokens": [{"token_id": t} for t in (5, 6)]}]}})
    'ok'
    >>> router.index.worker_len(0), ap.capacity(0)
    (1, {'device': 100, 'host': 50, 'disk': 0})
    >>> ap.feed({"event_id": 2, "window_size": 64,
    ...          "data": {"type": "removed", "block_hashes": [12]}})   # the partial block
    'ok'

    :param router: the router whose index the events feed.
    :param workers: the router worker every rank folds into, or ``{rank: worker}``.
    :param applier: the :class:`EventApplier` that updates the index (default:
        a new one over ``router``, counting into ``metrics``).
    :param metrics: where to count statuses, or None.
    :param window_size: index only this attention window (default: the largest seen).
    :param max_tokens: the decoder's size limit per event (token ids, and block hashes).
    :param log_interval: seconds between two warnings of one kind.
    :raises TypeError, ValueError: a worker or rank that is not an int >= 0.
    """

    def __init__(
        self,
        router: Router,
        workers: int | Mapping[int, int],
        *,
        applier: EventApplier | None = None,
        metrics: Metrics | None = None,
        window_size: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        log_interval: float = 60.0,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.applier = applier if applier is not None else EventApplier(router, metrics=metrics)
        if isinstance(workers, Mapping):
            self._fold: int | None = None
            self._by_rank = {_id(r, "rank"): _id(w, "worker") for r, w in workers.items()}
        else:
            self._fold = _id(workers, "worker")
            self._by_rank = {}
        if window_size is not None and (type(window_size) is not int or window_size < 1):
            raise ValueError(f"window_size must be an int >= 1, not {window_size!r}")
        self.window_size = window_size
        self.max_tokens = max_tokens
        #: Per worker: dict events by outcome (a stored event the decoder split
        #: into runs counts once per run), and the stream's own ``gap``,
        #: ``restart``, ``replay_failed``, ``malformed`` and ``window_switch``.
        self.counts: dict[int, Counter[str]] = {}
        #: Events of ranks mapped to no worker, by rank.
        self.unmapped: Counter[int] = Counter()
        #: The ``hash_algo`` the engine names (the latest seen), or None.
        self.hash_algo: str | None = None
        self._ranks: dict[int, _Rank] = {}
        self._stream: tuple[int, int] | None = None  # (window, -layer group) indexed
        self._indexed = False  # blocks were indexed from self._stream
        self._warn = RateLimitedLog(logger, log_interval)

    # -- public -------------------------------------------------------------------------

    def worker_of(self, rank: int | None) -> int | None:
        """The router worker of attention-DP rank ``rank`` (absent: 0), or None."""
        if self._fold is not None:
            return self._fold
        return self._by_rank.get(0 if rank is None else rank)

    def workers(self) -> list[int]:
        """Every router worker this engine's events feed."""
        return [self._fold] if self._fold is not None else sorted(set(self._by_rank.values()))

    def last_event_ids(self) -> dict[int, int]:
        """The last ``event_id`` seen per attention-DP rank."""
        return {r: s.last_id for r, s in self._ranks.items() if s.last_id is not None}

    def capacity(self, worker: int) -> dict[Tier, int]:
        """``worker``'s blocks per tier, summed over its ranks' ``created`` events."""
        out: dict[Tier, int] = {"device": 0, "host": 0, "disk": 0}
        for rank, st in self._ranks.items():
            if self.worker_of(rank) == worker:
                for level, n in enumerate(st.levels):
                    out[("device", "host", "disk")[min(level, 2)]] += n
        return out

    def feed(self, event: Mapping[str, Any] | bytes | memoryview | str) -> str:
        """Decode one dict-shape event (a dict, or its JSON text) and apply it; returns its outcome.

        A malformed event is counted ``malformed`` (its ``event_id`` still
        advances its rank when it names one) and returns ``"malformed"``.
        """
        try:
            batch = decode_trtllm_event(event, max_tokens=self.max_tokens)
        except (DecodeError, TypeError) as e:
            self.malformed(event, str(e))
            return "malformed"
        return self.apply(batch)

    def malformed(self, event: object, why: str) -> None:
        """Count an event that could not be decoded; advance its rank's ids if it names them."""
        rank = event_id = None
        if isinstance(event, (bytes, bytearray, memoryview, str)):
            with contextlib.suppress(ValueError, RecursionError):  # read what it names
                event = json.loads(bytes(event) if not isinstance(event, str) else event)
        if isinstance(event, Mapping):
            r, e = event.get("attention_dp_rank"), event.get("event_id")
            rank = r if type(r) is int and r >= 0 else None
            event_id = e if type(e) is int and e >= 0 else None
        worker = self.worker_of(rank)
        if event_id is not None:
            self._sequence(0 if rank is None else rank, event_id)
        self._warn.warning(
            (worker, "malformed"), "worker %s: malformed TensorRT-LLM KV event: %s", worker, why
        )
        self._count(worker, "malformed", stream=True)

    def apply(self, batch: TrtllmBatch) -> str:
        """Apply one decoded dict-shape event; returns its outcome.

        ``ok``, ``unknown_block``, ``mismatch``, ``rejected``, ``cleared`` (as
        :meth:`EventApplier.apply` says), or ``ignored`` (another window, a rank
        mapped to no worker).
        """
        rank = 0 if batch.dp_rank is None else batch.dp_rank
        if batch.hash_algo is not None:
            self.hash_algo = batch.hash_algo
        if batch.event_id is not None:
            self._sequence(rank, batch.event_id)
        worker = self.worker_of(rank)
        if worker is None:
            self.unmapped[rank] += 1
            self._warn.warning(
                ("rank", rank),
                "TensorRT-LLM KV events of attention-DP rank %d go to no worker: ignored",
                rank,
            )
            return "ignored"
        if not self._admit_window(batch):
            return self._count(worker, "ignored")
        st = self._rank(rank)
        status = "ok"
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                s = self._stored(st, worker, ev)
            elif isinstance(ev, BlockRemoved):
                s = self._removed(st, worker, ev)
            elif isinstance(ev, BlockUpdated):
                s = self._updated(st, worker, ev)
            elif isinstance(ev, CacheCreated):
                st.levels = ev.num_blocks_per_cache_level
                self._report_capacity(worker)
                s = self._count(worker, "ok", delegated=False)
            elif isinstance(ev, AllBlocksCleared):
                s = self.applier.apply(worker, ev)
                self._forget_worker(worker)
            else:  # pragma: no cover - the decoder builds nothing else
                raise TypeError(f"not a TensorRT-LLM event: {type(ev).__name__}")
            if status == "ok":
                status = s
        if not batch.events:
            self._count(worker, "ok", delegated=False)
        return status

    # -- the stream ---------------------------------------------------------------------

    def _rank(self, rank: int) -> _Rank:
        st = self._ranks.get(rank)
        if st is None:
            st = self._ranks[rank] = _Rank()
        return st

    def _sequence(self, rank: int, event_id: int) -> None:
        st = self._rank(rank)
        last, st.last_id = st.last_id, event_id
        if last is None or event_id == last + 1:
            return
        worker = self.worker_of(rank)
        if event_id > last + 1:
            self._count(worker, "gap", stream=True)
            if worker is not None:
                lost = (
                    f"attention-DP rank {rank}: event ids {last + 1}..{event_id - 1} never arrived"
                )
                self.applier.unrecoverable_gap(worker, lost)
                self._count(worker, "replay_failed", stream=True, export=False)
                self._forget_worker(worker)
            return
        # Ids went back: a new engine, with an empty cache, counting from 0.
        self._warn.warning(
            ("restart", rank),
            "TensorRT-LLM engine restart (rank %d event id went back from %d to %d); "
            "clearing its workers %s",
            rank,
            last,
            event_id,
            self.workers(),
        )
        for w in self.workers():
            self.applier.cleared(w)
            self._count(w, "restart", stream=True)
        for r, s in self._ranks.items():
            s.forget_blocks()
            s.levels = ()
            if r != rank:
                # The new engine's other ranks count from 0 too: expect it, so that
                # losing their first events is a gap, not a first contact.
                s.last_id = -1
        self._stream = None
        self._indexed = False

    def _admit_window(self, batch: TrtllmBatch) -> bool:
        window = batch.window_size
        if window is None:
            return True
        if self.window_size is not None:
            return window == self.window_size
        key = (window, -(batch.layer_group_id or 0))
        if self._stream is None or key > self._stream:
            if self._stream is not None and self._indexed:
                self._warn.warning(
                    ("window", id(self)),
                    "TensorRT-LLM events of window %d (layer group %d) arrived after blocks "
                    "of window %d were indexed: re-indexing from the larger window",
                    window,
                    batch.layer_group_id or 0,
                    self._stream[0],
                )
                for w in self.workers():
                    self.applier.cleared(w)
                    self._count(w, "window_switch", stream=True, export=False)
                for st in self._ranks.values():
                    st.forget_blocks()
                    st.levels = ()
            self._stream = key
            self._indexed = False
            return True
        return key == self._stream

    def _forget_worker(self, worker: int) -> None:
        for rank, st in self._ranks.items():
            if self.worker_of(rank) == worker:
                st.forget_blocks()

    def _report_capacity(self, worker: int) -> None:
        device = self.capacity(worker)["device"]
        if device:
            self.router.update_worker_metrics(worker, kv_capacity_blocks=device)

    def _count(
        self,
        worker: int | None,
        status: str,
        *,
        delegated: bool = False,
        stream: bool = False,
        export: bool = True,
    ) -> str:
        """Note one outcome; export it unless the delegate applier already did."""
        if worker is None:
            return status
        counts = self.counts.get(worker)
        if counts is None:
            counts = self.counts[worker] = Counter()
        counts[status] += 1
        exported = export and not delegated and (not stream or status in _STREAM_STATUSES)
        if self.metrics is not None and exported:
            self.metrics.event_applied(worker, status)
        return status

    # -- events ------------------------------------------------------------------------

    def _stored(self, st: _Rank, worker: int, ev: BlockStored) -> str:
        bs = self.router.block_size
        n = len(ev.block_hashes)
        full = len(ev.token_ids) // bs
        if ev.block_size is None and len(ev.token_ids) > n * bs:
            # A single block (its size unknown to the decoder) longer than the
            # router's: the engine's blocks are larger. Say so, as for any event.
            ev = replace(ev, block_size=-(-len(ev.token_ids) // n))
        if (ev.block_size is None or ev.block_size == bs) and full < n:
            # A partial last block: never matched, but its handle resolves its removal.
            st.partial.update(ev.block_hashes[full:])
            ev = replace(
                ev, block_hashes=ev.block_hashes[:full], token_ids=ev.token_ids[: full * bs]
            )
            if not full:
                return self._count(worker, "ok")
        status = self.applier.apply(worker, ev)
        self._count(worker, status, delegated=True)
        if status == "ok" and ev.block_hashes:
            self._indexed = True
            if ev.tier == "device":
                for h in ev.block_hashes:
                    st.tiers.pop(h, None)
            else:
                st.tiers.update(dict.fromkeys(ev.block_hashes, ev.tier))
        return status

    def _removed(self, st: _Rank, worker: int, ev: BlockRemoved) -> str:
        by_tier: dict[Tier, list[int]] = {}
        for h in ev.block_hashes:
            if h in st.partial:
                st.partial.discard(h)
                continue
            by_tier.setdefault(st.tiers.pop(h, "device"), []).append(h)
        if not by_tier:
            return self._count(worker, "ok")
        status = "ok"
        for tier, hashes in by_tier.items():
            s = self.applier.apply(worker, BlockRemoved(tuple(hashes), tier=tier))
            status = s if status == "ok" else status
        return self._count(worker, status, delegated=True)

    def _updated(self, st: _Rank, worker: int, ev: BlockUpdated) -> str:
        tiers = ev.tiers
        h = ev.block_hash
        if tiers is None or h in st.partial:
            return self._count(worker, "ok")  # a priority change, or a partial block's
        new = tiers[1]
        old = st.tiers.get(h, "device")  # where this rank's copy was stored
        if old == new:
            return self._count(worker, "ok")
        key = self.router.index.resolve(worker, h)
        if key is None:
            return self._count(worker, "unknown_block")
        # The new tier's copy first: between the two calls the block is in both,
        # never in neither, so a concurrent match cannot miss it.
        self.router.apply_stored(worker, [key], tier=new, engine_hashes=[h])
        unknown = self.router.apply_removed(worker, [key], tier=old)
        if new == "device":
            st.tiers.pop(h, None)
        else:
            st.tiers[h] = new
        return self._count(worker, "unknown_block" if unknown else "ok")


def _id(value: object, what: str) -> int:
    if type(value) is not int:
        raise TypeError(f"a {what} must be an int, not {value!r}")
    if value < 0:
        raise ValueError(f"a {what} must be >= 0, not {value}")
    return value

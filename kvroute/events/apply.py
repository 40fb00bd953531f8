"""Apply decoded KV events to a :class:`~kvroute.Router`'s index.

Stored blocks are keyed by *kvroute's* hash of the event's ``token_ids``,
chained from the kvroute key of the event's parent block, so the keys equal
what :meth:`Router.route` computes from a request's tokens whatever hash
algorithm, seed or version the engine runs. The engine's own hashes are kept
only as handles: a later ``BlockRemoved`` names blocks by them, and a later
``BlockStored`` names its parent by one (:meth:`BlockIndex.resolve`).

The silent failures users of other routers report most are made loud here:
an event whose ``block_size`` differs from the router's (every key would be
wrong), and, when the index keys on engine hashes, engine hashes that the
router's own ``hashing`` (the function :meth:`Router.route` hashes requests
with) does not reproduce from the event's tokens (requests would never
match). Both are logged (at most once a minute per worker) and counted, and
both make the worker *degraded* (:meth:`Router.degrade_worker`, cause
``"mismatch"``): the router routes it on its own decisions instead.

When a worker's history is lost (a gap no replay filled: :meth:`EventApplier.events_lost`),
its index is cleared and the worker degraded; the engine still holds blocks
stored before the gap, so later stores continue parents the index no longer
knows. Such an *orphaned* store is anchored to a prompt recently routed to
the worker (:func:`kvroute.trust.find_anchor`): the prompt gives the keys of
its ancestors, and the store applies (status ``anchored``). The index then
converges back to the engine's truth without a restart.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from .._convert import as_u64_array
from .._logging import RateLimitedLog
from ..trust import find_anchor
from .types import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEvent

if TYPE_CHECKING:
    from ..router import Router
    from .metrics import Metrics

__all__ = ["EventApplier"]

logger = logging.getLogger("kvroute.events")


class EventApplier:
    """Turns each worker's decoded events into index updates on ``router``.

    Not thread-safe on its own: one subscriber calls it, from one thread (the router's
    methods it calls are). Hashing a stored event runs before the router's
    lock is taken, so a large event never stalls :meth:`Router.route`.

    :param router: the router whose index the events feed.
    :param metrics: where to count events by status and mismatches, or None.
    :param key_on: ``"kvroute"`` (default) keys blocks by the router's hash of
        the event's tokens; ``"engine"`` keys them by the engine's own hashes,
        as Dynamo and llm-d do. Then ``router.hashing`` must reproduce the
        engine's hashes exactly, since :meth:`Router.route` hashes requests
        with it: every stored event that carries token ids is re-hashed with
        it (a continuation from its parent's engine hash, with the salt it
        inherits) and a disagreement warns and is counted (``kind="hash"``).
        A ``hashing`` that cannot continue a chain from a parent's key (vLLM's
        hash chains full digests) raises :class:`NotImplementedError` for
        ``parent`` not None; continuations are then not checked.
    :param groups: KV-cache groups to index (vLLM hybrid models publish one
        stream per group); events of other groups are counted as ``ignored``.
    :param log_interval: seconds between two warnings for the same worker and kind.
    """

    def __init__(
        self,
        router: Router,
        *,
        metrics: Metrics | None = None,
        key_on: Literal["kvroute", "engine"] = "kvroute",
        groups: Collection[int] = (0,),
        log_interval: float = 60.0,
    ) -> None:
        if key_on not in ("kvroute", "engine"):
            raise ValueError(f"key_on must be 'kvroute' or 'engine', not {key_on!r}")
        self.router = router
        self.metrics = metrics
        self.key_on = key_on
        self.groups = frozenset(groups)
        self._warn = RateLimitedLog(logger, log_interval)
        #: Per worker: events applied by status (see :data:`kvroute.events.metrics.EVENT_STATUSES`).
        self.counts: dict[int, Counter[str]] = {}
        # Per worker: engine hash -> cache salt of the salted blocks it holds.
        # vLLM names the salt only in a prompt's first stored event, but the
        # salt seeds every kvroute key of the prompt, so a later store that
        # continues a salted prefix inherits it from its parent. Only salted
        # blocks are recorded; they leave with their removal or a clear.
        self._salts: dict[int, dict[int, str]] = {}

    # -- public -------------------------------------------------------------------

    def apply_batch(self, worker: int, batch: EventBatch) -> Counter[str]:
        """Apply one batch's events in order; returns how many ended in each status.

        A run of consecutive removals from one tier and group (vLLM sends one
        ``BlockRemoved`` per evicted block) goes to the index as one call; its
        ``unknown_block`` count is then the number of blocks not found (capped
        at the run's event count), the rest of its events count as ``ok``.
        A worker the router does not know (removed, or not yet added) has its
        events counted ``ignored``: the router refuses them.
        """
        out: Counter[str] = Counter()
        events = batch.events
        if events and worker not in self.router:
            self._tally(worker, "ignored", len(events))
            out["ignored"] = len(events)
            return out
        i, n = 0, len(events)
        while i < n:
            ev = events[i]
            j = i + 1
            if isinstance(ev, BlockRemoved):
                tier, group = ev.tier, ev.group_idx
                while j < n:
                    nxt = events[j]
                    if type(nxt) is not BlockRemoved or nxt.tier != tier or nxt.group_idx != group:
                        break
                    j += 1
            if j - i > 1:
                self._removed_run(worker, events[i:j], out)  # type: ignore[arg-type]
            else:
                out[self._apply_one(worker, ev)] += 1
            i = j
        return out

    def apply(self, worker: int, event: KVEvent) -> str:
        """Apply one event of ``worker``; returns its status.

        ``ok``; ``unknown_block`` (a removal naming a block the worker does not
        hold, or a store whose parent it does not hold and that no recent
        prompt anchors: the event is skipped, since its keys cannot be
        computed); ``anchored`` (a store whose parent the index lost, applied
        through the prompt it continues); ``cleared``; ``mismatch`` (the
        event's block size differs from the router's: skipped, warned, the
        worker degraded); ``ignored`` (another KV-cache group, or a worker the
        router does not know: removed, or not yet added); ``rejected`` (values
        the index refuses).
        """
        if worker not in self.router:
            self._tally(worker, "ignored", 1)
            return "ignored"
        return self._apply_one(worker, event)

    def _apply_one(self, worker: int, event: KVEvent) -> str:
        """:meth:`apply` for a worker the router knows."""
        try:
            if isinstance(event, BlockStored):
                status = self._stored(worker, event)
            elif isinstance(event, BlockRemoved):
                status = self._removed(worker, event)
            elif isinstance(event, AllBlocksCleared):
                self.cleared(worker)
                status = "cleared"
            else:
                raise TypeError(f"not a KV event: {type(event).__name__}")
        except (TypeError, ValueError, OverflowError) as e:
            self._warn.warning(
                (worker, "rejected"), "worker %s: event rejected (%s): %r", worker, e, event
            )
            status = "rejected"
        self._tally(worker, status, 1)
        return status

    def cleared(self, worker: int) -> None:
        """The engine's cache of ``worker`` is empty (its reset, or its restart).

        :meth:`Router.apply_cleared`, i.e. :meth:`Router.worker_cache_reset`:
        every record the router keeps of the worker's cache goes at once.
        """
        self.router.apply_cleared(worker)
        self._salts.pop(worker, None)

    def events_lost(self, worker: int, why: str) -> None:
        """``worker``'s events were lost for good: clear its blocks and degrade it.

        A lost removal would leave blocks the router believes in but the
        worker no longer holds, so its blocks are dropped; the engine still
        holds some, so it is not a reset: the worker is degraded
        (:meth:`Router.degrade_worker`, cause ``"events_lost"``), routed on
        the router's own decisions and its orphaned stores anchored, until
        the drift detector finds its index agreeing with the engine again.
        Counts nothing (the caller counts its own status).

        :param worker: the worker whose events were lost.
        :param why: what was lost, for the log.
        """
        self.router.degrade_worker(worker, "events_lost", why)
        self._salts.pop(worker, None)

    def unrecoverable_gap(self, worker: int, why: str) -> None:
        """Events of ``worker`` were lost and no replay can bring them back.

        The one place a transport without replay calls (TensorRT-LLM's HTTP
        poller and LLM API feed, on an ``event_id`` gap): :meth:`events_lost`,
        warned and counted ``replay_failed``, as
        :class:`~kvroute.events.ZmqSubscriber` does when a replay cannot fill
        a gap.

        :param worker: the worker whose events were lost.
        :param why: what was lost, for the log.
        """
        self._warn.warning(
            (worker, "lost"), "worker %s: KV events lost (%s); clearing its blocks", worker, why
        )
        self.events_lost(worker, why)
        self._tally(worker, "replay_failed", 1)

    def _tally(self, worker: int, status: str, n: int) -> None:
        counts = self.counts.get(worker)
        if counts is None:
            counts = self.counts[worker] = Counter()
        counts[status] += n
        if self.metrics is not None:
            self.metrics.event_applied(worker, status, n)

    def salts(self) -> dict[int, dict[int, str]]:
        """Per worker, the cache salt of each salted block (by engine hash): a copy.

        What a snapshot of the index needs besides the index, so that a
        store continuing a salted prefix after :meth:`restore_salts` keys it
        with its salt.
        """
        return {w: dict(m) for w, m in self._salts.items() if m}

    def restore_salts(self, salts: Mapping[int, Mapping[int, str]]) -> None:
        """Take the salts of a snapshot (:meth:`salts`), replacing those of its workers."""
        for w, m in salts.items():
            self._salts[int(w)] = {int(e): str(v) for e, v in m.items()}

    def forget(self, worker: int) -> None:
        """Drop the per-worker state (the worker left the fleet)."""
        self.counts.pop(worker, None)
        self._salts.pop(worker, None)

    # -- stored -------------------------------------------------------------------

    def _stored(self, worker: int, ev: BlockStored) -> str:
        if ev.group_idx is not None and ev.group_idx not in self.groups:
            return "ignored"
        bs = self.router.block_size
        if ev.block_size is not None and ev.block_size != bs:
            if self.metrics is not None:
                self.metrics.mismatch(worker, "block_size")
            self._warn.warning(
                (worker, "block_size"),
                "worker %s publishes KV events with block_size=%d but the router uses "
                "block_size=%d: its blocks are NOT indexed and requests will not match "
                "them. Start the router with the engine's block size.",
                worker,
                ev.block_size,
                bs,
            )
            if not self.router.is_degraded(worker):
                self.router.degrade_worker(
                    worker, "mismatch", f"its blocks are {ev.block_size} tokens, the router's {bs}"
                )
            return "mismatch"
        n = len(ev.block_hashes)
        if ev.tokens_hashes is not None:
            if len(ev.tokens_hashes) != n:
                raise ValueError(f"{len(ev.tokens_hashes)} tokens_hashes for {n} blocks")
        elif ev.token_ids:
            full = len(ev.token_ids) // bs
            if not n - 1 <= full <= n:
                raise ValueError(f"{len(ev.token_ids)} token ids for {n} blocks of {bs}")
            n = full  # a trailing partial page (SGLang) is not a routable block
        elif n:
            raise ValueError("a stored event needs token_ids (or Dynamo tokens_hashes)")
        if n == 0:
            return "ok"
        engine = np.fromiter(ev.block_hashes[:n], dtype=np.uint64, count=n)
        if self.key_on == "engine":
            return self._stored_engine(worker, ev, n, engine)
        parent: int | None = None
        if ev.parent_block_hash is not None:
            parent = self.router.index.resolve(worker, ev.parent_block_hash)
            if parent is None:
                return self._orphan(worker, ev, n, engine)
        salt = self._salt(worker, ev)
        keys = self._keys(ev, n, parent, salt)
        self.router.apply_stored(worker, keys, parent, tier=ev.tier, engine_hashes=engine)
        self._remember_salt(worker, ev, n, salt)
        return "ok"

    def _anchor(self, worker: int, ev: BlockStored, n: int) -> tuple[Any, int] | None:
        """The recent prompt an orphaned store continues, and where (see :mod:`kvroute.trust`)."""
        if not ev.token_ids or not self.router.is_degraded(worker):
            return None
        prompts = self.router.recent_prompts(worker)
        if not prompts:
            return None
        bs = self.router.block_size
        return find_anchor(prompts, ev.token_ids[: n * bs], bs, ev.lora_name)

    def _orphan(
        self, worker: int, ev: BlockStored, n: int, engine: npt.NDArray[np.uint64]
    ) -> str:
        """A store whose parent the index does not know: anchor it, else skip it."""
        found = self._anchor(worker, ev, n)
        if found is None:
            return "unknown_block"
        prompt, j = found
        salt = ev.cache_salt if ev.cache_salt is not None else prompt.cache_salt
        keys = self._keys(ev, n, int(prompt.keys[j - 1]), salt)
        m = min(n, len(prompt.keys) - j)
        if not np.array_equal(keys[:m], prompt.keys[j : j + m]):
            return "unknown_block"  # the prompt was hashed with another salt: not this one
        self.router.apply_anchored(
            worker, prompt.keys[:j], ev.parent_block_hash, keys, tier=ev.tier, engine_hashes=engine
        )
        self._remember_salt(worker, ev, n, salt)
        return "anchored"

    def _salt(self, worker: int, ev: BlockStored) -> str | None:
        """The event's cache salt: its own, else the one its parent block inherited."""
        if ev.cache_salt is not None or ev.parent_block_hash is None:
            return ev.cache_salt
        salts = self._salts.get(worker)
        return salts.get(ev.parent_block_hash) if salts else None

    def _remember_salt(self, worker: int, ev: BlockStored, n: int, salt: str | None) -> None:
        if salt is not None:
            self._salts.setdefault(worker, {}).update(dict.fromkeys(ev.block_hashes[:n], salt))

    def _keys(
        self, ev: BlockStored, n: int, parent: int | None, salt: str | None
    ) -> npt.NDArray[np.uint64]:
        if ev.tokens_hashes is not None:
            from ..hashing import dynamo_sequence_hashes

            return dynamo_sequence_hashes(ev.tokens_hashes, parent=parent)
        bs = self.router.block_size
        return self.router.hashing(
            ev.token_ids[: n * bs],
            bs,
            lora_name=ev.lora_name,
            cache_namespace=salt,
            parent=parent,
        )

    def _stored_engine(
        self, worker: int, ev: BlockStored, n: int, engine: npt.NDArray[np.uint64]
    ) -> str:
        salt = self._salt(worker, ev)
        if ev.token_ids:
            self._verify(worker, ev, n, engine, salt)
        parent = ev.parent_block_hash
        if parent is not None and self.router.is_degraded(worker):
            # Keys are the engine's hashes here: an anchored prompt's keys are its
            # blocks' handles, so its ancestors are restored exactly.
            ids = np.array([worker], np.uint64)
            if not self.router.index.match_array(np.array([parent], np.uint64), ids)[0]:
                found = self._anchor(worker, ev, n)
                if found is not None and int(found[0].keys[found[1] - 1]) == parent:
                    prompt, j = found
                    self.router.apply_anchored(
                        worker, prompt.keys[:j], parent, engine, tier=ev.tier, exact=True
                    )
                    self._remember_salt(worker, ev, n, salt)
                    return "anchored"
        self.router.apply_stored(worker, engine, parent, tier=ev.tier)
        self._remember_salt(worker, ev, n, salt)
        return "ok"

    def _verify(
        self,
        worker: int,
        ev: BlockStored,
        n: int,
        engine: npt.NDArray[np.uint64],
        salt: str | None,
    ) -> None:
        """Warn and count if ``router.hashing`` does not give the event's engine hashes.

        The index keys on engine hashes here, so a parent's key *is* its
        engine hash: a continuation is checked by continuing from it.
        """
        bs = self.router.block_size
        try:
            want = self.router.hashing(
                ev.token_ids[: n * bs],
                bs,
                lora_name=ev.lora_name,
                cache_namespace=salt,
                parent=ev.parent_block_hash,
            )
        except NotImplementedError:
            return  # this hashing reproduces chain starts only
        want = as_u64_array(want, "router.hashing()")
        if np.array_equal(want, engine):
            return
        if self.metrics is not None:
            self.metrics.mismatch(worker, "hash")
        if not self.router.is_degraded(worker):
            self.router.degrade_worker(
                worker, "mismatch", "its engine hashes differ from the router's hashing"
            )
        self._warn.warning(
            (worker, "hash"),
            "worker %s: engine block hashes %s (%s) differ from the router's hashing of the "
            "event's tokens %s: with key_on='engine' the index keys on engine hashes, so "
            "requests hashed by route() will NOT match this worker's blocks. Give "
            "Router(hashing=...) the engine's exact hash function (its algorithm and "
            "PYTHONHASHSEED), or key on the router's hash (key_on='kvroute', the default).",
            worker,
            _short(engine),
            "a chain start"
            if ev.parent_block_hash is None
            else f"continuing from {ev.parent_block_hash}",
            _short(want),
        )

    # -- removed ------------------------------------------------------------------

    def _removed(self, worker: int, ev: BlockRemoved) -> str:
        if ev.group_idx is not None and ev.group_idx not in self.groups:
            return "ignored"
        if not ev.block_hashes:
            return "ok"
        self._unsalt(worker, ev.block_hashes)
        hashes = np.fromiter(ev.block_hashes, dtype=np.uint64, count=len(ev.block_hashes))
        unknown = self.router.apply_removed(
            worker, hashes, engine=self.key_on == "kvroute", tier=ev.tier
        )
        return "unknown_block" if unknown else "ok"

    def _removed_run(self, worker: int, run: Sequence[BlockRemoved], out: Counter[str]) -> None:
        first = run[0]
        if first.group_idx is not None and first.group_idx not in self.groups:
            self._tally(worker, "ignored", len(run))
            out["ignored"] += len(run)
            return
        if self._salts.get(worker):
            for ev in run:
                self._unsalt(worker, ev.block_hashes)
        hashes = np.array([h for ev in run for h in ev.block_hashes], dtype=np.uint64)
        try:
            unknown = self.router.apply_removed(
                worker, hashes, engine=self.key_on == "kvroute", tier=first.tier
            )
        except (TypeError, ValueError, OverflowError) as e:
            self._warn.warning((worker, "rejected"), "worker %s: removals rejected (%s)", worker, e)
            self._tally(worker, "rejected", len(run))
            out["rejected"] += len(run)
            return
        bad = min(int(unknown), len(run))
        for status, k in (("ok", len(run) - bad), ("unknown_block", bad)):
            if k:
                self._tally(worker, status, k)
                out[status] += k

    def _unsalt(self, worker: int, hashes: Sequence[int]) -> None:
        # A salted block may have copies in several tiers; forgetting its salt
        # at the first removal only costs a later child store its key (it is
        # then keyed unsalted and never matches), never a wrong match.
        salts = self._salts.get(worker)
        if salts:
            for h in hashes:
                salts.pop(h, None)


def _short(hashes: Sequence[int] | npt.NDArray[np.uint64]) -> str:
    vals = [int(h) for h in hashes[:3]]
    return str(vals)[:-1] + (", ...]" if len(hashes) > 3 else "]")

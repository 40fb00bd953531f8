"""Worker trust: whether the router may believe its event index about a worker.

The router's picture of a worker's cache comes from the worker's KV events.
That picture goes wrong in ways the events cannot always show: batches lost
with no replay, an engine whose block size or hash seed differs from the
router's, an engine that evicts without saying so. The proxy sees, for every
request, both the router's prediction (cached tokens expected) and the
engine's report (cached tokens it served), so the router can check its
beliefs instead of trusting them. :class:`WorkerTrust` keeps, per worker:

* a **state**, ``"ok"`` or ``"degraded"``, with its *cause*:

  - ``"events_lost"``: the event layer lost batches no replay could bring
    back (:meth:`kvroute.events.EventApplier.unrecoverable_gap`);
  - ``"mismatch"``: the worker's events cannot be indexed at all (another
    block size; with ``key_on="engine"``, hashes the router's hashing does
    not reproduce). It stays until the worker's cache is reset (a restart
    may bring the right settings);
  - ``"drift_over"`` / ``"drift_under"``: the drift detector below found the
    index predicting hits the engine does not see, or missing hits it reports.

* a **drift window**: the last ``window`` informative requests' predicted
  and reported cached tokens. A request is *informative* when either figure
  is above the tolerance (one with nothing cached and nothing predicted says
  nothing about the index: a workload of unique prompts must not dilute a
  drift). It *agrees* when the two differ by at most ``tolerance_blocks``
  blocks (an engine reports whole blocks and recomputes a fully cached
  prompt's last block); otherwise it is *over* (predicted more) or *under*.
  The window is statistical on purpose: legitimate disagreements (the engine
  evicting a block between its event and the request, a burst of siblings
  the engine ran side by side, a warm-up the index has not heard of yet) are
  scattered requests, not half of a window. Once ``window`` requests have
  been observed since the worker's last change of state, a share of at least
  ``threshold`` off makes it degraded; a degraded worker (but a
  ``"mismatch"``) is trusted again once a full window since is off at most
  ``threshold / 2`` (hysteresis: no flapping at the boundary). With the
  defaults (64 requests, 0.3), a worker whose every informative request is
  off is found at its 64th; scattered legitimate disagreement of up to 10 %
  of the requests never trips it (none in 100,000 simulated requests; 15 %:
  4 times; 20 %: 133 times), while a worker a third of whose requests are
  off is found. While a
  worker is degraded, what is judged is the *index's own* prediction,
  recorded at routing time, not the fallback's: it is the index's
  trustworthiness that is in question.

While a worker is degraded the router routes it on a **fallback**: its
decisions to that worker are recorded as predicted residency (the
approximate mode's :class:`~kvroute.approx.PredictedResidency`, with its TTL
and the worker's capacity bound), and the worker's overlap is the larger of
the index's and the fallback's — except after ``"drift_over"``, when the
index's overlap for it is ignored (it believes in blocks the engine does not
have; believing it would herd requests onto a worker holding nothing).

Degraded workers also keep their **recent prompts** (the last
:data:`RECENT_PROMPTS` routed to them, with their tokens and keys), from
which the event layer *anchors* a stored event whose parent block the index
does not know (:func:`find_anchor`): the engine's blocks are a prefix of a
prompt it was sent, so the prompt tells the kvroute keys of the event's
ancestors, and the engine's parent hash names the last of them. The index
then holds the ancestors again; those without an engine handle are
*inferred* (:meth:`WorkerTrust.inferred`), each *protected* by the
handled block it was inferred for (its *anchor*): an engine evicts a block
only when no cached block continues it (vLLM and SGLang evict leaves first,
a prompt's tail before its head), so while an anchor is held, so are its
ancestors. A removal the index cannot resolve (the engine evicted a block
it never named to the router) may be an inferred block only if none of its
anchors is held any more: each drops one such unprotected block, the least
recently confirmed, tail first. A block the engine stores again replaces its
inferred copy, with its handle.

None of this costs a trusted fleet anything on the routing path: the router
checks one flag (:attr:`WorkerTrust.any_degraded`).

>>> t = WorkerTrust(block_size=16, window=4, threshold=0.5)
>>> t.add_worker(0)
>>> t.observe(0, predicted=0, reported=0) is None, t.state(0).observed   # not informative
(True, 0)
>>> [t.observe(0, predicted=512, reported=0) for _ in range(4)]
[None, None, None, 'drift_over']
>>> t.degrade(0, "drift_over", "3 of 4 requests over", now=1.0), t.any_degraded
(True, True)
>>> [t.observe(0, predicted=256, reported=256) for _ in range(4)]
[None, None, None, 'trusted']
>>> t.trust(0), t.state(0).state
(True, 'ok')

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from .approx import PredictedResidency

if TYPE_CHECKING:
    from .index_api import IndexLike

__all__ = [
    "CAUSES",
    "RECENT_PROMPTS",
    "Cause",
    "Listener",
    "Listeners",
    "RecentPrompt",
    "WorkerState",
    "WorkerTrust",
    "find_anchor",
]

#: Why a worker is degraded.
Cause = Literal["events_lost", "mismatch", "drift_over", "drift_under"]
CAUSES: Final[tuple[str, ...]] = ("events_lost", "mismatch", "drift_over", "drift_under")

#: ``listener(worker, change, reason)``; change is ``"reset"``, ``"degraded"`` or ``"trusted"``.
Listener = Callable[[int, str, str], None]

_log = logging.getLogger("kvroute.router")


class Listeners:
    """Who hears of changes to a worker's cache state (``Router.add_listener``).

    The router collects its changes as ``(worker, change, reason)`` notes
    under its lock and hands them here once the lock is released, so a
    listener may call the router; a listener's exception is logged and
    swallowed (one listener cannot break the event path of another).

    >>> heard = []
    >>> ls = Listeners()
    >>> ls.add(lambda w, change, why: heard.append((w, change)))
    >>> ls.notify([(3, "reset", "restart")]); heard
    [(3, 'reset')]
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add(self, listener: Listener) -> None:
        """Add ``listener`` (called after the ones added before)."""
        self._listeners = [*self._listeners, listener]  # copy on write: notify reads unlocked

    def notify(self, notes: Sequence[tuple[int, str, str]]) -> None:
        """Call every listener with every note, in order."""
        if not notes:
            return
        for listener in self._listeners:
            for w, change, why in notes:
                try:
                    listener(w, change, why)
                except Exception:
                    _log.exception("a router listener failed on %s of worker %d", change, w)


#: Prompts remembered per degraded worker, to anchor its orphaned stores.
RECENT_PROMPTS: Final = 256

#: Index-only predictions kept for requests routed to degraded workers, awaiting
#: their observation (the oldest go first past it).
_PENDING: Final = 8192

U64 = npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True)
class WorkerState:
    """What the router believes about one worker's index (``Router.worker_states()``).

    :ivar worker: the worker id.
    :ivar state: ``"ok"`` or ``"degraded"``.
    :ivar cause: why it is degraded (one of :data:`CAUSES`), else None.
    :ivar reason: what happened, for people.
    :ivar since: the router's clock when it became degraded, else None.
    :ivar drift: the share of the window's requests off by more than the tolerance.
    :ivar observed: requests in the window.
    :ivar over: of which predicted more than the engine reported.
    :ivar under: of which predicted less.
    :ivar degradations: how many times it became degraded.
    :ivar inferred_blocks: index blocks believed by anchoring or the engine's
        reports, without an engine handle.
    """

    worker: int
    state: Literal["ok", "degraded"]
    cause: str | None
    reason: str | None
    since: float | None
    drift: float
    observed: int
    over: int
    under: int
    degradations: int
    inferred_blocks: int

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-ready data (the proxy's ``/health`` shows it per worker)."""
        return {
            "state": self.state,
            "cause": self.cause,
            "reason": self.reason,
            "drift": round(self.drift, 4),
            "observed": self.observed,
            "degradations": self.degradations,
        }


@dataclass(frozen=True, slots=True)
class RecentPrompt:
    """A prompt routed to a degraded worker: what anchoring an orphaned store needs.

    :ivar tokens: its token ids (as given to the router).
    :ivar keys: its block keys, as the router computed them.
    :ivar lora_name: its LoRA adapter, or None.
    :ivar cache_salt: its cache salt, or None.
    """

    tokens: Any
    keys: U64
    lora_name: str | None
    cache_salt: str | None


class _Window:
    """The last ``n`` observations as codes: 0 agrees, 1 over, 2 under."""

    __slots__ = ("codes", "over", "under")

    def __init__(self, n: int) -> None:
        self.codes: deque[int] = deque(maxlen=n)
        self.over = 0
        self.under = 0

    def add(self, code: int) -> None:
        codes = self.codes
        if len(codes) == codes.maxlen:
            old = codes[0]
            self.over -= old == 1
            self.under -= old == 2
        codes.append(code)
        self.over += code == 1
        self.under += code == 2

    @property
    def full(self) -> bool:
        return len(self.codes) == self.codes.maxlen

    @property
    def share(self) -> float:
        return (self.over + self.under) / len(self.codes) if self.codes else 0.0

    def clear(self) -> None:
        self.codes.clear()
        self.over = self.under = 0


class _Worker:
    __slots__ = ("cause", "degradations", "inferred", "reason", "recent", "since", "window")

    def __init__(self, window: int) -> None:
        self.window = _Window(window)
        self.cause: str | None = None
        self.reason: str | None = None
        self.since: float | None = None
        self.degradations = 0
        self.recent: deque[RecentPrompt] = deque(maxlen=RECENT_PROMPTS)
        # inferred block -> the anchors protecting it; least recently confirmed first
        self.inferred: OrderedDict[int, set[int]] = OrderedDict()


class WorkerTrust:
    """Per worker: trusted or degraded, its drift window, its fallback and its anchors.

    :param block_size: tokens per block (the tolerance is counted in blocks).
    :param window: informative requests per drift window (>= 1).
    :param threshold: share of a full window off at which a worker drifts, in (0, 1].
    :param tolerance_blocks: how far apart (in blocks) prediction and report may be
        and still agree.
    :param fallback: builds the predicted residency degraded workers are routed on
        (default: one with a private twin index and a 120 s TTL).
    """

    def __init__(
        self,
        block_size: int,
        window: int = 64,
        threshold: float = 0.3,
        tolerance_blocks: float = 2.0,
        fallback: Callable[[], PredictedResidency] | None = None,
    ) -> None:
        self.block_size = block_size
        self.window = window
        self.threshold = threshold
        self.tolerance = tolerance_blocks * block_size
        self._workers: dict[int, _Worker] = {}
        #: Degraded workers.
        self.degraded: set[int] = set()
        #: Degraded workers whose index overlap is ignored (``"drift_over"``).
        self.masked: set[int] = set()
        self._make_fallback = fallback or _default_fallback
        self._fallback: PredictedResidency | None = None
        self._capacity: dict[int, int] = {}
        # request id -> (worker, the index's predicted cached tokens), for degraded workers
        self._pending: OrderedDict[Any, tuple[int, int]] = OrderedDict()
        #: The index's own match of the last :meth:`widen` (what the index alone said).
        self.index_match: npt.NDArray[np.uint32] | None = None

    @property
    def any_degraded(self) -> bool:
        """Whether some worker is degraded (the routing path's one check)."""
        return bool(self.degraded)

    # -- membership --------------------------------------------------------------------

    def add_worker(self, worker: int) -> None:
        """Start tracking ``worker`` (trusted). A known worker is left as it is."""
        if worker not in self._workers:
            self._workers[worker] = _Worker(self.window)

    def remove_worker(self, worker: int) -> None:
        """Forget everything about ``worker``."""
        self._workers.pop(worker, None)
        self._forget(worker)
        self._capacity.pop(worker, None)

    def set_capacity(self, worker: int, blocks: int | None) -> None:
        """Bound ``worker``'s fallback residency to its KV capacity (None: unbounded)."""
        if blocks is None:
            self._capacity.pop(worker, None)
        else:
            self._capacity[worker] = blocks
        if self._fallback is not None and worker in self.degraded:
            self._fallback.set_capacity(worker, blocks)

    def _forget(self, worker: int) -> None:
        # what is believed about the worker's cache beyond the index
        self.degraded.discard(worker)
        self.masked.discard(worker)
        if self._fallback is not None:
            self._fallback.remove_worker(worker)
            if not self.degraded:
                self._fallback = None
        if self._pending:
            for rid in [r for r, (w, _) in self._pending.items() if w == worker]:
                del self._pending[rid]

    # -- state -------------------------------------------------------------------------

    def degrade(self, worker: int, cause: str, reason: str, now: float) -> bool:
        """Mark ``worker`` degraded for ``cause``; True if it was not degraded before.

        Its drift window starts anew, and its fallback residency begins empty.

        :raises ValueError: an unknown cause.
        :raises KeyError: an unknown worker.
        """
        if cause not in CAUSES:
            raise ValueError(f"cause must be one of {CAUSES}, not {cause!r}")
        st = self._workers[worker]
        new = worker not in self.degraded
        if new:
            st.degradations += 1
            st.since = now
            self.degraded.add(worker)
            if self._fallback is None:
                self._fallback = self._make_fallback()
            cap = self._capacity.get(worker)
            if cap is not None:
                self._fallback.set_capacity(worker, cap)
        if new or cause != st.cause:
            st.window.clear()
        st.cause = cause
        st.reason = reason
        if cause == "drift_over":
            self.masked.add(worker)
        else:
            self.masked.discard(worker)
        return new

    def trust(self, worker: int) -> bool:
        """Trust ``worker``'s index again; True if it was degraded.

        Its fallback residency and recent prompts go; its inferred blocks stay
        (they are still believed, and still dropped at an unresolved removal).
        """
        st = self._workers.get(worker)
        if st is None or worker not in self.degraded:
            return False
        self._forget(worker)
        st.cause = st.reason = st.since = None
        st.recent.clear()
        st.window.clear()
        return True

    def reset(self, worker: int) -> bool:
        """The worker's cache is empty now: trust it, forget its window and inferred blocks.

        :returns: whether it was degraded.
        """
        was = self.trust(worker)
        st = self._workers.get(worker)
        if st is not None:
            st.window.clear()
            st.inferred.clear()
        return was

    def state(self, worker: int) -> WorkerState:
        """A snapshot of ``worker``'s state.

        :raises KeyError: an unknown worker.
        """
        st = self._workers[worker]
        w = st.window
        return WorkerState(
            worker,
            "degraded" if worker in self.degraded else "ok",
            st.cause,
            st.reason,
            st.since,
            w.share,
            len(w.codes),
            w.over,
            w.under,
            st.degradations,
            len(st.inferred),
        )

    # -- the drift detector --------------------------------------------------------------

    def prediction(self, worker: int, request_id: Any, predicted: int) -> int | None:
        """The prediction to judge for a request served by ``worker``, or None to skip it.

        A request routed while the worker was degraded is judged on the
        index's own prediction (recorded by :meth:`routed`); one routed before
        it became degraded is skipped while it is (it predates the change).
        """
        pending = self._pending.pop(request_id, None) if self._pending else None
        if pending is not None and pending[0] == worker:
            return pending[1]
        if worker in self.degraded:
            return None
        return predicted

    def observe(self, worker: int, predicted: int, reported: int) -> str | None:
        """Add one request's predicted and reported cached tokens to ``worker``'s window.

        A request with both at most the tolerance is not informative: not added.

        :returns: the change it calls for: ``"drift_over"`` / ``"drift_under"``
            (a trusted worker drifted: degrade it), ``"trusted"`` (a degraded
            one agrees again: trust it), or None. Unknown workers: None.
        """
        st = self._workers.get(worker)
        if st is None:
            return None
        tol = self.tolerance
        if predicted <= tol and reported <= tol:
            return None  # nothing predicted, nothing served: says nothing of the index
        diff = predicted - reported
        code = 1 if diff > tol else 2 if -diff > tol else 0
        w = st.window
        w.add(code)
        if not w.full:
            return None
        if worker not in self.degraded:
            if w.share >= self.threshold:
                return "drift_over" if w.over >= w.under else "drift_under"
        elif st.cause != "mismatch" and w.share <= self.threshold / 2:
            return "trusted"
        return None

    def judge(
        self, worker: int, request_id: Any, predicted: int, reported: int
    ) -> tuple[str, str] | None:
        """One served request's verdict: the change it makes to ``worker``, and why.

        :meth:`prediction` picks the figure to judge, :meth:`observe` weighs
        it; a ``"trusted"`` verdict is applied here (:meth:`trust`), a drift
        is left to the caller to degrade the worker (it drops index blocks).

        :param predicted: the cached tokens the decision predicted.
        :param reported: the cached tokens the engine reported.
        :returns: ``(change, why)``, or None when nothing changes.
        """
        judged = self.prediction(worker, request_id, predicted)
        if judged is None:
            return None
        change = self.observe(worker, judged, reported)
        if change is None:
            return None
        w = self._workers[worker].window
        n = len(w.codes)
        if change == "trusted":
            why = f"{n - w.over - w.under} of the last {n} agreed"
            self.trust(worker)  # clears the window: the figures are taken first
            return change, why
        why = (
            f"{w.over} of the last {n} requests predicted more cached tokens than the "
            f"engine reported, {w.under} fewer"
        )
        return change, why

    # -- routing a degraded fleet -----------------------------------------------------------

    def widen(
        self,
        match: npt.NDArray[np.uint32],
        hashes: U64,
        ids: npt.NDArray[np.uint64],
        pos: dict[int, int],
    ) -> npt.NDArray[np.uint32]:
        """The index's match per position, with degraded workers' fallback folded in.

        A masked worker's index overlap is zeroed; every degraded worker's is
        raised to its fallback's. A ``(3, n)`` match (per tier) is raised on the
        device row, zeroing host / disk where it is (a decision counts as a
        device hit). The index's own match is kept in :attr:`index_match`.
        """
        self.index_match = match
        out = match.copy()
        total = out if out.ndim == 1 else out.sum(axis=0)
        for w in self.masked:
            p = pos.get(w)
            if p is not None:
                if out.ndim == 1:
                    out[p] = 0
                else:
                    out[:, p] = 0
                    total[p] = 0
        fb = self._fallback
        if fb is None or not len(fb) or not len(hashes):
            return out
        pred = fb.match_array(hashes, ids)
        raise_ = pred > total
        if raise_.any():
            if out.ndim == 1:
                out[raise_] = pred[raise_]
            else:
                out[0, raise_] = pred[raise_]
                out[1:, raise_] = 0
        return out

    def index_blocks(self, p: int) -> int:
        """Blocks the index alone matched at position ``p`` in the last :meth:`widen`."""
        m = self.index_match
        if m is None:
            return 0
        return int(m[p]) if m.ndim == 1 else int(m[:, p].sum())

    def routed(
        self,
        worker: int,
        request_id: Any,
        hashes: U64,
        index_tokens: int,
        now: float,
        *,
        tokens: Any = None,
        lora_name: str | None = None,
        cache_salt: str | None = None,
    ) -> Any:
        """A request went to degraded ``worker``: record it in the fallback and the anchors.

        :param index_tokens: cached tokens the index alone predicted on it.
        :returns: the fallback entry id (for :meth:`forget`).
        """
        pending = self._pending
        pending[request_id] = (worker, index_tokens)
        if len(pending) > _PENDING:
            pending.popitem(last=False)
        if tokens is not None and len(hashes):
            self._workers[worker].recent.append(
                RecentPrompt(tokens, hashes, lora_name, cache_salt)
            )
        assert self._fallback is not None
        return self._fallback.record(worker, hashes, now)

    def forget(self, request_id: Any, entry: Any) -> None:
        """A request routed to a degraded worker failed: drop its prediction and fallback."""
        self._pending.pop(request_id, None)
        if self._fallback is not None and entry is not None:
            self._fallback.forget(entry)

    def expire(self, now: float) -> None:
        """Drop fallback predictions past their TTL."""
        if self._fallback is not None:
            self._fallback.expire(now)

    # -- anchors -------------------------------------------------------------------------

    def recent(self, worker: int) -> list[RecentPrompt]:
        """The prompts recently routed to ``worker`` while degraded, oldest first."""
        st = self._workers.get(worker)
        return [] if st is None else list(st.recent)

    def inferred(self, worker: int) -> OrderedDict[int, set[int]]:
        """``worker``'s inferred blocks and their anchors, least recently confirmed first (live).

        :raises KeyError: an unknown worker.
        """
        return self._workers[worker].inferred

    def store(
        self,
        index: IndexLike,
        worker: int,
        keys: U64,
        parent: int | None,
        tier: str,
        engine_hashes: Any,
    ) -> None:
        """``index.store`` for a stored event; a stored copy replaces an inferred one.

        The engine stores only what it lacks: an inferred copy of a block it
        stores now was stale (evicted unseen), and one count must not become two.
        """
        st = self._workers.get(worker)
        if st is not None and st.inferred:
            stale = [k for k in keys.tolist() if k in st.inferred]
            if stale:
                index.remove(worker, stale)
                for k in stale:
                    del st.inferred[k]
        index.store(worker, keys, parent, tier=tier, engine_hashes=engine_hashes)

    def unresolved_removal(self, index: IndexLike, worker: int, n: int) -> int:
        """The engine removed ``n`` blocks the index has no handle for; drop as many inferred ones.

        Only an inferred block none of whose anchors is held any more can
        have been one (the engine evicts leaves first); the least recently
        confirmed such blocks go, a prompt's tail first.

        Runtime complexity: O(inferred blocks x their anchors), in the worst case.

        :returns: how many inferred blocks were dropped.
        """
        st = self._workers.get(worker)
        if st is None or not st.inferred:
            return 0
        ids = np.array([worker], np.uint64)
        one = np.zeros(1, np.uint64)

        def held(k: int) -> bool:
            one[0] = k
            return bool(index.match_array(one, ids)[0])

        gone: list[int] = []
        for k, anchors in st.inferred.items():
            if len(gone) == n:
                break
            for a in list(anchors):
                if held(a):
                    break
                anchors.discard(a)
            else:
                gone.append(k)
        for k in gone:
            del st.inferred[k]
        if gone:
            index.remove(worker, np.array(gone, np.uint64))
        return len(gone)

    def anchor(
        self,
        index: IndexLike,
        worker: int,
        ancestors: U64,
        parent_engine_hash: int | None,
        tier: str,
        exact: bool,
    ) -> int:
        """Store the ancestors of an anchored event that ``worker`` is not known to hold.

        What a worker holds of a prompt is a prefix (chained keys), so the
        ancestors past the prefix it holds are stored. With ``exact`` (the
        index keys on engine hashes: a key is its own handle) they are exact.
        Otherwise the last one gets ``parent_engine_hash`` as its handle and
        is the anchor of the others, which are inferred: stored, protected by
        it, and confirmed (the most recent, their head last). A held last
        ancestor that was inferred gets the handle.

        :returns: the number of ancestors stored.
        """
        n = len(ancestors)
        if n == 0:
            return 0
        ids = np.array([worker], np.uint64)
        held = int(index.match_array(ancestors, ids)[0])
        new = ancestors[held:]
        before = int(ancestors[held - 1]) if held else None
        if exact or parent_engine_hash is None:
            if len(new):
                index.store(worker, new, before, tier=tier)
            return len(new)
        inferred = self._workers[worker].inferred
        last = int(ancestors[-1])
        if len(new) > 1:
            index.store(worker, new[:-1], before, tier=tier)
            before = int(new[-2])
        if len(new):
            index.store(worker, ancestors[-1:], before, tier=tier,
                        engine_hashes=[parent_engine_hash])  # fmt: skip
        elif last in inferred:
            index.remove(worker, [last])  # held, but without the handle the engine names it by
            del inferred[last]
            index.store(worker, ancestors[-1:], None, tier=tier,
                        engine_hashes=[parent_engine_hash])  # fmt: skip
        fresh = set(new[:-1].tolist())
        for k in reversed(ancestors[:-1].tolist()):
            if k in fresh:
                inferred[k] = {last}
            elif k in inferred:
                inferred[k].add(last)
                inferred.move_to_end(k)
        return len(new)

    def _check(self) -> None:
        """Check the invariants; AssertionError if one fails."""
        assert self.degraded <= set(self._workers), "a degraded worker that is not known"
        assert self.masked <= self.degraded, "a masked worker that is not degraded"
        assert (self._fallback is None) == (not self.degraded), "fallback without degraded"
        for w, st in self._workers.items():
            assert (w in self.degraded) == (st.cause is not None), "state and cause disagree"
            assert st.window.over + st.window.under <= len(st.window.codes)
        if self._fallback is not None:
            self._fallback._check()


def _default_fallback() -> PredictedResidency:
    from . import BlockIndex

    return PredictedResidency(BlockIndex, ttl=120.0)


def find_anchor(
    prompts: Sequence[RecentPrompt],
    tokens: Any,
    block_size: int,
    lora_name: str | None = None,
) -> tuple[RecentPrompt, int] | None:
    """The recent prompt an orphaned stored event continues, and where.

    An engine stores blocks of the prompts it is sent. A stored event whose
    parent block the index does not know (its history was lost) continues
    some prompt's prefix: find the newest prompt whose tokens, from a block
    boundary ``j >= 1``, equal the event's first tokens (as far as both go).
    Then the prompt's keys ``[:j]`` are the event's ancestors, the last of
    them its parent.

    >>> p = RecentPrompt(list(range(12)), np.arange(3, dtype=np.uint64) + 100, None, None)
    >>> prompt, j = find_anchor([p], [8, 9, 10, 11], block_size=4)
    >>> j, prompt.keys[:j].tolist()
    (2, [100, 101])
    >>> find_anchor([p], [9, 9, 9, 9], block_size=4) is None
    True

    Runtime complexity: O(prompts x their tokens), in numpy; only degraded
    workers' orphaned stores pay it.

    :param prompts: candidates, oldest first (the newest match wins).
    :param tokens: the event's token ids (its full blocks).
    :param block_size: tokens per block.
    :param lora_name: the event's LoRA adapter; only prompts for the same one match.
    :returns: ``(prompt, j)``, or None when no prompt, or more than one
        position of the newest matching prompt, fits.
    """
    bs = block_size
    ev = np.asarray(tokens, dtype=np.int64)
    if len(ev) < bs:
        return None
    n_ev = len(ev) // bs
    first = ev[:bs]
    for prompt in reversed(prompts):
        if prompt.lora_name != lora_name:
            continue
        nr = min(len(prompt.keys), len(prompt.tokens) // bs)
        if nr < 2:
            continue
        toks = np.asarray(prompt.tokens[: nr * bs], dtype=np.int64)
        rows = toks.reshape(nr, bs)
        hits = []
        for j in (np.flatnonzero((rows[1:] == first).all(axis=1)) + 1).tolist():
            m = min(n_ev, nr - j)
            if np.array_equal(toks[j * bs : (j + m) * bs], ev[: m * bs]):
                hits.append(j)
        if len(hits) == 1:
            return prompt, hits[0]
        if hits:
            return None  # the prompt repeats itself: which block is the parent is unknowable
    return None

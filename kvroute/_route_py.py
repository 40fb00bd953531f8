"""Reference twin of the router's compiled kernels (``kvroute/_route.pyx``): plain lists.

This module is the specification. ``kvroute/_route.pyx`` must behave exactly
like it: same names, same ``inspect.signature`` parameter names, same results
and the same exceptions for the same input. It is written naively on purpose
(a trie of plain dicts, one node per block, where the compiled twin has a
compressed radix tree and hash tables) so that the two share few bugs;
``tests/test_router_kernels.py`` runs every test against both, and holds both
to a list of prompts compared key by key.

:class:`ActivePrefixes` is the router's record of the prompts in flight, per
worker, from which Dynamo's *active decode blocks* follow: the unique blocks
of a worker's in-flight prompts, a prefix shared by several of them counted
once. A block is identified by its position and everything before it (which
is what a chained block key encodes), so the unique blocks of a set of
prompts are its distinct prefixes, and the blocks of a new prompt that a
worker already holds are its longest common prefix with one of the worker's
prompts. With kvroute's chained keys that is exactly "the distinct keys" and
"the leading keys already present"; the twins compare whole prefixes, so
they are exact for any keys.

:func:`fresh_overlay` is the loop of
:meth:`kvroute.approx.FreshDecisions.overlay`: it raises the router's
per-worker overlap to the common prefix with each fresh decision.

:func:`kvroute_costs` is the arithmetic of the ``kvroute`` policy
(:class:`kvroute.policies.KvRoute`): its cost terms, its load gate and the
tied cheapest candidates. Here it is whole-array numpy; compiled, one pass in
C with no temporaries. The compiled build turns off floating-point
contraction (``-ffp-contract=off``), so each operation rounds as numpy's does
and the two pick the same workers bit for bit.

:func:`kvroute_step` is the router's common path after the index match, for
the ``kvroute`` policy: the fresh-decision overlay, the new decode blocks,
the policy's costs and tie-break, and the bookkeeping of the chosen worker
(load arrays, prompts in flight, fresh decisions), in one call. Here it is
the router's own steps, called one after the other; compiled, one call with
no temporaries but its results.

Not thread-safe: the router calls both under its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

from ._convert import as_u64_array, check_u64

__all__ = [
    "ActivePrefixes",
    "ActiveRequest",
    "FreshDecisions",
    "LoadArrays",
    "chained_common_prefix",
    "common_prefix",
    "fresh_overlay",
    "kvroute_costs",
    "kvroute_step",
]

U64 = npt.NDArray[np.uint64]


def common_prefix(a: U64, b: U64) -> int:
    """Length of the longest common prefix of two key arrays (every key compared).

    >>> common_prefix(np.array([1, 2, 3], np.uint64), np.array([1, 2, 4, 5], np.uint64))
    2

    Runtime complexity: O(min(len(a), len(b))).
    """
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


def chained_common_prefix(a: U64, b: U64) -> int:
    """Length of the common prefix of two arrays of *chained* block keys.

    A chained key names its block and its whole prefix, so ``a[i] == b[i]``
    implies ``a[:i] == b[:i]``: equality is monotone and a bisection finds the
    first difference in O(log n) scalar comparisons instead of comparing every
    key. (Two different prefixes sharing a key would take a 64-bit collision.)
    Arrays that are not chained need :func:`common_prefix`.

    >>> from kvroute.hashing import kvroute_block_hashes
    >>> a = kvroute_block_hashes(list(range(64)), 16)
    >>> b = kvroute_block_hashes(list(range(40)) + [9] * 24, 16)
    >>> chained_common_prefix(a, b)   # blocks 0 and 1 are tokens 0..31 in both
    2
    """
    m = min(len(a), len(b))
    if m == 0 or a[m - 1] == b[m - 1]:
        return m
    lo, hi = 0, m - 1  # a[:lo] == b[:lo], and a[hi] != b[hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] == b[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


class _Node:
    """One block of the prompts in flight: its prefix is the path from the root."""

    __slots__ = ("children", "ending", "through")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.through: dict[int, int] = {}  # worker -> its prompts containing this block
        self.ending: dict[int, int] = {}  # worker -> its prompts ending at this block


class ActivePrefixes:
    """The prompts of the requests in flight, per worker: their shared prefixes counted once.

    >>> ap = ActivePrefixes()
    >>> ap.add(7, np.array([1, 2, 3], np.uint64))        # 3 blocks new to worker 7
    3
    >>> ap.add(7, np.array([1, 2, 9, 9], np.uint64))     # [1, 2] is already active there
    2
    >>> ap.worker_len(7), len(ap)
    (5, 2)
    >>> ap.match_array(np.array([1, 2, 9, 4], np.uint64), np.array([7, 8], np.uint64)).tolist()
    [3, 0]
    >>> ap.remove(7, np.array([1, 2, 3], np.uint64))     # block 3 leaves; [1, 2] stays
    1
    >>> ap.worker_len(7)
    4

    An empty prompt is not recorded (adding or removing it returns 0).
    The keys are copied: the caller may reuse its arrays.

    Model: a trie with one node per distinct prefix (plain dicts), each node
    counting, per worker, the prompts that contain it and those that end at
    it. A worker's active blocks are the nodes it is in. (The compiled twin
    is a compressed radix tree; the tests hold both to a list of prompts.)
    """

    def __init__(self) -> None:
        self._root = _Node()
        self._len: dict[int, int] = {}
        self._count: dict[int, int] = {}

    def add(self, worker: int, hashes: Any) -> int:
        """Record one more prompt in flight on ``worker``.

        Runtime complexity: O(len(hashes)).

        :returns: how many of its blocks were not yet active on the worker.
        :raises TypeError, OverflowError: a bad worker id or key.
        """
        w = check_u64(worker, "worker")
        h = as_u64_array(hashes)
        if len(h) == 0:
            return 0
        node, new = self._root, 0
        for k in h.tolist():
            child = node.children.get(k)
            if child is None:
                child = node.children[k] = _Node()
            n = child.through.get(w, 0)
            new += n == 0
            child.through[w] = n + 1
            node = child
        node.ending[w] = node.ending.get(w, 0) + 1
        self._len[w] = self._len.get(w, 0) + new
        self._count[w] = self._count.get(w, 0) + 1
        return new

    def remove(self, worker: int, hashes: Any) -> int:
        """Drop one prompt in flight on ``worker``, equal to ``hashes``.

        Runtime complexity: O(len(hashes)).

        :returns: how many of its blocks are no longer active on the worker.
        :raises KeyError: no such prompt is in flight on ``worker``.
        :raises TypeError, OverflowError: a bad worker id or key.
        """
        w = check_u64(worker, "worker")
        h = as_u64_array(hashes)
        if len(h) == 0:
            return 0
        steps: list[tuple[_Node, int, _Node]] = []
        node = self._root
        for k in h.tolist():
            child = node.children.get(k)
            if child is None or w not in child.through:
                break
            steps.append((node, k, child))
            node = child
        if len(steps) != len(h) or not node.ending.get(w):
            raise KeyError(f"no prompt of {len(h)} blocks equal to this one is in flight on {w}")
        node.ending[w] -= 1
        if not node.ending[w]:
            del node.ending[w]
        gone = 0
        for parent, k, child in reversed(steps):
            child.through[w] -= 1
            if not child.through[w]:
                del child.through[w]
                gone += 1
                if not child.through:
                    del parent.children[k]
        self._len[w] -= gone
        self._count[w] -= 1
        if not self._count[w]:
            del self._count[w], self._len[w]
        return gone

    def match_array(self, hashes: Any, workers: Any) -> npt.NDArray[np.uint32]:
        """For each id in ``workers``, how many leading blocks of ``hashes`` are active on it.

        Runtime complexity: O(len(hashes) + len(workers)).

        :raises TypeError, OverflowError: bad keys or worker ids.
        """
        h = as_u64_array(hashes)
        ws = as_u64_array(workers, "workers")
        depth: dict[int, int] = {}
        held: dict[int, int] = {}
        node, i = self._root, 0
        for k in h.tolist():
            child = node.children.get(k)
            if child is None:
                break
            # a block's workers are a subset of its parent's: note only who drops out
            if len(child.through) != len(held):
                for w in held:
                    if w not in child.through:
                        depth[w] = i
                held = child.through
            node, i = child, i + 1
        for w in held:
            depth[w] = i
        return np.array([depth.get(w, 0) for w in ws.tolist()], np.uint32)

    def new_blocks(self, hashes: Any, workers: Any) -> npt.NDArray[np.float64]:
        """For each id in ``workers``, how many blocks of ``hashes`` are not active on it.

        ``len(hashes) - match_array(hashes, workers)``, as float64.
        """
        h = as_u64_array(hashes)
        shared = self.match_array(h, workers)
        return len(h) - shared.astype(np.float64)

    def worker_len(self, worker: int) -> int:
        """Distinct blocks (prefixes) of ``worker``'s prompts in flight; 0 if it has none."""
        return self._len.get(check_u64(worker, "worker"), 0)

    def remove_worker(self, worker: int) -> int:
        """Drop every prompt of ``worker``; return how many there were.

        Runtime complexity: O(blocks in flight, all workers).
        """
        w = check_u64(worker, "worker")
        if w not in self._count:
            return 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            for k, child in list(node.children.items()):
                if child.through.pop(w, None) is None:
                    continue  # w is in none of this block's descendants either
                child.ending.pop(w, None)
                if child.through:
                    stack.append(child)
                else:
                    del node.children[k]
        self._len.pop(w)
        return self._count.pop(w)

    def __len__(self) -> int:
        """Prompts in flight, all workers."""
        return sum(self._count.values())

    def _check(self) -> None:
        """Recount every worker's blocks and prompts from the trie; AssertionError if off."""
        blocks: dict[int, int] = {}
        prompts: dict[int, int] = {}
        stack = [self._root]
        while stack:
            node = stack.pop()
            below: dict[int, int] = {}
            for child in node.children.values():
                assert child.through, "a block no prompt holds"
                for w, n in child.through.items():
                    below[w] = below.get(w, 0) + n
                stack.append(child)
            if node is self._root:
                assert not node.through and not node.ending
                continue
            assert set(below) <= set(node.through), "a worker in a block but not its prefix"
            for w, n in node.through.items():
                assert n == node.ending.get(w, 0) + below.get(w, 0), "counts do not add up"
                blocks[w] = blocks.get(w, 0) + 1
            for w, n in node.ending.items():
                assert n > 0 and w in node.through
                prompts[w] = prompts.get(w, 0) + n
        assert blocks == self._len, "block counts drifted"
        assert prompts == self._count, "prompt counts drifted"

    def __repr__(self) -> str:
        return f"<ActivePrefixes prompts={len(self)} workers={len(self._count)}>"


def fresh_overlay(
    entries: Iterable[list[Any]],
    hashes: U64,
    now: float,
    ov: npt.NDArray[np.int64],
    pos: Mapping[int, int],
    skip_known: bool,
    host: npt.NDArray[np.int64] | None = None,
    disk: npt.NDArray[np.int64] | None = None,
) -> int:
    """Raise ``ov[pos[worker]]`` to the common prefix of ``hashes`` with each live decision.

    :param entries: remembered decisions ``[worker, hashes, expiry]`` (at most
        one per worker), those with ``expiry <= now`` ignored.
    :param ov: per position, the overlap known so far (from the index), raised in place.
    :param pos: worker id -> position in ``ov``; decisions for other workers are ignored.
    :param skip_known: skip a decision that differs from ``hashes`` at the block
        where the worker's known overlap ends (it cannot beat it: chained keys).
    :param host, disk: per-tier overlaps, zeroed where ``ov`` is raised
        (predicted residency counts as device).
    :returns: how many positions were raised.
    """
    found: dict[int, int] = {}
    for worker, h, expiry in entries:
        if expiry <= now:
            continue
        if skip_known:
            p = pos.get(worker)
            k = 0 if p is None else int(ov[p])
            if k >= len(h) or k >= len(hashes) or h[k] != hashes[k]:
                continue
        k = chained_common_prefix(h, hashes)
        if k > found.get(worker, 0):
            found[worker] = k
    raised = 0
    for worker, k in found.items():
        p = pos.get(worker)
        if p is not None and k > ov[p]:
            ov[p] = k
            if host is not None and disk is not None:
                host[p] = disk[p] = 0
            raised += 1
    return raised


class FreshDecisions:
    """The newest routing decisions per prompt start, for ``ttl`` seconds.

    Keyed by a prompt's first block hash; each key keeps its ``per_key``
    newest decisions (worker, hashes, expiry), at most one per worker (a
    newer decision to the same worker replaces the older). :meth:`match` returns, per
    worker among them, the longest common prefix with the request: siblings
    of a fan-out see their first sibling's prompt as cached on its worker.

    >>> fd = FreshDecisions(ttl=5.0)
    >>> e = fd.record(2, np.array([7, 8, 9], np.uint64), now=0.0)
    >>> fd.match(np.array([7, 8, 1], np.uint64), now=1.0)
    {2: 2}
    >>> fd.match(np.array([7, 8, 1], np.uint64), now=5.0)
    {}

    Runtime complexity: :meth:`record` O(1); :meth:`match` O(per_key x log
    prompt blocks), since the hashes are chained keys.

    Model: a dict from first key to a ``deque(maxlen=per_key)`` of
    ``[worker, hashes, expiry]`` lists, oldest first (the compiled twin keeps
    C records holding each prompt's buffer). :meth:`record`'s handle is
    opaque: pass it to :meth:`forget` and nothing else.

    :param ttl: how long a decision is remembered (s).
    :param per_key: decisions kept per first block.
    :raises ValueError: ``ttl`` <= 0 or ``per_key`` < 1.
    """

    def __init__(self, ttl: float = 5.0, per_key: int = 4) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, got {ttl}")
        if per_key < 1:
            raise ValueError(f"per_key must be >= 1, got {per_key}")
        self.ttl = float(ttl)
        self.per_key = int(per_key)
        #: first key -> its decisions ``[worker, hashes, expiry]``, oldest first
        self._by_first: dict[int, deque[list[Any]]] = {}

    def __len__(self) -> int:
        """Number of remembered decisions (expired ones included until purged)."""
        return sum(len(d) for d in self._by_first.values())

    def record(self, worker: int, hashes: Any, now: float) -> Any:
        """Remember that ``hashes`` were just routed to ``worker``; return a handle for forget.

        An empty prompt is not recorded (the handle is None).

        :raises TypeError, OverflowError: a bad worker id or key.
        """
        worker = check_u64(worker, "worker")
        hashes = as_u64_array(hashes)
        if len(hashes) == 0:
            return None
        key = int(hashes[0])
        d = self._by_first.get(key)
        if d is None:
            d = self._by_first[key] = deque(maxlen=self.per_key)
        else:
            for old in d:
                if old[0] == worker:
                    d.remove(old)
                    break
        entry = [worker, hashes, now + self.ttl]
        d.append(entry)
        return entry

    def started(self, key: int) -> bool | None:
        """Whether a remembered decision's prompt starts with block ``key``; None if none is kept.

        >>> fd = FreshDecisions()
        >>> fd.started(7), fd.record(0, np.array([7, 8], np.uint64), 0.0) is not None, fd.started(7)
        (None, True, True)

        :raises TypeError, OverflowError: ``key`` is not an int in [0, 2**64).
        """
        k = check_u64(key, "key")
        if not self._by_first:
            return None
        return k in self._by_first

    def forget(self, entry: Any) -> None:
        """Drop a remembered decision (its request failed); None and stale handles are ignored."""
        if entry is None:
            return
        d = self._by_first.get(int(entry[1][0]))
        if d is not None:
            for i, e in enumerate(d):
                if e is entry:
                    del d[i]
                    break
            if not d:
                del self._by_first[int(entry[1][0])]

    def match(
        self,
        hashes: Any,
        now: float,
        known: Mapping[int, int] | None = None,
    ) -> dict[int, int]:
        """Per worker, the longest prefix of ``hashes`` among its live remembered decisions.

        :param known: per worker, a match already known (the index's); a
            decision that cannot beat it (it differs from ``hashes`` at block
            ``known[worker]``) is skipped without comparing whole arrays.
        """
        hashes = as_u64_array(hashes)
        if len(hashes) == 0:
            return {}
        d = self._by_first.get(int(hashes[0]))
        if not d:
            return {}
        out: dict[int, int] = {}
        for worker, h, expiry in d:
            if expiry <= now:
                continue
            if known:
                k = known.get(worker, 0)
                if k >= len(h) or k >= len(hashes) or h[k] != hashes[k]:
                    continue
            k = chained_common_prefix(h, hashes)
            if k > out.get(worker, 0):
                out[worker] = k
        return out

    def overlay(
        self,
        hashes: Any,
        now: float,
        ov: npt.NDArray[np.int64],
        pos: Mapping[int, int],
        *,
        skip_known: bool = False,
        host: npt.NDArray[np.int64] | None = None,
        disk: npt.NDArray[np.int64] | None = None,
    ) -> int:
        """:meth:`match` merged into per-position overlaps in place, in one compiled pass.

        ``ov[pos[w]]`` becomes the larger of itself and ``match(hashes, now,
        known)[w]``, where ``known`` is ``ov`` itself when ``skip_known`` (the
        router passes the index's match) and None otherwise; where it is raised,
        ``host`` / ``disk`` (if given) are zeroed: a fresh decision counts as a
        device hit.

        >>> fd = FreshDecisions(ttl=5.0)
        >>> e = fd.record(2, np.array([7, 8, 9], np.uint64), now=0.0)
        >>> ov = np.array([0, 1], np.int64)
        >>> fd.overlay(np.array([7, 8, 1], np.uint64), 1.0, ov, {5: 0, 2: 1}), ov.tolist()
        (1, [0, 2])

        :param ov: int64 overlaps, one per position (C-contiguous, writable).
        :param pos: worker id -> position in ``ov``.
        :returns: how many positions were raised.
        """
        hashes = as_u64_array(hashes)
        if len(hashes) == 0:
            return 0
        d = self._by_first.get(int(hashes[0]))
        if not d:
            return 0
        return fresh_overlay(d, hashes, now, ov, pos, skip_known, host, disk)

    def remove_worker(self, worker: int) -> None:
        """Forget the decisions that went to ``worker``. O(remembered decisions)."""
        worker = check_u64(worker, "worker")
        for key in list(self._by_first):
            d = self._by_first[key]
            kept = [e for e in d if e[0] != worker]
            if len(kept) != len(d):
                d.clear()
                d.extend(kept)
            if not d:
                del self._by_first[key]

    def purge(self, now: float) -> int:
        """Drop expired decisions; return how many. O(remembered decisions)."""
        dropped = 0
        for key in list(self._by_first):
            d = self._by_first[key]
            while d and d[0][2] <= now:
                d.popleft()
                dropped += 1
            if not d:
                del self._by_first[key]
        return dropped

    def _check(self) -> None:
        """Check the record's invariants; AssertionError if one fails."""
        for key, d in self._by_first.items():
            assert d, "an empty key is kept"
            assert len(d) <= self.per_key, "more decisions than per_key"
            workers = [e[0] for e in d]
            assert len(set(workers)) == len(workers), "two decisions for one worker"
            for _, h, _ in d:
                assert len(h) and int(h[0]) == key, "a decision under another key"

    def __repr__(self) -> str:
        return f"<FreshDecisions decisions={len(self)} keys={len(self._by_first)}>"


_CANDIDATE_DTYPES = (
    ("overlap", np.dtype(np.int64)),
    ("prefill_tokens", np.dtype(np.float64)),
    ("decode_blocks", np.dtype(np.float64)),
    ("new_decode_blocks", np.dtype(np.float64)),
    ("active_requests", np.dtype(np.int64)),
    ("waiting", np.dtype(np.float64)),
    ("kv_usage", np.dtype(np.float64)),
    ("busy", np.dtype(np.bool_)),
)
_TIER_DTYPES = (("overlap_host", np.dtype(np.int64)), ("overlap_disk", np.dtype(np.int64)))


def _check_candidates(c: Any) -> int:
    n = len(c.workers)
    if n == 0:
        raise ValueError("Candidates needs at least one worker")
    fields = _CANDIDATE_DTYPES + (_TIER_DTYPES if c.tiered else ())
    for name, dtype in fields:
        a = getattr(c, name)
        if (
            not isinstance(a, np.ndarray)
            or a.dtype != dtype
            or a.shape != (n,)
            or not a.flags.c_contiguous
        ):
            raise TypeError(f"candidates.{name} must be a contiguous {dtype} array of {n} values")
    return n


def _no_nan(cost: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    # a NaN or infinite cost (a worker with broken state) is never preferred to a finite one
    return np.nan_to_num(cost, nan=np.inf, posinf=np.inf, neginf=np.inf)


def kvroute_costs(
    candidates: Any, prompt_tokens: int, block_size: int, params: Any
) -> tuple[dict[str, npt.NDArray[Any]], list[int]]:
    """The ``kvroute`` policy's costs, gate and cheapest eligible candidates.

    The formulas are :class:`kvroute.policies.KvRoute`'s (its docstring and
    ``docs/routing.md``); this is their arithmetic, shared by the policy's
    compiled and pure-Python builds.

    :param candidates: a :class:`kvroute.policies.Candidates` snapshot (n >= 1)
        whose arrays have the documented dtypes and are contiguous.
    :param prompt_tokens: the prompt's length in tokens.
    :param block_size: tokens per KV block.
    :param params: the policy: its ``decode_token_weight``, ``active_request_tokens``,
        ``waiting_request_tokens``, ``host_hit_weight``, ``disk_hit_weight``,
        ``kv_high``, ``kv_pressure_tokens``, ``balance_slack``,
        ``balance_abs_slack``, ``balance_stake_tokens``, ``balance_stake_limit``
        and ``uncached_weight`` are read.
    :returns: ``(costs, ties)``: the cost terms by name, fresh arrays in the
        order ``uncached_tokens``, ``queued_prefill``, ``decode``, ``queue``,
        ``kv_pressure`` (only if some worker is over ``kv_high``),
        ``stake_tokens`` (only if the gate bound some worker), ``eligible``
        (bool), ``cost``; and the positions of the cheapest eligible
        candidates, the least loaded of them if several (never empty).
    :raises TypeError: an array of the wrong dtype, length or layout.

    Runtime complexity: O(n).
    """
    c = candidates
    n = _check_candidates(c)
    bs = float(block_size)
    uncached = c.overlap * -bs
    if c.tiered:
        uncached += (bs * (1.0 - params.host_hit_weight)) * c.overlap_host
        uncached += (bs * (1.0 - params.disk_hit_weight)) * c.overlap_disk
    uncached += float(prompt_tokens)
    np.maximum(uncached, 0.0, out=uncached)
    decode = c.decode_blocks + c.new_decode_blocks
    decode *= params.decode_token_weight * bs
    queue = c.waiting * params.waiting_request_tokens
    queue += params.active_request_tokens * c.active_requests
    load = c.active_requests + c.waiting
    cost = uncached * params.uncached_weight
    cost += c.prefill_tokens
    cost += decode
    cost += queue
    costs: dict[str, npt.NDArray[Any]] = {
        "uncached_tokens": uncached,
        "queued_prefill": c.prefill_tokens.copy(),
        "decode": decode,
        "queue": queue,
    }
    kv_high = params.kv_high
    if c.kv_usage.max() > kv_high:  # NaN compares False: no pressure term
        pressure = np.maximum(c.kv_usage - kv_high, 0.0)
        pressure *= params.kv_pressure_tokens / (1.0 - kv_high)
        cost += pressure
        costs["kv_pressure"] = pressure
    # summed left to right (numpy's sum is pairwise): the compiled loop does the same
    total = float(np.cumsum(load)[-1])
    cap = (1.0 + params.balance_slack) * (total + 1.0) / n + params.balance_abs_slack
    eligible = load <= cap - 1.0  # the least loaded always passes when balance_abs_slack >= 1
    if not eligible.all():
        # What leaving an over-share worker costs: the prompt tokens it holds beyond
        # the worker the request would otherwise go to (the cheapest within the bound).
        alt_cost = np.where(eligible, cost, np.inf)
        alt = int(np.argmin(alt_cost))  # the first NaN, if there is one
        if not alt_cost[alt] < np.inf:  # NaN or inf: a broken worker is no alternative
            alt = int(np.argmin(np.where(eligible, _no_nan(cost), np.inf)))
            if not eligible[alt]:  # every worker within the bound is broken
                alt = int(np.argmax(eligible))
        stake = uncached[alt] - uncached
        np.clip(stake, 0.0, params.balance_stake_limit, out=stake)
        costs["stake_tokens"] = stake
        # bound x (1 + stake / balance_stake_tokens), minus this request's own slot
        eligible = load <= stake * (cap / params.balance_stake_tokens) + (cap - 1.0)
    busy = c.busy
    if busy.any() and not busy.all():
        eligible &= ~busy
        if not eligible.any():  # every worker that is not busy is over its share
            eligible = load == load.min()
    gated = np.where(eligible, cost, np.inf)
    best = float(gated.min())
    if not best > -np.inf:  # NaN or -inf (a worker with broken state): never chosen
        gated = np.where(eligible, _no_nan(cost), np.inf)
        best = float(gated.min())
    ties = np.flatnonzero(gated <= best + 1e-9 * max(abs(best), 1.0))
    if len(ties) > 1:
        tl = load[ties]
        keep = tl == tl.min()
        if keep.any():
            ties = ties[keep]
    costs["eligible"] = eligible
    costs["cost"] = cost
    return costs, ties.tolist()


@dataclass(slots=True)
class ActiveRequest:
    """The router's record of one request in flight (kept by :class:`kvroute.load.LoadTracker`).

    >>> r = ActiveRequest(7, 100.0, 2.0, 0.5)
    >>> r.worker, r.prefill_tokens, r.payload
    (7, 100.0, None)

    :param worker: the worker id it was routed to.
    :param prefill_tokens: its uncached prompt tokens, 0 once its first token arrived.
    :param decode_blocks: its expected output blocks.
    :param last_seen: clock time of its last lifecycle event (for the stale sweep).
    :param payload: the router's own data (kept opaque here).
    :param hashes: its prompt's block keys, among the active prefixes while it runs.
    """

    worker: int
    prefill_tokens: float
    decode_blocks: float
    last_seen: float
    payload: Any = None
    hashes: npt.NDArray[np.uint64] | None = None


def _check_array(a: Any, dtype: type, n: int, name: str, writable: bool = False) -> None:
    # the compiled twin's buffer checks, and its message
    if (
        not isinstance(a, np.ndarray)
        or a.dtype != np.dtype(dtype)
        or a.shape != (n,)
        or not a.flags.c_contiguous
        or (writable and not a.flags.writeable)
    ):
        raise TypeError(f"{name} must be a contiguous {np.dtype(dtype).name} array of {n} values")


class LoadArrays:
    """A :class:`~kvroute.load.LoadTracker`'s live per-position arrays, for :func:`kvroute_step`.

    Position ``i`` is worker ``workers[i]`` in every array; the step reads
    them and adds the chosen request to the first three in place. The
    tracker builds a new one whenever it replaces its arrays (membership
    changes); the compiled twin holds the arrays' buffers for its lifetime.

    >>> la = LoadArrays(np.array([7], np.uint64), np.zeros(1), np.zeros(1),
    ...                 np.zeros(1, np.int64), np.zeros(1), np.zeros(1), ActivePrefixes(), {})
    >>> la.n, la.pos
    (1, {7: 0})

    :param workers: worker ids (uint64, any form :func:`kvroute._convert.as_u64_array` takes).
    :param prefill_tokens: float64, written.
    :param decode_blocks: float64, written.
    :param active_requests: int64, written.
    :param waiting: float64.
    :param kv_usage: float64.
    :param active: the tracker's :class:`ActivePrefixes` (or any object with
        its ``new_blocks`` and ``add``).
    :param requests: the tracker's table of requests in flight (request id ->
        :class:`ActiveRequest`), where the step records the request it routes.
    :raises TypeError: an array that is not contiguous, of its dtype and of
        ``len(workers)`` values (or read-only, for the written three).
    """

    __slots__ = (
        "active",
        "active_requests",
        "decode_blocks",
        "kv_usage",
        "n",
        "pos",
        "prefill_tokens",
        "requests",
        "waiting",
        "workers",
    )

    def __init__(
        self,
        workers: Any,
        prefill_tokens: Any,
        decode_blocks: Any,
        active_requests: Any,
        waiting: Any,
        kv_usage: Any,
        active: Any,
        requests: dict[Any, ActiveRequest],
    ) -> None:
        ids = as_u64_array(workers, "workers")
        n = len(ids)
        _check_array(prefill_tokens, np.float64, n, "prefill_tokens", True)
        _check_array(decode_blocks, np.float64, n, "decode_blocks", True)
        _check_array(active_requests, np.int64, n, "active_requests", True)
        _check_array(waiting, np.float64, n, "waiting")
        _check_array(kv_usage, np.float64, n, "kv_usage")
        self.n = n
        self.workers: U64 = ids
        self.prefill_tokens: npt.NDArray[np.float64] = prefill_tokens
        self.decode_blocks: npt.NDArray[np.float64] = decode_blocks
        self.active_requests: npt.NDArray[np.int64] = active_requests
        self.waiting: npt.NDArray[np.float64] = waiting
        self.kv_usage: npt.NDArray[np.float64] = kv_usage
        #: worker id -> position
        self.pos: dict[int, int] = {w: i for i, w in enumerate(ids.tolist())}
        self.active: Any = active
        self.requests = requests

    def __repr__(self) -> str:
        return f"<LoadArrays n={self.n}>"


def _step_match(match: Any, n: int) -> tuple[npt.NDArray[np.int64], Any, Any]:
    # (overlap, host, disk) from a (n,) or (3, n) uint32 match; host / disk None when untiered
    m = match
    if not isinstance(m, np.ndarray) or m.dtype != np.uint32 or m.shape not in ((n,), (3, n)):
        raise TypeError(f"match must be a uint32 array of shape ({n},) or (3, {n})")
    if m.ndim == 1:
        return m.astype(np.int64), None, None
    d, h, k = (row.astype(np.int64) for row in m)
    return d + h + k, h, k


def kvroute_step(
    policy: Any,
    load: Any,
    fresh: Any,
    request_id: Any,
    payload: Any,
    match: Any,
    hashes: Any,
    now: float,
    prompt_tokens: int,
    block_size: int,
    out_blocks: float,
    busy: Any = None,
) -> tuple[int, int, int, npt.NDArray[np.int64], Mapping[str, npt.NDArray[Any]], Any]:
    """Choose a worker with the ``kvroute`` policy over every live worker, and count the request.

    The router's common path after the index match, as one call; in order:

    1. the overlap per position is ``match`` (int64), or for a ``(3, n)``
       match (device, host, disk per tier) their sum; raised by the fresh
       decisions (``fresh.overlay``), with ``skip_known`` for a one-row
       match, zeroing host / disk where it raises for a tiered one;
    2. the new decode blocks per position: ``load.active.new_blocks``,
       plus ``out_blocks`` when non-zero;
    3. :func:`kvroute_costs` over every position, tiered when ``match`` is;
       the chosen position is the only tie, else
       ``ties[policy._rng.randrange(len(ties))]``;
    4. on the chosen position ``p`` (worker ``w``): with ``fresh``,
       ``fresh.record(w, hashes, now)``; then ``prefill_tokens[p] +=
       prompt_tokens - cached``, ``active_requests[p] += 1``,
       ``decode_blocks[p] += out_blocks + load.active.add(w, hashes)``
       (``cached = min(matched x block_size, prompt_tokens)``), and
       ``load.requests[request_id] = ActiveRequest(w, float(prompt_tokens -
       cached), float(out_blocks), now, payload, hashes)``:
       :meth:`LoadTracker.start <kvroute.load.LoadTracker.start>`.

    >>> from kvroute.policies import KvRoute
    >>> la = LoadArrays(np.array([5, 6], np.uint64), np.zeros(2), np.zeros(2),
    ...                 np.zeros(2, np.int64), np.zeros(2), np.zeros(2), ActivePrefixes(), {})
    >>> h = np.array([1, 2, 3], np.uint64)
    >>> p, w, matched, ov, costs, entry = kvroute_step(
    ...     KvRoute(seed=0), la, None, "r1", None, np.array([0, 2], np.uint32), h, 0.0, 48, 16, 0.0)
    >>> p, w, matched, ov.tolist(), costs["uncached_tokens"].tolist()
    (1, 6, 2, [0, 2], [48.0, 16.0])
    >>> la.prefill_tokens.tolist(), la.active_requests.tolist(), la.decode_blocks.tolist()
    ([0.0, 16.0], [0, 1], [0.0, 3.0])
    >>> la.requests["r1"].prefill_tokens
    16.0

    :param policy: a :class:`kvroute.policies.KvRoute` (its parameters and its RNG).
    :param load: the router's load, as :class:`LoadArrays` (at least one worker).
    :param fresh: its :class:`kvroute.approx.FreshDecisions`, or None.
    :param request_id: the request's id (not in ``load.requests``).
    :param payload: the router's data for the request's record.
    :param match: per position, the index's matched blocks (``match_array``),
        or per tier (``match_tiers_array``): uint32, ``(n,)`` or ``(3, n)``.
    :param hashes: the prompt's block keys.
    :param now: the router's clock.
    :param prompt_tokens: the prompt's length in tokens.
    :param block_size: tokens per block.
    :param out_blocks: the request's expected output blocks.
    :param busy: per position, over the busy threshold (bool), or None.
    :returns: ``(position, worker, matched blocks, overlap, costs, fresh entry)``:
        the costs as :func:`kvroute_costs` gives them (a mapping, perhaps
        built on first use), the entry as ``fresh.record`` returns it (None
        without ``fresh``).
    :raises TypeError: ``load`` is not a :class:`LoadArrays`; ``match`` or
        ``busy`` of the wrong dtype or shape.
    :raises ValueError: no worker; ``request_id`` is already in flight.
    """
    if not isinstance(load, LoadArrays):
        raise TypeError(f"load must be a LoadArrays, not {type(load).__name__}")
    if request_id in load.requests:
        raise ValueError(f"request {request_id!r} is already in flight")
    h = as_u64_array(hashes)
    ids = load.workers
    n = load.n
    if n == 0:
        raise ValueError("Candidates needs at least one worker")
    ov, host, disk = _step_match(match, n)
    if busy is None:
        busy = np.zeros(n, np.bool_)
    else:
        _check_array(busy, np.bool_, n, "busy")
    tiered = host is not None
    if fresh is not None:
        fresh.overlay(h, now, ov, load.pos, skip_known=not tiered, host=host, disk=disk)
    new = load.active.new_blocks(h, ids)
    if out_blocks:
        new += out_blocks
    pt, db, act = load.prefill_tokens, load.decode_blocks, load.active_requests
    wt, kv = load.waiting, load.kv_usage
    zeros = np.zeros(n, np.int64)
    c = SimpleNamespace(
        workers=ids,
        overlap=ov,
        overlap_host=host if tiered else zeros,
        overlap_disk=disk if tiered else zeros,
        prefill_tokens=pt,
        decode_blocks=db,
        new_decode_blocks=new,
        active_requests=act,
        waiting=wt,
        kv_usage=kv,
        busy=busy,
        tiered=tiered,
    )
    costs, ties = kvroute_costs(c, prompt_tokens, block_size, policy)
    p = ties[0] if len(ties) == 1 else ties[policy._rng.randrange(len(ties))]
    worker = int(ids[p])
    matched = int(ov[p])
    cached = min(matched * block_size, prompt_tokens)
    entry = None if fresh is None else fresh.record(worker, h, now)
    pt[p] += prompt_tokens - cached
    act[p] += 1
    db[p] += out_blocks + load.active.add(worker, h)
    load.requests[request_id] = ActiveRequest(
        worker, float(prompt_tokens - cached), float(out_blocks), now, payload, h
    )
    return p, worker, matched, ov, costs, entry

"""vLLM's prefix-caching block pool, modelled once for the benchmark, the simulator and the mock.

The model keeps what routing can observe of vLLM's ``BlockPool``:

- a cache of ``capacity`` slots; a slot holds a *named* block (full, keyed by
  its prefix-chained hash) or an *unnamed* one (allocated for tokens not yet
  computed, or a partial tail block, which is never shared);
- a named block referenced by a running request is *active*; when its last
  reference goes it becomes *inactive* but stays cached and reusable, in an
  LRU queue;
- allocation takes empty slots first, then evicts inactive blocks least
  recently released first, and refuses (changing nothing) if even that is
  not enough;
- a finished request releases its blocks *tail first*, so its last block is
  evicted first and a shared prefix outlives its branches: with chained keys
  no cached block ever loses its parent.

Three owners drive it: :class:`kvroute.bench.LruEngine` (one request at a
time), :class:`kvroute.sim.engine.Engine` (chunked prefill, partial blocks,
preemption) and :class:`kvroute.testing.PrefixCache` (the mock worker's events).
Nothing in the core imports this module.

Not thread-safe: the owner serialises calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["BlockPool"]


class BlockPool:
    """Slots of KV blocks: named blocks with reference counts, and an LRU of the inactive ones.

    >>> p = BlockPool(3)
    >>> p.allocate(3), p.name(11), p.name(12), p.name(13)
    (True, True, True, True)
    >>> p.release([11, 12, 13])          # tail first: 13 is evicted first
    >>> p.match([11, 12, 13]), p.allocate(1), p.removed
    (3, True, [13])

    :param capacity: slots in the pool; at least 1.
    :raises ValueError: ``capacity`` < 1.
    """

    __slots__ = ("_anon", "_capacity", "lru", "ref", "removed")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        #: named block -> running requests holding it (0: inactive, in :attr:`lru`)
        self.ref: dict[int, int] = {}
        #: inactive named blocks, least recently released first
        self.lru: OrderedDict[int, None] = OrderedDict()
        self._anon = 0
        #: keys evicted since the owner last drained (or swapped) the list
        self.removed: list[int] = []

    @property
    def capacity(self) -> int:
        """Total slots."""
        return self._capacity

    @property
    def unnamed(self) -> int:
        """Slots allocated but not (yet) named: blocks not full."""
        return self._anon

    def __len__(self) -> int:
        """Named blocks cached, active or inactive."""
        return len(self.ref)

    def __contains__(self, key: object) -> bool:
        return key in self.ref

    def used(self) -> int:
        """Slots holding a block (active, inactive, or unnamed)."""
        return len(self.ref) + self._anon

    def free(self) -> int:
        """Empty slots (not counting evictable inactive blocks)."""
        return self._capacity - len(self.ref) - self._anon

    def active_blocks(self) -> int:
        """Slots referenced by running requests (unnamed ones included)."""
        return len(self.ref) - len(self.lru) + self._anon

    def match(self, keys: Sequence[int]) -> int:
        """Number of leading ``keys`` cached (active or inactive); touches nothing.

        Runtime complexity: O(matched).
        """
        ref = self.ref
        n = 0
        for k in keys:
            if k not in ref:
                break
            n += 1
        return n

    def acquire(self, keys: Sequence[int]) -> None:
        """Take a reference on each of the cached ``keys`` (an inactive block leaves the LRU).

        :raises KeyError: a key is not cached.
        """
        ref, lru = self.ref, self.lru
        for k in keys:
            c = ref[k]
            if c == 0:
                del lru[k]
            ref[k] = c + 1

    def can_allocate(self, n: int, pinned_inactive: int = 0) -> bool:
        """Whether ``n`` new slots fit, evicting if needed.

        :param pinned_inactive: inactive blocks about to be acquired (not evictable).
        """
        return n <= self.free() + len(self.lru) - pinned_inactive

    def allocate(self, n: int) -> bool:
        """Take ``n`` unnamed slots, evicting least recently released blocks if needed.

        Evicted keys are appended to :attr:`removed`, in eviction order.

        Runtime complexity: O(n evicted).

        :returns: False (and nothing changed) if they do not fit.
        """
        if n <= 0:
            return True
        short = n - self.free()
        if short > len(self.lru):
            return False
        lru, ref, removed = self.lru, self.ref, self.removed
        for _ in range(short):
            k, _v = lru.popitem(last=False)
            del ref[k]
            removed.append(k)
        self._anon += n
        return True

    def name(self, key: int) -> bool:
        """An unnamed slot became the full block ``key``; the caller holds a reference on it.

        If ``key`` is already cached (another request computed the same block
        meanwhile), the slot is freed and the reference is taken on the cached copy.

        :returns: True if ``key`` is new to the cache (an engine reports it stored).
        """
        self._anon -= 1
        c = self.ref.get(key)
        if c is None:
            self.ref[key] = 1
            return True
        if c == 0:
            del self.lru[key]
        self.ref[key] = c + 1
        return False

    def release(self, keys: Sequence[int], unnamed: int = 0) -> None:
        """Drop one reference on each of ``keys``, last key first, and free ``unnamed`` slots.

        Blocks whose last reference goes join the LRU's most recent end in
        reverse order, so a sequence's tail is evicted before its head.
        """
        ref, lru = self.ref, self.lru
        for k in reversed(keys):
            c = ref[k] - 1
            ref[k] = c
            if c == 0:
                lru[k] = None
        self._anon -= unnamed

    def clear(self) -> None:
        """Drop every block, named or not, referenced or not (vLLM's ``reset_prefix_cache``).

        References taken before are void: their owners must not release them.
        :attr:`removed` is left as it is (a reset is not a series of evictions).
        """
        self.ref.clear()
        self.lru.clear()
        self._anon = 0

    def _check(self) -> None:
        """O(n) invariant check.

        :raises AssertionError: an invariant is broken.
        """
        assert self._anon >= 0
        assert self.used() <= self._capacity, (self.used(), self._capacity)
        for k, c in self.ref.items():
            assert c >= 0
            assert (c == 0) == (k in self.lru), k
        assert all(k in self.ref for k in self.lru)

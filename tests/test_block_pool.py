"""The one model of vLLM's prefix-caching block pool, against a naive specification.

:class:`kvroute._block_pool.BlockPool` is the cache of the benchmark's engine
model, the simulator's engines and the mock worker; their own tests check
what each adds (events, scheduling). Here the pool itself is driven by random
request lifecycles and compared, step by step, with :class:`NaivePool`: the
same rules written plainly, with release stamps and a scan for the victim
instead of an ordered dict.
"""

from __future__ import annotations

import doctest
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvroute._block_pool
from kvroute._block_pool import BlockPool


class NaivePool:
    """The specification: blocks with reference counts; an inactive block remembers when it went."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.refs: dict[int, int] = {}
        self.released_at: dict[int, int] = {}
        self.clock = 0
        self.unnamed = 0
        self.removed: list[int] = []

    def lru_order(self) -> list[int]:
        return sorted(self.released_at, key=self.released_at.__getitem__)

    def free(self) -> int:
        return self.capacity - len(self.refs) - self.unnamed

    def match(self, keys: list[int]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.refs:
            n += 1
        return n

    def acquire(self, keys: list[int]) -> None:
        for k in keys:
            self.refs[k] += 1
            self.released_at.pop(k, None)

    def can_allocate(self, n: int, pinned_inactive: int = 0) -> bool:
        return n <= self.free() + len(self.released_at) - pinned_inactive

    def allocate(self, n: int) -> bool:
        if n <= 0:
            return True
        if n > self.free() + len(self.released_at):
            return False
        while self.free() < n:
            victim = min(self.released_at, key=self.released_at.__getitem__)
            del self.released_at[victim]
            del self.refs[victim]
            self.removed.append(victim)
        self.unnamed += n
        return True

    def name(self, key: int) -> bool:
        self.unnamed -= 1
        if key in self.refs:
            self.released_at.pop(key, None)
            self.refs[key] += 1
            return False
        self.refs[key] = 1
        return True

    def release(self, keys: list[int], unnamed: int = 0) -> None:
        for k in keys[::-1]:
            self.refs[k] -= 1
            if self.refs[k] == 0:
                self.clock += 1
                self.released_at[k] = self.clock
        self.unnamed -= unnamed

    def clear(self) -> None:
        self.refs.clear()
        self.released_at.clear()
        self.unnamed = 0


@dataclass
class Seq:
    """A running request: the named blocks it references and its unnamed slots."""

    keys: list[int] = field(default_factory=list)
    unnamed: int = 0


# Few distinct keys, so requests share, collide and repeat; and the largest u64.
KEYS = st.one_of(st.integers(0, 12), st.just(2**64 - 1))


class PoolMachine(RuleBasedStateMachine):
    """Requests arrive, fill their slots, finish; the cache is sometimes reset."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: BlockPool | None = None
        self.spec: NaivePool | None = None
        self.running: list[Seq] = []

    @precondition(lambda self: self.pool is None)
    @rule(capacity=st.integers(1, 10))
    def start(self, capacity: int) -> None:
        self.pool = BlockPool(capacity)
        self.spec = NaivePool(capacity)

    @precondition(lambda self: self.pool is not None)
    @rule(keys=st.lists(KEYS, max_size=8), named=st.integers(0, 8), extra=st.integers(0, 2))
    def admit(self, keys: list[int], named: int, extra: int) -> None:
        """As the simulator admits a request: match, check room, pin the hits, allocate the rest."""
        pool, spec = self.pool, self.spec
        assert pool is not None and spec is not None
        m = pool.match(keys)
        assert m == spec.match(keys)
        pinned = sum(1 for k in set(keys[:m]) if pool.ref[k] == 0)
        need = len(keys) - m + extra
        fits = pool.can_allocate(need, pinned)
        assert fits == spec.can_allocate(need, pinned)
        if not fits:
            return
        pool.acquire(keys[:m])
        spec.acquire(keys[:m])
        assert pool.allocate(need) and spec.allocate(need)
        seq = Seq(list(keys[:m]), need)
        for k in keys[m : m + named]:
            assert pool.name(k) == spec.name(k)
            seq.keys.append(k)
            seq.unnamed -= 1
        self.running.append(seq)

    @precondition(lambda self: self.pool is not None)
    @rule(n=st.integers(-1, 12))
    def allocate_alone(self, n: int) -> None:
        """A bare allocation: granted or refused, never half done."""
        assert self.pool is not None and self.spec is not None
        ok = self.pool.allocate(n)
        assert ok == self.spec.allocate(n)
        if ok and n > 0:
            self.running.append(Seq([], n))

    @precondition(lambda self: any(s.unnamed for s in self.running))
    @rule(data=st.data(), key=KEYS)
    def name_a_slot(self, data: st.DataObject, key: int) -> None:
        assert self.pool is not None and self.spec is not None
        seq = data.draw(st.sampled_from([s for s in self.running if s.unnamed]))
        assert self.pool.name(key) == self.spec.name(key)
        seq.keys.append(key)
        seq.unnamed -= 1

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        assert self.pool is not None and self.spec is not None
        seq = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        self.pool.release(seq.keys, seq.unnamed)
        self.spec.release(seq.keys, seq.unnamed)

    @precondition(lambda self: self.pool is not None)
    @rule()
    def clear(self) -> None:
        assert self.pool is not None and self.spec is not None
        self.pool.clear()
        self.spec.clear()
        self.running.clear()  # their references are void

    @precondition(lambda self: self.pool is not None)
    @rule(keys=st.lists(KEYS, max_size=8))
    def match(self, keys: list[int]) -> None:
        assert self.pool is not None and self.spec is not None
        assert self.pool.match(keys) == self.spec.match(keys)

    @invariant()
    def agrees_with_the_specification(self) -> None:
        pool, spec = self.pool, self.spec
        if pool is None or spec is None:
            return
        pool._check()
        assert pool.ref == spec.refs
        assert list(pool.lru) == spec.lru_order()
        assert pool.removed == spec.removed
        assert pool.unnamed == spec.unnamed
        assert pool.free() == spec.free() >= 0
        assert pool.used() == len(spec.refs) + spec.unnamed
        assert len(pool) == len(spec.refs)
        assert pool.active_blocks() == len(spec.refs) - len(spec.released_at) + spec.unnamed
        held = sum(len(s.keys) for s in self.running)
        assert sum(pool.ref.values()) == held
        assert pool.unnamed == sum(s.unnamed for s in self.running)


TestPoolMachine = PoolMachine.TestCase


@given(
    paths=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=6), min_size=1, max_size=30),
    finish_order=st.randoms(use_true_random=False),
    capacity=st.integers(1, 12),
)
def test_chained_keys_never_lose_their_parent(
    paths: list[list[int]], finish_order: random.Random, capacity: int
) -> None:
    """Tail-first release: with chained keys, a cached block's parent is always cached."""
    pool = BlockPool(capacity)
    parent: dict[tuple[int, ...], tuple[int, ...]] = {}
    ids: dict[tuple[int, ...], int] = {}
    running: list[list[int]] = []
    for path in paths:
        # a key per prefix: equal prefixes, equal keys (as chained block hashes)
        prefixes = [tuple(path[: i + 1]) for i in range(len(path))]
        keys = [ids.setdefault(p, len(ids)) for p in prefixes]
        for p in prefixes[1:]:
            parent[p] = p[:-1]
        m = pool.match(keys)
        pool.acquire(keys[:m])
        fit = min(len(keys) - m, pool.free() + len(pool.lru))
        assert pool.allocate(fit)
        for k in keys[m : m + fit]:
            pool.name(k)
        running.append(keys[: m + fit])
        if finish_order.random() < 0.6:
            pool.release(running.pop(finish_order.randrange(len(running))))
        by_id = {v: k for k, v in ids.items()}
        for k in pool.ref:
            up = parent.get(by_id[k])
            assert up is None or ids[up] in pool.ref, (by_id[k], up)
        pool._check()


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        BlockPool(0)


def test_doctests() -> None:
    result = doctest.testmod(kvroute._block_pool)
    assert result.failed == 0 and result.attempted > 0


def test_lru_evicts_released_tail_first() -> None:
    c = BlockPool(4)
    assert c.allocate(3)
    for k in (1, 2, 3):
        c.name(k)
    c.release([1, 2, 3])
    assert list(c.lru) == [3, 2, 1]
    assert c.allocate(3)  # one free slot + two evictions
    assert c.removed == [3, 2]
    assert c.match([1, 2, 3]) == 1
    c._check()


def test_lru_touch_moves_a_reused_block_out_of_the_lru() -> None:
    c = BlockPool(3)
    c.allocate(3)
    for k in (1, 2, 3):
        c.name(k)
    c.release([1])
    c.release([2, 3])
    assert list(c.lru) == [1, 3, 2]
    c.acquire([1])  # reused: active again, not evictable
    c.release([1])  # released again: most recent
    assert list(c.lru) == [3, 2, 1]
    assert not c.allocate(4)
    assert c.allocate(1) and c.removed == [3]
    c._check()


def test_duplicate_block_shares_the_cached_copy() -> None:
    c = BlockPool(4)
    c.allocate(2)
    c.name(7)
    c.name(7)  # computed twice concurrently: one copy, two references
    assert c.used() == 1 and c.ref[7] == 2
    c._check()

"""A vLLM-style prefix cache of full KV blocks, keyed by block hash, with LRU eviction.

It models the part of vLLM 0.33's ``BlockPool`` that routing can observe:

- a request's prompt is split into full blocks, each named by vLLM's chained
  block hash; the longest run of leading blocks already cached is the hit
  (only full blocks count, as in vLLM);
- the hit blocks are pinned (reference-counted) while the request runs, and
  the missing full blocks are allocated and stored, producing **one**
  ``BlockStored`` for the new contiguous run (parent = the block before it);
- freed blocks join an LRU queue; a request frees its blocks deepest first, so
  a chain is evicted tail first, never leaving a child without its parent;
- when the cache is full, allocation evicts from the LRU end, one
  ``BlockRemoved`` (single hash) per evicted block. Pinned blocks are never
  evicted: if even that is not enough room, only the leading missing blocks
  that fit are stored.

Deliberate simplifications: capacity counts cached full blocks only (a running
request's partial last block and its decode blocks take no room), and
generated tokens are never cached. The cache itself is
:class:`kvroute._block_pool.BlockPool`, shared with the simulator and the
benchmark; this module turns what it does into vLLM's events.

Not thread-safe: the owner serialises calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .._block_pool import BlockPool
from ._wire import VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored, VllmEvent

__all__ = ["Allocation", "PrefixCache"]

_MEDIUM = "GPU"


@dataclass(eq=False, slots=True)
class Allocation:
    """What :meth:`PrefixCache.acquire` did for one request.

    :ivar hit_blocks: leading blocks found in the cache.
    :ivar stored: hashes of the blocks newly stored, in prefix order.
    :ivar evicted: hashes evicted to make room, in eviction order.
    :ivar events: the KV events to publish, in order (removals, then the store).
    """

    hit_blocks: int
    stored: tuple[int, ...]
    evicted: tuple[int, ...]
    events: list[VllmEvent]
    _held: list[int] = field(default_factory=list, repr=False)
    _epoch: int = field(default=0, repr=False)


class PrefixCache:
    """Full KV blocks by vLLM block hash: hits, stores, LRU eviction, events.

    The cache is a :class:`kvroute._block_pool.BlockPool` (the model the
    simulator and the benchmark share); this class adds what the mock worker
    publishes: vLLM's ``BlockStored`` / ``BlockRemoved`` events, and stores
    that stop at the room left instead of failing.

    >>> cache = PrefixCache(block_size=2, num_blocks=2)
    >>> a = cache.acquire([11, 12], [1, 2, 3, 4])
    >>> a.hit_blocks, a.stored, type(a.events[0]).__name__
    (0, (11, 12), 'VllmBlockStored')
    >>> cache.release(a)
    >>> cache.acquire([21], [5, 6]).evicted  # the deepest block goes first
    (12,)

    :param block_size: tokens per block.
    :param num_blocks: how many full blocks the cache holds.
    :raises ValueError: a size is not positive.
    """

    def __init__(self, block_size: int, num_blocks: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._pool = BlockPool(num_blocks)
        # Bumped by clear(): allocations from an older epoch hold void references.
        self._epoch = 0

    def __len__(self) -> int:
        """Number of cached blocks (pinned or free)."""
        return len(self._pool)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._pool

    def hashes(self) -> set[int]:
        """The hashes of every cached block."""
        return set(self._pool.ref)

    def lru_order(self) -> list[int]:
        """Evictable blocks, next victim first."""
        return list(self._pool.lru)

    def pinned(self) -> int:
        """Number of blocks held by running requests."""
        return self._pool.active_blocks()

    def match(self, hashes: Sequence[int]) -> int:
        """Number of leading ``hashes`` cached, without touching anything.

        Runtime complexity: O(hit blocks).
        """
        return self._pool.match(hashes)

    def acquire(
        self,
        hashes: Sequence[int],
        tokens: Sequence[int],
        *,
        extra_keys: Sequence[object] | None = None,
        lora_id: int | None = None,
        lora_name: str | None = None,
    ) -> Allocation:
        """Look a request's blocks up, pin the hits and store the missing blocks.

        Pinned blocks are never evicted: if even evicting every free block
        leaves too little room, only the leading missing blocks that fit are
        stored.

        Runtime complexity: O(blocks of the request + blocks evicted).

        :param hashes: the request's full-block hashes (u64), in prefix order.
        :param tokens: the request's prompt tokens (at least
            ``len(hashes) * block_size``).
        :param extra_keys: the per-block extra keys as events carry them
            (``None`` entries for blocks without any); default all ``None``.
        :param lora_id: the request's LoRA adapter id, for its ``BlockStored``.
        :param lora_name: the request's LoRA adapter name, for its ``BlockStored``.
        :returns: the allocation; hand it back to :meth:`release` when the
            request ends.
        """
        bs = self.block_size
        pool = self._pool
        hit = pool.match(hashes)
        pool.acquire(hashes[:hit])
        missing = hashes[hit:]
        stored = list(missing[: min(len(missing), pool.free() + len(pool.lru))])
        evicted: list[int] = []
        pool.removed = evicted
        pool.allocate(len(stored))  # fits: sized by what is free or evictable
        for h in stored:
            pool.name(h)

        events: list[VllmEvent] = [
            VllmBlockRemoved(block_hashes=[h], medium=_MEDIUM, group_idx=0) for h in evicted
        ]
        if stored:
            keys = list(extra_keys) if extra_keys is not None else [None] * len(hashes)
            events.append(
                VllmBlockStored(
                    block_hashes=list(stored),
                    parent_block_hash=hashes[hit - 1] if hit else None,
                    token_ids=list(tokens[hit * bs : (hit + len(stored)) * bs]),
                    block_size=bs,
                    lora_id=lora_id,
                    medium=_MEDIUM,
                    lora_name=lora_name,
                    extra_keys=keys[hit : hit + len(stored)],
                    group_idx=0,
                )
            )
        held = list(hashes[: hit + len(stored)])
        return Allocation(hit, tuple(stored), tuple(evicted), events, held, self._epoch)

    def release(self, allocation: Allocation) -> None:
        """Unpin a finished request's blocks; each is freed deepest first.

        Idempotent. An allocation made before a :meth:`clear` is ignored.
        """
        held, allocation._held = allocation._held, []
        if allocation._epoch == self._epoch:
            self._pool.release(held)

    def clear(self) -> list[VllmEvent]:
        """Drop every block (``reset_prefix_cache``); returns ``[AllBlocksCleared]``."""
        self._pool.clear()
        self._epoch += 1
        return [VllmAllBlocksCleared()]

    def _check(self) -> None:
        """Verify the invariants (O(n)); raises ``AssertionError`` on a broken one."""
        self._pool._check()
        assert len(self._pool) <= self.num_blocks and self._pool.unnamed == 0

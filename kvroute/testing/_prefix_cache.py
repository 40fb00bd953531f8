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
generated tokens are never cached.

Not thread-safe: the owner serialises calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._wire import VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored, VllmEvent

__all__ = ["Allocation", "PrefixCache"]

_MEDIUM = "GPU"


@dataclass(eq=False, slots=True)
class _Block:
    hash: int
    ref_cnt: int = 0


@dataclass(slots=True)
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
    _held: list[_Block] = field(default_factory=list, repr=False)


class PrefixCache:
    """Full KV blocks by vLLM block hash: hits, stores, LRU eviction, events.

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
        self._blocks: dict[int, _Block] = {}
        # Free (unpinned) cached blocks, least recently used first.
        self._free: OrderedDict[int, _Block] = OrderedDict()

    def __len__(self) -> int:
        """Number of cached blocks (pinned or free)."""
        return len(self._blocks)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    def hashes(self) -> set[int]:
        """The hashes of every cached block."""
        return set(self._blocks)

    def lru_order(self) -> list[int]:
        """Evictable blocks, next victim first."""
        return list(self._free)

    def pinned(self) -> int:
        """Number of blocks held by running requests."""
        return len(self._blocks) - len(self._free)

    def match(self, hashes: Sequence[int]) -> int:
        """Number of leading ``hashes`` cached, without touching anything.

        Runtime complexity: O(hit blocks).
        """
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

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
        hit = self.match(hashes)
        held: list[_Block] = []
        for h in hashes[:hit]:
            block = self._blocks[h]
            block.ref_cnt += 1
            self._free.pop(h, None)
            held.append(block)

        missing = list(hashes[hit:])
        evicted: list[int] = []
        room = self.num_blocks - len(self._blocks)
        while room < len(missing) and self._free:
            victim, _ = self._free.popitem(last=False)
            del self._blocks[victim]
            evicted.append(victim)
            room += 1
        stored = missing[: max(room, 0)]
        for h in stored:
            block = _Block(h, ref_cnt=1)
            self._blocks[h] = block
            held.append(block)

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
        return Allocation(hit, tuple(stored), tuple(evicted), events, held)

    def release(self, allocation: Allocation) -> None:
        """Unpin a finished request's blocks; each is freed deepest first.

        Idempotent. Blocks dropped by :meth:`clear` meanwhile are ignored.
        """
        held, allocation._held = allocation._held, []
        for block in reversed(held):
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and self._blocks.get(block.hash) is block:
                self._free[block.hash] = block

    def clear(self) -> list[VllmEvent]:
        """Drop every block (``reset_prefix_cache``); returns ``[AllBlocksCleared]``."""
        self._blocks.clear()
        self._free.clear()
        return [VllmAllBlocksCleared()]

    def _check(self) -> None:
        """Verify the invariants (O(n)); raises ``AssertionError`` on a broken one."""
        assert len(self._blocks) <= self.num_blocks
        for h, block in self._free.items():
            assert self._blocks.get(h) is block and block.ref_cnt == 0
        for h, block in self._blocks.items():
            assert block.hash == h and block.ref_cnt >= 0
            assert (block.ref_cnt == 0) == (h in self._free)

"""Engine-neutral KV-cache events: what every wire format decodes into.

The decoders (:mod:`kvroute.events.decode`) turn vLLM, SGLang and Dynamo
payloads into these; the applier (:mod:`kvroute.events.apply`) turns these
into :class:`~kvroute.Router` index updates. Nothing here knows a wire format.

Engine block hashes are normalised to unsigned 64-bit ints on decode: a
signed int64 (SGLang) is taken modulo 2**64, and a raw digest (vLLM with
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``) becomes its last 8 bytes read
big-endian, the value vLLM itself would have published. They are only ever
used as removal handles and parent links, never as routing keys.

The classes are plain slotted dataclasses, not frozen ones: a frozen
dataclass costs ~4x more to build, and an eviction storm builds one
``BlockRemoved`` per block. Treat them as read-only: they hash by value
(every field is a tuple, str, int or None), so they can key a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeAlias

#: kvroute's storage tiers, as the index names them.
Tier = Literal["device", "host", "disk"]


@dataclass(slots=True, unsafe_hash=True)
class BlockStored:
    """Full blocks an engine has just cached, contiguous and in prefix order.

    :ivar block_hashes: the engine's hash of each block (u64).
    :ivar parent_block_hash: the engine's hash of the block before the first
        one, or ``None`` when the first block starts the prompt.
    :ivar token_ids: the blocks' tokens (``len(block_hashes) * block_size``,
        SGLang may add a trailing partial page); empty when the format carries
        none (Dynamo's JSON events).
    :ivar tokens_hashes: Dynamo's per-block content hash
        (``compute_block_hash_for_seq``) when the format carries it instead of
        tokens, else ``None``.
    :ivar block_size: tokens per block as the engine reports it, or ``None``.
    :ivar tier: where the blocks live (``medium`` mapped: GPU -> device,
        CPU / CPU_PINNED -> host, DISK / EXTERNAL -> disk; absent -> device).
    :ivar medium: the engine's medium string as sent.
    :ivar lora_name: the LoRA adapter's name, or ``None``.
    :ivar lora_id: the engine's LoRA id, or ``None``.
    :ivar cache_salt: the request's cache salt, when the event carries it.
    :ivar extra_keys: per-block extra keys as sent (vLLM), or ``None``.
    :ivar group_idx: the KV-cache group (vLLM hybrid models), or ``None``.
    :ivar session_id: the engine's session id, when sent.
    """

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...] = ()
    tokens_hashes: tuple[int, ...] | None = None
    block_size: int | None = None
    tier: Tier = "device"
    medium: str | None = None
    lora_name: str | None = None
    lora_id: int | None = None
    cache_salt: str | None = None
    extra_keys: tuple[object, ...] | None = None
    group_idx: int | None = None
    session_id: str | None = None


@dataclass(slots=True, unsafe_hash=True)
class BlockRemoved:
    """Blocks an engine has evicted from ``tier``, by the engine's hash (u64)."""

    block_hashes: tuple[int, ...]
    tier: Tier = "device"
    medium: str | None = None
    group_idx: int | None = None


@dataclass(slots=True, unsafe_hash=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache (``reset_prefix_cache``)."""


KVEvent: TypeAlias = "BlockStored | BlockRemoved | AllBlocksCleared"


@dataclass(slots=True, unsafe_hash=True)
class EventBatch:
    """One published message: events in the order the engine emitted them.

    :ivar ts: the engine's timestamp (seconds), or ``None``.
    :ivar events: the decoded events.
    :ivar dp_rank: the data-parallel rank that published it, or ``None``.
    :ivar event_id: the publisher's event id (Dynamo's ``event_id``, one
        event per message), or ``None`` when the format has none (vLLM and
        SGLang number their ZMQ frames instead).
    """

    ts: float | None
    events: tuple[KVEvent, ...] = field(default_factory=tuple)
    dp_rank: int | None = None
    event_id: int | None = None

"""TensorRT-LLM's KV-cache events, in both shapes it publishes them, as kvroute events.

TensorRT-LLM publishes the same cache changes in two shapes:

**The dict shape** (``LLM.get_kv_cache_events()`` / ``get_kv_cache_events_async()``
in the LLM API; one element of the JSON list ``trtllm-serve`` answers
``POST /kv_cache_events`` with): one event per dict,
``{"event_id", "data", "window_size"?, "attention_dp_rank"?, "hash_algo"?,
"layer_group_id"?}``. ``event_id`` counts per attention-DP rank;
``data["type"]`` is

- ``"created"``: ``num_blocks_per_cache_level`` (device blocks, then host...);
- ``"stored"``: ``parent_hash`` (the engine hash of the block before the first,
  null at a prompt's start) and ``blocks``, each ``{"block_hash", "tokens":
  [{"token_id", "token_extra_id"}], "cache_level", "priority", "mm_keys",
  "cache_salt"}``; the last block may be *partial* (fewer tokens than a block);
- ``"removed"``: ``block_hashes``;
- ``"updated"``: ``block_hash`` and ``cache_level`` / ``priority`` as
  ``{"old_value", "new_value"}`` diffs (either may be null): a device-to-host
  offload is a ``cache_level`` 0 -> 1 update.

:func:`decode_trtllm_event` turns one into a :class:`TrtllmBatch` (an
:class:`~kvroute.events.types.EventBatch` that keeps ``window_size``,
``hash_algo`` and ``layer_group_id``). What the events *mean* for a router
(windows, attention-DP ranks, partial blocks, tiers, ``event_id`` gaps) is
:class:`kvroute.events.trtllm_apply.TrtllmApplier`'s job.

**The streaming shape** (``KVEventsConfig``, one ZMQ PUB socket per attention-DP
rank): vLLM's framing ``[topic, seq, payload]``, the payload a msgpack
``[ts, [event, ...], data_parallel_rank]`` whose events are msgpack *maps*
tagged by ``"type"``: ``BlockStored`` (``block_hashes``, ``parent_block_hash``,
``token_ids``, ``block_size``, ``lora_id``, ``medium``, ``lora_name``, and,
when set, ``mm_keys``: per block, a list of ``{"type": "mm_key", "hash",
"start_offset", "uuid"?}``), ``BlockRemoved`` and ``AllBlocksCleared``. Only
full blocks of the full-attention window are streamed; hashes are ints
(signed int64 from the native publisher: taken modulo 2**64).

:func:`decode_trtllm` is the decoder registered as ``"trtllm"``: a msgpack
batch (bytes starting with a msgpack array) decodes as the streaming shape,
anything else (a dict, or its JSON text) as one dict-shape event.

What the decoders normalise:

- **Hashes** become u64 handles, whatever ``hash_algo`` says: an int is taken
  modulo 2**64 (``v1_block_key`` and ``v2_sha256_64`` are u64; the native
  streaming publisher sends int64); a hex string (``v2_sha256``: the 64-hex
  SHA-256 block key) becomes its first 8 bytes read big-endian, the value
  TensorRT-LLM itself publishes with ``v2_sha256_64``, so a fleet mixing the
  two names a block alike. A handle only resolves removals and parent links:
  the index keys on kvroute's own hash of the tokens.
- **Tokens** must be u32 ints. A multimodal item's first token may be its
  64-hex digest (TensorRT-LLM's V2 cache manager), and a non-zero
  ``token_extra_id`` marks a token that is not plain text; those blocks, and
  blocks listing ``mm_keys``, are *opaque*: kvroute cannot recompute a request's
  key for them from its text tokens. Each opaque block becomes its own
  ``BlockStored`` whose ``cache_salt`` is a namespace derived from the request's
  salt and the block's media identity (:func:`opaque_namespace`; the digest
  token itself hashes as 0), so it, and every block chained after it, is
  indexed but never matches a text request's key, and two events naming the
  same media agree. A ``lora_id`` without a ``lora_name`` (the streaming
  shape) makes the whole event opaque the same way: the router hashes adapter
  requests by name, not by the engine's integer id.
- **Cache levels** become tiers: 0 -> ``"device"``, 1 -> ``"host"``, 2 and above
  -> ``"disk"`` (TensorRT-LLM's tiers GPU, host memory, disk, in that order).
  Consecutive blocks of one tier, salt and namespace share one ``BlockStored``.
- ``cache_salt`` is read per block (TensorRT-LLM 1.3), else from ``data``.

Every malformed input raises :class:`~kvroute.events.decode.DecodeError`; a
payload of the wrong Python type raises ``TypeError``. Unknown keys are
ignored. Size limits as for every decoder: ``max_tokens`` token ids and,
separately, block hashes per batch; a dict event is one event.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, TypeAlias, cast

import msgspec
from msgspec import Meta, Struct

from .decode import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_TOKENS,
    Buffer,
    DecodeError,
    _tier,
    register_decoder,
)
from .types import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEvent, Tier

__all__ = [
    "CACHE_LEVEL_TIERS",
    "HASH_ALGOS",
    "BlockUpdated",
    "CacheCreated",
    "TrtllmBatch",
    "cache_level_tier",
    "decode_trtllm",
    "decode_trtllm_event",
    "hash_handle",
    "opaque_namespace",
]

#: The ``hash_algo`` values TensorRT-LLM names (others are kept as sent).
HASH_ALGOS: Final = ("v1_block_key", "v2_sha256", "v2_sha256_64")

#: kvroute's tier for cache levels 0, 1 and 2 (and every level above 2).
CACHE_LEVEL_TIERS: Final[tuple[Tier, Tier, Tier]] = ("device", "host", "disk")

_U64: Final = (1 << 64) - 1
_U32: Final = (1 << 32) - 1
_MSGPACK_ARRAY_HEADS: Final = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}


@dataclass(slots=True, unsafe_hash=True)
class BlockUpdated:
    """A block changed cache level (tier) or priority, named by its engine hash.

    :ivar block_hash: the engine's hash of the block (u64 handle).
    :ivar cache_level: ``(old, new)`` cache levels, or ``None`` when unchanged.
    :ivar priority: ``(old, new)`` eviction priorities, or ``None`` when unchanged.
    """

    block_hash: int
    cache_level: tuple[int, int] | None = None
    priority: tuple[int, int] | None = None

    @property
    def tiers(self) -> tuple[Tier, Tier] | None:
        """``(old, new)`` tiers of a cache-level change, or ``None``."""
        if self.cache_level is None:
            return None
        old, new = self.cache_level
        return cache_level_tier(old), cache_level_tier(new)


@dataclass(slots=True, unsafe_hash=True)
class CacheCreated:
    """The engine allocated its KV cache: how many blocks at each cache level.

    :ivar num_blocks_per_cache_level: device blocks first, then host, then disk.
    """

    num_blocks_per_cache_level: tuple[int, ...]


@dataclass(slots=True, unsafe_hash=True)
class TrtllmBatch(EventBatch):
    """One dict-shape event: the :class:`EventBatch` fields, and what else it names.

    ``dp_rank`` is the event's ``attention_dp_rank`` (``None`` when absent),
    ``event_id`` its ``event_id`` and ``ts`` ``None``. Its ``events`` hold one
    :class:`CacheCreated`, :class:`BlockUpdated` or ``BlockRemoved``, or the
    ``BlockStored`` runs of one stored event (see the module docstring).

    :ivar window_size: the attention window the event belongs to, or ``None``.
    :ivar hash_algo: the engine's ``hash_algo``, or ``None`` when absent.
    :ivar layer_group_id: the V2 cache manager's layer group, or ``None``.
    """

    window_size: int | None = None
    hash_algo: str | None = None
    layer_group_id: int | None = None


def cache_level_tier(level: int) -> Tier:
    """kvroute's tier for a TensorRT-LLM cache level.

    >>> cache_level_tier(0), cache_level_tier(1), cache_level_tier(3)
    ('device', 'host', 'disk')

    :raises ValueError: a negative level.
    """
    if level < 0:
        raise ValueError(f"a cache level must be >= 0, not {level}")
    return CACHE_LEVEL_TIERS[min(level, 2)]


def hash_handle(value: int | str) -> int:
    """The u64 handle kvroute keeps for one engine block hash (see the module docstring).

    >>> hash_handle(-1) == 2**64 - 1
    True
    >>> hash_handle("00000000000000ff" + "ab" * 24)
    255
    >>> hash_handle("abcd")
    43981

    :raises DecodeError: a bool, an int outside [-2**63, 2**64), a string that
        is not an even-length hex string, or any other type.
    """
    if type(value) is int:
        if not -(1 << 63) <= value <= _U64:
            raise DecodeError(f"block hash {value} is outside the 64-bit range")
        return value & _U64
    if isinstance(value, str):
        try:
            digest = bytes.fromhex(value)
        except ValueError:
            raise DecodeError(f"block hash {_show(value)} is not a hex string") from None
        if not digest:
            raise DecodeError("block hash is an empty string")
        return int.from_bytes(digest[:8], "big")
    raise DecodeError(f"block hash must be an int or a hex string, not {_show(value)}")


def opaque_namespace(cache_salt: str | None, identity: Sequence[str]) -> str:
    """The cache namespace of an opaque block: its request's salt and its media identity.

    Deterministic (two events naming the same media in the same salt agree)
    and unlike any salt a request carries, so keys hashed in it never match a
    request's.

    >>> a = opaque_namespace(None, ["mm:00ff:0"])
    >>> a == opaque_namespace(None, ["mm:00ff:0"]), a == opaque_namespace("t", ["mm:00ff:0"])
    (True, False)
    >>> a.startswith("trtllm-opaque:")
    True
    """
    h = hashlib.blake2b(digest_size=16)
    for part in (cache_salt if cache_salt is not None else "\x00", *identity):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return "trtllm-opaque:" + h.hexdigest()


# --- shared: blocks into BlockStored runs ------------------------------------------


@dataclass(slots=True)
class _Block:
    handle: int
    tokens: tuple[int, ...]
    identity: tuple[str, ...]  # non-text content: digests, extra ids, mm keys
    tier: Tier
    salt: str | None


def _runs(
    blocks: Sequence[_Block],
    parent: int | None,
    *,
    block_size: int | None,
    medium: str | None,
    lora_name: str | None,
    lora_id: int | None,
    event_identity: tuple[str, ...],
) -> list[BlockStored]:
    """Consecutive blocks of one tier and namespace as one ``BlockStored`` each."""
    out: list[BlockStored] = []
    start = 0
    keys = [
        (
            b.tier,
            b.salt
            if not (b.identity or event_identity)
            else opaque_namespace(b.salt, (*event_identity, *b.identity)),
            bool(b.identity),
        )
        for b in blocks
    ]
    for i in range(1, len(blocks) + 1):
        # an opaque block is a run of its own: its namespace is its own media
        if i < len(blocks) and keys[i] == keys[start] and not keys[i][2]:
            continue
        run = blocks[start:i]
        tier, salt, _ = keys[start]
        opaque = any(b.identity for b in run) or bool(event_identity)
        out.append(
            BlockStored(
                block_hashes=tuple(b.handle for b in run),
                parent_block_hash=parent if start == 0 else blocks[start - 1].handle,
                token_ids=tuple(itertools.chain.from_iterable(b.tokens for b in run)),
                block_size=block_size,
                tier=tier,
                medium=medium,
                lora_name=lora_name,
                lora_id=lora_id,
                cache_salt=salt,
                extra_keys=tuple((*event_identity, *b.identity) or None for b in run)
                if opaque
                else None,
            )
        )
        start = i
    return out


def _ids(tokens: Sequence[int | str], what: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Token ids as u32s, and the identity of any digest tokens among them (hashed as 0).

    Runtime complexity: O(len(tokens)); all-int lists (the common case) take
    two C-level scans.
    """
    lo: object
    hi: object
    try:
        lo, hi = min(tokens), max(tokens)
    except TypeError:  # digests (str) among ints
        lo = hi = None
    except ValueError:  # empty
        return (), ()
    if type(lo) is int and type(hi) is int:
        if lo < 0 or hi > _U32:
            raise DecodeError(f"{what}: a token id outside u32 ([{lo}, {hi}])")
        return tuple(cast("Sequence[int]", tokens)), ()
    ids: list[int] = []
    identity: list[str] = []
    for j, t in enumerate(tokens):
        if type(t) is int:
            if not 0 <= t <= _U32:
                raise DecodeError(f"{what}: token id {t} is not a u32")
            ids.append(t)
            continue
        try:
            bytes.fromhex(cast(str, t))
        except ValueError:
            raise DecodeError(f"{what}: token id {_show(t)} is not a hex digest") from None
        ids.append(0)
        identity.append(f"digest:{j}:{cast(str, t).lower()}")
    return tuple(ids), tuple(identity)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the dict shape ----------------------------------------------------------------
#
# A msgspec schema, so that JSON (an HTTP answer) and dicts (the LLM API's) are
# parsed and validated in C; unknown keys (the serializer's "type" of blocks,
# tokens and diffs, priority...) are ignored. The event's data is tagged by
# its "type".

_UInt = Annotated[int, Meta(ge=0)]  # msgspec ints are < 2**64 already
_UInt32 = Annotated[int, Meta(ge=0, le=_U32)]
_EngineHash: TypeAlias = int | str


class _DToken(Struct, gc=False):
    token_id: int | str
    token_extra_id: _UInt | None = 0


class _DMmKey(Struct, gc=False):
    hash: str
    start_offset: int = 0
    uuid: str | None = None


class _DBlock(Struct, gc=False):
    block_hash: _EngineHash
    tokens: list[_DToken]
    cache_level: _UInt32 | None = 0
    mm_keys: list[_DMmKey] | None = None
    cache_salt: str | None = None


class _DStored(Struct, tag="stored", tag_field="type", gc=False):
    blocks: list[_DBlock]
    parent_hash: _EngineHash | None = None
    cache_salt: str | None = None
    lora_name: str | None = None
    lora_id: int | None = None


class _DRemoved(Struct, tag="removed", tag_field="type", gc=False):
    block_hashes: list[_EngineHash]


class _DDiff(Struct, gc=False):
    old_value: int
    new_value: int


class _DUpdated(Struct, tag="updated", tag_field="type", gc=False):
    block_hash: _EngineHash
    cache_level: _DDiff | None = None
    priority: _DDiff | None = None


class _DCreated(Struct, tag="created", tag_field="type", gc=False):
    num_blocks_per_cache_level: Annotated[list[_UInt], Meta(max_length=64)]


class _DCleared(Struct, tag="all_cleared", tag_field="type", gc=False):
    pass  # the OpenEngine fan-out's clear after an event-id gap


class _DEvent(Struct, gc=False):
    event_id: _UInt
    data: _DStored | _DRemoved | _DUpdated | _DCreated | _DCleared
    window_size: _UInt32 | None = None
    attention_dp_rank: _UInt32 | None = None
    layer_group_id: _UInt32 | None = None
    hash_algo: str | None = None


_DICT_JSON: Final = msgspec.json.Decoder(_DEvent)


def _mm_identity(keys: list[_DMmKey] | list[_MmKey]) -> tuple[str, ...]:
    return tuple(f"mm:{k.hash.lower()}:{k.start_offset}:{k.uuid or ''}" for k in keys)


def _dict_blocks(data: _DStored, max_tokens: int) -> list[_Block]:
    blocks: list[_Block] = []
    budget = max_tokens
    for i, b in enumerate(data.blocks):
        what = f"data.blocks[{i}]"
        budget -= len(b.tokens)
        if budget < 0:
            raise DecodeError(f"{what}: more than max_tokens={max_tokens} token ids")
        if not b.tokens:
            raise DecodeError(f"{what}: a stored block without tokens")
        ids, identity = _ids([t.token_id for t in b.tokens], f"{what}.tokens")
        extras = [t.token_extra_id for t in b.tokens]
        if any(extras):
            identity += tuple(f"extra:{j}:{x}" for j, x in enumerate(extras) if x)
        if b.mm_keys:
            identity += _mm_identity(b.mm_keys)
        tier = cache_level_tier(b.cache_level or 0)
        salt = b.cache_salt if b.cache_salt is not None else data.cache_salt
        blocks.append(_Block(hash_handle(b.block_hash), ids, identity, tier, salt))
    return blocks


def _dict_text(data: _DStored, max_tokens: int) -> BlockStored | None:
    """A stored event of text blocks of one tier and salt as one ``BlockStored``, or None.

    The common case, checked in a few passes over the event's tokens rather
    than block by block; None sends anything else to the general path (which
    also words the errors).
    """
    blocks = data.blocks
    first = blocks[0]
    if (
        data.lora_id
        or any(b.mm_keys for b in blocks)
        or any(b.cache_level != first.cache_level for b in blocks)
        or any(b.cache_salt != first.cache_salt for b in blocks)
    ):
        return None
    sizes = [len(b.tokens) for b in blocks]
    size = sizes[0]
    if not size or any(n != size for n in sizes[:-1]) or sizes[-1] > size or not sizes[-1]:
        return None
    if sum(sizes) > max_tokens:
        return None
    tokens = [t for b in blocks for t in b.tokens]
    if any([t.token_extra_id for t in tokens]):
        return None
    ids = [t.token_id for t in tokens]
    try:
        lo, hi = min(ids), max(ids)
    except TypeError:
        return None
    if type(lo) is not int or type(hi) is not int or lo < 0 or hi > _U32:
        return None
    salt = first.cache_salt if first.cache_salt is not None else data.cache_salt
    return BlockStored(
        block_hashes=_handles([b.block_hash for b in blocks]),
        parent_block_hash=None if data.parent_hash is None else hash_handle(data.parent_hash),
        token_ids=tuple(cast("list[int]", ids)),
        block_size=size if len(blocks) > 1 else None,
        tier=cache_level_tier(first.cache_level or 0),
        lora_name=data.lora_name,
        lora_id=data.lora_id,
        cache_salt=salt,
    )


def _dict_stored(data: _DStored, max_tokens: int) -> list[BlockStored]:
    if len(data.blocks) > max_tokens:
        raise DecodeError(f"data.blocks: more than max_tokens={max_tokens} blocks")
    if not data.blocks:
        return []
    text = _dict_text(data, max_tokens)
    if text is not None:
        return [text]
    blocks = _dict_blocks(data, max_tokens)
    if not blocks:
        return []
    sizes = {len(b.tokens) for b in blocks[:-1]}
    if len(sizes) > 1 or (sizes and len(blocks[-1].tokens) > next(iter(sizes))):
        raise DecodeError(
            "data.blocks: blocks of different sizes (only the last may be partial): "
            f"{[len(b.tokens) for b in blocks]}"
        )
    lora = data.lora_id
    return _runs(
        blocks,
        None if data.parent_hash is None else hash_handle(data.parent_hash),
        block_size=next(iter(sizes)) if sizes else None,
        medium=None,
        lora_name=data.lora_name,
        lora_id=lora,
        event_identity=(f"lora_id:{lora}",) if lora and data.lora_name is None else (),
    )


def _dict_events(
    data: _DStored | _DRemoved | _DUpdated | _DCreated | _DCleared, max_tokens: int
) -> list[KVEvent | BlockUpdated | CacheCreated]:
    if isinstance(data, _DStored):
        return list(_dict_stored(data, max_tokens))
    if isinstance(data, _DRemoved):
        if len(data.block_hashes) > max_tokens:
            raise DecodeError(f"data.block_hashes: more than max_tokens={max_tokens} hashes")
        return [BlockRemoved(tuple(hash_handle(h) for h in data.block_hashes))]
    if isinstance(data, _DUpdated):
        level = data.cache_level
        if level is not None and min(level.old_value, level.new_value) < 0:
            raise DecodeError("data.cache_level: a negative cache level")
        prio = data.priority
        return [
            BlockUpdated(
                hash_handle(data.block_hash),
                None if level is None else (level.old_value, level.new_value),
                None if prio is None else (prio.old_value, prio.new_value),
            )
        ]
    if isinstance(data, _DCreated):
        return [CacheCreated(tuple(data.num_blocks_per_cache_level))]
    return [AllBlocksCleared()]


def decode_trtllm_event(
    event: Mapping[str, Any] | Buffer | str,
    *,
    max_events: int = DEFAULT_MAX_EVENTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> TrtllmBatch:
    """Decode one dict-shape event (the LLM API's dict, or its JSON text).

    Runtime complexity: O(size of the event).

    >>> batch = decode_trtllm_event({"event_id": 7, "window_size": 32, "attention_dp_rank": 1,
    ...     "hash_algo": "v2_sha256", "data": {"type": "stored", "parent_hash": None,
    ...     "blocks": [{"type": "stored_block", "block_hash": "00" * 31 + "2a",
    ...                 "tokens": [{"token_id": t, "token_extra_id": 0} for t in (1, 2)],
    ...                 "cache_level": 1, "priority": 35, "mm_keys": [],
    ...                 "cache_salt": "tenant-a"}]}})
    >>> batch.event_id, batch.dp_rank, batch.window_size, batch.hash_algo
    (7, 1, 32, 'v2_sha256')
    >>> (stored,) = batch.events
    >>> stored.block_hashes, stored.token_ids, stored.tier, stored.cache_salt
    ((0,), (1, 2), 'host', 'tenant-a')
    >>> decode_trtllm_event('{"event_id": 8, "data": {"type": "updated", "block_hash": 5,'
    ...     ' "cache_level": {"old_value": 0, "new_value": 1}, "priority": null}}').events
    (BlockUpdated(block_hash=5, cache_level=(0, 1), priority=None),)

    :param event: the event dict, or its JSON text (bytes must be UTF-8).
    :param max_events: accepted for a uniform signature (an event is one).
    :param max_tokens: reject an event with more token ids, or more block
        hashes, than this.
    :returns: the event as a one-event batch (a stored event: its runs).
    :raises DecodeError: a malformed event (see the module docstring).
    :raises TypeError: ``event`` is not a mapping, bytes or str.
    """
    try:
        if max_events < 1:
            raise DecodeError(f"batch holds more than max_events={max_events} events")
        if isinstance(event, Mapping):
            ev = msgspec.convert(event if type(event) is dict else dict(event), _DEvent)
        elif isinstance(event, (bytes, bytearray, memoryview, str)):
            ev = _DICT_JSON.decode(event)
        else:
            raise TypeError(f"event must be a mapping, bytes or str, not {type(event).__name__}")
        events = _dict_events(ev.data, max_tokens)
    except (msgspec.DecodeError, RecursionError, DecodeError) as exc:
        # msgspec names the path: "Expected `int`, got `str` - at `$.data.blocks[0]...`"
        raise DecodeError(f"trtllm: {exc}") from exc
    return TrtllmBatch(
        ts=None,
        events=tuple(events),  # type: ignore[arg-type]
        dp_rank=ev.attention_dp_rank,
        event_id=ev.event_id,
        window_size=ev.window_size,
        hash_algo=ev.hash_algo,
        layer_group_id=ev.layer_group_id,
    )


# --- the streaming (ZMQ) shape ------------------------------------------------------
#
# msgspec validates while it parses; unknown keys (extra_keys, group_idx's
# siblings kv_cache_spec_*, locality) are ignored. gc=False: these live for one
# decode call and hold no cycles.

_BlockSize = Annotated[int, Meta(ge=1, le=_U32)]
_CLEARED: Final = AllBlocksCleared()  # field-less: one is enough


class _MmKey(Struct, tag="mm_key", tag_field="type", gc=False):
    hash: str
    start_offset: int
    uuid: str | None = None


class _WireStored(Struct, tag="BlockStored", tag_field="type", gc=False):
    block_hashes: list[_EngineHash]
    parent_block_hash: _EngineHash | None
    token_ids: list[int | str]
    block_size: _BlockSize
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    group_idx: _UInt32 | None = None
    mm_keys: list[list[_MmKey]] | None = None


class _TextStored(Struct, tag="BlockStored", tag_field="type", gc=False):
    # The common case, validated in C: int hashes, u32 tokens, no media.
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[_UInt32]
    block_size: _BlockSize
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    group_idx: _UInt32 | None = None
    mm_keys: None = None


class _WireRemoved(Struct, tag="BlockRemoved", tag_field="type", gc=False):
    block_hashes: list[_EngineHash]
    medium: str | None = None
    group_idx: _UInt32 | None = None


class _WireCleared(Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
    pass


class _WireBatch(Struct, array_like=True, gc=False):
    ts: float
    events: list[_WireStored | _WireRemoved | _WireCleared]
    data_parallel_rank: _UInt32 | None = None


class _TextBatch(Struct, array_like=True, gc=False):
    ts: float
    events: list[_TextStored | _WireRemoved | _WireCleared]
    data_parallel_rank: _UInt32 | None = None


_WIRE: Final = msgspec.msgpack.Decoder(_WireBatch)
_WIRE_TEXT: Final = msgspec.msgpack.Decoder(_TextBatch)


def _handles(hashes: list[int] | list[_EngineHash]) -> tuple[int, ...]:
    """Engine hashes as u64 handles; all-int lists take a C-level scan or one comprehension."""
    try:
        lo, hi = min(hashes), max(hashes)
    except (TypeError, ValueError):
        return tuple(hash_handle(h) for h in hashes)
    if type(lo) is int and type(hi) is int and lo >= -(1 << 63) and hi <= _U64:
        ints = cast("list[int]", hashes)
        return tuple(ints) if lo >= 0 else tuple([h & _U64 for h in ints])
    return tuple(hash_handle(h) for h in hashes)


def _wire_stored(ev: _WireStored | _TextStored) -> list[BlockStored]:
    n, bs = len(ev.block_hashes), ev.block_size
    if len(ev.token_ids) != n * bs:
        raise DecodeError(f"{len(ev.token_ids)} token ids for {n} blocks of {bs}")
    lora = ev.lora_id
    event_identity = (f"lora_id:{lora}",) if lora and ev.lora_name is None else ()
    parent = None if ev.parent_block_hash is None else hash_handle(ev.parent_block_hash)
    tier = _tier(ev.medium)
    if isinstance(ev, _TextStored) and not event_identity:
        # Plain text: one event as sent, tokens already checked u32.
        stored = BlockStored(
            block_hashes=_handles(ev.block_hashes),
            parent_block_hash=parent,
            token_ids=tuple(ev.token_ids),
            block_size=bs,
            tier=tier,
            medium=ev.medium,
            lora_name=ev.lora_name,
            lora_id=lora,
            group_idx=ev.group_idx,
        )
        return [stored]
    mm = ev.mm_keys
    if mm is not None and len(mm) != n:
        raise DecodeError(f"{len(mm)} mm_keys lists for {n} blocks")
    handles = _handles(ev.block_hashes)
    blocks: list[_Block] = []
    for i in range(n):
        ids, identity = _ids(ev.token_ids[i * bs : (i + 1) * bs], f"block {i}")
        if mm is not None and mm[i]:
            identity += _mm_identity(mm[i])
        blocks.append(_Block(handles[i], ids, identity, tier, None))
    runs = _runs(
        blocks,
        parent,
        block_size=bs,
        medium=ev.medium,
        lora_name=ev.lora_name,
        lora_id=lora,
        event_identity=event_identity,
    )
    for run in runs:
        run.group_idx = ev.group_idx
    return runs


def _decode_wire(payload: Buffer, max_events: int, max_tokens: int) -> EventBatch:
    batch: _WireBatch | _TextBatch
    try:
        batch = _WIRE_TEXT.decode(payload)
    except msgspec.ValidationError:
        try:  # digests, hex hashes or media: the general schema, and its precise errors
            batch = _WIRE.decode(payload)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise DecodeError(f"trtllm: not an event batch [ts, events, rank]: {exc}") from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"trtllm: not an event batch [ts, events, rank]: {exc}") from exc
    if len(batch.events) > max_events:
        raise DecodeError(f"trtllm: batch holds more than max_events={max_events} events")
    n_tokens = n_hashes = 0
    events: list[KVEvent] = []
    for i, ev in enumerate(batch.events):
        try:
            if isinstance(ev, _WireRemoved):
                n_hashes += len(ev.block_hashes)
                if n_hashes > max_tokens:
                    raise DecodeError(f"batch holds more than max_tokens={max_tokens} hashes")
                events.append(
                    BlockRemoved(
                        _handles(ev.block_hashes),
                        tier=_tier(ev.medium),
                        medium=ev.medium,
                        group_idx=ev.group_idx,
                    )
                )
            elif isinstance(ev, (_WireStored, _TextStored)):
                n_hashes += len(ev.block_hashes)
                n_tokens += len(ev.token_ids)
                if n_hashes > max_tokens or n_tokens > max_tokens:
                    raise DecodeError(
                        f"batch holds more than max_tokens={max_tokens} token ids or hashes"
                    )
                events.extend(_wire_stored(ev))
            else:
                events.append(_CLEARED)
        except DecodeError as exc:
            raise DecodeError(f"trtllm: event {i}: {exc}") from exc
    return EventBatch(ts=batch.ts, events=tuple(events), dp_rank=batch.data_parallel_rank)


def decode_trtllm(
    payload: Buffer | str | Mapping[str, Any],
    *,
    max_events: int = DEFAULT_MAX_EVENTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> EventBatch:
    """Decode a TensorRT-LLM payload: a streamed msgpack batch, or one dict-shape event.

    Registered as the ``"trtllm"`` format (``decode(payload, "trtllm")``, and
    ``ZmqSubscriber(router, fmt="trtllm")`` for the streaming shape).

    Runtime complexity: O(size of the payload).

    >>> import msgspec
    >>> payload = msgspec.msgpack.encode([1.5, [
    ...     {"type": "BlockStored", "block_hashes": [-2, 3], "parent_block_hash": None,
    ...      "token_ids": list(range(8)), "block_size": 4, "lora_id": None,
    ...      "medium": "GPU", "lora_name": None},
    ...     {"type": "BlockRemoved", "block_hashes": [3], "medium": "GPU"}], 0])
    >>> stored, removed = decode_trtllm(payload).events
    >>> stored.block_hashes == (2**64 - 2, 3), stored.block_size, removed.block_hashes
    (True, 4, (3,))
    >>> decode_trtllm({"event_id": 0, "window_size": 16,
    ...     "data": {"type": "created", "num_blocks_per_cache_level": [8, 2]}}).events
    (CacheCreated(num_blocks_per_cache_level=(8, 2)),)

    :param payload: msgpack bytes (the ZMQ payload frame); or a dict event, or
        its JSON text.
    :param max_events: reject a batch with more events than this.
    :param max_tokens: reject a batch with more token ids, or more block
        hashes, than this.
    :returns: an :class:`EventBatch` (a :class:`TrtllmBatch` for a dict event).
    :raises DecodeError: a malformed payload (see the module docstring).
    :raises TypeError: ``payload`` is not bytes-like, str or a mapping.
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        view = memoryview(payload)
        if len(view) and view[0] in _MSGPACK_ARRAY_HEADS:
            return _decode_wire(payload, max_events, max_tokens)
    return decode_trtllm_event(payload, max_events=max_events, max_tokens=max_tokens)


register_decoder("trtllm", decode_trtllm)

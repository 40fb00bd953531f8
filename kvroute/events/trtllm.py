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
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final

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
                token_ids=tuple(t for b in run for t in b.tokens),
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


def _token(value: object, what: str) -> tuple[int, str | None]:
    """A token id as (u32 id, digest or None): a hex digest token hashes as 0."""
    if type(value) is int:
        if not 0 <= value <= _U32:
            raise DecodeError(f"{what}: token id {value} is not a u32")
        return value, None
    if isinstance(value, str):
        try:
            bytes.fromhex(value)
        except ValueError:
            raise DecodeError(f"{what}: token id {_show(value)} is not a hex digest") from None
        return 0, value.lower()
    raise DecodeError(f"{what}: token id must be an int or a hex digest, not {_show(value)}")


# --- the dict shape ----------------------------------------------------------------


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DecodeError(f"{what}: expected an object, got {_show(value)}")
    return value


def _uint(value: object, limit: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise DecodeError(f"{what}: expected an int in [0, {limit}], got {_show(value)}")
    return value


def _opt_uint(obj: Mapping[str, Any], key: str, limit: int, what: str) -> int | None:
    value = obj.get(key)
    return None if value is None else _uint(value, limit, f"{what}.{key}")


def _opt_str(obj: Mapping[str, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DecodeError(f"{what}.{key}: expected a string or null, got {_show(value)}")
    return value


def _list(value: object, what: str, limit: int) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise DecodeError(f"{what}: expected a list, got {_show(value)}")
    if len(value) > limit:
        raise DecodeError(f"{what}: more than max_tokens={limit} entries")
    return value


def _required(obj: Mapping[str, Any], key: str, what: str) -> Any:
    try:
        return obj[key]
    except KeyError:
        raise DecodeError(f"{what}: missing field {key!r}") from None


def _diff(obj: Mapping[str, Any], key: str, what: str) -> tuple[int, int] | None:
    value = obj.get(key)
    if value is None:
        return None
    d = _mapping(value, f"{what}.{key}")
    old = _required(d, "old_value", f"{what}.{key}")
    new = _required(d, "new_value", f"{what}.{key}")
    if type(old) is not int or type(new) is not int:
        raise DecodeError(f"{what}.{key}: old_value and new_value must be ints")
    return old, new


def _mm_identity(keys: object, what: str) -> tuple[str, ...]:
    out: list[str] = []
    for j, key in enumerate(_list(keys, what, _U32)):
        k = _mapping(key, f"{what}[{j}]")
        digest = _required(k, "hash", f"{what}[{j}]")
        if not isinstance(digest, str):
            raise DecodeError(f"{what}[{j}].hash: expected a hex string, got {_show(digest)}")
        offset = k.get("start_offset", 0)
        if type(offset) is not int:
            raise DecodeError(f"{what}[{j}].start_offset: expected an int")
        uuid = k.get("uuid")
        out.append(f"mm:{digest.lower()}:{offset}:{uuid if isinstance(uuid, str) else ''}")
    return tuple(out)


def _dict_block(block: object, what: str, data_salt: str | None, budget: list[int]) -> _Block:
    b = _mapping(block, what)
    handle = hash_handle(_required(b, "block_hash", what))
    tokens_in = _list(_required(b, "tokens", what), f"{what}.tokens", budget[0])
    budget[0] -= len(tokens_in)
    if not tokens_in:
        raise DecodeError(f"{what}: a stored block without tokens")
    tokens: list[int] = []
    identity: list[str] = []
    for j, tok in enumerate(tokens_in):
        where = f"{what}.tokens[{j}]"
        t = _mapping(tok, where)
        tid, digest = _token(_required(t, "token_id", where), where)
        extra = t.get("token_extra_id", 0)
        if extra is None:
            extra = 0
        _uint(extra, _U64, f"{where}.token_extra_id")
        if digest is not None:
            identity.append(f"digest:{j}:{digest}")
        if extra:
            identity.append(f"extra:{j}:{extra}")
        tokens.append(tid)
    mm = b.get("mm_keys")
    if mm:
        identity.extend(_mm_identity(mm, f"{what}.mm_keys"))
    level = b.get("cache_level", 0)
    tier = cache_level_tier(_uint(0 if level is None else level, _U32, f"{what}.cache_level"))
    salt = _opt_str(b, "cache_salt", what)
    return _Block(
        handle, tuple(tokens), tuple(identity), tier, salt if salt is not None else data_salt
    )


def _dict_stored(data: Mapping[str, Any], max_tokens: int) -> list[BlockStored]:
    what = "data"
    parent_raw = data.get("parent_hash")
    parent = None if parent_raw is None else hash_handle(parent_raw)
    blocks_in = _list(_required(data, "blocks", what), "data.blocks", max_tokens)
    salt = _opt_str(data, "cache_salt", what)
    budget = [max_tokens]  # token ids left for this event
    blocks = [_dict_block(b, f"data.blocks[{i}]", salt, budget) for i, b in enumerate(blocks_in)]
    if not blocks:
        return []
    sizes = {len(b.tokens) for b in blocks[:-1]}
    if len(sizes) > 1 or (sizes and len(blocks[-1].tokens) > next(iter(sizes))):
        raise DecodeError(
            "data.blocks: blocks of different sizes (only the last may be partial): "
            f"{[len(b.tokens) for b in blocks]}"
        )
    lora_name = _opt_str(data, "lora_name", what)
    lora_id = data.get("lora_id")
    if lora_id is not None and type(lora_id) is not int:
        raise DecodeError(f"data.lora_id: expected an int or null, got {_show(lora_id)}")
    event_identity = (f"lora_id:{lora_id}",) if lora_id and lora_name is None else ()
    return _runs(
        blocks,
        parent,
        block_size=next(iter(sizes)) if sizes else None,
        medium=None,
        lora_name=lora_name,
        lora_id=lora_id,
        event_identity=event_identity,
    )


def _dict_data(
    data: Mapping[str, Any], max_tokens: int
) -> list[KVEvent | BlockUpdated | CacheCreated]:
    kind = _required(data, "type", "data")
    if kind == "stored":
        return list(_dict_stored(data, max_tokens))
    if kind == "removed":
        hashes = _list(_required(data, "block_hashes", "data"), "data.block_hashes", max_tokens)
        return [BlockRemoved(tuple(hash_handle(h) for h in hashes))]
    if kind == "updated":
        return [
            BlockUpdated(
                hash_handle(_required(data, "block_hash", "data")),
                _level_diff(_diff(data, "cache_level", "data")),
                _diff(data, "priority", "data"),
            )
        ]
    if kind == "created":
        levels = _list(
            _required(data, "num_blocks_per_cache_level", "data"),
            "data.num_blocks_per_cache_level",
            64,
        )
        return [
            CacheCreated(tuple(_uint(n, _U64, "data.num_blocks_per_cache_level") for n in levels))
        ]
    if kind == "all_cleared":  # the OpenEngine fan-out's clear after an event-id gap
        return [AllBlocksCleared()]
    raise DecodeError(f"data.type: unknown event type {_show(kind)}")


def _level_diff(diff: tuple[int, int] | None) -> tuple[int, int] | None:
    if diff is not None and min(diff) < 0:
        raise DecodeError(f"data.cache_level: negative cache level in {diff}")
    return diff


def _parse_json(payload: Buffer | str) -> object:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"trtllm: not UTF-8: {exc}") from exc
    else:
        text = payload
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"trtllm: not JSON: {exc}") from exc


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


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
    if isinstance(event, Mapping):
        obj: object = event
    elif isinstance(event, (bytes, bytearray, memoryview, str)):
        obj = _parse_json(event)
    else:
        raise TypeError(f"event must be a mapping, bytes or str, not {type(event).__name__}")
    if isinstance(obj, list):
        raise DecodeError(
            "trtllm: a JSON list holds several events (a /kv_cache_events answer): "
            "decode each element"
        )
    try:
        ev = _mapping(obj, "event")
        if max_events < 1:
            raise DecodeError(f"batch holds more than max_events={max_events} events")
        event_id = _uint(_required(ev, "event_id", "event"), _U64, "event_id")
        window = _opt_uint(ev, "window_size", _U32, "event")
        rank = _opt_uint(ev, "attention_dp_rank", _U32, "event")
        group = _opt_uint(ev, "layer_group_id", _U32, "event")
        algo = _opt_str(ev, "hash_algo", "event")
        events = _dict_data(_mapping(_required(ev, "data", "event"), "data"), max_tokens)
    except DecodeError as exc:
        raise DecodeError(f"trtllm: {exc}") from exc
    except ValueError as exc:  # a negative cache level
        raise DecodeError(f"trtllm: {exc}") from exc
    return TrtllmBatch(
        ts=None,
        events=tuple(events),  # type: ignore[arg-type]
        dp_rank=rank,
        event_id=event_id,
        window_size=window,
        hash_algo=algo,
        layer_group_id=group,
    )


# --- the streaming (ZMQ) shape ------------------------------------------------------
#
# msgspec validates while it parses; unknown keys (extra_keys, group_idx's
# siblings kv_cache_spec_*, locality) are ignored. gc=False: these live for one
# decode call and hold no cycles.

_BlockSize = Annotated[int, Meta(ge=1, le=_U32)]


class _MmKey(Struct, tag="mm_key", tag_field="type", gc=False):
    hash: str
    start_offset: int
    uuid: str | None = None


class _WireStored(Struct, tag="BlockStored", tag_field="type", gc=False):
    block_hashes: list[int | str]
    parent_block_hash: int | str | None
    token_ids: list[int | str]
    block_size: _BlockSize
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    group_idx: Annotated[int, Meta(ge=0, le=_U32)] | None = None
    mm_keys: list[list[_MmKey]] | None = None


class _WireRemoved(Struct, tag="BlockRemoved", tag_field="type", gc=False):
    block_hashes: list[int | str]
    medium: str | None = None
    group_idx: Annotated[int, Meta(ge=0, le=_U32)] | None = None


class _WireCleared(Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
    pass


class _WireBatch(Struct, array_like=True, gc=False):
    ts: float
    events: list[_WireStored | _WireRemoved | _WireCleared]
    data_parallel_rank: Annotated[int, Meta(ge=0, le=_U32)] | None = None


_WIRE: Final = msgspec.msgpack.Decoder(_WireBatch)


def _wire_stored(ev: _WireStored) -> list[BlockStored]:
    n, bs = len(ev.block_hashes), ev.block_size
    if len(ev.token_ids) != n * bs:
        raise DecodeError(f"{len(ev.token_ids)} token ids for {n} blocks of {bs}")
    if ev.mm_keys is not None and len(ev.mm_keys) != n:
        raise DecodeError(f"{len(ev.mm_keys)} mm_keys lists for {n} blocks")
    tier = _tier(ev.medium)
    blocks: list[_Block] = []
    for i, h in enumerate(ev.block_hashes):
        tokens: list[int] = []
        identity: list[str] = []
        for j, tok in enumerate(ev.token_ids[i * bs : (i + 1) * bs]):
            tid, digest = _token(tok, f"block {i}")
            tokens.append(tid)
            if digest is not None:
                identity.append(f"digest:{j}:{digest}")
        if ev.mm_keys is not None:
            identity.extend(
                f"mm:{k.hash.lower()}:{k.start_offset}:{k.uuid or ''}" for k in ev.mm_keys[i]
            )
        blocks.append(_Block(hash_handle(h), tuple(tokens), tuple(identity), tier, None))
    parent = None if ev.parent_block_hash is None else hash_handle(ev.parent_block_hash)
    lora = ev.lora_id
    runs = _runs(
        blocks,
        parent,
        block_size=bs,
        medium=ev.medium,
        lora_name=ev.lora_name,
        lora_id=lora,
        event_identity=(f"lora_id:{lora}",) if lora and ev.lora_name is None else (),
    )
    for run in runs:
        run.group_idx = ev.group_idx
    return runs


def _decode_wire(payload: Buffer, max_events: int, max_tokens: int) -> EventBatch:
    try:
        batch = _WIRE.decode(payload)
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
                        tuple(hash_handle(h) for h in ev.block_hashes),
                        tier=_tier(ev.medium),
                        medium=ev.medium,
                        group_idx=ev.group_idx,
                    )
                )
            elif isinstance(ev, _WireStored):
                n_hashes += len(ev.block_hashes)
                n_tokens += len(ev.token_ids)
                if n_hashes > max_tokens or n_tokens > max_tokens:
                    raise DecodeError(
                        f"batch holds more than max_tokens={max_tokens} token ids or hashes"
                    )
                events.extend(_wire_stored(ev))
            else:
                events.append(AllBlocksCleared())
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

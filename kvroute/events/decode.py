"""Decoders from engine KV-event wire payloads to :mod:`kvroute.events.types`.

Decoders are registered by name, as routing policies are: three come built
in (:data:`FORMATS`), and :func:`register_decoder` adds an engine's format
without touching kvroute (:func:`decode`, :class:`~kvroute.events.ZmqSubscriber`
and the proxy look formats up by name):

``"vllm"`` (:func:`decode_vllm`)
    One ZMQ payload of vLLM's ``ZmqEventPublisher``: a msgpack array
    ``[ts, events, data_parallel_rank]`` (``data_parallel_rank`` may be nil;
    releases before data-parallel events sent ``[ts, events]``). vLLM 0.33
    encodes each event as a map tagged by its ``"type"`` key
    (``{"type": "BlockStored", "block_hashes": [...], ...}``); older releases
    encoded it as a positional array, the tag first and then the fields in
    declaration order::

        ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
         lora_id, medium?, lora_name?, extra_keys?, group_idx?, ...]
        ["BlockRemoved", block_hashes, medium?, group_idx?]
        ["AllBlocksCleared"]

    (each release appended fields and sent all of its own: msgspec's
    ``array_like`` encoding never drops a trailing default). Both encodings
    are accepted, even mixed in one batch; positional fields past the last one
    read here are ignored.

``"sglang"`` (:func:`decode_sglang`)
    SGLang 0.5.23's payload: the same msgpack shape, ``[ts, events,
    attn_dp_rank]``, with the same tagged maps. Its block hashes are signed
    int64; ``medium`` may be ``CPU_PINNED``; stores and removals of chained
    nodes arrive coalesced; ``cache_salt``, ``session_id`` and ``lora_name``
    are explicit fields when set; ``token_ids`` may end with a partial page
    (kept as sent: only full blocks are ever hashed downstream). Older SGLang
    releases sent positional events ``[tag, block_hashes, parent_block_hash,
    token_ids, block_size, lora_id, medium?]`` and ``[tag, block_hashes,
    medium?]``; those are accepted too (later positional fields ignored).

``"dynamo"`` (:func:`decode_dynamo_json`)
    One NVIDIA Dynamo 1.6.1 router event (the JSON ``RadixTree.apply_event``
    takes): ``{"event_id": u64, "data": ..., "dp_rank": u32?}`` where
    ``data`` is ``{"stored": {"parent_hash": u64|null?, "blocks":
    [{"block_hash": u64, "tokens_hash": u64}, ...]}}``, ``{"removed":
    {"block_hashes": [u64, ...]}}``, ``"cleared"`` or ``{"cleared": null}``.
    Stores carry Dynamo's per-block content hash (``tokens_hashes``) instead
    of token ids.

``"trtllm"`` (:func:`kvroute.events.trtllm.decode_trtllm`)
    TensorRT-LLM's events, streamed (this framing, with map events) or in its
    dict shape (the LLM API's, ``trtllm-serve``'s ``/kv_cache_events``);
    defined and registered by :mod:`kvroute.events.trtllm`, which this module
    loads.

What the decoders normalise:

- Block hashes become u64 ints: an unsigned int is kept, a negative (signed
  int64) one is taken modulo 2**64, and a raw digest (vLLM with
  ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``; 16 or 32 bytes) becomes its last
  8 bytes read big-endian, exactly the int vLLM publishes by default. Dynamo
  JSON takes u64 only: a negative hash is an error there, as in Dynamo.
- ``medium`` becomes a tier: ``GPU`` -> ``"device"``, ``CPU`` and
  ``CPU_PINNED`` -> ``"host"``, ``DISK`` and ``EXTERNAL`` -> ``"disk"``,
  absent or nil -> ``"device"``. Any other medium is an error. The string as
  sent is kept in ``medium``.
- Token ids must be u32 (every engine's, and kvroute's hashing, range).
- ``extra_keys`` is kept with its arrays turned into tuples. vLLM publishes no
  ``cache_salt`` field; :func:`decode_vllm` recovers it from the first
  block's untagged extra keys (see :func:`vllm_cache_salt` for the rule and
  its limits).

Every malformed input raises :class:`DecodeError` (a ``ValueError``): bytes
that are not msgpack or JSON, a wrong top-level shape, an unknown event tag or
medium, a field of the wrong type or range, a digest of the wrong size, and a
batch over the size limits. A payload of the wrong Python type (a ``str`` for a
msgpack decoder) raises ``TypeError``. Unknown map keys and unknown JSON fields
are ignored, so that engines can add fields without breaking the router.

Size limits (keyword-only, per batch): ``max_events`` events, and
``max_tokens`` token ids and, separately, ``max_tokens`` block hashes. They are
checked after msgspec has parsed the payload (whose lists are bounded by its
byte length) and before the events are built.
"""

from __future__ import annotations

import importlib
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal, Protocol, TypeAlias, cast

import msgspec
from msgspec import Meta, Raw, Struct

from .types import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, Tier

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "DEFAULT_MAX_TOKENS",
    "FORMATS",
    "Buffer",
    "DecodeError",
    "Decoder",
    "Format",
    "available_formats",
    "decode",
    "decode_dynamo_json",
    "decode_sglang",
    "decode_vllm",
    "get_decoder",
    "register_decoder",
    "vllm_cache_salt",
]

#: The wire formats this module decodes; :mod:`kvroute.events.trtllm` registers
#: ``"trtllm"`` beside them (:func:`available_formats` lists every registered one).
Format: TypeAlias = Literal["vllm", "sglang", "dynamo"]
FORMATS: Final[tuple[Format, ...]] = ("vllm", "sglang", "dynamo")

#: Default size limits per batch (see the module docstring).
DEFAULT_MAX_EVENTS: Final = 1 << 16
DEFAULT_MAX_TOKENS: Final = 1 << 22

#: A msgpack payload: whatever the ZMQ socket handed over.
Buffer: TypeAlias = bytes | bytearray | memoryview

_U64_MAX: Final = (1 << 64) - 1
_TWO_64: Final = 1 << 64
_U32_MAX: Final = (1 << 32) - 1
#: Raw digest sizes vLLM publishes: sha256 / sha256_cbor, xxhash / xxhash_cbor.
_DIGEST_SIZES: Final = frozenset({16, 32})
#: vLLM's untagged extra keys nest at most three deep (block, key, mm pair).
_MAX_EXTRA_KEY_DEPTH: Final = 8
_TIERS: Final[Mapping[str | None, Tier]] = {
    None: "device",
    "GPU": "device",
    "CPU": "host",
    "CPU_PINNED": "host",
    "DISK": "disk",
    "EXTERNAL": "disk",
}
_SCALAR_TYPES: Final = frozenset({str, int, float, bytes, bool, type(None)})


class DecodeError(ValueError):
    """A payload that is not a well-formed event batch of the expected format."""


# --- msgpack schema ---------------------------------------------------------
#
# msgspec validates in C while it parses: u32 token ids, hashes that are msgpack
# ints (msgspec bounds them to [-2**63, 2**64)) or bins, positive block sizes.
# Map events are tagged by their "type" key; positional events by their first
# element. msgspec cannot mix the two in one union, so a batch is first parsed
# as all-maps (vLLM 0.33, SGLang 0.5.23) and, only if that fails, event by
# event (older releases, mixed batches, and precise error messages).
# gc=False: these objects live for one decode call and hold no cycles.

_U32 = Annotated[int, Meta(ge=0, le=_U32_MAX)]
_Hash: TypeAlias = int | bytes
_BlockSize = Annotated[int, Meta(ge=1, le=_U32_MAX)]
_ExtraKeys: TypeAlias = list[tuple[Any, ...] | None] | None


class _MapStored(Struct, tag="BlockStored", tag_field="type", gc=False):
    # Both engines always send the first four keys (parent as nil at a root).
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[_U32]
    block_size: _BlockSize
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: _ExtraKeys = None
    group_idx: _U32 | None = None
    session_id: str | None = None
    cache_salt: str | None = None  # SGLang only


class _MapRemoved(Struct, tag="BlockRemoved", tag_field="type", gc=False):
    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: _U32 | None = None


class _MapCleared(Struct, tag="AllBlocksCleared", tag_field="type", gc=False):
    pass


class _VllmArrayStored(Struct, tag="BlockStored", array_like=True, gc=False):
    # Declaration order of vLLM releases before the switch to maps. Later
    # positional fields (kv_cache_spec_kind, ...) are ignored by msgspec.
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[_U32]
    block_size: _BlockSize
    lora_id: int | None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: _ExtraKeys = None
    group_idx: _U32 | None = None
    session_id: ClassVar[None] = None
    cache_salt: ClassVar[None] = None


class _VllmArrayRemoved(Struct, tag="BlockRemoved", array_like=True, gc=False):
    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: _U32 | None = None


class _SglangArrayStored(Struct, tag="BlockStored", array_like=True, gc=False):
    # SGLang's positional layout shares vLLM's first six fields only; what it
    # appended after ``medium`` is not vLLM's, so it is not read.
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[_U32]
    block_size: _BlockSize
    lora_id: int | None
    medium: str | None = None
    lora_name: ClassVar[None] = None
    extra_keys: ClassVar[None] = None
    group_idx: ClassVar[None] = None
    session_id: ClassVar[None] = None
    cache_salt: ClassVar[None] = None


class _SglangArrayRemoved(Struct, tag="BlockRemoved", array_like=True, gc=False):
    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: ClassVar[None] = None


class _ArrayCleared(Struct, tag="AllBlocksCleared", array_like=True, gc=False):
    pass


_Stored: TypeAlias = _MapStored | _VllmArrayStored | _SglangArrayStored
_Removed: TypeAlias = _MapRemoved | _VllmArrayRemoved | _SglangArrayRemoved
_Event: TypeAlias = _Stored | _Removed | _MapCleared | _ArrayCleared
_STORED: Final = (_MapStored, _VllmArrayStored, _SglangArrayStored)
_REMOVED: Final = (_MapRemoved, _VllmArrayRemoved, _SglangArrayRemoved)
_CLEARED: Final = AllBlocksCleared()  # immutable and field-less: one is enough


class _MapBatch(Struct, array_like=True, gc=False):
    ts: float
    events: list[_MapStored | _MapRemoved | _MapCleared]
    dp_rank: _U32 | None = None  # absent before data-parallel releases


class _RawBatch(Struct, array_like=True, gc=False):
    ts: float
    events: list[Raw]
    dp_rank: _U32 | None = None


_MAP_BATCH: Final = msgspec.msgpack.Decoder(_MapBatch)
_RAW_BATCH: Final = msgspec.msgpack.Decoder(_RawBatch)
_MAP_EVENT: Final[msgspec.msgpack.Decoder[_MapStored | _MapRemoved | _MapCleared]] = (
    msgspec.msgpack.Decoder(_MapStored | _MapRemoved | _MapCleared)
)


@dataclass(frozen=True, slots=True)
class _Dialect:
    """What differs between the engines that share the msgpack format."""

    name: str
    decode_array_event: Callable[[memoryview], _Event]
    #: Recover ``cache_salt`` from ``extra_keys`` (vLLM sends no salt field).
    infer_salt: bool
    #: Hashes are signed int64 (SGLang), so expect negatives.
    signed_hashes: bool


_VLLM: Final = _Dialect(
    name="vllm",
    decode_array_event=msgspec.msgpack.Decoder(
        _VllmArrayStored | _VllmArrayRemoved | _ArrayCleared
    ).decode,
    infer_salt=True,
    signed_hashes=False,
)
_SGLANG: Final = _Dialect(
    name="sglang",
    decode_array_event=msgspec.msgpack.Decoder(
        _SglangArrayStored | _SglangArrayRemoved | _ArrayCleared
    ).decode,
    infer_salt=False,
    signed_hashes=True,
)


# --- normalisation ------------------------------------------------------------


def _hash(value: int | bytes) -> int:
    """One engine block hash as a u64 (see the module docstring)."""
    if type(value) is int:
        return value & _U64_MAX  # negative int64 wraps modulo 2**64
    digest = cast(bytes, value)
    if len(digest) not in _DIGEST_SIZES:
        raise DecodeError(
            f"a raw block hash must be {sorted(_DIGEST_SIZES)} bytes, not {len(digest)}"
        )
    return int.from_bytes(digest[-8:], "big")


def _hashes(values: list[int | bytes], signed: bool) -> tuple[int, ...]:
    """Block hashes as u64s.

    Unsigned int lists (vLLM's) pass through after one C-level ``min()`` scan;
    lists with negatives (SGLang's int64, ``signed``) take one comprehension,
    measured twice as fast as ``map(int.__and__)`` on big ints. Raw digests
    (bytes) raise TypeError in either, and fall back to per-hash conversion.

    Runtime complexity: O(n).
    """
    if len(values) == 1:  # vLLM evicts block by block
        one = values[0]
        return (one & _U64_MAX,) if type(one) is int else (_hash(one),)
    ints = cast("list[int]", values)
    try:
        if not signed and min(ints, default=0) >= 0:
            return tuple(ints)
        return tuple([h if h >= 0 else h + _TWO_64 for h in ints])
    except TypeError:
        return tuple([_hash(v) for v in values])


def _tier(medium: str | None) -> Tier:
    tier = _TIERS.get(medium)
    if tier is None:
        known = sorted(m for m in _TIERS if m)
        raise DecodeError(f"unknown medium {medium!r}; expected one of {known}")
    return tier


def _freeze(value: object, depth: int) -> object:
    """An extra key with its arrays as tuples, so events stay hashable."""
    if isinstance(value, (list, tuple)):
        if depth >= _MAX_EXTRA_KEY_DEPTH:
            raise DecodeError("extra_keys nest too deeply")
        return tuple([_freeze(v, depth + 1) for v in value])
    if type(value) in _SCALAR_TYPES:
        return value
    raise DecodeError(
        f"extra_keys may hold arrays, strings, numbers, bytes and nil, not {type(value).__name__}"
    )


def _extra_keys(keys: list[tuple[Any, ...] | None]) -> tuple[object, ...]:
    if keys.count(None) == len(keys):  # the usual text-only request
        return tuple(keys)
    return tuple([None if k is None else _freeze(k, 1) for k in keys])


def vllm_cache_salt(extra_keys: tuple[object, ...] | None, lora_name: str | None) -> str | None:
    """The ``cache_salt`` behind a vLLM BlockStored that starts a prompt.

    vLLM 0.33 hashes each block with tagged extra keys, in the order LoRA,
    multimodal, cache salt, prompt embeddings, the salt on the prompt's first
    block only; its events publish them untagged: the LoRA name (a string),
    each multimodal item as an ``(identifier, offset)`` pair, the salt (a
    string) and the prompt-embeddings digest (bytes). So the salt is the
    first string of the first block's keys after the LoRA name and the pairs:

    >>> vllm_cache_salt((("my-lora", "tenant-A"), ("my-lora",)), "my-lora")
    'tenant-A'
    >>> vllm_cache_salt((("my-lora",),), "my-lora") is None
    True

    Limits of the inference: call it only for an event whose
    ``parent_block_hash`` is ``None`` (a store that continues a prompt carries
    no salt, and ``None`` there means "unknown", not "unsalted"); it trusts
    ``lora_name`` to name the LoRA key; and releases that published a
    multimodal key as a bare identifier string (before the offset was added)
    make that identifier indistinguishable from a salt, so it would be
    returned as one.

    :param extra_keys: the event's ``extra_keys`` as decoded (tuples).
    :param lora_name: the event's ``lora_name``.
    :returns: the salt, or ``None`` when the first block has none.
    """
    if not extra_keys:
        return None
    first = extra_keys[0]
    if not isinstance(first, tuple):
        return None
    i = 1 if lora_name is not None and first[:1] == (lora_name,) else 0
    while i < len(first) and isinstance(first[i], tuple):
        i += 1
    salt = first[i] if i < len(first) else None
    return salt if type(salt) is str else None


def _stored(ev: _Stored, dialect: _Dialect) -> BlockStored:
    extra = None if ev.extra_keys is None else _extra_keys(ev.extra_keys)
    parent = None if ev.parent_block_hash is None else _hash(ev.parent_block_hash)
    salt = ev.cache_salt
    if salt is None and dialect.infer_salt and parent is None:
        salt = vllm_cache_salt(extra, ev.lora_name)
    return BlockStored(
        block_hashes=_hashes(ev.block_hashes, dialect.signed_hashes),
        parent_block_hash=parent,
        token_ids=tuple(ev.token_ids),
        block_size=ev.block_size,
        tier=_tier(ev.medium),
        medium=ev.medium,
        lora_name=ev.lora_name,
        lora_id=ev.lora_id,
        cache_salt=salt,
        extra_keys=extra,
        group_idx=ev.group_idx,
        session_id=ev.session_id,
    )


_MAP_HEADS: Final = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_ARRAY_HEADS: Final = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}


def _event_struct(raw: Raw, dialect: _Dialect) -> _Event:
    view = memoryview(raw)
    if view[0] in _MAP_HEADS:
        return _MAP_EVENT.decode(view)
    if view[0] in _ARRAY_HEADS:
        return dialect.decode_array_event(view)
    raise DecodeError("an event must be a msgpack map or array")


def _parse_batch(
    payload: Buffer, dialect: _Dialect, max_events: int
) -> tuple[float, list[_Event], int | None]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes-like, not {type(payload).__name__}")
    name = dialect.name
    try:
        fast = _MAP_BATCH.decode(payload)
    except msgspec.ValidationError:
        pass  # positional events, or a bad field: parse event by event
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"{name}: not a msgpack event batch: {exc}") from exc
    else:
        if len(fast.events) > max_events:
            raise DecodeError(f"{name}: batch holds more than max_events={max_events} events")
        return fast.ts, cast("list[_Event]", fast.events), fast.dp_rank
    try:
        batch = _RAW_BATCH.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"{name}: not an event batch [ts, events, dp_rank]: {exc}") from exc
    if len(batch.events) > max_events:
        raise DecodeError(f"{name}: batch holds more than max_events={max_events} events")
    events: list[_Event] = []
    for i, raw in enumerate(batch.events):
        try:
            events.append(_event_struct(raw, dialect))
        except (msgspec.DecodeError, RecursionError, DecodeError) as exc:
            raise DecodeError(f"{name}: event {i}: {exc}") from exc
    return batch.ts, events, batch.dp_rank


def _decode_msgpack(
    payload: Buffer, dialect: _Dialect, max_events: int, max_tokens: int
) -> EventBatch:
    ts, structs, dp_rank = _parse_batch(payload, dialect, max_events)
    n_tokens = n_hashes = 0  # checked against max_tokens before any tuple is built
    events: list[BlockStored | BlockRemoved | AllBlocksCleared] = []
    signed = dialect.signed_hashes
    medium: str | None = None
    tier = _tier(None)
    for i, ev in enumerate(structs):
        try:
            if isinstance(ev, _REMOVED):  # first, and inline: evictions come one event per block
                n_hashes += len(ev.block_hashes)
                if n_hashes > max_tokens:
                    raise DecodeError(f"batch holds more than max_tokens={max_tokens} hashes")
                if ev.medium != medium:
                    tier = _tier(ev.medium)
                    medium = ev.medium
                hashes = _hashes(ev.block_hashes, signed)
                events.append(BlockRemoved(hashes, tier, medium, ev.group_idx))
            elif isinstance(ev, _STORED):
                n_hashes += len(ev.block_hashes)
                n_tokens += len(ev.token_ids)
                if n_hashes > max_tokens or n_tokens > max_tokens:
                    raise DecodeError(
                        f"batch holds more than max_tokens={max_tokens} token ids or hashes"
                    )
                events.append(_stored(ev, dialect))
            else:
                events.append(_CLEARED)
        except DecodeError as exc:
            raise DecodeError(f"{dialect.name}: event {i}: {exc}") from exc
    return EventBatch(ts=ts, events=tuple(events), dp_rank=dp_rank)


def decode_vllm(
    payload: Buffer,
    *,
    max_events: int = DEFAULT_MAX_EVENTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> EventBatch:
    """Decode one vLLM KV-event payload (the third ZMQ frame).

    Runtime complexity: O(size of the payload).

    >>> import msgspec
    >>> payload = msgspec.msgpack.encode([1.5, [
    ...     {"type": "BlockStored", "block_hashes": [7, -1], "parent_block_hash": None,
    ...      "token_ids": list(range(4)), "block_size": 2, "lora_id": None,
    ...      "medium": "CPU", "lora_name": None, "extra_keys": [["tenant-A"], None]},
    ...     ["BlockRemoved", [b"\\x00" * 24 + b"\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x07"]],
    ... ], 0])
    >>> batch = decode_vllm(payload)
    >>> batch.ts, batch.dp_rank
    (1.5, 0)
    >>> stored, removed = batch.events
    >>> stored.block_hashes == (7, 2**64 - 1), stored.tier, stored.cache_salt
    (True, 'host', 'tenant-A')
    >>> removed
    BlockRemoved(block_hashes=(7,), tier='device', medium=None, group_idx=None)

    :param payload: the msgpack bytes.
    :param max_events: reject a batch with more events than this.
    :param max_tokens: reject a batch with more token ids, or more block
        hashes, than this.
    :returns: the batch, events in the engine's order.
    :raises DecodeError: a malformed payload (see the module docstring).
    :raises TypeError: ``payload`` is not bytes-like.
    """
    return _decode_msgpack(payload, _VLLM, max_events, max_tokens)


def decode_sglang(
    payload: Buffer,
    *,
    max_events: int = DEFAULT_MAX_EVENTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> EventBatch:
    """Decode one SGLang KV-event payload (the third ZMQ frame).

    Runtime complexity: O(size of the payload).

    >>> import msgspec
    >>> payload = msgspec.msgpack.encode([2.0, [
    ...     {"type": "BlockStored", "block_hashes": [-5], "parent_block_hash": None,
    ...      "token_ids": list(range(20)), "block_size": 16, "lora_id": None,
    ...      "medium": "CPU_PINNED", "cache_salt": "tenant-A", "session_id": "s1"},
    ... ], 1])
    >>> (stored,) = decode_sglang(payload).events
    >>> stored.block_hashes == (2**64 - 5,), len(stored.token_ids), stored.tier
    (True, 20, 'host')
    >>> stored.cache_salt, stored.session_id
    ('tenant-A', 's1')

    :param payload: the msgpack bytes.
    :param max_events: reject a batch with more events than this.
    :param max_tokens: reject a batch with more token ids, or more block
        hashes, than this.
    :returns: the batch, events in the engine's order.
    :raises DecodeError: a malformed payload (see the module docstring).
    :raises TypeError: ``payload`` is not bytes-like.
    """
    return _decode_msgpack(payload, _SGLANG, max_events, max_tokens)


# --- Dynamo JSON --------------------------------------------------------------
#
# Mirrors serde's derive for Dynamo's KvCacheEvent: unknown fields are ignored,
# a known field given twice is an error, integers must be JSON integers in
# range (no bools, no floats), Option fields may be absent or null, and the
# externally tagged ``data`` enum takes a bare string for the unit variant or a
# one-key object. (serde would also take a struct as a JSON array of its
# fields; no producer sends that, and it is rejected here.)


class _Object(dict[str, Any]):
    """A parsed JSON object that remembers the keys it held more than once."""

    __slots__ = ("repeated",)
    repeated: frozenset[str]


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    out = _Object(obj)
    out.repeated = frozenset(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    return out


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _struct(value: object, what: str, fields: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DecodeError(f"{what}: expected a JSON object, got {_show(value)}")
    if isinstance(value, _Object):
        for name in fields:
            if name in value.repeated:
                raise DecodeError(f"{what}: duplicate field `{name}`")
    return value


def _required(obj: Mapping[str, Any], name: str, what: str) -> object:
    try:
        return obj[name]
    except KeyError:
        raise DecodeError(f"{what}: missing field `{name}`") from None


def _uint(value: object, limit: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        kind = "u64" if limit == _U64_MAX else "u32"
        raise DecodeError(f"{what}: expected {kind}, got {_show(value)}")
    return value


def _array(value: object, what: str, max_len: int) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise DecodeError(f"{what}: expected a JSON array, got {_show(value)}")
    if len(value) > max_len:
        raise DecodeError(f"{what}: more than max_tokens={max_len} entries")
    return value


def _u64_array(value: object, what: str, max_len: int) -> tuple[int, ...]:
    items = _array(value, what, max_len)
    for i, h in enumerate(items):
        if type(h) is not int or not 0 <= h <= _U64_MAX:
            raise DecodeError(f"{what}[{i}]: expected u64, got {_show(h)}")
    return tuple(items)


def _dynamo_stored(body: object, max_tokens: int) -> BlockStored:
    what = "data.stored"
    obj = _struct(body, what, ("parent_hash", "start_position", "blocks"))
    parent = obj.get("parent_hash")
    if parent is not None:
        parent = _uint(parent, _U64_MAX, f"{what}.parent_hash")
    start = obj.get("start_position")
    if start is not None:
        _uint(start, _U32_MAX, f"{what}.start_position")
    blocks = _array(_required(obj, "blocks", what), f"{what}.blocks", max_tokens)
    block_hashes: list[int] = []
    tokens_hashes: list[int] = []
    for i, block in enumerate(blocks):
        where = f"{what}.blocks[{i}]"
        b = _struct(block, where, ("block_hash", "tokens_hash", "mm_extra_info"))
        block_hashes.append(
            _uint(_required(b, "block_hash", where), _U64_MAX, f"{where}.block_hash")
        )
        tokens_hashes.append(
            _uint(_required(b, "tokens_hash", where), _U64_MAX, f"{where}.tokens_hash")
        )
        info = b.get("mm_extra_info")
        if info is not None and not isinstance(info, Mapping):
            raise DecodeError(f"{where}.mm_extra_info: expected an object or null")
    return BlockStored(
        block_hashes=tuple(block_hashes),
        parent_block_hash=parent,
        token_ids=(),
        tokens_hashes=tuple(tokens_hashes),
    )


def _dynamo_event(data: object, max_tokens: int) -> BlockStored | BlockRemoved | AllBlocksCleared:
    if isinstance(data, str):
        if data == "cleared":
            return AllBlocksCleared()
        if data in ("stored", "removed"):
            raise DecodeError(f"data: variant {data!r} needs a body")
        raise DecodeError(f"data: unknown variant {_show(data)}")
    if not isinstance(data, Mapping):
        raise DecodeError(f"data: expected a variant, got {_show(data)}")
    if len(data) != 1 or (isinstance(data, _Object) and data.repeated):
        raise DecodeError("data: expected exactly one of `stored`, `removed`, `cleared`")
    ((tag, body),) = data.items()
    if tag == "stored":
        return _dynamo_stored(body, max_tokens)
    if tag == "removed":
        obj = _struct(body, "data.removed", ("block_hashes",))
        hashes = _required(obj, "block_hashes", "data.removed")
        return BlockRemoved(
            block_hashes=_u64_array(hashes, "data.removed.block_hashes", max_tokens)
        )
    if tag == "cleared":
        if body is not None:
            raise DecodeError(f"data.cleared: expected null, got {_show(body)}")
        return AllBlocksCleared()
    raise DecodeError(f"data: unknown variant {_show(tag)}")


def _parse_json(data: Buffer | str | Mapping[str, Any]) -> object:
    if isinstance(data, Mapping):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"not UTF-8: {exc}") from exc
    elif isinstance(data, str):
        text = data
    else:
        raise TypeError(f"data must be bytes, str or a mapping, not {type(data).__name__}")
    try:
        return json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"not JSON: {exc}") from exc


def decode_dynamo_json(
    data: Buffer | str | Mapping[str, Any],
    *,
    max_events: int = DEFAULT_MAX_EVENTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> EventBatch:
    """Decode one Dynamo 1.6.1 router event (``KvCacheEvent`` JSON).

    Accepts and rejects what Dynamo's ``RadixTree.apply_event`` deserializer
    does; an event that parses but names an unknown parent or block is the
    applier's business, not a decode error. The batch holds the one event,
    ``ts=None``, the event's ``dp_rank`` (``None`` when absent; Dynamo reads
    that as 0) and its ``event_id``.

    Runtime complexity: O(size of the event).

    >>> batch = decode_dynamo_json(
    ...     '{"event_id": 3, "data": {"stored": {"parent_hash": null,'
    ...     ' "blocks": [{"block_hash": 11, "tokens_hash": 99}]}}, "dp_rank": 1}')
    >>> batch.event_id, batch.dp_rank, batch.events[0].tokens_hashes
    (3, 1, (99,))
    >>> decode_dynamo_json('{"event_id": 4, "data": "cleared"}').events
    (AllBlocksCleared(),)

    :param data: the JSON text (bytes must be UTF-8), or an already parsed
        object.
    :param max_events: accepted for a uniform signature (an event is one).
    :param max_tokens: reject an event with more blocks than this.
    :returns: a one-event batch.
    :raises DecodeError: a malformed event, including any negative or
        over-u64 hash (``dp_rank`` must be u32).
    :raises TypeError: ``data`` is not bytes, ``str`` or a mapping.
    """
    try:
        obj = _struct(_parse_json(data), "event", ("event_id", "data", "dp_rank"))
        if max_events < 1:
            raise DecodeError(f"batch holds more than max_events={max_events} events")
        event_id = _uint(_required(obj, "event_id", "event"), _U64_MAX, "event_id")
        payload = _required(obj, "data", "event")
        dp_rank = None
        if "dp_rank" in obj:
            dp_rank = _uint(obj["dp_rank"], _U32_MAX, "dp_rank")
        event = _dynamo_event(payload, max_tokens)
    except DecodeError as exc:
        raise DecodeError(f"dynamo: {exc}") from exc
    return EventBatch(ts=None, events=(event,), dp_rank=dp_rank, event_id=event_id)


# --- the registry -----------------------------------------------------------------


class Decoder(Protocol):
    """Turns one wire payload into an :class:`~kvroute.events.types.EventBatch`.

    A decoder raises :class:`DecodeError` for a malformed payload (never
    another exception for bad bytes: the subscriber counts those and goes
    on), ``TypeError`` for a payload of the wrong Python type, and honours
    both size limits (see the module docstring).
    """

    def __call__(self, payload: Any, /, *, max_events: int, max_tokens: int) -> EventBatch: ...


@dataclass(frozen=True)
class _Registered:
    decoder: Decoder
    zmq: bool


_REGISTRY: dict[str, _Registered] = {}


def register_decoder(
    name: str, decoder: Decoder, *, zmq: bool = True, replace: bool = False
) -> None:
    """Make ``decode(payload, name)`` (and subscriptions in format ``name``) use ``decoder``.

    >>> def decode_blank(payload, *, max_events, max_tokens):
    ...     return EventBatch(ts=None, events=())
    >>> register_decoder("blank", decode_blank, replace=True)  # replace: doctests run twice
    >>> decode(b"anything", "blank").events
    ()
    >>> "blank" in available_formats(zmq=True)
    True

    :param name: the format's name (``"trtllm"``, say).
    :param decoder: the :class:`Decoder`.
    :param zmq: its payloads arrive as the last frame of vLLM's ZMQ event
        protocol (a PUB stream of ``topic, seq, payload`` and a ROUTER replay
        endpoint), so :class:`~kvroute.events.ZmqSubscriber` can carry them.
        Dynamo's JSON events come another way (``zmq=False``).
    :param replace: allow replacing an existing registration (a built-in too).
    :raises ValueError: ``name`` is already registered and ``replace`` is false.
    :raises TypeError: ``name`` is not a non-empty str or ``decoder`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("a format name must be a non-empty str")
    if not callable(decoder):
        raise TypeError(f"decoder for {name!r} is not callable")
    if name in _REGISTRY and not replace:
        raise ValueError(f"format {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = _Registered(decoder, bool(zmq))


def get_decoder(name: str) -> Decoder:
    """The decoder registered for format ``name``.

    >>> get_decoder("vllm") is decode_vllm
    True

    :raises ValueError: no format has that name (the message lists those that do).
    """
    try:
        return _REGISTRY[name].decoder
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown format {name!r}; registered: {', '.join(available_formats())}"
        ) from None


def available_formats(*, zmq: bool | None = None) -> list[str]:
    """Names of the registered formats, sorted; with ``zmq``, only those it says.

    >>> {"vllm", "sglang", "dynamo"} <= set(available_formats())
    True
    >>> "dynamo" in available_formats(zmq=False), "dynamo" in available_formats(zmq=True)
    (True, False)

    :param zmq: ``True`` for the formats :class:`~kvroute.events.ZmqSubscriber`
        carries, ``False`` for the others, ``None`` for all.
    """
    return sorted(n for n, r in _REGISTRY.items() if zmq is None or r.zmq == zmq)


register_decoder("vllm", decode_vllm)
register_decoder("sglang", decode_sglang)
register_decoder("dynamo", decode_dynamo_json, zmq=False)


def decode(
    payload: Buffer | str | Mapping[str, Any],
    fmt: str,
    *,
    max_events: int = DEFAULT_MAX_EVENTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> EventBatch:
    """Decode ``payload`` as format ``fmt`` (a registered name: :func:`available_formats`).

    >>> decode(b'{"event_id": 1, "data": {"cleared": null}}', "dynamo").events
    (AllBlocksCleared(),)

    :param payload: msgpack bytes for ``"vllm"`` / ``"sglang"``; JSON text or a
        parsed object for ``"dynamo"``; what its decoder takes for another format.
    :param fmt: the wire format.
    :param max_events: see :func:`decode_vllm`.
    :param max_tokens: see :func:`decode_vllm`.
    :returns: the decoded batch.
    :raises ValueError: ``fmt`` is not a registered format.
    :raises DecodeError: a malformed payload.
    :raises TypeError: ``payload`` has the wrong Python type for ``fmt``.
    """
    return get_decoder(fmt)(payload, max_events=max_events, max_tokens=max_tokens)


# TensorRT-LLM's decoder lives in its own module, which imports this one and
# registers "trtllm" when it runs: importing it here (last, once the registry
# exists) makes the format known to whoever imports the registry first.
importlib.import_module(f"{__package__}.trtllm")

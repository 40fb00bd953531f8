"""vLLM 0.33's KV-event wire format: msgpack payloads and ZMQ frames.

Written from the format as ``tests/vectors/README.md`` describes it (and
checked byte for byte against its captured payloads), not from vLLM's source:

- a payload is the msgpack array ``[ts, [event, ...], data_parallel_rank]``;
  the batch is an ``array_like`` struct, so the trailing rank stays even when
  it is nil;
- each event is a msgpack *map* whose first key is ``"type"`` (the tag), then
  the fields in declaration order; fields without a default are always sent
  (nil included), fields with a default are omitted when they equal it;
- a PUB message is ``[topic, seq as 8-byte big-endian, payload]``, and the
  replay ROUTER ends its answer with ``seq = 0xff * 8`` and empty frames.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

import msgspec

__all__ = [
    "REPLAY_END_SEQ",
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmEvent",
    "VllmEventBatch",
    "decode_batch",
    "encode_batch",
    "pack_seq",
    "unpack_seq",
]

#: The sequence frame of the replay end marker (-1 as a signed 8-byte int).
REPLAY_END_SEQ: Final = b"\xff" * 8


# msgspec's ``omit_defaults`` drops a field only when it *has* a default equal
# to its value, so the declaration order below (required fields first, then the
# defaulted ones) is exactly what decides which nils reach the wire.
class _VllmEventBase(msgspec.Struct, tag_field="type", omit_defaults=True, gc=False):
    """Common base: a tagged map, the tag under ``"type"``."""


class VllmBlockStored(_VllmEventBase, tag="BlockStored"):
    """``BlockStored``: full blocks just cached, contiguous, in prefix order.

    ``block_hashes`` are u64 ints (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``,
    the default) or raw digests (``bytes``) when that switch is 0.
    """

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: Any = None
    kv_cache_spec_sliding_window: int | None = None
    locality: Any = None
    ownership: Any = None
    session_id: str | None = None
    lookahead_token_ids: list[int] | None = None


class VllmBlockRemoved(_VllmEventBase, tag="BlockRemoved"):
    """``BlockRemoved``: blocks evicted; the block pool sends one hash per event."""

    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: Any = None
    ownership: Any = None


class VllmAllBlocksCleared(_VllmEventBase, tag="AllBlocksCleared"):
    """``AllBlocksCleared``: the prefix cache was reset."""


VllmEvent: TypeAlias = "VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared"


class VllmEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published batch: ``[ts, events, data_parallel_rank]`` on the wire."""

    ts: float
    events: list[VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared]
    data_parallel_rank: int | None = None


# The publisher's encoder: default settings, like vLLM's.
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(VllmEventBatch)


def encode_batch(ts: float, events: list[VllmEvent], dp_rank: int | None) -> bytes:
    """Encode one batch exactly as vLLM 0.33's ``ZmqEventPublisher`` does.

    >>> encode_batch(1700000004.0, [], None).hex()
    '93cb41d954fc4100000090c0'

    :param ts: the batch timestamp (seconds); always sent as a float64.
    :param events: the events, in emission order.
    :param dp_rank: the data-parallel rank, or ``None`` (sent as nil).
    :returns: the msgpack payload frame.
    """
    return _ENCODER.encode(VllmEventBatch(float(ts), list(events), dp_rank))


def decode_batch(payload: bytes) -> VllmEventBatch:
    """Decode a payload produced by :func:`encode_batch` (or by vLLM 0.33).

    :param payload: the msgpack payload frame.
    :returns: the typed batch.
    :raises msgspec.ValidationError: the payload is not a vLLM 0.33 batch.
    """
    return _DECODER.decode(payload)


def pack_seq(seq: int) -> bytes:
    """The 8-byte big-endian sequence frame.

    >>> pack_seq(2).hex()
    '0000000000000002'
    """
    return seq.to_bytes(8, "big", signed=False)


def unpack_seq(frame: bytes) -> int:
    """Read a sequence frame back (the end marker reads as ``2**64 - 1``).

    :raises ValueError: the frame is not 8 bytes long.
    """
    if len(frame) != 8:
        raise ValueError(f"a sequence frame is 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=False)

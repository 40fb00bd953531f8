"""Wire-format decoders (:mod:`kvroute.events.decode`) against the ground truth.

Every vLLM 0.33.0 and SGLang 0.5.23 payload in ``tests/vectors`` (the stored
batches, the frames captured from the engines' real ZMQ publishers and their
replays) decodes to its documented field values; every Dynamo 1.6.1 event JSON
is accepted or rejected as Dynamo's own deserializer did. Older vLLM / SGLang
releases' positional events are built with msgspec from the same vector data
and must decode equal to the map form. Hypothesis feeds random bytes, random
msgpack and JSON structures and near-valid mutations: the decoders either
return a batch or raise ``DecodeError``, nothing else.
"""

from __future__ import annotations

import dataclasses
import doctest
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvroute.events.decode import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_MAX_TOKENS,
    FORMATS,
    DecodeError,
    available_formats,
    decode,
    decode_dynamo_json,
    decode_sglang,
    decode_vllm,
    get_decoder,
    register_decoder,
    vllm_cache_salt,
)
from kvroute.events.types import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch

# the module itself: ``kvroute.events.decode`` is the decode *function*
D = sys.modules["kvroute.events.decode"]

VECTORS = Path(__file__).parent / "vectors"
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
TIER_OF_MEDIUM = {
    None: "device",
    "GPU": "device",
    "CPU": "host",
    "CPU_PINNED": "host",
    "DISK": "disk",
    "EXTERNAL": "disk",
}
MEDIUMS = [*sorted(m for m in TIER_OF_MEDIUM if m), None]
#: The salt behind each vLLM scenario (vllm_kv_events.json notes): only request B has one.
VLLM_SALTS = {"stored_lora_salt": "tenant-A"}
ENCODE = msgspec.msgpack.Encoder().encode
MSGPACK_DECODERS = {"vllm": decode_vllm, "sglang": decode_sglang}


@functools.cache
def vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def vllm_batches() -> list[dict[str, Any]]:
    return vectors("vllm_kv_events.json")["batches"]  # type: ignore[no-any-return]


def vllm_batch(name: str) -> dict[str, Any]:
    (batch,) = [b for b in vllm_batches() if b["name"] == name]
    return batch


def sglang_batches() -> list[dict[str, Any]]:
    return vectors("sglang_vectors.json")["event_batches"]  # type: ignore[no-any-return]


def dynamo_tree() -> dict[str, Any]:
    return vectors("dynamo_vectors.json")["radix_tree"]  # type: ignore[no-any-return]


# --- expected values, written from the vectors' own fields ---------------------


def wire_value(value: Any) -> Any:
    """A vector JSON value as msgpack carried it: ``{"bytes_hex": ..}`` is bytes."""
    if isinstance(value, dict) and set(value) == {"bytes_hex"}:
        return bytes.fromhex(value["bytes_hex"])
    if isinstance(value, list):
        return [wire_value(v) for v in value]
    if isinstance(value, dict):
        return {k: wire_value(v) for k, v in value.items()}
    return value


def u64(h: Any) -> int:
    """The hash vLLM publishes by default, from any form the vectors hold."""
    if isinstance(h, dict):
        return int(h["bytes_hex"][-16:], 16)
    assert isinstance(h, int)
    return h % 2**64


def frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(frozen(v) for v in value)
    return value


def check_stored(got: Any, exp: Mapping[str, Any], *, cache_salt: str | None) -> None:
    assert isinstance(got, BlockStored)
    assert got.block_hashes == tuple(u64(h) for h in exp["block_hashes"])
    parent = exp["parent_block_hash"]
    assert got.parent_block_hash == (None if parent is None else u64(parent))
    assert got.token_ids == tuple(exp["token_ids"])
    assert got.tokens_hashes is None
    assert got.block_size == exp["block_size"]
    assert got.lora_id == exp["lora_id"]
    assert got.medium == exp.get("medium")
    assert got.tier == TIER_OF_MEDIUM[exp.get("medium")]
    assert got.lora_name == exp.get("lora_name")
    assert got.extra_keys == frozen(exp.get("extra_keys"))
    assert got.group_idx == exp.get("group_idx")
    assert got.session_id == exp.get("session_id")
    assert got.cache_salt == cache_salt


def check_removed(got: Any, exp: Mapping[str, Any]) -> None:
    assert isinstance(got, BlockRemoved)
    assert got.block_hashes == tuple(u64(h) for h in exp["block_hashes"])
    assert got.medium == exp.get("medium")
    assert got.tier == TIER_OF_MEDIUM[exp.get("medium")]
    assert got.group_idx == exp.get("group_idx")


def check_events(
    got: EventBatch, events: list[dict[str, Any]], salt: Callable[[dict[str, Any]], Any]
) -> None:
    assert len(got.events) == len(events)
    for ev, exp in zip(got.events, events, strict=True):
        if exp["type"] == "BlockStored":
            check_stored(ev, exp, cache_salt=salt(exp))
        elif exp["type"] == "BlockRemoved":
            check_removed(ev, exp)
        else:
            assert exp["type"] == "AllBlocksCleared"
            assert ev == AllBlocksCleared()


# --- vLLM 0.33.0 -----------------------------------------------------------------


@pytest.mark.parametrize("name", [b["name"] for b in vllm_batches()])
def test_vllm_batch_decodes_to_its_documented_fields(name: str) -> None:
    vec = vllm_batch(name)
    got = decode_vllm(bytes.fromhex(vec["payload_hex"]))
    exp = vec["decoded"]
    assert got.ts == exp["ts"]
    assert got.dp_rank == exp["data_parallel_rank"]
    assert got.event_id is None
    scenario = name.removesuffix("_bytes_hashes")

    def salt(ev: dict[str, Any]) -> str | None:
        return VLLM_SALTS.get(scenario) if ev["parent_block_hash"] is None else None

    check_events(got, exp["events"], salt)
    hash(got)  # frozen all the way down: tuples, no lists


@pytest.mark.parametrize(
    "name", [b["name"] for b in vllm_batches() if b["name"].endswith("_bytes_hashes")]
)
def test_vllm_int_and_bytes_hashes_of_one_scenario_decode_equal(name: str) -> None:
    as_bytes = decode_vllm(bytes.fromhex(vllm_batch(name)["payload_hex"]))
    as_ints = decode_vllm(
        bytes.fromhex(vllm_batch(name.removesuffix("_bytes_hashes"))["payload_hex"])
    )
    assert as_bytes == as_ints


def stored_events(vector_name: str) -> list[BlockStored]:
    events = decode_vllm(bytes.fromhex(vllm_batch(vector_name)["payload_hex"])).events
    out = [ev for ev in events if isinstance(ev, BlockStored)]
    assert out
    return out


def test_vllm_event_ints_are_the_last_8_bytes_of_the_full_hashes() -> None:
    full = vectors("vllm_kv_events.json")
    a = [int(h[-16:], 16) for h in full["request_A_block_hashes_hex"]]
    b = [int(h[-16:], 16) for h in full["request_B_block_hashes_hex"]]
    (first,) = stored_events("stored_first_blocks")
    (child,) = stored_events("stored_child_block")
    (lora,) = stored_events("stored_lora_salt")
    assert [*first.block_hashes, *child.block_hashes] == a
    assert child.parent_block_hash == a[1]
    assert list(lora.block_hashes) == b


def capture() -> dict[str, Any]:
    return vectors("vllm_zmq_capture.json")  # type: ignore[no-any-return]


def seq_to_batch() -> dict[int, str]:
    return {f["seq"]: f["batch_name"] for f in capture()["live_pub_frames"]}


def test_vllm_live_zmq_frames_decode_as_their_stored_batches() -> None:
    frames = capture()["live_pub_frames"]
    assert len(frames) == 5
    for frame in frames:
        topic, seq, payload = (bytes.fromhex(f) for f in frame["frames_hex"])
        assert topic == capture()["topic"].encode()
        assert int.from_bytes(seq, "big") == frame["seq"]
        vec = vllm_batch(frame["batch_name"])
        assert payload == bytes.fromhex(vec["payload_hex"])
        got = decode_vllm(payload)
        assert got == decode_vllm(bytes.fromhex(vec["payload_hex"]))
        assert got.ts == frame["decoded_payload"][0]
        assert got.dp_rank == frame["decoded_payload"][2]


def replies() -> Iterator[tuple[bytes, bytes]]:
    """(seq frame, payload frame) of every captured vLLM replay reply."""
    cap = capture()
    for msg in cap["replay_dealer"]["reply_messages_frames_hex"]:
        empty, _topic, seq, payload = (bytes.fromhex(f) for f in msg)
        assert empty == b""
        yield seq, payload
    for msg in cap["replay_req_socket"]["reply_messages_frames_hex"]:
        _topic, seq, payload = (bytes.fromhex(f) for f in msg)
        yield seq, payload
    for msg in cap["replay_dealer_start_beyond_buffer"]["reply_messages_frames_hex"]:
        empty, _topic, seq, payload = (bytes.fromhex(f) for f in msg)
        yield seq, payload


def test_vllm_replay_replies_decode_and_the_end_marker_is_not_a_batch() -> None:
    by_seq = seq_to_batch()
    decoded = ends = 0
    for seq, payload in replies():
        if seq == b"\xff" * 8:
            assert payload == b""
            with pytest.raises(DecodeError):
                decode_vllm(payload)
            ends += 1
            continue
        name = by_seq[int.from_bytes(seq, "big")]
        assert decode_vllm(payload) == decode_vllm(bytes.fromhex(vllm_batch(name)["payload_hex"]))
        decoded += 1
    assert decoded == 4  # dealer from seq 2 (3 batches) + the REQ client's one
    assert ends == 2


def test_vllm_cache_salt_is_inferred_only_at_a_prompt_start() -> None:
    vec = vllm_batch("stored_lora_salt")["generic_msgpack_decode"]
    ev = dict(vec[1][0])
    (got,) = decode_vllm(ENCODE([1.0, [ev], 0])).events
    assert isinstance(got, BlockStored) and got.cache_salt == "tenant-A"
    ev["parent_block_hash"] = 5  # same keys, but the store continues a prompt
    (got,) = decode_vllm(ENCODE([1.0, [ev], 0])).events
    assert isinstance(got, BlockStored) and got.cache_salt is None


@pytest.mark.parametrize(
    ("extra_keys", "lora_name", "salt"),
    [
        (None, None, None),
        ((), None, None),
        ((None, None), None, None),
        ((("tenant-A",), None), None, "tenant-A"),
        ((("my-lora", "tenant-A"), ("my-lora",)), "my-lora", "tenant-A"),
        ((("my-lora",), ("my-lora",)), "my-lora", None),
        # multimodal (identifier, offset) pairs sit between the LoRA name and the salt
        ((("my-lora", ("img-1", 0), ("img-2", 9), "tenant-A"),), "my-lora", "tenant-A"),
        (((("img-1", 3),),), None, None),
        # prompt-embeds digests are bytes, never a salt
        (((b"\x01" * 32),), None, None),
        ((("tenant-A", b"\x01" * 32),), None, "tenant-A"),
        # a LoRA named like the salt
        ((("x", "x"),), "x", "x"),
        # lookahead-style keys: no string in salt position
        (((None, 17),), None, None),
    ],
)
def test_vllm_cache_salt_rule(
    extra_keys: tuple[object, ...] | None, lora_name: str | None, salt: str | None
) -> None:
    assert vllm_cache_salt(extra_keys, lora_name) == salt


def test_vllm_explicit_cache_salt_field_wins_over_inference() -> None:
    ev = dict(vllm_batch("stored_lora_salt")["generic_msgpack_decode"][1][0])
    ev["cache_salt"] = "explicit"
    (got,) = decode_vllm(ENCODE([1.0, [ev], 0])).events
    assert isinstance(got, BlockStored) and got.cache_salt == "explicit"


# --- older vLLM releases: positional events ---------------------------------------

Field = tuple[str, Any] | tuple[str, Any, Any]  # msgspec.defstruct: (name, type[, default])
MEDIUM: Field = ("medium", str | None)
LORA_NAME: Field = ("lora_name", str | None)
EXTRA_KEYS: Field = ("extra_keys", list[Any] | None, None)
GROUP_IDX: Field = ("group_idx", int | None, None)
SPEC: list[Field] = [
    ("kv_cache_spec_kind", str | None, None),
    ("kv_cache_spec_sliding_window", int | None, None),
]
#: vLLM's positional layouts by era: BlockStored and BlockRemoved fields after
#: the ones every release had (vllm/distributed/kv_events.py before the switch
#: to maps; each era appended fields, none moved).
VLLM_LAYOUTS: dict[str, tuple[list[Field], list[Field]]] = {
    "first": ([], []),
    "medium": ([MEDIUM], [MEDIUM]),
    "lora_name": ([MEDIUM, LORA_NAME], [MEDIUM]),
    "extra_keys": ([MEDIUM, LORA_NAME, EXTRA_KEYS], [MEDIUM]),
    "group_idx": ([MEDIUM, LORA_NAME, EXTRA_KEYS, GROUP_IDX], [MEDIUM, GROUP_IDX]),
    "kv_cache_spec": ([MEDIUM, LORA_NAME, EXTRA_KEYS, GROUP_IDX, *SPEC], [MEDIUM, GROUP_IDX]),
}
COMMON_STORED: list[Field] = [
    ("block_hashes", list[Any]),
    ("parent_block_hash", Any),
    ("token_ids", list[int]),
    ("block_size", int),
    ("lora_id", int | None),
]
#: Fields the decoder reads that a layout may lack (they decode as None).
OPTIONAL_FIELDS = {"medium", "lora_name", "extra_keys", "group_idx", "session_id"}


def positional_structs(layout: str) -> dict[str, type]:
    """An old release's event structs (msgspec ``array_like``, tagged by class name)."""
    stored_extra, removed_extra = VLLM_LAYOUTS[layout]
    opts: dict[str, Any] = {"array_like": True, "tag": True, "omit_defaults": True}
    return {
        "BlockStored": msgspec.defstruct("BlockStored", COMMON_STORED + stored_extra, **opts),
        "BlockRemoved": msgspec.defstruct(
            "BlockRemoved", [("block_hashes", list[Any]), *removed_extra], **opts
        ),
        "AllBlocksCleared": msgspec.defstruct("AllBlocksCleared", [], **opts),
    }


def to_positional(ev: dict[str, Any], structs: dict[str, type]) -> tuple[Any, set[str]]:
    """Map event ``ev`` as an old release's struct, and the fields that layout lacks."""
    cls = structs[ev["type"]]
    names = {f.name for f in msgspec.structs.fields(cls)}
    obj = cls(**{k: wire_value(v) for k, v in ev.items() if k in names})
    return obj, set(ev) - names - {"type"}


def expected_without(got: Any, missing: set[str]) -> Any:
    """Map-form decode ``got`` as an old layout gives it: missing fields at None."""
    if isinstance(got, AllBlocksCleared):
        return got
    changes: dict[str, Any] = dict.fromkeys(missing & OPTIONAL_FIELDS)
    if "medium" in changes:
        changes["tier"] = "device"
    if "extra_keys" in changes:
        changes["cache_salt"] = None
    return dataclasses.replace(got, **changes)


@pytest.mark.parametrize("layout", list(VLLM_LAYOUTS))
@pytest.mark.parametrize("name", [b["name"] for b in vllm_batches()])
def test_vllm_positional_events_decode_equal_to_the_map_form(name: str, layout: str) -> None:
    vec = vllm_batch(name)
    ts, events, dp_rank = vec["generic_msgpack_decode"]
    structs = positional_structs(layout)
    converted = [to_positional(ev, structs) for ev in events]
    old_events = [obj for obj, _ in converted]
    map_form = decode_vllm(bytes.fromhex(vec["payload_hex"]))
    expected = tuple(
        expected_without(got, missing)
        for got, (_, missing) in zip(map_form.events, converted, strict=True)
    )
    got = decode_vllm(ENCODE([ts, old_events, dp_rank]))
    assert got == EventBatch(ts=ts, events=expected, dp_rank=dp_rank)
    # the releases before data-parallel ranks sent [ts, events]
    got = decode_vllm(ENCODE([ts, old_events]))
    assert got == EventBatch(ts=ts, events=expected, dp_rank=None)


def test_vllm_positional_and_map_events_mix_in_one_batch() -> None:
    structs = positional_structs("kv_cache_spec")
    ts, events, dp = vllm_batch("stored_then_cleared")["generic_msgpack_decode"]
    mixed = [to_positional(events[0], structs)[0], events[1], *events]
    got = decode_vllm(ENCODE([ts, mixed, dp]))
    assert got.events == decode_vllm(ENCODE([ts, events, dp])).events * 2


def test_vllm_legacy_two_element_batch_has_no_dp_rank() -> None:
    got = decode_vllm(ENCODE([3.5, [["AllBlocksCleared"], ["BlockRemoved", [1, 2]]]]))
    assert got == EventBatch(
        ts=3.5, events=(AllBlocksCleared(), BlockRemoved(block_hashes=(1, 2))), dp_rank=None
    )


# --- SGLang 0.5.23 ---------------------------------------------------------------


@pytest.mark.parametrize("name", [b["name"] for b in sglang_batches()])
def test_sglang_batch_decodes_to_its_documented_fields(name: str) -> None:
    (vec,) = [b for b in sglang_batches() if b["name"] == name]
    got = decode_sglang(bytes.fromhex(vec["payload_hex"]))
    ts, events, rank = vec["decoded"]
    assert got.ts == ts
    assert got.dp_rank == rank
    check_events(got, events, lambda ev: ev.get("cache_salt"))
    hash(got)


def test_sglang_negative_int64_hashes_wrap_modulo_2_64() -> None:
    (vec,) = [b for b in sglang_batches() if b["name"] == "default:stored_chain"]
    hashes = vec["decoded"][1][0]["block_hashes"]
    assert any(h < 0 for h in hashes)
    (got,) = decode_sglang(bytes.fromhex(vec["payload_hex"])).events
    assert isinstance(got, BlockStored)
    assert got.block_hashes == tuple(h + 2**64 if h < 0 else h for h in hashes)


def sglang_capture() -> dict[str, Any]:
    return vectors("sglang_vectors.json")["zmq_capture"]  # type: ignore[no-any-return]


def test_sglang_zmq_frames_and_replay_decode_as_their_stored_batches() -> None:
    by_payload = {b["payload_hex"]: b for b in sglang_batches()}
    cap = sglang_capture()
    messages = list(cap["live_frames_hex"])
    messages += [m[1:] for m in cap["replay_dealer_reply_frames_hex"]]
    decoded = 0
    for topic, seq, payload in messages:
        if seq == "ff" * 8:
            with pytest.raises(DecodeError):
                decode_sglang(bytes.fromhex(payload))
            continue
        assert bytes.fromhex(topic) == b"sgl"
        vec = by_payload[payload]
        assert decode_sglang(bytes.fromhex(payload)) == decode_sglang(
            bytes.fromhex(vec["payload_hex"])
        )
        decoded += 1
    assert decoded == 3


def sglang_stored(**fields: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": [-1, 5],
        "parent_block_hash": None,
        "token_ids": list(range(40)),
        "block_size": 16,
        "lora_id": None,
    }
    ev.update(fields)
    return ev


def test_sglang_trailing_partial_page_is_kept_as_sent() -> None:
    (got,) = decode_sglang(ENCODE([1.0, [sglang_stored()], 0])).events
    assert isinstance(got, BlockStored)
    assert got.token_ids == tuple(range(40))  # 2 full pages + 8 tokens
    assert got.block_hashes == (U64_MAX, 5)
    assert got.medium is None and got.tier == "device"  # SGLang omits a nil medium


def test_sglang_optional_fields_when_present() -> None:
    ev = sglang_stored(
        medium="CPU_PINNED", cache_salt="t", session_id="s", lora_name="l", lora_id=3
    )
    (got,) = decode_sglang(ENCODE([1.0, [ev], 0])).events
    assert isinstance(got, BlockStored)
    assert (got.tier, got.medium, got.cache_salt, got.session_id, got.lora_name, got.lora_id) == (
        "host",
        "CPU_PINNED",
        "t",
        "s",
        "l",
        3,
    )


def test_sglang_never_infers_a_salt_from_extra_keys() -> None:
    ev = sglang_stored(extra_keys=[["ns"], None])
    (got,) = decode_sglang(ENCODE([1.0, [ev], 0])).events
    assert isinstance(got, BlockStored)
    assert got.extra_keys == (("ns",), None) and got.cache_salt is None
    (got,) = decode_vllm(ENCODE([1.0, [ev], 0])).events
    assert isinstance(got, BlockStored) and got.cache_salt == "ns"


def test_sglang_positional_events_of_older_releases() -> None:
    ev = sglang_stored()
    old = ["BlockStored", ev["block_hashes"], None, ev["token_ids"], 16, None]
    with_medium = [*old, "CPU_PINNED", "ignored-later-field", 7]
    got = decode_sglang(
        ENCODE(
            [
                1.0,
                [
                    old,
                    with_medium,
                    ["BlockRemoved", [-1]],
                    ["BlockRemoved", [2], "DISK"],
                    ["AllBlocksCleared"],
                ],
            ]
        )
    )
    map_form = decode_sglang(ENCODE([1.0, [ev, dict(ev, medium="CPU_PINNED")], 0]))
    assert got.dp_rank is None
    assert got.events[:2] == map_form.events
    assert got.events[2:] == (
        BlockRemoved(block_hashes=(U64_MAX,)),
        BlockRemoved(block_hashes=(2,), tier="disk", medium="DISK"),
        AllBlocksCleared(),
    )


# --- shared msgpack rules ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
@pytest.mark.parametrize("medium", MEDIUMS)
def test_medium_maps_to_tier(fmt: str, medium: str | None) -> None:
    ev = sglang_stored(medium=medium)
    rm = {"type": "BlockRemoved", "block_hashes": [1], "medium": medium}
    stored, removed = MSGPACK_DECODERS[fmt](ENCODE([1.0, [ev, rm], None])).events
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
    assert stored.tier == removed.tier == TIER_OF_MEDIUM[medium]
    assert stored.medium == removed.medium == medium


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_raw_digests_become_their_last_8_bytes(fmt: str) -> None:
    d16, d32 = bytes(range(16)), bytes(range(100, 132))
    ev = sglang_stored(block_hashes=[d16, d32, 7, -2], parent_block_hash=d32)
    rm = {"type": "BlockRemoved", "block_hashes": [d16]}
    stored, removed = MSGPACK_DECODERS[fmt](ENCODE([1.0, [ev, rm], None])).events
    last8 = [int.from_bytes(d[-8:], "big") for d in (d16, d32)]
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
    assert stored.block_hashes == (*last8, 7, 2**64 - 2)
    assert stored.parent_block_hash == last8[1]
    assert removed.block_hashes == (last8[0],)


def test_extra_keys_arrays_become_tuples() -> None:
    ev = sglang_stored(extra_keys=[["lora", ["img", 0], b"\x00" * 32, 1.5, True], None])
    (got,) = decode_vllm(ENCODE([1.0, [ev], 0])).events
    assert isinstance(got, BlockStored)
    assert got.extra_keys == (("lora", ("img", 0), b"\x00" * 32, 1.5, True), None)
    hash(got)


def enc(obj: Any) -> bytes:
    return ENCODE(obj)


def with_event(**fields: Any) -> bytes:
    return enc([1.0, [sglang_stored(**fields)], 0])


BAD_MSGPACK: dict[str, bytes] = {
    "empty": b"",
    "reserved byte": b"\xc1",
    "truncated array": b"\x93\xcb",
    "trailing bytes": enc([1.0, [], 0]) + b"\x00",
    "top-level map": enc({"ts": 1.0, "events": []}),
    "top-level int": enc(5),
    "one element": enc([1.0]),
    "ts str": enc(["1", [], 0]),
    "ts nil": enc([None, [], 0]),
    "ts bool": enc([True, [], 0]),
    "events map": enc([1.0, {}, 0]),
    "events nil": enc([1.0, None, 0]),
    "event int": enc([1.0, [5], 0]),
    "event str": enc([1.0, ["BlockStored"], 0]),
    "unknown tag map": enc([1.0, [{"type": "BlockEvicted", "block_hashes": [1]}], 0]),
    "unknown tag array": enc([1.0, [["BlockEvicted", [1]]], 0]),
    "tag not str": enc([1.0, [{"type": 1}], 0]),
    "no tag": enc([1.0, [{"block_hashes": [1]}], 0]),
    "empty array event": enc([1.0, [[]], 0]),
    "missing token_ids": enc(
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "parent_block_hash": None,
                    "block_size": 16,
                }
            ],
            0,
        ]
    ),
    "missing parent": enc(
        [1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [], "block_size": 16}], 0]
    ),
    "removed missing hashes": enc([1.0, [{"type": "BlockRemoved"}], 0]),
    "positional too short": enc([1.0, [["BlockStored", [1], None, [1]]], 0]),
    "positional removed hashes str": enc([1.0, [["BlockRemoved", "x"]], 0]),
    "token negative": with_event(token_ids=[1, -1]),
    "token over u32": with_event(token_ids=[2**32]),
    "token float": with_event(token_ids=[1.0]),
    "token str": with_event(token_ids=["1"]),
    "token bool": with_event(token_ids=[True]),
    "token_ids nil": with_event(token_ids=None),
    "block_size 0": with_event(block_size=0),
    "block_size negative": with_event(block_size=-16),
    "block_size nil": with_event(block_size=None),
    "hash str": with_event(block_hashes=["1"]),
    "hash float": with_event(block_hashes=[1.0]),
    "hash nil": with_event(block_hashes=[None]),
    "hash bool": with_event(block_hashes=[True]),
    "hashes not a list": with_event(block_hashes=1),
    "digest 8 bytes": with_event(block_hashes=[b"\x00" * 8]),
    "digest 20 bytes": with_event(block_hashes=[b"\x00" * 20]),
    "digest empty": with_event(block_hashes=[7, b""]),
    "parent digest 31 bytes": with_event(parent_block_hash=b"\x00" * 31),
    "parent str": with_event(parent_block_hash="x"),
    "unknown medium": with_event(medium="TPU"),
    "lowercase medium": with_event(medium="gpu"),
    "medium int": with_event(medium=1),
    "lora_name int": with_event(lora_name=1),
    "lora_id str": with_event(lora_id="7"),
    "session_id int": with_event(session_id=5),
    "cache_salt bytes": with_event(cache_salt=b"x"),
    "group_idx negative": with_event(group_idx=-1),
    "extra_keys int": with_event(extra_keys=5),
    "extra_keys entry str": with_event(extra_keys=["x"]),
    "extra_keys holds a map": with_event(extra_keys=[[{"a": 1}]]),
    "extra_keys holds an ext": with_event(extra_keys=[[msgspec.msgpack.Ext(1, b"x")]]),
    "extra_keys nest too deeply": with_event(extra_keys=[[[[[[[[[[1]]]]]]]]]]),
    "removed unknown medium": enc(
        [1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": "HBM"}], 0]
    ),
    "dp_rank negative": enc([1.0, [], -1]),
    "dp_rank over u32": enc([1.0, [], 2**32]),
    "dp_rank str": enc([1.0, [], "0"]),
    "deep nesting": b"\x93\xcb" + b"\x00" * 8 + b"\x91" * 5000 + b"\xc0" + b"\x00",
    "deep event nesting": b"\x93\xcb"
    + b"\x00" * 8
    + b"\x91\x92\xabBlockStored"
    + b"\x91" * 5000
    + b"\xc0"
    + b"\x00",
    "array32 header beyond the data": b"\x93\xcb" + b"\x00" * 8 + b"\xdd\xff\xff\xff\xff\x00",
}


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
@pytest.mark.parametrize("case", list(BAD_MSGPACK))
def test_malformed_msgpack_raises_decode_error(fmt: str, case: str) -> None:
    with pytest.raises(DecodeError):
        MSGPACK_DECODERS[fmt](BAD_MSGPACK[case])


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_unknown_map_keys_and_trailing_batch_fields_are_ignored(fmt: str) -> None:
    ev = sglang_stored(
        kv_cache_spec_kind="full_attention", locality={"a": [1]}, lookahead_token_ids=[1]
    )
    got = MSGPACK_DECODERS[fmt](enc([1.0, [ev], 0, "future"]))
    assert got.dp_rank == 0 and isinstance(got.events[0], BlockStored)


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
@pytest.mark.parametrize("payload", ["text", None, 5, [1.0, [], 0]])
def test_non_bytes_payload_is_a_type_error(fmt: str, payload: Any) -> None:
    with pytest.raises(TypeError):
        MSGPACK_DECODERS[fmt](payload)


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_bytearray_and_memoryview_payloads(fmt: str) -> None:
    payload = with_event()
    want = MSGPACK_DECODERS[fmt](payload)
    assert MSGPACK_DECODERS[fmt](bytearray(payload)) == want
    assert MSGPACK_DECODERS[fmt](memoryview(payload)) == want


# --- size limits ---------------------------------------------------------------------


def test_default_limits() -> None:
    assert DEFAULT_MAX_EVENTS == 1 << 16
    assert DEFAULT_MAX_TOKENS == 1 << 22


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
@pytest.mark.parametrize("positional", [False, True], ids=["map", "positional"])
def test_max_events(fmt: str, positional: bool) -> None:
    cleared: Any = ["AllBlocksCleared"] if positional else {"type": "AllBlocksCleared"}
    payload = enc([1.0, [cleared] * 3, 0])
    assert len(MSGPACK_DECODERS[fmt](payload, max_events=3).events) == 3
    with pytest.raises(DecodeError, match="max_events"):
        MSGPACK_DECODERS[fmt](payload, max_events=2)


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_max_tokens_bounds_token_ids_and_block_hashes(fmt: str) -> None:
    decoder = MSGPACK_DECODERS[fmt]
    two = enc([1.0, [sglang_stored(), sglang_stored()], 0])  # 80 token ids, 4 hashes
    assert len(decoder(two, max_tokens=80).events) == 2
    with pytest.raises(DecodeError, match="max_tokens"):
        decoder(two, max_tokens=79)
    removals = enc([1.0, [{"type": "BlockRemoved", "block_hashes": [1, 2, 3]}] * 2, 0])
    assert len(decoder(removals, max_tokens=6).events) == 2
    with pytest.raises(DecodeError, match="max_tokens"):
        decoder(removals, max_tokens=5)


# --- Dynamo 1.6.1 ---------------------------------------------------------------------


def dynamo_cases() -> list[tuple[str, str]]:
    """(event_json, Dynamo's result) of every trace step and schema probe."""
    tree = dynamo_tree()
    cases = [(t["event_json"], t["result"]) for t in tree["trace"] if "event_json" in t]
    cases += [(p["event_json"], p["result"]) for p in tree["schema_probes"]]
    return cases


def check_dynamo(got: EventBatch, obj: dict[str, Any]) -> None:
    assert got.ts is None
    assert got.event_id == obj["event_id"]
    assert got.dp_rank == obj.get("dp_rank")
    (ev,) = got.events
    data = obj["data"]
    if data == "cleared" or data == {"cleared": None}:
        assert ev == AllBlocksCleared()
    elif "stored" in data:
        stored = data["stored"]
        assert ev == BlockStored(
            block_hashes=tuple(b["block_hash"] for b in stored["blocks"]),
            parent_block_hash=stored.get("parent_hash"),
            token_ids=(),
            tokens_hashes=tuple(b["tokens_hash"] for b in stored["blocks"]),
        )
    else:
        assert ev == BlockRemoved(block_hashes=tuple(data["removed"]["block_hashes"]))


@pytest.mark.parametrize(("event_json", "result"), dynamo_cases())
def test_dynamo_accepts_and_rejects_as_upstream(event_json: str, result: str) -> None:
    if result.startswith("ValueError: Failed to deserialize"):
        for data in (event_json, event_json.encode()):
            with pytest.raises(DecodeError):
                decode_dynamo_json(data)
        return
    # "ok", or a RuntimeError about the tree (unknown parent / block): the JSON
    # itself was accepted, so it must decode.
    assert result == "ok" or result.startswith("RuntimeError: Failed to apply event")
    obj = json.loads(event_json)
    for data in (event_json, event_json.encode(), obj):
        check_dynamo(decode_dynamo_json(data), obj)


def test_dynamo_probe_dumps_match_the_decoded_store() -> None:
    for probe in dynamo_tree()["schema_probes"]:
        if probe["result"] != "ok":
            continue
        (ev,) = decode_dynamo_json(probe["event_json"]).events
        (dumped,) = probe["dump"]
        stored = dumped["event"]["data"]["stored"]
        assert isinstance(ev, BlockStored)
        assert ev.parent_block_hash == stored["parent_hash"]
        assert ev.block_hashes == tuple(b["block_hash"] for b in stored["blocks"])
        assert ev.tokens_hashes == tuple(b["tokens_hash"] for b in stored["blocks"])


def dyn(data: Any, **top: Any) -> str:
    return json.dumps({"event_id": 1, "data": data, **top})


def stored_json(parent: Any = None, blocks: Any = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "parent_hash": parent,
        "blocks": [{"block_hash": 5, "tokens_hash": 7}] if blocks is None else blocks,
    }
    body.update(extra)
    return {"stored": body}


GOOD_DYNAMO: dict[str, str] = {
    "cleared string": dyn("cleared"),
    "cleared null": dyn({"cleared": None}),
    "dp_rank max u32": dyn("cleared", dp_rank=U32_MAX),
    "event_id max u64": json.dumps({"event_id": U64_MAX, "data": "cleared"}),
    "parent omitted": dyn({"stored": {"blocks": []}}),
    "parent max u64": dyn(stored_json(parent=U64_MAX)),
    "empty blocks": dyn(stored_json(blocks=[])),
    "start_position and mm_extra_info": dyn(
        stored_json(
            start_position=3,
            blocks=[{"block_hash": 5, "tokens_hash": 7, "mm_extra_info": {"mm_objects": []}}],
        )
    ),
    "mm_extra_info null": dyn(
        stored_json(blocks=[{"block_hash": 5, "tokens_hash": 7, "mm_extra_info": None}])
    ),
    "unknown fields": dyn(stored_json(future=[1, {"x": None}]), future=True, worker_id="w"),
    "removed empty": dyn({"removed": {"block_hashes": []}}),
    "duplicate unknown field": '{"event_id": 1, "x": 1, "x": 2, "data": "cleared"}',
    "whitespace": '  {"event_id" : 1 ,\n "data" : "cleared" }  ',
}

BAD_DYNAMO: dict[str, str | bytes] = {
    "empty": "",
    "not json": "{event_id: 1}",
    "top-level array": "[1, 2]",
    "top-level string": '"cleared"',
    "top-level null": "null",
    "event_id negative": json.dumps({"event_id": -1, "data": "cleared"}),
    "event_id over u64": json.dumps({"event_id": 2**64, "data": "cleared"}),
    "event_id float": '{"event_id": 1.0, "data": "cleared"}',
    "event_id exponent": '{"event_id": 1e3, "data": "cleared"}',
    "event_id bool": '{"event_id": true, "data": "cleared"}',
    "event_id string": '{"event_id": "1", "data": "cleared"}',
    "event_id null": '{"event_id": null, "data": "cleared"}',
    "dp_rank null": dyn("cleared", dp_rank=None),
    "dp_rank negative": dyn("cleared", dp_rank=-1),
    "dp_rank over u32": dyn("cleared", dp_rank=2**32),
    "data null": dyn(None),
    "data unknown string": dyn("wiped"),
    "data stored as string": dyn("stored"),
    "data removed as string": dyn("removed"),
    "data empty object": dyn({}),
    "data two variants": dyn({"cleared": None, "removed": {"block_hashes": []}}),
    "data unknown variant": dyn({"evicted": {"block_hashes": [1]}}),
    "data array": dyn(["cleared"]),
    "cleared with a body": dyn({"cleared": {}}),
    "cleared with true": dyn({"cleared": True}),
    "stored null": dyn({"stored": None}),
    "stored missing blocks": dyn({"stored": {"parent_hash": None}}),
    "stored blocks null": dyn({"stored": {"blocks": None}}),
    "stored blocks object": dyn({"stored": {"blocks": {"block_hash": 5, "tokens_hash": 7}}}),
    "block not an object": dyn(stored_json(blocks=[5])),
    "block missing block_hash": dyn(stored_json(blocks=[{"tokens_hash": 7}])),
    "block negative block_hash": dyn(stored_json(blocks=[{"block_hash": -5, "tokens_hash": 7}])),
    "block over-u64 block_hash": dyn(stored_json(blocks=[{"block_hash": 2**64, "tokens_hash": 7}])),
    "block negative tokens_hash": dyn(stored_json(blocks=[{"block_hash": 5, "tokens_hash": -7}])),
    "block float tokens_hash": (
        '{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":5,"tokens_hash":7.0}]}}}'
    ),
    "block hash string": dyn(stored_json(blocks=[{"block_hash": "5", "tokens_hash": 7}])),
    "block mm_extra_info list": dyn(
        stored_json(blocks=[{"block_hash": 5, "tokens_hash": 7, "mm_extra_info": []}])
    ),
    "parent negative": dyn(stored_json(parent=-1)),
    "parent over u64": dyn(stored_json(parent=2**64)),
    "parent string": dyn(stored_json(parent="1")),
    "start_position negative": dyn(stored_json(start_position=-1)),
    "removed null": dyn({"removed": None}),
    "removed missing hashes": dyn({"removed": {}}),
    "removed negative hash": dyn({"removed": {"block_hashes": [1, -2]}}),
    "removed hash null": dyn({"removed": {"block_hashes": [None]}}),
    "removed hashes not a list": dyn({"removed": {"block_hashes": 5}}),
    "duplicate event_id": '{"event_id": 1, "event_id": 2, "data": "cleared"}',
    "duplicate data variant": '{"event_id": 1, "data": {"cleared": null, "cleared": null}}',
    "duplicate blocks": '{"event_id":1,"data":{"stored":{"blocks":[],"blocks":[]}}}',
    "NaN": '{"event_id": 1, "data": "cleared", "x": NaN}',
    "Infinity": '{"event_id": Infinity, "data": "cleared"}',
    "trailing garbage": dyn("cleared") + " x",
    "invalid utf-8": b'{"event_id": 1, "data": "cleared", "x": "\xff"}',
    "deep nesting": '{"event_id": 1, "data": "cleared", "x": '
    + "[" * 100_000
    + "]" * 100_000
    + "}",
    "huge integer": '{"event_id": ' + "9" * 5000 + ', "data": "cleared"}',
}


@pytest.mark.parametrize("case", list(GOOD_DYNAMO))
def test_dynamo_edge_cases_accepted(case: str) -> None:
    got = decode_dynamo_json(GOOD_DYNAMO[case])
    assert len(got.events) == 1


@pytest.mark.parametrize("case", list(BAD_DYNAMO))
def test_dynamo_edge_cases_rejected(case: str) -> None:
    with pytest.raises(DecodeError):
        decode_dynamo_json(BAD_DYNAMO[case])


def test_dynamo_absent_dp_rank_is_none() -> None:
    got = decode_dynamo_json(dyn("cleared"))
    assert got == EventBatch(ts=None, events=(AllBlocksCleared(),), dp_rank=None, event_id=1)


def test_dynamo_parsed_objects_are_validated_too() -> None:
    assert decode_dynamo_json({"event_id": 2, "data": "cleared"}).event_id == 2
    for obj in (
        {"event_id": True, "data": "cleared"},
        {"event_id": 1.0, "data": "cleared"},
        {"event_id": 1, "data": {"removed": {"block_hashes": [-1]}}},
        {"event_id": 1},
    ):
        with pytest.raises(DecodeError):
            decode_dynamo_json(obj)


@pytest.mark.parametrize("data", [None, 5, 1.5, [1], ("cleared",)])
def test_dynamo_wrong_python_type_is_a_type_error(data: Any) -> None:
    with pytest.raises(TypeError):
        decode_dynamo_json(data)


def test_dynamo_max_tokens_bounds_blocks_and_removals() -> None:
    blocks = [{"block_hash": i, "tokens_hash": i} for i in range(4)]
    assert len(decode_dynamo_json(dyn(stored_json(blocks=blocks)), max_tokens=4).events) == 1
    with pytest.raises(DecodeError, match="max_tokens"):
        decode_dynamo_json(dyn(stored_json(blocks=blocks)), max_tokens=3)
    with pytest.raises(DecodeError, match="max_tokens"):
        decode_dynamo_json(dyn({"removed": {"block_hashes": [1, 2, 3, 4]}}), max_tokens=3)


# --- dispatch, module surface -------------------------------------------------------------


def test_formats_and_dispatch() -> None:
    assert FORMATS == ("vllm", "sglang", "dynamo")
    vpayload = bytes.fromhex(vllm_batch("stored_lora_salt")["payload_hex"])
    spayload = bytes.fromhex(sglang_batches()[1]["payload_hex"])
    djson = dynamo_cases()[0][0]
    assert decode(vpayload, "vllm") == decode_vllm(vpayload)
    assert decode(spayload, "sglang") == decode_sglang(spayload)
    assert decode(djson, "dynamo") == decode_dynamo_json(djson)
    with pytest.raises(DecodeError, match="max_events"):
        decode(enc([1.0, [["AllBlocksCleared"]] * 2, 0]), "sglang", max_events=1)


@pytest.mark.parametrize("fmt", ["VLLM", "tgi", "", None, ["vllm"]])
def test_unknown_format_is_a_plain_value_error(fmt: Any) -> None:
    with pytest.raises(ValueError, match="unknown format") as info:
        decode(b"", fmt)
    assert not isinstance(info.value, DecodeError)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations a test makes are undone after it."""
    monkeypatch.setattr(D, "_REGISTRY", dict(D._REGISTRY))


@pytest.mark.usefixtures("registry")
def test_a_registered_decoder_is_found_by_name() -> None:
    calls: list[tuple[object, int, int]] = []

    def decode_upper(payload: Any, *, max_events: int, max_tokens: int) -> EventBatch:
        calls.append((payload, max_events, max_tokens))
        return EventBatch(ts=None, events=(AllBlocksCleared(),))

    register_decoder("test-upper", decode_upper)
    assert get_decoder("test-upper") is decode_upper
    assert decode(b"x", "test-upper", max_events=3, max_tokens=5).events == (AllBlocksCleared(),)
    assert calls == [(b"x", 3, 5)]
    assert "test-upper" in available_formats() and "test-upper" in available_formats(zmq=True)
    assert "test-upper" not in available_formats(zmq=False)
    with pytest.raises(ValueError, match="already registered"):
        register_decoder("test-upper", decode_upper)
    register_decoder("test-upper", decode_vllm, zmq=False, replace=True)
    assert get_decoder("test-upper") is decode_vllm
    assert available_formats(zmq=False) == ["dynamo", "test-upper"]


def test_the_built_in_formats_are_registered() -> None:
    assert {f: get_decoder(f) for f in FORMATS} == {
        "vllm": decode_vllm,
        "sglang": decode_sglang,
        "dynamo": decode_dynamo_json,
    }
    assert {"vllm", "sglang"} <= set(available_formats(zmq=True))
    assert "dynamo" in available_formats(zmq=False)


@pytest.mark.parametrize(
    ("name", "decoder", "error"),
    [("", decode_vllm, TypeError), (None, decode_vllm, TypeError), ("x", "nope", TypeError)],
)
def test_register_decoder_rejects_bad_arguments(name: Any, decoder: Any, error: type) -> None:
    with pytest.raises(error):
        register_decoder(name, decoder)


def test_an_unknown_format_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"registered: .*dynamo.*vllm"):
        get_decoder("tgi")


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)


def test_docstring_examples() -> None:
    result = doctest.testmod(D, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_kvroute_events_decode_stays_the_function_once_its_submodule_loads() -> None:
    # Importing the ``decode`` submodule bound it over the package's ``decode``
    # function: the documented ``kvroute.events.decode(payload, fmt)`` worked
    # once, then was a module. A fresh process: this one has long loaded it.
    code = """if True:
        import kvroute.events as e
        payload = bytes.fromhex({!r})
        assert e.decode(payload, "vllm").events == e.decode(payload, "vllm").events
        from kvroute.events import ZmqSubscriber  # loads the submodules another way
        assert e.decode(payload, "vllm").events and callable(e.decode_vllm)
    """.format(vllm_batch("stored_first_blocks")["payload_hex"])
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


# --- hypothesis -------------------------------------------------------------------------

msgpack_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64_MAX)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=40)
    | st.sampled_from(
        ["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "CPU_PINNED", "type"]
    )
)
msgpack_values = st.recursive(
    msgpack_leaves,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["type", "block_hashes", "token_ids"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


def vector_events() -> list[dict[str, Any]]:
    evs = [wire_value(ev) for b in vllm_batches() for ev in b["generic_msgpack_decode"][1]]
    evs += [ev for b in sglang_batches() for ev in b["decoded"][1]]
    return evs


def check_batch_invariants(batch: EventBatch) -> None:
    assert isinstance(batch, EventBatch)
    for ev in batch.events:
        if isinstance(ev, (BlockStored, BlockRemoved)):
            assert all(type(h) is int and 0 <= h <= U64_MAX for h in ev.block_hashes)
            assert ev.tier in ("device", "host", "disk")
        if isinstance(ev, BlockStored):
            assert all(type(t) is int and 0 <= t <= U32_MAX for t in ev.token_ids)
            hash(ev)


def decodes_or_rejects(decoder: Callable[..., EventBatch], payload: Any) -> None:
    try:
        batch = decoder(payload)
    except DecodeError:
        return
    check_batch_invariants(batch)


@given(st.binary(max_size=200))
def test_fuzz_random_bytes(payload: bytes) -> None:
    for decoder in (decode_vllm, decode_sglang, decode_dynamo_json):
        decodes_or_rejects(decoder, payload)


@given(msgpack_values)
def test_fuzz_random_msgpack_structures(value: Any) -> None:
    payload = ENCODE(value)
    for decoder in (decode_vllm, decode_sglang):
        decodes_or_rejects(decoder, payload)
        decodes_or_rejects(decoder, ENCODE([1.0, [value], 0]))
        decodes_or_rejects(decoder, ENCODE([1.0, value, None]))


@given(st.data())
def test_fuzz_near_valid_events(data: st.DataObject) -> None:
    ev = dict(data.draw(st.sampled_from(vector_events())))
    key = data.draw(st.sampled_from(sorted(ev)))
    if data.draw(st.booleans()):
        del ev[key]
    else:
        ev[key] = data.draw(msgpack_values)
    positional = [ev.get("type"), *(v for k, v in ev.items() if k != "type")]
    for decoder in (decode_vllm, decode_sglang):
        decodes_or_rejects(decoder, ENCODE([1.0, [ev], 0]))
        decodes_or_rejects(decoder, ENCODE([1.0, [positional], 0]))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["cleared", "stored", "removed"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "event_id",
                    "data",
                    "dp_rank",
                    "stored",
                    "removed",
                    "cleared",
                    "blocks",
                    "block_hash",
                    "tokens_hash",
                    "parent_hash",
                    "block_hashes",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, (*prefix, i))


@given(st.data())
def test_fuzz_dynamo_json(data: st.DataObject) -> None:
    value = data.draw(json_values)
    decodes_or_rejects(decode_dynamo_json, json.dumps(value))
    if isinstance(value, dict):
        decodes_or_rejects(decode_dynamo_json, value)
    # a real event with one value replaced
    obj = json.loads(data.draw(st.sampled_from([c for c, _ in dynamo_cases() if c != "{}"])))
    path = data.draw(st.sampled_from(list(paths(obj))[1:]))
    node = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = data.draw(json_values)
    decodes_or_rejects(decode_dynamo_json, json.dumps(obj))
    decodes_or_rejects(decode_dynamo_json, obj)


hash_values = (
    st.integers(-(2**63), U64_MAX)
    | st.binary(min_size=16, max_size=16)
    | st.binary(min_size=32, max_size=32)
)


@given(
    hashes=st.lists(hash_values, max_size=6),
    parent=st.none() | hash_values,
    tokens=st.lists(st.integers(0, U32_MAX), max_size=40),
    block_size=st.integers(1, U32_MAX),
    medium=st.sampled_from(MEDIUMS),
    lora_name=st.none() | st.text(max_size=6),
    extra_keys=st.none()
    | st.lists(
        st.none()
        | st.lists(
            st.text(max_size=4)
            | st.integers(0, 9)
            | st.tuples(st.text(max_size=3), st.integers(0, 9)),
            max_size=3,
        ),
        max_size=3,
    ),
)
def test_map_and_positional_forms_agree(
    hashes: list[int | bytes],
    parent: int | bytes | None,
    tokens: list[int],
    block_size: int,
    medium: str | None,
    lora_name: str | None,
    extra_keys: list[Any] | None,
) -> None:
    fields = {
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": None,
        "medium": medium,
        "lora_name": lora_name,
        "extra_keys": extra_keys,
        "group_idx": 0,
    }
    as_map = decode_vllm(ENCODE([1.0, [{"type": "BlockStored", **fields}], 0]))
    as_array = decode_vllm(ENCODE([1.0, [["BlockStored", *fields.values()]], 0]))
    assert as_map == as_array
    (ev,) = as_map.events
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == tuple(
        h % 2**64 if isinstance(h, int) else int.from_bytes(h[-8:], "big") for h in hashes
    )
    assert ev.token_ids == tuple(tokens)
    assert ev.tier == TIER_OF_MEDIUM[medium]

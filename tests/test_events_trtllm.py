"""TensorRT-LLM's KV events decoded: every example of tests/vectors/trtllm_events.json, and more.

The examples are not TensorRT-LLM's own output (see tests/vectors/README.md):
each is verbatim from a TensorRT-LLM or Dynamo test, assembled from a test's
assertions, or constructed from the serializer's schema. Every one is decoded
here, through the ``"trtllm"`` decoder the registry knows. What the verbatim
ones prove:

- ``stored_no_parent_minimal_dynamo_fixture`` (Dynamo's adapter test literal):
  a stored event may carry ``attention_dp_rank`` without ``window_size``, its
  blocks ``cache_salt`` per block and tokens without ``token_extra_id`` or
  ``type``, and no ``cache_level`` / ``priority`` / ``mm_keys``; kvroute takes
  the salt into the key and defaults the rest.
- ``stored_with_parent_multimodal_v2_uuid`` (Dynamo's fixture of TensorRT-LLM
  PR #19529's V2 events): a ``token_id`` may be a 64-hex digest *string*, and
  ``mm_keys`` name media with a ``uuid``; such a block is opaque: decoded,
  indexed in a namespace of its own, never matched by a text request.
- ``removed_attention_dp_rank1`` (Dynamo's dispatch test literal): a removal
  names its rank, which may be other than 0, and ``event_id`` restarts per
  rank (rank 1's event 1 follows rank 0's event 1 in one drain).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kvroute import Router
from kvroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    EventApplier,
    EventBatch,
    available_formats,
    decode,
    get_decoder,
)
from kvroute.events.trtllm import (
    BlockUpdated,
    CacheCreated,
    TrtllmBatch,
    cache_level_tier,
    decode_trtllm,
    decode_trtllm_event,
    hash_handle,
    opaque_namespace,
)
from kvroute.hashing import kvroute_block_hashes

VECTORS = Path(__file__).parent / "vectors"
DATA = json.loads((VECTORS / "trtllm_events.json").read_text())
EXAMPLES = {e["name"]: e for e in DATA["examples"]}
U64 = (1 << 64) - 1


def payloads(name: str) -> list[dict[str, Any]]:
    p = EXAMPLES[name]["payload"]
    return p if isinstance(p, list) else [p]


def tokens(block: dict[str, Any]) -> list[Any]:
    return [t["token_id"] for t in block["tokens"]]


# -- the vectors -------------------------------------------------------------------


def test_the_vectors_are_the_documented_seven_with_their_provenance() -> None:
    assert len(EXAMPLES) == 7
    kinds = {e["provenance"].split()[0].rstrip(":") for e in EXAMPLES.values()}
    assert kinds == {"verbatim", "assembled", "constructed"}
    assert all(e["source"] for e in EXAMPLES.values())


@pytest.mark.parametrize("name", sorted(n for n, e in EXAMPLES.items() if "payload" in e))
def test_every_dict_example_decodes_through_the_registry(name: str) -> None:
    for p in payloads(name):
        got = decode(p, "trtllm")
        assert isinstance(got, TrtllmBatch)
        assert got == decode_trtllm_event(p) == decode_trtllm_event(json.dumps(p))
        assert got.event_id == p["event_id"]
        assert got.dp_rank == p.get("attention_dp_rank")
        assert got.window_size == p.get("window_size")
        assert got.hash_algo == p.get("hash_algo")
        assert got.layer_group_id == p.get("layer_group_id")
        assert got.ts is None


def test_created_gives_blocks_per_cache_level() -> None:
    (p,) = payloads("created_v1_buffered")
    assert decode_trtllm_event(p).events == (CacheCreated((8, 2)),)


def test_minimal_dynamo_fixture_salted_store() -> None:
    (p,) = payloads("stored_no_parent_minimal_dynamo_fixture")
    (stored,) = decode_trtllm_event(p).events
    assert stored == BlockStored(
        block_hashes=(123,),
        parent_block_hash=None,
        token_ids=(1, 2, 3, 4),
        block_size=None,  # one block: its size says nothing about a partial one
        tier="device",
        cache_salt="tenant-a",
    )


def test_v1_text_chain_with_a_partial_last_block() -> None:
    first, second = (
        decode_trtllm_event(p) for p in payloads("stored_no_parent_then_with_parent_text_v1")
    )
    (a,) = first.events
    (b,) = second.events
    raw = payloads("stored_no_parent_then_with_parent_text_v1")
    assert a.block_hashes == tuple(blk["block_hash"] for blk in raw[0]["data"]["blocks"])
    assert a.parent_block_hash is None and a.block_size == 4
    assert b.parent_block_hash == a.block_hashes[-1]
    # 13067793127951760544 is above int64: kept as the u64 it is
    assert b.block_hashes == (13067793127951760544, 8184973572994605848)
    assert b.token_ids == tuple(range(109, 115))  # the partial block's two tokens included
    assert b.block_size == 4  # known from the first (full) block


def test_multimodal_v2_block_is_opaque() -> None:
    (p,) = payloads("stored_with_parent_multimodal_v2_uuid")
    (stored,) = decode_trtllm_event(p).events
    block = p["data"]["blocks"][0]
    digest = block["tokens"][1]["token_id"]
    assert stored.block_hashes == (101,) and stored.parent_block_hash == 77
    assert stored.token_ids == (1, 0, 1001, 1002)  # the digest token hashes as 0
    assert stored.extra_keys == (
        (f"digest:1:{digest}", f"mm:{digest}:0:{block['mm_keys'][0]['uuid']}"),
    )
    assert stored.cache_salt == opaque_namespace(None, stored.extra_keys[0])  # type: ignore[index]


def test_removal_on_rank_one() -> None:
    (p,) = payloads("removed_attention_dp_rank1")
    batch = decode_trtllm_event(p)
    assert batch.dp_rank == 1 and batch.event_id == 1
    assert batch.events == (BlockRemoved((200, 201)),)


def test_updated_cache_level_with_a_hex_hash() -> None:
    (p,) = payloads("updated_cache_level_and_priority_v2")
    (ev,) = decode_trtllm_event(p).events
    assert ev == BlockUpdated(0xABCD, cache_level=(0, 1), priority=(1, 2))
    assert ev.tiers == ("device", "host")


def test_streaming_example_decodes_as_a_zmq_payload() -> None:
    ex = EXAMPLES["streaming_zmq_batch_decoded"]
    payload = msgspec.msgpack.encode(ex["payload_decoded"])
    assert "trtllm" in available_formats(zmq=True)
    batch = decode(payload, "trtllm")
    assert type(batch) is EventBatch
    ts, (event,), rank = ex["payload_decoded"]
    assert batch.ts == ts and batch.dp_rank == rank and batch.event_id is None
    (stored,) = batch.events
    assert stored == BlockStored(
        block_hashes=tuple(event["block_hashes"]),
        parent_block_hash=None,
        token_ids=tuple(event["token_ids"]),
        block_size=4,
        tier="device",
        medium="GPU",
    )


def test_every_example_applies_to_a_router_without_rejection() -> None:
    # The shapes reach the index: nothing the applier refuses.
    router = Router(block_size=4, workers=[0])
    ap = EventApplier(router)
    for name, ex in EXAMPLES.items():
        if "payload" in ex:
            batches = [decode_trtllm_event(p) for p in payloads(name)]
        else:
            batches = [decode_trtllm(msgspec.msgpack.encode(ex["payload_decoded"]))]
        for b in batches:
            for ev in b.events:
                if isinstance(ev, (BlockStored, BlockRemoved, AllBlocksCleared)):
                    assert ap.apply(0, ev) != "rejected", (name, ev)


# -- hashes and tiers ----------------------------------------------------------------


def test_a_hex_sha256_handle_is_the_value_v2_sha256_64_publishes() -> None:
    digest = bytes(range(32))
    assert hash_handle(digest.hex()) == int.from_bytes(digest[:8], "big")
    assert hash_handle(digest.hex().upper()) == hash_handle(digest.hex())
    assert hash_handle(-5) == (1 << 64) - 5 and hash_handle(U64) == U64


@pytest.mark.parametrize("bad", [True, 1.5, None, [], "", "xyz", "abc", 1 << 64, -(1 << 63) - 1])
def test_bad_hashes_are_decode_errors(bad: Any) -> None:
    with pytest.raises(DecodeError):
        hash_handle(bad)


def test_cache_levels_map_to_tiers() -> None:
    assert [cache_level_tier(n) for n in range(5)] == ["device", "host", "disk", "disk", "disk"]
    with pytest.raises(ValueError):
        cache_level_tier(-1)


# -- the dict shape, beyond the examples ---------------------------------------------


def stored_event(blocks: list[dict[str, Any]], **data: Any) -> dict[str, Any]:
    return {
        "event_id": 0,
        "data": {"type": "stored", "parent_hash": None, "blocks": blocks, **data},
    }


def block(h: Any, toks: list[Any], **kw: Any) -> dict[str, Any]:
    return {"block_hash": h, "tokens": [{"token_id": t, "token_extra_id": 0} for t in toks], **kw}


def test_blocks_split_into_runs_by_tier_and_salt() -> None:
    ev = stored_event(
        [
            block(1, [1, 2], cache_level=0, cache_salt="a"),
            block(2, [3, 4], cache_level=0, cache_salt="a"),
            block(3, [5, 6], cache_level=1, cache_salt="a"),
            block(4, [7], cache_level=1, cache_salt="a"),
        ]
    )
    runs = decode_trtllm_event(ev).events
    assert [(r.block_hashes, r.parent_block_hash, r.tier) for r in runs] == [  # type: ignore[union-attr]
        ((1, 2), None, "device"),
        ((3, 4), 2, "host"),
    ]
    assert all(r.block_size == 2 and r.cache_salt == "a" for r in runs)  # type: ignore[union-attr]


def test_data_level_salt_is_the_fallback() -> None:
    ev = stored_event([block(1, [1, 2]), block(2, [3, 4], cache_salt="b")], cache_salt="a")
    a, b = decode_trtllm_event(ev).events
    assert (a.cache_salt, b.cache_salt) == ("a", "b")  # type: ignore[union-attr]


def test_a_nonzero_token_extra_id_makes_a_block_opaque() -> None:
    blk = block(1, [1, 2])
    blk["tokens"][1]["token_extra_id"] = 77
    (a,) = decode_trtllm_event(stored_event([blk])).events
    (b,) = decode_trtllm_event(stored_event([block(1, [1, 2])])).events
    assert a.token_ids == b.token_ids  # type: ignore[union-attr]
    assert a.cache_salt is not None and a.cache_salt.startswith("trtllm-opaque:")  # type: ignore[union-attr]
    assert b.cache_salt is None  # type: ignore[union-attr]


def test_opaque_blocks_never_match_text_but_agree_with_each_other() -> None:
    digest = "ab" * 32
    mm = [{"type": "mm_key", "hash": digest, "start_offset": 0, "uuid": "00" * 8}]
    text = stored_event([block(1, [5, 6]), block(2, [7, 8])])
    media = stored_event([block(1, [5, 6]), block(3, [digest, 8], mm_keys=mm), block(4, [9, 9])])
    r = Router(block_size=2, workers=[0, 1])
    ap = EventApplier(r)
    for w, ev in ((0, text), (1, media)):
        for e in decode_trtllm_event(ev).events:
            assert ap.apply(w, e) == "ok"  # type: ignore[arg-type]
    assert r.index.worker_len(1) == 3  # indexed: their removals resolve
    # A text request sharing the first block matches it on both, and no further on 1.
    assert r.index.match(kvroute_block_hashes([5, 6, 0, 8, 9, 9], 2)) == {0: 1, 1: 1}
    # The same media event again (another rank, say) gives the same keys.
    ap.apply(0, BlockRemoved((1, 2)))
    for e in decode_trtllm_event(media).events:
        ap.apply(0, e)  # type: ignore[arg-type]
    assert r.index.resolve(0, 4) == r.index.resolve(1, 4) is not None


def test_a_lora_id_without_a_name_is_opaque_and_a_name_is_keyed() -> None:
    named = decode_trtllm_event(stored_event([block(1, [1, 2])], lora_name="sql", lora_id=3))
    (n,) = named.events
    assert n.lora_name == "sql" and n.cache_salt is None  # type: ignore[union-attr]
    (o,) = decode_trtllm_event(stored_event([block(1, [1, 2])], lora_id=3)).events
    assert o.cache_salt == opaque_namespace(None, ("lora_id:3",))  # type: ignore[union-attr]
    (z,) = decode_trtllm_event(stored_event([block(1, [1, 2])], lora_id=0)).events
    assert z.cache_salt is None  # type: ignore[union-attr]


def test_updated_may_change_priority_only() -> None:
    ev = {
        "event_id": 3,
        "data": {
            "type": "updated",
            "block_hash": 9,
            "cache_level": None,
            "priority": {"type": "event_diff", "old_value": 35, "new_value": 90},
        },
    }
    (u,) = decode_trtllm_event(ev).events
    assert u == BlockUpdated(9, None, (35, 90)) and u.tiers is None


def test_all_cleared_is_a_clear() -> None:
    ev = {"event_id": 4, "attention_dp_rank": 0, "data": {"type": "all_cleared"}}
    assert decode_trtllm_event(ev).events == (AllBlocksCleared(),)


BAD_EVENTS: list[tuple[str, Any]] = [
    ("not an object", "[1, 2]"),
    ("a JSON string", '"stored"'),
    ("no event_id", {"data": {"type": "removed", "block_hashes": []}}),
    ("negative event_id", {"event_id": -1, "data": {"type": "removed", "block_hashes": []}}),
    ("bool event_id", {"event_id": True, "data": {"type": "removed", "block_hashes": []}}),
    ("no data", {"event_id": 0}),
    ("unknown type", {"event_id": 0, "data": {"type": "evicted"}}),
    ("removed not a list", {"event_id": 0, "data": {"type": "removed", "block_hashes": 5}}),
    (
        "bad window",
        {"event_id": 0, "window_size": "big", "data": {"type": "removed", "block_hashes": []}},
    ),
    (
        "bad rank",
        {"event_id": 0, "attention_dp_rank": -1, "data": {"type": "removed", "block_hashes": []}},
    ),
    (
        "bad hash_algo",
        {"event_id": 0, "hash_algo": 3, "data": {"type": "removed", "block_hashes": []}},
    ),
    ("token over u32", stored_event([block(1, [1 << 32])])),
    ("token a float", stored_event([block(1, [1.0])])),
    ("token not hex", stored_event([block(1, ["zz"])])),
    ("block without tokens", stored_event([block(1, [])])),
    ("middle block short", stored_event([block(1, [1, 2]), block(2, [3]), block(3, [4, 5])])),
    ("last block long", stored_event([block(1, [1, 2]), block(2, [3, 4, 5])])),
    ("negative cache level", stored_event([block(1, [1], cache_level=-1)])),
    ("salt not a string", stored_event([block(1, [1], cache_salt=5)])),
    ("bad mm_keys", stored_event([block(1, [1], mm_keys=[{"start_offset": 0}])])),
    ("updated without hash", {"event_id": 0, "data": {"type": "updated", "cache_level": None}}),
    (
        "updated diff a string",
        {
            "event_id": 0,
            "data": {
                "type": "updated",
                "block_hash": 1,
                "cache_level": {"old_value": "0", "new_value": 1},
            },
        },
    ),
    (
        "created levels not ints",
        {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [1.5]}},
    ),
]


@pytest.mark.parametrize(("what", "event"), BAD_EVENTS, ids=[w for w, _ in BAD_EVENTS])
def test_malformed_dict_events_are_decode_errors(what: str, event: Any) -> None:
    with pytest.raises(DecodeError, match="trtllm"):
        decode_trtllm_event(event)
    if not isinstance(event, str):
        with pytest.raises(DecodeError):
            decode_trtllm_event(json.dumps(event).encode())


@pytest.mark.parametrize("text", [b"\xff\xfe", b"{", b'{"event_id": NaN}', "[]"])
def test_bad_json_is_a_decode_error(text: Any) -> None:
    with pytest.raises(DecodeError):
        decode_trtllm_event(text)


@pytest.mark.parametrize("payload", [12, None, [{"event_id": 0}]])
def test_a_payload_of_the_wrong_type_is_a_type_error(payload: Any) -> None:
    with pytest.raises(TypeError):
        decode_trtllm(payload)


def test_limits_hold_per_event() -> None:
    ev = stored_event([block(i, [1, 2]) for i in range(4)])
    assert len(decode_trtllm_event(ev, max_tokens=8).events[0].block_hashes) == 4  # type: ignore[union-attr]
    with pytest.raises(DecodeError, match="max_tokens"):
        decode_trtllm_event(ev, max_tokens=7)
    with pytest.raises(DecodeError, match="max_tokens"):
        decode_trtllm_event(
            {"event_id": 0, "data": {"type": "removed", "block_hashes": [1, 2, 3]}}, max_tokens=2
        )
    with pytest.raises(DecodeError, match="max_events"):
        decode_trtllm_event(ev, max_events=0)


# -- the streaming shape, beyond the example -----------------------------------------


def wire(events: list[dict[str, Any]], rank: Any = 0) -> bytes:
    return msgspec.msgpack.encode([1.0, events, rank])


def wire_stored(hashes: list[Any], toks: list[Any], **kw: Any) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": kw.pop("parent", None),
        "token_ids": toks,
        "block_size": kw.pop("block_size", 2),
        "lora_id": kw.pop("lora_id", None),
        "medium": "GPU",
        "lora_name": kw.pop("lora_name", None),
        **kw,
    }


def test_streamed_signed_hashes_removals_and_clears() -> None:
    batch = decode_trtllm(
        wire(
            [
                wire_stored([-1, 5], [1, 2, 3, 4], parent=-7),
                {"type": "BlockRemoved", "block_hashes": [-1], "medium": "GPU"},
                {"type": "AllBlocksCleared"},
            ],
            rank=2,
        )
    )
    stored, removed, cleared = batch.events
    assert stored.block_hashes == (U64, 5) and stored.parent_block_hash == U64 - 6  # type: ignore[union-attr]
    assert removed == BlockRemoved((U64,), tier="device", medium="GPU")
    assert cleared == AllBlocksCleared() and batch.dp_rank == 2


def test_streamed_multimodal_keys_align_with_blocks() -> None:
    digest = "cd" * 32
    mm = [[], [{"type": "mm_key", "hash": digest, "start_offset": 0}]]
    (text, media) = decode_trtllm(wire([wire_stored([1, 2], [1, 2, digest, 4], mm_keys=mm)])).events
    assert text.block_hashes == (1,) and text.cache_salt is None  # type: ignore[union-attr]
    assert media.block_hashes == (2,) and media.parent_block_hash == 1  # type: ignore[union-attr]
    assert media.token_ids == (0, 4) and media.cache_salt.startswith("trtllm-opaque:")  # type: ignore[union-attr]


def test_streamed_lora_id_makes_the_event_opaque() -> None:
    (ev,) = decode_trtllm(wire([wire_stored([1], [1, 2], lora_id=7)])).events
    assert ev.lora_id == 7 and ev.cache_salt == opaque_namespace(None, ("lora_id:7",))  # type: ignore[union-attr]


BAD_WIRE: list[tuple[str, bytes]] = [
    ("not msgpack", b"\x92\xc1"),
    ("short batch", msgspec.msgpack.encode([1.0])),
    ("unknown tag", wire([{"type": "BlockEvicted", "block_hashes": []}])),
    ("tokens short", wire([wire_stored([1, 2], [1, 2, 3])])),
    ("mm_keys misaligned", wire([wire_stored([1], [1, 2], mm_keys=[[], []])])),
    ("unknown medium", wire([{"type": "BlockRemoved", "block_hashes": [1], "medium": "NVME"}])),
    ("block size 0", wire([wire_stored([], [], block_size=0)])),
    ("negative rank", wire([], rank=-1)),
    ("hash a float", wire([{"type": "BlockRemoved", "block_hashes": [1.5], "medium": None}])),
]


@pytest.mark.parametrize(("what", "payload"), BAD_WIRE, ids=[w for w, _ in BAD_WIRE])
def test_malformed_streamed_batches_are_decode_errors(what: str, payload: bytes) -> None:
    with pytest.raises(DecodeError, match="trtllm"):
        decode_trtllm(payload)


def test_streamed_limits() -> None:
    payload = wire([wire_stored([1, 2], [1, 2, 3, 4]), {"type": "AllBlocksCleared"}])
    with pytest.raises(DecodeError, match="max_events"):
        decode_trtllm(payload, max_events=1)
    with pytest.raises(DecodeError, match="max_tokens"):
        decode_trtllm(payload, max_tokens=3)
    assert len(decode_trtllm(payload, max_events=2, max_tokens=4).events) == 2


def test_the_registry_serves_trtllm_for_both_shapes() -> None:
    assert get_decoder("trtllm") is decode_trtllm
    created = {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [1]}}
    assert decode(json.dumps(created), "trtllm").events == (CacheCreated((1,)),)
    assert decode(wire([]), "trtllm") == EventBatch(1.0, (), 0)

"""EventApplier: decoded engine events into a Router's index, keyed by kvroute's hash.

The events come from the ground-truth vectors (real vLLM 0.33, SGLang 0.5.23
and Dynamo 1.6.1 output, see tests/vectors/README.md), built here from their
documented fields so these tests do not depend on the wire decoders; the
decoder tests pin the decoding itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kvroute import Request, Router
from kvroute.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventApplier,
    EventBatch,
)
from kvroute.events.engine_hashes import VllmLoRA, vllm_block_hashes
from kvroute.events.metrics import Metrics
from kvroute.hashing import kvroute_block_hashes

VECTORS = Path(__file__).parent / "vectors"
BASE: list[int] = json.loads((VECTORS / "token_sequences.json").read_text())["base"]
VLLM = {b["name"]: b for b in json.loads((VECTORS / "vllm_kv_events.json").read_text())["batches"]}
SGLANG = {
    b["name"]: b for b in json.loads((VECTORS / "sglang_vectors.json").read_text())["event_batches"]
}
DYNAMO = json.loads((VECTORS / "dynamo_vectors.json").read_text())["radix_tree"]

MASK = (1 << 64) - 1


def _u64(h: Any) -> int:
    if isinstance(h, dict):  # a raw digest: vLLM publishes its last 8 bytes big-endian
        return int.from_bytes(bytes.fromhex(h["bytes_hex"])[-8:], "big")
    return int(h) & MASK


def _event(d: dict[str, Any]) -> Any:
    """An event of the vectors' ``decoded`` form, as the decoders produce it."""
    kind = d["type"]
    tier = {None: "device", "GPU": "device", "CPU_PINNED": "host"}[d.get("medium")]
    if kind == "BlockStored":
        parent = d["parent_block_hash"]
        extra = d.get("extra_keys")
        salt = d.get("cache_salt")
        if salt is None and extra and extra[0] and d.get("lora_name") is not None:
            salt = extra[0][-1] if len(extra[0]) > 1 else None
        return BlockStored(
            block_hashes=tuple(_u64(h) for h in d["block_hashes"]),
            parent_block_hash=None if parent is None else _u64(parent),
            token_ids=tuple(d["token_ids"]),
            block_size=d["block_size"],
            tier=tier,
            medium=d.get("medium"),
            lora_name=d.get("lora_name"),
            cache_salt=salt,
            group_idx=d.get("group_idx"),
        )
    if kind == "BlockRemoved":
        return BlockRemoved(tuple(_u64(h) for h in d["block_hashes"]), tier=tier)
    assert kind == "AllBlocksCleared"
    return AllBlocksCleared()


def vllm_batch(name: str) -> EventBatch:
    dec = VLLM[name]["decoded"]
    return EventBatch(dec["ts"], tuple(_event(e) for e in dec["events"]), dec["data_parallel_rank"])


def sglang_batch(name: str) -> EventBatch:
    ts, events, rank = SGLANG[name]["decoded"]
    return EventBatch(ts, tuple(_event(e) for e in events), rank)


@pytest.fixture
def router() -> Router:
    return Router(block_size=16, workers=[0, 1])


def overlap(router: Router, tokens: list[int], **kw: Any) -> dict[int, int]:
    keys = kvroute_block_hashes(tokens, 16, **kw)
    return dict(router.index.match(keys))


# -- vLLM ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "_bytes_hashes"])
def test_vllm_chain_is_keyed_by_kvroute_hash_of_the_tokens(router: Router, suffix: str) -> None:
    ap = EventApplier(router)
    assert ap.apply_batch(0, vllm_batch("stored_first_blocks" + suffix)) == {"ok": 1}
    # The child names its parent by vLLM's hash; the applier continues kvroute's chain.
    assert ap.apply_batch(0, vllm_batch("stored_child_block" + suffix)) == {"ok": 1}
    assert overlap(router, BASE[:48]) == {0: 3}
    assert overlap(router, BASE[:40]) == {0: 2}
    # and a request with those tokens routes there, predicting the hit
    d = router.route(Request("r", tokens=BASE[:50]))
    assert (d.worker, d.matched_blocks, d.predicted_cached_tokens) == (0, 3, 48)


def test_vllm_lora_and_cache_salt_enter_the_key(router: Router) -> None:
    ap = EventApplier(router)
    ap.apply_batch(1, vllm_batch("stored_lora_salt"))
    assert overlap(router, BASE[:32]) == {}
    assert overlap(router, BASE[:32], lora_name="my-lora") == {}
    assert overlap(router, BASE[:32], lora_name="my-lora", cache_namespace="tenant-A") == {1: 2}
    d = router.route(Request("r", tokens=BASE[:40], lora_name="my-lora", cache_salt="tenant-A"))
    assert (d.worker, d.matched_blocks) == (1, 2)


@pytest.mark.parametrize("suffix", ["", "_bytes_hashes"])
def test_vllm_evictions_remove_by_engine_hash(router: Router, suffix: str) -> None:
    ap = EventApplier(router)
    for name in ("stored_first_blocks", "stored_child_block", "stored_lora_salt"):
        ap.apply_batch(0, vllm_batch(name + suffix))
    assert router.index.residencies() == 5
    assert ap.apply_batch(0, vllm_batch("removed_by_eviction" + suffix)) == {"ok": 5}
    assert router.index.residencies() == 0
    assert len(router.index) == 0


def test_vllm_clear_drops_only_that_worker(router: Router) -> None:
    ap = EventApplier(router)
    ap.apply_batch(0, vllm_batch("stored_first_blocks"))
    counts = ap.apply_batch(1, vllm_batch("stored_then_cleared"))
    assert counts == {"ok": 1, "cleared": 1}
    assert overlap(router, BASE[:32]) == {0: 2}
    assert ap.counts[1] == {"ok": 1, "cleared": 1}


def test_removal_of_an_unknown_block_is_counted_and_the_index_kept(router: Router) -> None:
    m = Metrics(router)
    ap = EventApplier(router, metrics=m)
    ap.apply_batch(0, vllm_batch("stored_first_blocks"))
    assert ap.apply(0, BlockRemoved((12345, 16918272337110971973))) == "unknown_block"
    assert overlap(router, BASE[:32]) == {}  # the known one still went
    assert ap.apply(0, BlockRemoved((4941392990263232400,))) == "ok"
    assert m.value("kvroute_events_total", {"worker": "0", "status": "unknown_block"}) == 1


def test_store_under_an_unknown_parent_is_skipped_not_guessed(router: Router) -> None:
    m = Metrics(router)
    ap = EventApplier(router, metrics=m)
    assert ap.apply_batch(0, vllm_batch("stored_child_block")) == {"unknown_block": 1}
    assert len(router.index) == 0
    assert m.value("kvroute_events_total", {"worker": "0", "status": "unknown_block"}) == 1


def test_block_size_mismatch_is_loud_and_not_indexed(caplog: pytest.LogCaptureFixture) -> None:
    router = Router(block_size=32, workers=[0])
    m = Metrics(router)
    ap = EventApplier(router, metrics=m)
    with caplog.at_level(logging.WARNING, "kvroute.events"):
        assert ap.apply_batch(0, vllm_batch("stored_first_blocks")) == {"mismatch": 1}
        assert ap.apply_batch(0, vllm_batch("stored_child_block")) == {"mismatch": 1}
    assert len(router.index) == 0
    assert m.value("kvroute_event_mismatches_total", {"worker": "0", "kind": "block_size"}) == 2
    warnings = [r for r in caplog.records if "block_size=16" in r.getMessage()]
    assert len(warnings) == 1  # once a minute per worker, not once per event
    assert "block_size=32" in warnings[0].getMessage()


def test_other_kv_cache_groups_are_ignored(router: Router) -> None:
    ap = EventApplier(router)
    ev = vllm_batch("stored_first_blocks").events[0]
    other = BlockStored(**{**_fields(ev), "group_idx": 1})
    assert ap.apply(0, other) == "ignored"
    assert len(router.index) == 0
    ap = EventApplier(router, groups={0, 1})
    assert ap.apply(0, other) == "ok"


def _fields(ev: BlockStored) -> dict[str, Any]:
    return {f: getattr(ev, f) for f in BlockStored.__dataclass_fields__}


def test_inconsistent_events_are_rejected_without_touching_the_index(
    router: Router, caplog: pytest.LogCaptureFixture
) -> None:
    ap = EventApplier(router)
    good = _fields(vllm_batch("stored_first_blocks").events[0])
    bad = [
        BlockStored(**{**good, "token_ids": good["token_ids"][:10]}),  # too few tokens
        BlockStored(**{**good, "token_ids": ()}),  # no tokens, no tokens_hashes
        BlockStored(**{**good, "tokens_hashes": (1,)}),  # one content hash for two blocks
        BlockStored(**{**good, "block_hashes": (1, 2, 3, 4)}),  # more hashes than blocks
    ]
    with caplog.at_level(logging.WARNING, "kvroute.events"):
        for ev in bad:
            assert ap.apply(0, ev) == "rejected"
    assert len(router.index) == 0
    assert ap.apply(0, BlockStored(**good)) == "ok"


# -- SGLang ---------------------------------------------------------------------------


def test_sglang_signed_hashes_chain_and_coalesced_removal(router: Router) -> None:
    ap = EventApplier(router)
    assert ap.apply_batch(0, sglang_batch("default:stored_chain")) == {"ok": 1}
    assert overlap(router, BASE[:48]) == {0: 3}
    assert ap.apply_batch(0, sglang_batch("default:removed")) == {"ok": 1}
    assert len(router.index) == 0
    assert ap.apply_batch(0, sglang_batch("default:cleared")) == {"cleared": 1}


def test_sglang_cache_salt_enters_the_key(router: Router) -> None:
    ap = EventApplier(router)
    ap.apply_batch(0, sglang_batch("default:stored_cache_salt"))
    assert overlap(router, BASE[:32]) == {}
    assert overlap(router, BASE[:32], cache_namespace="tenant-A") == {0: 2}


def test_sglang_partial_last_page_is_not_indexed(router: Router) -> None:
    ap = EventApplier(router)
    ev = sglang_batch("default:stored_chain").events[0]
    assert isinstance(ev, BlockStored)
    # A node of 40 tokens: two full pages and a partial third one.
    partial = BlockStored(**{**_fields(ev), "token_ids": ev.token_ids[:40]})
    assert ap.apply(0, partial) == "ok"
    assert overlap(router, BASE[:48]) == {0: 2}
    # A child of the partial page cannot be keyed: its prefix is not whole blocks.
    child = BlockStored((77,), ev.block_hashes[2], tuple(BASE[48:64]), block_size=16)
    assert ap.apply(0, child) == "unknown_block"


def test_sglang_page_size_one_needs_a_router_of_block_size_one() -> None:
    r1 = Router(block_size=1, workers=[0])
    assert EventApplier(r1).apply_batch(0, sglang_batch("default:page_size_1")) == {"ok": 1}
    assert dict(r1.index.match(kvroute_block_hashes(BASE[:4], 1))) == {0: 4}
    r16 = Router(block_size=16, workers=[0])
    assert EventApplier(r16).apply_batch(0, sglang_batch("default:page_size_1")) == {"mismatch": 1}


def test_cpu_pinned_medium_lands_in_the_host_tier(router: Router) -> None:
    ap = EventApplier(router)
    ev = sglang_batch("default:stored_chain").events[0]
    host = BlockStored(**{**_fields(ev), "tier": "host", "medium": "CPU_PINNED"})
    ap.apply(0, host)
    keys = kvroute_block_hashes(BASE[:48], 16)
    assert router.index.match_tiers(keys) == {0: (0, 3, 0)}
    ap.apply(0, BlockRemoved(ev.block_hashes, tier="host"))
    assert len(router.index) == 0


# -- Dynamo ---------------------------------------------------------------------------


def _dynamo_stored(event_json: str) -> BlockStored:
    d = json.loads(event_json)["data"]["stored"]
    blocks = d["blocks"]
    return BlockStored(
        block_hashes=tuple(b["block_hash"] for b in blocks),
        parent_block_hash=d.get("parent_hash"),
        tokens_hashes=tuple(b["tokens_hash"] for b in blocks),
    )


def test_dynamo_tokens_hashes_chain_into_kvroute_keys(router: Router) -> None:
    ap = EventApplier(router)
    first = DYNAMO["trace"][1]["event_json"]  # A's first two blocks
    child = DYNAMO["trace"][2]["event_json"]  # A's third block, parent = block 2's hash
    assert ap.apply(0, _dynamo_stored(first)) == "ok"
    assert ap.apply(0, _dynamo_stored(child)) == "ok"
    # kvroute's key is Dynamo's chained sequence hash, so the two agree exactly.
    assert overlap(router, BASE[:64]) == {0: 3}
    removed = BlockRemoved((DYNAMO["external_hashes_A"][1],))
    assert ap.apply(0, removed) == "ok"
    assert overlap(router, BASE[:64]) == {0: 1}


# -- keying on engine hashes ------------------------------------------------------------


def vllm_sha256(tokens: Any, bs: int, *, lora_name: Any, cache_namespace: Any, parent: Any) -> Any:
    """A router hashing that reproduces vLLM's default hashes (its sha256, no seed).

    vLLM chains full digests, so no chain can continue from a 64-bit key: it
    says so, and the applier then checks chain starts only.
    """
    if parent is not None:
        raise NotImplementedError("vLLM hashes cannot continue from a 64-bit key")
    lora = None if lora_name is None else VllmLoRA(lora_name, f"/models/{lora_name}")
    return vllm_block_hashes(tokens, bs, algo="sha256", lora=lora, cache_salt=cache_namespace)


def counting(fn: Any, calls: list[Any]) -> Any:
    def spy(tokens: Any, bs: int, **kw: Any) -> Any:
        calls.append(kw["parent"])
        return fn(tokens, bs, **kw)

    return spy


@pytest.mark.parametrize("suffix", ["", "_bytes_hashes"])
def test_engine_keyed_with_the_engines_own_hashing_matches_silently(
    suffix: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Any] = []
    router = Router(block_size=16, workers=[0], hashing=counting(vllm_sha256, calls))
    m = Metrics(router)
    ap = EventApplier(router, metrics=m, key_on="engine")
    with caplog.at_level(logging.WARNING, "kvroute.events"):
        for name in ("stored_first_blocks", "stored_child_block", "stored_lora_salt"):
            assert ap.apply_batch(0, vllm_batch(name + suffix)) == {"ok": 1}
    assert not caplog.records
    assert m.value("kvroute_event_mismatches_total", {"worker": "0", "kind": "hash"}) == 0
    # every stored event was checked: the two chain starts, and the child (which
    # this hashing declines: it continues from its parent's engine hash)
    first, child = (
        vllm_batch(n + suffix).events[0] for n in ("stored_first_blocks", "stored_child_block")
    )
    assert isinstance(first, BlockStored) and isinstance(child, BlockStored)
    assert calls == [None, first.block_hashes[-1], None]
    # the index holds the engine's hashes, and route() reproduces them
    d = router.route(Request("r", tokens=BASE[:48]))
    assert d.matched_blocks == 3
    salted = Request("s", tokens=BASE[:32], lora_name="my-lora", cache_salt="tenant-A")
    assert router.route(salted).matched_blocks == 2
    ap.apply_batch(0, vllm_batch("removed_by_eviction" + suffix))
    assert len(router.index) == 0


def test_engine_keyed_continuations_are_checked_with_the_inherited_salt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An engine publishing the router's own chain (Dynamo sequence hashes) as
    # its block hashes: a continuation reproduces from its parent's hash, and
    # vLLM-style, only the prompt's first event names the salt.
    kw = {"lora_name": "my-lora", "cache_namespace": "tenant-A"}
    keys = [int(h) for h in kvroute_block_hashes(BASE[:48], 16, **kw)]
    start = BlockStored(
        tuple(keys[:2]),
        None,
        tuple(BASE[:32]),
        block_size=16,
        lora_name="my-lora",
        cache_salt="tenant-A",
    )
    child = BlockStored(
        tuple(keys[2:]), keys[1], tuple(BASE[32:48]), block_size=16, lora_name="my-lora"
    )
    router = Router(block_size=16, workers=[0])
    m = Metrics(router)
    ap = EventApplier(router, metrics=m, key_on="engine")
    with caplog.at_level(logging.WARNING, "kvroute.events"):
        assert ap.apply_batch(0, EventBatch(0.0, (start, child))) == {"ok": 2}
    assert not caplog.records
    assert m.value("kvroute_event_mismatches_total", {"worker": "0", "kind": "hash"}) == 0
    assert (
        router.route(
            Request("r", tokens=BASE[:48], lora_name="my-lora", cache_salt="tenant-A")
        ).matched_blocks
        == 3
    )
    # Once the salted parent is gone the salt is forgotten: the same
    # continuation no longer reproduces, and says so.
    ap.apply(0, BlockRemoved((keys[1],)))
    assert ap.apply(0, child) == "ok"
    assert m.value("kvroute_event_mismatches_total", {"worker": "0", "kind": "hash"}) == 1


def test_engine_keyed_with_another_hashing_warns_for_starts_and_continuations(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The router hashes requests with kvroute's default hash; the engine is vLLM.
    router = Router(block_size=16, workers=[0])
    m = Metrics(router)
    hash_mismatches = {"worker": "0", "kind": "hash"}
    ap = EventApplier(router, metrics=m, key_on="engine")
    with caplog.at_level(logging.WARNING, "kvroute.events"):
        ap.apply_batch(0, vllm_batch("stored_first_blocks"))
        assert m.value("kvroute_event_mismatches_total", hash_mismatches) == 1
        ap.apply_batch(0, vllm_batch("stored_child_block"))
        assert m.value("kvroute_event_mismatches_total", hash_mismatches) == 2
    # logged once per interval, counted every time
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "a chain start" in logged[0]
    assert "Router(hashing=...)" in logged[0] and "key_on='kvroute'" in logged[0]
    # this is the silent failure the warning is about: the blocks are held, never matched
    assert router.index.residencies() == 3
    assert router.route(Request("r", tokens=BASE[:48])).matched_blocks == 0

    caplog.clear()
    ap = EventApplier(router, metrics=m, key_on="engine", log_interval=0.0)
    with caplog.at_level(logging.WARNING, "kvroute.events"):
        ap.apply_batch(0, vllm_batch("stored_child_block"))
    assert m.value("kvroute_event_mismatches_total", hash_mismatches) == 3
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "continuing from 4941392990263232400" in msg and "6897989581244272817" in msg


def test_kvroute_keyed_mode_hashes_each_stored_event_once(router: Router) -> None:
    calls: list[Any] = []
    router = Router(block_size=16, workers=[0], hashing=counting(kvroute_block_hashes, calls))
    ap = EventApplier(router)
    ap.apply_batch(0, vllm_batch("stored_first_blocks"))
    ap.apply_batch(0, vllm_batch("stored_child_block"))
    assert len(calls) == 2  # the key computation only: no check on this path
    assert overlap(router, BASE[:48]) == {0: 3}


def test_applier_arguments_are_checked(router: Router) -> None:
    with pytest.raises(ValueError, match="key_on"):
        EventApplier(router, key_on="tokens")  # type: ignore[arg-type]
    assert EventApplier(router).apply(0, "BlockStored") == "rejected"  # type: ignore[arg-type]


def test_a_run_of_removals_is_one_index_call_with_exact_counts(router: Router) -> None:
    ap = EventApplier(router)
    ap.apply_batch(0, vllm_batch("stored_first_blocks"))
    b1, b2 = vllm_batch("stored_first_blocks").events[0].block_hashes  # type: ignore[union-attr]
    run = (BlockRemoved((b2,)), BlockRemoved((999,)), BlockRemoved((b1,)))
    calls = []
    orig = router.apply_removed

    def spy(*a: Any, **k: Any) -> int:
        calls.append(a)
        return orig(*a, **k)

    router.apply_removed = spy  # type: ignore[method-assign]
    assert ap.apply_batch(0, EventBatch(0.0, run)) == {"ok": 2, "unknown_block": 1}
    assert len(calls) == 1 and len(router.index) == 0
    # a run of another group is ignored as a whole; a tier change splits the run
    other = (BlockRemoved((b1,), group_idx=3), BlockRemoved((b2,), group_idx=3))
    assert ap.apply_batch(0, EventBatch(0.0, other)) == {"ignored": 2}
    split = (BlockRemoved((b1,)), BlockRemoved((b2,), tier="host"), BlockRemoved((b2,)))
    assert ap.apply_batch(0, EventBatch(0.0, split)) == {"unknown_block": 3}
    assert len(calls) == 4  # one per run: device, host, device
    assert ap.counts[0]["ignored"] == 2


def test_a_store_continuing_a_salted_prompt_inherits_the_salt(router: Router) -> None:
    # vLLM names the salt only in a prompt's first event; the continuation's
    # extra keys carry the LoRA name alone.
    ap = EventApplier(router)
    ap.apply_batch(0, vllm_batch("stored_lora_salt"))
    first = vllm_batch("stored_lora_salt").events[0]
    assert isinstance(first, BlockStored)
    child = BlockStored(
        (424242,),
        first.block_hashes[-1],
        tuple(BASE[32:48]),
        block_size=16,
        lora_name="my-lora",
        extra_keys=(("my-lora",),),
    )
    assert ap.apply(0, child) == "ok"
    lora_salt = {"lora_name": "my-lora", "cache_namespace": "tenant-A"}
    assert overlap(router, BASE[:48], **lora_salt) == {0: 3}
    # Once the salted parent is evicted, a new continuation cannot be keyed
    # under it (its parent is gone), and nothing unsalted ever matches it.
    ap.apply_batch(0, EventBatch(0.0, (BlockRemoved(first.block_hashes),)))
    assert ap.apply(0, BlockStored(**{**_fields(child), "block_hashes": (7,)})) == ("unknown_block")
    assert overlap(router, BASE[:48], lora_name="my-lora") == {}
    ap.cleared(0)
    assert len(router.index) == 0 and 0 not in ap._salts


def test_an_unrecoverable_gap_clears_the_worker_and_counts_replay_failed(router: Router) -> None:
    metrics = Metrics(router)
    ap = EventApplier(router, metrics=metrics)
    for w in (0, 1):
        assert ap.apply_batch(w, vllm_batch("stored_first_blocks")) == {"ok": 1}
    ap.unrecoverable_gap(0, "event ids 3..5 never arrived")
    assert router.index.worker_len(0) == 0 and router.index.worker_len(1) > 0
    assert ap.counts[0]["replay_failed"] == 1
    assert metrics.value("kvroute_events_total", {"worker": "0", "status": "replay_failed"}) == 1

"""The embedding API, harder to misuse: events through ``Router.apply_event``, keys checked.

``apply_event`` keys an engine's event by the router's own hash of its
tokens, so a request matches whatever the engine hashes with;
``apply_stored`` takes kvroute keys, refuses an engine's hashes given as
keys where it can tell, and counts (and warns of) stored prompt starts that
start no prompt the router routed. ``finished`` takes the generated ids or
their count.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kvroute import Request, Router, kvroute_block_hashes
from kvroute.events import AllBlocksCleared, BlockRemoved, BlockStored

cbor2 = pytest.importorskip("cbor2")
from kvroute.events.engine_hashes import vllm_block_hashes  # noqa: E402


def stored(tokens: list[int], parent: int | None = None, bs: int = 16) -> BlockStored:
    """A vLLM-style stored event: its own engine hashes, and the tokens."""
    return BlockStored(
        block_hashes=tuple(int(h) for h in vllm_block_hashes(tokens, bs)),
        parent_block_hash=parent,
        token_ids=tuple(tokens),
        block_size=bs,
    )


def test_apply_event_keys_the_tokens_so_requests_match() -> None:
    # (no fresh-decision record: the matches below are the index's alone)
    router = Router(block_size=16, workers=[0, 1, 2, 3], predict_on_route=False)
    prompt = list(range(2048))
    event = stored(prompt[:1024])
    assert router.apply_event(2, event) == "ok"
    d = router.route(Request("req-1", tokens=prompt))
    assert (d.worker, d.matched_blocks, d.predicted_cached_tokens) == (2, 64, 1024)
    router.finished("req-1")

    def matched(rid: str) -> int:
        d = router.route(Request(rid, tokens=prompt))
        router.finished(rid)
        return d.matched_blocks

    # a continuation names its parent by the engine's hash
    more = BlockStored(
        block_hashes=tuple(int(h) for h in vllm_block_hashes(prompt[:1280], 16)[64:]),
        parent_block_hash=event.block_hashes[-1],
        token_ids=tuple(prompt[1024:1280]),
        block_size=16,
    )
    assert router.apply_event(2, more) == "ok"
    assert matched("req-2") == 80
    # removals name the engine's hashes; a clear drops the worker's blocks
    assert router.apply_event(2, BlockRemoved(block_hashes=more.block_hashes[-16:])) == "ok"
    assert matched("req-3") == 64
    assert router.apply_event(2, AllBlocksCleared()) == "cleared"
    assert matched("req-4") == 0
    assert router.apply_event(2, BlockRemoved(block_hashes=(5,))) == "unknown_block"
    assert router.apply_event(2, stored(prompt[:32], bs=32)) == "mismatch"
    with pytest.raises(TypeError, match=r"takes a kvroute\.events BlockStored"):
        router.apply_event(2, "BlockStored")  # type: ignore[arg-type]


def test_the_engine_hashes_given_as_keys_never_match_and_are_caught() -> None:
    # What routing.md's first example used to do: apply_stored(w, event.block_hashes).
    router = Router(block_size=16, workers=[0, 1])
    prompt = list(range(512))
    event = stored(prompt)
    router.apply_stored(1, event.block_hashes)
    assert router.route(Request("a", tokens=prompt)).matched_blocks == 0  # silently useless
    with pytest.raises(ValueError, match="kvroute keys"):
        router.apply_stored(1, event.block_hashes, engine_hashes=event.block_hashes)
    keys = kvroute_block_hashes(prompt, 16)
    router.apply_stored(0, keys, engine_hashes=event.block_hashes)  # the right call
    assert router.route(Request("b", tokens=prompt)).matched_blocks == 32


def test_stored_prompt_starts_that_start_no_routed_prompt_are_counted_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="kvroute.router")
    wrong, right = Router(block_size=16, workers=[0, 1]), Router(block_size=16, workers=[0, 1])
    for i in range(40):
        prompt = [i, *range(1000, 1100)]
        for router in (wrong, right):
            d = router.route(Request(i, tokens=prompt))
            router.finished(i)
        event = stored(prompt)
        wrong.apply_stored(d.worker, event.block_hashes)  # the engine's hashes as keys
        right.apply_event(d.worker, event)
    assert wrong.stats()["stored_starts_unrouted"] == 40
    assert wrong.stats()["stored_starts_routed"] == 0
    assert right.stats()["stored_starts_routed"] == 40
    assert right.stats()["stored_starts_unrouted"] == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "look like the engine's own block hashes" in warnings[0]
    assert "Router.apply_event(worker, event)" in warnings[0]


def test_no_decision_remembered_means_nothing_is_counted() -> None:
    # Events arriving before any routing, or a router without predict-on-route:
    # no evidence either way.
    for router in (Router(block_size=4, workers=[0]),
                   Router(block_size=4, workers=[0], predict_on_route=False)):  # fmt: skip
        router.apply_stored(0, [1, 2, 3])
        router.route(Request("r", tokens=[9] * 8))
        if router.config.predict_on_route:
            router.apply_stored(0, [4, 5])
            assert router.stats()["stored_starts_unrouted"] == 1
        else:
            router.apply_stored(0, [4, 5])
            assert router.stats()["stored_starts_unrouted"] == 0


def test_finished_takes_the_generated_ids_or_their_count() -> None:
    router = Router(block_size=4, workers=[0], policy="round_robin")
    toks = list(range(12))
    for rid, out, plan_tokens in (
        ("ids", [77, 78], (*toks, 77, 78)),
        ("array", np.array([77, 78]), (*toks, 77, 78)),
        ("count", 2, tuple(toks)),  # a count: the plan holds the prompt alone
        ("numpy count", np.int64(2), tuple(toks)),
        ("none", None, tuple(toks)),
    ):
        router.route(Request(rid, tokens=toks, session_id="s", speculative_prefill=True))
        assert router.finished(rid, output_tokens=out)
        plan = router.warmup_plan("s")
        assert plan is not None and plan.tokens == plan_tokens, rid
    assert router.finished("unknown", output_tokens=3) is False
    router.route(Request("bad", tokens=toks))
    with pytest.raises(ValueError, match=">= 0"):
        router.finished("bad", output_tokens=-1)
    for wrong in ("abc", 2.5, True):
        with pytest.raises(TypeError, match=r"sequence of ints .* or an int"):
            router.finished("bad", output_tokens=wrong)  # type: ignore[arg-type]
    assert router.finished("bad")

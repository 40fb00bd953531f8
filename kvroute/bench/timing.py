"""The timed loops, kvroute's and Dynamo's side by side, and a workload's figures."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..index_api import IndexLike
from .memory import maxrss_bytes
from .peers import DynamoOp, encode_dynamo, scores_mismatches
from .streams import MATCH, REMOVE, STORE, STORE_ENGINE, OpStream

__all__ = ["RunResult", "bench_workload", "run_dynamo", "run_kvroute", "verify_state"]


@dataclass
class RunResult:
    """Wall time of one replay and the query results it produced."""

    seconds: float
    results: list[Any]


def run_kvroute(stream: OpStream, index: IndexLike) -> RunResult:
    """Replay ``stream`` through ``index``: the timed loop.

    The garbage collector is off while the clock runs (as ``timeit`` does):
    the loop allocates one small dict per query and a collection would land
    in whichever run happened to cross the threshold.

    :param stream: the op stream, from :func:`build_stream`.
    :param index: a fresh index.
    :returns: the seconds taken and each MATCH's result, in order.
    """
    match, store, remove = index.match, index.store, index.remove
    results: list[dict[int, int]] = []
    append = results.append
    ops = stream.ops
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for kind, w, keys, parent, eng in ops:
            if kind == MATCH:
                append(match(keys))
            elif kind == STORE:
                store(w, keys, parent)
            elif kind == REMOVE:
                remove(w, keys)
            elif kind == STORE_ENGINE:
                store(w, keys, parent, engine_hashes=eng)
            else:
                remove(w, eng, engine=True)
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    return RunResult(seconds, results)


def run_dynamo(encoded: Sequence[DynamoOp], tree: Any) -> RunResult:
    """Replay a pre-encoded stream through Dynamo's ``RadixTree``: the comparison's timed loop.

    :param encoded: from :func:`encode_dynamo`.
    :param tree: a fresh ``dynamo._core.RadixTree``.
    :returns: the seconds taken and each query's ``OverlapScores``, in order.
    :raises RuntimeError: Dynamo rejected an event (the stream is inconsistent).
    """
    find, apply = tree.find_matches, tree.apply_event
    results: list[Any] = []
    append = results.append
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for kind, w, payload in encoded:
            if kind == MATCH:
                append(find(payload))
            else:
                apply(w, payload)
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    return RunResult(seconds, results)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def verify_state(stream: OpStream, index: IndexLike) -> bool:
    """Whether every engine's block count in ``index`` equals its engine model's.

    Runtime complexity: O(workers). The tests check the keys themselves.

    :param stream: the replayed stream (its engines hold their final state).
    :param index: the index the stream was replayed through.
    :returns: True when the counts agree, worker by worker and in total.
    """
    return all(index.worker_len(w) == len(e) for w, e in enumerate(stream.engines)) and (
        index.residencies() == sum(len(e) for e in stream.engines)
    )


def bench_workload(
    stream: OpStream,
    index_factory: Callable[[], IndexLike],
    *,
    repeat: int = 3,
    tree_factory: Callable[[], Any] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Time ``stream`` through fresh indexes (and Dynamo trees), side by side.

    Rounds alternate kvroute and Dynamo so that both see the same machine
    load; the figures are medians over rounds and the ratio is the median of
    the per-round ratios. The first round's query results are cross-checked
    and its index is measured (``sizeof()``, residencies) and checked against
    the engine models before it is dropped.

    :param stream: from :func:`build_stream`.
    :param index_factory: makes an empty BlockIndex.
    :param repeat: rounds (at least 1).
    :param tree_factory: makes an empty ``dynamo._core.RadixTree``; None
        skips the comparison.
    :param log: receives progress lines.
    :returns: the workload's figures, JSON-ready.
    :raises ValueError: ``repeat`` < 1.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    out: dict[str, Any] = {"name": stream.name, **stream.summary(), "repeat": repeat}
    ours: list[float] = []
    theirs: list[float] = []
    encoded: list[DynamoOp] = []
    first: RunResult | None = None
    dyn_first: RunResult | None = None
    for r in range(repeat):
        index = index_factory()
        run = run_kvroute(stream, index)
        ours.append(run.seconds)
        log(f"  {stream.name}: kvroute round {r + 1}/{repeat}: {run.seconds:.3f} s")
        if r == 0:
            first = run
            out["peak_sizeof_bytes"] = index.sizeof()
            out["residencies"] = index.residencies()
            out["blocks_indexed"] = len(index)
            out["bytes_per_residency"] = out["peak_sizeof_bytes"] / max(out["residencies"], 1)
            out["state_ok"] = verify_state(stream, index)
            out["maxrss_bytes"] = maxrss_bytes()
        del index
        if tree_factory is not None:
            if r == 0:
                t0 = time.perf_counter()
                encoded = encode_dynamo(stream)
                out["compare_encode_seconds"] = time.perf_counter() - t0
            dyn = run_dynamo(encoded, tree_factory())
            theirs.append(dyn.seconds)
            log(f"  {stream.name}: dynamo  round {r + 1}/{repeat}: {dyn.seconds:.3f} s")
            if r == 0:
                dyn_first = dyn
    seconds = _median(ours)
    out["seconds"] = seconds
    out["seconds_all"] = ours
    out["block_ops_per_s"] = stream.dynamo_blocks / seconds
    out["block_ops_per_s_with_removals"] = stream.all_blocks / seconds
    if tree_factory is not None:
        assert first is not None and dyn_first is not None
        dseconds = _median(theirs)
        bad, examples = scores_mismatches(first.results, dyn_first.results)
        out["compare"] = {
            "seconds": dseconds,
            "seconds_all": theirs,
            "block_ops_per_s": stream.dynamo_blocks / dseconds,
            "block_ops_per_s_with_removals": stream.all_blocks / dseconds,
            "ratio": _median([d / k for k, d in zip(ours, theirs, strict=True)]),
            "encode_seconds": out.pop("compare_encode_seconds"),
            "queries_checked": len(first.results),
            "mismatches": bad,
            "mismatch_examples": examples,
        }
    return out

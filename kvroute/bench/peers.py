"""Dynamo's ``RadixTree`` as a peer: the op stream in its wire format, and its scores checked.

With ``--compare`` the stream goes through Dynamo's ``RadixTree`` Python API
(:func:`kvroute.bench.timing.run_dynamo`), its events pre-encoded here in
Dynamo's JSON wire format (:func:`encode_dynamo`), and every query's
per-worker scores are checked against kvroute's (:func:`scores_mismatches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .streams import MATCH, REMOVE, STORE, STORE_ENGINE, OpStream, engine_hashes_of

__all__ = ["DynamoOp", "encode_dynamo", "scores_mismatches"]

#: One pre-encoded call: ``(MATCH, 0, [keys])`` or ``(STORE|REMOVE, worker, json_bytes)``.
DynamoOp = tuple[int, int, Any]


def encode_dynamo(stream: OpStream) -> list[DynamoOp]:
    """Pre-encode ``stream`` for Dynamo's RadixTree: events as JSON bytes, queries as lists.

    Each block's key is both its ``tokens_hash`` (what ``find_matches``
    matches) and, unless the stream has engine hashes, its ``block_hash``
    (Dynamo's handle for parent links and removals); with engine hashes the
    engine hash is the ``block_hash``, as a real engine's would be.

    Runtime complexity: O(blocks in the stream); seconds for the Mooncake trace.

    :param stream: from :func:`build_stream`.
    :returns: ``(MATCH, 0, [keys])`` or ``(STORE|REMOVE, worker, json_bytes)`` per op.
    """
    out: list[DynamoOp] = []
    event_id = 0
    for kind, w, keys, parent, eng in stream.ops:
        if kind == MATCH:
            out.append((MATCH, 0, keys.tolist()))
            continue
        event_id += 1
        handles = (eng if eng is not None else keys).tolist()
        if kind in (STORE, STORE_ENGINE):
            if parent is None:
                p = "null"
            elif eng is None:
                p = str(parent)
            else:
                p = str(int(engine_hashes_of(np.array([parent], dtype=np.uint64))[0]))
            blocks = ",".join(
                f'{{"block_hash":{b},"tokens_hash":{t}}}'
                for b, t in zip(handles, keys.tolist(), strict=True)
            )
            text = (
                f'{{"event_id":{event_id},"data":{{"stored":'
                f'{{"parent_hash":{p},"blocks":[{blocks}]}}}}}}'
            )
            out.append((STORE, w, text.encode()))
        else:
            ids = ",".join(map(str, handles))
            text = f'{{"event_id":{event_id},"data":{{"removed":{{"block_hashes":[{ids}]}}}}}}'
            out.append((REMOVE, w, text.encode()))
    return out


def scores_mismatches(
    kvroute_results: Sequence[dict[int, int]], dynamo_results: Sequence[Any]
) -> tuple[int, list[str]]:
    """Compare per-worker scores query by query (Dynamo keys them by (worker, dp_rank)).

    :param kvroute_results: ``BlockIndex.match`` results, in query order.
    :param dynamo_results: ``RadixTree.find_matches`` results for the same queries.
    :returns: the number of queries that differ, and up to five descriptions.
    """
    bad = 0
    examples: list[str] = []
    for i, (ours, theirs) in enumerate(zip(kvroute_results, dynamo_results, strict=True)):
        dyn = {w: s for (w, _dp), s in theirs.scores.items() if s}
        mine = {w: s for w, s in ours.items() if s}
        if mine != dyn:
            bad += 1
            if len(examples) < 5:
                examples.append(
                    f"query {i}: kvroute {sorted(mine.items())[:8]}"
                    f" dynamo {sorted(dyn.items())[:8]}"
                )
    return bad, examples

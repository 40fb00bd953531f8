"""Index benchmark: replay a request trace's match/store/remove stream through a BlockIndex.

The method follows Dynamo's ``mooncake_bench`` (lib/kv-router/benches): the
trace's requests are spread over mock engines, each engine's prefix cache
turns requests into KV events, and the index sees, per request, one ``match``
over all the request's blocks followed by that engine's removed and stored
events. Throughput is *block ops per second*:

- Dynamo's definition (``block_ops_per_s``): (query blocks + stored blocks)
  per second; removals are applied and timed but not counted;
- with removals counted (``block_ops_per_s_with_removals``): (query + stored
  + removed blocks) per second.

The parts, in the order a run uses them:

- :mod:`.streams` builds everything before the clock starts: block keys, the
  engine models, the op stream (:func:`build_stream`) and the generated
  workloads;
- :mod:`.timing` runs the timed loops (:func:`run_kvroute`: ``match`` /
  ``store`` / ``remove`` on numpy uint64 arrays, in order, on one thread,
  through the public API; :func:`run_dynamo` beside it) and a workload's
  figures (:func:`bench_workload`);
- :mod:`.peers` encodes the stream for Dynamo's ``RadixTree`` (``--compare``)
  and checks every query's scores against kvroute's;
- :mod:`.memory` measures bytes per residency and ``sizeof()`` under churn;
- :mod:`.report` renders the tables and the JSON;
- :mod:`.cli` is the ``kvroute bench`` command.

What this does not measure: event decoding (the stream is pre-decoded), the
router's policy, locking under concurrent readers, and the GIL handoffs of a
multi-threaded service.
"""

from __future__ import annotations

from .memory import MemoryResult, maxrss_bytes, measure_memory
from .peers import encode_dynamo, scores_mismatches
from .report import dumps, render_report
from .streams import (
    MATCH,
    REMOVE,
    REMOVE_ENGINE,
    STORE,
    STORE_ENGINE,
    LruEngine,
    Op,
    OpStream,
    Served,
    UnitLruEngine,
    block_keys,
    build_stream,
    engine_hashes_of,
    expected_holdings,
    miss_heavy_requests,
    synthetic_requests,
)
from .timing import RunResult, bench_workload, run_dynamo, run_kvroute, verify_state

__all__ = [
    "MATCH",
    "REMOVE",
    "REMOVE_ENGINE",
    "STORE",
    "STORE_ENGINE",
    "LruEngine",
    "MemoryResult",
    "Op",
    "OpStream",
    "RunResult",
    "Served",
    "UnitLruEngine",
    "bench_workload",
    "block_keys",
    "build_stream",
    "dumps",
    "encode_dynamo",
    "engine_hashes_of",
    "expected_holdings",
    "maxrss_bytes",
    "measure_memory",
    "miss_heavy_requests",
    "render_report",
    "run_dynamo",
    "run_kvroute",
    "scores_mismatches",
    "synthetic_requests",
    "verify_state",
]

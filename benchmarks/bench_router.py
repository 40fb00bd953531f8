"""Router.route() speed: precomputed hashes, and hashing a long prompt included.

Fleet: ``workers`` workers, each holding ``blocks // workers`` random blocks
(stored with one large ``store()`` per worker, so the build is quick), a
64-block system prompt on every worker, and the benchmarked prompt's first
half on 8 workers. Each timed call routes one request and then finishes it
(so in-flight load stays flat); the injected clock advances 1 ms per call so
the predict-on-route side record reaches its steady state.

Under pytest (``--benchmark-disable`` in the normal run) the sizes are small;
``KVROUTE_BENCH_FULL=1`` selects the issue's fleet: 256 workers, 1M blocks.
Run as a script for percentiles (pytest-benchmark reports no p99)::

    python benchmarks/bench_router.py            # 256 workers, 1M blocks
    python benchmarks/bench_router.py --small

Not measured: event decoding, the proxy's HTTP work, lock contention from
other threads, and the index's update cost under a concurrent event stream.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from itertools import count
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from kvroute import _index_py
from kvroute.hashing import kvroute_block_hashes
from kvroute.request import Request
from kvroute.router import Router

try:
    from kvroute import _index as _index_c

    INDEXES: list[ModuleType] = [_index_c, _index_py]
except ImportError:  # pragma: no cover - the build test reports it
    INDEXES = [_index_py]

FULL = bool(os.environ.get("KVROUTE_BENCH_FULL"))
BLOCK = 16
PROMPT_TOKENS = 32_768


class StepClock:
    def __init__(self, step: float = 0.001) -> None:
        self.t = 0.0
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def build(
    index_module: ModuleType, workers: int, blocks: int, policy: str = "kvroute"
) -> tuple[Router, npt.NDArray[np.uint32], npt.NDArray[np.uint64]]:
    """A router over a populated index, and the prompt (tokens, hashes) to route."""
    rng = np.random.default_rng(0)
    params: dict[str, Any] = {"seed": 0} if policy in ("kvroute", "kv_cost") else {}
    r = Router(
        block_size=BLOCK,
        workers=range(workers),
        policy=policy,
        policy_params=params,
        clock=StepClock(),
        index_factory=index_module.BlockIndex,
    )
    per = max(blocks // workers, 1)
    for w in range(workers):
        r.index.store(w, rng.integers(1, 2**63, per, dtype=np.uint64))
    tokens = rng.integers(0, 150_000, PROMPT_TOKENS, dtype=np.uint32)
    hashes = kvroute_block_hashes(tokens, BLOCK)
    system = hashes[:64]
    for w in range(workers):
        r.index.store(w, system)
    for w in range(min(8, workers)):
        r.index.store(w, hashes[: len(hashes) // 2])
    return r, tokens, hashes


def route_fn(r: Router, **req: Any) -> Callable[[], None]:
    ids = count()

    def call() -> None:
        rid = next(ids)
        r.route(Request(rid, **req))
        r.finished(rid)

    return call


def _sizes() -> tuple[int, int]:
    return (256, 1_000_000) if FULL else (16, 10_000)


@pytest.mark.parametrize(
    "index_module", INDEXES, ids=["py" if m.__name__.endswith("_py") else "c" for m in INDEXES]
)
@pytest.mark.parametrize("policy", ["kvroute", "kv_cost", "cache_aware", "round_robin"])
def bench_route_precomputed_hashes(benchmark: Any, index_module: ModuleType, policy: str) -> None:
    workers, blocks = _sizes()
    r, _, hashes = build(index_module, workers, blocks, policy)
    benchmark(route_fn(r, block_hashes=hashes))


@pytest.mark.parametrize(
    "index_module", INDEXES, ids=["py" if m.__name__.endswith("_py") else "c" for m in INDEXES]
)
def bench_route_hashing_32k_prompt(benchmark: Any, index_module: ModuleType) -> None:
    workers, blocks = _sizes()
    r, tokens, _ = build(index_module, workers, blocks)
    benchmark(route_fn(r, tokens=tokens))


def _percentiles(fn: Callable[[], None], n: int) -> tuple[float, float, float]:
    for _ in range(min(n // 10, 500)):
        fn()
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t0
    p50, p99 = np.percentile(out, [50, 99]) / 1000
    return float(p50), float(p99), float(out.mean() / 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="16 workers, 10k blocks")
    ap.add_argument("-n", type=int, default=20_000, help="timed calls per case")
    ap.add_argument("--py", action="store_true", help="also the pure-Python index")
    args = ap.parse_args()
    workers, blocks = (16, 10_000) if args.small else (256, 1_000_000)
    mods = INDEXES if args.py else INDEXES[:1]
    print(f"{workers} workers, {blocks} blocks, prompt {PROMPT_TOKENS} tokens / block {BLOCK}")
    a = np.zeros(16)
    t0 = time.perf_counter_ns()
    for _ in range(100_000):
        a + 1.0  # calibration: one small numpy operation
    print(
        f"machine calibration: one 16-element numpy add = "
        f"{(time.perf_counter_ns() - t0) / 100_000e3:.2f} us"
    )
    for mod in mods:
        name = mod.__name__.rsplit(".", 1)[1]
        for policy in ("kvroute", "kv_cost", "cache_aware", "round_robin"):
            r, tokens, hashes = build(mod, workers, blocks, policy)
            p50, p99, mean = _percentiles(route_fn(r, block_hashes=hashes), args.n)
            print(
                f"{name:9} {policy:12} precomputed hashes   "
                f"p50 {p50:7.1f} us  p99 {p99:7.1f} us  mean {mean:7.1f} us"
            )
        r, tokens, hashes = build(mod, workers, blocks)
        p50, p99, mean = _percentiles(functools.partial(r.index.match, hashes), args.n)
        print(
            f"{name:9} {'':12} index.match alone    "
            f"p50 {p50:7.1f} us  p99 {p99:7.1f} us  mean {mean:7.1f} us"
        )
        cold = hashes.copy()
        cold[0] ^= np.uint64(1)  # no worker holds block 0: the router's own overhead
        p50, p99, mean = _percentiles(route_fn(r, block_hashes=cold), args.n)
        print(
            f"{name:9} {'kvroute':12} cold prompt (no match) "
            f"p50 {p50:7.1f} us  p99 {p99:7.1f} us  mean {mean:7.1f} us"
        )
        p50, p99, mean = _percentiles(route_fn(r, tokens=tokens), args.n // 4)
        print(
            f"{name:9} {'kvroute':12} hashing 32k tokens   "
            f"p50 {p50:7.1f} us  p99 {p99:7.1f} us  mean {mean:7.1f} us"
        )
        t0 = time.perf_counter_ns()
        for _ in range(200):
            kvroute_block_hashes(tokens, BLOCK)
        mean = (time.perf_counter_ns() - t0) / 200e3
        print(f"{name:9} {'':12} hashing alone        mean {mean:7.1f} us")


if __name__ == "__main__":
    main()

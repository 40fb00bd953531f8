"""Router.route() speed: precomputed hashes, and hashing a long prompt included.

Fleet: ``workers`` workers, each holding ``blocks // workers`` random blocks
(stored with one large ``store()`` per worker, so the build is quick), a
64-block system prompt on every worker, and the benchmarked prompt's first
half on 8 workers. Each timed call routes one request (the ``Request`` is
built before the clock starts; with ``tokens`` the hashing runs inside
``route()``) and then finishes it, so in-flight load stays flat; ``route()``
and ``finished()`` are timed apart and together. The injected clock advances
1 ms per call so the predict-on-route side record reaches its steady state.

Under pytest (``--benchmark-disable`` in the normal run) the sizes are small;
``KVROUTE_BENCH_FULL=1`` selects the issue's fleet: 256 workers, 1M blocks.
The ``bench_active_*`` and ``bench_fresh_overlay`` functions time the
router's compiled kernels (``kvroute._route``) beside their twins, and the
active-prefix record beside the per-block ``BlockIndex`` accounting it replaced.

Run as a script for percentiles (pytest-benchmark reports no p99)::

    python benchmarks/bench_router.py                 # 256 workers, 1M blocks
    python benchmarks/bench_router.py --small
    python benchmarks/bench_router.py --rounds 5 --baseline /tmp/kvroute-before

``--baseline DIR`` runs the same cases on the kvroute package found in DIR
(e.g. an export of an older commit, its extensions built) in a subprocess,
alternating with this tree round by round (ABBA, so neither always runs
first), and prints both side by side: medians over rounds of each round's
p50 / p99 / mean, and the after/before ratios. Every round is a fresh process.

Two calibration rows time fixed work: a 16-element numpy add, and a 300-step
Python loop about as long as the router's own bookkeeping. Their p99 / p50
is the host's tail for a call of that length, whatever the code: on a quiet
machine it is close to 1.

One more case keeps 512 requests in flight (each call routes a request of
one of 64 sessions sharing the system prompt, then the oldest finishes), so
the active-prefix record and the policies' load terms are not empty.

Not measured: event decoding, the proxy's HTTP work, lock contention from
other threads, and the index's update cost under a concurrent event stream.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import subprocess
import sys
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


def _route_twins() -> list[ModuleType]:
    # Optional: a --baseline tree from before kvroute._route existed lacks both.
    mods: list[ModuleType] = []
    with contextlib.suppress(ImportError):
        mods.append(importlib.import_module("kvroute._route_py"))
        if not os.environ.get("KVROUTE_NO_EXTENSIONS"):
            with contextlib.suppress(ImportError):
                mods.insert(0, importlib.import_module("kvroute._route"))
    return mods


ROUTE_TWINS = _route_twins()
FULL = bool(os.environ.get("KVROUTE_BENCH_FULL"))
BLOCK = 16
PROMPT_TOKENS = 32_768
POLICIES = ("kvroute", "kv_cost", "cache_aware", "round_robin")


def _ids(mods: list[ModuleType]) -> list[str]:
    return ["py" if m.__name__.endswith("_py") else "c" for m in mods]


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
    """route() + finished() of a fresh request per call (the request built in the call)."""
    ids = count()

    def call() -> None:
        rid = next(ids)
        r.route(Request(rid, **req))
        r.finished(rid)

    return call


def _sizes() -> tuple[int, int]:
    return (256, 1_000_000) if FULL else (16, 10_000)


# -- pytest-benchmark: the router ---------------------------------------------------


@pytest.mark.parametrize("index_module", INDEXES, ids=_ids(INDEXES))
@pytest.mark.parametrize("policy", POLICIES)
def bench_route_precomputed_hashes(benchmark: Any, index_module: ModuleType, policy: str) -> None:
    """route() + finished(), the Request built in the timed call."""
    workers, blocks = _sizes()
    r, _, hashes = build(index_module, workers, blocks, policy)
    benchmark(route_fn(r, block_hashes=hashes))


@pytest.mark.parametrize("index_module", INDEXES, ids=_ids(INDEXES))
def bench_route_alone_precomputed_hashes(benchmark: Any, index_module: ModuleType) -> None:
    """route() alone; the previous request is finished and the next built in untimed setup."""
    workers, blocks = _sizes()
    r, _, hashes = build(index_module, workers, blocks)
    ids = count()
    last: list[int] = []

    def setup() -> tuple[tuple[Request], dict[str, Any]]:
        if last:
            r.finished(last.pop())
        rid = next(ids)
        last.append(rid)
        return (Request(rid, block_hashes=hashes),), {}

    benchmark.pedantic(r.route, setup=setup, rounds=200 if FULL else 20, warmup_rounds=1)


@pytest.mark.parametrize("index_module", INDEXES, ids=_ids(INDEXES))
def bench_route_hashing_32k_prompt(benchmark: Any, index_module: ModuleType) -> None:
    """route() + finished() of a 32k-token prompt, hashing included."""
    workers, blocks = _sizes()
    r, tokens, _ = build(index_module, workers, blocks)
    benchmark(route_fn(r, tokens=tokens))


# -- pytest-benchmark: the router's kernels (kvroute._route and its twin) --------------


def _prompts(n: int, shared: int, length: int, seed: int) -> list[npt.NDArray[np.uint64]]:
    """``n`` prompts of ``length`` random keys, the first ``shared`` common to all."""
    rng = np.random.default_rng(seed)
    head = rng.integers(1, 2**63, shared, dtype=np.uint64)
    return [
        np.concatenate([head, rng.integers(1, 2**63, length - shared, dtype=np.uint64)])
        for _ in range(n)
    ]


_ACTIVE_CASES = [(m, n) for n in (0, 10**2, 10**3) for m in ROUTE_TWINS]


@pytest.fixture(
    scope="module",
    params=_ACTIVE_CASES,
    ids=[f"{n}-{_ids([m])[0]}" for m, n in _ACTIVE_CASES],
)
def active(request: pytest.FixtureRequest) -> tuple[Any, npt.NDArray[np.uint64], int]:
    """An ActivePrefixes holding ``in_flight`` 2,048-block prompts, and one more prompt.

    The prompts share a 64-block system prompt and are spread over 256
    workers. Building it is the slow part (2M adds with 1,000 in flight, about
    15 s in the twin), so it is built once per (twin, size) for the two
    benchmarks below; module scope makes pytest run both on one build, and
    each leaves the record as it found it.

    :returns: the record, the prompt to time, and ``in_flight``.
    """
    route_module, in_flight = request.param
    others = _prompts(in_flight + 1, 64, 2048, seed=1)
    ap = route_module.ActivePrefixes()
    for i, p in enumerate(others[1:]):
        ap.add(i % 256, p)
    return ap, others[0], in_flight


def bench_active_add_remove(
    benchmark: Any, active: tuple[Any, npt.NDArray[np.uint64], int]
) -> None:
    """ActivePrefixes: a 2,048-block prompt enters and leaves, next to ``in_flight`` others.

    The others share a 64-block system prompt and are spread over 256 workers;
    the timed prompt shares it too, on worker 3.
    """
    ap, q, in_flight = active

    def call() -> None:
        ap.add(3, q)
        ap.remove(3, q)

    benchmark.group = f"active prefixes add + remove, {in_flight} in flight"
    benchmark(call)


@pytest.mark.parametrize("index_module", INDEXES[:1], ids=_ids(INDEXES[:1]))
@pytest.mark.parametrize("in_flight", [0, 10**2, 10**3])
def bench_active_add_remove_as_block_index(
    benchmark: Any, index_module: ModuleType, in_flight: int
) -> None:
    """The design ActivePrefixes replaced: every prompt block stored in a BlockIndex, then removed.

    Same prompts and group as ``bench_active_add_remove``; ``worker_len`` read
    before and after each call, as the router did to count the new blocks.
    """
    others = _prompts(in_flight + 1, 64, 2048, seed=1)
    idx = index_module.BlockIndex()
    for i, p in enumerate(others[1:]):
        idx.store(i % 256, p)
    q = others[0]

    def call() -> None:
        idx.worker_len(3)
        idx.store(3, q)
        idx.worker_len(3)
        idx.remove(3, q)
        idx.worker_len(3)

    benchmark.group = f"active prefixes add + remove, {in_flight} in flight"
    benchmark(call)


def bench_active_new_blocks(
    benchmark: Any, active: tuple[Any, npt.NDArray[np.uint64], int]
) -> None:
    """ActivePrefixes.new_blocks over 256 workers, with ``in_flight`` prompts (as above)."""
    ap, q, in_flight = active
    workers = np.arange(256, dtype=np.uint64)
    benchmark.group = f"active prefixes new_blocks, {in_flight} in flight"
    benchmark(ap.new_blocks, q, workers)


@pytest.mark.parametrize("route_module", ROUTE_TWINS, ids=_ids(ROUTE_TWINS))
def bench_fresh_overlay(benchmark: Any, route_module: ModuleType) -> None:
    """fresh_overlay: 4 remembered decisions of 2,048 blocks, 256 positions."""
    q = _prompts(1, 0, 2048, seed=2)[0]
    other = q.copy()
    other[1500:] += np.uint64(1)
    entries = [[w, q if w % 2 else other, 1e9] for w in range(4)]
    pos = {w: w for w in range(256)}
    ov = np.zeros(256, np.int64)

    def call() -> None:
        ov[:] = 0
        route_module.fresh_overlay(entries, q, 0.0, ov, pos, True)

    benchmark.group = "fresh_overlay, 4 decisions"
    benchmark(call)


# -- the script: percentiles, optionally beside a baseline tree ------------------------


def _timed(r: Router, n: int, **req: Any) -> dict[str, list[float]]:
    """Per call: route() alone, and route() + finished(), in microseconds."""
    for i in range(min(n // 10, 500)):
        r.route(Request(-1 - i, **req))
        r.finished(-1 - i)
    route = np.empty(n)
    both = np.empty(n)
    clock = time.perf_counter_ns
    for i in range(n):
        request = Request(i, **req)
        t0 = clock()
        r.route(request)
        t1 = clock()
        r.finished(i)
        t2 = clock()
        route[i] = t1 - t0
        both[i] = t2 - t0
    return {"route": _stats(route), "route+finished": _stats(both)}


def _timed_in_flight(
    r: Router, n: int, prompts: list[npt.NDArray[np.uint64]], depth: int
) -> dict[str, list[float]]:
    """route() with ``depth`` requests in flight: each call routes one, then the oldest finishes."""
    route = np.empty(n)
    both = np.empty(n)
    clock = time.perf_counter_ns
    warm = min(n // 10, 500) + depth
    for i in range(-warm, n):
        request = Request(i, block_hashes=prompts[i % len(prompts)])
        t0 = clock()
        r.route(request)
        t1 = clock()
        if i - depth >= -warm:
            r.finished(i - depth)
        t2 = clock()
        if i >= 0:
            route[i] = t1 - t0
            both[i] = t2 - t0
    return {"route": _stats(route), "route+finished": _stats(both)}


def _stats(ns: npt.NDArray[np.float64]) -> list[float]:
    p50, p99 = np.percentile(ns, [50, 99]) / 1000
    return [float(p50), float(p99), float(ns.mean() / 1000)]


def _plain(fn: Callable[[], Any], n: int) -> list[float]:
    for _ in range(min(n // 10, 500)):
        fn()
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t0
    return _stats(out)


def _spin(steps: int = 300) -> int:
    total = 0
    for i in range(steps):
        total += i
    return total


def measure(workers: int, blocks: int, n: int, py: bool) -> dict[str, list[float]]:
    """Every case once: ``{case: [p50, p99, mean]}`` in microseconds."""
    out: dict[str, list[float]] = {}
    a = np.zeros(16)
    out["calibration: one 16-element numpy add"] = _plain(lambda: a + 1.0, 20_000)
    # Fixed pure-Python work about as long as the router's own bookkeeping: its
    # p99 / p50 is the host's tail for a call of that length, whatever the code.
    out["calibration: a 300-step Python loop"] = _plain(_spin, 20_000)
    for mod in INDEXES if py else INDEXES[:1]:
        name = "" if mod is INDEXES[0] else " [py index]"
        for policy in POLICIES:
            r, tokens, hashes = build(mod, workers, blocks, policy)
            for what, st in _timed(r, n, block_hashes=hashes).items():
                out[f"{what}, precomputed hashes, {policy}{name}"] = st
        r, tokens, hashes = build(mod, workers, blocks)
        for what, st in _timed(r, max(n // 4, 1), tokens=tokens).items():
            out[f"{what}, hashing 32k tokens, kvroute{name}"] = st
        cold = hashes.copy()
        cold[0] ^= np.uint64(1)  # no worker holds block 0: the router's own overhead
        for what, st in _timed(r, n, block_hashes=cold).items():
            out[f"{what}, cold prompt (no match), kvroute{name}"] = st
        # 512 requests in flight: 64 sessions, each a 1,024-block history (its first 64
        # blocks the shared system prompt) and 8 turns of 128 more blocks
        rng = np.random.default_rng(1)
        sessions = [
            np.concatenate([hashes[:64], rng.integers(1, 2**63, 960, dtype=np.uint64)])
            for _ in range(64)
        ]
        prompts = [
            np.concatenate([s, rng.integers(1, 2**63, 128 * (t + 1), dtype=np.uint64)])
            for t in range(8)
            for s in sessions
        ]
        r, _, _ = build(mod, workers, blocks)
        for what, st in _timed_in_flight(r, n, prompts, 512).items():
            out[f"{what}, 512 in flight, kvroute{name}"] = st
        ids = r._load.ids_frozen
        out[f"index.match_array alone{name}"] = _plain(
            functools.partial(r.index.match_array, hashes, ids), n
        )
        out[f"kvroute_block_hashes alone, 32k tokens{name}"] = _plain(
            functools.partial(kvroute_block_hashes, tokens, BLOCK), max(n // 4, 1)
        )
    return out


def _median(rounds: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    keys = [k for k in rounds[0] if all(k in r for r in rounds)]
    return {k: [float(np.median([r[k][j] for r in rounds])) for j in range(3)] for k in keys}


def _one_round(pythonpath: str | None, argv: list[str]) -> dict[str, list[float]]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--json", *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, list[float]] = json.loads(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--small", action="store_true", help="16 workers, 10k blocks")
    ap.add_argument("-n", type=int, default=10_000, help="timed calls per case (default 10000)")
    ap.add_argument("--py", action="store_true", help="also the pure-Python index")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, each in a fresh process")
    ap.add_argument("--baseline", metavar="DIR", help="also time the kvroute package in DIR")
    ap.add_argument("--save", metavar="PATH", help="also write every round's figures as JSON")
    ap.add_argument("--json", action="store_true", help="print one round as JSON (internal)")
    args = ap.parse_args()
    workers, blocks = (16, 10_000) if args.small else (256, 1_000_000)
    if args.json:
        print(json.dumps(measure(workers, blocks, args.n, args.py)))
        return
    argv = ["-n", str(args.n)] + (["--small"] if args.small else []) + (["--py"] if args.py else [])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this tree": here}
    if args.baseline:
        trees = {"baseline": os.path.abspath(args.baseline), **trees}
    rounds: dict[str, list[dict[str, list[float]]]] = {t: [] for t in trees}
    order = list(trees.items())
    for k in range(args.rounds):
        # alternate, first one tree then the other (ABBA...), so both see the same load
        for tree, path in order if k % 2 == 0 else order[::-1]:
            rounds[tree].append(_one_round(path, argv))
            print(f"round {k + 1}/{args.rounds}: {tree} done", file=sys.stderr)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(rounds, f, indent=1)
    med = {t: _median(r) for t, r in rounds.items()}
    print(
        f"{workers} workers, {blocks:,} blocks, prompt {PROMPT_TOKENS} tokens / block {BLOCK}; "
        f"-n {args.n}; medians over {args.rounds} round(s) of p50 / p99 / mean, in us"
    )
    names = list(trees)
    cases = [c for c in med[names[-1]] if all(c in med[t] for t in names)]
    head = f"{'case':62}" + "".join(f" | {t:>24}" for t in names)
    if len(names) == 2:
        head += " | after/before p50, p99"
    print(head)
    for case in cases:
        row = f"{case:62}" + "".join(
            " | {:7.1f} {:7.1f} {:7.1f}".format(*med[t][case]) for t in names
        )
        if len(names) == 2:
            b, a = med[names[0]][case], med[names[1]][case]
            row += f" | {a[0] / b[0]:5.2f} {a[1] / b[1]:5.2f}"
        print(row)


if __name__ == "__main__":
    main()

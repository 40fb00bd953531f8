"""The KV-event path: decoding vLLM batches, and applying them to a Router.

The stream is what a vLLM 0.33 worker publishes while serving agent-style
traffic: each request stores the blocks of its prompt that were not cached
yet (one ``BlockStored`` per request, chained to its parent by the engine's
hash, with the blocks' token ids), and evictions remove single blocks. The
payloads are encoded exactly as vLLM's publisher encodes them (msgspec maps,
``[ts, events, dp_rank]``), so decoding cost is the real one.

Measured, per batch: ``decode_vllm`` alone; ``EventApplier.apply_batch``
alone (kvroute hashing of the token ids, parent resolution, index store /
remove); and the two together. Reported in blocks per second by the script::

    python benchmarks/bench_events.py            # 20k requests of ~2k tokens
    python benchmarks/bench_events.py --small

Under pytest (``--benchmark-disable`` in the normal run) the stream is small.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from kvroute import Router
from kvroute.events import EventApplier, decode_vllm

BLOCK = 16


def _stored(hashes: list[int], parent: int | None, tokens: list[int]) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BLOCK,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None] * len(hashes),
        "group_idx": 0,
    }


def _removed(h: int) -> dict[str, Any]:
    return {
        "type": "BlockRemoved",
        "block_hashes": [h],
        "medium": "GPU",
        "group_idx": 0,
    }


def build_stream(requests: int, seed: int = 0) -> tuple[list[bytes], int]:
    """vLLM payloads for ``requests`` session turns; returns them and the block count.

    Sessions share a 4k-token harness prefix; each turn re-sends its session's
    history and adds ~30 new blocks. The engine hash of a block is a counter
    (its value does not matter to kvroute, only its identity).
    """
    rng = np.random.default_rng(seed)
    enc = msgspec.msgpack.Encoder()
    harness = rng.integers(0, 150_000, 4096).tolist()
    next_hash = 1
    sessions: dict[int, tuple[list[int], list[int]]] = {}  # tokens, engine hashes
    payloads: list[bytes] = []
    live: deque[int] = deque()
    blocks = 0
    for i in range(requests):
        sid = int(rng.integers(0, 64))
        # a new session stores the harness again, under hashes of its own
        tokens, hashes = sessions.get(sid, (list(harness), []))
        tokens = tokens + rng.integers(0, 150_000, int(rng.integers(300, 700))).tolist()
        start = len(hashes)
        n = len(tokens) // BLOCK
        new = list(range(next_hash, next_hash + n - start))
        next_hash += len(new)
        parent = hashes[-1] if hashes else None
        events = [_stored(new, parent, tokens[start * BLOCK : n * BLOCK])]
        blocks += len(new)
        live.extend(new)
        # keep about 200k blocks resident: evict the oldest
        while len(live) > 200_000:
            events.append(_removed(live.popleft()))
            blocks += 1
        sessions[sid] = (tokens, hashes + new)
        if len(tokens) > 60_000:  # compaction: the session starts over
            del sessions[sid]
        payloads.append(enc.encode([float(i), events, 0]))
    return payloads, blocks


def _run(payloads: list[bytes], decode: bool, apply: bool) -> Callable[[], None]:
    batches = [decode_vllm(p) for p in payloads]

    def go() -> None:
        router = Router(block_size=BLOCK, workers=[0])
        ap = EventApplier(router)
        for p, b in zip(payloads, batches, strict=True):
            batch = decode_vllm(p) if decode else b
            if apply:
                ap.apply_batch(0, batch)

    return go


def bench_decode_vllm(benchmark: Any) -> None:
    payloads, _ = build_stream(200)
    benchmark(_run(payloads, decode=True, apply=False))


def bench_apply_batches(benchmark: Any) -> None:
    payloads, _ = build_stream(200)
    benchmark(_run(payloads, decode=False, apply=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="2k requests instead of 20k")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    args = ap.parse_args()
    payloads, blocks = build_stream(2_000 if args.small else 20_000)
    mb = sum(map(len, payloads)) / 1e6
    print(f"{len(payloads)} batches, {blocks:,} block events, {mb:.1f} MB of msgpack")
    for name, dec, app in (("decode", True, False), ("apply", False, True), ("both", True, True)):
        fn = _run(payloads, dec, app)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        print(f"{name:>7}: {t:6.2f} s  {blocks / t / 1e6:6.2f} M blocks/s  {mb / t:7.1f} MB/s")


if __name__ == "__main__":
    main()

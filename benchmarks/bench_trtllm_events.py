"""TensorRT-LLM's KV events: decoding both shapes, and applying them, beside vLLM's.

The stream is bench_events.py's (agent-style session turns; one stored event
per request, single-block evictions), published the two ways TensorRT-LLM
publishes it:

- **streamed**: the msgpack batches of its ZMQ publisher; the same payloads
  decode as vLLM's and TensorRT-LLM's (the event maps differ only in fields
  neither decoder reads), so ``decode_trtllm`` and ``decode_vllm`` are timed
  on identical bytes;
- **polled**: one JSON answer of ``POST /kv_cache_events`` per batch (each
  request's ``removed`` and ``stored`` dict events, tokens as
  ``{"token_id", "token_extra_id"}`` objects), parsed and fed event by event
  through ``TrtllmApplier.feed``, as ``HttpEventPoller`` does (the answer
  split into its events' JSON texts in C, each decoded with msgspec).

Reported in blocks per second, medians of ``--repeat`` runs, and as ratios to
vLLM's path measured in the same run (the machines are shared and noisy)::

    python benchmarks/bench_trtllm_events.py            # 20k requests of ~2k tokens
    python benchmarks/bench_trtllm_events.py --small

Not measured: HTTP itself (the poller's round trip per answer), and ZMQ.
Under pytest (``--benchmark-disable`` in the normal run) the stream is small.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
from bench_events import BLOCK, build_stream

from kvroute import Router
from kvroute.events import EventApplier, decode_trtllm, decode_vllm
from kvroute.events.trtllm_apply import TrtllmApplier


def polled_answers(payloads: list[bytes]) -> list[bytes]:
    """Each streamed batch as the JSON answer ``/kv_cache_events`` would give for it."""
    answers = []
    event_id = 0
    for payload in payloads:
        _, events, _ = msgspec.msgpack.decode(payload)
        out: list[dict[str, Any]] = []
        removed = [h for e in events if e["type"] == "BlockRemoved" for h in e["block_hashes"]]
        for e in events:
            if e["type"] != "BlockStored":
                continue
            toks = e["token_ids"]
            blocks = [
                {
                    "type": "stored_block",
                    "block_hash": h,
                    "tokens": [
                        {"type": "unique_token", "token_id": t, "token_extra_id": 0}
                        for t in toks[i * BLOCK : (i + 1) * BLOCK]
                    ],
                    "cache_level": 0,
                    "priority": 35,
                    "mm_keys": [],
                    "cache_salt": None,
                }
                for i, h in enumerate(e["block_hashes"])
            ]
            data = {"type": "stored", "parent_hash": e["parent_block_hash"], "blocks": blocks}
            out.append({"event_id": 0, "window_size": 65536, "data": data})
        if removed:  # the engine flushes its coalesced removals before a store
            out.insert(0, {"event_id": 0, "window_size": 65536,
                           "data": {"type": "removed", "block_hashes": removed}})  # fmt: skip
        for ev in out:
            ev["event_id"] = event_id
            event_id += 1
        answers.append(json.dumps(out).encode())
    return answers


def streamed(
    payloads: list[bytes], decode: Callable[[bytes], Any], apply: bool
) -> Callable[[], None]:
    def go() -> None:
        ap = EventApplier(Router(block_size=BLOCK, workers=[0]))
        for p in payloads:
            batch = decode(p)
            if apply:
                ap.apply_batch(0, batch)

    return go


def polled(answers: list[bytes], apply: bool) -> Callable[[], None]:
    """What ``HttpEventPoller`` does with each answer: split it, decode (and apply) each event."""
    split = msgspec.json.Decoder(list[msgspec.Raw])

    def go() -> None:
        router = Router(block_size=BLOCK, workers=[0])
        ap = TrtllmApplier(router, 0)
        for body in answers:
            for raw in split.decode(body):
                if apply:
                    ap.feed(memoryview(raw))
                else:
                    decode_trtllm(memoryview(raw))

    return go


def bench_decode_streamed(benchmark: Any) -> None:
    payloads, _ = build_stream(200)
    benchmark(streamed(payloads, decode_trtllm, apply=False))


def bench_feed_polled(benchmark: Any) -> None:
    payloads, _ = build_stream(200)
    benchmark(polled(polled_answers(payloads), apply=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="2k requests instead of 20k")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    args = ap.parse_args()
    payloads, blocks = build_stream(2_000 if args.small else 20_000)
    answers = polled_answers(payloads)
    mb, json_mb = sum(map(len, payloads)) / 1e6, sum(map(len, answers)) / 1e6
    print(
        f"{len(payloads)} batches, "
        f"{blocks:,} block events; {mb:.1f} MB msgpack, {json_mb:.1f} MB JSON"
    )
    runs = {
        "vllm decode (streamed)": streamed(payloads, decode_vllm, apply=False),
        "trtllm decode (streamed)": streamed(payloads, decode_trtllm, apply=False),
        "vllm decode+apply (streamed)": streamed(payloads, decode_vllm, apply=True),
        "trtllm decode+apply (streamed)": streamed(payloads, decode_trtllm, apply=True),
        "trtllm decode (polled)": polled(answers, apply=False),
        "trtllm decode+feed (polled)": polled(answers, apply=True),
    }
    rates = {}
    for name, fn in runs.items():
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        rates[name] = blocks / t
        print(f"{name:>32}: {t:6.2f} s  {blocks / t / 1e6:6.2f} M blocks/s")
    base = rates["vllm decode+apply (streamed)"]
    for name in ("trtllm decode+apply (streamed)", "trtllm decode+feed (polled)"):
        print(f"{name:>32}: {rates[name] / base:5.2f}x vLLM's decode+apply")


if __name__ == "__main__":
    main()

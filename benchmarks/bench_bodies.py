"""Big request bodies: how long parsing them holds up the proxy's event loop.

Three concurrent 27 MiB token-id prompts used to delay ``/health`` by
1.95 s (issue 16). Measured here, in-process: while ``n`` bodies are parsed
concurrently, a ticker on the same event loop wakes every millisecond; the
longest gap between its wake-ups is how long any other request (``/health``,
a small completion) would have waited. Two ways of parsing are compared:

- ``inline``: what the proxy did before, on the loop: ``json.loads``, the
  token-id check (``prompt_token_ids``) and the block hashing;
- ``kvroute``: :func:`kvroute.proxy.bodies.parse_body` (the ids parsed by
  numpy in a thread, a megabyte at a time) and the hashing in a thread, as
  :class:`~kvroute.proxy.prepare.Preparer` does.

The bound the proxy aims at is a stall of about 100 ms with three 27 MiB
bodies at once::

    python benchmarks/bench_bodies.py                 # 3 x 27 MiB
    python benchmarks/bench_bodies.py --mib 8 --concurrent 1

What it does not measure: reading the bodies from sockets and sending them
on (done in 1 MiB pieces), and the GIL taken by other threads of the process
(the numbers are from one process with nothing else running in it). The
fault-injection script (``scripts/faults.py big-bodies``) measures
``/health`` on a real proxy process. Under pytest the bodies are 2 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import pytest

from kvroute.hashing import kvroute_block_hashes
from kvroute.proxy.bodies import TokenIds, parse_body
from kvroute.proxy.tokenize import prompt_token_ids

BLOCK = 16


def token_id_body(mib: float, seed: int = 0) -> bytes:
    """A ``/v1/completions`` body of about ``mib`` MiB: a prompt of random token ids."""
    rng = random.Random(seed)
    n = int(mib * (1 << 20) / 7)  # ids below 150k: about 7 bytes each with ", "
    ids = [rng.randrange(0, 150_000) for _ in range(n)]
    return json.dumps({"model": "m", "prompt": ids, "max_tokens": 1}).encode()


async def _inline(raw: bytes) -> int:
    body = json.loads(raw)
    ids = prompt_token_ids(body)
    assert ids is not None
    return len(kvroute_block_hashes(ids, BLOCK))


async def _kvroute(raw: bytes) -> int:
    body = await parse_body(raw, token_ids=True)
    prompt = body["prompt"]
    assert isinstance(prompt, TokenIds)
    hashes = await asyncio.to_thread(kvroute_block_hashes, prompt.ids, BLOCK)
    return len(hashes)


WAYS = {"inline": _inline, "kvroute": _kvroute}


async def stall(raw: bytes, way: str, concurrent: int) -> dict[str, float]:
    """Parse ``concurrent`` copies of ``raw`` at once; the loop's longest stall meanwhile.

    :returns: ``stall_ms`` (longest gap beyond the ticker's 1 ms) and ``total_ms``.
    """
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            gaps.append(time.perf_counter() - t0 - 0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await asyncio.gather(*(WAYS[way](raw) for _ in range(concurrent)))
    total = time.perf_counter() - t0
    done.set()
    await ticker
    return {"stall_ms": max(gaps) * 1000, "total_ms": total * 1000}


@pytest.fixture(scope="module")
def body() -> bytes:
    return token_id_body(2)


@pytest.mark.parametrize("way", list(WAYS))
def test_stall_while_three_bodies_are_parsed(benchmark: Any, body: bytes, way: str) -> None:
    result = benchmark(lambda: asyncio.run(stall(body, way, 3)))
    benchmark.extra_info.update(result)
    assert result["total_ms"] > 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=27.0, help="body size in MiB (default: 27)")
    p.add_argument("--concurrent", type=int, default=3, help="bodies at once (default: 3)")
    p.add_argument("--repeat", type=int, default=5, help="runs per way; medians (default: 5)")
    args = p.parse_args()
    raw = token_id_body(args.mib)
    print(f"{args.concurrent} x {len(raw) / (1 << 20):.1f} MiB token-id bodies, "
          f"{args.repeat} runs each, medians")  # fmt: skip
    print(f"{'way':>8}  {'loop stall ms':>14}  {'total ms':>9}")
    for way in WAYS:
        runs = [asyncio.run(stall(raw, way, args.concurrent)) for _ in range(args.repeat)]
        med = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
        print(f"{way:>8}  {med['stall_ms']:>14.0f}  {med['total_ms']:>9.0f}")


if __name__ == "__main__":
    main()

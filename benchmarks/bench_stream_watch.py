"""Watching a worker's SSE stream as it passes: what the proxy does to every streamed chunk.

The stream is a vLLM chat completion of ``--tokens`` tokens as the mock
worker writes it (a role chunk, one chunk a token, the usage chunk the proxy
asked for, ``[DONE]``), ~240 bytes an event. It is fed to
:class:`~kvroute.proxy.openai.OpenAIStream` in ``pieces`` reads: 1 (a whole
answer in one read, as from a worker without token pacing on loopback), 9,
or one event a read (an engine pacing its tokens). Two watchers:

- ``eager``: every event parsed as it passes (a watcher with an ``on_event``
  that cannot wait: migration's transcript);
- ``lazy``: the proxy's default: only the first content, usage, errors and
  the end are parsed on the way (the rest when settled, if ever).

Each run strips the usage chunk (the client did not ask for it) and flushes::

    python benchmarks/bench_stream_watch.py
    python benchmarks/bench_stream_watch.py --tokens 512

Not measured: reading the chunks from the socket and writing them to the
client (aiohttp's, the same for a bare relay).
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable
from typing import Any

import pytest

from kvroute.proxy.openai import OpenAIStream

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


def stream(tokens: int) -> bytes:
    """A chat completion stream of ``tokens`` tokens, with its usage chunk and ``[DONE]``."""
    head = {"id": "chatcmpl-0123456789abcdef01234567", "object": "chat.completion.chunk",
            "created": 1796683578, "model": "mock-model"}  # fmt: skip

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

    def choice(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    out = [event([choice({"role": "assistant", "content": ""})])]
    for i in range(tokens):
        finish = "length" if i == tokens - 1 else None
        out.append(event([choice({"content": " " + WORDS[i % len(WORDS)]}, finish)]))
    usage = {"prompt_tokens": 603, "total_tokens": 603 + tokens, "completion_tokens": tokens,
             "prompt_tokens_details": {"cached_tokens": 592}}  # fmt: skip
    out.append(event([], usage=usage))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def pieces(data: bytes, n: int) -> list[bytes]:
    """``data`` cut into ``n`` reads of about equal size (0: one event a read)."""
    if n == 0:
        return [e + b"\n\n" for e in data.split(b"\n\n")[:-1]]
    size = -(-len(data) // n)
    return [data[i : i + size] for i in range(0, len(data), size)]


def watch(reads: list[bytes], lazy: bool) -> Callable[[], None]:
    """One answer's watching: every read fed, then the end."""

    def go() -> None:
        s = OpenAIStream(strip_usage=True, on_event=None if lazy else _drop)
        for r in reads:
            s.feed(r)
        s.flush()
        assert s.done and s.usage is not None

    return go


def _drop(event: object) -> None:
    pass


@pytest.mark.parametrize("n", [1, 9, 0], ids=["whole", "9-reads", "event-a-read"])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def bench_stream_watch(benchmark: Any, n: int, lazy: bool) -> None:
    benchmark(watch(pieces(stream(32), n), lazy))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="tokens in the answer (default: 32)")
    ap.add_argument("--repeat", type=int, default=7, help="timings per figure (median)")
    args = ap.parse_args()
    data = stream(args.tokens)
    print(f"{args.tokens} tokens, {len(data)} bytes; microseconds per answer (median)")
    print(f"{'reads':>14} {'lazy':>8} {'eager':>8}")
    for n, name in ((1, "whole"), (9, "9"), (0, "one an event")):
        row = []
        for lazy in (True, False):
            fn = watch(pieces(data, n), lazy)
            number = max(1, 20_000 // (args.tokens + 4))
            times = timeit.repeat(fn, number=number, repeat=args.repeat)
            row.append(sorted(times)[len(times) // 2] / number * 1e6)
        print(f"{name:>14} {row[0]:8.1f} {row[1]:8.1f}")


if __name__ == "__main__":
    main()

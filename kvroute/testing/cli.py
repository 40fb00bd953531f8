"""``kvroute mock-worker``: a GPU-free vLLM stand-in on this machine, from the command line.

Starts one :class:`~kvroute.testing.MockWorker` (HTTP on ``127.0.0.1``, KV
events over ZMQ), prints its addresses and the ``--worker`` argument that
points ``kvroute proxy`` at it, and serves until SIGINT or SIGTERM, then
closes every socket and exits 0. Like the rest of this module's parser, it
imports nothing heavy until :func:`run`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Final, TextIO

from .._cli import int_at_least

__all__ = ["DESCRIPTION", "EPILOG", "configure", "run", "worker_options"]

DESCRIPTION: Final = """\
A GPU-free stand-in for a vLLM worker, on 127.0.0.1: vLLM's OpenAI API
(/v1/completions, /v1/chat/completions, /v1/responses, /v1/embeddings),
Anthropic's /v1/messages, /tokenize, /detokenize, the render endpoints,
/v1/models, /health and /metrics, with a prefix cache that publishes vLLM's
KV events over ZMQ. Replies are deterministic words, one per output token,
paced by the latency knobs. For trying kvroute out and for tests: it runs no
model.
"""

EPILOG: Final = """\
examples:
  kvroute mock-worker --port 8001 --events-port 5557 --replay-port 5558
  kvroute mock-worker --port 8002 --events-port 5567 --replay-port 5568 \\
                      --token-delay 0.02 --prefill-speed 20000 --num-blocks 4096

Each start prints the worker's URLs and the argument for the proxy:
  kvroute proxy --worker http://127.0.0.1:8001=tcp://127.0.0.1:5557,tcp://127.0.0.1:5558

exit status: 0 stopped (SIGINT and SIGTERM shut down cleanly), 2 bad usage or a port in use.
"""


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``mock-worker``'s arguments to ``parser``."""
    net = parser.add_argument_group("addresses (all on 127.0.0.1; 0 picks a free port)")
    net.add_argument("--port", type=int_at_least(0), default=8001, help="HTTP port (8001)")
    net.add_argument("--events-port", type=int_at_least(0), default=5557,
                     help="ZMQ KV-event publisher port (5557)")  # fmt: skip
    net.add_argument("--replay-port", type=int_at_least(0), default=5558,
                     help="ZMQ replay port (5558)")  # fmt: skip
    net.add_argument("--no-events", action="store_true",
                     help="publish no KV events (the proxy then predicts residency)")  # fmt: skip
    model = parser.add_argument_group("the model it pretends to serve")
    model.add_argument("--model", default="mock-model", help="served model name (mock-model)")
    model.add_argument("--lora-adapter", action="append", default=[], metavar="NAME",
                       help="a LoRA adapter served on top of the model (repeatable)")  # fmt: skip
    model.add_argument("--max-model-len", type=int_at_least(1), default=32768,
                       help="longest prompt + output accepted (32768)")  # fmt: skip
    model.add_argument("--max-tokens", type=int_at_least(1), default=16,
                       help="output tokens when a request gives none (16)")  # fmt: skip
    cache = parser.add_argument_group("prefix cache")
    cache.add_argument("--block-size", type=int_at_least(1), default=16,
                       help="tokens per KV block; the proxy's --block-size must match (16)")
    cache.add_argument("--num-blocks", type=int_at_least(1), default=1024,
                       help="prefix-cache capacity in blocks (1024), LRU beyond")  # fmt: skip
    latency = parser.add_argument_group("latency")
    latency.add_argument("--token-delay", type=_non_negative, default=0.001, metavar="SECONDS",
                         help="seconds per generated token (0.001)")  # fmt: skip
    latency.add_argument("--prefill-speed", type=_non_negative, default=100_000.0,
                         metavar="TOKENS_PER_S",
                         help="uncached prompt tokens prefilled per second; 0: instant (100000)")


def worker_options(args: argparse.Namespace) -> dict[str, Any]:
    """``MockWorker`` keyword arguments from the parsed command line.

    >>> import argparse
    >>> p = argparse.ArgumentParser(); configure(p)
    >>> opts = worker_options(p.parse_args(["--prefill-speed", "20000", "--no-events"]))
    >>> opts["prefill_delay_per_token"], opts["publish_events"], opts["port"]
    (5e-05, False, 8001)
    """
    speed = args.prefill_speed
    return {
        "model": args.model,
        "lora_adapters": tuple(args.lora_adapter),
        "block_size": args.block_size,
        "num_blocks": args.num_blocks,
        "port": args.port,
        "events_port": args.events_port,
        "replay_port": args.replay_port,
        "max_model_len": args.max_model_len,
        "default_max_tokens": args.max_tokens,
        "token_delay": args.token_delay,
        "prefill_delay_per_token": 1.0 / speed if speed else 0.0,
        "publish_events": not args.no_events,
    }


def run(
    args: argparse.Namespace,
    *,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve one mock worker until SIGINT or SIGTERM (or ``stop`` is set); returns 0.

    :param out: where the addresses are printed (default: standard output).
    :param stop: set it to stop (for callers on another thread; the signal
        handlers are installed only on the main thread).
    :raises OSError: a port is taken.
    :raises ImportError: the ``testing`` extra is not installed.
    """
    from .mock_worker import MockWorker

    out = sys.stdout if out is None else out
    stop = threading.Event() if stop is None else stop
    worker = MockWorker(**worker_options(args))
    restore: list[tuple[signal.Signals, Callable[..., Any] | int | None]] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            restore.append((signum, signal.signal(signum, lambda *_: stop.set())))
    try:
        worker.start()
        _announce(worker, out)
        while not stop.wait(0.5):
            pass
        print(f"mock-worker {worker.url}: stopping", file=out, flush=True)
    finally:
        worker.stop()
        for signum, handler in restore:
            signal.signal(signum, handler)
    return 0


def _announce(worker: Any, out: TextIO) -> None:
    events, replay = worker.events_endpoint, worker.replay_endpoint
    lines = [
        f"mock-worker {worker.url}: serving {worker.model!r}"
        f" (block size {worker.block_size}, {worker.num_blocks} blocks)",
        f"  KV events: {events or 'off'}" + (f", replay: {replay}" if replay else ""),
        "  for the proxy: --worker "
        + worker.url
        + (f"={events}" if events else "")
        + (f",{replay}" if events and replay else ""),
    ]
    print("\n".join(lines), file=out, flush=True)

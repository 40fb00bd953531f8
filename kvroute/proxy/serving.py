"""The proxy in the foreground (``kvroute proxy``): bind, announce, serve, drain on a signal, stop.

:func:`serve` runs a :class:`~kvroute.proxy.app.ProxyApp` until SIGINT or
SIGTERM:

1. start the application (access log, KV-event subscriber, upstream
   connections, a first health round), then bind the port. A port that
   cannot be bound (in use, not permitted) raises :class:`ListenError`
   after the start is undone, and nothing was announced;
2. announce it, once listening: one line with the URL, the workers (id,
   label, health), the policy and its parameters, KV events on or off, how
   prompts are tokenized and where the settings came from (:func:`start_line`);
   then tune Python's cyclic garbage collector for serving (:func:`tune_gc`);
3. on the first signal, log it with the requests in flight, and drain:
   ``/readyz`` answers 503 from then on; after SIGTERM the proxy keeps
   accepting requests for ``shutdown_delay`` seconds (so a load balancer that
   polls readiness takes it out first), then stops accepting, and waits up
   to ``shutdown_timeout`` seconds for the requests in flight to finish. A
   second signal ends the waiting;
4. stop (what is still running is cut), log ``stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import DEFAULT_GC_THRESHOLD
from .connections import GuardedSite, server_options

if TYPE_CHECKING:
    from .app import ProxyApp

__all__ = ["ListenError", "plural", "serve", "start_line", "tune_gc"]

log = logging.getLogger("kvroute.proxy")


class ListenError(OSError):
    """The proxy could not listen on its address (the port is in use, say)."""


def plural(n: int, noun: str) -> str:
    """``1 worker``, ``2 workers``.

    >>> plural(1, "worker"), plural(0, "request")
    ('1 worker', '0 requests')
    """
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def start_line(proxy: ProxyApp, url: str, source: str | None = None) -> str:
    """What the proxy says once listening.

    :param proxy: the proxy.
    :param url: where it listens.
    :param source: where its settings came from (``proxy.toml + command line``).
    """
    config = proxy.config
    states = list(proxy.pool.workers.values())
    healthy = sum(s.healthy for s in states)
    workers = ", ".join(
        f"{s.id}={s.spec.label}{'' if s.healthy else ' (unhealthy)'}" for s in states
    )
    policy = proxy.router.policy.name
    if config.policy_params:
        policy += "(" + ", ".join(f"{k}={v}" for k, v in config.policy_params.items()) + ")"
    events = (
        f"KV events on ({config.events_format})"
        if proxy.events.enabled
        else "KV events off (approximate mode)"
    )
    parts = [
        f"kvroute proxy listening on {url}",
        f"{plural(len(states), 'worker')} ({healthy} healthy: {workers})",
        f"policy {policy}",
        events,
        "tokenizing " + ("locally" if proxy.tokenizer is not None else "on the workers"),
        f"access log {config.access_log}" + (", tracing on" if config.tracing else ""),
    ]
    if source:
        parts.append(f"settings from {source}")
    return "; ".join(parts)


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait for the first of ``aws`` to finish; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def tune_gc(threshold: int) -> None:
    """Keep Python's cyclic garbage collector off the proxy's start-up heap, and run it less often.

    Every object alive once the proxy serves (modules, the application, the
    router and its tables, compiled templates) lives as long as the process:
    :func:`gc.freeze` moves them to a generation the collector never scans,
    so the rare full collection walks only what serving made since. A request
    allocates thousands of short-lived containers, nearly all freed by their
    reference counts; with the young generation collected every
    ``threshold`` allocations instead of every 700, fewer of them live long
    enough to be promoted and traced again and again. What cycles the
    proxy leaves behind are still collected, later. Measured with
    ``benchmarks/bench_proxy_cpu.py`` (its streamed agent sessions): Python's
    defaults collected 79 times in about 3,500 requests (0.125 s, some 36 us
    a request, 2% of the proxy's CPU); tuned, not once.

    >>> before = gc.get_threshold()
    >>> tune_gc(20_000)
    >>> gc.get_threshold()[0], gc.get_freeze_count() > 0
    (20000, True)
    >>> gc.unfreeze(); gc.set_threshold(*before)

    :param threshold: allocations between young-generation collections
        (> 0); the older generations' thresholds are kept.
    :raises ValueError: ``threshold`` <= 0.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    gc.collect()  # what start-up left as garbage is not frozen with the rest
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)


async def serve(
    proxy: ProxyApp,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = 30.0,
    shutdown_delay: float = 0.0,
    source: str | None = None,
    gc_threshold: int = DEFAULT_GC_THRESHOLD,
) -> None:
    """Serve ``proxy`` on ``host:port`` until SIGINT or SIGTERM, then drain and stop.

    :param proxy: the proxy.
    :param host: the address to listen on.
    :param port: the port (0: any free one).
    :param shutdown_timeout: seconds the requests in flight get to finish once
        the listener is closed.
    :param shutdown_delay: seconds to keep accepting requests after SIGTERM
        (``/readyz`` answers 503 meanwhile).
    :param source: where the settings came from, for the start line.
    :param gc_threshold: :func:`tune_gc`'s, once listening; 0 leaves the
        collector as Python set it.
    :raises ListenError: the address cannot be bound.
    """
    runner = web.AppRunner(
        proxy.make_app(),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
        **server_options(proxy.config),
    )
    await runner.setup()
    # the guarded site enforces the connection cap and the header deadline (connections.py)
    site = GuardedSite(runner, host, port, proxy.connections)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
    shown = f"[{host}]" if ":" in host else host
    log.info("%s", start_line(proxy, f"http://{shown}:{site.port}", source))
    if gc_threshold:
        tune_gc(gc_threshold)
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[str] = asyncio.Queue()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, received.put_nowait, sig.name)
    try:
        name = await received.get()
        n = proxy.observer.in_flight
        timeout = shutdown_timeout
        log.info("%s received: draining %s (up to %gs)", name, plural(n, "request"), timeout)
        proxy.probes.drain()
        if name == "SIGTERM" and shutdown_delay > 0:
            log.info("accepting requests for %gs more while /readyz answers 503", shutdown_delay)
            await _first(received.get(), asyncio.sleep(shutdown_delay))
        await site.stop()  # no new connections
        if received.empty():
            await _first(received.get(), proxy.observer.wait_idle(shutdown_timeout))
        left = proxy.observer.in_flight
    finally:
        for sig in signals:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
    proxy.observer.stopping = True
    await runner.cleanup()
    log.info("stopped%s", f": {plural(left, 'request')} cut off" if left else "")

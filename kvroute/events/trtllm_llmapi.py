"""``LlmApiFeed``: KV events from TensorRT-LLM's LLM API, in the engine's own process.

A program that runs ``tensorrt_llm.LLM`` itself (with
``KvCacheConfig(event_buffer_max_size=N, enable_block_reuse=True)``) and routes
with kvroute in the same process reads the events straight from the engine:
``LLM.get_kv_cache_events_async(timeout)`` yields the buffered events as
dicts, draining the engine's queue. Draining makes this a **single consumer**:
whatever else drains that queue (another feed, ``trtllm-serve``'s
``/kv_cache_events``) steals events from this one, which then sees gaps.

:meth:`LlmApiFeed.run` is the loop to start beside the engine (an asyncio
task); :meth:`LlmApiFeed.consume` takes any async iterator of events, and
:meth:`LlmApiFeed.feed` one event, for a program that already drains the
queue for other uses. Each event goes through a
:class:`~kvroute.events.trtllm_apply.TrtllmApplier` (windows, attention-DP
ranks, partial blocks, tiers, gaps). It runs on the event loop that feeds it;
the index updates take the router's lock briefly, as the ZMQ subscriber's do.

Needs ``msgspec`` (the ``serve`` extra) for the decoder module, not pyzmq.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .trtllm_apply import TrtllmApplier

if TYPE_CHECKING:
    from ..router import Router
    from .metrics import Metrics

__all__ = ["KvEventSource", "LlmApiFeed"]


class KvEventSource(Protocol):
    """What :meth:`LlmApiFeed.run` needs of ``tensorrt_llm.LLM``."""

    def get_kv_cache_events_async(self, timeout: float | None = ..., /) -> AsyncIterable[Any]:
        """The buffered KV-cache events (dicts), draining the engine's queue."""
        ...


#: What TensorRT-LLM's async iterator raises when its queue is empty (it
#: changed across releases), which ends one drain rather than the loop.
_EMPTY = (IndexError, asyncio.QueueEmpty, asyncio.TimeoutError, TimeoutError)


class LlmApiFeed:
    """Feed ``router`` the KV events of a TensorRT-LLM ``LLM`` running in this process.

    >>> import asyncio
    >>> from kvroute import Router
    >>> async def drained():   # what LLM.get_kv_cache_events_async(timeout) yields
    ...     yield {"event_id": 0, "data": {"type": "stored", "parent_hash": None,
    ...            "blocks": [{"block_hash": 7, "tokens": [{"token_id": 1}, {"token_id": 2}]}]}}
    >>> router = Router(block_size=2, workers=[0])
    >>> feed = LlmApiFeed(router, 0)
    >>> asyncio.run(feed.consume(drained()))
    1
    >>> router.index.worker_len(0)
    1

    With the engine itself: ``task = asyncio.create_task(feed.run(llm))``, and
    ``feed.stop()`` (or cancelling the task) to end it.

    :param router: the router whose index the events feed.
    :param workers: the router worker every attention-DP rank folds into, or
        ``{rank: worker}`` (see :class:`TrtllmApplier`).
    :param metrics: where to count statuses, or None.
    :param window_size: index only this attention window (default: the largest).
    :param applier: a configured :class:`TrtllmApplier` (replaces the three above).
    """

    def __init__(
        self,
        router: Router,
        workers: int | Mapping[int, int],
        *,
        metrics: Metrics | None = None,
        window_size: int | None = None,
        applier: TrtllmApplier | None = None,
    ) -> None:
        #: The applier every event goes through (its ``counts``, ``capacity()``...).
        self.applier = (
            applier
            if applier is not None
            else TrtllmApplier(router, workers, metrics=metrics, window_size=window_size)
        )
        self._stop = False
        self._wake: asyncio.Event | None = None  # made by run(), on its own loop

    def feed(self, event: Mapping[str, Any] | bytes | str) -> str:
        """Apply one event (a dict as the LLM API yields it); returns its outcome."""
        return self.applier.feed(event)

    async def consume(self, events: AsyncIterable[Any]) -> int:
        """Apply every event ``events`` yields, until it ends or reports its queue empty.

        :returns: how many events it yielded.
        """
        n = 0
        try:
            async for event in events:
                self.applier.feed(event)
                n += 1
        except _EMPTY:
            pass
        return n

    async def run(
        self, llm: KvEventSource, *, timeout: float = 0.1, idle_sleep: float = 0.02
    ) -> None:
        """Drain ``llm``'s KV events into the router until :meth:`stop` (or cancellation).

        :param llm: the ``tensorrt_llm.LLM`` (anything with its
            ``get_kv_cache_events_async``).
        :param timeout: how long one drain waits for an event (passed on).
        :param idle_sleep: seconds to wait after a drain that found nothing.
        :raises ValueError: a negative ``timeout`` or ``idle_sleep``.
        """
        if timeout < 0 or idle_sleep < 0:
            raise ValueError("timeout and idle_sleep must be >= 0")
        self._stop = False
        self._wake = wake = asyncio.Event()
        try:
            while not self._stop:
                if not await self.consume(llm.get_kv_cache_events_async(timeout)):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), idle_sleep)
        finally:
            self._wake = None

    def stop(self) -> None:
        """Make :meth:`run` return after its current drain (call on its event loop)."""
        self._stop = True
        if self._wake is not None:
            self._wake.set()

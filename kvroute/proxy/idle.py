"""The read timeout of the workers' answers once they started: one timer for all of them.

A worker silent for ``read_timeout`` seconds fails the request it is
answering (and is marked unhealthy). aiohttp's own read timeout (``sock_read``)
re-arms a timer for every read of an answer: with tokens at an engine's pace,
a cancelled timer handle and a new one (and their heap upkeep) per streamed
token, some 560 of the 5,300 Python calls a 32-token request cost the proxy
(in-process cProfile, 5 ms a token). So the proxy keeps aiohttp's
timeout only until an answer's headers arrive, then hands the answer to
:class:`ReadIdle` (:meth:`~ReadIdle.take_over`), which looks at every open
answer once every eighth of the timeout: an answer that received no byte
between two looks spaced ``read_timeout`` or more apart has timed out. A
silent worker is caught between ``read_timeout`` and a quarter more after its
last byte.

Silence the proxy caused does not count: while an answer's connection is
not being read (aiohttp pauses it when the answer's buffer is full because
the client reads slower than the worker writes), its clock starts again, as
aiohttp's own timer stops then.

A timed-out answer's reader raises :class:`aiohttp.ServerTimeoutError`, as
with aiohttp's timeout: the same failure (a connection error), handled the
same way.
"""

from __future__ import annotations

import asyncio
from typing import Final

import aiohttp

from .workers import WorkerPool

__all__ = ["ReadIdle"]

#: Looks per timeout.
CHECKS: Final = 8


class ReadIdle:
    """The read timeout of the open answers the pool tracks, past their headers.

    Use from the proxy's event loop, between :meth:`start` and :meth:`close`.

    :param pool: the workers; their open answers are those it tracks.
    :param timeout: seconds of silence before an answer times out.
    """

    def __init__(self, pool: WorkerPool, timeout: float) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self.pool = pool
        self.timeout = timeout
        #: Each open answer's bytes received and when they last changed (loop time).
        self._marks: dict[aiohttp.ClientResponse, tuple[int, float]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start looking, every eighth of the timeout."""
        if self._timer is None:
            self._loop = asyncio.get_running_loop()
            self._timer = self._loop.call_later(self.timeout / CHECKS, self._tick)

    def close(self) -> None:
        """Stop looking. Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._marks.clear()

    @staticmethod
    def take_over(response: aiohttp.ClientResponse) -> None:
        """Keep ``response``'s read timeout from now on (its headers came): no timer per chunk.

        aiohttp's timer armed by the last bytes received stays until the next
        arrive (as aiohttp itself does for a WebSocket's handshake), so no gap opens.
        """
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = None

    def check(self) -> list[aiohttp.ClientResponse]:
        """Look at every open answer now; those that timed out (their readers are told)."""
        assert self._loop is not None, "start() first"
        now = self._loop.time()
        marks: dict[aiohttp.ClientResponse, tuple[int, float]] = {}
        expired = []
        for state in self.pool.workers.values():
            for response in state.responses:
                content = response.content
                connection = response.connection
                if (
                    connection is None  # the answer is all in
                    or connection.transport is None
                    or content.is_eof()
                    or content.exception() is not None
                ):
                    continue
                received = content.total_bytes
                last = self._marks.get(response)
                if last is None or last[0] != received or not connection.transport.is_reading():
                    marks[response] = (received, now)
                elif now - last[1] >= self.timeout:
                    expired.append(response)
                    silent = f"no byte from the worker for {self.timeout:g} s"
                    content.set_exception(aiohttp.ServerTimeoutError(silent))
                else:
                    marks[response] = last
        self._marks = marks
        return expired

    def _tick(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(self.timeout / CHECKS, self._tick)
        self.check()

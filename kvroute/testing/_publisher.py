"""A KV-event publisher with vLLM 0.33's ZMQ framing, run on an asyncio loop.

Live batches go out on a bound publishing socket as ``[topic, seq8, payload]``;
a ROUTER socket answers replay requests ``[identity, b"", start_seq8]`` with
``[identity, b"", topic, seq8, payload]`` for every buffered batch with
``seq >= start``, then ``[identity, b"", b"", 0xff * 8, b""]``.

The publishing socket is an XPUB rather than a PUB: subscribers cannot tell
the difference (same frames, and SUB accepts either peer), but it lets the
publisher see subscriptions arrive, so tests can wait for a subscriber instead
of sleeping through ZMQ's slow-joiner window. It always binds (a PUB that
*connects* to a bound SUB delivered nothing in this project's sandbox).

Every socket is used from the loop's thread only (ZMQ sockets are not
thread-safe): :meth:`KVEventPublisher.publish` must be called on that thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Collection
from typing import Final

import zmq
import zmq.asyncio

from ._wire import REPLAY_END_SEQ, VllmEvent, encode_batch, pack_seq

__all__ = ["KVEventPublisher"]

_HOST: Final = "127.0.0.1"


def _bind(sock: zmq.asyncio.Socket, port: int) -> str:
    """Bind on loopback (``port`` 0: a free one) and return the endpoint."""
    sock.bind(f"tcp://{_HOST}:{port if port else '*'}")
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return endpoint.decode()


class KVEventPublisher:
    """vLLM 0.33's ``ZmqEventPublisher`` behaviour, for one mock engine.

    :param events_port: the publishing socket's port (0: pick a free one).
    :param replay_port: the replay ROUTER's port (0: pick a free one), or
        ``None`` for no replay socket.
    :param topic: the topic frame (UTF-8).
    :param buffer_steps: how many recent batches replay can serve.
    :param dp_rank: the data-parallel rank written into every batch.
    :param drop_seqs: sequence numbers to buffer but never send live.
    :param clock: the timestamp source for batches (seconds).
    """

    def __init__(
        self,
        *,
        events_port: int = 0,
        replay_port: int | None = 0,
        topic: str = "",
        buffer_steps: int = 10_000,
        dp_rank: int | None = 0,
        drop_seqs: Collection[int] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if buffer_steps <= 0:
            raise ValueError(f"buffer_steps must be positive, got {buffer_steps}")
        self._events_port = events_port
        self._replay_port = replay_port
        self.topic = topic.encode("utf-8")
        self.dp_rank = dp_rank
        self.drop_seqs = frozenset(drop_seqs)
        self._clock = clock
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._outbox: asyncio.Queue[list[bytes]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriptions = 0
        self._sub_cond = threading.Condition()
        self.events_endpoint = ""
        self.replay_endpoint: str | None = None

    @property
    def next_seq(self) -> int:
        """The sequence number the next batch will get."""
        return self._next_seq

    @property
    def subscriptions(self) -> int:
        """Subscriptions received so far (each SUB sends one per topic it subscribes)."""
        with self._sub_cond:
            return self._subscriptions

    def wait_for_subscriptions(self, n: int, timeout: float) -> bool:
        """Block (any thread but the loop's) until ``n`` subscriptions arrived.

        :returns: whether they did before ``timeout`` seconds.
        """
        with self._sub_cond:
            return self._sub_cond.wait_for(lambda: self._subscriptions >= n, timeout)

    async def start(self) -> None:
        """Bind the sockets and start serving (on the running loop)."""
        self._ctx = zmq.asyncio.Context()
        try:
            self._pub = self._ctx.socket(zmq.XPUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            # Report every subscription, not just the first one per topic.
            self._pub.setsockopt(zmq.XPUB_VERBOSE, 1)
            self.events_endpoint = _bind(self._pub, self._events_port)
            if self._replay_port is not None:
                self._router = self._ctx.socket(zmq.ROUTER)
                self._router.setsockopt(zmq.LINGER, 0)
                self.replay_endpoint = _bind(self._router, self._replay_port)
        except BaseException:
            await self.close()
            raise
        self._tasks.append(asyncio.create_task(self._send_loop()))
        self._tasks.append(asyncio.create_task(self._subscription_loop()))
        if self._router is not None:
            self._tasks.append(asyncio.create_task(self._replay_loop()))

    async def close(self) -> None:
        """Stop serving and close the sockets; batches not yet sent are dropped."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def publish(
        self, events: list[VllmEvent], ts: float | None = None, dp_rank: int | None = None
    ) -> int:
        """Number, buffer and queue one batch for sending (on the loop's thread).

        :param events: the batch's events (may be empty).
        :param ts: its timestamp; default the clock's now.
        :param dp_rank: the batch's rank; ``None`` means the publisher's, as
            vLLM's ``publish()`` fills in a batch's missing rank.
        :returns: the batch's sequence number.
        """
        seq = self._next_seq
        self._next_seq += 1
        rank = self.dp_rank if dp_rank is None else dp_rank
        payload = encode_batch(self._clock() if ts is None else ts, events, rank)
        self._buffer.append((seq, payload))
        if seq not in self.drop_seqs:
            self._outbox.put_nowait([self.topic, pack_seq(seq), payload])
        return seq

    async def _send_loop(self) -> None:
        assert self._pub is not None
        while True:
            frames = await self._outbox.get()
            await self._pub.send_multipart(frames)

    async def _subscription_loop(self) -> None:
        assert self._pub is not None
        while True:
            msg = await self._pub.recv()
            if msg[:1] == b"\x01":
                with self._sub_cond:
                    self._subscriptions += 1
                    self._sub_cond.notify_all()

    async def _replay_loop(self) -> None:
        assert self._router is not None
        router = self._router
        while True:
            frames = await router.recv_multipart()
            # Exactly [identity, b"", start_seq8], as a DEALER or REQ produces;
            # anything else is ignored, as vLLM ignores it.
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await router.send_multipart([identity, b"", self.topic, pack_seq(seq), payload])
            await router.send_multipart([identity, b"", b"", REPLAY_END_SEQ, b""])

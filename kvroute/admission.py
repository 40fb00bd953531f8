"""The admission queue: requests waiting while every healthy worker is busy.

:meth:`Router.submit <kvroute.router.Router.submit>` queues a request here
when no worker may take it now; :meth:`~kvroute.router.Router.pop_ready`
takes them out in admission order while some worker is not busy. The queue
only orders; deciding when to push and pop is the router's.

Admission order: lower :attr:`Request.priority <kvroute.request.Request.priority>`
first (vLLM's convention), then, within a priority, arrival order
(``"fcfs"``) or the shorter job (``"sjf"``: prompt tokens plus expected
output tokens, arrival order among equals).

A cancelled request stays in the heap until it surfaces, and is skipped
then: cancelling costs O(1) and never re-heapifies. Each entry carries a
ticket, so a request id cancelled and submitted again is served once, with
its new request, at its new place.

>>> from kvroute.request import Request
>>> q = AdmissionQueue("fcfs")
>>> for rid, prio in [("a", 1), ("b", 0), ("c", 1)]:
...     q.push(Request(rid, block_hashes=[1], priority=prio), np.ones(1, np.uint64), 16)
>>> q.cancel("b"), "b" in q, len(q)
(True, False, 2)
>>> [q.pop().request.request_id, q.pop().request.request_id, q.pop()]
['a', 'c', None]

Runtime complexity: :meth:`~AdmissionQueue.push` and
:meth:`~AdmissionQueue.pop` O(log n) (amortised, counting the cancelled
entries a pop skips); :meth:`~AdmissionQueue.cancel` O(1).

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .config import Admission
from .request import Request

__all__ = ["AdmissionQueue", "Queued"]


@dataclass(order=True, slots=True)
class Queued:
    """One waiting request: its place in the queue and what routing it needs.

    :param key: ``(priority, size, ticket)``; entries compare by it alone.
    :param request: the request.
    :param hashes: its prompt's block keys (hashed when it was submitted).
    :param prompt: its prompt length in tokens.
    """

    key: tuple[int, float, int]
    request: Request = field(compare=False)
    hashes: npt.NDArray[np.uint64] = field(compare=False)
    prompt: int = field(compare=False)


class AdmissionQueue:
    """A priority queue of requests with O(1) cancel.

    :param order: ``"fcfs"`` or ``"sjf"``, the order within a priority.
    :raises ValueError: any other order.
    """

    def __init__(self, order: Admission = "fcfs") -> None:
        if order not in ("fcfs", "sjf"):
            raise ValueError(f"admission must be 'fcfs' or 'sjf', not {order!r}")
        self.order: Admission = order
        self._heap: list[Queued] = []
        # request id -> the ticket of its live entry; an entry whose ticket is
        # not here (cancelled, or superseded by a later submit) is skipped
        self._live: dict[str | int, int] = {}
        self._tickets = itertools.count()

    def __len__(self) -> int:
        """Requests waiting (cancelled ones not counted)."""
        return len(self._live)

    def __contains__(self, request_id: object) -> bool:
        """Whether a request with this id is waiting."""
        return request_id in self._live

    def push(self, request: Request, hashes: npt.NDArray[np.uint64], prompt: int) -> None:
        """Queue ``request``, whose prompt has ``hashes`` and ``prompt`` tokens.

        :raises ValueError: a request with the same id is already waiting.
        """
        rid = request.request_id
        if rid in self._live:
            raise ValueError(f"request {rid!r} is already queued")
        size = 0.0
        if self.order == "sjf":
            size = float(prompt + (request.expected_output_tokens or 0))
        ticket = next(self._tickets)
        entry = Queued((request.priority, size, ticket), request, hashes, prompt)
        heapq.heappush(self._heap, entry)
        self._live[rid] = ticket

    def pop(self) -> Queued | None:
        """Take the first waiting request in admission order; None if none waits."""
        heap = self._heap
        while heap:
            q = heapq.heappop(heap)
            rid = q.request.request_id
            if self._live.get(rid) == q.key[2]:
                del self._live[rid]
                return q
        return None

    def cancel(self, request_id: str | int) -> bool:
        """Drop a waiting request. False if it is not waiting."""
        return self._live.pop(request_id, None) is not None

    def _check(self) -> None:
        """Every waiting request has exactly one entry in the heap; AssertionError if not."""
        live = {
            q.request.request_id: q.key[2]
            for q in self._heap
            if self._live.get(q.request.request_id) == q.key[2]
        }
        assert live == self._live, "a waiting request has no entry in the heap"
        assert all(
            self._heap[i] <= self._heap[c]
            for i in range(len(self._heap))
            for c in (2 * i + 1, 2 * i + 2)
            if c < len(self._heap)
        ), "heap order broken"

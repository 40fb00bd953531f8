"""The router's journal: a sequence number for every state-changing call, and the calls.

Every call that changes a router's state (routing, lifecycle, membership,
health, metrics, events, sweeps) takes the next sequence number under the
router's lock, in the order it took effect: a :class:`~kvroute.request.Decision`
carries its number as ``seq``, and ``Router.apply_stored`` returns its own,
so a caller can order decisions against events. Numbers start at 1 and are
counted whether or not the calls are recorded.

With ``record=True`` each call is also kept as a :data:`JournalEntry`
``(seq, method, args, kwargs)``: calling ``getattr(router, method)(*args,
**kwargs)`` for each entry, in order, on a fresh router built with the same
settings, workers, policy seed and clock reproduces every decision (what
``tests/test_router_stress.py`` checks after routing from several threads).
Admission-queue entries (``"queued"``, ``"cancel"``) are kept for the record
but are not router methods to replay; the ``"route"`` a queued request leads
to is. The record grows without bound: it is meant for tests and debugging
sessions.

>>> j = Journal(record=True)
>>> j.log("add_worker", 0, kv_capacity_blocks=None), j.log("sweep")
(1, 2)
>>> j.entries()
[(1, 'add_worker', (0,), {'kv_capacity_blocks': None}), (2, 'sweep', (), {})]
>>> j = Journal()
>>> j.log("sweep"), j.seq, j.entries()
(1, 1, [])

Not thread-safe on its own: the router calls it under its lock.
"""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["Journal", "JournalEntry"]

#: ``(seq, method, args, kwargs)``: one state-changing call.
JournalEntry: TypeAlias = "tuple[int, str, tuple[Any, ...], dict[str, Any]]"


class Journal:
    """Sequence numbers for state-changing calls, and (if asked) the calls themselves.

    :param record: keep every call, not only count it.
    """

    __slots__ = ("_entries", "seq")

    def __init__(self, record: bool = False) -> None:
        #: The last sequence number given (0 before the first call).
        self.seq = 0
        self._entries: list[JournalEntry] | None = [] if record else None

    @property
    def recording(self) -> bool:
        """Whether calls are kept (``record=True``)."""
        return self._entries is not None

    def log(self, op: str, *args: Any, **kwargs: Any) -> int:
        """Number the call ``op(*args, **kwargs)``, keep it if recording; return its number.

        The arguments are kept as given, not copied: a replay sees them as
        they are when it runs, so pass values nobody mutates afterwards.
        """
        self.seq += 1
        if self._entries is not None:
            self._entries.append((self.seq, op, args, kwargs))
        return self.seq

    def entries(self) -> list[JournalEntry]:
        """The recorded calls in order (a new list; empty when not recording)."""
        return list(self._entries or ())

"""What every fault of scripts/faults.py shares: its result, its options, the registry, the table.

A fault is a function ``(Options) -> Result`` registered by :func:`fault`
under a name and a side: ``proxy`` (scripts/faults.py itself: a real proxy
process and mock-worker processes) or ``state`` (scripts/_faults_state.py:
the router's picture of the workers' caches). ``python scripts/faults.py
--side state`` runs one side; this module is no command of its own.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The sides a fault belongs to (``--side``), in the order they run.
SIDES = ("proxy", "state")


@dataclass
class Result:
    """One fault's outcome: a row of the table.

    :ivar fault: its name.
    :ivar side: ``proxy`` or ``state``.
    :ivar tried: what was done.
    :ivar counts: what was counted.
    :ivar held: what held (or did not: say so).
    :ivar recovery: recovery time(s), or ``-``.
    :ivar ok: whether everything that should hold held.
    :ivar figures: the raw figures.
    """

    fault: str
    side: str
    tried: str
    counts: str
    held: str
    recovery: str = "-"
    ok: bool = True
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """Run options: ``quick`` shortens timeouts and counts."""

    quick: bool = False


FaultFn = Callable[[Options], Result]
#: name -> (side, function), in registration order.
FAULTS: dict[str, tuple[str, FaultFn]] = {}


def fault(name: str, side: str = "proxy") -> Callable[[FaultFn], FaultFn]:
    """Register a fault function under ``name`` (``side``: one of :data:`SIDES`).

    :raises ValueError: an unknown side, or a name already taken.
    """
    if side not in SIDES:
        raise ValueError(f"fault {name!r}: side must be one of {SIDES}, not {side!r}")
    if name in FAULTS:
        raise ValueError(f"fault {name!r} registered twice")

    def register(fn: FaultFn) -> FaultFn:
        FAULTS[name] = (side, fn)
        return fn

    return register


def table(results: Sequence[Result]) -> str:
    """The results as a Markdown table."""
    rows = ["| fault | what was tried | counts | what held | recovery |", "|---|---|---|---|---|"]
    for r in results:
        cells = [r.fault, r.tried, r.counts, r.held, r.recovery]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    """Say on stderr when a fault starts and how long it took."""
    t0 = time.monotonic()
    print(f"-- {name} ...", file=sys.stderr, flush=True)
    yield
    print(f"-- {name}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)

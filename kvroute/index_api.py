"""The Protocol every block index satisfies: what the router, events and benchmark call.

Both twins of :class:`kvroute.BlockIndex` (the compiled one and
``kvroute._index_py``) satisfy it; so may a user's own index (a sharded one,
say) that a :class:`kvroute.Router` is given with ``index=``. Methods take
whole hash arrays, never one block at a time: batches cross the Python
boundary, blocks do not.

>>> from kvroute import BlockIndex
>>> isinstance(BlockIndex(), IndexLike)
True
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["IndexLike"]


@runtime_checkable
class IndexLike(Protocol):
    """A map from block key to the workers holding it (see :class:`kvroute.BlockIndex`).

    ``hashes`` and ``workers`` are anything ``numpy.asarray`` reads as uint64
    (arrays, lists, ``array('Q')``).
    """

    def store(
        self,
        worker: int,
        hashes: Any,
        parent: int | None = None,
        *,
        tier: str = "device",
        engine_hashes: Any = None,
    ) -> None:
        """``worker`` now holds one more copy of each block in ``hashes``."""

    def remove(
        self, worker: int, hashes: Any, *, engine: bool = False, tier: str = "device"
    ) -> int:
        """``worker`` dropped one copy of each block; returns how many were unknown."""

    def clear(self, worker: int) -> int:
        """Drop every block ``worker`` holds; returns how many."""

    def remove_worker(self, worker: int) -> int:
        """Forget ``worker`` entirely (blocks and engine handles); returns blocks dropped."""

    def match(self, hashes: Any) -> dict[int, int]:
        """Per worker, how many leading blocks of ``hashes`` it holds (any tier)."""

    def match_tiers(self, hashes: Any) -> dict[int, tuple[int, int, int]]:
        """Per worker, its matched prefix as ``(device, host, disk)`` block counts."""

    def match_array(self, hashes: Any, workers: Any) -> npt.NDArray[np.uint32]:
        """:meth:`match` laid out in the order of ``workers`` (0 where none)."""

    def resolve(self, worker: int, engine_hash: int) -> int | None:
        """The kvroute key ``worker``'s engine hash names, or None."""

    def worker_len(self, worker: int) -> int:
        """Distinct blocks ``worker`` holds."""

    def workers(self) -> list[int]:
        """Workers that stored anything and were not removed, ascending."""

    def residencies(self) -> int:
        """(block, worker) pairs held."""

    def sizeof(self) -> int:
        """Bytes the index owns."""

    def __len__(self) -> int:
        """Distinct blocks held by any worker."""

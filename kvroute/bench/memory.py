"""Bytes per residency after a realistic fill, and what churn does to ``sizeof()``."""

from __future__ import annotations

import gc
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..index_api import IndexLike
from .streams import U64, engine_hashes_of

__all__ = ["MemoryResult", "maxrss_bytes", "measure_memory"]


def maxrss_bytes() -> int:
    """The process's peak resident set so far, in bytes (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class MemoryResult:
    """Bytes per residency after a fill, and what churn did to ``sizeof()``."""

    residencies: int
    blocks: int
    workers: int
    engine_hashes: bool
    sizeof_bytes: int
    fill_seconds: float
    churn_rounds: int
    churn_residencies: int
    churn_sizeof: list[int]
    churn_state_ok: bool

    @property
    def bytes_per_residency(self) -> float:
        """``sizeof()`` / residencies after the fill."""
        return self.sizeof_bytes / max(self.residencies, 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures, including the churn growth."""
        first = self.churn_sizeof[0] if self.churn_sizeof else self.sizeof_bytes
        last = self.churn_sizeof[-1] if self.churn_sizeof else self.sizeof_bytes
        return {
            "residencies": self.residencies,
            "blocks": self.blocks,
            "workers": self.workers,
            "engine_hashes": self.engine_hashes,
            "sizeof_bytes": self.sizeof_bytes,
            "bytes_per_residency": self.bytes_per_residency,
            "fill_seconds": self.fill_seconds,
            "fill_residencies_per_s": self.residencies / self.fill_seconds
            if self.fill_seconds
            else None,
            "churn": {
                "rounds": self.churn_rounds,
                "residencies_per_round": self.churn_residencies,
                "sizeof_after_each_round": self.churn_sizeof,
                "growth_first_round_bytes": first - self.sizeof_bytes,
                "growth_after_first_round_bytes": last - first,
                "state_restored": self.churn_state_ok,
            },
        }


def _placements(
    rng: np.random.Generator, n_residencies: int, workers: int, chain: int, parent: int | None
) -> Iterable[tuple[list[int], U64, int | None]]:
    """Chains of fresh blocks and the workers holding them, totalling ``n_residencies``.

    By block: 80% on one worker, 15% on two, 5% on three or four (never more
    than ``workers``). Each chain hangs under ``parent``.
    """
    left = n_residencies
    while left > 0:
        r = rng.random()
        k = 1 if r < 0.80 else 2 if r < 0.95 else 3 if r < 0.975 else 4
        k = min(k, workers, left)
        n = min(chain, -(-left // k))
        keys = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
        holders = rng.choice(workers, size=k, replace=False).tolist()
        left -= n * k
        yield holders, keys, parent


def measure_memory(
    index_factory: Callable[[], IndexLike],
    residencies: int = 10_000_000,
    *,
    workers: int = 16,
    seed: int = 42,
    engine_hashes: bool = False,
    shared_prefix: int = 1_024,
    chain: int = 256,
    churn_rounds: int = 5,
    churn_residencies: int | None = None,
) -> MemoryResult:
    """Fill an index to about ``residencies`` (block, worker) pairs, then churn it.

    The fill is a realistic mix: a ``shared_prefix``-block system prompt held
    by every worker, then chains of ``chain`` fresh blocks under it, 80% of
    them on one worker, 15% on two and 5% on three or four. Churn rounds store
    ``churn_residencies`` more (same mix, plus one more copy of the shared
    prefix everywhere) and remove all of it again, tail first: the index
    returns to the same contents, and ``sizeof()`` must not keep growing.

    :param index_factory: makes an empty index.
    :param residencies: fill target (reached to within one chain's workers).
    :param workers: workers holding blocks.
    :param seed: the key generator's seed.
    :param engine_hashes: store with engine hashes, and churn-remove by them.
    :param churn_rounds: store-and-remove rounds after the fill (0: none).
    :param churn_residencies: residencies per round (default: a tenth of the
        fill, at most one million).
    :returns: the figures.
    """
    rng = np.random.default_rng(seed)
    idx = index_factory()
    prefix = rng.integers(0, np.iinfo(np.uint64).max, size=shared_prefix, dtype=np.uint64)
    prefix_eng = engine_hashes_of(prefix)
    per_round = (
        churn_residencies if churn_residencies is not None else min(1_000_000, residencies // 10)
    )

    def put(w: int, keys: U64, parent: int | None) -> None:
        if engine_hashes:
            idx.store(w, keys, parent, engine_hashes=engine_hashes_of(keys))
        else:
            idx.store(w, keys, parent)

    root = int(prefix[-1]) if shared_prefix else None
    gc.collect()
    t0 = time.perf_counter()
    for w in range(workers):
        put(w, prefix, None)
    for holders, keys, parent in _placements(
        rng, max(0, residencies - shared_prefix * workers), workers, chain, root
    ):
        for w in holders:
            put(w, keys, parent)
    fill_seconds = time.perf_counter() - t0
    base = (idx.residencies(), len(idx), [idx.worker_len(w) for w in range(workers)])
    size = idx.sizeof()
    after: list[int] = []
    ok = True
    for _ in range(churn_rounds):
        placed = list(_placements(rng, per_round, workers, chain, root))
        for w in range(workers):
            put(w, prefix, None)
        for holders, keys, parent in placed:
            for w in holders:
                put(w, keys, parent)
        # Remove newest first and each chain tail first, as engines evict.
        for holders, keys, _parent in reversed(placed):
            for w in holders:
                if engine_hashes:
                    idx.remove(w, engine_hashes_of(keys[::-1]), engine=True)
                else:
                    idx.remove(w, keys[::-1])
        for w in range(workers):
            if engine_hashes:
                idx.remove(w, prefix_eng[::-1], engine=True)
            else:
                idx.remove(w, prefix[::-1])
        after.append(idx.sizeof())
        state = (idx.residencies(), len(idx), [idx.worker_len(w) for w in range(workers)])
        ok = ok and state == base
    return MemoryResult(
        residencies=base[0],
        blocks=base[1],
        workers=workers,
        engine_hashes=engine_hashes,
        sizeof_bytes=size,
        fill_seconds=fill_seconds,
        churn_rounds=churn_rounds,
        churn_residencies=per_round,
        churn_sizeof=after,
        churn_state_ok=ok,
    )

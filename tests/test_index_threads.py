"""The index under concurrent callers: every call is atomic, nothing is lost.

Large batches run with the GIL released inside the compiled index's lock, so
these tests use batches above that threshold (1024 keys) to make threads
really interleave.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

BATCH = 3000  # above the compiled index's GIL-release threshold
ROUNDS = 12


def _keys(seed: int, n: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64, n, dtype=np.uint64)


def test_concurrent_writers_and_readers_end_in_the_serial_state(BlockIndex: type) -> None:
    shared = _keys(0, 64)
    idx = BlockIndex()
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def writer(worker: int) -> None:
        try:
            start.wait()
            own = [_keys(1000 * worker + r) for r in range(ROUNDS)]
            for r, keys in enumerate(own):
                idx.store(worker, np.concatenate([shared, keys]), engine_hashes=None)
                if r % 2:
                    # the odd rounds are taken back: stores and removals interleave
                    assert idx.remove(worker, keys) == 0
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    observed: list[dict[int, int]] = []

    def reader() -> None:
        try:
            start.wait()
            for _ in range(ROUNDS * 4):
                m = idx.match(shared)
                # a match never sees a half-applied store: the shared prefix is
                # stored in one call, so a worker holds all of it or none of it
                assert all(v == len(shared) for v in m.values()), m
                observed.append(m)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    serial = BlockIndex()
    for worker in range(4):
        for r in range(ROUNDS):
            keys = _keys(1000 * worker + r)
            serial.store(worker, np.concatenate([shared, keys]))
            if r % 2:
                serial.remove(worker, keys)
    idx._check()
    assert len(idx) == len(serial)
    assert idx.residencies() == serial.residencies()
    for worker in range(4):
        assert idx.worker_len(worker) == serial.worker_len(worker)
        for r in range(ROUNDS):
            keys = _keys(1000 * worker + r)
            assert idx.match(keys) == serial.match(keys)
    assert idx.match(shared) == {w: len(shared) for w in range(4)}


@pytest.mark.parametrize("op", ["clear", "remove_worker"])
def test_clear_racing_stores_leaves_a_consistent_index(BlockIndex: type, op: str) -> None:
    idx = BlockIndex()
    errors: list[BaseException] = []

    def storer() -> None:
        try:
            for r in range(ROUNDS):
                idx.store(1, _keys(r))
        except BaseException as e:
            errors.append(e)

    def clearer() -> None:
        try:
            for _ in range(ROUNDS):
                getattr(idx, op)(1)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=storer), threading.Thread(target=clearer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    idx._check()
    # whatever the interleaving, every surviving block belongs to worker 1 and
    # the per-worker count agrees with the table
    assert idx.residencies() == len(idx) == idx.worker_len(1)

"""The binary format of ``BlockIndex.dump()``, shared by the compiled index and its twin.

A dump is the index's content as flat little-endian arrays, so writing and
reading it costs a few array copies, not a Python object per block:

====================  ==========================  =======================================
field                 type                        meaning
====================  ==========================  =======================================
magic                 8 bytes                     ``b"KVRIDX01"``
counts                4 x uint64                  workers, residencies, handles, 0
workers               uint64[workers]             known workers (those with no block too)
res_keys              uint64[residencies]         each residency's block key
res_workers           uint64[residencies]         ... and worker
handle_workers        uint64[handles]             each engine handle's worker
handle_engine         uint64[handles]             ... its engine hash
handle_keys           uint64[handles]             ... and the block key it names
res_counts            uint16[residencies, 3]      copies per tier (device, host, disk)
====================  ==========================  =======================================

The order of residencies and handles is the writer's (the twins differ);
the content is what matters, and each twin loads the other's dumps.
:func:`unpack` checks the framing and the values any one record can get
wrong; :func:`positions` places every record's worker (and refuses an
unlisted one); what needs the whole index (a residency given twice, a
handle naming a block its worker does not hold) the loader checks.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["MAGIC", "Dump", "pack", "positions", "unpack"]

MAGIC: Final = b"KVRIDX01"
_HEAD: Final = struct.Struct("<8s4Q")
_MAX_COPIES: Final = 4095


class Dump(NamedTuple):
    """The arrays of a dump (read-only views into the bytes they were read from)."""

    workers: npt.NDArray[np.uint64]
    res_keys: npt.NDArray[np.uint64]
    res_workers: npt.NDArray[np.uint64]
    handle_workers: npt.NDArray[np.uint64]
    handle_engine: npt.NDArray[np.uint64]
    handle_keys: npt.NDArray[np.uint64]
    res_counts: npt.NDArray[np.uint16]


def pack(d: Dump) -> bytes:
    """The bytes of a dump.

    >>> z = np.zeros(0, np.uint64)
    >>> data = pack(Dump(np.array([3], np.uint64), np.array([9], np.uint64),
    ...                  np.array([3], np.uint64), z, z, z, np.array([[1, 0, 0]], np.uint16)))
    >>> len(data), unpack(data).res_counts.tolist()
    (70, [[1, 0, 0]])
    """
    nw, nr, nh = len(d.workers), len(d.res_keys), len(d.handle_keys)
    out = bytearray(_HEAD.size + 8 * (nw + 2 * nr + 3 * nh) + 6 * nr)
    _HEAD.pack_into(out, 0, MAGIC, nw, nr, nh, 0)
    off = _HEAD.size
    # written in place: one copy of each array (a dump may be tens of MB)
    for a in d[:6]:
        np.frombuffer(out, "<u8", len(a), off)[:] = a
        off += 8 * len(a)
    np.frombuffer(out, "<u2", 3 * nr, off).reshape(nr, 3)[:] = d.res_counts
    return bytes(out)


def unpack(data: bytes | bytearray | memoryview) -> Dump:
    """The arrays of a dump, checked.

    :raises ValueError: not a dump, truncated or too long, a residency with
        no copies or more than the index keeps, or of a worker not listed.
    :raises TypeError: ``data`` is not bytes-like.
    """
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(f"a dump is bytes, not {type(data).__name__}") from None
    if len(buf) < _HEAD.size or bytes(buf[:8]) != MAGIC:
        raise ValueError("not a BlockIndex dump (bad magic)")
    _, nw, nr, nh, _ = _HEAD.unpack_from(buf)
    if len(buf) != _HEAD.size + 8 * (nw + 2 * nr + 3 * nh) + 6 * nr:
        raise ValueError("a BlockIndex dump of the wrong length (truncated or corrupt)")
    off = _HEAD.size
    arrays = []
    for n in (nw, nr, nr, nh, nh, nh):
        arrays.append(np.frombuffer(buf, "<u8", n, off).astype(np.uint64, copy=False))
        off += 8 * n
    counts = np.frombuffer(buf, "<u2", 3 * nr, off).reshape(nr, 3)
    w, rk, rw, hw, he, hk = arrays
    d = Dump(w, rk, rw, hw, he, hk, counts)
    some = counts[:, 0] | counts[:, 1] | counts[:, 2]
    if nr and (int(counts.max()) > _MAX_COPIES or not some.all()):
        raise ValueError("a BlockIndex dump with a residency of 0 or too many copies")
    return d


def positions(d: Dump) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Where each residency's and each handle's worker is in ``d.workers``.

    :raises ValueError: a residency or handle of a worker the dump does not list.
    """
    order = np.argsort(d.workers, kind="stable")
    known = d.workers[order]
    out = []
    for ids, what in ((d.res_workers, "residency"), (d.handle_workers, "handle")):
        if not len(ids):
            out.append(np.zeros(0, np.intp))
            continue
        # a few workers, a million ids: a binary search each beats np.isin's sort
        at = np.minimum(np.searchsorted(known, ids), max(len(known) - 1, 0))
        if not len(known) or not (known[at] == ids).all():
            raise ValueError(f"a BlockIndex dump with a {what} of an unlisted worker")
        out.append(order[at])
    return out[0], out[1]

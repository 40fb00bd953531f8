"""What router replicas write to Redis / Valkey: the key schema and the message format.

Keys (``P`` is the prefix, ``kvroute`` by default; the database is the URL's):

==========================  ========  ==========================================================
key                         type      what
==========================  ========  ==========================================================
``P:log``                   stream    every replica's messages (below), trimmed to ~100,000
``P:replica:ID``            string    replica ``ID`` is alive: its instance token, PX 3 heartbeats
``P:workers``               string    the ``--worker`` list every replica must share (JSON), PX
``P:pin:SESSION``           string    a session's pinned worker, PX its TTL
``P:resp:RESPONSE_ID``      string    the worker that produced a response id, PX its TTL
``P:members``               hash      member id -> its spec and state (JSON), runtime workers
``P:snapshot``              string    the last index snapshot (msgpack, below)
``P:snapshot:lease``        string    which replica writes snapshots: its token, PX 3 intervals
==========================  ========  ==========================================================

A **message** (one stream entry, field ``m``, msgpack) is everything one
replica has to say since its previous one; every part is optional but
``r``/``i``:

* ``r`` its replica id, ``i`` its instance token (a restarted replica has a
  new one), ``v`` the format version (1);
* ``l`` its own load: four little-endian arrays, worker ids (uint64),
  active requests (int64), prefill tokens and decode blocks (float64);
  ``ttl`` seconds it counts unless renewed (sent with every message: a
  message is a heartbeat);
* ``d`` decisions: ``[worker, hashes (uint64 LE bytes), [[blocks, ttl], ...],
  session or None, pin TTL or None, age]``, ``age`` being the seconds
  between the decision and the message;
* ``p`` session pins ``[session, worker, seconds left]`` (re-published after
  an outage); ``h`` worker health ``[worker, healthy]`` as the sender sees
  it; ``x`` response ids ``[id, worker, seconds left]``; ``g`` membership
  changes ``[kind, member id, spec mapping, state]``; ``bye`` the sender
  stops (its load stops counting at once).

A **snapshot** is ``{"v": 1, "t": unix time, "replica": id, "block_size":
n, "workers": [urls], "positions": {worker: [seq, digest]}, "salts": {worker:
{engine hash: salt}}, "index": BlockIndex.dump() bytes}``.

>>> m = Message("a", "tok", decisions=[Routed(3, np.array([7, 8], np.uint64))])
>>> back = decode(encode(m))
>>> back.replica, back.decisions[0].worker, back.decisions[0].hashes.tolist()
('a', 3, [7, 8])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from ..remote import ReplicaLoad, Routed

__all__ = [
    "VERSION",
    "Keys",
    "Message",
    "Snapshot",
    "WireError",
    "decode",
    "decode_snapshot",
    "encode",
    "encode_snapshot",
]

#: The message and snapshot format version.
VERSION: Final = 1

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class WireError(ValueError):
    """A message or snapshot that is not in this format (another version, or corrupt)."""


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of one fleet (see the module docstring).

    >>> Keys("kvroute").pin("s1")
    'kvroute:pin:s1'
    """

    prefix: str = "kvroute"

    @property
    def log(self) -> str:
        """The stream of messages."""
        return f"{self.prefix}:log"

    @property
    def workers(self) -> str:
        """The shared ``--worker`` list."""
        return f"{self.prefix}:workers"

    @property
    def members(self) -> str:
        """The hash of runtime members."""
        return f"{self.prefix}:members"

    @property
    def snapshot(self) -> str:
        """The index snapshot."""
        return f"{self.prefix}:snapshot"

    @property
    def snapshot_lease(self) -> str:
        """The snapshot writer's lease."""
        return f"{self.prefix}:snapshot:lease"

    def replica(self, replica_id: str) -> str:
        """A replica's liveness key."""
        return f"{self.prefix}:replica:{replica_id}"

    def pin(self, session: str) -> str:
        """A session's pin."""
        return f"{self.prefix}:pin:{session}"

    def response(self, response_id: str) -> str:
        """A response id's worker."""
        return f"{self.prefix}:resp:{response_id}"


@dataclass(slots=True)
class Message:
    """One replica's message (see the module docstring for the fields)."""

    replica: str
    instance: str
    load: ReplicaLoad | None = None
    load_ttl: float | None = None
    decisions: list[Routed] = field(default_factory=list)
    pins: list[tuple[str, int, float]] = field(default_factory=list)
    health: list[tuple[int, bool]] = field(default_factory=list)
    responses: list[tuple[str, int, float]] = field(default_factory=list)
    members: list[tuple[str, int, Mapping[str, Any], str]] = field(default_factory=list)
    bye: bool = False

    def empty(self) -> bool:
        """Whether it carries nothing but the sender's name (no heartbeat either)."""
        return not (
            self.load is not None
            or self.decisions
            or self.pins
            or self.health
            or self.responses
            or self.members
            or self.bye
        )


def _le(a: npt.NDArray[Any], dtype: str) -> bytes:
    return np.ascontiguousarray(a, dtype).tobytes()


def encode(m: Message) -> bytes:
    """The msgpack bytes of a message."""
    out: dict[str, Any] = {"v": VERSION, "r": m.replica, "i": m.instance}
    if m.load is not None:
        ld = m.load
        out["l"] = [
            _le(ld.workers, "<u8"),
            _le(ld.active, "<i8"),
            _le(ld.prefill_tokens, "<f8"),
            _le(ld.decode_blocks, "<f8"),
        ]
    if m.load_ttl is not None:
        out["ttl"] = float(m.load_ttl)
    if m.decisions:
        out["d"] = [
            [
                int(r.worker),
                _le(r.hashes, "<u8"),
                [[int(k), float(t)] for k, t in r.segments],
                r.session_id,
                None if r.pin_ttl is None else float(r.pin_ttl),
                float(r.age),
            ]
            for r in m.decisions
        ]
    if m.pins:
        out["p"] = [[s, int(w), float(t)] for s, w, t in m.pins]
    if m.health:
        out["h"] = [[int(w), bool(h)] for w, h in m.health]
    if m.responses:
        out["x"] = [[str(i), int(w), float(t)] for i, w, t in m.responses]
    if m.members:
        out["g"] = [[k, int(i), dict(spec), st] for k, i, spec, st in m.members]
    if m.bye:
        out["bye"] = True
    return _enc.encode(out)


def _arr(b: Any, dtype: str, n: int | None = None) -> npt.NDArray[Any]:
    if not isinstance(b, bytes) or len(b) % 8:
        raise WireError("an array field is not a whole number of 8-byte items")
    a = np.frombuffer(b, dtype)
    if n is not None and len(a) != n:
        raise WireError("the load arrays differ in length")
    return a


def decode(data: bytes) -> Message:
    """A message from its bytes.

    :raises WireError: not a message of this version, or a malformed field.
    """
    try:
        d = _dec.decode(data)
        if not isinstance(d, dict) or d.get("v") != VERSION:
            raise WireError(f"not a version {VERSION} message")
        m = Message(str(d["r"]), str(d["i"]))
        if "l" in d:
            ids, act, pre, dec = d["l"]
            w = _arr(ids, "<u8").astype(np.uint64)
            n = len(w)
            m.load = ReplicaLoad(
                w,
                _arr(act, "<i8", n).astype(np.int64),
                _arr(pre, "<f8", n).astype(np.float64),
                _arr(dec, "<f8", n).astype(np.float64),
            )
        if "ttl" in d:
            m.load_ttl = float(d["ttl"])
        for w, h, seg, session, pin_ttl, age in d.get("d", ()):
            m.decisions.append(
                Routed(
                    int(w),
                    _arr(h, "<u8").astype(np.uint64),
                    tuple((int(k), float(t)) for k, t in seg),
                    None if session is None else str(session),
                    None if pin_ttl is None else float(pin_ttl),
                    float(age),
                )
            )
        m.pins = [(str(s), int(w), float(t)) for s, w, t in d.get("p", ())]
        m.health = [(int(w), bool(h)) for w, h in d.get("h", ())]
        m.responses = [(str(i), int(w), float(t)) for i, w, t in d.get("x", ())]
        m.members = [(str(k), int(i), dict(spec), str(st)) for k, i, spec, st in d.get("g", ())]
        m.bye = bool(d.get("bye", False))
        return m
    except WireError:
        raise
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as e:
        raise WireError(f"a malformed sync message: {type(e).__name__}: {e}") from None


def encode_snapshot(
    *,
    replica: str,
    t: float,
    block_size: int,
    workers: Sequence[str],
    positions: Mapping[int, tuple[int, int]],
    salts: Mapping[int, Mapping[int, str]],
    index: bytes,
) -> bytes:
    """The bytes of an index snapshot (see the module docstring)."""
    return _enc.encode(
        {
            "v": VERSION,
            "t": float(t),
            "replica": replica,
            "block_size": int(block_size),
            "workers": list(workers),
            "positions": {int(w): [int(s), int(d)] for w, (s, d) in positions.items()},
            "salts": {int(w): {int(e): str(v) for e, v in m.items()} for w, m in salts.items()},
            "index": index,
        }
    )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A decoded index snapshot."""

    replica: str
    t: float
    block_size: int
    workers: list[str]
    positions: dict[int, tuple[int, int]]
    salts: dict[int, dict[int, str]]
    index: bytes


def decode_snapshot(data: bytes) -> Snapshot:
    """A snapshot from its bytes.

    :raises WireError: not a snapshot of this version.
    """
    try:
        d = _dec.decode(data)
        if not isinstance(d, dict) or d.get("v") != VERSION:
            raise WireError(f"not a version {VERSION} snapshot")
        return Snapshot(
            str(d["replica"]),
            float(d["t"]),
            int(d["block_size"]),
            [str(u) for u in d["workers"]],
            {int(w): (int(s), int(g)) for w, (s, g) in d["positions"].items()},
            {int(w): {int(e): str(v) for e, v in m.items()} for w, m in d["salts"].items()},
            bytes(d["index"]),
        )
    except WireError:
        raise
    except (msgspec.DecodeError, KeyError, TypeError, ValueError) as e:
        raise WireError(f"a malformed snapshot: {type(e).__name__}: {e}") from None

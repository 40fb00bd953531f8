"""MockWorker's TensorRT-LLM mode: a ``trtllm-serve`` stand-in's KV events, in both shapes.

``MockWorker(trtllm=True)`` (or ``trtllm=TrtllmOptions(...)``) keeps the
worker's HTTP API and prefix cache, and changes what the engine says about
its cache to what TensorRT-LLM says, written from TensorRT-LLM's serializer and
streaming publisher as ``kvroute/events/trtllm.py`` describes them:

- **the dict shape**, buffered for ``POST /kv_cache_events`` (which drains it,
  as ``trtllm-serve`` does) and for :attr:`TrtllmMock.llm`, an object with the
  LLM API's ``get_kv_cache_events`` / ``get_kv_cache_events_async`` over the
  same buffer: ``created`` events at every start (event ids from 0 again), a
  ``stored`` event per admitted prompt whose last block is the prompt's
  *partial* block (stored when the prompt's full blocks all are, removed when
  the last request holding it ends), ``removed`` events (coalesced, one per
  admission), per-block ``cache_salt``, ``cache_level`` 0, ``priority``,
  ``mm_keys`` ``[]``, and ``hash_algo``. The buffer keeps the newest
  ``event_buffer_max_size`` events, dropping the oldest (a gap in the ids), as
  the engine does. With ``sliding_window`` every event is published twice, the
  second time for the sliding-window layer group;
- **the streaming shape** on the worker's ZMQ sockets (same framing and replay
  as vLLM's): ``BlockStored`` / ``BlockRemoved`` maps with full blocks only,
  ``medium`` ``"GPU"``, block hashes as signed int64 (the native publisher's),
  and ``AllBlocksCleared`` for a reset.

Block hashes are the mock's own (a SHA-256 chain over the blocks' tokens,
seeded by the salt and LoRA name), not TensorRT-LLM's arithmetic, in the
shape ``hash_algo`` names: a 64-hex string for ``v2_sha256``, its first 8
bytes read big-endian (a u64) for ``v2_sha256_64`` and ``v1_block_key``. A
router never recomputes them; it keeps them as handles.

A real engine streams over ZMQ *or* buffers for the pull API (TensorRT-LLM's
pull API returns nothing while streaming); the mock does both, so one worker
serves either kind of test.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import msgspec
from aiohttp import web

from ._engine import Engine, Request, _Record
from ._prefix_cache import Allocation
from ._wire import VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored, VllmEvent

__all__ = ["TrtllmEngine", "TrtllmLlm", "TrtllmMock", "TrtllmOptions", "add_routes"]

HashAlgo = Literal["v1_block_key", "v2_sha256", "v2_sha256_64"]

_U64: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class TrtllmOptions:
    """How the TensorRT-LLM mock behaves.

    :param hash_algo: the ``hash_algo`` its events name, and their hash shape.
    :param window_size: the full-attention window its events name (default:
        the worker's ``max_model_len``, as TensorRT-LLM's default window is the
        longest sequence).
    :param sliding_window: also publish every dict event for a sliding-window
        layer group of this size (a VSWA model), or None.
    :param attention_dp_rank: the ``attention_dp_rank`` of its dict events
        (omitted when None, as the serializer omits it).
    :param event_buffer_max_size: dict events kept for the pull API; older
        ones are dropped.
    :param host_blocks: the host-tier blocks its ``created`` events report.
    :param partial_blocks: publish prompts' partial last blocks (dict shape).
    :raises ValueError: a size out of range or an unknown ``hash_algo``.
    """

    hash_algo: HashAlgo = "v2_sha256"
    window_size: int | None = None
    sliding_window: int | None = None
    attention_dp_rank: int | None = None
    event_buffer_max_size: int = 10_000
    host_blocks: int = 0
    partial_blocks: bool = True

    def __post_init__(self) -> None:
        if self.hash_algo not in ("v1_block_key", "v2_sha256", "v2_sha256_64"):
            raise ValueError(f"unknown hash_algo {self.hash_algo!r}")
        if self.event_buffer_max_size < 1 or self.host_blocks < 0:
            raise ValueError("event_buffer_max_size must be >= 1 and host_blocks >= 0")
        for name in ("window_size", "sliding_window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")


# -- the streaming shape ---------------------------------------------------------------
# The native publisher's structs: tagged maps, fields without a default always
# sent (nil included), the others omitted at their default.


class _WireEvent(msgspec.Struct, tag_field="type", omit_defaults=True, gc=False):
    pass


class _WireStored(_WireEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int | str]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    mm_keys: list[Any] | None = None


class _WireRemoved(_WireEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class _WireCleared(_WireEvent, tag="AllBlocksCleared"):
    pass


def _signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


# -- the dict-event buffer -------------------------------------------------------------


class _EventBuffer:
    """The engine's dict-event queue: numbered, bounded (oldest dropped), drained by readers."""

    def __init__(self, maxlen: int) -> None:
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.next_id = 0

    def restart(self) -> None:
        with self._lock:
            self._events.clear()
            self.next_id = 0

    def add(self, body: dict[str, Any]) -> int:
        with self._lock:
            event_id = self.next_id
            self._events.append({"event_id": event_id, **body})
            self.next_id += 1
            self._cond.notify_all()
            return event_id

    def drain(self, timeout: float | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if not self._events and timeout:
                self._cond.wait(timeout)
            out = list(self._events)
            self._events.clear()
            return out


class TrtllmLlm:
    """The LLM API's event calls over the mock's buffer (``tensorrt_llm.LLM``'s names)."""

    def __init__(self, buffer: _EventBuffer) -> None:
        self._buffer = buffer

    def get_kv_cache_events(self, timeout: float | None = 2.0) -> list[dict[str, Any]]:
        """Drain the buffered events, waiting up to ``timeout`` s for one if there are none."""
        return self._buffer.drain(timeout)

    async def get_kv_cache_events_async(
        self, timeout: float | None = 2.0
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield the buffered events (draining them), waiting as :meth:`get_kv_cache_events`."""
        events = await asyncio.to_thread(self._buffer.drain, timeout)
        for event in events:
            yield event


class TrtllmMock:
    """What a test reaches of a TensorRT-LLM mock worker (``MockWorker.trtllm``)."""

    def __init__(self, engine: TrtllmEngine, url: str) -> None:
        self._engine = engine
        #: ``trtllm-serve``'s events endpoint: ``POST`` drains the buffer.
        self.events_url = url + "/kv_cache_events"
        #: The LLM API's event calls over the same buffer.
        self.llm = TrtllmLlm(engine.buffer)

    @property
    def options(self) -> TrtllmOptions:
        """The mode's settings."""
        return self._engine.options

    @property
    def next_event_id(self) -> int:
        """The ``event_id`` the next dict event gets (the rank's count since the start)."""
        return self._engine.buffer.next_id

    def partial_blocks(self) -> set[int]:
        """Handles of the partial blocks the engine holds now."""
        return set(self._engine.partials)

    def publish_dict(self, data: dict[str, Any], window_size: int | None = None) -> int:
        """Buffer one scripted dict event (``data`` is its ``data``); returns its ``event_id``.

        Call it while the worker runs; the event is numbered like the engine's own.
        """
        return self._engine.add_event(data, window_size)


class TrtllmEngine(Engine):
    """The mock engine with TensorRT-LLM's hashes and events (see the module docstring).

    Every method runs on the worker's event loop, as :class:`Engine`'s do.

    :param options: the TensorRT-LLM mode's settings.
    :param kwargs: :class:`Engine`'s parameters.
    """

    def __init__(self, options: TrtllmOptions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = options
        self.window = options.window_size or self.max_model_len
        self.buffer = _EventBuffer(options.event_buffer_max_size)
        # handle -> 32-byte digest of every block the engine holds (v2_sha256's hex)
        self._digests: dict[int, bytes] = {}
        # the prompt being admitted: handle -> digest, its salt, its stored event
        self._admitting: dict[int, bytes] = {}
        self._salt: str | None = None
        self._stored: dict[str, Any] | None = None
        self._clearing: list[int] = []
        #: handle -> how many running requests hold that partial block
        self.partials: dict[int, int] = {}
        self._held_partial: dict[int, int] = {}  # id(record) -> its partial block

    # -- hashes --

    def _digest_chain(
        self, token_ids: Sequence[int], cache_salt: str | None, lora_name: str | None
    ) -> list[bytes]:
        """One digest per block of ``token_ids``, the partial last one included."""
        seed = b"kvroute-mock-trtllm\0" + (cache_salt or "").encode() + b"\0"
        d = hashlib.sha256(seed + (lora_name or "").encode()).digest()
        out = []
        bs = self.block_size
        for i in range(0, len(token_ids), bs):
            chunk = token_ids[i : i + bs]
            d = hashlib.sha256(d + b"".join(t.to_bytes(4, "little") for t in chunk)).digest()
            out.append(d)
        return out

    def block_hashes(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> list[int]:
        """The u64 handles of a prompt's full blocks (first 8 digest bytes, big-endian)."""
        if lora_name is not None:
            self._lora(lora_name)  # an unknown adapter fails as in vLLM mode
        full = len(token_ids) // self.block_size
        return [_handle(d) for d in self._digest_chain(token_ids, cache_salt, lora_name)[:full]]

    def _published(self, handle: int) -> int | str:
        """A handle as this engine's events name it (``hash_algo``'s shape)."""
        if self.options.hash_algo == "v2_sha256":
            return self._digests[handle].hex()
        return handle

    # -- admission --

    def admit(
        self,
        request_id: str,
        path: str,
        tokens: list[int],
        cache_salt: str | None,
        lora_name: str | None = None,
    ) -> Request:
        """As :meth:`Engine.admit`; the dict shape's store ends with the prompt's partial block."""
        if lora_name is not None:
            self._lora(lora_name)
        digests = self._digest_chain(tokens, cache_salt, lora_name)
        self._admitting = {_handle(d): d for d in digests}
        self._salt, self._stored = cache_salt, None
        try:
            req = super().admit(request_id, path, tokens, cache_salt, lora_name)
            stored: dict[str, Any] | None = self._stored
            self._stored = None
            bs, rec, alloc = self.block_size, req._record, req._alloc
            full = len(tokens) // bs
            if (
                self.options.partial_blocks
                and len(tokens) % bs
                and alloc.hit_blocks + len(alloc.stored) == full
            ):
                block = self._hold_partial(rec, digests[-1], tokens[full * bs :], cache_salt)
                if block is not None:
                    if stored is None:
                        parent = rec.block_hashes[-1] if full else None
                        stored = {"type": "stored", "parent_hash": self._pub(parent), "blocks": []}
                    stored["blocks"].append(block)
            if stored is not None:
                self._add_dict(stored)
            return req
        finally:
            self._admitting, self._stored = {}, None

    def _hold_partial(
        self, rec: _Record, digest: bytes, tokens: Sequence[int], salt: str | None
    ) -> dict[str, Any] | None:
        """Pin the prompt's partial block for ``rec``; its stored block if it is new."""
        handle = _handle(digest)
        self._held_partial[id(rec)] = handle
        n = self.partials.get(handle, 0)
        self.partials[handle] = n + 1
        if n:
            return None  # another running request already stored it
        self._digests[handle] = digest
        return self._block(handle, tokens, salt)

    def _release(self, rec: _Record, alloc: Allocation, finished: bool) -> None:
        super()._release(rec, alloc, finished)
        handle = self._held_partial.pop(id(rec), None)
        if handle is None or handle not in self.partials:
            return  # no partial block, or a reset dropped it
        self.partials[handle] -= 1
        if not self.partials[handle]:
            del self.partials[handle]
            self._add_dict({"type": "removed", "block_hashes": [self._published(handle)]})
            self._digests.pop(handle, None)

    def reset(self) -> int | None:
        """Empty the cache: the dict shape removes every block, the stream clears."""
        self._clearing = sorted(self.cached_block_hashes())
        try:
            return super().reset()
        finally:
            self._clearing = []

    def begin(self, publisher: Any) -> None:
        """A (re)start: as :meth:`Engine.begin`, with event ids from 0 and ``created`` events."""
        super().begin(publisher)
        self.buffer.restart()
        self._digests.clear()
        self.partials.clear()
        self._held_partial.clear()
        levels = [self.num_blocks, self.options.host_blocks]
        self._add_dict({"type": "created", "num_blocks_per_cache_level": levels})

    # -- events --

    def _pub(self, handle: int | None) -> int | str | None:
        return None if handle is None else self._published(handle)

    def _block(self, handle: int, tokens: Sequence[int], salt: str | None) -> dict[str, Any]:
        return {
            "type": "stored_block",
            "block_hash": self._published(handle),
            "tokens": [
                {"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens
            ],
            "cache_level": 0,
            "priority": 35,
            "mm_keys": [],
            "cache_salt": salt,
        }

    def add_event(self, data: dict[str, Any], window_size: int | None = None) -> int:
        """Buffer one dict event as the engine's serializer writes it; returns its id."""
        body: dict[str, Any] = {
            "data": data,
            "window_size": self.window if window_size is None else window_size,
            "hash_algo": self.options.hash_algo,
        }
        if self.options.attention_dp_rank is not None:
            body["attention_dp_rank"] = self.options.attention_dp_rank
        return self.buffer.add(body)

    def _add_dict(self, data: dict[str, Any]) -> None:
        self.add_event(data)
        if self.options.sliding_window is not None:
            self.add_event(data, self.options.sliding_window)

    def publish(self, events: list[VllmEvent]) -> int | None:
        """Publish one admission's (or a reset's) events: removals at once, the store after.

        The streaming batch goes out now; the dict shape's ``removed`` event
        is buffered now and its ``stored`` event by :meth:`admit`, once the
        partial block is known.

        :returns: the streaming batch's sequence number, or None.
        """
        wire: list[_WireEvent] = []
        removed: list[int | str] = []
        bs = self.block_size
        for ev in events:
            if isinstance(ev, VllmBlockRemoved):
                hashes = [cast(int, h) for h in ev.block_hashes]
                wire.append(_WireRemoved([_signed(h) for h in hashes], "GPU"))
                for h in hashes:
                    removed.append(self._published(h))
                    self._digests.pop(h, None)
            elif isinstance(ev, VllmBlockStored):
                hashes = [cast(int, h) for h in ev.block_hashes]
                parent = cast("int | None", ev.parent_block_hash)
                wire.append(
                    _WireStored(
                        [_signed(h) for h in hashes],
                        None if parent is None else _signed(parent),
                        list(ev.token_ids),
                        bs,
                        ev.lora_id,
                        "GPU",
                        None,
                    )
                )
                for h in hashes:
                    self._digests[h] = self._admitting[h]
                self._stored = {
                    "type": "stored",
                    "parent_hash": self._pub(parent),
                    "blocks": [
                        self._block(h, ev.token_ids[i * bs : (i + 1) * bs], self._salt)
                        for i, h in enumerate(hashes)
                    ],
                }
            else:
                assert isinstance(ev, VllmAllBlocksCleared)
                wire.append(_WireCleared())
                gone = [*self._clearing, *self.partials]
                removed.extend(self._published(h) for h in gone if h in self._digests)
                self.partials.clear()
                self._held_partial.clear()
                self._digests.clear()
        if removed:
            self._add_dict({"type": "removed", "block_hashes": removed})
        return super().publish(cast("list[VllmEvent]", wire)) if wire else None


def _handle(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big")


def add_routes(app: web.Application, engine: TrtllmEngine) -> None:
    """Serve ``POST /kv_cache_events`` (draining the dict-event buffer) on ``app``."""

    async def kv_cache_events(request: web.Request) -> web.StreamResponse:
        return web.json_response(engine.buffer.drain())

    app.router.add_post("/kv_cache_events", kv_cache_events)

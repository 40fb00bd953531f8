"""The mock engine core: prefix cache, request log, KV-event publishing, generation.

Everything here runs on the worker's event loop, except the read-only
observers (:meth:`Engine.requests`, :meth:`Engine.stats`...), which any thread
may call: one lock guards the cache, the log and the counters.

A generation request is *admitted* (its full prompt blocks hashed with vLLM's
chained hash, the hit pinned, the missing blocks stored, the resulting events
published as one batch), then *generated* (a prefill delay proportional to the
uncached tokens, then one piece per output token), then *released* (its blocks
unpinned, deepest first).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from ..events.engine_hashes import VllmHashAlgo, VllmLoRA, vllm_block_hashes
from ._formats import completion_pieces
from ._prefix_cache import Allocation, PrefixCache
from ._publisher import KVEventPublisher
from ._tokenizer import MockTokenizer, RequestError
from ._wire import VllmEvent

__all__ = ["GENERATION_PATHS", "Engine", "RequestRecord", "RequestStatus", "WorkerStats"]

#: The endpoints that generate (and so touch the cache); ``fail_next`` applies to these.
GENERATION_PATHS: Final = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/responses",
        "/inference/v1/generate",
    }
)

RequestStatus = Literal["running", "finished", "aborted"]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One admitted prompt, as the worker saw it (a snapshot).

    :ivar request_id: the ``X-Request-Id`` header, else the body's
        ``request_id``, else a generated id; ``-<i>`` is appended for the
        i-th prompt of a multi-prompt completions request.
    :ivar path: the endpoint, e.g. ``"/v1/chat/completions"``.
    :ivar prompt_tokens: prompt length in tokens.
    :ivar cached_tokens: prompt tokens found in the prefix cache (full blocks).
    :ivar completion_tokens: tokens generated so far.
    :ivar block_hashes: the prompt's full-block hashes (vLLM event u64s).
    :ivar stored_hashes: blocks this request stored.
    :ivar evicted_hashes: blocks evicted to make room for it.
    :ivar cache_salt: the request's ``cache_salt``.
    :ivar seq: sequence number of the event batch it caused, or ``None``.
    :ivar status: ``"running"``, ``"finished"`` or ``"aborted"`` (client gone,
        or the worker stopped).
    :ivar prompt_token_ids: the prompt's token ids.
    :ivar lora_name: the LoRA adapter the request named, or ``None`` (base model).
    :ivar transferred_tokens: leading prompt tokens whose KV another worker sent
        (a disaggregated prefill, :mod:`kvroute.testing._disagg`).
    """

    request_id: str
    path: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    block_hashes: tuple[int, ...]
    stored_hashes: tuple[int, ...]
    evicted_hashes: tuple[int, ...]
    cache_salt: str | None
    seq: int | None
    status: RequestStatus
    prompt_token_ids: tuple[int, ...]
    lora_name: str | None = None
    transferred_tokens: int = 0


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """Counters over the worker's life (they survive restarts), plus cache state.

    :ivar requests: prompts admitted.
    :ivar running: prompts being generated now.
    :ivar prompt_tokens: prompt tokens admitted.
    :ivar cached_tokens: of those, tokens served from the prefix cache.
    :ivar completion_tokens: tokens generated.
    :ivar blocks_stored: blocks stored.
    :ivar blocks_evicted: blocks evicted (not counting resets).
    :ivar cached_blocks: blocks in the cache now.
    :ivar num_blocks: the cache's capacity in blocks.
    :ivar batches_published: event batches numbered since the last start.
    """

    requests: int
    running: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    blocks_stored: int
    blocks_evicted: int
    cached_blocks: int
    num_blocks: int
    batches_published: int

    @property
    def hit_rate(self) -> float:
        """``cached_tokens / prompt_tokens`` (0 before any request)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(slots=True)
class _Record:
    request_id: str
    path: str
    prompt_token_ids: tuple[int, ...]
    cached_tokens: int
    block_hashes: tuple[int, ...]
    stored_hashes: tuple[int, ...]
    evicted_hashes: tuple[int, ...]
    cache_salt: str | None
    seq: int | None = None
    completion_tokens: int = 0
    status: RequestStatus = "running"
    lora_name: str | None = None
    transferred: int = 0

    def snapshot(self) -> RequestRecord:
        return RequestRecord(
            request_id=self.request_id,
            path=self.path,
            prompt_tokens=len(self.prompt_token_ids),
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            block_hashes=self.block_hashes,
            stored_hashes=self.stored_hashes,
            evicted_hashes=self.evicted_hashes,
            cache_salt=self.cache_salt,
            seq=self.seq,
            status=self.status,
            prompt_token_ids=self.prompt_token_ids,
            lora_name=self.lora_name,
            transferred_tokens=self.transferred,
        )


class Request:
    """An admitted prompt: its log record and its pinned blocks."""

    __slots__ = ("_alloc", "_engine", "_record")

    def __init__(self, engine: Engine, record: _Record, alloc: Allocation) -> None:
        self._engine = engine
        self._record = record
        self._alloc = alloc

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self._record.prompt_token_ids)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens not computed here: cache hits, or (as vLLM counts) KV received."""
        return max(self._record.cached_tokens, self._record.transferred)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far."""
        return self._record.completion_tokens

    def release(self, finished: bool = False) -> None:
        """Unpin the blocks and close the record (``aborted`` unless ``finished``). Idempotent."""
        self._engine._release(self._record, self._alloc, finished)

    async def generate(
        self, max_tokens: int, pieces: Sequence[str] | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the output pieces with their delays; release the request at the end.

        Close it (``contextlib.aclosing``) when not run to the end.

        :param max_tokens: how many words to generate, when ``pieces`` is None.
        :param pieces: the output to generate instead, one piece per token
            (e.g. a tool call's arguments).
        """
        rec, engine = self._record, self._engine
        if pieces is None:
            pieces = completion_pieces(rec.prompt_token_ids, max_tokens)
        finished = False
        try:
            uncached = len(rec.prompt_token_ids) - max(rec.cached_tokens, rec.transferred)
            if engine.prefill_delay_per_token and uncached:
                await asyncio.sleep(engine.prefill_delay_per_token * uncached)
            for piece in pieces:
                if engine.token_delay:
                    await asyncio.sleep(engine.token_delay)
                await engine.wait_resumed()
                rec.completion_tokens += 1
                yield piece
            finished = True
        finally:
            self.release(finished)

    async def run(self, max_tokens: int, pieces: Sequence[str] | None = None) -> str:
        """Generate to the end and return the text (see :meth:`generate`)."""
        out: list[str] = []
        async with contextlib.aclosing(self.generate(max_tokens, pieces)) as gen:
            async for piece in gen:
                out.append(piece)
        return "".join(out)


class Engine:
    """The state of one mock engine, shared by the HTTP handlers and the worker's hooks.

    :param model: the served model name.
    :param block_size: tokens per KV block.
    :param num_blocks: prefix-cache capacity, in blocks.
    :param tokenizer: renders every prompt.
    :param max_model_len: longest prompt + output accepted.
    :param default_max_tokens: output length when a request names none.
    :param token_delay: seconds per generated token.
    :param prefill_delay_per_token: seconds per uncached prompt token.
    :param hash_algo: vLLM's ``--prefix-caching-hash-algo``.
    :param hash_seed: the engine's ``PYTHONHASHSEED`` (``None``: unset).
    :param lora_adapters: the LoRA adapters' names (unique, none the model's);
        adapter ``i`` gets ``lora_id`` ``i + 1`` and path ``/models/<name>``.
    """

    def __init__(
        self,
        *,
        model: str,
        block_size: int,
        num_blocks: int,
        tokenizer: MockTokenizer,
        max_model_len: int,
        default_max_tokens: int,
        token_delay: float,
        prefill_delay_per_token: float,
        hash_algo: VllmHashAlgo,
        hash_seed: str | None,
        lora_adapters: Sequence[str] = (),
    ) -> None:
        self.model = model
        #: LoRA adapter name -> vLLM ``lora_id``, in declaration order.
        self.lora_ids: dict[str, int] = {name: i + 1 for i, name in enumerate(lora_adapters)}
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.token_delay = token_delay
        self.prefill_delay_per_token = prefill_delay_per_token
        self.hash_algo: VllmHashAlgo = hash_algo
        self.hash_seed = hash_seed
        #: The running publisher, or ``None`` (stopped, or not publishing).
        self.publisher: KVEventPublisher | None = None
        #: Rewrites each batch's events before publishing (a fault), or ``None``.
        self.event_filter: Callable[[list[VllmEvent]], list[VllmEvent]] | None = None
        self._lock = threading.Lock()
        self._cache = PrefixCache(block_size, num_blocks)
        self._log: list[_Record] = []
        self._blocks_stored = 0
        self._blocks_evicted = 0
        self._fail_queue: deque[int] = deque()
        self._http_requests: Counter[str] = Counter()
        self._headers: deque[tuple[str, dict[str, str]]] = deque(maxlen=1000)
        self._resumed: asyncio.Event | None = None
        self.paused = False
        # request id -> prompt tokens whose KV a prefill worker sent (on the loop only)
        self._transfers: dict[str, int] = {}

    # -- lifecycle (on the loop) ----------------------------------------

    def begin(self, publisher: KVEventPublisher | None) -> None:
        """A (re)start: empty cache, not paused, events through ``publisher``."""
        with self._lock:
            self._cache = PrefixCache(self.block_size, self.num_blocks)
        self.publisher = publisher
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.paused = False

    def end(self) -> None:
        """After a stop: records still running are aborted."""
        self.publisher = None
        with self._lock:
            for rec in self._log:
                if rec.status == "running":
                    rec.status = "aborted"

    def set_paused(self, paused: bool) -> None:
        """Hold (or let go) every request at its next step."""
        self.paused = paused
        if self._resumed is not None:
            if paused:
                self._resumed.clear()
            else:
                self._resumed.set()

    async def wait_resumed(self) -> None:
        """Return at once unless paused; then when resumed."""
        resumed = self._resumed
        if resumed is not None and not resumed.is_set():
            await resumed.wait()

    # -- failures ---------------------------------------------------------

    def add_failures(self, n: int, status: int) -> None:
        """Queue ``n`` failures with HTTP ``status`` for generation requests."""
        with self._lock:
            self._fail_queue.extend([status] * n)

    def count_http_request(self, path: str, headers: Mapping[str, str] | None = None) -> None:
        """Note an HTTP request to ``path`` (any endpoint), and its headers (the last 1000)."""
        with self._lock:
            self._http_requests[path] += 1
            if headers is not None:
                self._headers.append((path, {k.lower(): v for k, v in headers.items()}))

    def request_headers(self) -> list[tuple[str, dict[str, str]]]:
        """``(path, headers)`` of the last 1000 HTTP requests, oldest first (names lowercased)."""
        with self._lock:
            return list(self._headers)

    def take_failure(self, path: str) -> int | None:
        """The status to fail a request to ``path`` with, or ``None``."""
        if path not in GENERATION_PATHS:
            return None
        with self._lock:
            return self._fail_queue.popleft() if self._fail_queue else None

    # -- models -----------------------------------------------------------

    def is_served(self, model: str) -> bool:
        """Whether ``model`` names the base model or one of the LoRA adapters."""
        return model == self.model or model in self.lora_ids

    @staticmethod
    def lora_path(name: str) -> str:
        """The path an adapter is served from (its ``--lora-modules name=path``)."""
        return f"/models/{name}"

    def _lora(self, lora_name: str | None) -> VllmLoRA | None:
        if lora_name is None:
            return None
        if lora_name not in self.lora_ids:
            raise ValueError(f"unknown LoRA adapter {lora_name!r}")
        return VllmLoRA(lora_name, self.lora_path(lora_name))

    # -- the cache ----------------------------------------------------------

    def block_hashes(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> list[int]:
        """The hashes of a prompt's full blocks (vLLM event u64s).

        :raises ValueError: ``lora_name`` is not one of the adapters.
        """
        hashes = vllm_block_hashes(
            list(token_ids),
            self.block_size,
            algo=self.hash_algo,
            seed=self.hash_seed,
            lora=self._lora(lora_name),
            cache_salt=cache_salt,
        )
        return [int(h) for h in hashes]

    def publish(self, events: list[VllmEvent]) -> int | None:
        """Publish a batch if publishing; its sequence number, else ``None``."""
        publisher = self.publisher
        if publisher is None:
            return None
        if self.event_filter is not None:
            events = self.event_filter(events)
        return publisher.publish(events)

    def expect_transfer(self, request_id: str, tokens: int) -> None:
        """The next admission of ``request_id`` has its first ``tokens`` prompt tokens' KV."""
        self._transfers[request_id] = tokens

    def admit(
        self,
        request_id: str,
        path: str,
        tokens: list[int],
        cache_salt: str | None,
        lora_name: str | None = None,
    ) -> Request:
        """Look the prompt up, pin the hit, store the rest and publish the events.

        :param lora_name: the LoRA adapter the request names, or ``None`` for
            the base model.
        :raises RequestError: an empty prompt.
        :raises ValueError: ``lora_name`` is not one of the adapters.
        """
        if not tokens:
            raise RequestError("The prompt is empty.")
        hashes = self.block_hashes(tokens, cache_salt, lora_name)
        extra_keys = _event_extra_keys(len(hashes), cache_salt, lora_name)
        lora_id = None if lora_name is None else self.lora_ids[lora_name]
        with self._lock:
            alloc = self._cache.acquire(
                hashes, tokens, extra_keys=extra_keys, lora_id=lora_id, lora_name=lora_name
            )
            self._blocks_stored += len(alloc.stored)
            self._blocks_evicted += len(alloc.evicted)
            rec = _Record(
                request_id=request_id,
                path=path,
                prompt_token_ids=tuple(tokens),
                cached_tokens=alloc.hit_blocks * self.block_size,
                block_hashes=tuple(hashes),
                stored_hashes=alloc.stored,
                evicted_hashes=alloc.evicted,
                cache_salt=cache_salt,
                lora_name=lora_name,
                transferred=min(self._transfers.pop(request_id, 0), len(tokens)),
            )
            self._log.append(rec)
        if alloc.events:
            rec.seq = self.publish(alloc.events)
        return Request(self, rec, alloc)

    def _release(self, rec: _Record, alloc: Allocation, finished: bool) -> None:
        with self._lock:
            self._cache.release(alloc)
            if rec.status == "running":
                rec.status = "finished" if finished else "aborted"

    def reset(self) -> int | None:
        """Empty the cache and publish ``AllBlocksCleared``; the batch's seq or ``None``."""
        with self._lock:
            events = self._cache.clear()
        return self.publish(events)

    # -- observers (any thread) ------------------------------------------------

    def requests(self) -> list[RequestRecord]:
        """Snapshots of every admitted prompt, in admission order."""
        with self._lock:
            return [r.snapshot() for r in self._log]

    def cache_hits(self) -> dict[str, int]:
        """``request_id -> cached_tokens``."""
        with self._lock:
            return {r.request_id: r.cached_tokens for r in self._log}

    def stats(self) -> WorkerStats:
        """Counters and cache occupancy."""
        publisher = self.publisher
        with self._lock:
            return WorkerStats(
                requests=len(self._log),
                running=sum(r.status == "running" for r in self._log),
                prompt_tokens=sum(len(r.prompt_token_ids) for r in self._log),
                cached_tokens=sum(r.cached_tokens for r in self._log),
                completion_tokens=sum(r.completion_tokens for r in self._log),
                blocks_stored=self._blocks_stored,
                blocks_evicted=self._blocks_evicted,
                cached_blocks=len(self._cache),
                num_blocks=self.num_blocks,
                batches_published=publisher.next_seq if publisher is not None else 0,
            )

    def http_requests(self) -> dict[str, int]:
        """HTTP requests received, by path."""
        with self._lock:
            return dict(self._http_requests)

    def cached_block_hashes(self) -> set[int]:
        """The hashes of every cached block."""
        with self._lock:
            return self._cache.hashes()

    def clear_log(self) -> None:
        """Forget finished records and reset the counters."""
        with self._lock:
            self._log = [r for r in self._log if r.status == "running"]
            self._blocks_stored = self._blocks_evicted = 0
            self._http_requests.clear()
            self._headers.clear()


def _event_extra_keys(
    n_blocks: int, cache_salt: str | None, lora_name: str | None
) -> list[object] | None:
    """Per-block ``extra_keys`` as vLLM 0.33 publishes them (untagged), or ``None``.

    vLLM hashes every block of a LoRA request with ``("lora", name, path)`` and
    the first block with ``("cache_salt", salt)`` too; its events carry only
    the LoRA name and the salt, in that order:

    >>> _event_extra_keys(2, "tenant-A", "my-lora")
    [['my-lora', 'tenant-A'], ['my-lora']]
    >>> _event_extra_keys(3, "tenant-A", None)
    [['tenant-A'], None, None]
    >>> _event_extra_keys(2, None, None) is None
    True
    """
    if n_blocks == 0 or (cache_salt is None and lora_name is None):
        return None
    first: list[object] = [k for k in (lora_name, cache_salt) if k is not None]
    rest = [None if lora_name is None else [lora_name] for _ in range(n_blocks - 1)]
    return [first, *rest]

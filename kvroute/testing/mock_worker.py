"""``MockWorker``: a GPU-free stand-in for a vLLM 0.33 worker, on real sockets.

It serves vLLM's HTTP API on ``127.0.0.1`` (aiohttp) and publishes vLLM 0.33
KV events over ZMQ, from a prefix cache with vLLM's semantics, so that a
routing proxy and a KV-event subscriber can be tested end to end on loopback.

HTTP endpoints:

- ``POST /v1/completions``: ``prompt`` (string, list of strings, token ids or
  lists of token ids), ``max_tokens``, ``stream``, ``stream_options``,
  ``cache_salt``;
- ``POST /v1/chat/completions``: ``messages``, ``tools``,
  ``max_completion_tokens`` / ``max_tokens``, ``stream``, ``stream_options``,
  ``add_generation_prompt``, ``cache_salt``;
- ``POST /v1/messages`` (Anthropic Messages, as vLLM serves it) and
  ``POST /v1/messages/count_tokens``;
- ``POST /v1/responses`` (OpenAI's Responses API, streaming or not, with
  ``previous_response_id`` continuation from the responses this start
  served) and ``POST /v1/responses/render`` (see
  :mod:`kvroute.testing._responses`);
- ``POST /v1/embeddings`` (deterministic unit vectors, ``float`` or
  ``base64``; see :mod:`kvroute.testing._embeddings`);
- ``POST /tokenize`` and ``POST /detokenize``;
- ``POST /v1/completions/render``, ``/v1/chat/completions/render``,
  ``/v1/messages/render``: vLLM's GPU-less render endpoints, answering
  ``GenerateRequest`` JSON (a list of them for completions);
- ``POST /inference/v1/generate``: token-in / token-out (non-streaming);
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (a few vLLM gauges).

LoRA adapters (``lora_adapters``) are served as ``vllm serve BASE
--enable-lora --lora-modules name=/models/name ...`` serves them: listed by
``/v1/models`` with ``parent`` = the base model, accepted as ``model`` by
every endpoint (responses echo the requested name), hashed with vLLM's LoRA
extra key (so they never share blocks with the base model or each other),
and published with ``lora_id``, ``lora_name`` and per-block ``extra_keys``.

Generation is deterministic: ``max_tokens`` pieces (default 16), each a word
derived from the prompt's tokens, ``finish_reason`` ``"length"`` (Anthropic
``stop_reason`` ``"max_tokens"``). An Anthropic request whose ``tool_choice``
forces a call (``{"type": "tool", "name": ...}``, or ``{"type": "any"}``: the
first tool) gets one ``tool_use`` block instead, as vLLM streams it
(``content_block_start`` with the id and name, the arguments' JSON in up to
``max_tokens`` ``input_json_delta`` pieces, ``stop_reason`` ``"tool_use"``),
its input a value per property of the tool's schema. Each request first waits
``prefill_delay_per_token`` seconds per *uncached* prompt token, then
``token_delay`` per output token.

Each generation request is admitted into the prefix cache (hits pinned while
it runs, missing full blocks stored, LRU eviction) and its events are
published as one batch: the ``BlockRemoved`` events of the blocks evicted for
it, then one ``BlockStored`` (nothing is published on a full hit).
``usage.prompt_tokens_details.cached_tokens`` (Anthropic:
``cache_read_input_tokens``) is the hit, in tokens.

With ``role="prefill"`` or ``"decode"`` the worker takes part in a
prefill/decode-disaggregated flow, vLLM's (NIXL ``kv_transfer_params``) or
SGLang's (``bootstrap_*`` fields), with the KV transfer mocked over HTTP; see
:mod:`kvroute.testing._disagg`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections.abc import Callable, Collection, Sequence
from types import TracebackType
from typing import Final

from aiohttp import web

from .._serve import ServerThread, abort_sockets
from ..events.engine_hashes import VllmHashAlgo
from ._disagg import DisaggMock, TransferStats
from ._engine import GENERATION_PATHS, Engine, RequestRecord, WorkerStats
from ._http import HttpApi
from ._publisher import KVEventPublisher
from ._tokenizer import MockTokenizer
from ._trtllm import TrtllmEngine, TrtllmMock, TrtllmOptions, add_routes
from ._wire import VllmEvent

__all__ = ["GENERATION_PATHS", "MockWorker", "RequestRecord", "WorkerStats"]

_HOST: Final = "127.0.0.1"


class MockWorker:
    """A fake vLLM 0.33 worker: real HTTP and ZMQ servers on loopback, no GPU.

    Usage::

        with MockWorker(block_size=16) as w:
            ...  # POST to w.url + "/v1/completions", SUB to w.events_endpoint

    The servers run on a background thread with its own event loop;
    :meth:`start` returns once the HTTP, PUB and replay sockets are listening.
    :meth:`stop` then :meth:`start` is an engine restart: same ports, sequence
    numbers from 0, empty cache and no stored Responses (the request log and
    counters are kept).

    Settings and addresses are properties; what reads the worker's state is
    a method returning a snapshot (:meth:`stats`, :meth:`requests`,
    :meth:`http_requests`, :meth:`cache_hits`, :meth:`cached_block_hashes`),
    as ``Router.stats()`` is. ``kvroute mock-worker`` runs one from the
    command line (:mod:`kvroute.testing.cli`).

    :param model: the served model name; requests naming another model (and no
        LoRA adapter) get 404.
    :param lora_adapters: LoRA adapter names, served on top of ``model`` as
        ``--lora-modules name=/models/name``: adapter ``i`` (0-based) has vLLM
        ``lora_id`` ``i + 1`` and path ``/models/<name>``. A request naming an
        adapter is hashed with it (:class:`kvroute.hashing.VllmLoRA`) and its
        ``BlockStored`` carries ``lora_id``, ``lora_name`` and ``extra_keys``
        (the name on every block, then the ``cache_salt`` on the first).
    :param block_size: tokens per KV block.
    :param num_blocks: prefix-cache capacity, in blocks.
    :param port: HTTP port (0: a free one, then kept across restarts).
    :param events_port: KV-event publisher port (0: a free one, then kept).
    :param replay_port: replay ROUTER port (0: a free one, then kept).
    :param topic: the topic frame of every event message.
    :param tokenizer: a Hugging Face ``tokenizer.json`` path, or ``None`` for
        the built-in byte tokenizer (see :class:`MockTokenizer`).
    :param chat_template: a Jinja chat template, or ``None`` for the default.
    :param max_model_len: longest prompt + output accepted, and ``/tokenize``'s
        ``max_model_len``.
    :param default_max_tokens: output length when a request gives none
        (Anthropic requests must give one).
    :param token_delay: seconds per generated token.
    :param prefill_delay_per_token: seconds per uncached prompt token.
    :param hash_algo: vLLM's ``--prefix-caching-hash-algo``.
    :param hash_seed: the engine's ``PYTHONHASHSEED`` (``None``: unset; the
        xxhash algorithms then need one to be reproducible at all).
    :param publish_events: run the KV-event publisher at all.
    :param replay: run the replay ROUTER socket.
    :param buffer_steps: batches kept for replay.
    :param drop_seqs: sequence numbers buffered for replay but never sent live.
    :param dp_rank: the data-parallel rank written into every batch.
    :param trtllm: act as a ``trtllm-serve`` worker instead (``True``, or its
        :class:`~kvroute.testing.TrtllmOptions`): TensorRT-LLM's hashes and KV
        events, streamed and at ``POST /kv_cache_events`` (see :attr:`trtllm`).
    :param store_responses: keep ``/v1/responses`` answers for
        ``previous_response_id`` (vLLM with ``VLLM_ENABLE_RESPONSES_API_STORE=1``;
        False: vLLM's default, where every continuation is a 404).
    :param role: ``"both"`` (default), ``"prefill"`` or ``"decode"``.
    :param disagg_protocol: the disaggregation protocol spoken in a role:
        ``"vllm"`` (NIXL's ``kv_transfer_params``) or ``"sglang"`` (bootstrap).
    :param bootstrap_port: an SGLang prefill worker's bootstrap port (0: a free
        one, then kept).
    :param transfer_timeout: seconds offered KV waits to be pulled, and a pull
        waits for its offer.
    :raises ValueError: a size or delay is out of range, ``hash_algo`` is an
        xxhash algorithm without ``hash_seed`` (its hashes are random then), or
        a LoRA adapter name is empty, repeated or the base model's.
    :raises TypeError: ``lora_adapters`` is a string, or holds a non-string.
    """

    def __init__(
        self,
        *,
        model: str = "mock-model",
        lora_adapters: Sequence[str] = (),
        block_size: int = 16,
        num_blocks: int = 1024,
        port: int = 0,
        events_port: int = 0,
        replay_port: int = 0,
        topic: str = "",
        tokenizer: str | os.PathLike[str] | None = None,
        chat_template: str | None = None,
        max_model_len: int = 32768,
        default_max_tokens: int = 16,
        token_delay: float = 0.001,
        prefill_delay_per_token: float = 1e-5,
        hash_algo: VllmHashAlgo = "sha256",
        hash_seed: str | None = None,
        publish_events: bool = True,
        replay: bool = True,
        buffer_steps: int = 10_000,
        drop_seqs: Collection[int] = (),
        dp_rank: int | None = 0,
        trtllm: TrtllmOptions | bool = False,
        store_responses: bool = True,
        role: str = "both",
        disagg_protocol: str = "vllm",
        bootstrap_port: int = 0,
        transfer_timeout: float = 30.0,
    ) -> None:
        for name, value in (
            ("block_size", block_size),
            ("num_blocks", num_blocks),
            ("max_model_len", max_model_len),
            ("buffer_steps", buffer_steps),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if token_delay < 0 or prefill_delay_per_token < 0 or default_max_tokens < 0:
            raise ValueError("delays and default_max_tokens must not be negative")
        adapters = _check_lora_adapters(model, lora_adapters)
        opts = TrtllmOptions() if trtllm is True else trtllm or None
        engine = Engine if opts is None else functools.partial(TrtllmEngine, opts)
        self._engine = engine(
            model=model,
            block_size=block_size,
            num_blocks=num_blocks,
            tokenizer=MockTokenizer(tokenizer, chat_template),
            max_model_len=max_model_len,
            default_max_tokens=default_max_tokens,
            token_delay=token_delay,
            prefill_delay_per_token=prefill_delay_per_token,
            hash_algo=hash_algo,
            hash_seed=hash_seed,
            lora_adapters=adapters,
        )
        # Fail here, not on the first request, for an unusable hash setting.
        self._engine.block_hashes([0] * block_size)
        self._disagg = DisaggMock(self._engine, role, disagg_protocol, transfer_timeout)
        self._api = HttpApi(
            self._engine,
            store_responses=store_responses,
            disagg=self._disagg if role != "both" else None,
        )
        self._bootstrap_port = bootstrap_port
        self.topic = topic
        self.publish_events = publish_events
        self.replay = replay
        self.buffer_steps = buffer_steps
        self.drop_seqs = frozenset(drop_seqs)
        self.dp_rank = dp_rank
        self._port = port
        self._events_port = events_port
        self._replay_port = replay_port
        self._runner: web.AppRunner | None = None
        self._thread = ServerThread(f"MockWorker[{model}]", self._startup, self._shutdown)

    # ------------------------------------------------------------------
    # Settings
    # ------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The served model name."""
        return self._engine.model

    @property
    def lora_adapters(self) -> tuple[str, ...]:
        """The LoRA adapter names; adapter ``i`` has ``lora_id`` ``i + 1``."""
        return tuple(self._engine.lora_ids)

    def lora_id(self, name: str) -> int:
        """vLLM's integer ``lora_id`` of adapter ``name`` (its events' ``lora_id``).

        :raises KeyError: ``name`` is not one of the adapters.
        """
        return self._engine.lora_ids[name]

    def lora_path(self, name: str) -> str:
        """The path adapter ``name`` is served from: ``/models/<name>``.

        :raises KeyError: ``name`` is not one of the adapters.
        """
        if name not in self._engine.lora_ids:
            raise KeyError(name)
        return self._engine.lora_path(name)

    @property
    def block_size(self) -> int:
        """Tokens per KV block."""
        return self._engine.block_size

    @property
    def num_blocks(self) -> int:
        """Prefix-cache capacity, in blocks."""
        return self._engine.num_blocks

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output accepted."""
        return self._engine.max_model_len

    @property
    def tokenizer(self) -> MockTokenizer:
        """The tokenizer and chat template every endpoint renders prompts with."""
        return self._engine.tokenizer

    @property
    def token_delay(self) -> float:
        """Seconds per generated token; may be changed while running."""
        return self._engine.token_delay

    @token_delay.setter
    def token_delay(self, value: float) -> None:
        if value < 0:
            raise ValueError("token_delay must not be negative")
        self._engine.token_delay = value

    @property
    def prefill_delay_per_token(self) -> float:
        """Seconds per uncached prompt token; may be changed while running."""
        return self._engine.prefill_delay_per_token

    @prefill_delay_per_token.setter
    def prefill_delay_per_token(self, value: float) -> None:
        if value < 0:
            raise ValueError("prefill_delay_per_token must not be negative")
        self._engine.prefill_delay_per_token = value

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> MockWorker:
        """Start the servers on a background thread; return once all listen.

        :returns: ``self``.
        :raises RuntimeError: already running.
        :raises OSError: a port is taken (everything started is closed first).
        """
        if self._thread.running:
            raise RuntimeError("MockWorker is already running")
        self._thread.start(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Close every socket and join the thread. Idempotent.

        Requests still running are cancelled (recorded as ``"aborted"``);
        their clients see the connection drop.
        """
        self._thread.stop(timeout)

    def restart(self) -> None:
        """:meth:`stop` then :meth:`start`, on the same ports."""
        self.stop()
        self.start()

    @property
    def is_running(self) -> bool:
        """Whether the servers are up."""
        return self._thread.running

    def __enter__(self) -> MockWorker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def astart(self) -> MockWorker:
        """:meth:`start` without blocking the calling event loop."""
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """:meth:`stop` without blocking the calling event loop."""
        await asyncio.to_thread(self.stop)

    async def __aenter__(self) -> MockWorker:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    async def _startup(self) -> None:
        publisher: KVEventPublisher | None = None
        if self.publish_events:
            publisher = KVEventPublisher(
                events_port=self._events_port,
                replay_port=self._replay_port if self.replay else None,
                topic=self.topic,
                buffer_steps=self.buffer_steps,
                dp_rank=self.dp_rank,
                drop_seqs=self.drop_seqs,
            )
            await publisher.start()
            self._events_port = _port_of(publisher.events_endpoint)
            if publisher.replay_endpoint is not None:
                self._replay_port = _port_of(publisher.replay_endpoint)
        self._engine.begin(publisher)
        # A short shutdown grace: stopping cancels in-flight requests promptly.
        app = self._api.app()
        if isinstance(self._engine, TrtllmEngine):
            add_routes(app, self._engine)
        # A client's hang-up cancels its request, streamed or not, as vLLM's
        # handlers are cancelled when their client disconnects.
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.1, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, _HOST, self._port)
        await site.start()
        self._port = site.port
        self._disagg.host, self._disagg.port = _HOST, self._port
        if self.role == "prefill" and self.disagg_protocol == "sglang":
            # SGLang's bootstrap server: here the same routes on a second port
            boot = web.TCPSite(self._runner, _HOST, self._bootstrap_port)
            await boot.start()
            self._bootstrap_port = boot.port

    async def _shutdown(self) -> None:
        if self._runner is not None:
            # Stop listening first, then let connections the loop already
            # accepted finish being set up, so the shutdown below sees them all.
            for site in list(self._runner.sites):
                await site.stop()
            await asyncio.sleep(0.02)
            await self._runner.cleanup()
            self._runner = None
        # A connection whose handler was cancelled mid-response can outlive the
        # server's shutdown: its socket closes before the engine ends.
        abort_sockets()
        await asyncio.sleep(0)  # let the transports' close callbacks run
        publisher = self._engine.publisher
        self._engine.end()
        if publisher is not None:
            await publisher.close()

    # ------------------------------------------------------------------
    # Addresses
    # ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The HTTP port (0 before the first start when none was given)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{_HOST}:{self._port}"

    @property
    def role(self) -> str:
        """``"both"``, ``"prefill"`` or ``"decode"``."""
        return self._disagg.role

    @property
    def disagg_protocol(self) -> str:
        """``"vllm"`` or ``"sglang"``: the disaggregation protocol its role speaks."""
        return self._disagg.protocol

    @property
    def bootstrap_port(self) -> int:
        """An SGLang prefill worker's bootstrap port (0 otherwise, or before the first start)."""
        return self._bootstrap_port

    @property
    def engine_id(self) -> str:
        """vLLM's ``remote_engine_id`` of this worker (a prefill worker's answers carry it)."""
        return self._disagg.engine_id

    def transfers(self) -> TransferStats:
        """Its KV transfers so far: offered, pulled, refused, expired; received (decode side)."""
        return dataclasses.replace(self._disagg.stats)

    @property
    def events_port(self) -> int:
        """The KV-event publisher's port (0 before the first start when none was given)."""
        return self._events_port

    @property
    def replay_port(self) -> int:
        """The replay socket's port (0 before the first start when none was given)."""
        return self._replay_port

    @property
    def events_endpoint(self) -> str | None:
        """``tcp://127.0.0.1:<events_port>``, or ``None`` with ``publish_events=False``."""
        return f"tcp://{_HOST}:{self._events_port}" if self.publish_events else None

    @property
    def replay_endpoint(self) -> str | None:
        """``tcp://127.0.0.1:<replay_port>``, or ``None`` without replay."""
        if not (self.publish_events and self.replay):
            return None
        return f"tcp://{_HOST}:{self._replay_port}"

    @property
    def trtllm(self) -> TrtllmMock | None:
        """The TensorRT-LLM mode's surface (events URL, LLM API, event ids), or None."""
        if not isinstance(self._engine, TrtllmEngine):
            return None
        return TrtllmMock(self._engine, self.url)

    # ------------------------------------------------------------------
    # Test hooks
    # ------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        """Answer the next ``n`` generation requests with HTTP ``status``.

        Applies to :data:`GENERATION_PATHS` only, before anything is parsed or
        cached (no record, no event); the body is that API's error shape.
        Calls add up.

        :raises ValueError: ``n < 0`` or ``status`` not in 400..599.
        """
        if n < 0 or not 400 <= status <= 599:
            raise ValueError("n must be >= 0 and status an HTTP error status")
        self._engine.add_failures(n, status)

    def pause(self) -> None:
        """Stop answering: new requests (``/health`` too) and running streams hang.

        In-flight generation freezes at its next token. :meth:`resume` lets
        everything go on; :meth:`stop` cancels it. A start is never paused.
        """
        self._thread.call(lambda: self._engine.set_paused(True))

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._thread.call(lambda: self._engine.set_paused(False))

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` is in effect."""
        return self._engine.paused

    @property
    def event_filter(self) -> Callable[[list[VllmEvent]], list[VllmEvent]] | None:
        """Rewrites every batch's events before they are numbered and published (a fault).

        E.g. :func:`kvroute.testing.drop_removals`: an engine that evicts
        without saying so. The batch keeps its sequence number, so no gap
        shows. ``None`` (the default) publishes events as they are.
        """
        return self._engine.event_filter

    @event_filter.setter
    def event_filter(self, fn: Callable[[list[VllmEvent]], list[VllmEvent]] | None) -> None:
        self._engine.event_filter = fn

    def reset(self) -> int | None:
        """Empty the prefix cache (``reset_prefix_cache``) and publish ``AllBlocksCleared``.

        :returns: the batch's sequence number, or ``None`` when not publishing.
        """
        return self._thread.call(self._engine.reset)

    def publish(
        self,
        events: Sequence[VllmEvent],
        ts: float | None = None,
        dp_rank: int | None = None,
    ) -> int:
        """Publish an arbitrary batch (a probe, or a scripted scenario).

        :param events: the events; may be empty.
        :param ts: the batch timestamp (default: now).
        :param dp_rank: the batch's rank (default: the worker's ``dp_rank``).
        :returns: its sequence number.
        :raises RuntimeError: the worker is not running or not publishing.
        """
        publisher = self._engine.publisher
        if not self._thread.running or publisher is None:
            raise RuntimeError("the worker is not publishing events")
        return self._thread.call(lambda: publisher.publish(list(events), ts, dp_rank))

    def wait_for_subscribers(self, n: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``n`` SUB subscriptions reached the publisher since this start.

        Once it returns ``True``, batches published afterwards reach those
        subscribers (no ZMQ slow-joiner loss). Each ``SUBSCRIBE`` counts once.

        :returns: whether they arrived within ``timeout`` seconds.
        :raises RuntimeError: the worker is not running or not publishing.
        """
        publisher = self._engine.publisher
        if publisher is None:
            raise RuntimeError("the worker is not publishing events")
        return publisher.wait_for_subscriptions(n, timeout)

    @property
    def subscriptions(self) -> int:
        """Subscriptions the publisher has received since this start (0 when stopped)."""
        publisher = self._engine.publisher
        return publisher.subscriptions if publisher is not None else 0

    @property
    def next_seq(self) -> int:
        """The sequence number the next event batch will get (0 after a start)."""
        publisher = self._engine.publisher
        return publisher.next_seq if publisher is not None else 0

    # ------------------------------------------------------------------
    # Observation (any thread): snapshots, so methods
    # ------------------------------------------------------------------

    def requests(self) -> list[RequestRecord]:
        """Every admitted prompt, in admission order (snapshots)."""
        return self._engine.requests()

    def http_requests(self) -> dict[str, int]:
        """HTTP requests received so far, by path (e.g. ``"/v1/messages/render"``).

        Every request counts, answered or failed; restarts keep the counts,
        :meth:`clear_log` clears them.
        """
        return self._engine.http_requests()

    def request_headers(self) -> list[tuple[str, dict[str, str]]]:
        """``(path, headers)`` of the last 1000 HTTP requests, oldest first (names lowercased).

        :meth:`clear_log` clears them.
        """
        return self._engine.request_headers()

    def cache_hits(self) -> dict[str, int]:
        """``request_id -> cached_tokens`` for every admitted prompt."""
        return self._engine.cache_hits()

    def stats(self) -> WorkerStats:
        """Counters and cache occupancy."""
        return self._engine.stats()

    def cached_block_hashes(self) -> set[int]:
        """The hashes of every block in the prefix cache now."""
        return self._engine.cached_block_hashes()

    def clear_log(self) -> None:
        """Forget finished requests, counters and :meth:`http_requests` (the cache is kept)."""
        self._engine.clear_log()

    def block_hashes(
        self,
        token_ids: Sequence[int],
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> list[int]:
        """The hashes this worker gives a prompt's full blocks (vLLM event u64s).

        :param lora_name: the LoRA adapter the prompt is sent to, or ``None``
            for the base model.
        :raises ValueError: ``lora_name`` is not one of the adapters.
        """
        return self._engine.block_hashes(token_ids, cache_salt, lora_name)


def _check_lora_adapters(model: str, names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, once checked: non-empty strings, unique, none ``model``."""
    if isinstance(names, str):
        raise TypeError("lora_adapters must be a sequence of names, not a string")
    adapters = tuple(names)
    seen: set[str] = set()
    for name in adapters:
        if not isinstance(name, str):
            raise TypeError(f"a LoRA adapter name must be a str, not {type(name).__name__}")
        if not name:
            raise ValueError("a LoRA adapter name must not be empty")
        if name == model:
            raise ValueError(f"LoRA adapter {name!r} has the base model's name")
        if name in seen:
            raise ValueError(f"LoRA adapter {name!r} is given twice")
        seen.add(name)
    return adapters


def _port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])

"""Test doubles for end-to-end tests: a mock vLLM 0.33 worker on real sockets.

- :class:`MockWorker`: vLLM's HTTP API (OpenAI completions, chat, Responses
  and embeddings, Anthropic Messages, tokenize and render endpoints) on
  loopback, a prefix cache with vLLM's block hashes and LRU eviction, and
  vLLM 0.33 KV events over ZMQ (PUB + replay ROUTER). ``kvroute
  mock-worker`` runs one from the command line (:mod:`kvroute.testing.cli`).
- :class:`MockTokenizer`: the tokenizer and chat template the worker renders
  prompts with, so a proxy under test can tokenize exactly the same way.
- :func:`encode_batch` / :func:`decode_batch` and the ``Vllm*`` event structs:
  vLLM 0.33's msgpack payloads, byte-exact.
- :class:`TrtllmOptions`: ``MockWorker(trtllm=...)`` acts as a ``trtllm-serve``
  worker instead, publishing TensorRT-LLM's KV events (``POST /kv_cache_events``,
  the LLM API's calls, the ZMQ stream); :class:`TrtllmMock` is what a test
  reaches of it (``MockWorker.trtllm``).
- :class:`StateFleet`, :func:`drop_removals`, :class:`LoseEvents`: workers
  whose KV events go wrong (``MockWorker.event_filter``), and a fleet that
  measures the router's picture of their caches against the truth.

Install with the ``testing`` extra (``pip install 'kvroute[testing]'``:
``aiohttp``, ``pyzmq``, ``msgspec``, ``jinja2``, ``cbor2``; ``tokenizers``
only for a Hugging Face ``tokenizer.json``). Names are imported on first
use, so ``kvroute``'s command line reads :mod:`kvroute.testing.cli` without
loading them.

**The MockWorker API.** Settings and addresses are properties (``url``,
``port``, ``events_endpoint``, ``replay_endpoint``, ``model``,
``block_size``, ``num_blocks``, ``tokenizer``, ``token_delay``, ...), and so
are the cheap scalars ``is_running``, ``paused``, ``subscriptions`` and
``next_seq``. Everything that copies the worker's state under its lock
returns a snapshot and is a method, as ``Router.stats()`` and
``BlockIndex.stats()`` are: ``stats()``, ``requests()``,
``http_requests()``, ``cache_hits()``, ``cached_block_hashes()``,
``block_hashes(tokens)``. Actions are methods too: ``start``, ``stop``,
``restart``, ``pause``, ``resume``, ``reset``, ``publish``, ``fail_next``,
``wait_for_subscribers``, ``clear_log``.

**Stability.** This package is for tests and trials, never for serving
traffic. Its supported API is the names in ``__all__``, what the
``MockWorker`` docstring lists, and the ``kvroute mock-worker`` options;
kvroute is 0.x, so they may still change between minor versions, and a
change to them is said in README.md's notes and the commit that makes it
(``stats``, ``requests``, ``http_requests`` and ``cache_hits`` became
methods in 0.1). What the worker answers follows the vLLM version it mimics
(0.33) and changes with it. Modules starting with ``_`` are internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._prefix_cache import Allocation, PrefixCache
    from ._publisher import KVEventPublisher
    from ._state_faults import LoseEvents, Sent, StateFleet, Truth, agreement, drop_removals
    from ._tokenizer import (
        BYTE_OFFSET,
        DEFAULT_CHAT_TEMPLATE,
        IMAGE_PLACEHOLDER,
        IMAGE_PLACEHOLDER_TOKENS,
        SPECIAL_TOKENS,
        MockTokenizer,
        RequestError,
        anthropic_to_chat,
    )
    from ._trtllm import TrtllmLlm, TrtllmMock, TrtllmOptions
    from ._wire import (
        REPLAY_END_SEQ,
        VllmAllBlocksCleared,
        VllmBlockRemoved,
        VllmBlockStored,
        VllmEvent,
        VllmEventBatch,
        decode_batch,
        encode_batch,
        pack_seq,
        unpack_seq,
    )
    from .mock_worker import GENERATION_PATHS, MockWorker, RequestRecord, WorkerStats

_WHERE: Final = {
    "Allocation": "_prefix_cache",
    "PrefixCache": "_prefix_cache",
    "KVEventPublisher": "_publisher",
    **dict.fromkeys(
        ("LoseEvents", "Sent", "StateFleet", "Truth", "agreement", "drop_removals"),
        "_state_faults",
    ),
    **dict.fromkeys(("TrtllmLlm", "TrtllmMock", "TrtllmOptions"), "_trtllm"),
    **dict.fromkeys(
        (
            "BYTE_OFFSET",
            "DEFAULT_CHAT_TEMPLATE",
            "IMAGE_PLACEHOLDER",
            "IMAGE_PLACEHOLDER_TOKENS",
            "SPECIAL_TOKENS",
            "MockTokenizer",
            "RequestError",
            "anthropic_to_chat",
        ),
        "_tokenizer",
    ),
    **dict.fromkeys(
        (
            "REPLAY_END_SEQ",
            "VllmAllBlocksCleared",
            "VllmBlockRemoved",
            "VllmBlockStored",
            "VllmEvent",
            "VllmEventBatch",
            "decode_batch",
            "encode_batch",
            "pack_seq",
            "unpack_seq",
        ),
        "_wire",
    ),
    **dict.fromkeys(
        ("GENERATION_PATHS", "MockWorker", "RequestRecord", "WorkerStats"), "mock_worker"
    ),
}

__all__ = [
    "BYTE_OFFSET",
    "DEFAULT_CHAT_TEMPLATE",
    "GENERATION_PATHS",
    "IMAGE_PLACEHOLDER",
    "IMAGE_PLACEHOLDER_TOKENS",
    "REPLAY_END_SEQ",
    "SPECIAL_TOKENS",
    "Allocation",
    "KVEventPublisher",
    "LoseEvents",
    "MockTokenizer",
    "MockWorker",
    "PrefixCache",
    "RequestError",
    "RequestRecord",
    "Sent",
    "StateFleet",
    "TrtllmLlm",
    "TrtllmMock",
    "TrtllmOptions",
    "Truth",
    "VllmAllBlocksCleared",
    "VllmBlockRemoved",
    "VllmBlockStored",
    "VllmEvent",
    "VllmEventBatch",
    "WorkerStats",
    "agreement",
    "anthropic_to_chat",
    "decode_batch",
    "drop_removals",
    "encode_batch",
    "pack_seq",
    "unpack_seq",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())

"""Test doubles for end-to-end tests: a mock vLLM 0.33 worker on real sockets.

- :class:`MockWorker`: vLLM's HTTP API (OpenAI, Anthropic Messages, tokenize
  and render endpoints) on loopback, a prefix cache with vLLM's block hashes
  and LRU eviction, and vLLM 0.33 KV events over ZMQ (PUB + replay ROUTER).
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

Needs the test dependencies ``aiohttp``, ``pyzmq``, ``msgspec`` and
``jinja2`` (``tokenizers`` only for a Hugging Face ``tokenizer.json``).
"""

from __future__ import annotations

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

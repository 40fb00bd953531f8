"""KV-cache events from real engines: decoding, applying, subscribing.

- :mod:`kvroute.events.types` — engine-neutral events (:class:`BlockStored`, ...);
- :mod:`kvroute.events.decode` — vLLM / SGLang msgpack and Dynamo JSON decoders,
  registered by name (:func:`register_decoder` adds an engine's format);
- :mod:`kvroute.events.apply` — :class:`EventApplier`, events into a Router's index;
- :mod:`kvroute.events.zmq` — :class:`ZmqSubscriber`, the ZMQ transport with
  gap replay and restart detection (needs ``pyzmq``);
- :mod:`kvroute.events.trtllm` — TensorRT-LLM's events in both shapes (the
  ``"trtllm"`` decoder); :mod:`~kvroute.events.trtllm_apply` —
  :class:`TrtllmApplier`, their semantics; :mod:`~kvroute.events.trtllm_http` —
  :class:`HttpEventPoller` for ``trtllm-serve``'s ``/kv_cache_events``;
  :mod:`~kvroute.events.trtllm_llmapi` — :class:`LlmApiFeed` for the LLM API;
- :mod:`kvroute.events.engine_hashes` — vLLM's and SGLang's engine-exact block
  hashes (needs ``cbor2``);
- :mod:`kvroute.events.metrics` — :class:`~kvroute.events.metrics.Metrics`, the
  Prometheus series of the subscriber and the proxy (needs ``prometheus_client``).

Decoding needs ``msgspec``, the subscriber ``pyzmq`` (the ``serve`` extra
holds them all); they are imported on first use, so ``kvroute.events.types``
and the applier cost nothing extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .apply import EventApplier
from .types import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, KVEvent, Tier

if TYPE_CHECKING:
    from .decode import (
        DecodeError,
        available_formats,
        decode,
        decode_dynamo_json,
        decode_sglang,
        decode_vllm,
        get_decoder,
        register_decoder,
    )
    from .trtllm import decode_trtllm
    from .trtllm_apply import TrtllmApplier
    from .trtllm_http import HttpEventPoller
    from .trtllm_llmapi import LlmApiFeed
    from .zmq import ZmqSubscriber

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "DecodeError",
    "EventApplier",
    "EventBatch",
    "HttpEventPoller",
    "KVEvent",
    "LlmApiFeed",
    "Tier",
    "TrtllmApplier",
    "ZmqSubscriber",
    "available_formats",
    "decode",
    "decode_dynamo_json",
    "decode_sglang",
    "decode_trtllm",
    "decode_vllm",
    "get_decoder",
    "register_decoder",
]

_LAZY = {
    "DecodeError": "decode",
    "decode": "decode",
    "decode_dynamo_json": "decode",
    "decode_sglang": "decode",
    "decode_vllm": "decode",
    "available_formats": "decode",
    "get_decoder": "decode",
    "register_decoder": "decode",
    "ZmqSubscriber": "zmq",
    "decode_trtllm": "trtllm",
    "TrtllmApplier": "trtllm_apply",
    "HttpEventPoller": "trtllm_http",
    "LlmApiFeed": "trtllm_llmapi",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

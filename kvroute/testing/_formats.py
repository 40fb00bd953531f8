"""Response bodies and SSE framing of the OpenAI, Anthropic and vLLM APIs the mock serves.

Shapes follow what vLLM 0.33 sends (OpenAI-compatible ``/v1/completions`` and
``/v1/chat/completions``, the Anthropic-compatible ``/v1/messages``, and the
disaggregation ``GenerateRequest`` of the render endpoints). Only the fields
a client or router reads are filled; the rest keep vLLM's defaults.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from array import array
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

__all__ = [
    "anthropic_error",
    "anthropic_sse",
    "anthropic_usage",
    "completion_pieces",
    "generate_request",
    "openai_error",
    "openai_sse",
    "openai_usage",
    "split_pieces",
    "tool_input",
]

# The mock's "vocabulary" of generated words; a piece is one word (one token).
_WORDS: Final = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliett", "kilo", "lima", "mike", "november", "oscar", "papa",
)  # fmt: skip

_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def completion_pieces(prompt: Sequence[int], n: int) -> list[str]:
    """The ``n`` generated pieces (one per output token) for a prompt.

    Deterministic: a function of the prompt's token ids only.

    >>> completion_pieces([1, 2, 3], 3) == completion_pieces([1, 2, 3], 3)
    True
    >>> len(completion_pieces([1, 2, 3], 5))
    5
    """
    digest = hashlib.sha256(array("Q", prompt).tobytes()).digest()
    out: list[str] = []
    for i in range(n):
        word = _WORDS[(digest[i % len(digest)] + i // len(digest)) % len(_WORDS)]
        out.append(word if i == 0 else " " + word)
    return out


def openai_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """``usage`` as vLLM reports it with prompt-token details enabled."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def anthropic_usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """Anthropic ``usage`` with the prefix-cache hit: ``input_tokens`` excludes cache reads.

    Not every vLLM reports this. Its Anthropic converter long reported only
    ``input_tokens`` (the whole prompt) and ``output_tokens``; newer ones add
    the cache figures when the server runs with
    ``--enable-prompt-tokens-details``, in streams only in the final
    ``message_delta``. The mock always reports its reads, everywhere, so that
    tests can compare the worker's real hits with what a client is told, and
    no ``cache_creation_input_tokens`` (the proxy fills it in:
    ``input_tokens + cache_read_input_tokens`` is the prompt length).
    """
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cached_tokens,
    }


def tool_input(schema: Mapping[str, Any], prompt: Sequence[int]) -> dict[str, Any]:
    """A tool's input for a prompt: a value of its type for each of the schema's properties.

    Deterministic, like :func:`completion_pieces` (whose words it uses).

    >>> schema = {"properties": {"q": {"type": "string"}, "n": {"type": "integer"}}}
    >>> sorted(tool_input(schema, [1, 2, 3]))
    ['n', 'q']
    >>> tool_input({"type": "object"}, [1, 2, 3])
    {}
    """
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        return {}
    words = [w.strip() for w in completion_pieces(prompt, len(properties))]
    out: dict[str, Any] = {}
    for (name, spec), word in zip(properties.items(), words, strict=True):
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "integer":
            out[name] = len(word)
        elif kind == "number":
            out[name] = len(word) / 2
        elif kind == "boolean":
            out[name] = len(word) % 2 == 0
        elif kind == "array":
            out[name] = [word]
        elif kind == "object":
            out[name] = {}
        else:
            out[name] = word
    return out


def split_pieces(text: str, n: int) -> list[str]:
    """``text`` cut into ``min(n, len(text))`` consecutive pieces (at least one).

    >>> split_pieces('{"q": "x"}', 3)
    ['{"q', '": ', '"x"}']
    """
    n = max(1, min(n, len(text)))
    bounds = [len(text) * i // n for i in range(n + 1)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def openai_sse(data: Mapping[str, Any] | str) -> bytes:
    """One ``data: ...`` server-sent event (``"[DONE]"`` is sent verbatim)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def anthropic_sse(data: Mapping[str, Any]) -> bytes:
    """One Anthropic server-sent event: ``event: <type>`` then its JSON ``data``."""
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _status_name(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "Error"
    name = "".join(w.capitalize() for w in phrase.replace("-", " ").split())
    return name if name.endswith("Error") else name + "Error"


def openai_error(
    message: str, status: int, param: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """vLLM's ``ErrorResponse`` body (its ``code`` is the HTTP status, a number).

    >>> openai_error("boom", 500)["error"]["type"]
    'InternalServerError'
    >>> openai_error("bad", 400, "max_tokens")["error"]
    {'message': 'bad', 'type': 'BadRequestError', 'param': 'max_tokens', 'code': 400}
    """
    return {
        "error": {
            "message": message,
            "type": kind or _status_name(status),
            "param": param,
            "code": status,
        }
    }


def anthropic_error(message: str, status: int) -> dict[str, Any]:
    """An Anthropic error body.

    >>> anthropic_error("bad", 400)
    {'type': 'error', 'error': {'type': 'invalid_request_error', 'message': 'bad'}}
    """
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def generate_request(
    *,
    request_id: str,
    token_ids: list[int],
    body: Mapping[str, Any],
    max_tokens: int,
) -> dict[str, Any]:
    """A render endpoint's ``GenerateRequest`` (vLLM's disaggregation protocol).

    Fields: ``request_id``, ``token_ids``, ``features`` (``None``: no
    multimodal features), ``sampling_params``, ``model``, ``stream``,
    ``stream_options`` (only when streaming), ``cache_salt``, ``priority``
    and ``kv_transfer_params``.
    """
    stream = bool(body.get("stream"))
    stop = body.get("stop")
    stop_list = [stop] if isinstance(stop, str) else list(stop or [])
    return {
        "request_id": request_id,
        "token_ids": token_ids,
        "features": None,
        "sampling_params": {
            "n": 1,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "top_k": body.get("top_k", 0),
            "seed": body.get("seed"),
            "stop": stop_list,
            "stop_token_ids": list(body.get("stop_token_ids") or []),
            "max_tokens": max_tokens,
        },
        "model": body.get("model"),
        "stream": stream,
        "stream_options": body.get("stream_options") if stream else None,
        "cache_salt": body.get("cache_salt"),
        "priority": body.get("priority", 0),
        "kv_transfer_params": None,
    }

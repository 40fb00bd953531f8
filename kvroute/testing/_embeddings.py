"""The mock worker's ``POST /v1/embeddings``, as vLLM serves an embedding model.

``input`` is a string, a list of strings, a list of token ids or a list of
such lists; each becomes one embedding of :data:`DIMENSIONS` floats, a
deterministic unit vector of its token ids. ``encoding_format`` ``float``
(vLLM's default) answers lists of floats, ``base64`` the little-endian
float32 bytes in base64 (what the ``openai`` SDK asks for and decodes).
``dimensions`` is refused, as vLLM refuses it for a model without Matryoshka
support. Embedding requests do not touch the prefix cache (vLLM runs pooling
models without prefix caching), so they publish no KV events.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import time
import uuid
from array import array
from typing import Any, Final

from aiohttp import web

from ._engine import Engine
from ._tokenizer import RequestError

__all__ = ["DIMENSIONS", "EmbeddingsApi", "embedding"]

#: Floats per embedding.
DIMENSIONS: Final = 16


def embedding(tokens: list[int]) -> list[float]:
    """A deterministic unit vector for ``tokens``.

    >>> v = embedding([1, 2, 3])
    >>> len(v), round(sum(x * x for x in v), 6), v == embedding([1, 2, 3])
    (16, 1.0, True)
    """
    digest = hashlib.sha256(array("Q", tokens).tobytes()).digest()
    raw = [b - 127.5 for b in digest[:DIMENSIONS]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


class EmbeddingsApi:
    """``/v1/embeddings`` of one mock worker."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _inputs(self, value: object) -> list[list[int]]:
        tok = self.engine.tokenizer
        if isinstance(value, str):
            return [tok.encode(value)]
        if isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value):
                return [tok.encode(v) for v in value]
            if all(type(v) is int for v in value):
                return [list(value)]
            if all(isinstance(v, list) and all(type(t) is int for t in v) for v in value):
                return [list(v) for v in value]
        raise RequestError(
            "input: must be a string, a list of strings or a (list of) token id list(s)",
            400, "input",
        )  # fmt: skip

    async def create(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/embeddings``."""
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"invalid JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        model = body.get("model", self.engine.model)
        if not isinstance(model, str) or not self.engine.is_served(model):
            raise RequestError(f"The model `{model}` does not exist.", 404, "model")
        if body.get("dimensions") is not None:
            raise RequestError(f"Model \"{model}\" does not support matryoshka representation, "
                               "changing output dimensions will lead to poor results.",
                               400, "dimensions")  # fmt: skip
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise RequestError(f"encoding_format: must be 'float' or 'base64', got {fmt!r}",
                               400, "encoding_format")  # fmt: skip
        inputs = self._inputs(body.get("input"))
        limit = self.engine.max_model_len
        for tokens in inputs:
            if len(tokens) > limit:
                raise RequestError(
                    f"This model's maximum context length is {limit} tokens. However, you"
                    f" requested {len(tokens)} tokens in the input for embedding generation."
                    " Please reduce the length of the input.", 400, "input",
                )  # fmt: skip
        data = []
        for i, tokens in enumerate(inputs):
            vector = embedding(tokens)
            encoded: Any = vector
            if fmt == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"index": i, "object": "embedding", "embedding": encoded})
        prompt_tokens = sum(len(t) for t in inputs)
        return web.json_response({
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                      "completion_tokens": 0, "prompt_tokens_details": None},
        })  # fmt: skip

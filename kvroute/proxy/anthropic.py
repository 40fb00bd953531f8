"""Anthropic Messages requests (``/v1/messages``): checks, hints, chat form, usage, streams.

- :func:`validate_messages` refuses malformed bodies and unknown content
  block types before a worker sees them (Anthropic-shaped 400s).
- :func:`anthropic_hints`: the session is the configured header, else
  ``metadata.user_id``; every ``cache_control`` breakpoint (top level,
  ``system`` blocks, ``tools``, message content blocks and the blocks inside
  a ``tool_result``) is read and the longest TTL becomes the router's
  ``cache_control`` hint.
- :func:`to_chat` turns the request into OpenAI chat messages and tools the
  way vLLM does before applying the chat template, for local tokenization
  and for workers without ``/v1/messages/render``.
- :func:`fill_usage` and :class:`AnthropicStream` complete ``usage`` with the
  router's prediction when a worker reports no cache reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Final

from .errors import ProxyError
from .hints import Hints, Usage, header_hints, longest_cache_control
from .sse import SseSplitter, encode_event

__all__ = [
    "CONTENT_BLOCK_TYPES",
    "AnthropicStream",
    "anthropic_hints",
    "anthropic_usage",
    "fill_usage",
    "to_chat",
    "validate_messages",
]

log = logging.getLogger("kvroute.proxy")

#: Content block types accepted in messages; anything else is a 400.
CONTENT_BLOCK_TYPES: Final = frozenset(
    {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"}
)
_ROLES: Final = frozenset({"user", "assistant", "system"})
# Claude Code puts a per-request attribution line in its system prompt; vLLM
# drops it because it would defeat prefix caching, and so must the local render.
_BILLING_PREFIX: Final = "x-anthropic-billing-header"


def _bad(message: str) -> ProxyError:
    return ProxyError(400, message)


def _check_blocks(blocks: object, where: str, *, nested: bool = False) -> None:
    if isinstance(blocks, str):
        return
    if not isinstance(blocks, list):
        raise _bad(f"{where}: must be a string or a list of content blocks")
    for j, block in enumerate(blocks):
        bw = f"{where}[{j}]"
        if not isinstance(block, dict):
            raise _bad(f"{bw}: must be an object")
        kind = block.get("type")
        if kind not in CONTENT_BLOCK_TYPES:
            raise _bad(f"{bw}.type: unknown content block type {kind!r}")
        if kind == "text" and not isinstance(block.get("text"), str):
            raise _bad(f"{bw}.text: must be a string")
        if kind == "tool_use" and not isinstance(block.get("name"), str):
            raise _bad(f"{bw}.name: must be a string")
        if kind == "image" and not isinstance(block.get("source"), dict):
            raise _bad(f"{bw}.source: must be an object")
        if kind == "tool_result":
            if nested:
                raise _bad(f"{bw}: a tool_result cannot contain a tool_result")
            content = block.get("content")
            if content is not None:
                _check_blocks(content, f"{bw}.content", nested=True)


def validate_messages(body: Mapping[str, Any], *, count_tokens: bool = False) -> None:
    """Check a ``/v1/messages`` (or ``count_tokens``) body's structure.

    >>> validate_messages({"model": "m", "max_tokens": 8,
    ...                    "messages": [{"role": "user", "content": [{"type": "video"}]}]})
    Traceback (most recent call last):
    ...
    kvroute.proxy.errors.ProxyError: messages[0].content[0].type: unknown content block type 'video'

    :raises ProxyError: 400 naming the first bad field.
    """
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _bad("model: Field required (a string)")
    if not count_tokens:
        mt = body.get("max_tokens")
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise _bad("max_tokens: Field required (an integer >= 1)")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise _bad("stream: must be a boolean")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: Field required (a non-empty list)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]: must be an object")
        if m.get("role") not in _ROLES:
            raise _bad(f"messages[{i}].role: must be 'user' or 'assistant'")
        if "content" not in m:
            raise _bad(f"messages[{i}].content: Field required")
        _check_blocks(m["content"], f"messages[{i}].content")
    system = body.get("system")
    if system is not None:
        _check_blocks(system, "system")
        if isinstance(system, list) and any(b.get("type") != "text" for b in system):
            raise _bad("system: only text blocks are allowed")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools: must be a list")
        for k, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise _bad(f"tools[{k}].name: Field required (a string)")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata: must be an object")
        uid = metadata.get("user_id")
        if uid is not None and not isinstance(uid, str):
            raise _bad("metadata.user_id: must be a string")


def _breakpoints(body: Mapping[str, Any]) -> Iterator[object]:
    """Every ``cache_control`` value in the request, in prompt order."""
    if "cache_control" in body:
        yield body["cache_control"]
    for t in body.get("tools") or ():
        if isinstance(t, dict) and "cache_control" in t:
            yield t["cache_control"]
    system = body.get("system")
    if isinstance(system, list):
        for b in system:
            if isinstance(b, dict) and "cache_control" in b:
                yield b["cache_control"]
    for m in body.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for b in content:
            if not isinstance(b, dict):
                continue
            if "cache_control" in b:
                yield b["cache_control"]
            inner = b.get("content") if b.get("type") == "tool_result" else None
            if isinstance(inner, list):
                for ib in inner:
                    if isinstance(ib, dict) and "cache_control" in ib:
                        yield ib["cache_control"]


def anthropic_hints(
    body: Mapping[str, Any], headers: Mapping[str, str], session_header: str
) -> Hints:
    """The hints of a (validated) Messages request; headers take precedence.

    >>> h = anthropic_hints({"metadata": {"user_id": "u1"},
    ...     "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
    ...     "messages": [{"role": "user", "content": [{"type": "text", "text": "x",
    ...         "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}, {}, "X-Session-Id")
    >>> h.session_id, h.cache_control
    ('u1', CacheControl(ttl=3600.0))

    :raises ProxyError: 400 for a malformed ``cache_control`` or header.
    """
    metadata = body.get("metadata")
    uid = metadata.get("user_id") if isinstance(metadata, dict) else None
    from_body = Hints(
        session_id=uid or None,
        cache_control=longest_cache_control(_breakpoints(body), where="cache_control"),
    )
    return from_body.merged(header_hints(headers, session_header))


# -- the chat form -----------------------------------------------------------------------


def _image_url(source: Mapping[str, Any]) -> str:
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _text_blocks(blocks: object) -> list[str]:
    if isinstance(blocks, str):
        return [blocks]
    if not isinstance(blocks, list):
        return []
    return [
        b["text"]
        for b in blocks
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    ]


def _system_text(body: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for source in (body.get("system"), *(
        m.get("content") for m in body.get("messages") or () if m.get("role") == "system"
    )):  # fmt: skip
        for text in _text_blocks(source):
            if text and not text.startswith(_BILLING_PREFIX):
                parts.append(text)
    return "".join(parts)


def _tool_result(block: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
    content = block.get("content")
    images: list[str] = []
    if isinstance(content, list):
        images = [
            _image_url(b.get("source") or {})
            for b in content
            if isinstance(b, dict) and b.get("type") == "image"
        ]
        text = "\n".join(_text_blocks(content))
    else:
        text = content if isinstance(content, str) else ""
    out.append({"role": "tool", "tool_call_id": block.get("tool_use_id") or "", "content": text})
    if images:
        out.append(
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": u}} for u in images],
            }
        )


def _document_part(block: Mapping[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "text":
        return {"type": "text", "text": str(source.get("data", ""))}
    # Binary documents reach the model as media; a placeholder part stands in.
    return {"type": "image_url", "image_url": {"url": _image_url(source or {})}}


def to_chat(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """OpenAI chat ``(messages, tools)`` for a validated Messages request, as vLLM builds them.

    System text (top level and system-role messages) becomes one system
    message; ``tool_use`` blocks become ``tool_calls``; each user
    ``tool_result`` becomes a ``tool`` message placed before the rest of its
    turn; images (and binary documents) become ``image_url`` parts, which
    chat templates render as placeholders; thinking becomes ``reasoning``.

    >>> to_chat({"system": "be brief", "messages": [{"role": "user", "content": "hi"}]})
    ([{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi'}], None)
    """
    out: list[dict[str, Any]] = []
    system = _system_text(body)
    if system:
        out.append({"role": "system", "content": system})
    for m in body.get("messages") or ():
        role = m.get("role")
        if role == "system":
            continue
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        msg: dict[str, Any] = {"role": role}
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        reasoning: list[str] = []
        for b in content or ():
            kind = b.get("type")
            if kind == "text" and b.get("text"):
                parts.append({"type": "text", "text": b["text"]})
            elif kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": _image_url(b["source"])}})
            elif kind == "document":
                parts.append(_document_part(b))
            elif kind == "thinking" and isinstance(b.get("thinking"), str):
                reasoning.append(b["thinking"])
            elif kind == "tool_use":
                calls.append({
                    "id": b.get("id") or "",
                    "type": "function",
                    "function": {"name": b.get("name") or "",
                                 "arguments": json.dumps(b.get("input") or {})},
                })  # fmt: skip
            elif kind == "tool_result":
                if role == "user":
                    _tool_result(b, out)
                else:
                    text = "\n".join(_text_blocks(b.get("content")))
                    parts.append({"type": "text", "text": f"Tool result: {text}"})
        if reasoning:
            msg["reasoning"] = "".join(reasoning)
        if calls:
            msg["tool_calls"] = calls
        if parts:
            single = len(parts) == 1 and parts[0]["type"] == "text"
            msg["content"] = parts[0]["text"] if single else parts
        if role == "user" and "content" not in msg:
            continue
        out.append(msg)
    tools = None
    if body.get("tools"):
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t.get("description"),
                    "parameters": t.get("input_schema"),
                },
            }
            for t in body["tools"]
        ]
    return out, tools


# -- usage --------------------------------------------------------------------------------


def _count(usage: Mapping[str, Any], key: str) -> int | None:
    v = usage.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def anthropic_usage(usage: object) -> Usage | None:
    """A :class:`Usage` from an Anthropic ``usage`` object (None if it is not one).

    ``input_tokens`` excludes cache reads and writes, so the prompt is their sum.

    >>> anthropic_usage({"input_tokens": 8, "output_tokens": 4,
    ...                  "cache_read_input_tokens": 32, "cache_creation_input_tokens": 0})
    Usage(prompt_tokens=40, cached_tokens=32, output_tokens=4)
    """
    if not isinstance(usage, dict):
        return None
    inp = _count(usage, "input_tokens")
    if inp is None:
        return None
    read = _count(usage, "cache_read_input_tokens")
    created = _count(usage, "cache_creation_input_tokens") or 0
    return Usage(inp + (read or 0) + created, read, _count(usage, "output_tokens") or 0)


def fill_usage(usage: dict[str, Any], predicted_cached_tokens: int) -> bool:
    """Complete a ``usage`` that reports no cache reads with the router's prediction.

    The worker's ``input_tokens`` is then the whole prompt; the predicted
    reads move out of it into ``cache_read_input_tokens`` (Anthropic counts
    them apart), and ``cache_creation_input_tokens`` becomes 0 if absent.

    >>> u = {"input_tokens": 40, "output_tokens": 2}
    >>> fill_usage(u, 32)
    True
    >>> u["input_tokens"], u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
    (8, 32, 0)
    >>> fill_usage(u, 16)   # already reported: left alone
    False

    :returns: whether ``usage`` was changed.
    """
    if _count(usage, "cache_read_input_tokens") is not None:
        return False
    inp = _count(usage, "input_tokens") or 0
    read = min(max(predicted_cached_tokens, 0), inp)
    usage["input_tokens"] = inp - read
    usage["cache_read_input_tokens"] = read
    if _count(usage, "cache_creation_input_tokens") is None:
        usage["cache_creation_input_tokens"] = 0
    return True


class AnthropicStream:
    """Watch an Anthropic SSE stream going through; fill cache reads in if missing.

    Events pass byte for byte, except ``message_start`` (and the
    ``message_delta`` after it) when the worker's usage lacks
    ``cache_read_input_tokens``: those are re-encoded with the router's
    prediction filled in (see :func:`fill_usage`), and :attr:`predicted` is set.

    :param predicted_cached_tokens: the router's prediction for the request.
    """

    def __init__(self, predicted_cached_tokens: int) -> None:
        self._split = SseSplitter()
        self._predicted_tokens = predicted_cached_tokens
        #: The first ``content_block_delta`` has gone by.
        self.first_token = False
        #: The cache figures passed on are the router's prediction.
        self.predicted = False
        #: The usage reported so far (message_start, updated by message_delta).
        self.usage: Usage | None = None
        #: An ``error`` event's message, if one came.
        self.error: str | None = None
        #: ``message_stop`` arrived.
        self.done = False

    def _patch(self, usage: object) -> bool:
        if isinstance(usage, dict) and "input_tokens" in usage:
            return fill_usage(usage, self._predicted_tokens)
        return False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk``'s complete events to pass on."""
        out: list[bytes] = []
        for ev in self._split.feed(chunk):
            kind = ev.event
            if kind == "content_block_delta":
                self.first_token = True
            elif kind == "message_stop":
                self.done = True
            elif kind in ("message_start", "message_delta", "error"):
                obj = ev.json()
                if not isinstance(obj, dict):
                    out.append(ev.raw)
                    continue
                if kind == "error":
                    err = obj.get("error")
                    self.error = str(err.get("message") if isinstance(err, dict) else err)
                else:
                    holder = obj.get("message") if kind == "message_start" else obj
                    usage = holder.get("usage") if isinstance(holder, dict) else None
                    patched = (kind == "message_start" or self.predicted) and self._patch(usage)
                    if patched:
                        self.predicted = True
                    self._update_usage(usage)
                    if patched:
                        out.append(encode_event(obj, kind))
                        continue
            out.append(ev.raw)
        return b"".join(out)

    def _update_usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        new = anthropic_usage(usage)
        if new is not None:
            self.usage = new
        elif self.usage is not None and _count(usage, "output_tokens") is not None:
            # Anthropic's own message_delta carries only output_tokens.
            u = self.usage
            self.usage = Usage(u.prompt_tokens, u.cached_tokens, usage["output_tokens"])

    def flush(self) -> bytes:
        """An unterminated last event, passed on as it is."""
        return self._split.flush()

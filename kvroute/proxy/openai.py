"""OpenAI-compatible requests: their hints, their usage, and watching their streams.

Body hints (besides the headers of :mod:`kvroute.proxy.hints`):
``session_id`` (a string), ``priority`` (vLLM's own field, an int),
``cache_salt`` (vLLM's), and ``cache_control`` (``{"type": "ephemeral",
"ttl": "5m" | "1h"}``) at the top level, on a message or on a content part:
each a cache breakpoint (:class:`~kvroute.proxy.hints.Breakpoint`).
Headers take precedence over the body.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from .errors import ProxyError
from .hints import Hints, Usage, header_hints, parse_breakpoints
from .sse import SseSplitter, encode_event

__all__ = ["MAX_TOKENS_FIELDS", "OpenAIStream", "check_max_tokens", "openai_hints", "openai_usage"]

#: The output-length fields of the OpenAI endpoints (completions and chat,
#: chat's newer name, the Responses API's).
MAX_TOKENS_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")

log = logging.getLogger("kvroute.proxy")


def _cache_controls(body: Mapping[str, Any]) -> Iterator[tuple[object, dict[str, Any] | None]]:
    """Every ``cache_control`` value with its prefix body (see :class:`~.hints.Breakpoint`)."""
    if "cache_control" in body:
        yield body["cache_control"], None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            continue
        last = i == len(messages) - 1
        if "cache_control" in m:
            yield m["cache_control"], None if last else {**body, "messages": messages[: i + 1]}
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and "cache_control" in part:
                    if last and j == len(content) - 1:
                        yield part["cache_control"], None
                    else:
                        cut = {**m, "content": content[: j + 1]}
                        yield part["cache_control"], {**body, "messages": [*messages[:i], cut]}


def _wrong_type(field: str, what: str) -> ProxyError:
    return ProxyError(400, f"{field} must be {what}", code="invalid_type", param=field)


def openai_hints(body: Mapping[str, Any], headers: Mapping[str, str], session_header: str) -> Hints:
    """The hints of an OpenAI-style request (headers first, then body fields).

    >>> part = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    >>> body = {"session_id": "a", "priority": 3,
    ...         "messages": [{"role": "user", "content": [part]}]}
    >>> h = openai_hints(body, {}, "X-Session-Id")
    >>> h.session_id, h.priority, h.cache_control
    ('a', 3, (Breakpoint(ttl=300.0, prefix=None),))

    :raises ProxyError: 400 for a malformed hint.
    """
    session = body.get("session_id")
    if session is not None and not isinstance(session, str):
        raise _wrong_type("session_id", "a string")
    priority = body.get("priority", 0)
    if priority is None:
        priority = 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise _wrong_type("priority", "an integer")
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise _wrong_type("cache_salt", "a string")
    from_body = Hints(
        session_id=session or None,
        priority=priority,
        cache_control=parse_breakpoints(_cache_controls(body), "cache_control"),
        cache_salt=salt or None,
    )
    return from_body.merged(header_hints(headers, session_header))


def check_max_tokens(body: Mapping[str, Any]) -> None:
    """Refuse an output length the engines refuse, as they answer it.

    vLLM's sampling parameters need ``max_tokens >= 1`` (``max_tokens must be
    at least 1, got 0.``, a 400 naming the field); the proxy answers so
    before routing, naming the field the client gave (null is the default).

    >>> check_max_tokens({"max_tokens": 16, "max_output_tokens": None})
    >>> check_max_tokens({"max_completion_tokens": 0})
    Traceback (most recent call last):
    ...
    kvroute.proxy.errors.ProxyError: max_completion_tokens must be at least 1, got 0.

    :raises ProxyError: 400 with ``param`` the field: not an integer, or below 1.
    """
    for field in MAX_TOKENS_FIELDS:
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProxyError(
                400, f"{field} must be an integer, got {value!r}", code="invalid_type", param=field
            )
        if value < 1:
            raise ProxyError(
                400, f"{field} must be at least 1, got {value}.", code="invalid_value", param=field
            )


def openai_usage(usage: object) -> Usage | None:
    """A :class:`Usage` from an OpenAI ``usage`` object (None if it is not one).

    >>> openai_usage({"prompt_tokens": 40, "completion_tokens": 5,
    ...               "prompt_tokens_details": {"cached_tokens": 32}})
    Usage(prompt_tokens=40, cached_tokens=32, output_tokens=5)
    """
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    if not isinstance(prompt, int):
        return None
    output = usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(
        prompt,
        cached if isinstance(cached, int) else None,
        output if isinstance(output, int) else 0,
    )


def _has_content(choice: object) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):  # completions
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return bool(
        delta.get("content")
        or delta.get("tool_calls")
        or delta.get("reasoning_content")
        or delta.get("reasoning")
    )


class OpenAIStream:
    """Watch an OpenAI SSE stream going through: first content, usage, errors.

    Events are passed on byte for byte, except the usage-only chunk when the
    proxy asked for it (``strip_usage``: the client did not set
    ``stream_options.include_usage``, the proxy did, to learn the counts).

    >>> s = OpenAIStream(strip_usage=True)
    >>> s.feed(b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\\n\\n')[:6]
    b'data: '
    >>> s.first_token
    False
    >>> _ = s.feed(b'data: {"choices": [{"delta": {"content": "hi"}}]}\\n\\n')
    >>> s.first_token
    True
    >>> usage = b'{"prompt_tokens": 3, "completion_tokens": 1}'
    >>> s.feed(b'data: {"choices": [], "usage": ' + usage + b'}\\n\\n')
    b''
    >>> s.usage
    Usage(prompt_tokens=3, cached_tokens=None, output_tokens=1)

    :param strip_usage: drop the usage-only chunk (the proxy asked for it).
    :param on_event: called with each event's JSON, e.g. to rebuild the reply
        for a warm-up.
    :param transform: called with each event's JSON (after ``on_event``):
        the event to pass on instead (re-encoded when it is another object),
        or None to drop it; see :mod:`~kvroute.proxy.migration`.
    """

    def __init__(
        self,
        *,
        strip_usage: bool = False,
        on_event: Callable[[object], None] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
    ) -> None:
        self._split = SseSplitter()
        self._strip_usage = strip_usage
        self._on_event = on_event
        self._transform = transform
        #: A chunk with generated content has gone by.
        self.first_token = False
        #: Chunks with generated content (a fallback count of output tokens).
        self.content_chunks = 0
        #: The usage the worker reported, if any.
        self.usage: Usage | None = None
        #: An error the worker reported in the stream, if any.
        self.error: str | None = None
        #: ``data: [DONE]`` arrived.
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk``'s complete events to pass on."""
        out: list[bytes] = []
        for ev in self._split.feed(chunk):
            data = ev.data
            if data == "[DONE]":
                self.done = True
                out.append(ev.raw)
                continue
            obj = ev.json() if data.startswith("{") else None
            if not isinstance(obj, dict):
                out.append(ev.raw)
                continue
            if "error" in obj:
                err = obj["error"]
                self.error = str(err.get("message") if isinstance(err, dict) else err)
            if self._on_event is not None:
                self._on_event(obj)
            raw = ev.raw
            if self._transform is not None:
                changed = self._transform(obj)
                if changed is None:
                    continue
                if changed is not obj:
                    obj, raw = changed, encode_event(changed, ev.event)
            choices = obj.get("choices")
            if isinstance(choices, list) and any(_has_content(c) for c in choices):
                self.first_token = True
                self.content_chunks += 1
            usage = openai_usage(obj.get("usage"))
            if usage is not None:
                self.usage = usage
                if self._strip_usage and not choices:
                    continue
            out.append(raw)
        return b"".join(out)

    def flush(self) -> bytes:
        """An unterminated last event, passed on as it is."""
        return self._split.flush()

    @property
    def output_tokens(self) -> int:
        """Output tokens: the worker's count, else the number of content chunks."""
        return self.usage.output_tokens if self.usage is not None else self.content_chunks

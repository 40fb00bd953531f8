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
from .sse import SseEvent, SseSplitter, encode_event, parse_event

__all__ = ["MAX_TOKENS_FIELDS", "OpenAIStream", "check_max_tokens", "openai_hints", "openai_usage"]

#: The output-length fields of the OpenAI endpoints (completions and chat,
#: chat's newer name, the Responses API's).
MAX_TOKENS_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")

log = logging.getLogger("kvroute.proxy")

# Unparsed events OpenAIStream holds for its ``on_event`` before decoding them anyway.
_HOLD_BYTES: Final = 64 << 10


# What can make an event matter to OpenAIStream once the first content went by: a
# "usage" or "error" key (spelled with escapes, a key holds a \u), or the end.
_MARKERS: Final = (b'"usage"', b'"error"', b"\\u", b"[DONE]")
_ESCAPE: Final = _MARKERS.index(b"\\u")


def _next_marker(events: bytes, at: int, found: list[int]) -> int:
    """Where the first :data:`_MARKERS` marker at or after ``at`` is, else -1.

    ``found`` holds each marker's next position from an earlier call on the
    same ``events`` (-2: not searched yet, -1: none left); only those left
    behind are searched again, so a chunk is scanned O(1) times per marker.
    A two-byte search is slow in CPython: ``\\u`` is looked for only where a
    backslash is (found by ``memchr``).
    """
    mark = -1
    for i, m in enumerate(_MARKERS):
        if -1 != found[i] < at:
            if i == _ESCAPE:
                slash = events.find(b"\\", at)
                found[i] = -1 if slash < 0 else events.find(m, slash)
            else:
                found[i] = events.find(m, at)
        if found[i] >= 0 and (mark < 0 or found[i] < mark):
            mark = found[i]
    return mark


def _event_start(events: bytes, at: int, mark: int) -> int:
    """Where the event holding ``mark`` starts; ``at`` is where an event starts before it.

    Events lie between blank lines taken left to right. The last ``\\n\\n``
    before ``mark`` is such a boundary unless a line end comes right before
    it (a run of three or more): then the boundaries are found left to right.
    """
    p = events.rfind(b"\n\n", at, mark)
    if p > 0 and events[p - 1] == 0x0A:
        p, q = -1, events.find(b"\n\n", at)
        while q >= 0 and q + 2 <= mark:
            p, q = q, events.find(b"\n\n", q + 2)
    return at if p < 0 else p + 2


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

    Once the first content went by, an event can change nothing the watcher
    reports unless it names a ``usage`` or an ``error`` (or spells a key
    with a ``\\u`` escape, which could be either): the others are passed on
    unparsed (most of a stream, a whole chunk at once when it holds only
    such events). Their JSON is decoded only when someone asks for it: with
    ``defer``, ``on_event`` sees them (in order, with the parsed ones) by the
    time :meth:`settle` returns, or when 64 KiB of them are held;
    :attr:`content_chunks` settles too. Without ``defer`` (or with a
    ``transform``) every event is decoded as it passes.

    :param strip_usage: drop the usage-only chunk (the proxy asked for it).
    :param on_event: called with each event's JSON, e.g. to rebuild the reply
        for a warm-up.
    :param transform: called with each event's JSON (after ``on_event``):
        the event to pass on instead (re-encoded when it is another object),
        or None to drop it; see :mod:`~kvroute.proxy.migration`.
    :param defer: ``on_event`` may be called late (see above): the caller
        calls :meth:`settle` before it reads what ``on_event`` built.
    """

    def __init__(
        self,
        *,
        strip_usage: bool = False,
        on_event: Callable[[object], None] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
        defer: bool = False,
    ) -> None:
        self._split = SseSplitter()
        self._strip_usage = strip_usage
        self._on_event = on_event
        self._transform = transform
        # Events may go by unparsed: nothing needs each one's JSON at once.
        self._lazy = transform is None and (on_event is None or defer)
        # The events not yet settled, in order: whole chunks of complete events,
        # single events, or events already parsed (their content counted).
        self._held: list[bytes | dict[str, Any]] = []
        self._held_bytes = 0
        self._content_chunks = 0
        #: A chunk with generated content has gone by.
        self.first_token = False
        #: The usage the worker reported, if any.
        self.usage: Usage | None = None
        #: An error the worker reported in the stream, if any.
        self.error: str | None = None
        #: ``data: [DONE]`` arrived.
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk``'s complete events to pass on."""
        events = self._split.take(chunk)
        if not events:
            return b""
        if self._lazy and b"\r" not in events:
            return self._feed_lazy(events)
        out: list[bytes] = []
        for ev in SseSplitter().feed(events):
            data = ev.data
            if data == "[DONE]":
                self.done = True
                out.append(ev.raw)
                continue
            obj = ev.json() if data.startswith("{") else None
            if not isinstance(obj, dict):
                out.append(ev.raw)
                continue
            self._note_error(obj)
            if self._lazy:
                if self._on_event is not None:
                    self._hold(obj, 0)
            elif self._on_event is not None:
                self._on_event(obj)
            raw = ev.raw
            if self._transform is not None:
                changed = self._transform(obj)
                if changed is None:
                    continue
                if changed is not obj:
                    obj, raw = changed, encode_event(changed, ev.event)
            if self._note(obj):
                out.append(raw)
        return b"".join(out)

    def _feed_lazy(self, events: bytes) -> bytes:
        """:meth:`feed` for complete events with LF line ends, no ``transform``, ``on_event`` late.

        Past the first content, only the events holding a :data:`_MARKERS`
        marker are parsed: the watcher jumps from one to the next, and the
        runs of events between go to :meth:`_hold` as they are.
        """
        if self.first_token and not (
            b'"usage"' in events
            or b'"error"' in events
            or (b"\\" in events and b"\\u" in events)
            or b"[DONE]" in events
        ):  # _MARKERS, the cheap way for a chunk with none
            self._hold(events, len(events))
            return events
        dropped: list[tuple[int, int]] = []
        run = at = 0  # the run of unparsed events starts at run; the next event at at
        found = [-2] * len(_MARKERS)  # the next of each marker (-1: none left)
        # With LF line ends only, the events are what lies between blank lines
        # (split left to right, as SseSplitter scans).
        while at < len(events):
            if self.first_token:
                mark = _next_marker(events, at, found)
                if mark < 0:
                    break  # nothing further can matter
                at = _event_start(events, at, mark)
            start = at
            stop = events.find(b"\n\n", start)
            if stop < 0:
                break  # line ends past the last event
            at = stop + 2
            part = events[start:stop]
            if part.startswith(b"data: ") and b"\n" not in part:
                if part == b"data: [DONE]":
                    self.done = True
                    continue
                data = part[6:].decode("utf-8", errors="replace")
                obj = SseEvent(None, data, b"").json() if data.startswith("{") else None
            else:
                ev = parse_event(events[start:at])
                if ev.data == "[DONE]":
                    self.done = True
                    continue
                obj = ev.json() if ev.data.startswith("{") else None
            if not isinstance(obj, dict):
                continue
            self._note_error(obj)
            if run < start:
                self._hold(events[run:start], start - run)
            run = at
            if self._on_event is not None:
                self._hold(obj, 0)
            if not self._note(obj):
                dropped.append((start, at))
        if run < len(events):
            self._hold(events[run:] if run else events, len(events) - run)
        if not dropped:
            return events
        out, kept = [], 0
        for start, end in dropped:
            out.append(events[kept:start])
            kept = end
        out.append(events[kept:])
        return b"".join(out)

    def _note_error(self, obj: dict[str, Any]) -> None:
        if "error" in obj:
            err = obj["error"]
            self.error = str(err.get("message") if isinstance(err, dict) else err)

    def _note(self, obj: dict[str, Any]) -> bool:
        """Note an event's content and usage; whether it is passed on."""
        choices = obj.get("choices")
        self._count(choices)
        usage = openai_usage(obj.get("usage"))
        if usage is not None:
            self.usage = usage
            if self._strip_usage and not choices:
                return False
        return True

    def _count(self, choices: object) -> None:
        """Count an event's generated content, if it has any (the first is the first token)."""
        if isinstance(choices, list) and any(_has_content(c) for c in choices):
            self.first_token = True
            self._content_chunks += 1

    def _hold(self, item: bytes | dict[str, Any], size: int) -> None:
        self._held.append(item)
        self._held_bytes += size
        if self._held_bytes > _HOLD_BYTES:
            self.settle()

    def settle(self) -> None:
        """Decode the events passed on unparsed: count their content, call ``on_event``."""
        held, self._held, self._held_bytes = self._held, [], 0
        on_event = self._on_event
        for item in held:
            if isinstance(item, dict):  # parsed as it passed: its content is counted
                if on_event is not None:
                    on_event(item)
                continue
            for ev in SseSplitter().feed(item):
                obj = ev.json() if ev.data.startswith("{") else None
                if not isinstance(obj, dict):
                    continue
                if on_event is not None:
                    on_event(obj)
                self._count(obj.get("choices"))

    @property
    def content_chunks(self) -> int:
        """Chunks with generated content (a fallback count of output tokens)."""
        self.settle()
        return self._content_chunks

    def flush(self) -> bytes:
        """An unterminated last event, passed on as it is."""
        return self._split.flush()

    @property
    def output_tokens(self) -> int:
        """Output tokens: the worker's count, else the number of content chunks."""
        return self.usage.output_tokens if self.usage is not None else self.content_chunks

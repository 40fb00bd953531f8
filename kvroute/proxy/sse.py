"""Server-sent events, split incrementally from a byte stream without re-encoding them.

The proxy forwards a worker's stream event by event: each :class:`SseEvent`
keeps its exact bytes (``raw``, separator included), so passing it on is a
plain write, and only the fields the proxy watches are decoded.

>>> s = SseSplitter()
>>> [e.data for e in s.feed(b"data: {\\"a\\": 1}\\n\\ndata: [DO")]
['{"a": 1}']
>>> [(e.event, e.data) for e in s.feed(b"NE]\\n\\nevent: ping\\r\\ndata: {}\\r\\n\\r\\n")]
[(None, '[DONE]'), ('ping', '{}')]
>>> s.flush()
b''
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

_decode_json = msgspec.json.decode
_LINE_END = re.compile(r"\r\n|\r|\n")

__all__ = ["SseEvent", "SseSplitter", "encode_event", "parse_event"]


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event: its ``event:`` name (or None), its joined ``data:`` lines, its bytes."""

    event: str | None
    data: str
    raw: bytes

    def json(self) -> Any:
        """``data`` decoded as JSON, or None when it is not JSON (e.g. ``[DONE]``)."""
        try:
            return _decode_json(self.data)
        except msgspec.DecodeError:
            pass  # msgspec is strict (no NaN, 64-bit ints): json has the last word
        try:
            return json.loads(self.data)
        except ValueError:
            return None


def parse_event(raw: bytes) -> SseEvent:
    """One complete event (its blank line included), parsed."""
    # The engines' usual event, one ``data: `` line and a blank line, parsed
    # without splitting lines (the relay parses one per streamed token).
    if raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.find(b"\n", 6) == len(raw) - 2:
        line = raw[6:-2]
        if b"\r" not in line:
            return SseEvent(None, line.decode("utf-8", errors="replace"), raw)
    return _parse_lines(raw)


def _parse_lines(raw: bytes) -> SseEvent:
    name: str | None = None
    data: list[str] = []
    # SSE ends lines with CR, LF or CRLF only (str.splitlines would also split
    # on U+2028 and other breaks a JSON string may hold).
    for line in _LINE_END.split(raw.decode("utf-8", errors="replace")):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return SseEvent(name, "\n".join(data), raw)


def _event_ends(buf: bytes) -> Iterator[int]:
    """Where each complete event in ``buf`` ends (after its blank line), in order."""
    start = 0
    lf = crlf = -2  # the next separator of each kind at or after start; -1: none left
    while True:
        # Events end with a blank line; lines end with \n, \r\n (or, rarely, \r).
        # Each kind is searched for again only once passed: a chunk holding a
        # whole reply (many events, one line ending) is scanned once, not once per event.
        if -1 != lf < start:
            lf = buf.find(b"\n\n", start)
        if -1 != crlf < start:
            crlf = buf.find(b"\r\n\r\n", start)
        if lf < 0 and crlf < 0:
            return
        start = crlf + 4 if crlf >= 0 and (lf < 0 or crlf < lf) else lf + 2
        yield start


def _last_end(buf: bytes) -> int:
    """Where the last complete event in ``buf`` ends (0: none is complete)."""
    if b"\r" not in buf:
        # LF line ends only: the last blank line ends the last event, unless it
        # is part of a longer run of line ends (which the events split in pairs).
        last = buf.rfind(b"\n\n")
        if last < 0:
            return 0
        if last == 0 or buf[last - 1] != 0x0A:
            return last + 2
    end = 0
    for end in _event_ends(buf):  # noqa: B007 (the last one)
        pass
    return end


class SseSplitter:
    """Split a byte stream into complete events, keeping partial input for the next feed.

    Runtime complexity: O(bytes fed) amortised.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[SseEvent]:
        """The events completed by ``chunk``, in order."""
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        for end in _event_ends(buf):
            yield parse_event(buf[start:end])
            start = end
        self._buf = buf[start:]

    def take(self, chunk: bytes) -> bytes:
        """The events completed by ``chunk``, as they came, in one piece.

        The bytes :meth:`feed` would have returned the events of; a new
        splitter's :meth:`feed` splits them into those events.

        >>> s = SseSplitter()
        >>> s.take(b"data: 1\\n\\ndata: 2\\n\\nda"), s.take(b"ta: 3\\n\\n")
        (b'data: 1\\n\\ndata: 2\\n\\n', b'data: 3\\n\\n')
        """
        buf = self._buf + chunk if self._buf else chunk
        end = _last_end(buf)
        if end == len(buf):
            self._buf = b""
            return buf
        self._buf = buf[end:]
        return buf[:end]

    @property
    def pending(self) -> bool:
        """Part of an event is held, waiting for its end."""
        return bool(self._buf)

    def flush(self) -> bytes:
        """Whatever is left over (an unterminated event), clearing it."""
        rest, self._buf = self._buf, b""
        return rest


def encode_event(data: Any, event: str | None = None) -> bytes:
    """One event with ``data`` as compact JSON (and an ``event:`` line if given).

    >>> encode_event({"type": "ping"}, "ping")
    b'event: ping\\ndata: {"type":"ping"}\\n\\n'
    """
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {text}\n\n".encode()

"""The access log: one line per API request, written when it ends.

A line is built once, from the request's
:class:`~kvroute.proxy.record.RequestRecord`, when the request has ended
(answered, failed, or the client gone): JSON lines by default, or logfmt
``key=value`` text. Its fields, in order:

- ``time``: when it ended, UTC, ISO 8601 with milliseconds;
- ``id``: the request id (``X-Request-Id``, the client's or the proxy's);
- ``method``, ``path``: the API called (``POST /v1/chat/completions``...);
- ``status``: the HTTP status answered (499: the handler was cancelled before
  it ended: the proxy stopped, or the connection was dropped);
- ``outcome``: ``ok``, ``error`` (an error status), ``client_closed``,
  ``stream_broken`` (the worker's stream broke), ``migrated`` (it broke and
  went on on another worker), ``stream_error`` (the worker sent an error
  event), ``deadline_exceeded`` (its deadline passed mid-stream),
  ``upstream_failed`` (every attempt failed),
  ``shutdown`` (cut off when the proxy stopped, after its shutdown timeout);
- ``model``: the model sent to the worker (after ``--model-map``);
- ``session``: the agent session, if any;
- ``stream``: whether the client asked for a stream;
- ``worker``, ``worker_label``: the worker that served it (the last one
  tried), and its name or ``host:port``;
- ``decode_worker``: in a prefill/decode-disaggregated fleet, the worker that
  decoded it (``worker`` prefilled it; the same worker when the conditional
  rule kept the prefill there); null otherwise;
- ``policy``: what chose it (the policy's name, or ``pin``);
- ``matched_blocks``: prompt blocks the router found cached there;
- ``predicted_cached_tokens``: prompt tokens the router predicted cached there;
- ``reported_cached_tokens``: prompt tokens the worker says it read from
  its cache (null: it said nothing);
- ``prompt_tokens``: the worker's count, else the router's;
- ``output_tokens``: the worker's count (null: it said nothing);
- ``ttft_ms``: arrival to the first token (a JSON answer: to the whole answer);
- ``duration_ms``: arrival to the last byte;
- ``tokenize_ms``: tokenizing the prompt for routing;
- ``retries``: attempts after the first;
- ``client``: the client's address.

Fields the request never reached are null (JSON) or left out (text).

Cost: no work per streamed chunk; per request, one f-string (the JSON line
built straight from the record, :meth:`~kvroute.proxy.record.RequestRecord.json_line`:
about half the cost of a dict through ``json.dumps``), appended to a buffer
that is written out at most every ``flush_interval`` seconds or every 64 KiB,
and when the log closes (measured against the ``logging`` module and a
write per line in ``benchmarks/bench_observe.py``).

>>> import io
>>> out = io.StringIO()
>>> log = AccessLog(out, "text")
>>> log.write({"time": "2025-01-01T00:00:00.000Z", "id": "r1", "status": 200,
...            "model": "my model", "worker": None})
>>> log.flush(); out.getvalue()
'time=2025-01-01T00:00:00.000Z id=r1 status=200 model="my model"\\n'
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping
from typing import IO, Any, Final

__all__ = [
    "FIELDS",
    "AccessLog",
    "format_json",
    "format_text",
    "json_string",
    "open_access_log",
    "utc_time",
]

#: The fields of a line, in order.
FIELDS: Final = (
    "time", "id", "method", "path", "status", "outcome", "model", "session", "stream",
    "worker", "worker_label", "decode_worker", "policy", "matched_blocks",
    "predicted_cached_tokens", "reported_cached_tokens", "prompt_tokens", "output_tokens",
    "ttft_ms", "duration_ms", "tokenize_ms", "retries", "client",
)  # fmt: skip

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: A str as a JSON string literal (the json module's C encoder).
json_string: Final = json.encoder.encode_basestring
_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def utc_time(now: float) -> str:
    """``now`` (epoch seconds) as ISO 8601 UTC with milliseconds.

    >>> utc_time(0.25)
    '1970-01-01T00:00:00.250Z'
    """
    whole = int(now)
    if _second[0] != whole:  # the formatted second is reused for every line within it
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def format_json(fields: Mapping[str, object]) -> str:
    """One JSON line (with its newline)."""
    return _dumps(fields) + "\n"


def _text_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if value and not any(c in value for c in ' "=\\\n\t') and value.isprintable():
            return value
        return _dumps(value)
    return str(value)


def format_text(fields: Mapping[str, object]) -> str:
    """One logfmt line (with its newline); None fields left out."""
    return " ".join(f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None) + "\n"


class AccessLog:
    """Writes access log lines to a stream, buffered.

    Lines collect in memory and go out in one write when ``flush_interval``
    seconds have passed since the first of them (a timer on the running
    event loop), when 64 KiB have collected, or on :meth:`flush` /
    :meth:`close`. Without a running loop each line is written at once.

    :param stream: a text stream (``sys.stderr``, an open file).
    :param fmt: ``"json"`` or ``"text"``.
    :param flush_interval: seconds a line may wait in the buffer.
    :param owned: close ``stream`` on :meth:`close` (a file the log opened).
    """

    def __init__(
        self,
        stream: IO[str],
        fmt: str = "json",
        *,
        flush_interval: float = 0.2,
        owned: bool = False,
    ) -> None:
        if fmt not in ("json", "text"):
            raise ValueError(f"access log format must be 'json' or 'text', not {fmt!r}")
        self._stream = stream
        self._format = format_json if fmt == "json" else format_text
        self._interval = flush_interval
        self._owned = owned
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        #: Lines written since the log opened.
        self.lines = 0

    @property
    def json(self) -> bool:
        """Whether lines are JSON (a caller with a faster JSON line may use :meth:`write_line`)."""
        return self._format is format_json

    def write(self, fields: Mapping[str, object]) -> None:
        """Log one request's fields (see :data:`FIELDS`)."""
        self.write_line(self._format(fields))

    def write_line(self, line: str) -> None:
        """Log one line, already formatted (ending in a newline)."""
        self.lines += 1
        self._lines.append(line)
        self._size += len(line)
        if self._size >= 1 << 16:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        """Write out what is buffered."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not fail requests
            pass

    def close(self) -> None:
        """Flush, and close the stream if the log opened it. Idempotent."""
        self.flush()
        if self._owned and not self._stream.closed:
            self._stream.close()


def open_access_log(target: str, fmt: str = "json") -> AccessLog | None:
    """The access log ``target`` names: ``stderr``, ``stdout``, a file path (appended), ``off``.

    :returns: the log, or None for ``off``.
    :raises OSError: the file cannot be opened for appending.
    """
    if target == "off":
        return None
    if target == "stderr":
        return AccessLog(sys.stderr, fmt)
    if target == "stdout":
        return AccessLog(sys.stdout, fmt)
    return AccessLog(open(target, "a", encoding="utf-8"), fmt, owned=True)

"""Read request traces in the Mooncake format (JSON lines, optionally gzip-compressed).

Each line is one request::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52,
     "hash_ids": [46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 2353, 2354]}

``timestamp`` is the arrival time in milliseconds; ``hash_ids`` are prefix
block ids (512 tokens each in the Mooncake release): two requests whose lists
start with the same ids share that prefix. ``session_id`` (a string or an
int) is optional; other keys are ignored, so richer traces still load.

The default trace is the conversation workload of the Mooncake FAST'25 release,
shipped compressed in ``kvroute/data/`` (see its README for the attribution).

>>> reqs = load_trace(limit=2)
>>> len(reqs), reqs[0].hash_ids[:3]
(2, (0, 1, 2))
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Final, cast

__all__ = ["DEFAULT_TRACE", "TraceError", "TraceRequest", "iter_trace", "load_trace"]

#: File name of the bundled default trace inside ``kvroute/data``.
DEFAULT_TRACE: Final = "mooncake_conversation.jsonl.gz"

_U64_MAX: Final = (1 << 64) - 1
_GZIP_MAGIC: Final = b"\x1f\x8b"


class TraceError(ValueError):
    """A trace file is malformed; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace.

    :param timestamp: arrival time in milliseconds (int or float, as written).
    :param input_length: prompt length in tokens.
    :param output_length: generated length in tokens.
    :param hash_ids: the prompt's prefix block ids, in order.
    :param session_id: the conversation it belongs to, if the trace says.
    """

    timestamp: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    session_id: str | None = None


def _open_binary(
    path: str | os.PathLike[str] | None,
) -> tuple[io.BufferedIOBase, io.BufferedIOBase, str]:
    """Open ``path`` (or the bundled trace): the file, the stream to read, and a name.

    The stream unzips gzip, recognised by its magic bytes; closing a GzipFile
    does not close its file, so the caller closes both.
    """
    if path is None:
        ref = resources.files("kvroute").joinpath("data").joinpath(DEFAULT_TRACE)
        raw = cast(io.BufferedIOBase, ref.open("rb"))
        name = f"<bundled {DEFAULT_TRACE}>"
    else:
        raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, closed there
        name = os.fspath(path)
    try:
        # The extension is not trusted: traces get renamed, and a .jsonl may be gzip.
        if isinstance(raw, io.BufferedReader):
            head = raw.peek(2)[:2]
        else:
            head = raw.read(2)
            raw.seek(0)
        if head == _GZIP_MAGIC:
            return raw, gzip.GzipFile(fileobj=raw), name
        return raw, raw, name
    except BaseException:
        raw.close()
        raise


def _uint(row: dict[str, object], key: str, where: str) -> int:
    """Return ``row[key]`` as a non-negative int, or raise TraceError."""
    if key not in row:
        raise TraceError(f"{where}: missing required field {key!r}")
    value = row[key]
    # bool is an int subclass; "true" is never a length.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TraceError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _parse(line: str, where: str) -> TraceRequest:
    """Parse one JSON line into a :class:`TraceRequest`, or raise TraceError."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "timestamp" not in row:
        raise TraceError(f"{where}: missing required field 'timestamp'")
    ts = row["timestamp"]
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not ts >= 0:
        raise TraceError(f"{where}: 'timestamp' must be a non-negative number, got {ts!r}")
    input_length = _uint(row, "input_length", where)
    output_length = _uint(row, "output_length", where)
    if "hash_ids" not in row:
        raise TraceError(f"{where}: missing required field 'hash_ids'")
    ids = row["hash_ids"]
    if not isinstance(ids, list):
        raise TraceError(f"{where}: 'hash_ids' must be a list, got {type(ids).__name__}")
    for i, h in enumerate(ids):
        if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h <= _U64_MAX:
            raise TraceError(f"{where}: hash_ids[{i}] must be an integer in [0, 2**64), got {h!r}")
    session = row.get("session_id")
    if session is not None:
        if isinstance(session, bool) or not isinstance(session, (str, int)):
            raise TraceError(
                f"{where}: 'session_id' must be a string or an integer, got {session!r}"
            )
        session = str(session)
    return TraceRequest(ts, input_length, output_length, tuple(ids), session)


def iter_trace(
    path: str | os.PathLike[str] | None = None, *, limit: int | None = None
) -> Iterator[TraceRequest]:
    """Yield the requests of a Mooncake-format trace, in file order.

    Blank lines are skipped. Gzip input is recognised by its magic bytes,
    whatever the file is called.

    Runtime complexity: O(size of the file).

    :param path: a ``.jsonl`` or gzip-compressed ``.jsonl`` file; None reads
        the bundled Mooncake conversation trace.
    :param limit: stop after this many requests (None: read everything).
    :returns: an iterator of :class:`TraceRequest`.
    :raises OSError: the file cannot be opened or read.
    :raises TraceError: a line is not a well-formed request (or the gzip
        stream is corrupt); the message reads ``FILE:LINE: reason``.
    :raises ValueError: ``limit`` is negative.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit == 0:
        return
    raw, stream, name = _open_binary(path)
    with raw, stream:
        count = 0
        lineno = 0
        try:
            # Lines are read as bytes and decoded one by one, so that a decoding
            # error is reported on the right line (a text wrapper decodes in chunks).
            for lineno, data in enumerate(stream, start=1):
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TraceError(f"{name}:{lineno}: not UTF-8 text ({e.reason})") from None
                if not line.strip():
                    continue
                yield _parse(line, f"{name}:{lineno}")
                count += 1
                if count == limit:
                    return
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            # A truncated or corrupt gzip stream surfaces only while reading.
            raise TraceError(f"{name}:{lineno + 1}: corrupt gzip stream ({e})") from None


def load_trace(
    path: str | os.PathLike[str] | None = None, *, limit: int | None = None
) -> list[TraceRequest]:
    """Read a whole Mooncake-format trace into a list; see :func:`iter_trace`.

    :param path: the trace file; None reads the bundled Mooncake conversation trace.
    :param limit: keep only the first ``limit`` requests.
    :returns: the requests in file order.
    :raises OSError: the file cannot be opened or read.
    :raises TraceError: a malformed line, reported as ``FILE:LINE: reason``.
    """
    return list(iter_trace(path, limit=limit))

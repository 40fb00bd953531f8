"""Request bodies parsed without holding up the event loop, however big they are.

Three concurrent 27 MiB token-id prompts used to delay ``/health`` by almost
two seconds: ``json.loads``, the token-id checks and the block hashing all
ran on the event loop, and the JSON parsers hold the GIL, so a thread alone
would not help. :func:`parse_body` instead:

- parses a body under :data:`BIG_BODY` (1 MiB) with ``json.loads`` at once,
  as before (a few milliseconds at most);
- for a big ``/v1/completions`` body whose top-level ``prompt`` is a flat
  list of token ids (the expensive case: millions of integers), finds the
  list with a few byte searches on the loop, then checks and parses it in a
  worker thread with numpy, a megabyte at a time, which releases the GIL:
  ``body["prompt"]`` becomes a :class:`TokenIds` (the ids as a numpy array,
  and their JSON as it came). A ``max_ids`` limit is checked on the count of
  ids before any is parsed (:class:`TooManyTokenIds`);
- decodes any other big body with msgspec in steps (its top level, then each
  value; a long list a slice at a time), yielding to the loop between steps.

:func:`encode_body` re-encodes a body the proxy changed (a model mapped,
``stream_options`` added); a :class:`TokenIds` goes back out as the bytes it
came in. The block hashes of a long prompt are computed off the loop too (see
:meth:`~kvroute.proxy.prepare.Preparer.prepare`); the kvroute hashing
releases the GIL.

What is not covered: a chat or Messages body of tens of thousands of
messages is decoded in steps, but its hints are read, and a worker's render
answer for it parsed, in one go.

>>> import asyncio
>>> asyncio.run(parse_body(b'{"prompt": [1, 2, 3]}', token_ids=True))
{'prompt': [1, 2, 3]}
>>> big = b'{"model": "m", "prompt": [' + b"7," * BIG_BODY + b'7]}'
>>> body = asyncio.run(parse_body(big, token_ids=True))
>>> len(body["prompt"]), int(body["prompt"].ids[0]), encode_body(body) == big.replace(b" ", b"")
(1048577, 7, True)
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Mapping
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "BIG_BODY",
    "BodyError",
    "TokenIds",
    "TooManyTokenIds",
    "encode_body",
    "parse_body",
    "prepend_key",
]

#: Bodies this large or larger are parsed off the loop or in steps.
BIG_BODY: Final = 1 << 20
# The work between two yields to the loop: bytes decoded, or parsed in a thread.
_STEP: Final = 256 << 10
_PIECE: Final = 1 << 20
# Bytes a flat list of token ids may hold: digits, commas, JSON whitespace.
_ALLOWED: Final = np.zeros(256, dtype=bool)
_ALLOWED[list(b"0123456789, \t\n\r")] = True
_SPACE: Final = np.zeros(256, dtype=bool)
_SPACE[list(b" \t\n\r")] = True
_COMMA: Final = ord(",")
# Stands in for the token-id list while the rest of the body is decoded; random,
# so that no client can put it in a body.
_MARK: Final = f"\x00kvroute-token-ids-{secrets.token_hex(8)}\x00"
_MARK_JSON: Final = json.dumps(_MARK).encode()


class BodyError(ValueError):
    """The body is not a JSON object (the message says why)."""


class TooManyTokenIds(ValueError):
    """A token-id prompt longer than the limit given (checked before its ids are parsed).

    :param count: the prompt's length in tokens.
    :param limit: the limit.
    """

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"the prompt has {count} tokens, more than {limit}")
        self.count = count
        self.limit = limit


class TokenIds:
    """A prompt's token ids as a numpy array, with the JSON list they came as.

    :param ids: the ids (int64, non-negative).
    :param raw: the JSON list, byte for byte as the client sent it.
    """

    __slots__ = ("ids", "raw")

    def __init__(self, ids: npt.NDArray[np.int64], raw: bytes | memoryview) -> None:
        self.ids = ids
        self.raw = raw

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"TokenIds({len(self.ids)} ids)"


async def parse_body(
    raw: bytes, *, token_ids: bool = False, max_ids: int | None = None
) -> dict[str, Any]:
    """``raw`` parsed as a JSON object, without holding up the loop for long.

    :param token_ids: look for a big top-level ``prompt`` of token ids (completions).
    :param max_ids: refuse such a prompt longer than this, before parsing its ids.
    :raises BodyError: not JSON, or not an object.
    :raises TooManyTokenIds: a token-id prompt longer than ``max_ids``.
    """
    if len(raw) < BIG_BODY:
        return _loads(raw)
    if token_ids:
        body = await _with_token_ids(raw, max_ids)
        if body is not None:
            return body
    try:
        top = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    except msgspec.ValidationError:
        raise BodyError("the body must be a JSON object") from None
    except msgspec.DecodeError as e:
        raise BodyError(f"invalid JSON body: {e}") from None
    try:
        return {key: await _decode(value) for key, value in top.items()}
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BodyError(f"invalid JSON body: {e}") from None


def _loads(raw: bytes) -> dict[str, Any]:
    """``raw`` parsed as :func:`json.loads` parses it (msgspec's C decoder first: 3x faster)."""
    try:
        body = _DECODER.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        body = _std_loads(raw)  # what only the standard library takes (NaN, UTF-16...)
    if not isinstance(body, dict):
        raise BodyError("the body must be a JSON object")
    return body


def _std_loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BodyError(f"invalid JSON body: {e}") from None
    except RecursionError:
        raise BodyError("invalid JSON body: nested too deeply") from None


async def _decode(value: Any) -> Any:
    """A JSON value (a ``msgspec.Raw``) decoded, a step at a time when it is big."""
    if len(value) < _STEP:
        return msgspec.json.decode(value)
    first = memoryview(value)[:1].tobytes()
    await asyncio.sleep(0)
    if first == b"[":
        out = []
        done = 0
        for item in msgspec.json.decode(value, type=list[msgspec.Raw]):
            out.append(await _decode(item))
            done += len(item)
            if done >= _STEP:
                done = 0
                await asyncio.sleep(0)
        return out
    if first == b"{":
        parts = msgspec.json.decode(value, type=dict[str, msgspec.Raw])
        return {k: await _decode(v) for k, v in parts.items()}
    return msgspec.json.decode(value)  # a long string: decoded at memory speed


async def _with_token_ids(raw: bytes, max_ids: int | None) -> dict[str, Any] | None:
    """The body with its top-level ``prompt`` list of ids parsed off the loop; None if it has none.

    The list is found by byte search: the first ``"prompt"`` key followed by
    a ``[`` whose list holds no ``[``. The rest of the body, with a mark in
    the list's place, is decoded and must have the mark as its top-level
    ``prompt`` (and nowhere else), so the list found is that prompt.
    """
    start = _prompt_list(raw)
    if start is None:
        return None
    end = raw.find(b"]", start)
    if end < 0 or raw.find(b"[", start + 1, end) >= 0:
        return None
    rest = raw[:start] + _MARK_JSON + raw[end + 1 :]
    try:
        body = _loads(rest)
    except BodyError:
        return None
    if body.get("prompt") != _MARK or rest.count(_MARK_JSON) != 1:
        return None
    count = await asyncio.to_thread(_count_ids, raw, start + 1, end)
    if count is None:
        return None
    if max_ids is not None and count > max_ids:
        raise TooManyTokenIds(count, max_ids)
    ids = await asyncio.to_thread(_parse_ids, raw, start + 1, end, count)
    if ids is None:
        return None
    body["prompt"] = TokenIds(ids, memoryview(raw)[start : end + 1])
    return body


def _prompt_list(raw: bytes) -> int | None:
    """Where the list after the first ``"prompt":`` key starts, or None."""
    at = 0
    while (at := raw.find(b'"prompt"', at)) >= 0:
        at += len(b'"prompt"')
        rest = raw[at : at + 64].lstrip()
        if rest[:1] == b":":
            value = rest[1:].lstrip()
            if value[:1] != b"[":
                return None
            return raw.index(b"[", at)
    return None


def _count_ids(raw: bytes, start: int, end: int) -> int | None:
    """The number of ids in ``raw[start:end]``, or None unless it is a flat list of them.

    Runs in a thread: the numpy work releases the GIL.
    """
    if end <= start:
        return None
    chars = np.frombuffer(raw, dtype=np.uint8, count=end - start, offset=start)
    if not _ALLOWED[chars].all():
        return None
    seen = chars[~_SPACE[chars]]
    commas = seen == _COMMA
    if not len(seen) or commas[0] or commas[-1] or bool((commas[1:] & commas[:-1]).any()):
        return None  # empty, or an empty element
    return int(np.count_nonzero(commas)) + 1


def _parse_ids(raw: bytes, start: int, end: int, count: int) -> npt.NDArray[np.int64] | None:
    """The ids of ``raw[start:end]`` (``count`` of them, checked by :func:`_count_ids`).

    Runs in a thread, a megabyte at a time: numpy's text parsing releases
    the GIL, the copy of each piece holds it only briefly.
    """
    out = np.empty(count, dtype=np.int64)
    filled = 0
    at = start
    while at < end:
        stop = min(at + _PIECE, end)
        if stop < end:
            comma = raw.find(b",", stop, end)
            stop = end if comma < 0 else comma
        piece = np.fromstring(raw[at:stop], dtype=np.int64, sep=",")
        if filled + len(piece) > count:
            return None
        out[filled : filled + len(piece)] = piece
        filled += len(piece)
        at = stop + 1
    # an id past int64 saturates; the router hashes uint32 ids
    if filled != count or int(out.max()) >= 1 << 32:
        return None
    return out


def encode_body(body: Mapping[str, Any]) -> bytes:
    """``body`` as compact JSON (a :class:`TokenIds` as the bytes it came in).

    msgspec encodes a chat body ten times faster than :mod:`json` (the proxy
    re-encodes every streamed request it asks for usage); like JavaScript, it
    writes a NaN or infinite float as ``null``, which no engine accepts as a
    sampling parameter either way.

    >>> encode_body({"model": "m", "prompt": "x"})
    b'{"model":"m","prompt":"x"}'
    """
    return _ENCODER.encode(body)


def prepend_key(raw: bytes, key: str, value: Any) -> bytes:
    """``raw``, a JSON object's text, with ``key: value`` put first: for a key it does not hold.

    The rest goes as the client wrote it, unparsed and not re-encoded (the
    proxy adds ``stream_options`` to most streamed requests).

    >>> prepend_key(b' {"model": "m"}', "stream_options", {"include_usage": True})
    b' {"stream_options":{"include_usage":true},"model": "m"}'
    >>> prepend_key(b"{}", "n", 1)
    b'{"n":1}'
    """
    at = raw.index(b"{") + 1
    member = _ENCODER.encode({key: value})[1:-1]
    rest = raw[at:]
    comma = b"" if rest.lstrip().startswith(b"}") else b","
    return b"".join((raw[:at], member, comma, rest))


def _raw_ids(value: Any) -> Any:
    if isinstance(value, TokenIds):
        return msgspec.Raw(value.raw)
    raise TypeError(f"cannot encode {type(value).__name__}")


_ENCODER: Final = msgspec.json.Encoder(enc_hook=_raw_ids)
_DECODER: Final = msgspec.json.Decoder()

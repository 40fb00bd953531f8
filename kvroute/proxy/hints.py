"""Agent hints and usage figures common to every endpoint.

Hints come from headers (any endpoint) and from body fields (per API, see
:mod:`kvroute.proxy.openai` and :mod:`kvroute.proxy.anthropic`):

==================================  ===========================================
header                              meaning
==================================  ===========================================
``X-Session-Id`` (configurable)     the agent session (affinity, pins, warm-up)
``X-Kvroute-Priority``              an int; lower is served first (vLLM's way)
``X-Kvroute-Cache-Ttl``             ``5m`` or ``1h``: pin the session's worker
``X-Kvroute-Expected-Output-Tokens`` predicted output length, for decode load
``X-Kvroute-Speculative-Prefill``   ``1`` / ``true``: ask for a warm-up plan
==================================  ===========================================

A malformed hint is the client's error: :class:`~kvroute.proxy.errors.ProxyError` 400.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..request import CacheControl
from .errors import ProxyError

__all__ = [
    "HEADER_CACHE_TTL",
    "HEADER_EXPECTED_OUTPUT",
    "HEADER_PRIORITY",
    "HEADER_SPECULATIVE",
    "Breakpoint",
    "Hints",
    "Usage",
    "common_prefix",
    "header_hints",
    "parse_breakpoints",
    "pinned_breakpoints",
]

HEADER_PRIORITY: Final = "X-Kvroute-Priority"
HEADER_CACHE_TTL: Final = "X-Kvroute-Cache-Ttl"
HEADER_EXPECTED_OUTPUT: Final = "X-Kvroute-Expected-Output-Tokens"
HEADER_SPECULATIVE: Final = "X-Kvroute-Speculative-Prefill"

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """A ``cache_control`` breakpoint found in a request.

    :ivar ttl: seconds.
    :ivar prefix: the request body cut right after the marked block, to be
        tokenized like the request: its tokens shared with the request's are
        the cached prefix. None when the breakpoint closes the prompt (its
        last block, the top level, or a header).
    """

    ttl: float
    prefix: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Hints:
    """What the proxy tells the router about a request besides its tokens.

    ``cache_control`` lists the request's breakpoints in prompt order.
    """

    session_id: str | None = None
    priority: int = 0
    cache_control: tuple[Breakpoint, ...] = ()
    expected_output_tokens: int | None = None
    speculative_prefill: bool = False
    cache_salt: str | None = None

    def merged(self, other: Hints) -> Hints:
        """``self`` with every hint ``other`` sets (non-default) taking precedence."""
        return replace(
            self,
            session_id=other.session_id if other.session_id is not None else self.session_id,
            priority=other.priority if other.priority != 0 else self.priority,
            cache_control=self.cache_control + other.cache_control,
            expected_output_tokens=(
                other.expected_output_tokens
                if other.expected_output_tokens is not None
                else self.expected_output_tokens
            ),
            speculative_prefill=self.speculative_prefill or other.speculative_prefill,
            cache_salt=other.cache_salt if other.cache_salt is not None else self.cache_salt,
        )


def _int(text: str, what: str, *, low: int | None = None) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ProxyError(
            400, f"{what} must be an integer, got {text!r}", code="invalid_type", param=what
        ) from None
    if low is not None and value < low:
        raise ProxyError(400, f"{what} must be >= {low}, got {value}", param=what)
    return value


def header_hints(headers: Mapping[str, str], session_header: str) -> Hints:
    """The hints carried by request headers (names are case-insensitive).

    >>> h = header_hints({"X-Session-Id": "s1", "X-Kvroute-Cache-Ttl": "1h"}, "X-Session-Id")
    >>> h.session_id, h.cache_control
    ('s1', (Breakpoint(ttl=3600.0, prefix=None),))

    :raises ProxyError: 400 for a malformed value.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    session = lower.get(session_header.lower())
    session = session.strip() if session is not None else None
    priority = lower.get(HEADER_PRIORITY.lower())
    ttl = lower.get(HEADER_CACHE_TTL.lower())
    expected = lower.get(HEADER_EXPECTED_OUTPUT.lower())
    spec = lower.get(HEADER_SPECULATIVE.lower())
    speculative = False
    if spec is not None:
        if spec.strip().lower() not in _TRUE | _FALSE:
            raise ProxyError(
                400,
                f"{HEADER_SPECULATIVE} must be true or false, got {spec!r}",
                param=HEADER_SPECULATIVE,
            )
        speculative = spec.strip().lower() in _TRUE
    cc: tuple[Breakpoint, ...] = ()
    if ttl is not None:
        cc = parse_breakpoints(
            [({"type": "ephemeral", "ttl": ttl.strip()}, None)], HEADER_CACHE_TTL
        )
    return Hints(
        session_id=session or None,
        priority=_int(priority, HEADER_PRIORITY) if priority is not None else 0,
        cache_control=cc,
        expected_output_tokens=(
            _int(expected, HEADER_EXPECTED_OUTPUT, low=0) if expected is not None else None
        ),
        speculative_prefill=speculative,
    )


def parse_breakpoints(
    found: Iterable[tuple[object, dict[str, Any] | None]], where: str
) -> tuple[Breakpoint, ...]:
    """Parse ``(cache_control value, prefix body)`` pairs, in prompt order.

    Keys besides ``type`` and ``ttl`` are ignored, as the engines ignore them.

    >>> parse_breakpoints([({"type": "ephemeral", "ttl": "1h"}, {"messages": []}),
    ...                    ({"type": "ephemeral"}, None)], "cache_control")
    (Breakpoint(ttl=3600.0, prefix={'messages': []}), Breakpoint(ttl=300.0, prefix=None))

    :raises ProxyError: 400 naming ``where`` for a malformed value.
    """
    out = []
    for value, prefix in found:
        try:
            cc = CacheControl.parse(value, strict=False)
        except (TypeError, ValueError) as e:
            raise ProxyError(400, f"{where}: {e}", code="invalid_value", param=where) from None
        out.append(Breakpoint(cc.ttl, prefix))
    return tuple(out)


def pinned_breakpoints(breakpoints: Sequence[Breakpoint]) -> list[Breakpoint]:
    """The breakpoints that keep something warm no later breakpoint keeps longer.

    A breakpoint covers every earlier one's prefix, so an earlier one matters
    only with a longer TTL (Anthropic's 1 h breakpoints before 5 min ones).
    Whole-prompt breakpoints (``prefix`` None) count as the last. The result
    is in prompt order, at most one per TTL: the prefixes the proxy renders.

    >>> bps = [Breakpoint(3600.0, {"a": 1}), Breakpoint(300.0, {"b": 2}), Breakpoint(300.0)]
    >>> pinned_breakpoints(bps)
    [Breakpoint(ttl=3600.0, prefix={'a': 1}), Breakpoint(ttl=300.0, prefix=None)]
    """
    ordered = [b for b in breakpoints if b.prefix is not None]
    ordered += [b for b in breakpoints if b.prefix is None]
    kept: list[Breakpoint] = []
    for b in reversed(ordered):
        if not kept or b.ttl > kept[-1].ttl:
            kept.append(b)
    kept.reverse()
    return kept


def common_prefix(
    a: Sequence[int] | npt.NDArray[np.integer[Any]], b: Sequence[int] | npt.NDArray[np.integer[Any]]
) -> int:
    """How many leading tokens ``a`` and ``b`` share (lists or integer arrays, mixed).

    >>> common_prefix([1, 2, 3, 4], [1, 2, 9])
    2
    """
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(differ[0]) if len(differ) else n


@dataclass(frozen=True, slots=True)
class Usage:
    """A response's token counts, as the worker reported them.

    :ivar prompt_tokens: the whole prompt (cached or not).
    :ivar cached_tokens: prompt tokens read from the prefix cache; None when
        the worker did not say.
    :ivar output_tokens: tokens generated.
    """

    prompt_tokens: int
    cached_tokens: int | None
    output_tokens: int

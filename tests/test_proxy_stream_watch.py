"""Watching an OpenAI stream without parsing every event: the lazy path agrees with the eager one.

:class:`~kvroute.proxy.openai.OpenAIStream` parses each event only while it
must (before the first content, or for an event that may carry usage, an
error or the end); the others pass unparsed and reach ``on_event`` when
:meth:`~kvroute.proxy.openai.OpenAIStream.settle` is called. These tests feed
the same bytes, chunked anyhow, to a watcher that parses every event and to
the lazy ones, and ask for the same answers at every step.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.proxy.openai import OpenAIStream
from kvroute.proxy.sse import SseSplitter


def _data(obj: object, *, ascii_only: bool = False) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=ascii_only).encode() + b"\n\n"


def _chunk(content: str | None, *, role: bool = False, finish: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "c-1", "object": "chat.completion.chunk", "created": 1, "choices": [choice]}


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}}

text = st.text(st.characters(codec="utf-8"), max_size=12)
events = st.one_of(
    text.map(lambda t: _data(_chunk(t))),
    text.map(lambda t: _data(_chunk(t), ascii_only=True)),  # escapes: \u in every key's event
    st.just(_data(_chunk(None, role=True))),
    st.just(_data(_chunk("", finish="stop"))),
    st.just(_data({**_chunk(None), "choices": [], "usage": USAGE})),
    st.just(_data({**_chunk("x"), "usage": USAGE})),  # continuous usage stats
    st.just(_data({**_chunk(None), "choices": [], "usage": None})),
    # the usage key spelled with an escape: still usage
    st.just(b'data: {"choices": [], "\\u0075sage": {"prompt_tokens": 5}}\n\n'),
    st.just(_data({"error": {"message": "engine died", "type": "InternalServerError"}})),
    st.just(_data({"error": "plain"})),
    st.just(_data(_chunk('say "error" and "usage"'))),  # the words inside a string
    st.just(b"data: [DONE]\n\n"),
    st.just(b": keep-alive\n\n"),
    st.just(b"\n"),  # a stray line end: runs of three or more
    st.just(b"data: not json\n\n"),
    st.just(b"event: chunk\n" + _data(_chunk("named"))),
    st.just(b"data: " + json.dumps(_chunk("crlf")).encode() + b"\r\n\r\n"),
    st.just(b'data: {"choices": [{"index": 0,\ndata: "delta": {"content": "two lines"}}]}\n\n'),
)


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def _state(s: OpenAIStream) -> tuple[object, ...]:
    return s.first_token, s.usage, s.error, s.done


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=30), st.lists(st.integers(0, 10_000), max_size=12), st.booleans())
def test_the_lazy_watcher_sees_and_passes_what_the_eager_one_does(
    parts: list[bytes], cuts: list[int], strip_usage: bool
) -> None:
    stream = b"".join(parts)
    eager_events: list[object] = []
    late_events: list[object] = []
    eager = OpenAIStream(strip_usage=strip_usage, on_event=eager_events.append)
    late = OpenAIStream(strip_usage=strip_usage, on_event=late_events.append, defer=True)
    bare = OpenAIStream(strip_usage=strip_usage)
    for piece in _cut(stream, cuts):
        out = eager.feed(piece)
        # the first content, usage, errors and the end are seen at the same chunk
        assert late.feed(piece) == out and bare.feed(piece) == out
        assert _state(late) == _state(eager) and _state(bare) == _state(eager)
    assert late.flush() == bare.flush() == eager.flush()
    late.settle()
    assert late_events == eager_events
    assert late.content_chunks == bare.content_chunks == eager.content_chunks


def test_events_past_the_first_content_reach_on_event_when_settled() -> None:
    seen: list[object] = []
    s = OpenAIStream(on_event=seen.append, defer=True)
    first = _data(_chunk(None, role=True)) + _data(_chunk("a"))
    assert s.feed(first) == first and s.first_token and len(seen) == 0
    rest = _data(_chunk("b")) + _data(_chunk("c"))
    assert s.feed(rest) == rest  # passed on whole, unparsed
    assert len(seen) == 0
    s.settle()
    assert [c["choices"][0]["delta"].get("content") for c in seen] == ["", "a", "b", "c"]
    assert s.content_chunks == 3
    s.settle()  # nothing twice
    assert len(seen) == 4


def test_an_error_or_usage_after_the_first_content_is_seen() -> None:
    s = OpenAIStream(strip_usage=True, defer=True)
    s.feed(_data(_chunk("a")))
    usage = _data({**_chunk(None), "choices": [], "usage": USAGE})
    tail = _data(_chunk("b")) + usage + b"data: [DONE]\n\n"
    assert s.feed(tail) == _data(_chunk("b")) + b"data: [DONE]\n\n"  # the usage chunk stripped
    assert s.usage is not None and s.usage.cached_tokens == 8 and s.done
    s.feed(b'data: {"\\u0065rror": "escaped key"}\n\n')
    assert s.error == "escaped key"


def test_a_long_stream_is_not_held_whole() -> None:
    seen: list[object] = []
    s = OpenAIStream(on_event=seen.append, defer=True)
    s.feed(_data(_chunk("start")))
    piece = _data(_chunk("x" * 100))
    for _ in range(2000):  # some 300 KB
        s.feed(piece)
    assert len(seen) > 1000  # decoded along the way, past 64 KiB held
    s.settle()
    assert len(seen) == 2001


@given(st.lists(events, max_size=20), st.lists(st.integers(0, 10_000), max_size=8))
def test_sse_take_gives_the_bytes_of_the_events_feed_gives(
    parts: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(parts)
    fed, took = SseSplitter(), SseSplitter()
    for piece in _cut(stream, cuts):
        events = list(fed.feed(piece))
        got = took.take(piece)
        assert got == b"".join(e.raw for e in events)
        again = list(SseSplitter().feed(got))
        assert [(e.event, e.data, e.raw) for e in again] == [
            (e.event, e.data, e.raw) for e in events
        ]
        assert took.pending == fed.pending
    assert took.flush() == fed.flush()


def test_a_marked_event_after_a_run_of_line_ends_is_cut_where_the_eager_watcher_cuts_it() -> None:
    # Jumping to the usage chunk, the lazy watcher finds where its event starts;
    # after three line ends or more only a left-to-right split says where.
    usage = _data({**_chunk(None), "choices": [], "usage": USAGE})
    head = _data(_chunk("a")) + _data(_chunk("b"))
    for stray in (b"\n", b"\n\n\n", b"\n" * 5):
        stream = head + stray + usage + b"data: [DONE]\n\n"
        eager = OpenAIStream(strip_usage=True, on_event=lambda obj: None)
        late = OpenAIStream(strip_usage=True, defer=True)
        assert late.feed(stream) == eager.feed(stream)
        assert late.usage == eager.usage and late.usage is not None and late.done

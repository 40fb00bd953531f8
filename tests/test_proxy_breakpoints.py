"""Cache breakpoints in request bodies: where each one's prefix ends, and which ones pin.

The proxy measures a breakpoint's prefix by tokenizing the request cut right
after the marked block; these tests pin down the cuts (the HTTP side is in
tests/test_proxy.py and tests/test_proxy_anthropic.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from kvroute.proxy.anthropic import anthropic_hints
from kvroute.proxy.errors import ProxyError
from kvroute.proxy.hints import Breakpoint, common_prefix, pinned_breakpoints
from kvroute.proxy.openai import openai_hints

EPH = {"type": "ephemeral"}
HOUR = {"type": "ephemeral", "ttl": "1h"}


def text(t: str, cc: dict[str, str] | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": t}
    if cc is not None:
        block["cache_control"] = cc
    return block


def cuts(body: dict[str, Any]) -> list[tuple[float, dict[str, Any] | None]]:
    return [(b.ttl, b.prefix) for b in anthropic_hints(body, {}, "X-Session-Id").cache_control]


def test_anthropic_breakpoints_cut_after_their_block_in_prompt_order() -> None:
    tools = [
        {"name": "a", "input_schema": {}},
        {"name": "b", "input_schema": {}, "cache_control": HOUR},
    ]
    result = {"type": "tool_result", "tool_use_id": "t1",
              "content": [text("out-1", EPH), text("out-2")]}  # fmt: skip
    messages = [
        {"role": "user", "content": [text("q1", EPH), text("q1b")]},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "a", "input": {}}],
        },
        {"role": "user", "content": [result, text("q2", EPH)]},
    ]
    body = {"model": "m", "max_tokens": 5, "tools": tools,
            "system": [text("s1", EPH), text("s2")], "messages": messages}  # fmt: skip
    got = cuts(body)
    stand_in = [{"role": "user", "content": "."}]
    assert got[0] == (3600.0, {"model": "m", "max_tokens": 5, "tools": tools, "messages": stand_in})
    assert got[1] == (300.0, {**body, "system": [text("s1", EPH)], "messages": stand_in})
    first = {"role": "user", "content": [text("q1", EPH)]}
    assert got[2] == (300.0, {**body, "messages": [first]})
    inner = {**result, "content": [text("out-1", EPH)]}
    assert got[3] == (
        300.0,
        {**body, "messages": [*messages[:2], {"role": "user", "content": [inner]}]},
    )
    assert got[4] == (300.0, None)  # the last block closes the prompt
    assert len(got) == 5
    # The input is left as it was.
    assert body["messages"][2]["content"][0]["content"][1] == text("out-2")


def test_a_breakpoint_inside_the_last_tool_result_closes_the_prompt() -> None:
    result = {"type": "tool_result", "tool_use_id": "t", "content": [text("x"), text("y", HOUR)]}
    body = {"messages": [{"role": "user", "content": [result]}], "cache_control": EPH}
    assert cuts(body) == [(300.0, None), (3600.0, None)]


def test_openai_breakpoints_on_messages_and_parts() -> None:
    messages = [
        {"role": "system", "content": [text("s", HOUR)]},
        {"role": "user", "content": "q", "cache_control": EPH},
        {"role": "user", "content": [text("a"), text("b", EPH)]},
    ]
    body = {"model": "m", "messages": messages}
    got = [(b.ttl, b.prefix) for b in openai_hints(body, {}, "X-Session-Id").cache_control]
    assert got == [
        (3600.0, {"model": "m", "messages": [messages[0]]}),
        (300.0, {"model": "m", "messages": messages[:2]}),
        (300.0, None),
    ]


def test_extra_cache_control_keys_are_ignored_but_bad_values_are_400() -> None:
    body = {"messages": [{"role": "user", "content": [text("q", {**EPH, "scope": "global"})]}]}
    assert cuts(body) == [(300.0, None)]
    with pytest.raises(ProxyError, match="ttl must be '5m' or '1h'") as info:
        cuts(
            {
                "messages": [
                    {"role": "user", "content": [text("q", {"type": "ephemeral", "ttl": "1d"})]}
                ]
            }
        )
    assert info.value.status == 400


def test_header_ttl_is_a_whole_prompt_breakpoint_after_the_body_ones() -> None:
    body = {"messages": [{"role": "user", "content": [text("q", EPH), text("r")]}]}
    hints = anthropic_hints(body, {"X-Kvroute-Cache-Ttl": "1h"}, "X-Session-Id")
    assert [b.ttl for b in hints.cache_control] == [300.0, 3600.0]
    assert hints.cache_control[1].prefix is None
    # The whole prompt for an hour covers the 5 min prefix: only the former pins.
    assert pinned_breakpoints(hints.cache_control) == [Breakpoint(3600.0)]


@pytest.mark.parametrize(
    ("ttls", "kept"),
    [
        ([], []),
        ([300], [300]),
        ([3600, 300, 300], [3600, 300]),  # 1 h breakpoints come first in Anthropic's rules
        ([300, 3600], [3600]),  # a later, longer one covers the earlier
        ([300, 300, 300], [300]),
    ],
)
def test_pinned_breakpoints_keep_one_per_ttl_that_adds_something(
    ttls: list[int], kept: list[int]
) -> None:
    bps = [Breakpoint(float(t), {"at": i}) for i, t in enumerate(ttls)]
    got = pinned_breakpoints(bps)
    assert [b.ttl for b in got] == kept
    # what is kept is the last breakpoint of its TTL
    for b in got:
        assert b is max((x for x in bps if x.ttl == b.ttl), key=lambda x: x.prefix["at"])  # type: ignore[index]


def test_common_prefix() -> None:
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([5, 2], [1, 2]) == 0

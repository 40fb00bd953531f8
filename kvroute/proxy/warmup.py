"""Speculative prefill: warm a session's next turn while its agent runs a tool.

When a response to a request with the speculative-prefill hint (and a
session) completes, the start of the session's next prompt is known: the
conversation so far with that response appended, as the engine's chat
template renders it. The template may render the reply differently from
the tokens the engine generated (reasoning dropped from earlier turns,
tool calls reformatted), so those blocks are not cached yet. The proxy asks
the router where (:meth:`~kvroute.router.Router.warmup_plan`: the worker
that served the turn, if still healthy) and sends it that conversation with
``max_tokens`` 1, so the engine prefills it while the agent is busy and the
next turn only computes its new part (the tool result or user message).

This module rebuilds the reply (from a JSON answer, or piece by piece from
a stream with :class:`ReplyCollector`) and builds the warm-up body.
"""

from __future__ import annotations

import json
from typing import Any

from .kinds import Kind

__all__ = ["ReplyCollector", "reply_of", "warmup_body"]


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def reply_of(kind: Kind, answer: object) -> Any:
    """The reply in a (non-streamed) answer: what :func:`warmup_body` appends.

    An assistant message for chat, the content blocks for Anthropic
    messages, the text for completions; None if the answer has none.

    >>> reply_of("chat", {"choices": [{"message": {"role": "assistant", "content": "hi",
    ...                                              "tool_calls": []}}]})
    {'role': 'assistant', 'content': 'hi'}
    >>> reply_of("messages", {"content": [{"type": "text", "text": "hi"}]})
    [{'type': 'text', 'text': 'hi'}]
    """
    if not isinstance(answer, dict):
        return None
    if kind == "messages":
        content = answer.get("content")
        return content if isinstance(content, list) and content else None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    if kind == "completions":
        return _text(choices[0].get("text")) or None
    message = choices[0].get("message")
    if not isinstance(message, dict):
        return None
    reply: dict[str, Any] = {"role": "assistant", "content": _text(message.get("content"))}
    if message.get("tool_calls"):
        reply["tool_calls"] = message["tool_calls"]
    return reply


class ReplyCollector:
    """Rebuild a streamed reply from its events (see :func:`reply_of` for its shape).

    Fed the decoded JSON of each event; only the first choice is kept.

    >>> c = ReplyCollector("messages")
    >>> def delta(i, **d): c.feed({"type": "content_block_delta", "index": i, "delta": d})
    >>> c.feed({"type": "content_block_start", "index": 0,
    ...         "content_block": {"type": "text", "text": ""}})
    >>> delta(0, type="text_delta", text="Hi")
    >>> c.feed({"type": "content_block_start", "index": 1,
    ...         "content_block": {"type": "tool_use", "id": "t", "name": "ls", "input": {}}})
    >>> delta(1, type="input_json_delta", partial_json='{"path": ')
    >>> delta(1, type="input_json_delta", partial_json='"."}')
    >>> c.reply()
    [{'type': 'text', 'text': 'Hi'}, {'type': 'tool_use', 'id': 't', 'name': 'ls', 'input': ...}]
    """

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._blocks: dict[int, dict[str, Any]] = {}
        self._json: dict[int, list[str]] = {}

    def feed(self, event: object) -> None:
        """Take one event's JSON (others are ignored)."""
        if not isinstance(event, dict):
            return
        if self.kind == "messages":
            self._feed_messages(event)
            return
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        if self.kind == "completions":
            self._text.append(_text(choice.get("text")))
            return
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        self._text.append(_text(delta.get("content")))
        for part in delta.get("tool_calls") or ():
            if not isinstance(part, dict) or not isinstance(part.get("index"), int):
                continue
            call = self._calls.setdefault(
                part["index"],
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = part.get("id") or call["id"]
            fn = part.get("function")
            if isinstance(fn, dict):
                call["function"]["name"] += _text(fn.get("name"))
                call["function"]["arguments"] += _text(fn.get("arguments"))

    def _feed_messages(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        index = event.get("index")
        if not isinstance(index, int):
            return
        if kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            self._blocks[index] = dict(event["content_block"])
        elif kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            block = self._blocks.get(index)
            delta = event["delta"]
            if block is None:
                return
            dtype = delta.get("type")
            if dtype == "text_delta":
                block["text"] = _text(block.get("text")) + _text(delta.get("text"))
            elif dtype == "thinking_delta":
                block["thinking"] = _text(block.get("thinking")) + _text(delta.get("thinking"))
            elif dtype == "signature_delta":
                block["signature"] = _text(delta.get("signature"))
            elif dtype == "input_json_delta":
                self._json.setdefault(index, []).append(_text(delta.get("partial_json")))

    def reply(self) -> Any:
        """The reply so far (None if nothing came)."""
        if self.kind == "messages":
            blocks = []
            for i in sorted(self._blocks):
                block = dict(self._blocks[i])
                if i in self._json:
                    try:
                        block["input"] = json.loads("".join(self._json[i]) or "{}")
                    except ValueError:
                        continue  # a cut-off tool call: not what the next turn will hold
                blocks.append(block)
            return blocks or None
        text = "".join(self._text)
        if self.kind == "completions":
            return text or None
        if not text and not self._calls:
            return None
        reply: dict[str, Any] = {"role": "assistant", "content": text}
        if self._calls:
            reply["tool_calls"] = [self._calls[i] for i in sorted(self._calls)]
        return reply


def warmup_body(kind: Kind, body: dict[str, Any], reply: Any) -> dict[str, Any] | None:
    """The warm-up request: ``body``'s conversation with ``reply`` appended, one token, no stream.

    None when the next prompt cannot be predicted (a completion prompt given
    as token ids, or several prompts).

    >>> body = warmup_body("chat", {"model": "m", "messages": [{"role": "user", "content": "q"}],
    ...                             "stream": True, "stream_options": {"include_usage": True}},
    ...                    {"role": "assistant", "content": "a"})
    >>> body["messages"][-1], body["stream"], body["max_tokens"], "stream_options" in body
    ({'role': 'assistant', 'content': 'a'}, False, 1, False)
    """
    out = {k: v for k, v in body.items() if k not in ("stream_options", "n", "best_of")}
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    if kind == "completions":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        out["prompt"] = prompt + reply
    elif kind == "messages":
        out["messages"] = [*body["messages"], {"role": "assistant", "content": reply}]
    else:
        out["messages"] = [*body["messages"], reply]
    return out

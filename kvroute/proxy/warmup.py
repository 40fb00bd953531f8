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

This module rebuilds the reply (from a JSON answer with :func:`reply_of`,
or piece by piece from a stream with :class:`ReplyCollector`), builds the
warm-up body (:func:`warmup_body`) and sends it (:class:`Warmups`): in the
background, with request id ``<id>-warmup``, not routed, not counted as
load, and counted in ``kvroute_warmups_total{outcome}`` (``sent``,
``refused``: the worker answered an error, ``failed``: no answer). A
warm-up is a guess made on the side: its failure says nothing about the
worker's health.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from ..events.metrics import Metrics
from ..router import Router
from .call import Call, Kind
from .upstream import CONNECTION_ERRORS, Upstream

__all__ = ["ReplyCollector", "Warmups", "reply_of", "warmup_body"]

log = logging.getLogger("kvroute.proxy")


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


class Warmups:
    """Sends each session's next-turn prefix to the worker that served the turn, in the background.

    :param router: gives the warm-up plans.
    :param upstream: sends the warm-ups (:meth:`~.upstream.Upstream.post_aside`).
    :param metrics: ``kvroute_warmups_total{outcome}`` is counted here.
    """

    def __init__(self, router: Router, upstream: Upstream, metrics: Metrics) -> None:
        self.router = router
        self.upstream = upstream
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Warm-ups still being sent."""
        return len(self._tasks)

    def warm(self, call: Call, session_id: str, reply: Any) -> None:
        """Warm ``session_id``'s next turn: ``call``'s conversation with ``reply`` appended.

        The router's plan is taken in any case: a response that ended without
        a reply to continue (the client left, an empty answer) leaves nothing
        to warm, and its plan must not stay behind.
        """
        plan = self.router.warmup_plan(session_id)
        if plan is None or reply is None or plan.worker in self.upstream.pool.excluded:
            return  # nothing to warm, or its worker drains: its next turn goes elsewhere
        body = warmup_body(call.kind, call.body, reply)
        if body is None:
            return
        data = json.dumps(body, ensure_ascii=False).encode()
        headers = {**call.headers, "X-Request-Id": f"{call.client_id}-warmup"}
        task = asyncio.create_task(self.send(plan.worker, call.path, data, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, worker: int, path: str, data: bytes, headers: dict[str, str]) -> None:
        """Send one warm-up and count its outcome (it never raises for the worker's doing)."""
        try:
            status = await self.upstream.post_aside(worker, path, data, headers)
        except (aiohttp.ClientError, *CONNECTION_ERRORS) as e:
            outcome, detail = "failed", f"{type(e).__name__} {e}"
        else:
            outcome, detail = ("sent", "") if status < 400 else ("refused", f"status {status}")
        self.metrics.warmups.labels(outcome).inc()
        log.debug(
            "warm-up %s to worker %d: %s %s", headers["X-Request-Id"], worker, outcome, detail
        )

    async def close(self) -> None:
        """Cancel the warm-ups still being sent, and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

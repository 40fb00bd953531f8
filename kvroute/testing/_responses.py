"""The mock worker's OpenAI Responses API (``POST /v1/responses``), as vLLM serves it.

The prompt is built the way vLLM's ``construct_input_messages`` builds it,
then rendered with the worker's chat template:

1. ``instructions``, when given, is a system message;
2. with ``previous_response_id``, the stored conversation of that response
   (its system messages left out: instructions do not carry over), then its
   output messages as assistant turns;
3. the new ``input``: a string is a user message; a list of items becomes
   chat messages (``function_call`` items are tool calls of the assistant
   message before them, or of a new one; ``function_call_output`` a tool
   message; ``reasoning`` the assistant's reasoning; assistant messages their
   first part's text; any other item, a user or system message, as it is).

Function tools (``{"type": "function", "name", "description", "parameters"}``)
reach the template as chat tools; other tool types are not rendered.

A response is stored (in memory, for this start of the worker only, as
vLLM keeps it in its process) unless the request says ``"store": false`` or
the worker runs without a store (vLLM's default, unless
``VLLM_ENABLE_RESPONSES_API_STORE=1``); an unknown ``previous_response_id``
is vLLM's 404 ``Response with id '<id>' not found.`` (``param``
``response_id``). The answer is one assistant message of ``max_output_tokens``
pieces (default: the worker's default), status ``incomplete`` (the mock always
stops at the length limit, as vLLM reports ``finish_reason`` ``length``), with
``usage.input_tokens_details.cached_tokens`` the prefix-cache hit. Streamed,
it is vLLM's event sequence, each ``event: <type>`` with a ``sequence_number``:
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, one ``response.output_text.delta`` per piece,
``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done``, ``response.completed`` (the whole response).

``POST /v1/responses/render`` is vLLM's stateless render endpoint: the
prompt's ``token_ids`` for a self-contained request (``previous_response_id``
is refused there).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from ._engine import Engine, Request
from ._formats import generate_request
from ._tokenizer import RequestError

__all__ = ["ResponsesApi"]

#: Responses kept per worker start (vLLM keeps them all; the mock forgets the oldest).
STORE_LIMIT: Final = 10_000


def _sse(event: Mapping[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def _item_text(item: Mapping[str, Any]) -> str:
    """The text of an assistant item: its content string, or its first part's text."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("text") or "")
    return ""


def _reasoning_text(item: Mapping[str, Any]) -> str:
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list) and parts:
            first = parts[0]
            return str(first.get("text", "")) if isinstance(first, dict) else str(first)
    return ""


def input_messages(items: object) -> list[dict[str, Any]]:
    """Chat messages for a Responses ``input`` (a string or a list of items).

    >>> input_messages("hi")
    [{'role': 'user', 'content': 'hi'}]
    >>> input_messages([{"type": "function_call", "call_id": "c1", "name": "ls",
    ...                  "arguments": "{}"},
    ...                 {"type": "function_call_output", "call_id": "c1", "output": "a.py"}])
    ... # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'assistant', 'tool_calls': [{'id': 'c1', 'type': 'function',
      'function': {'name': 'ls', 'arguments': '{}'}}]},
     {'role': 'tool', 'content': 'a.py', 'tool_call_id': 'c1'}]

    :raises RequestError: ``input`` is neither a string nor a list of objects.
    """
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise RequestError("input: must be a string or a list of items", 400, "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(f"input[{i}]: must be an object", 400, "input")
        kind = item.get("type")
        last = out[-1] if out and out[-1].get("role") == "assistant" else None
        if kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if last is not None:
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "content": item.get("output"),
                        "tool_call_id": item.get("call_id")})  # fmt: skip
        elif kind == "reasoning":
            text = _reasoning_text(item)
            if last is not None and last.get("reasoning") is None:
                last["reasoning"] = text
            else:
                out.append({"role": "assistant", "reasoning": text})
        elif item.get("role") == "assistant":
            text = _item_text(item)
            if last is not None and last.get("content") is None:
                last["content"] = text
            else:
                out.append({"role": "assistant", "content": text})
        else:
            out.append(dict(item))
    return out


def chat_tools(tools: object) -> list[dict[str, Any]] | None:
    """The request's function tools as chat tools (None when there are none).

    :raises RequestError: ``tools`` is not a list of objects.
    """
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError("tools: must be a list of objects", 400, "tools")
    out = [
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
        for t in tools
        if t.get("type") == "function"
    ]
    return out or None


class _Stored:
    __slots__ = ("messages", "output_texts")

    def __init__(self, messages: list[dict[str, Any]], output_texts: list[str]) -> None:
        self.messages = messages
        self.output_texts = output_texts


class ResponsesApi:
    """``/v1/responses`` and its render endpoint for one start of a mock worker.

    :param engine: the worker's engine (tokenizer, cache, generation).
    :param store: keep responses for ``previous_response_id`` (vLLM with
        ``VLLM_ENABLE_RESPONSES_API_STORE=1``).
    """

    def __init__(self, engine: Engine, *, store: bool = True) -> None:
        self.engine = engine
        self.store = store
        self._stored: OrderedDict[str, _Stored] = OrderedDict()

    def _messages(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        instructions = body.get("instructions")
        if instructions:
            if not isinstance(instructions, str):
                raise RequestError("instructions: must be a string", 400, "instructions")
            messages.append({"role": "system", "content": instructions})
        previous = body.get("previous_response_id")
        if previous is not None:
            stored = self._stored.get(str(previous))
            if stored is None:
                raise RequestError(
                    f"Response with id '{previous}' not found.", 404, "response_id",
                    kind="invalid_request_error",
                )  # fmt: skip
            messages += [m for m in stored.messages if m.get("role") != "system"]
            messages += [{"role": "assistant", "content": t} for t in stored.output_texts]
        if "input" not in body:
            raise RequestError("input: Field required", 400, "input")
        messages += input_messages(body["input"])
        return messages

    def _tokens(self, messages: list[dict[str, Any]], body: Mapping[str, Any]) -> list[int]:
        return self.engine.tokenizer.render_chat(messages, tools=chat_tools(body.get("tools")))

    def _max_tokens(self, body: Mapping[str, Any], prompt_len: int) -> int:
        value = body.get("max_output_tokens")
        engine = self.engine
        if value is None:
            value = engine.default_max_tokens
        if type(value) is not int:
            raise RequestError(f"max_output_tokens must be an integer, got {value!r}", 400,
                               "max_output_tokens")  # fmt: skip
        if value < 1:
            raise RequestError(f"max_tokens must be at least 1, got {value}.", 400, "max_tokens")
        if prompt_len + value > engine.max_model_len:
            raise RequestError(
                f"The engine prompt length {prompt_len} exceeds the max_model_len "
                f"{engine.max_model_len}. Please reduce prompt.", 400, "input",
            )  # fmt: skip
        return value

    async def render(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses/render``: a self-contained request's prompt (a GenerateRequest)."""
        body = await _body(request)
        if body.get("previous_response_id") is not None:
            raise RequestError(
                "previous_response_id is not supported by the stateless render endpoint:"
                " include the conversation in the request", 400, "previous_response_id",
            )  # fmt: skip
        _model(self.engine, body)
        tokens = self._tokens(self._messages(body), body)
        max_tokens = self._max_tokens(body, len(tokens))
        return web.json_response(
            generate_request(
                request_id=f"resp_{uuid.uuid4().hex[:24]}",
                token_ids=tokens,
                body=body,
                max_tokens=max_tokens,
            )
        )

    async def create(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``."""
        body = await _body(request)
        model = _model(self.engine, body)
        messages = self._messages(body)
        tokens = self._tokens(messages, body)
        max_tokens = self._max_tokens(body, len(tokens))
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise RequestError("cache_salt must be a non-empty string", 400, "cache_salt")
        base = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:24]
        rid = f"resp_{uuid.uuid4().hex}"
        lora = None if model == self.engine.model else model
        req = self.engine.admit(base, request.path, tokens, salt, lora)
        try:
            shell = self._response(rid, model, body, "in_progress", [], None)
            if not body.get("stream"):
                text = await req.run(max_tokens)
                return web.json_response(self._finish(rid, model, body, req, text, messages),
                                         headers={"X-Request-Id": base})  # fmt: skip
            resp = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Request-Id": base})  # fmt: skip
            await resp.prepare(request)
            with contextlib.suppress(ConnectionResetError):  # the client left: vLLM aborts
                await self._stream(resp, rid, model, body, req, max_tokens, messages, shell)
                await resp.write_eof()
            return resp
        finally:
            req.release()

    async def _stream(
        self,
        resp: web.StreamResponse,
        rid: str,
        model: str,
        body: Mapping[str, Any],
        req: Request,
        max_tokens: int,
        messages: list[dict[str, Any]],
        shell: dict[str, Any],
    ) -> None:
        seq = 0

        async def send(event: dict[str, Any]) -> None:
            nonlocal seq
            event["sequence_number"] = seq
            seq += 1
            await resp.write(_sse(event))

        item_id = f"msg_{uuid.uuid4().hex}"
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        await send({"type": "response.created", "response": shell})
        await send({"type": "response.in_progress", "response": shell})
        item = {"id": item_id, "type": "message", "role": "assistant", "content": [],
                "status": "in_progress"}  # fmt: skip
        await send({"type": "response.output_item.added", "output_index": 0, "item": item})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        await send({"type": "response.content_part.added", **where, "part": part})
        text: list[str] = []
        async with contextlib.aclosing(req.generate(max_tokens)) as gen:
            async for piece in gen:
                text.append(piece)
                await send({"type": "response.output_text.delta", **where, "delta": piece,
                            "logprobs": []})  # fmt: skip
        full = "".join(text)
        await send({"type": "response.output_text.done", **where, "text": full, "logprobs": []})
        done_part = {"type": "output_text", "text": full, "annotations": []}
        await send({"type": "response.content_part.done", **where, "part": done_part})
        final = self._finish(rid, model, body, req, full, messages, item_id)
        await send({"type": "response.output_item.done", "output_index": 0,
                    "item": final["output"][0]})  # fmt: skip
        await send({"type": "response.completed", "response": final})

    def _finish(
        self,
        rid: str,
        model: str,
        body: Mapping[str, Any],
        req: Request,
        text: str,
        messages: list[dict[str, Any]],
        item_id: str | None = None,
    ) -> dict[str, Any]:
        """The finished response (stored when asked): one assistant message, usage."""
        message = {
            "id": item_id or f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}],
        }
        usage = {
            "input_tokens": req.prompt_tokens,
            "input_tokens_details": {"cached_tokens": req.cached_tokens},
            "output_tokens": req.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": req.prompt_tokens + req.completion_tokens,
        }
        if self.store and body.get("store", True) is not False:
            self._stored[rid] = _Stored(messages, [text])
            while len(self._stored) > STORE_LIMIT:
                self._stored.popitem(last=False)
        return self._response(rid, model, body, "incomplete", [message], usage)

    def _response(
        self,
        rid: str,
        model: str,
        body: Mapping[str, Any],
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
    ) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "incomplete_details": incomplete,
            "error": None,
            "instructions": body.get("instructions"),
            "model": model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "max_output_tokens": body.get("max_output_tokens") or self.engine.default_max_tokens,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "background": False,
            "service_tier": "auto",
            "truncation": "disabled",
            "metadata": body.get("metadata"),
            "usage": usage,
            "user": None,
        }


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def _model(engine: Engine, body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        return engine.model
    if not isinstance(model, str) or not engine.is_served(model):
        raise RequestError(f"The model `{model}` does not exist.", 404, "model")
    return model

"""The mock worker's HTTP API (aiohttp): vLLM's OpenAI, Anthropic, tokenizer and render routes.

The Responses API and embeddings live in their own modules
(:mod:`._responses`, :mod:`._embeddings`) and are routed here.

Every prompt goes through the engine's :class:`MockTokenizer`, so
``/tokenize``, the render endpoints and the generation endpoints agree on
token ids. Errors are answered in the endpoint's own format: vLLM's
``{"error": {...}}`` on OpenAI and vLLM routes, Anthropic's
``{"type": "error", "error": {...}}`` on ``/v1/messages*``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from ._embeddings import EmbeddingsApi
from ._engine import Engine, Request
from ._formats import (
    anthropic_error,
    anthropic_sse,
    anthropic_usage,
    generate_request,
    openai_error,
    openai_sse,
    openai_usage,
    split_pieces,
    tool_input,
)
from ._responses import ResponsesApi
from ._tokenizer import RequestError

__all__ = ["HttpApi"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _fail(message: str, status: int = 400) -> RequestError:
    return RequestError(message, status)


def _usage(admitted: Sequence[Request]) -> dict[str, Any]:
    return openai_usage(
        sum(r.prompt_tokens for r in admitted),
        sum(r.completion_tokens for r in admitted),
        sum(r.cached_tokens for r in admitted),
    )


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _cache_salt(body: Mapping[str, Any]) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise _fail("cache_salt must be a non-empty string")
    return salt


def _request_id(request: web.Request, body: Mapping[str, Any]) -> str:
    rid = request.headers.get("X-Request-Id") or body.get("request_id")
    return str(rid) if rid else uuid.uuid4().hex[:24]


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise _fail("the body must be a JSON object")
    return body


async def _stream(
    request: web.Request, rid: str, body: Callable[[web.StreamResponse], Awaitable[None]]
) -> web.StreamResponse:
    """Answer with a server-sent-event stream whose events ``body`` writes."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": rid,
        }
    )
    await resp.prepare(request)
    try:
        await body(resp)
        await resp.write_eof()
    except ConnectionResetError:
        # The client went away: stop generating (the caller's ``finally``
        # records the request as aborted), quietly, as vLLM aborts it.
        pass
    return resp


def _forced_tool(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tool a (validated) Messages request's ``tool_choice`` makes the model call, if any.

    ``{"type": "tool", "name": ...}`` names it; ``{"type": "any"}`` takes the
    first tool; ``auto`` and ``none`` leave the mock answering with text.
    """
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if not tools or not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool":
        return next(dict(t) for t in tools if t["name"] == choice["name"])
    if choice.get("type") == "any":
        return dict(tools[0])
    return None


class HttpApi:
    """The routes of one mock worker, bound to its :class:`Engine`.

    :param store_responses: keep ``/v1/responses`` answers for ``previous_response_id``.
    """

    def __init__(self, engine: Engine, *, store_responses: bool = True) -> None:
        self.engine = engine
        self.store_responses = store_responses

    def app(self) -> web.Application:
        """A fresh application (one per start: aiohttp apps are not restartable)."""
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 2**20)
        post: dict[str, _Handler] = {
            "/v1/completions": self._completions,
            "/v1/chat/completions": self._chat,
            "/v1/messages": self._messages,
            "/v1/messages/count_tokens": self._count_tokens,
            "/tokenize": self._tokenize,
            "/detokenize": self._detokenize,
            "/v1/completions/render": self._render_completions,
            "/v1/chat/completions/render": self._render_chat,
            "/v1/messages/render": self._render_messages,
            "/inference/v1/generate": self._generate_tokens,
        }
        # a new Responses store per start: vLLM keeps responses in its process
        responses = ResponsesApi(self.engine, store=self.store_responses)
        post["/v1/responses"] = responses.create
        post["/v1/responses/render"] = responses.render
        post["/v1/embeddings"] = EmbeddingsApi(self.engine).create
        for path, handler in post.items():
            app.router.add_post(path, handler)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        await self.engine.wait_resumed()
        self.engine.count_http_request(request.path, request.headers)
        anthropic = request.path.startswith("/v1/messages")
        status = self.engine.take_failure(request.path)
        try:
            if status is not None:
                raise _fail(f"injected failure (HTTP {status})", status)
            return await handler(request)
        except RequestError as exc:
            if anthropic:
                body = anthropic_error(str(exc), exc.status)
            else:
                body = openai_error(str(exc), exc.status, exc.param, exc.kind)
            return web.json_response(body, status=exc.status)

    # -- request parsing -------------------------------------------------------

    def _check_model(self, body: Mapping[str, Any]) -> str:
        """The model the request names (the base model when none): echoed in responses.

        :raises RequestError: 404, neither the base model nor a LoRA adapter.
        """
        model = body.get("model")
        if model is None:
            return self.engine.model
        if not isinstance(model, str) or not self.engine.is_served(model):
            raise _fail(f"The model `{model}` does not exist.", 404)
        return model

    def _lora(self, model: str) -> str | None:
        """The LoRA adapter a served model name selects, or ``None`` for the base model."""
        return None if model == self.engine.model else model

    def _max_tokens(self, value: object, prompt_len: int, *, required: bool = False) -> int:
        engine = self.engine
        if value is None:
            if required:
                raise _fail("max_tokens: Field required")
            value = engine.default_max_tokens
        if type(value) is not int:
            raise RequestError(f"max_tokens must be an integer, got {value!r}", 400, "max_tokens")
        if value < 1:
            # vLLM's sampling parameters refuse it, naming the field
            raise RequestError(f"max_tokens must be at least 1, got {value}.", 400, "max_tokens")
        if prompt_len + value > engine.max_model_len:
            raise _fail(
                f"This model's maximum context length is {engine.max_model_len} tokens. "
                f"However, you requested {prompt_len + value} tokens ({prompt_len} in the "
                f"messages, {value} in the completion)."
            )
        return value

    def _chat_max_tokens(self, body: Mapping[str, Any], prompt_len: int) -> int:
        limit = body.get("max_completion_tokens")
        return self._max_tokens(limit if limit is not None else body.get("max_tokens"), prompt_len)

    def _chat_tokens(self, body: Mapping[str, Any]) -> list[int]:
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise _fail("tools must be a list")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise _fail("messages must be a non-empty list")
        return self.engine.tokenizer.render_chat(
            messages,
            tools=tools,
            add_generation_prompt=bool(body.get("add_generation_prompt", True)),
            continue_final_message=bool(body.get("continue_final_message", False)),
        )

    def _prompts(self, body: Mapping[str, Any]) -> list[list[int]]:
        return self.engine.tokenizer.render_prompt(
            body.get("prompt"), add_special_tokens=bool(body.get("add_special_tokens", True))
        )

    # -- OpenAI-compatible generation -----------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._check_model(body)
        prompts = self._prompts(body)
        max_tokens = self._max_tokens(body.get("max_tokens"), max(len(p) for p in prompts))
        salt = _cache_salt(body)
        base = _request_id(request, body)
        rid, created, lora = f"cmpl-{base}", int(time.time()), self._lora(model)
        admitted: list[Request] = []
        try:
            for i, prompt in enumerate(prompts):
                sub_id = base if len(prompts) == 1 else f"{base}-{i}"
                admitted.append(self.engine.admit(sub_id, request.path, prompt, salt, lora))

            if not body.get("stream"):
                texts = [await r.run(max_tokens) for r in admitted]
                choices = [
                    {
                        "index": i,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                    for i, text in enumerate(texts)
                ]
                return web.json_response(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": choices,
                        "usage": _usage(admitted),
                    },
                    headers={"X-Request-Id": base},
                )

            token_ids = bool(body.get("return_token_ids"))

            def chunk(index: int, text: str, finish: str | None) -> bytes:
                choice: dict[str, Any] = {
                    "index": index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
                if token_ids:  # vLLM: the prompt's ids with the first chunk, then each delta's
                    choice["token_ids"] = [self._piece_id(text)] if text else []
                    if first[index]:
                        choice["prompt_token_ids"] = prompts[index]
                        first[index] = False
                return openai_sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [choice],
                    }
                )

            first = [True] * len(prompts)

            async def stream(resp: web.StreamResponse) -> None:
                for i, req in enumerate(admitted):
                    n = 0
                    async with contextlib.aclosing(req.generate(max_tokens)) as gen:
                        async for piece in gen:
                            n += 1
                            await resp.write(chunk(i, piece, "length" if n == max_tokens else None))
                if _include_usage(body):
                    usage = {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(admitted),
                    }
                    await resp.write(openai_sse(usage))
                await resp.write(openai_sse("[DONE]"))

            return await _stream(request, base, stream)
        finally:
            for req in admitted:
                req.release()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._check_model(body)
        tokens = self._chat_tokens(body)
        max_tokens = self._chat_max_tokens(body, len(tokens))
        salt = _cache_salt(body)
        base = _request_id(request, body)
        rid, created = f"chatcmpl-{base}", int(time.time())
        req = self.engine.admit(base, request.path, tokens, salt, self._lora(model))
        try:
            if not body.get("stream"):
                text = await req.run(max_tokens)
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
                return web.json_response(
                    {
                        "id": rid,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [choice],
                        "usage": _usage([req]),
                        "prompt_logprobs": None,
                    },
                    headers={"X-Request-Id": base},
                )

            def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return openai_sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [choice],
                    }
                )

            async def stream(resp: web.StreamResponse) -> None:
                await resp.write(chunk({"role": "assistant", "content": ""}, None))
                n = 0
                async with contextlib.aclosing(req.generate(max_tokens)) as gen:
                    async for piece in gen:
                        n += 1
                        await resp.write(
                            chunk({"content": piece}, "length" if n == max_tokens else None)
                        )
                if _include_usage(body):
                    usage = {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage([req]),
                    }
                    await resp.write(openai_sse(usage))
                await resp.write(openai_sse("[DONE]"))

            return await _stream(request, base, stream)
        finally:
            req.release()

    def _piece_id(self, piece: str) -> int:
        """The token id of a generated piece: its last token (the generate endpoint's too)."""
        return self.engine.tokenizer.encode(piece.strip())[-1]

    async def _generate_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._check_model(body)
        if body.get("stream"):
            raise _fail("the mock worker's generate endpoint does not stream")
        tokens = body.get("token_ids")
        if not isinstance(tokens, list) or not all(
            type(t) is int and 0 <= t < 2**32 for t in tokens
        ):
            raise _fail("token_ids must be a list of token ids")
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise _fail("sampling_params must be an object")
        max_tokens = self._max_tokens(params.get("max_tokens"), len(tokens))
        base = _request_id(request, body)
        req = self.engine.admit(base, request.path, tokens, _cache_salt(body), self._lora(model))
        try:
            text = await req.run(max_tokens)
        finally:
            req.release()
        # One id per generated piece (its last token), so len(token_ids) == max_tokens.
        out_ids = [self.engine.tokenizer.encode(p)[-1] for p in text.split(" ") if p][:max_tokens]
        choice = {"index": 0, "logprobs": None, "finish_reason": "length", "token_ids": out_ids}
        return web.json_response(
            {
                "request_id": base,
                "choices": [choice],
                "prompt_logprobs": None,
                "kv_transfer_params": None,
            },
            headers={"X-Request-Id": base},
        )

    # -- Anthropic Messages ----------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        if not isinstance(body.get("model"), str):
            raise _fail("model: Field required")
        model = self._check_model(body)
        tokens = self.engine.tokenizer.render_anthropic(body)
        max_tokens = self._max_tokens(body.get("max_tokens"), len(tokens), required=True)
        base = _request_id(request, body)
        mid = f"msg_{base}"
        tool = _forced_tool(body)
        req = self.engine.admit(base, request.path, tokens, _cache_salt(body), self._lora(model))
        pieces: list[str] | None = None
        if tool is not None:
            # The tool_choice forces a call: its arguments are the output, in
            # at most max_tokens pieces (the call is never cut short).
            call_input = tool_input(tool["input_schema"], tokens)
            pieces = split_pieces(json.dumps(call_input), max_tokens)
            # vLLM passes its own tool-call id through.
            call_id = f"chatcmpl-tool-{uuid.uuid4().hex}"
        stop_reason = "max_tokens" if tool is None else "tool_use"

        def usage() -> dict[str, Any]:
            return anthropic_usage(req.prompt_tokens, req.completion_tokens, req.cached_tokens)

        try:
            if not body.get("stream"):
                text = await req.run(max_tokens, pieces)
                block: dict[str, Any]
                if tool is None:
                    block = {"type": "text", "text": text}
                else:
                    block = {"type": "tool_use", "id": call_id, "name": tool["name"],
                             "input": call_input}  # fmt: skip
                return web.json_response(
                    {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [block],
                        "stop_reason": stop_reason,
                        "stop_sequence": None,
                        "usage": usage(),
                    },
                    headers={"X-Request-Id": base},
                )

            async def stream(resp: web.StreamResponse) -> None:
                message: dict[str, Any] = {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage(),
                }
                await resp.write(anthropic_sse({"type": "message_start", "message": message}))
                if tool is None:
                    block: dict[str, Any] = {"type": "text", "text": ""}
                else:
                    block = {"type": "tool_use", "id": call_id, "name": tool["name"], "input": {}}
                start = {"type": "content_block_start", "index": 0, "content_block": block}
                await resp.write(anthropic_sse(start))
                await resp.write(anthropic_sse({"type": "ping"}))
                async with contextlib.aclosing(req.generate(max_tokens, pieces)) as gen:
                    async for piece in gen:
                        if tool is None:
                            delta = {"type": "text_delta", "text": piece}
                        else:
                            delta = {"type": "input_json_delta", "partial_json": piece}
                        event = {"type": "content_block_delta", "index": 0, "delta": delta}
                        await resp.write(anthropic_sse(event))
                await resp.write(anthropic_sse({"type": "content_block_stop", "index": 0}))
                stop = {"stop_reason": stop_reason, "stop_sequence": None}
                await resp.write(
                    anthropic_sse({"type": "message_delta", "delta": stop, "usage": usage()})
                )
                await resp.write(anthropic_sse({"type": "message_stop"}))

            return await _stream(request, base, stream)
        finally:
            req.release()

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body)
        return web.json_response(
            {"input_tokens": len(self.engine.tokenizer.render_anthropic(body))}
        )

    # -- tokenizer and render endpoints -------------------------------------------------

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body)
        tokenizer = self.engine.tokenizer
        if "messages" in body:
            tokens = self._chat_tokens(body)
        elif isinstance(body.get("prompt"), str):
            add_special = bool(body.get("add_special_tokens", True))
            tokens = tokenizer.encode(body["prompt"], add_special_tokens=add_special)
        else:
            raise _fail("either 'prompt' (a string) or 'messages' is required")
        strs = [tokenizer.decode([t]) for t in tokens] if body.get("return_token_strs") else None
        return web.json_response(
            {
                "count": len(tokens),
                "max_model_len": self.engine.max_model_len,
                "tokens": tokens,
                "token_strs": strs,
            }
        )

    async def _detokenize(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise _fail("tokens must be a list of token ids")
        return web.json_response({"prompt": self.engine.tokenizer.decode(tokens)})

    def _rendered(self, prefix: str, tokens: list[int], body: Mapping[str, Any]) -> dict[str, Any]:
        max_tokens = self._chat_max_tokens(body, len(tokens))
        _cache_salt(body)
        return generate_request(
            request_id=f"{prefix}-{uuid.uuid4().hex[:24]}",
            token_ids=tokens,
            body=body,
            max_tokens=max_tokens,
        )

    async def _render_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body)
        return web.json_response([self._rendered("cmpl", p, body) for p in self._prompts(body)])

    async def _render_chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body)
        return web.json_response(self._rendered("chatcmpl", self._chat_tokens(body), body))

    async def _render_messages(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._check_model(body)
        tokens = self.engine.tokenizer.render_anthropic(body)
        # vLLM renders a Messages request through its chat path: same id prefix.
        return web.json_response(self._rendered("chatcmpl", tokens, body))

    # -- informational endpoints ---------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        engine, created = self.engine, int(time.time())

        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": engine.max_model_len,
                "permission": [],
            }

        cards = [card(engine.model, engine.model, None)]
        cards += [card(name, engine.lora_path(name), engine.model) for name in engine.lora_ids]
        return web.json_response({"object": "list", "data": cards})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        s = self.engine.stats()
        label = "{model_name=" + json.dumps(self.engine.model) + "}"
        lines = [
            f"vllm:num_requests_running{label} {s.running}",
            f"vllm:num_requests_waiting{label} 0",
            f"vllm:kv_cache_usage_perc{label} {s.cached_blocks / s.num_blocks}",
            f"vllm:prefix_cache_queries_total{label} {s.prompt_tokens}",
            f"vllm:prefix_cache_hits_total{label} {s.cached_tokens}",
            f"vllm:generation_tokens_total{label} {s.completion_tokens}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

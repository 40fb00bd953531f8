"""Request preparation: from an HTTP request to the call to forward and the request to route.

For a generation request (:meth:`Preparer.prepare`):

1. read the body (at most ``max_body_size`` bytes, else 413) and parse it
   (else 400);
2. check its structure: an Anthropic body fully
   (:func:`~kvroute.proxy.anthropic.validate_messages`), an OpenAI body's
   ``messages`` or ``prompt``;
3. map and check the model (:class:`~kvroute.proxy.models.Models`, else 404);
4. read the agent hints (session, priority, cache_control, ...; see
   :mod:`~kvroute.proxy.hints`);
5. for a streamed OpenAI request, ask for the usage chunk
   (``stream_options.include_usage``) if the client did not; it is
   stripped again on the way back;
6. tokenize the prompt as the engine will (:meth:`Preparer.tokens`):
   locally with the :class:`~kvroute.proxy.tokenize.LocalTokenizer`, off
   the event loop; else through a worker's render endpoint, or its
   ``/tokenize`` once a worker answered 404 for the render endpoint (for
   good), trying the healthy workers in turn;
7. measure the cache breakpoints that do not close the prompt, by
   tokenizing the request cut after each (event-free router only);
8. build the router's :class:`~kvroute.request.Request`.

The body is sent on as the client's bytes unless steps 3 or 5 changed it.
The headers sent on are the body's type, the request id (the client's
``X-Request-Id``, else a new one) and the client's credentials and API
headers; with ``upstream_api_key``, ``Authorization: Bearer`` with it and
none of the client's credential headers (``Authorization``, ``x-api-key``,
cookies...).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Final

from aiohttp import web

from ..request import CacheControl, Request
from ..router import Router
from .anthropic import anthropic_hints, validate_messages
from .bodies import BodyError, TokenIds, TooManyTokenIds, encode_body, parse_body, prepend_key
from .call import Call, Kind
from .config import ProxyConfig
from .errors import ProxyError, invalid, lacks_endpoint, upstream_message
from .hints import Hints, common_prefix, pinned_breakpoints
from .migration import ask_for_token_ids
from .models import Models
from .openai import check_max_tokens, openai_hints
from .responses import check_responses
from .tokenize import (
    RENDER_PATHS,
    LocalTokenizer,
    TokenIdList,
    answer_token_ids,
    local_tokens,
    prompt_token_ids,
    render_token_ids,
    tokenize_body,
    tokenize_token_ids,
)
from .upstream import AttemptFailed, Upstream

#: New request ids: one random half per process, then a counter.
_ID_PREFIX: Final = uuid.uuid4().hex[:16]
_ID_COUNTER: Final = itertools.count()

__all__ = ["Prepared", "Preparer"]

log = logging.getLogger("kvroute.proxy")

# Prompts this long are hashed off the event loop.
_HASH_ASIDE: Final = 1 << 16
# Client headers passed on to workers (besides the body's type and the request id).
_FORWARDED: Final = ("authorization", "x-api-key", "anthropic-version", "anthropic-beta", "accept")
# Headers that carry a client's credentials: when the proxy has credentials of
# its own, none of these goes upstream, whichever part added it.
_CREDENTIALS: Final = frozenset(
    {"authorization", "x-api-key", "api-key", "proxy-authorization", "cookie", "x-goog-api-key"}
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A generation request, ready: the call to forward and the request to route.

    :param call: what goes to a worker, the same for every attempt.
    :param request: what the router routes (tokens, hints, breakpoints).
    :param tokenize_seconds: how long tokenizing the prompt (and measuring its
        breakpoints) took.
    """

    call: Call
    request: Request
    tokenize_seconds: float | None = None


class Preparer:
    """Reads, checks and tokenizes requests for the proxy.

    :param config: body limit, session header, tokenizing mode, credentials,
        ``speculative_prefill``.
    :param router: routing request ids come from here; whether it has KV
        events decides whether breakpoints are measured.
    :param models: maps and checks the body's model.
    :param upstream: asks workers for token ids when there is no local tokenizer.
    :param tokenizer: the local tokenizer, or None.
    """

    def __init__(
        self,
        config: ProxyConfig,
        router: Router,
        models: Models,
        upstream: Upstream,
        tokenizer: LocalTokenizer | None,
    ) -> None:
        self.config = config
        self.router = router
        self.models = models
        self.upstream = upstream
        self.tokenizer = tokenizer
        self._ids = itertools.count()
        #: Render endpoints a worker answered 404 for: ``/tokenize`` is used instead.
        self.no_render: set[str] = set()
        if config.tokenize_with == "tokenize":
            self.no_render.update(RENDER_PATHS.values())

    async def prepare(self, request: web.Request, kind: Kind) -> Prepared:
        """Read, check and tokenize a generation request.

        :raises ProxyError: 4xx for the client's mistakes (see the module
            docstring); 502 / 503 when the workers cannot tokenize it
            (see :meth:`tokens`).
        """
        call, hints = await self._read(request, kind)
        t0 = time.perf_counter()
        tokens, breakpoints = await self._tokens_and_breakpoints(call, hints)
        tokenized = time.perf_counter() - t0
        limit = self.config.max_prompt_tokens
        if limit is not None and len(tokens) > limit:
            raise self._too_long(len(tokens))
        # a Responses conversation continues in the worker's memory: nothing to warm
        speculative = kind != "responses" and (
            hints.speculative_prefill or self.config.speculative_prefill
        )
        try:
            routed = Request(
                next(self._ids),
                tokens=tokens,
                session_id=hints.session_id,
                priority=hints.priority,
                lora_name=self.models.lora_name(call.body.get("model")),
                cache_salt=hints.cache_salt,
                expected_output_tokens=hints.expected_output_tokens,
                cache_control=breakpoints,
                speculative_prefill=speculative and hints.session_id is not None,
            )
        except (TypeError, ValueError) as e:
            raise ProxyError(400, str(e)) from None
        if len(tokens) >= _HASH_ASIDE:
            # Hashing a long prompt takes milliseconds per 100k tokens: off the
            # loop (the kvroute hashing releases the GIL), as the router would.
            hashes = await asyncio.to_thread(
                self.router.hashing,
                tokens,
                self.router.block_size,
                lora_name=routed.lora_name,
                cache_namespace=routed.cache_salt,
            )
            routed = replace(routed, block_hashes=hashes)
        return Prepared(call, routed, tokenized)

    async def _read(self, request: web.Request, kind: Kind) -> tuple[Call, Hints]:
        """Steps 1 to 5: the call to forward and the request's hints.

        :raises ProxyError: 413, 400 or 404 (see the module docstring).
        """
        body, raw = await self.read_json(request, token_ids=kind == "completions")
        if kind == "messages":
            validate_messages(body)
        elif kind == "chat":
            messages = body.get("messages")
            if messages is None:
                raise invalid("messages: Field required (a non-empty list)")
            if not isinstance(messages, list) or not messages:
                raise invalid("messages: must be a non-empty list")
        elif kind == "completions" and "prompt" not in body:
            raise invalid("prompt: Field required")
        elif kind == "responses":
            check_responses(body)
        if kind != "messages":
            check_max_tokens(body)
        changed = self.models.resolve(body)
        header = self.config.session_header
        if kind == "messages":
            hints = anthropic_hints(body, request.headers, header)
        else:
            hints = openai_hints(body, request.headers, header)
            key = body.get("prompt_cache_key")
            if kind == "responses" and hints.session_id is None and isinstance(key, str) and key:
                # OpenAI's cache-routing key; Codex sends its conversation's id
                hints = replace(hints, session_id=key)
        stream = body.get("stream") is True
        strip_usage = added = False
        if stream and kind in ("completions", "chat"):
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Ask for the usage chunk (token counts, cache hits); the client
                # did not, so it is not passed on.
                added = "stream_options" not in body
                body["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
                strip_usage = True
                changed = changed or not added
        strip_ids = self.config.migrations > 0 and stream and ask_for_token_ids(kind, body)
        if changed or strip_ids:
            data = encode_body(body)
        elif added:  # the one change: the client's bytes with the key put in front
            data = prepend_key(raw, "stream_options", body["stream_options"])
        else:
            data = raw
        client_id = self.client_id(request)
        call = Call(
            kind, request.path, body, data, stream, strip_usage, client_id,
            self.forward_headers(request, client_id), strip_token_ids=strip_ids,
        )  # fmt: skip
        return call, hints

    async def read_json(
        self, request: web.Request, *, token_ids: bool = False
    ) -> tuple[dict[str, Any], bytes]:
        """The request's body: parsed (a big one off the loop, see :mod:`.bodies`), and as it came.

        :param token_ids: a big top-level ``prompt`` of token ids is parsed
            into a :class:`~kvroute.proxy.bodies.TokenIds` (completions).
        :raises ProxyError: 413 over ``max_body_size``; 400 if it is not a JSON
            object, or its token-id prompt is longer than ``max_prompt_tokens``.
        """
        limit = self.config.max_body_size
        too_big = ProxyError(
            413, f"request body too large (limit {limit} bytes)", code="request_too_large"
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_big
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_big from None
        try:
            body = await parse_body(
                raw, token_ids=token_ids, max_ids=self.config.max_prompt_tokens
            )
        except TooManyTokenIds as e:
            raise self._too_long(e.count) from None
        except BodyError as e:
            raise ProxyError(400, str(e), code="invalid_json") from None
        return body, raw

    def _too_long(self, count: int) -> ProxyError:
        return ProxyError(
            400,
            f"the prompt has {count} tokens, more than this proxy accepts"
            f" (max_prompt_tokens={self.config.max_prompt_tokens})",
            code="context_length_exceeded",
            retry=False,
        )

    @staticmethod
    def client_id(request: web.Request) -> str:
        """The request id: the client's ``X-Request-Id``, else a new one.

        A new id is 32 hex digits like a UUID's: this process's random half,
        then a counter (a random UUID per request costs a system call).
        """
        return request.headers.get("X-Request-Id") or f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"

    def forward_headers(self, request: web.Request, client_id: str) -> dict[str, str]:
        """The headers sent to a worker with the request's body."""
        headers = {"Content-Type": "application/json", "X-Request-Id": client_id}
        for name in _FORWARDED:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        if self.config.upstream_api_key:
            headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIALS}
            headers["authorization"] = f"Bearer {self.config.upstream_api_key}"
        return headers

    # -- tokens --------------------------------------------------------------------------

    async def tokens(self, call: Call) -> TokenIdList:
        """The token ids of ``call``'s prompt, as the engine will see them (the first prompt's).

        :raises ProxyError: 400 for a prompt that cannot be rendered (or the
            workers' own 4xx for it); 502 if the workers asked serve neither
            render endpoint nor ``/tokenize`` (no retry can help: the proxy
            needs a local tokenizer); 503 if no healthy worker answered.
        """
        if call.kind == "completions":
            prompt = call.body.get("prompt")
            if isinstance(prompt, TokenIds):
                # a numpy array: the router and Request take arrays as they are
                return prompt.ids
            ids = prompt_token_ids(call.body)
            if ids is not None:
                return ids
        if self.tokenizer is not None:
            loop = asyncio.get_running_loop()
            # A long prompt takes milliseconds to render and encode: off the loop.
            return await loop.run_in_executor(
                None, local_tokens, self.tokenizer, call.kind, call.body
            )
        return await self._worker_tokens(call)

    async def _worker_tokens(self, call: Call) -> TokenIdList:
        """Token ids from a worker's render endpoint, else its ``/tokenize``."""
        pool = self.upstream.pool
        tried: set[int] = set()
        last = "no healthy worker"
        lacking: list[int] = []  # workers that serve neither endpoint
        while (w := pool.pick(tried)) is not None:
            render = RENDER_PATHS[call.kind]
            use_render = render not in self.no_render
            path = render if use_render else "/tokenize"
            data = call.data if use_render else json.dumps(tokenize_body(call.kind, call.body))
            if use_render and call.body.get("previous_response_id") is not None:
                # vLLM's Responses render is stateless: the request's own prompt only
                own = {k: v for k, v in call.body.items() if k != "previous_response_id"}
                data = json.dumps(own, ensure_ascii=False)
            try:
                status, text, _ = await self.upstream.exchange(w, path, data, call.headers)
            except AttemptFailed as e:
                tried.add(w)
                last = f"worker {w}: {e.reason}"
                continue
            if status == 200:
                ids = answer_token_ids(call.kind, use_render, text)
                if ids is not None:
                    return ids
            try:
                answer = json.loads(text)
            except ValueError:
                answer = None
            message = upstream_message(answer)
            if lacks_endpoint(status, message):
                if use_render:
                    log.info("worker %d has no %s; tokenizing with /tokenize", w, render)
                    self.no_render.add(render)
                    continue
                # Not the prompt's fault: passing this 404 on would tell the
                # client its endpoint does not exist.
                tried.add(w)
                lacking.append(w)
                continue
            if status >= 500:
                tried.add(w)
                last = f"worker {w} answered {status} to {path}"
                continue
            if status >= 400:
                err = answer.get("error") if isinstance(answer, dict) else None
                param = err.get("param") if isinstance(err, dict) else None
                raise ProxyError(
                    status,
                    message or f"the worker refused the prompt ({status})",
                    param=param if isinstance(param, str) else None,
                )
            try:
                if use_render:
                    return render_token_ids(call.kind, answer)
                return tokenize_token_ids(answer)
            except ValueError as e:
                tried.add(w)
                last = f"worker {w}: {e}"
        if lacking:
            raise self._cannot_tokenize(call.kind, lacking)
        raise ProxyError(503, f"cannot tokenize the request: {last}", code="no_worker_available")

    def _cannot_tokenize(self, kind: Kind, lacking: list[int]) -> ProxyError:
        if len(lacking) == 1:
            who = f"worker {lacking[0]} serves"
        else:
            who = f"workers {', '.join(map(str, sorted(lacking)))} serve"
        if self.config.tokenize_with == "tokenize":
            what = "no /tokenize"
        else:
            what = f"neither {RENDER_PATHS[kind]} nor /tokenize"
        return ProxyError(
            502,
            f"the routing proxy cannot tokenize the request: {who} {what}; start the"
            " proxy with --tokenizer (the model's tokenizer.json and chat template)",
            code="tokenizer_unavailable",
            retry=False,
        )

    async def _prefix_tokens(self, call: Call, prefix: dict[str, Any]) -> TokenIdList | None:
        """The tokens of a breakpoint's prefix body (None if it cannot be tokenized)."""
        data = json.dumps(prefix, ensure_ascii=False).encode()
        try:
            return await self.tokens(replace(call, body=prefix, data=data))
        except ProxyError as e:
            log.info("request %s: a cache breakpoint's prefix is not pinned: %s", call.client_id, e)
            return None

    async def _tokens_and_breakpoints(
        self, call: Call, hints: Hints
    ) -> tuple[TokenIdList, tuple[CacheControl, ...]]:
        """The prompt's tokens and its cache breakpoints, each with its prefix's length.

        A breakpoint that does not close the prompt is measured by tokenizing
        the request cut after its block (beside the request itself): the
        tokens the two share are the prefix it caches. Only an event-free
        router uses the lengths (to keep each prefix predicted for its TTL);
        with KV events the workers report what they hold, and the
        breakpoints only pin the session, so nothing is measured.
        """
        pinned = pinned_breakpoints(hints.cache_control)
        if self.router.kv_events:
            return await self.tokens(call), tuple(CacheControl(b.ttl) for b in pinned)
        cuts = [self._prefix_tokens(call, b.prefix) for b in pinned if b.prefix is not None]
        tokens, *prefixes = await asyncio.gather(self.tokens(call), *cuts)
        assert tokens is not None
        found = iter(prefixes)
        breakpoints = []
        for b in pinned:
            if b.prefix is None:
                breakpoints.append(CacheControl(b.ttl))
            elif (prefix := next(found)) is not None:
                breakpoints.append(CacheControl(b.ttl, common_prefix(tokens, prefix)))
        return tokens, tuple(breakpoints)

"""Mid-stream migration: a stream whose worker died goes on from another worker.

When a worker dies mid-stream (its connection drops, its stream breaks), the
client has part of an answer. Where the engine allows it, the proxy sends a
*continuation* to another worker — the prompt plus what was generated so
far, with the output budget reduced by it — and passes its events on in the
same stream, so the client sees one answer (Dynamo calls this request
migration). What can be continued, and how exactly:

- ``/v1/completions`` with a token-id prompt: the proxy asks the worker for
  the generated token ids (vLLM's ``return_token_ids``; stripped again from
  the chunks when the client did not ask) and continues from the prompt's
  ids plus the generated ids: **token-exact**. A worker that returns no ids
  (another engine, an older vLLM) is not continued.
- ``/v1/completions`` with a text prompt: continues from the prompt's text
  plus the generated text: **text-exact** (the engine tokenizes the joined
  text; where a token straddled the cut it may be tokenized otherwise).
- ``/v1/chat/completions``: continues with the generated text as a final
  assistant message, ``continue_final_message: true`` and
  ``add_generation_prompt: false`` (vLLM's options): text-exact, the chat
  template's rendering of a partial assistant turn.

Never continued (the stream ends with an error event, as without migration):
``/v1/messages``; ``n`` or ``best_of`` above 1; ``echo``; several prompts;
``prompt_logprobs``; structured output (``response_format`` other than text,
``guided_*``, ``structured_outputs``); a forced ``tool_choice``; a stream
whose output already holds a tool call or reasoning (a parser's state cannot
be carried over); a non-streamed request (its answer is retried whole by the
attempt loop instead). A sampled continuation is a new sample: with a
``seed`` it is not the answer the first worker would have given. A stop
string split across the cut is not seen. The output budget is reduced by the
tokens generated: exactly with token ids, else by the content chunks seen
(vLLM sends one token per chunk but for held-back partial characters).

The continuation's events are stitched in: its chunks take the first
stream's ``id`` and ``created``, a chat continuation's opening role-only
chunk is dropped, and its usage counts the original prompt and all the
generated tokens (the prefix-cache figure is the continuation's, at most
the prompt). The continuation is routed like the request (its prompt's
blocks), away from the workers that failed it; it is a new request to the
router, with a lifecycle of its own. At most ``migrations`` continuations
per stream. Counted in
``kvroute_proxy_migrations_total{outcome="continued"|"failed"|"not_migratable"}``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, Literal

import aiohttp
import numpy as np
from aiohttp import web

from ..request import Decision, Request
from .bodies import TokenIds, encode_body
from .call import Call
from .config import ProxyConfig
from .errors import ProxyError, error_body, upstream_message
from .hints import Usage
from .openai import OpenAIStream
from .sse import encode_event
from .upstream import CONNECTION_ERRORS, AttemptFailed, Lifecycle, Upstream

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "Migrator",
    "Outcome",
    "Transcript",
    "ask_for_token_ids",
    "strip_token_ids",
    "why_not",
]

log = logging.getLogger("kvroute.proxy")

Outcome = Literal["continued", "failed", "not_migratable"]

# vLLM's default output budget of a completions request.
_COMPLETIONS_MAX_TOKENS: Final = 16
_STRUCTURED: Final = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
)
_ID_FIELDS: Final = ("token_ids", "prompt_token_ids")

#: Writes a continuation's usage into the cache metrics: (call, decision, usage).
Account = Callable[[Call, Decision, Usage | None, bool], None]


def _token_prompt(body: Mapping[str, Any]) -> bool:
    prompt = body.get("prompt")
    if isinstance(prompt, TokenIds):
        return True
    return (
        isinstance(prompt, list) and bool(prompt) and all(type(t) is int and t >= 0 for t in prompt)
    )


def why_not(call: Call) -> str | None:
    """Why ``call``'s stream could never be continued elsewhere, or None if it may be.

    >>> why_not(Call("messages", "/v1/messages", {}, b"", True, False, "r", {}))
    '/v1/messages streams are not continued'
    """
    body = call.body
    if not call.stream:
        return "not streamed"
    if call.kind == "messages":
        return "/v1/messages streams are not continued"
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            return f"{key} > 1"
    if body.get("echo") or body.get("prompt_logprobs"):
        return "echo or prompt_logprobs"
    fmt = body.get("response_format")
    if any(body.get(k) is not None for k in _STRUCTURED) or (
        isinstance(fmt, dict) and fmt.get("type") not in (None, "text")
    ):
        return "structured output"
    if call.kind == "completions":
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or _token_prompt(body)):
            return "not a single prompt"
    elif body.get("tool_choice") not in (None, "auto", "none"):
        return "a forced tool choice"
    return None


def ask_for_token_ids(kind: str, body: dict[str, Any]) -> bool:
    """Ask the worker for a token-id prompt's generated ids, unless the client did.

    :returns: whether the proxy asked (so they are to be stripped again).
    """
    if kind != "completions" or body.get("return_token_ids") or not _token_prompt(body):
        return False
    body["return_token_ids"] = True
    return True


def strip_token_ids(obj: dict[str, Any]) -> dict[str, Any]:
    """A chunk without the token ids the proxy asked for (a copy, when it had any)."""
    choices = obj.get("choices")
    if not any(k in obj for k in _ID_FIELDS) and not (
        isinstance(choices, list)
        and any(isinstance(c, dict) and any(k in c for k in _ID_FIELDS) for c in choices)
    ):
        return obj
    out = {k: v for k, v in obj.items() if k not in _ID_FIELDS}
    if isinstance(choices, list):
        out["choices"] = [
            {k: v for k, v in c.items() if k not in _ID_FIELDS} if isinstance(c, dict) else c
            for c in choices
        ]
    return out


class Transcript:
    """What a stream has given its client so far (fed each event's JSON, as the worker sent it).

    :param kind: the endpoint.
    :param ids: collect the generated token ids (the proxy asked for them).
    """

    def __init__(self, kind: str, *, ids: bool = False) -> None:
        self.kind = kind
        #: The first chunk's ``id`` and ``created``.
        self.id: object = None
        self.created: object = None
        #: The generated text, piece by piece.
        self.text: list[str] = []
        #: The generated token ids, when collected (None: not, or a chunk lacked them).
        self.ids: list[int] | None = [] if ids else None
        self._want_ids = ids
        #: Chunks with generated content.
        self.chunks = 0
        #: Why the stream can no longer be continued, or None.
        self.blocked: str | None = None
        #: A ``finish_reason`` went by: the answer is complete.
        self.finished = False

    def feed(self, obj: object) -> None:
        """Record one event."""
        if not isinstance(obj, dict):
            return
        if self.id is None and obj.get("id") is not None:
            self.id, self.created = obj.get("id"), obj.get("created")
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for c in choices:
            if not isinstance(c, dict):
                continue
            if c.get("index", 0) != 0:
                self.blocked = "more than one choice"
            if c.get("finish_reason"):
                self.finished = True
            if self.kind == "completions":
                text = c.get("text")
            else:
                delta = c.get("delta")
                delta = delta if isinstance(delta, dict) else {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.blocked = "a tool call was under way"
                if delta.get("reasoning_content") or delta.get("reasoning"):
                    self.blocked = "reasoning was under way"
                text = delta.get("content")
            if isinstance(text, str) and text:
                self.text.append(text)
                self.chunks += 1
            if self.ids is not None:
                ids = c.get("token_ids")
                if isinstance(ids, list) and all(type(t) is int for t in ids):
                    self.ids.extend(ids)
                elif text:
                    self.ids = None  # the worker gives no ids: no token-exact continuation
        if self._want_ids and self.ids is None:
            self.blocked = self.blocked or "the worker gave no token ids"

    @property
    def generated(self) -> int:
        """Tokens generated so far: the ids' count, else the content chunks."""
        return len(self.ids) if self.ids is not None else self.chunks


class Migrator:
    """Continues broken streams on other workers.

    :param upstream: routes and sends each continuation (the attempt loop).
    :param config: ``migrations`` (0: never).
    :param registry: a Prometheus registry to count migrations into, or None.
    """

    def __init__(
        self, upstream: Upstream, config: ProxyConfig, registry: CollectorRegistry | None = None
    ) -> None:
        self.upstream = upstream
        self.config = config
        #: Migrations so far, by outcome.
        self.outcomes: dict[Outcome, int] = {"continued": 0, "failed": 0, "not_migratable": 0}
        self._counter: Any = None
        if registry is not None:
            from prometheus_client import Counter

            self._counter = Counter(
                "kvroute_proxy_migrations",
                "Streams whose worker failed mid-way, by what became of them (continued on"
                " another worker, failed to, or not continuable)",
                ["outcome"],
                registry=registry,
            )

    def transcript(self, call: Call) -> Transcript | None:
        """A transcript to feed ``call``'s stream events, if it may ever be continued."""
        if self.config.migrations == 0 or why_not(call) is not None:
            return None
        return Transcript(call.kind, ids=call.kind == "completions" and _token_prompt(call.body))

    def _count(self, outcome: Outcome) -> None:
        self.outcomes[outcome] += 1
        if self._counter is not None:
            self._counter.labels(outcome).inc()

    async def resume(
        self,
        request: web.Request,
        call: Call,
        routed: Request | None,
        decision: Decision,
        transcript: Transcript | None,
        resp: web.StreamResponse,
        account: Account,
    ) -> bool:
        """Finish the client's broken stream from another worker.

        :param request: the client's request (its stream is ``resp``).
        :param routed: the request as routed (its prompt's tokens).
        :param decision: the attempt that broke.
        :param transcript: what the stream gave so far.
        :returns: whether the stream was ended here (continued to its end, or
            ended with an error event after a continuation began); False:
            nothing was written, the caller ends it.
        """
        reason = why_not(call) if transcript is None else transcript.blocked
        if transcript is None or routed is None or reason is not None:
            self._count("not_migratable")
            log.info("request %s: not continued elsewhere: %s", call.client_id, reason)
            return False
        if transcript.finished:
            # The answer was whole; only its tail (usage, [DONE]) was lost.
            with contextlib.suppress(ConnectionError):
                await resp.write(b"data: [DONE]\n\n")
            self._count("continued")
            return True
        failed = [decision.worker]
        wrote = False
        last = "no continuation"
        for k in range(1, self.config.migrations + 1):
            cont = self._continuation(call, transcript, k)
            if cont is None:
                last = "the output budget was spent"
                break
            again = replace(
                routed,
                request_id=f"{routed.request_id}-m{k}",
                speculative_prefill=False,
            )
            state = _Pumped(cont, _Stitch(call, transcript, routed), resp)
            try:
                await self.upstream.send(again, cont, state.handler(self), exclude=failed)
            except (AttemptFailed, ProxyError) as e:
                last = getattr(e, "reason", None) or str(e)
                break
            wrote = wrote or state.wrote
            assert state.decision is not None
            if state.done:
                account(call, state.decision, state.usage, False)
                self._count("continued")
                log.info(
                    "request %s: stream continued on worker %d after worker %d failed",
                    call.client_id, state.decision.worker, failed[-1],
                )  # fmt: skip
                return True
            if state.refused is not None:
                last = state.refused
                break
            failed.append(state.decision.worker)
            last = state.broke or "the continuation broke"
        self._count("failed")
        log.warning("request %s: the stream could not be continued: %s", call.client_id, last)
        if not wrote:
            return False
        err = ProxyError(502, f"the worker failed mid-stream and its continuation failed: {last}")
        with contextlib.suppress(ConnectionError):
            await resp.write(encode_event(error_body(call.api, err)))
        return True

    def _continuation(self, call: Call, t: Transcript, k: int) -> Call | None:
        """The call continuing ``t``'s stream, or None when nothing is left to generate."""
        body = dict(call.body)
        before = t.generated
        text = "".join(t.text)
        if call.kind == "completions":
            prompt = body["prompt"]
            if t.ids is not None:
                gen = [int(i) for i in t.ids]
                if isinstance(prompt, TokenIds):
                    tail = ("," + ",".join(map(str, gen))).encode() if gen else b""
                    raw = bytes(prompt.raw).rstrip()[:-1] + tail + b"]"
                    ids = np.concatenate([prompt.ids, np.asarray(gen, dtype=np.int64)])
                    body["prompt"] = TokenIds(ids, raw)
                else:
                    body["prompt"] = [*prompt, *gen]
            else:
                body["prompt"] = prompt + text
            limit = body.get("max_tokens")
            budget = _COMPLETIONS_MAX_TOKENS if limit is None else limit
            if not isinstance(budget, int) or budget - before <= 0:
                return None
            body["max_tokens"] = budget - before
        else:
            if text:
                body["messages"] = [*body["messages"], {"role": "assistant", "content": text}]
                body["add_generation_prompt"] = False
                body["continue_final_message"] = True
            for key in ("max_completion_tokens", "max_tokens"):
                limit = body.get(key)
                if isinstance(limit, int):
                    if limit - before <= 0:
                        return None
                    body[key] = limit - before
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = max(body["min_tokens"] - before, 0)
        rid = f"{call.client_id}-m{k}"
        headers = {**call.headers, "X-Request-Id": rid}
        return replace(call, body=body, data=encode_body(body), headers=headers)

    async def _pump(
        self,
        state: _Pumped,
        decision: Decision,
        response: aiohttp.ClientResponse,
        lc: Lifecycle,
    ) -> _Pumped:
        """Pass one continuation's events on to the client's stream."""
        cont, stitch, resp = state.call, state.stitch, state.resp
        state.decision = decision
        pool = self.upstream.pool
        if response.status >= 400:
            try:
                body = await response.read()
            except CONNECTION_ERRORS:
                body = b""
            message = None
            with contextlib.suppress(ValueError):
                import json

                message = upstream_message(json.loads(body))
            state.refused = f"worker {decision.worker} answered {response.status}: {message}"
            lc.fail()
            return state
        if response.content_type != "text/event-stream":
            state.refused = f"worker {decision.worker} did not stream"
            lc.fail()
            return state
        watcher = OpenAIStream(
            strip_usage=cont.strip_usage, on_event=stitch.transcript.feed, transform=stitch
        )
        while True:
            try:
                chunk = await response.content.readany()
            except (*CONNECTION_ERRORS, aiohttp.ClientPayloadError) as e:
                reason = f"stream broke: {type(e).__name__} {e}".strip()
                if isinstance(e, CONNECTION_ERRORS):
                    pool.mark_down(decision.worker, reason)
                if not state.wrote:
                    raise AttemptFailed(reason) from None  # another worker may serve it
                lc.worker_failed = True
                lc.fail()
                self.upstream.metrics.upstream_errors.labels(str(decision.worker)).inc()
                state.broke = f"worker {decision.worker}: {reason}"
                return state
            out = watcher.feed(chunk) if chunk else watcher.flush()
            if watcher.first_token:
                lc.first_token()
            if out:
                state.wrote = True
                await resp.write(out)
            if not chunk:
                break
        if watcher.error is not None:
            lc.worker_failed = True
            lc.fail()
            state.refused = f"worker {decision.worker} reported: {watcher.error}"
            return state
        state.usage = watcher.usage
        state.done = True
        lc.finish()
        return state


class _Pumped:
    """One continuation: what it sends, where it writes, and how it went."""

    def __init__(self, call: Call, stitch: _Stitch, resp: web.StreamResponse) -> None:
        self.call = call
        self.stitch = stitch
        self.resp = resp
        self.decision: Decision | None = None
        self.wrote = False
        self.done = False
        self.usage: Usage | None = None
        self.broke: str | None = None
        self.refused: str | None = None

    def handler(
        self, migrator: Migrator
    ) -> Callable[[Decision, aiohttp.ClientResponse, Lifecycle], Awaitable[_Pumped]]:
        """The attempt handler (:data:`~kvroute.proxy.upstream.Handler`) that pumps it."""

        async def handle(d: Decision, response: aiohttp.ClientResponse, lc: Lifecycle) -> _Pumped:
            return await migrator._pump(self, d, response, lc)

        return handle


class _Stitch:
    """Rewrites a continuation's chunks into the first stream's (an ``OpenAIStream`` transform)."""

    def __init__(self, call: Call, transcript: Transcript, routed: Request) -> None:
        self.call = call
        self.transcript = transcript
        self.before = transcript.generated
        self.prompt_tokens = len(routed.tokens) if routed.tokens is not None else None

    def __call__(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        out = strip_token_ids(obj) if self.call.strip_token_ids else dict(obj)
        if out is obj:
            out = dict(obj)
        t = self.transcript
        if t.id is not None and "id" in out:
            out["id"] = t.id
            if t.created is not None and "created" in out:
                out["created"] = t.created
        choices = out.get("choices")
        if isinstance(choices, list) and self.call.kind == "chat":
            kept = []
            for c in choices:
                if isinstance(c, dict) and isinstance(c.get("delta"), dict):
                    delta = {k: v for k, v in c["delta"].items() if k != "role"}
                    if (
                        not any(v not in (None, "", []) for v in delta.values())
                        and c.get("finish_reason") is None
                    ):
                        continue  # the continuation's opening role chunk
                    c = {**c, "delta": delta}
                kept.append(c)
            if not kept and choices and out.get("usage") is None:
                return None
            out["choices"] = kept
        usage = out.get("usage")
        if isinstance(usage, dict) and self.prompt_tokens is not None:
            usage = dict(usage)
            done = usage.get("completion_tokens")
            if isinstance(done, int):
                usage["completion_tokens"] = done + self.before
            usage["prompt_tokens"] = self.prompt_tokens
            usage["total_tokens"] = self.prompt_tokens + usage.get("completion_tokens", 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                cached = min(details["cached_tokens"], self.prompt_tokens)
                usage["prompt_tokens_details"] = {**details, "cached_tokens": cached}
            out["usage"] = usage
        return out

"""Relay: a worker's answer passed on to the client, its usage and cache figures counted.

:meth:`Relay.answer` answers the client from a worker's response (the
handler of :meth:`~kvroute.proxy.upstream.Upstream.send`):

- an error answer (4xx) passes on as it is; on ``/v1/messages``, one that is
  not Anthropic-shaped (a gateway's page, an OpenAI-shaped error before the
  engine) is rewrapped, its message kept (:func:`error_response`);
- a JSON answer passes on once read whole; on ``/v1/messages`` its
  ``usage`` gets the router's prediction where the worker reported no cache
  reads, and the tokens not read as cache writes where it reported none
  (:func:`~kvroute.proxy.anthropic.fill_usage`);
- an SSE stream passes on event by event, unchanged but for the few events
  :class:`~kvroute.proxy.openai.OpenAIStream` and
  :class:`~kvroute.proxy.anthropic.AnthropicStream` describe. A worker
  failing mid-stream has its stream continued on another worker where that
  can be done (:mod:`~kvroute.proxy.migration`), else ended with an
  ``error`` event in the API's shape; so does a deadline passing
  (:mod:`~kvroute.proxy.deadlines`).

Until a byte has reached the client, a failure to read the answer fails the
attempt (:class:`~kvroute.proxy.upstream.AttemptFailed`): another worker may
serve it. The router hears of the first generated content and of the end
(:class:`~kvroute.proxy.upstream.Lifecycle`); a client that leaves
mid-stream, or whose connection drops while it waits (see
:mod:`~kvroute.proxy.disconnect`), ends the request as finished once a token
went out, else failed (:meth:`~kvroute.proxy.upstream.Lifecycle.abandon`).

Every answer carries ``X-Request-Id``, :data:`WORKER_HEADER` and
:data:`PREDICTED_HEADER`; a JSON answer with usage also
:data:`CACHE_SOURCE_HEADER`. Cache reads and writes are counted into the
metrics: the worker's figures, else the router's prediction (and a log line
says so). The worker's figure also goes to :meth:`Router.observe
<kvroute.Router.observe>`, whose drift detector checks the router's
prediction against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web

from ..events.metrics import Metrics
from ..request import Decision, Request
from .anthropic import AnthropicStream, anthropic_usage, fill_usage
from .call import Api, Call
from .deadlines import deadline_of
from .disconnect import mark_streaming
from .errors import ProxyError, error_body, openai_error, upstream_message
from .hints import Usage
from .migration import Migrator, Transcript, strip_token_ids
from .openai import OpenAIStream, openai_usage
from .responses import ResponsesStream, response_id_of, responses_usage
from .sse import encode_event
from .upstream import CONNECTION_ERRORS, AttemptFailed, Lifecycle
from .warmup import ReplyCollector, reply_of
from .workers import WorkerPool

__all__ = [
    "CACHE_SOURCE_HEADER",
    "PREDICTED_HEADER",
    "WORKER_HEADER",
    "Relay",
    "Relayed",
    "error_response",
    "failure_response",
]

log = logging.getLogger("kvroute.proxy")

#: Response header naming the worker that served a request.
WORKER_HEADER: Final = "X-Kvroute-Worker"
#: Response header: the prompt tokens the router predicted cached on that worker.
PREDICTED_HEADER: Final = "X-Kvroute-Predicted-Cached-Tokens"
#: Response header (non-streaming): ``worker`` or ``predicted`` cache figures.
CACHE_SOURCE_HEADER: Final = "X-Kvroute-Cache-Source"


class _SseResponse(web.StreamResponse):
    """A streamed answer whose status line and headers leave with its first event.

    aiohttp sends a prepared stream's headers at once, in a write of their own;
    the relay prepares only when it has an event to send, so holding them back
    saves one send (on loopback, a wake-up of the reader) per request. Were
    aiohttp to drop the attribute, the headers would go out at once, as before.
    """

    _send_headers_immediately = False


@dataclass(frozen=True, slots=True)
class Relayed:
    """What answering the client gave.

    :param response: the response the client got (already sent when streamed).
    :param reply: the reply generated, when asked for and the answer completed
        (see :func:`~kvroute.proxy.warmup.reply_of`); else None.
    :param response_id: a Responses API answer's id (the worker keeps it), else None.
    :param usage: the worker's usage as it reported it (cache reads None
        where it reported none, even when the answer carries the router's
        prediction), or None.
    :param outcome: ``"ok"``, ``"client_closed"``, ``"stream_broken"`` (the
        worker's stream broke), ``"migrated"`` (it broke and the stream went on
        on another worker), ``"stream_error"`` (it sent an error event) or
        ``"deadline_exceeded"`` (the request's deadline passed mid-stream).
    """

    response: web.StreamResponse
    reply: Any = None
    response_id: str | None = None
    usage: Usage | None = None
    outcome: str = "ok"


def _reported(usage: Usage | None, predicted: bool) -> Usage | None:
    """The worker's own usage: without the cache reads the router's prediction filled in."""
    if usage is None or not predicted:
        return usage
    return Usage(usage.prompt_tokens, None, usage.output_tokens)


def error_response(
    api: Api, status: int, body: bytes, headers: dict[str, str], fallback: str = ""
) -> web.Response:
    """A worker's error answer, passed on in the shape of the API called.

    On ``/v1/messages``, vLLM's own Messages errors already are Anthropic's;
    a gateway's HTML page or an OpenAI-shaped error before the engine is
    rewrapped, its message kept, else ``fallback``, else the status. On
    OpenAI endpoints every error is rewritten in the proxy's OpenAI shape
    (:func:`~kvroute.proxy.errors.openai_error`: the worker's message and
    ``param``, a string ``code``).

    >>> r = error_response("anthropic", 502, b"<html>Bad Gateway</html>", {})
    >>> r.status, json.loads(r.body)["error"]
    (502, {'type': 'api_error', 'message': 'the worker answered 502'})
    >>> vllm = b'{"error": {"message": "bad", "type": "BadRequestError", "code": 400}}'
    >>> json.loads(error_response("openai", 400, vllm, {}).body)["error"]["code"]
    'bad_request'
    """
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if api == "anthropic":
        if not (isinstance(obj, dict) and obj.get("type") == "error"):
            message = upstream_message(obj) or fallback or f"the worker answered {status}"
            body = json.dumps(error_body("anthropic", ProxyError(status, message))).encode()
            headers = {**headers, "Content-Type": "application/json"}
    else:
        body = json.dumps(openai_error(status, obj, fallback), ensure_ascii=False).encode()
        headers = {**headers, "Content-Type": "application/json"}
    return web.Response(status=status, body=body, headers=headers)


def failure_response(call: Call, failure: AttemptFailed) -> web.Response:
    """The answer when every attempt failed: the last worker's own 5xx, passed on.

    :raises ProxyError: 502 when the last worker gave no answer at all.
    """
    if failure.status is None:
        raise ProxyError(
            502, f"no worker could serve the request: {failure.reason}", code="upstream_error"
        )
    headers = {"Content-Type": failure.content_type, "X-Request-Id": call.client_id}
    return error_response(call.api, failure.status, failure.body, headers)


class Relay:
    """Answers clients from workers' responses, counting what they report.

    :param pool: workers whose answer breaks off are marked unhealthy here.
    :param metrics: cache reads and writes, and mid-stream failures, are counted here.
    :param migrator: continues a stream whose worker failed mid-way (or None).
    """

    def __init__(
        self, pool: WorkerPool, metrics: Metrics, migrator: Migrator | None = None
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.migrator = migrator

    async def answer(
        self,
        request: web.Request,
        call: Call,
        decision: Decision,
        upstream: aiohttp.ClientResponse,
        lc: Lifecycle,
        *,
        collect: bool = False,
        routed: Request | None = None,
    ) -> Relayed:
        """Answer ``request`` from ``upstream``, the worker's response to ``call``.

        :param collect: keep the reply (see :class:`Relayed`).
        :param routed: the request as routed (a broken stream's continuation needs it).
        :raises AttemptFailed: the answer broke off before a byte reached the client.
        """
        if upstream.status >= 400:
            try:
                body = await upstream.read()
            except CONNECTION_ERRORS:
                body = b""
            headers = self._headers(upstream, call, decision)
            return Relayed(error_response(call.api, upstream.status, body, headers))
        if call.stream and upstream.content_type == "text/event-stream":
            return await self._stream(request, call, decision, upstream, lc, collect, routed)
        return await self._json(call, decision, upstream, lc, collect)

    @staticmethod
    def _headers(
        upstream: aiohttp.ClientResponse, call: Call, decision: Decision
    ) -> dict[str, str]:
        return {
            "Content-Type": upstream.headers.get("Content-Type", "application/json"),
            "X-Request-Id": call.client_id,
            WORKER_HEADER: str(decision.worker),
            PREDICTED_HEADER: str(decision.predicted_cached_tokens),
        }

    def _account(
        self, call: Call, decision: Decision, usage: Usage | None, predicted: bool
    ) -> None:
        """Count a response's cache reads and writes into the metrics.

        The worker's figures; where it reported none, the router's prediction,
        as the answer's usage already carries on ``/v1/messages`` (``predicted``)
        and only the metrics do on OpenAI paths (vLLM reports cached tokens
        there only with ``--enable-prompt-tokens-details``). Either is logged.
        """
        if usage is None:
            return
        read = usage.cached_tokens
        if read is not None and not predicted:
            # the engine's own figure: the router checks its prediction against it
            self.pool.router.observe(decision, read)
        where = "usage carries" if predicted else None
        if read is None:
            read = min(decision.predicted_cached_tokens, usage.prompt_tokens)
            where = "the cache metrics count"
        self.metrics.cache_usage(read, max(usage.prompt_tokens - read, 0))
        if where is not None:
            log.info(
                "request %s: worker %d reported no cache reads; %s the router's"
                " prediction (%d of %d prompt tokens)",
                call.client_id, decision.worker, where, read, usage.prompt_tokens,
            )  # fmt: skip

    async def _json(
        self,
        call: Call,
        decision: Decision,
        upstream: aiohttp.ClientResponse,
        lc: Lifecycle,
        collect: bool,
    ) -> Relayed:
        try:
            data = await upstream.read()
        except CONNECTION_ERRORS as e:
            self.pool.mark_down(decision.worker, f"reading the answer: {type(e).__name__} {e}")
            raise AttemptFailed(f"reading the answer: {type(e).__name__}") from None
        except aiohttp.ClientError as e:
            raise AttemptFailed(f"reading the answer: {type(e).__name__} {e}") from None
        lc.first_token()
        headers = self._headers(upstream, call, decision)
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        usage: Usage | None = None
        predicted = False
        if isinstance(obj, dict):
            raw_usage = obj.get("usage")
            if call.kind == "messages":
                if isinstance(raw_usage, dict):
                    predicted = "cache_read_input_tokens" not in raw_usage
                    if fill_usage(raw_usage, decision.predicted_cached_tokens):
                        data = json.dumps(obj, ensure_ascii=False).encode()
                usage = anthropic_usage(raw_usage)
            elif call.kind == "responses":
                usage = responses_usage(raw_usage)
            else:
                usage = openai_usage(raw_usage)
        if usage is not None:
            # predicted: the cache figures (in the answer on /v1/messages, in
            # the metrics everywhere) are the router's, the worker gave none
            reported = not predicted and usage.cached_tokens is not None
            headers[CACHE_SOURCE_HEADER] = "worker" if reported else "predicted"
        self._account(call, decision, usage, predicted)
        lc.finish()
        response = web.Response(status=upstream.status, body=data, headers=headers)
        response_id = response_id_of(obj) if call.kind == "responses" else None
        reply = reply_of(call.kind, obj) if collect else None
        return Relayed(response, reply, response_id, _reported(usage, predicted))

    async def _stream(
        self,
        request: web.Request,
        call: Call,
        decision: Decision,
        upstream: aiohttp.ClientResponse,
        lc: Lifecycle,
        collect: bool,
        routed: Request | None,
    ) -> Relayed:
        watcher: OpenAIStream | AnthropicStream | ResponsesStream
        collector = ReplyCollector(call.kind) if collect else None
        transcript = self.migrator.transcript(call) if self.migrator is not None else None
        feeds = [f.feed for f in (collector, transcript) if f is not None]
        on_event = _fan_out(feeds)
        if call.kind == "messages":
            watcher = AnthropicStream(decision.predicted_cached_tokens, on_event=on_event)
        elif call.kind == "responses":
            watcher = ResponsesStream(on_event=on_event)
        else:
            transform = strip_token_ids if call.strip_token_ids else None
            # defer: the reply and the transcript are read only after settle()
            watcher = OpenAIStream(
                strip_usage=call.strip_usage, on_event=on_event, transform=transform, defer=True
            )
        opened: list[web.StreamResponse] = []  # the client's stream, once begun
        try:
            return await self._pass_stream(
                request, call, decision, upstream, lc, watcher, collector, transcript, routed,
                opened,
            )  # fmt: skip
        except asyncio.CancelledError:
            deadline = deadline_of(request)
            if not opened or deadline is None or not deadline.expired:
                raise
            # The deadline passed mid-stream: end the stream with an error event.
            deadline.uncancel()
            deadline.count("streaming")
            lc.abandon()
            log.info("request %s: %s mid-stream", call.client_id, deadline.message())
            err = ProxyError(504, deadline.message(), code="deadline_exceeded")
            resp = opened[0]
            with contextlib.suppress(ConnectionError):
                event = "error" if call.api == "anthropic" else None
                await resp.write(encode_event(error_body(call.api, err), event))
                await resp.write_eof()
            return Relayed(resp, outcome="deadline_exceeded")

    async def _pass_stream(
        self,
        request: web.Request,
        call: Call,
        decision: Decision,
        upstream: aiohttp.ClientResponse,
        lc: Lifecycle,
        watcher: OpenAIStream | AnthropicStream | ResponsesStream,
        collector: ReplyCollector | None,
        transcript: Transcript | None,
        routed: Request | None,
        opened: list[web.StreamResponse],
    ) -> Relayed:
        resp: web.StreamResponse | None = None
        worker = decision.worker
        upstream_error: str | None = None
        while True:
            try:
                chunk = await upstream.content.readany()
            except (*CONNECTION_ERRORS, aiohttp.ClientPayloadError) as e:
                reason = f"stream broke: {type(e).__name__} {e}".strip()
                if isinstance(e, CONNECTION_ERRORS):
                    self.pool.mark_down(worker, reason)
                if resp is None:
                    raise AttemptFailed(reason) from None
                upstream_error = reason
                break
            out = watcher.feed(chunk) if chunk else watcher.flush()
            if watcher.first_token:
                lc.first_token()
            if out:
                if resp is None:
                    resp = _SseResponse(
                        status=upstream.status, headers=self._headers(upstream, call, decision)
                    )
                    resp.headers["Cache-Control"] = "no-cache"
                    await resp.prepare(request)
                    opened.append(resp)
                    mark_streaming(request)
                    if (deadline := deadline_of(request)) is not None:
                        deadline.answer_started()
                try:
                    await resp.write(out)
                except ConnectionError:  # the client went away
                    log.info("request %s: client disconnected", call.client_id)
                    lc.abandon()
                    predicted = isinstance(watcher, AnthropicStream) and watcher.predicted
                    usage = _reported(watcher.usage, predicted)
                    return Relayed(resp, usage=usage, outcome="client_closed")
            if not chunk:
                break
        if resp is None:
            raise AttemptFailed("empty stream")
        reply = None
        predicted = False
        outcome = "ok"
        if isinstance(watcher, OpenAIStream) and (upstream_error or collector is not None):
            watcher.settle()  # the transcript or the reply is to be read: make it whole
        if upstream_error is not None:
            outcome = "stream_broken"
            lc.worker_failed = True
            lc.fail()
            self.metrics.upstream_errors.labels(str(worker)).inc()
            log.warning("request %s: worker %d %s", call.client_id, worker, upstream_error)
            resumed = self.migrator is not None and await self.migrator.resume(
                request, call, routed, decision, transcript, resp, self._account
            )
            if resumed:
                outcome = "migrated"
            else:
                err = ProxyError(502, f"the worker failed mid-stream: {upstream_error}")
                body = error_body(call.api, err)
                event = "error" if call.api == "anthropic" else None
                if isinstance(watcher, ResponsesStream):
                    # the Responses stream's own error event
                    body = {**body["error"], "type": "error",
                            "sequence_number": watcher.sequence_number + 1}  # fmt: skip
                    event = "error"
                with contextlib.suppress(ConnectionError):
                    await resp.write(encode_event(body, event))
        else:
            predicted = isinstance(watcher, AnthropicStream) and watcher.predicted
            self._account(call, decision, watcher.usage, predicted)
            if watcher.error is not None:
                outcome = "stream_error"
                lc.worker_failed = True
                lc.fail()
            else:
                if collector is not None:
                    reply = collector.reply()
                lc.finish()
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        response_id = watcher.response_id if isinstance(watcher, ResponsesStream) else None
        return Relayed(resp, reply, response_id, _reported(watcher.usage, predicted), outcome)


def _fan_out(feeds: Sequence[Callable[[object], None]]) -> Callable[[object], None] | None:
    """One ``on_event`` callback feeding each of ``feeds`` (None when there are none)."""
    if not feeds:
        return None
    if len(feeds) == 1:
        return feeds[0]

    def feed_all(obj: object) -> None:
        for feed in feeds:
            feed(obj)

    return feed_all

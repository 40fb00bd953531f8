"""Relay: a worker's answer passed on to the client, its usage and cache figures counted.

:meth:`Relay.answer` answers the client from a worker's response (the
handler of :meth:`~kvroute.proxy.upstream.Upstream.send`):

- an error answer (4xx) passes on as it is; on ``/v1/messages``, one that is
  not Anthropic-shaped (a gateway's page, an OpenAI-shaped error before the
  engine) is rewrapped, its message kept (:func:`error_response`);
- a JSON answer passes on once read whole; on ``/v1/messages`` its
  ``usage`` gets the router's prediction where the worker reported no cache
  reads (:func:`~kvroute.proxy.anthropic.fill_usage`);
- an SSE stream passes on event by event, unchanged but for the few events
  :class:`~kvroute.proxy.openai.OpenAIStream` and
  :class:`~kvroute.proxy.anthropic.AnthropicStream` describe. A worker
  failing mid-stream ends it with an ``error`` event in the API's shape.

Until a byte has reached the client, a failure to read the answer fails the
attempt (:class:`~kvroute.proxy.upstream.AttemptFailed`): another worker may
serve it. The router hears of the first generated content and of the end
(:class:`~kvroute.proxy.upstream.Lifecycle`); a client that leaves
mid-stream ends the request as finished once a token went out, else failed.

Every answer carries ``X-Request-Id``, :data:`WORKER_HEADER` and
:data:`PREDICTED_HEADER`; a JSON answer with usage also
:data:`CACHE_SOURCE_HEADER`. Cache reads and writes are counted into the
metrics: the worker's figures, else the router's prediction (and a log line
says so). The worker's figure also goes to :meth:`Router.observe
<kvroute.Router.observe>`, whose drift detector checks the router's
prediction against it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web

from ..events.metrics import Metrics
from ..request import Decision
from .anthropic import AnthropicStream, anthropic_usage, fill_usage
from .call import Api, Call
from .errors import ProxyError, error_body, upstream_message
from .hints import Usage
from .openai import OpenAIStream, openai_usage
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


@dataclass(frozen=True, slots=True)
class Relayed:
    """What answering the client gave.

    :param response: the response the client got (already sent when streamed).
    :param reply: the reply generated, when asked for and the answer completed
        (see :func:`~kvroute.proxy.warmup.reply_of`); else None.
    """

    response: web.StreamResponse
    reply: Any = None


def error_response(
    api: Api, status: int, body: bytes, headers: dict[str, str], fallback: str = ""
) -> web.Response:
    """A worker's error answer, passed on; in Anthropic's shape on ``/v1/messages``.

    (vLLM's own Messages errors already are; a gateway's HTML page or an
    OpenAI-shaped error before the engine is rewrapped, its message kept,
    else ``fallback``, else the status.)

    >>> r = error_response("anthropic", 502, b"<html>Bad Gateway</html>", {})
    >>> r.status, json.loads(r.body)["error"]
    (502, {'type': 'api_error', 'message': 'the worker answered 502'})
    """
    if api == "anthropic":
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not (isinstance(obj, dict) and obj.get("type") == "error"):
            message = upstream_message(obj) or fallback or f"the worker answered {status}"
            body = json.dumps(error_body("anthropic", ProxyError(status, message))).encode()
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
    """

    def __init__(self, pool: WorkerPool, metrics: Metrics) -> None:
        self.pool = pool
        self.metrics = metrics

    async def answer(
        self,
        request: web.Request,
        call: Call,
        decision: Decision,
        upstream: aiohttp.ClientResponse,
        lc: Lifecycle,
        *,
        collect: bool = False,
    ) -> Relayed:
        """Answer ``request`` from ``upstream``, the worker's response to ``call``.

        :param collect: keep the reply (see :class:`Relayed`).
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
            return await self._stream(request, call, decision, upstream, lc, collect)
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
                if isinstance(raw_usage, dict) and fill_usage(
                    raw_usage, decision.predicted_cached_tokens
                ):
                    predicted = True
                    data = json.dumps(obj, ensure_ascii=False).encode()
                usage = anthropic_usage(raw_usage)
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
        return Relayed(response, reply_of(call.kind, obj) if collect else None)

    async def _stream(
        self,
        request: web.Request,
        call: Call,
        decision: Decision,
        upstream: aiohttp.ClientResponse,
        lc: Lifecycle,
        collect: bool,
    ) -> Relayed:
        watcher: OpenAIStream | AnthropicStream
        collector = ReplyCollector(call.kind) if collect else None
        on_event = None if collector is None else collector.feed
        if call.kind == "messages":
            watcher = AnthropicStream(decision.predicted_cached_tokens, on_event=on_event)
        else:
            watcher = OpenAIStream(strip_usage=call.strip_usage, on_event=on_event)
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
                    resp = web.StreamResponse(
                        status=upstream.status, headers=self._headers(upstream, call, decision)
                    )
                    resp.headers["Cache-Control"] = "no-cache"
                    await resp.prepare(request)
                try:
                    await resp.write(out)
                except ConnectionError:  # the client went away
                    log.info("request %s: client disconnected", call.client_id)
                    if lc.first:
                        lc.finish()
                    else:
                        lc.fail()
                    return Relayed(resp)
            if not chunk:
                break
        if resp is None:
            raise AttemptFailed("empty stream")
        reply = None
        if upstream_error is not None:
            self.metrics.upstream_errors.labels(str(worker)).inc()
            log.warning("request %s: worker %d %s", call.client_id, worker, upstream_error)
            err = ProxyError(502, f"the worker failed mid-stream: {upstream_error}")
            event = "error" if call.api == "anthropic" else None
            with contextlib.suppress(ConnectionError):
                await resp.write(encode_event(error_body(call.api, err), event))
            lc.fail()
        else:
            predicted = isinstance(watcher, AnthropicStream) and watcher.predicted
            self._account(call, decision, watcher.usage, predicted)
            if watcher.error is not None:
                lc.fail()
            else:
                if collector is not None:
                    reply = collector.reply()
                lc.finish()
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return Relayed(resp, reply)

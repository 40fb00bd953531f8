"""Disaggregated serving: a request's two legs, its prefill worker's and its decode worker's.

In a fleet with ``"prefill"`` / ``"decode"`` workers the router's decision
names both (:class:`~kvroute.disagg.DisaggDecision`). :class:`DisaggLegs`
runs one attempt at such a request, as the attempt of
:meth:`Upstream.send <kvroute.proxy.upstream.Upstream.send>`, in the protocol
the fleet speaks (``disagg_protocol``):

**vLLM** (its NixlConnector, as vLLM's disaggregated-serving proxy drives it):

1. the prefill worker gets the request with ``kv_transfer_params``
   ``{"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id":
   null, "remote_block_ids": null, "remote_host": null, "remote_port": null}``,
   ``max_tokens`` 1 (``max_completion_tokens`` too if given), no stream, no
   ``stream_options``, ``min_tokens`` / ``min_completion_tokens`` dropped;
2. its answer's ``kv_transfer_params`` go with the client's request to the
   decode worker (``remote_host`` set to the prefill worker's host when the
   engine left it empty or loopback and the worker is not), which pulls the
   KV and answers, streaming if the client asked.

**SGLang** (its load balancer's protocol): the client's request, with
``bootstrap_host`` (the prefill worker's host), ``bootstrap_port`` (its
``bootstrap_port``, else ``disagg_bootstrap_port``) and a random 63-bit
``bootstrap_room``, goes to both workers at once; the decode worker's answer
is relayed, the prefill worker's read on the side.

The decode worker's answer is relayed as usual
(:mod:`~kvroute.proxy.relay`), as that worker's answer (the decision's
:meth:`~kvroute.disagg.DisaggDecision.decode_view`), except that its usage's
cache figures are the prefill leg's, where the cache hit happened
(:class:`UsagePatch`): the prefill worker's reported cached tokens, else none
(the relay then fills in the router's prediction for the prefill worker).

Failures: a prefill leg that cannot be reached, answers 5xx or no
``kv_transfer_params`` (vLLM) fails the attempt on the prefill worker, which
the next attempt excludes (another prefill worker prefills); a decode leg that
fails before a byte reached the client fails it on the decode worker (the next
attempt re-runs the prefill, likely on the same, now warm, prefill worker); a
prefill leg that fails while its SGLang decode leg waits for the KV ends that
leg too (it would wait for its bootstrap timeout), and an SGLang decode leg
that fails while its prefill leg fails too (within :attr:`DisaggLegs.PREFILL_GRACE`)
is the prefill worker's failure. A prefill worker's 4xx is
the client's error and passes on. Both legs' responses are closed and the
router hears the request's end on every path (``prefill_done`` when the
prefill leg answered, then ``finished`` / ``failed``). A request the
conditional rule prefills on its decode worker is an ordinary attempt there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiohttp

from ..disagg import DisaggDecision
from ..request import Decision
from ..router import Router
from .anthropic import AnthropicStream, anthropic_usage
from .call import Call, Kind
from .config import ProxyConfig
from .hints import Usage
from .openai import OpenAIStream, openai_usage
from .sse import SseSplitter, encode_event
from .upstream import CONNECTION_ERRORS, AttemptFailed, Handler, Lifecycle, Upstream
from .workers import WorkerPool

if TYPE_CHECKING:
    from .record import RequestRecord

__all__ = [
    "REMOTE_DECODE",
    "DisaggLegs",
    "UsagePatch",
    "decode_body",
    "leg_usage",
    "prefill_body",
    "sglang_body",
]

log = logging.getLogger("kvroute.proxy")

_T = TypeVar("_T")

#: The ``kv_transfer_params`` a vLLM prefill worker gets (vLLM's toy proxy's, field for field).
REMOTE_DECODE: Final[dict[str, Any]] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
#: SGLang's default ``--disaggregation-bootstrap-port``.
SGLANG_BOOTSTRAP_PORT: Final = 8998
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1", ""})


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body a vLLM prefill worker gets: remote decode, one token, no stream.

    >>> b = prefill_body({"model": "m", "messages": [], "stream": True, "min_tokens": 4,
    ...                   "max_completion_tokens": 200, "stream_options": {"include_usage": True}})
    >>> b["kv_transfer_params"]["do_remote_decode"], b["stream"], b["max_tokens"]
    (True, False, 1)
    >>> b["max_completion_tokens"], "stream_options" in b, "min_tokens" in b
    (1, False, False)
    """
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    out.pop("min_completion_tokens", None)
    out["kv_transfer_params"] = dict(REMOTE_DECODE)
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def decode_body(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The body a vLLM decode worker gets: the client's, with the prefill's ``kv_transfer_params``.

    >>> decode_body({"prompt": "x"}, {"do_remote_prefill": True})["kv_transfer_params"]
    {'do_remote_prefill': True}
    """
    return {**body, "kv_transfer_params": params}


def sglang_body(body: dict[str, Any], host: str, port: int, room: int) -> dict[str, Any]:
    """The body both SGLang workers get: the client's, with the bootstrap fields.

    >>> b = sglang_body({"prompt": "x"}, "10.0.0.5", 8998, 42)
    >>> b["bootstrap_host"], b["bootstrap_port"], b["bootstrap_room"]
    ('10.0.0.5', 8998, 42)
    """
    return {**body, "bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}


def _is_loopback(host: object) -> bool:
    if not isinstance(host, str) or host in _LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def leg_usage(kind: Kind, data: bytes, streamed: bool) -> Usage | None:
    """The usage a worker's whole answer reports (None if it reports none).

    >>> leg_usage("chat", b'{"usage": {"prompt_tokens": 40, "completion_tokens": 1,'
    ...           b' "prompt_tokens_details": {"cached_tokens": 32}}}', False)
    Usage(prompt_tokens=40, cached_tokens=32, output_tokens=1)

    :param streamed: the answer is an SSE stream (else JSON).
    """
    if streamed:
        watcher: OpenAIStream | AnthropicStream
        watcher = AnthropicStream(0) if kind == "messages" else OpenAIStream()
        watcher.feed(data)
        watcher.feed(watcher.flush() + b"\n\n")
        if isinstance(watcher, AnthropicStream) and watcher.predicted:
            return None  # it reported no cache reads (the watcher filled in 0)
        return watcher.usage
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    raw = obj.get("usage")
    return anthropic_usage(raw) if kind == "messages" else openai_usage(raw)


class UsagePatch:
    """Put the prefill leg's cache reads into the decode leg's usage (JSON or SSE).

    OpenAI: ``usage.prompt_tokens_details.cached_tokens``; Anthropic:
    ``cache_read_input_tokens``, ``input_tokens`` moved to keep the prompt's
    total. With no figure from the prefill leg the decode leg's cache figures
    are removed (a decode worker counts the KV it received as cached), so the
    relay fills in the router's prediction and says so.

    >>> p = UsagePatch("chat", lambda: 32)
    >>> out = p.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 40,'
    ...              b' "prompt_tokens_details": {"cached_tokens": 40}}}\\n\\n')
    >>> json.loads(out[6:])["usage"]["prompt_tokens_details"]
    {'cached_tokens': 32}

    :param kind: the call's kind.
    :param cached: returns the prefill leg's cached tokens, or None while unknown.
    """

    def __init__(self, kind: Kind, cached: Callable[[], int | None]) -> None:
        self._kind = kind
        self._cached = cached
        self._split = SseSplitter()

    def usage(self, usage: object) -> bool:
        """Patch one ``usage`` object in place; whether it changed."""
        if not isinstance(usage, dict):
            return False
        read = self._cached()
        if self._kind == "messages":
            if "input_tokens" not in usage:
                return False
            au = anthropic_usage(usage)
            if au is None:
                return False
            created = usage.get("cache_creation_input_tokens") or 0
            if read is None:
                usage.pop("cache_read_input_tokens", None)
                usage["input_tokens"] = max(au.prompt_tokens - created, 0)
            else:
                read = min(read, max(au.prompt_tokens - created, 0))
                usage["cache_read_input_tokens"] = read
                usage["input_tokens"] = max(au.prompt_tokens - created - read, 0)
            return True
        if "prompt_tokens" not in usage:
            return False
        details = usage.get("prompt_tokens_details")
        if read is None:
            if isinstance(details, dict):
                details.pop("cached_tokens", None)
                if not details:
                    usage.pop("prompt_tokens_details")
            return True
        usage["prompt_tokens_details"] = {
            **(details if isinstance(details, dict) else {}),
            "cached_tokens": read,
        }
        return True

    def body(self, data: bytes) -> bytes:
        """A whole JSON answer, patched (unchanged if it has no usage)."""
        try:
            obj = json.loads(data)
        except ValueError:
            return data
        if isinstance(obj, dict) and self.usage(obj.get("usage")):
            return json.dumps(obj, ensure_ascii=False).encode()
        return data

    def feed(self, chunk: bytes) -> bytes:
        """An SSE chunk's complete events, those carrying usage re-encoded patched."""
        out: list[bytes] = []
        for ev in self._split.feed(chunk):
            obj = ev.json() if ev.data.startswith("{") else None
            holder = obj
            if isinstance(obj, dict) and ev.event == "message_start":
                holder = obj.get("message")
            if isinstance(holder, dict) and self.usage(holder.get("usage")):
                out.append(encode_event(obj, ev.event))
            else:
                out.append(ev.raw)
        return b"".join(out)

    def flush(self) -> bytes:
        """An unterminated last event, as it is."""
        return self._split.flush()


class _Content:
    """The decode answer's body, patched as it is read (what the relay calls ``content``)."""

    def __init__(self, answer: _DecodeAnswer) -> None:
        self._answer = answer

    async def readany(self) -> bytes:
        return await self._answer.readany()


class _DecodeAnswer:
    """The decode leg's response as the relay reads it: usage patched, the prefill leg watched.

    It offers what :class:`~kvroute.proxy.relay.Relay` reads of a response
    (``status``, ``headers``, ``content_type``, ``read()``,
    ``content.readany()``). While nothing of it has been read, a failed prefill
    leg (``failed``, set by the SGLang flow) ends it with :class:`AttemptFailed`
    on the prefill worker; after, with a broken payload (the relay ends the
    stream with an error event).
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        patch: UsagePatch,
        prefill_failed: asyncio.Future[AttemptFailed] | None = None,
    ) -> None:
        self._r = response
        self._patch = patch
        self._failed = prefill_failed
        self._sent = False
        self.status = response.status
        self.headers = response.headers
        self.content_type = response.content_type
        self.content = _Content(self)

    async def _race(self, work: Awaitable[bytes]) -> bytes:
        failed = self._failed
        if failed is None:
            return await work
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait((task, failed), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        f = failed.result()
        if self._sent:
            raise aiohttp.ClientPayloadError(f"the prefill leg failed: {f.reason}")
        raise f

    async def read(self) -> bytes:
        data = await self._race(self._r.read())
        self._sent = True
        return self._patch.body(data)

    async def readany(self) -> bytes:
        chunk = await self._race(self._r.content.readany())
        if not chunk:
            return self._patch.flush()
        self._sent = True
        return self._patch.feed(chunk)


class DisaggLegs:
    """Runs the attempts at requests whose decision names two workers (see the module docstring).

    :param router: hears each request's lifecycle (``prefill_done`` included).
    :param pool: the workers' addresses (hosts, bootstrap ports) and health.
    :param upstream: opens the legs' calls; ordinary attempts run there.
    :param config: ``disagg_protocol`` and ``disagg_bootstrap_port``.
    """

    def __init__(
        self, router: Router, pool: WorkerPool, upstream: Upstream, config: ProxyConfig
    ) -> None:
        self.router = router
        self.pool = pool
        self.upstream = upstream
        self.config = config
        self._rng = random.SystemRandom()

    #: Seconds an SGLang decode leg's failure waits for its prefill leg's outcome.
    PREFILL_GRACE: Final = 1.0

    async def attempt(
        self,
        call: Call,
        decision: Decision,
        handle: Handler[_T],
        record: RequestRecord | None = None,
    ) -> _T:
        """One attempt at ``call`` as ``decision`` says (an :data:`~.upstream.Attempt`).

        Each leg's outcome feeds the outlier detector (a leg that failed counts
        against its own worker), and ``record`` hears the first token.

        :raises AttemptFailed: naming the worker that failed.
        """
        if not isinstance(decision, DisaggDecision) or not decision.remote_prefill:
            return await self.upstream._attempt(call, decision, handle, record)
        d = decision.decode_worker
        assert d is not None
        lc = Lifecycle(self.router, decision.request_id)
        outliers = self.upstream.outliers
        try:
            if self.config.disagg_protocol == "sglang":
                result = await self._sglang(call, decision, handle, lc)
            else:
                result = await self._vllm(call, decision, handle, lc)
        except asyncio.CancelledError:
            # the client hung up or its deadline passed: both legs' load goes
            lc.abandon()
            raise
        except AttemptFailed as f:
            if outliers is not None and f.worker is not None:
                outliers.failed(f.worker)
            raise
        else:
            if outliers is not None:
                outliers.succeeded(decision.worker)
                (outliers.failed if lc.worker_failed else outliers.succeeded)(d)
            return result
        finally:
            lc.fail()  # a no-op once the request ended
            if record is not None and lc.first:
                record.first = lc.first_at

    # -- the legs' calls ------------------------------------------------------------

    async def _open(self, worker: int, call: Call, body: dict[str, Any]) -> aiohttp.ClientResponse:
        data = json.dumps(body, ensure_ascii=False).encode()
        try:
            return await self.upstream.open(worker, call.path, data, call.headers)
        except AttemptFailed as f:
            f.worker = worker
            raise

    async def _read(self, worker: int, response: aiohttp.ClientResponse, what: str) -> bytes:
        try:
            return await response.read()
        except CONNECTION_ERRORS as e:
            reason = f"reading the {what}: {type(e).__name__} {e}".strip()
            self.pool.mark_down(worker, reason)
            raise AttemptFailed(reason, worker=worker) from None
        except aiohttp.ClientError as e:
            raise AttemptFailed(
                f"reading the {what}: {type(e).__name__} {e}", worker=worker
            ) from None

    @staticmethod
    def _failed_answer(
        worker: int, response: aiohttp.ClientResponse, body: bytes, what: str
    ) -> AttemptFailed:
        ctype = response.headers.get("Content-Type", "application/json")
        return AttemptFailed(
            f"{what} answered {response.status}", response.status, body, ctype, worker=worker
        )

    def _release(self, worker: int, response: aiohttp.ClientResponse | None) -> None:
        if response is not None:
            self.pool.untrack(worker, response)
            response.release()

    async def _relay(
        self,
        decision: DisaggDecision,
        response: aiohttp.ClientResponse,
        handle: Handler[_T],
        lc: Lifecycle,
        cached: Callable[[], int | None],
        kind: Kind,
        prefill_failed: asyncio.Future[AttemptFailed] | None = None,
    ) -> _T:
        answer = _DecodeAnswer(response, UsagePatch(kind, cached), prefill_failed)
        try:
            # the relay reads what an aiohttp response offers; the wrapper offers that
            return await handle(decision.decode_view(), answer, lc)  # type: ignore[arg-type]
        except AttemptFailed as f:
            if f.worker is None:
                f.worker = decision.decode_worker
            raise

    # -- vLLM: the prefill leg, then the decode leg -----------------------------------

    async def _vllm(
        self, call: Call, decision: DisaggDecision, handle: Handler[_T], lc: Lifecycle
    ) -> _T:
        p = decision.worker
        d = decision.decode_worker
        assert d is not None
        first: aiohttp.ClientResponse | None = None
        second: aiohttp.ClientResponse | None = None
        try:
            first = await self._open(p, call, prefill_body(call.body))
            data = await self._read(p, first, "prefill answer")
            if first.status >= 500:
                raise self._failed_answer(p, first, data, "the prefill worker")
            if first.status >= 400:  # the request's fault: the client hears it
                return await handle(decision, first, lc)
            try:
                answer = json.loads(data)
            except ValueError:
                answer = None
            params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
            if not isinstance(params, dict):
                raise AttemptFailed(
                    "the prefill worker answered without kv_transfer_params (is it a vLLM"
                    " with --kv-transfer-config NixlConnector?)",
                    worker=p,
                )
            usage = leg_usage(call.kind, data, False)
            cached = None if usage is None else usage.cached_tokens
            self.router.prefill_done(decision.request_id)
            self._release(p, first)
            first = None
            host = self.pool.workers[p].spec.host
            if _is_loopback(params.get("remote_host")) and not _is_loopback(host):
                params = {**params, "remote_host": host}
            second = await self._open(d, call, decode_body(call.body, params))
            if second.status >= 500:
                body = await self._read(d, second, "decode answer")
                raise self._failed_answer(d, second, body, "the decode worker")
            return await self._relay(decision, second, handle, lc, lambda: cached, call.kind)
        finally:
            self._release(p, first)
            self._release(d, second)

    # -- SGLang: both legs at once --------------------------------------------------

    async def _sglang(
        self, call: Call, decision: DisaggDecision, handle: Handler[_T], lc: Lifecycle
    ) -> _T:
        p = decision.worker
        d = decision.decode_worker
        assert d is not None
        spec = self.pool.workers[p].spec
        port = spec.bootstrap_port or self.config.disagg_bootstrap_port
        body = sglang_body(call.body, spec.host, port, self._rng.getrandbits(63))
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[AttemptFailed] = loop.create_future()
        usage: list[Usage | None] = []

        async def prefill_leg() -> None:
            response: aiohttp.ClientResponse | None = None
            try:
                response = await self._open(p, call, body)
                data = await self._read(p, response, "prefill answer")
                if response.status >= 400:
                    raise self._failed_answer(p, response, data, "the prefill worker")
                streamed = response.content_type == "text/event-stream"
                usage.append(leg_usage(call.kind, data, streamed))
                self.router.prefill_done(decision.request_id)
            except AttemptFailed as f:
                if not failed.done():
                    failed.set_result(f)
            finally:
                self._release(p, response)

        def cached() -> int | None:
            return usage[0].cached_tokens if usage and usage[0] is not None else None

        leg = asyncio.create_task(prefill_leg(), name=f"kvroute-prefill-{call.client_id}")
        second: aiohttp.ClientResponse | None = None
        opening = asyncio.ensure_future(self._open(d, call, body))
        try:
            await asyncio.wait((opening, failed), return_when=asyncio.FIRST_COMPLETED)
            if not opening.done():  # the prefill leg failed first: the decode leg would wait
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
                raise failed.result()
            second = opening.result()
            if second.status >= 500:
                data = await self._read(d, second, "decode answer")
                # a decode worker fails when its prefill worker does (its KV never
                # comes): then the prefill worker is the one to leave out
                await asyncio.wait((leg,), timeout=self.PREFILL_GRACE)
                if failed.done():
                    raise failed.result()
                raise self._failed_answer(d, second, data, "the decode worker")
            return await self._relay(decision, second, handle, lc, cached, call.kind, failed)
        finally:
            if not opening.done():
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
            leg.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leg
            self._release(d, second)
            if failed.done() and not failed.cancelled():
                log.info("request %s: prefill leg: %s", call.client_id, failed.result().reason)

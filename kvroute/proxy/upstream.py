"""Upstream: the proxy's calls to its workers, and the attempts that route and fail over.

Calls (:class:`Upstream`, over one connection pool opened by :meth:`~Upstream.start`):

- :meth:`~Upstream.open` posts a generation and returns the response once
  its headers arrive (read timeout ``read_timeout`` between bytes: aiohttp's
  until the headers, then :class:`~kvroute.proxy.idle.ReadIdle`'s);
  :meth:`~Upstream.exchange` posts a short call (render, ``/tokenize``,
  ``count_tokens``) and reads its whole answer within ``tokenize_timeout``.
  Both give up at once when the worker is marked unhealthy meanwhile (its
  *down* future, see :class:`~kvroute.proxy.workers.WorkerPool`) and mark it
  unhealthy when it cannot be reached; either way they raise
  :class:`AttemptFailed`. An open response is tracked by the pool, so a
  worker going down closes it.
- :meth:`~Upstream.post_aside` posts a call that judges nothing (a warm-up):
  no health marking, the request timeouts.

Attempts (:meth:`Upstream.send`): route the request (the time taken, the
worker and the predicted hit go into the metrics), open it on the chosen
worker and hand the response to the caller's handler, which answers the
client (see :mod:`~kvroute.proxy.relay`). An attempt fails, before any byte
reached the client, when the worker cannot be reached, answers 5xx, or the
handler raises :class:`AttemptFailed`; the router then hears
:meth:`~kvroute.router.Router.failed` and the request is routed again with
the workers that failed it excluded, up to ``retries`` more times. A 4xx
answer is the handler's to pass on. :class:`Lifecycle` reports each routed
attempt's first token and end to the router exactly once. Each attempt's
outcome (the worker failed it, or answered) feeds the
:class:`~kvroute.proxy.outliers.OutlierDetector`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiohttp

from ..events.metrics import Metrics
from ..request import Decision, Request
from ..router import NoWorkerAvailable, Router
from .call import Call
from .config import ProxyConfig
from .errors import ProxyError
from .idle import ReadIdle
from .outliers import OutlierDetector
from .workers import WorkerPool

if TYPE_CHECKING:
    from .record import RequestRecord

__all__ = ["CONNECTION_ERRORS", "Attempt", "AttemptFailed", "Handler", "Lifecycle", "Upstream"]

log = logging.getLogger("kvroute.proxy")

#: What a worker that cannot be reached (or went silent) raises.
CONNECTION_ERRORS: Final = (aiohttp.ClientConnectionError, TimeoutError, OSError)

# Bodies larger than this go upstream a piece at a time.
_PIECE: Final = 1 << 20


def _sendable(
    data: bytes | str, headers: Mapping[str, str]
) -> tuple[Any, Mapping[str, str]]:
    """``data`` and ``headers`` as aiohttp is to send them.

    A big body is sent in 1 MiB pieces (with its length, so not chunked):
    written at once, its copy into the socket's buffer would hold up the loop.
    """
    if isinstance(data, str) or len(data) <= _PIECE:
        return data, headers
    view = memoryview(data)

    async def pieces() -> AsyncIterator[memoryview]:
        for at in range(0, len(view), _PIECE):
            yield view[at : at + _PIECE]

    return pieces(), {**headers, "Content-Length": str(len(view))}

_T = TypeVar("_T")


class AttemptFailed(Exception):
    """This attempt failed before any byte reached the client; another worker may serve it.

    :param reason: for the logs.
    :param status: an upstream 5xx status to pass on if no attempt succeeds.
    :param body: that answer's body.
    :param content_type: that answer's content type.
    :param worker: the worker that failed, when not the decision's (a
        disaggregated request's decode leg: :mod:`~kvroute.proxy.disagg`).
    """

    def __init__(
        self,
        reason: str,
        status: int | None = None,
        body: bytes = b"",
        content_type: str = "application/json",
        *,
        worker: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body
        self.content_type = content_type
        self.worker = worker


class Lifecycle:
    """Reports one routed attempt's lifecycle to the router exactly once.

    >>> from kvroute import Request, Router
    >>> router = Router(block_size=4, workers=[0])
    >>> lc = Lifecycle(router, router.route(Request(1, tokens=list(range(8)))).request_id)
    >>> lc.first_token(); lc.finish(); lc.fail()      # the failure comes too late: ignored
    >>> lc.first, lc.ended, router.load(0)["active_requests"]
    (True, True, 0)

    :param router: the router that routed it.
    :param request_id: the decision's request id.
    """

    __slots__ = ("_id", "_router", "ended", "first", "first_at", "worker_failed")

    def __init__(self, router: Router, request_id: str | int) -> None:
        self._router = router
        self._id = request_id
        #: The first token was reported.
        self.first = False
        #: When (``time.perf_counter()``), for the request's time to first token.
        self.first_at = 0.0
        #: The end (finished or failed) was reported.
        self.ended = False
        #: The worker failed the attempt after answering (its stream broke or
        #: carried an error): the outlier detector counts it against the worker.
        self.worker_failed = False

    def first_token(self) -> None:
        """Report the first generated token (once, and only before the end)."""
        if not self.first and not self.ended:
            self.first = True
            self.first_at = time.perf_counter()
            self._router.first_token(self._id)

    def finish(self) -> None:
        """Report that the request finished (unless it already ended)."""
        if not self.ended:
            self.ended = True
            self._router.finished(self._id)

    def fail(self) -> None:
        """Report that the request failed (unless it already ended)."""
        if not self.ended:
            self.ended = True
            self._router.failed(self._id)

    def abandon(self) -> None:
        """The client hung up (or gave up): finished once a token went out, else failed.

        After the first token the engine has prefilled the prompt and holds
        its blocks, so the router's predicted residency is true: finishing
        keeps it. Before, the prefill may not have happened (the engine
        aborts a queued request): failing forgets it, rather than send the
        next turn after blocks that are not there. Either way the request's
        load goes at once.
        """
        if self.first:
            self.finish()
        else:
            self.fail()


#: Answers the client from an opened worker response (status below 500).
Handler = Callable[[Decision, aiohttp.ClientResponse, Lifecycle], Awaitable[_T]]
#: One attempt at a routed request: ``(call, decision, handler, record) -> handler's result``.
Attempt = Callable[[Call, Decision, Handler[_T], "RequestRecord | None"], Awaitable[_T]]


class Upstream:
    """The proxy's calls to its workers, and the attempt loop over them.

    Use from the proxy's event loop, between :meth:`start` and :meth:`close`.

    :param router: routes each attempt and hears how it went.
    :param pool: the workers' addresses and health.
    :param config: timeouts and ``retries``.
    :param metrics: routing times, retries and upstream errors are counted here.
    :param outliers: hears how each attempt went, and ejects failing workers (or None).
    """

    def __init__(
        self,
        router: Router,
        pool: WorkerPool,
        config: ProxyConfig,
        metrics: Metrics,
        outliers: OutlierDetector | None = None,
    ) -> None:
        self.router = router
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.outliers = outliers
        self._session: aiohttp.ClientSession | None = None
        #: A generation's timeouts (and a call on the side's): connect, then between bytes.
        self._streaming = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_read=config.read_timeout
        )
        #: A short call's: connect, and the whole answer within ``tokenize_timeout``.
        self._short = aiohttp.ClientTimeout(
            total=config.tokenize_timeout, connect=config.connect_timeout
        )
        self._idle = ReadIdle(pool, config.read_timeout)

    async def start(self) -> None:
        """Open the connection pool (and lend it to the worker pool's health checks)."""
        # No connection limit per host: streams are long-lived and concurrent.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self._session = aiohttp.ClientSession(timeout=self._streaming, connector=connector)
        self.pool.bind(self._session)
        self._idle.start()

    async def close(self) -> None:
        """Close the connection pool. Idempotent."""
        self._idle.close()
        self.pool.bind(None)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the proxy's upstream connections are not open")
        return self._session

    # -- attempts ------------------------------------------------------------------------

    async def send(
        self,
        request: Request,
        call: Call,
        handle: Handler[_T],
        record: RequestRecord | None = None,
        *,
        prefer: int | None = None,
        exclude: Iterable[int] = (),
        attempt: Attempt[_T] | None = None,
    ) -> _T:
        """Route ``request`` and send ``call`` until an attempt succeeds; ``handle``'s result.

        :param record: told of each routed attempt and of the first token.
        :param prefer: a worker the first attempt goes to while it is routable
            (the one holding a Responses conversation); the router still
            records the decision. Later attempts are routed as usual.
        :param exclude: workers not to try (e.g. the one a stream broke on).
        :param attempt: runs one attempt instead of a plain call to the chosen
            worker (a disaggregated fleet's two legs); its failures name the
            worker that failed (:attr:`AttemptFailed.worker`), which is excluded.
        :raises ProxyError: 503 when no worker can be routed to at all.
        :raises AttemptFailed: the last failure, when every attempt failed.
        """
        run = self._attempt if attempt is None else attempt
        tried: list[int] = list(exclude)
        failure: AttemptFailed | None = None
        for k in range(self.config.retries + 1):
            try:
                decision = None
                if prefer is not None and not k and prefer not in tried:
                    others = [w for w in self.router.workers() if w != prefer]
                    with contextlib.suppress(NoWorkerAvailable):
                        decision = self._route(request, others)
                if decision is None:
                    decision = self._route(request, tried)
            except NoWorkerAvailable as e:
                if failure is None:
                    raise ProxyError(503, str(e), code="no_worker_available") from None
                break
            if k:
                self.metrics.retries.inc()
            if record is not None:
                record.routed(decision)
            try:
                return await run(call, decision, handle, record)
            except AttemptFailed as f:
                bad = decision.worker if f.worker is None else f.worker
                tried.append(bad)
                failure = f
                self.metrics.upstream_errors.labels(str(bad)).inc()
                log.warning(
                    "request %s: worker %d failed (%s)%s",
                    call.client_id,
                    bad,
                    f.reason,
                    "; retrying" if k < self.config.retries else "",
                )
        assert failure is not None
        raise failure

    def _route(self, request: Request, exclude: list[int]) -> Decision:
        """Route, with the workers that failed this request (and draining ones) excluded."""
        t0 = time.perf_counter()
        if self.pool.excluded:
            exclude = [*self.pool.excluded, *exclude]
        decision = self.router.route(request, exclude=exclude)
        elapsed = time.perf_counter() - t0
        self.metrics.routed_request(decision.worker, elapsed, decision.predicted_cached_tokens)
        return decision

    async def _attempt(
        self, call: Call, decision: Decision, handle: Handler[_T], record: RequestRecord | None
    ) -> _T:
        worker = decision.worker
        lc = Lifecycle(self.router, decision.request_id)
        response: aiohttp.ClientResponse | None = None
        try:
            response = await self.open(worker, call.path, call.data, call.headers)
            if response.status >= 500:
                try:
                    body = await response.read()
                except CONNECTION_ERRORS:
                    body = b""
                content_type = response.headers.get("Content-Type", "application/json")
                status = response.status
                raise AttemptFailed(f"answered {status}", status, body, content_type)
            result = await handle(decision, response, lc)
        except asyncio.CancelledError:
            # The client hung up (or the proxy is stopping): not the worker's
            # fault. Leaving closes the upstream connection, which aborts the
            # request on the worker.
            lc.abandon()
            raise
        except AttemptFailed:
            if self.outliers is not None:
                self.outliers.failed(worker)
            raise
        else:
            if self.outliers is not None:
                if lc.worker_failed:
                    self.outliers.failed(worker)
                else:
                    self.outliers.succeeded(worker)
            return result
        finally:
            lc.fail()  # a no-op when the request already ended
            if record is not None and lc.first:
                record.first = lc.first_at
            if response is not None:
                self.pool.untrack(worker, response)
                response.release()

    # -- calls ---------------------------------------------------------------------------

    async def open(
        self, worker: int, path: str, data: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """POST to ``worker``: its response, once the headers came; closed if the worker goes down.

        :raises AttemptFailed: see :meth:`_until_down`.
        """
        session = self._client()
        url = self.pool.url(worker) + path

        async def post() -> aiohttp.ClientResponse:
            body, sent_headers = _sendable(data, headers)
            return await session.post(url, data=body, headers=sent_headers)

        response = await self._until_down(worker, f"POST {path}", post)
        if not self.pool.workers[worker].healthy:  # went down as the answer arrived
            response.close()
            raise AttemptFailed(f"worker {worker} was marked unhealthy")
        self.pool.track(worker, response)
        self._idle.take_over(response)
        return response

    async def exchange(
        self, worker: int, path: str, data: bytes | str, headers: Mapping[str, str]
    ) -> tuple[int, bytes, str]:
        """POST to ``worker`` and read the whole answer: ``(status, body, content type)``.

        :raises AttemptFailed: see :meth:`_until_down`.
        """
        session = self._client()

        async def go() -> tuple[int, bytes, str]:
            url = self.pool.url(worker) + path
            body, sent = _sendable(data, headers)
            async with session.post(url, data=body, headers=sent, timeout=self._short) as r:
                content_type = r.headers.get("Content-Type", "application/json")
                return r.status, await r.read(), content_type

        return await self._until_down(worker, f"POST {path}", go)

    async def post_aside(
        self, worker: int, path: str, data: bytes, headers: Mapping[str, str]
    ) -> int:
        """POST to ``worker`` and read the answer; its status. Judges nothing of the worker.

        :raises aiohttp.ClientError: and the :data:`CONNECTION_ERRORS`, as they come.
        """
        # A prefill of a long conversation on a busy worker may take a while: the
        # request timeouts apply, not the tokenizer's, and a slow or failed call
        # made on the side says nothing about the worker's health (its checks do).
        session = self._client()
        if worker not in self.pool.workers:
            raise aiohttp.ClientConnectionError(f"worker {worker} left the fleet")
        url = self.pool.url(worker) + path
        body, sent = _sendable(data, headers)
        async with session.post(url, data=body, headers=sent, timeout=self._streaming) as r:
            await r.read()
            return r.status

    async def _until_down(
        self, worker: int, what: str, work: Callable[[], Coroutine[Any, Any, _T]]
    ) -> _T:
        """Await ``work()`` (a call to ``worker``), giving up if it is marked unhealthy meanwhile.

        ``work()`` runs in the caller's task (no task of its own: two loop turns
        fewer per call), which the worker's going down cancels; that
        cancellation becomes :class:`AttemptFailed`, unless another one (the
        client's hang-up, a deadline) came too.

        :raises AttemptFailed: the worker is unhealthy, became so, or cannot be
            reached (then it is marked unhealthy), or the call failed otherwise.
        """
        down = self.pool.down_future(worker)
        if down.done():
            raise AttemptFailed(f"worker {worker} is unhealthy")
        task = asyncio.current_task()
        assert task is not None
        cut = _CutOnDown(task)
        down.add_done_callback(cut)
        try:
            return await work()
        except asyncio.CancelledError:
            if not cut.fired or cut.uncancel():
                raise
            raise AttemptFailed(f"worker {worker} was marked unhealthy") from None
        except CONNECTION_ERRORS as e:
            cut.uncancel()
            reason = f"{what}: {type(e).__name__} {e}".strip()
            self.pool.mark_down(worker, reason)
            raise AttemptFailed(reason) from None
        except aiohttp.ClientError as e:
            cut.uncancel()
            raise AttemptFailed(f"{what}: {type(e).__name__} {e}".strip()) from None
        finally:
            cut.active = False
            down.remove_done_callback(cut)


class _CutOnDown:
    """A worker's *down* callback: cancels the task awaiting a call to it, while active."""

    __slots__ = ("active", "fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.active = True
        self.fired = False

    def __call__(self, down: asyncio.Future[None]) -> None:
        if self.active:  # (the callback may run after the call ended)
            self.fired = True
            self.task.cancel()

    def uncancel(self) -> int:
        """Withdraw the cancellation this made, if it made one: the task's requests left.

        (Before Python 3.11 tasks do not count them: 0.)
        """
        if not self.fired:
            return 0
        self.fired = False
        uncancel = getattr(self.task, "uncancel", None)  # Python >= 3.11
        return int(uncancel()) if uncancel is not None else 0

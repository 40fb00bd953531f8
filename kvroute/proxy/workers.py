"""The proxy's worker table: addresses, health, served models and reported load.

Worker ids are the membership's (:mod:`kvroute.fleet.membership`): the
positions of the ``--worker`` flags, or ids derived from their URLs for
workers that join at run time. The pool follows the membership through
:meth:`WorkerPool.add`, :meth:`~WorkerPool.exclude` and
:meth:`~WorkerPool.remove` (the proxy's :mod:`~kvroute.proxy.fleet` calls
them); a worker that joins takes requests once its first health check
passes, and an *excluded* worker (draining, or leaving) takes no new ones:
the proxy routes around it and never picks it to tokenize. Health has one
owner, :class:`WorkerPool`: it marks a worker unhealthy in the router when
a request cannot reach it (at once) or when ``unhealthy_after`` health
checks in a row fail, and healthy again when its ``GET /health`` answers 200.
Marking a worker unhealthy also resolves its *down* future and closes its
open upstream responses, so requests waiting on it fail over at once
instead of waiting for their read timeout.

A worker can also be *ejected* for a while (see
:mod:`~kvroute.proxy.outliers`): out of routing like an unhealthy worker,
but its running requests go on, its health checks go on, and it returns by
itself when the time is up (:meth:`WorkerPool.release_ejections`, run at each
health round), or at once when no other worker is left to route to.

Each health round also reads ``/v1/models`` (until a worker's models are
known, and after it comes back) and, with ``scrape_metrics``, the worker's
Prometheus ``/metrics``: vLLM's ``num_requests_waiting`` and
``kv_cache_usage_perc`` (SGLang's ``num_queue_reqs`` and ``token_usage``)
become the router's worker metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from ..router import Router
from .config import ProxyConfig, WorkerSpec

__all__ = ["WorkerPool", "WorkerState", "parse_worker_metrics"]

log = logging.getLogger("kvroute.proxy")

# Prometheus series read from a worker: name -> router metric.
_WAITING: Final = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_KV_USAGE: Final = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")


def parse_worker_metrics(text: str) -> tuple[float | None, float | None]:
    """``(waiting requests, KV usage)`` from a worker's Prometheus text, None when absent.

    Waiting requests are summed over label sets (engines); KV usage is their maximum.

    >>> parse_worker_metrics('vllm:num_requests_waiting{model_name="m"} 3\\n'
    ...                      'vllm:kv_cache_usage_perc{model_name="m"} 0.25\\n')
    (3.0, 0.25)
    >>> parse_worker_metrics("# nothing\\n")
    (None, None)
    """
    waiting: float | None = None
    usage: float | None = None
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        if name not in _WAITING and name not in _KV_USAGE:
            continue
        # name{labels} value [timestamp]; label values may hold spaces
        rest = line[line.rfind("}") + 1 :] if line[name_end] == "{" else line[name_end:]
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if value != value or value < 0:  # NaN or negative: ignore
            continue
        if name in _WAITING:
            waiting = (waiting or 0.0) + value
        else:
            usage = max(usage or 0.0, min(value, 1.0))
    return waiting, usage


@dataclass(eq=False)
class WorkerState:
    """One worker as the proxy sees it."""

    id: int
    spec: WorkerSpec
    healthy: bool = True
    failures: int = 0
    models: list[dict[str, Any]] = field(default_factory=list)
    models_known: bool = False
    down: asyncio.Future[None] | None = None
    responses: set[aiohttp.ClientResponse] = field(default_factory=set)
    #: False until its first health check passes (a worker that joined at run time).
    checked: bool = True
    #: Waiting requests and KV usage from the worker's last ``/metrics`` (None: never said).
    waiting: float | None = None
    kv_usage: float | None = None
    #: Ejected until this time (the pool's clock), or None.
    ejected_until: float | None = None

    @property
    def url(self) -> str:
        """The worker's base URL."""
        return self.spec.url


class WorkerPool:
    """Workers' health and metadata, kept in step with the router.

    Use from the proxy's event loop only (the router itself is thread-safe).

    :param router: the router whose health flags this pool owns.
    :param config: the proxy's configuration (workers and health options).
    :param workers: the workers to start with, by id (default: ``config.workers``
        by position).
    """

    def __init__(
        self, router: Router, config: ProxyConfig, workers: Mapping[int, WorkerSpec] | None = None
    ) -> None:
        self.router = router
        self.config = config
        start = dict(enumerate(config.workers)) if workers is None else workers
        self.workers: dict[int, WorkerState] = {i: WorkerState(i, s) for i, s in start.items()}
        #: Workers that take no new requests: draining, or on their way out.
        self.excluded: frozenset[int] = frozenset()
        self._session: aiohttp.ClientSession | None = None
        self._rotation = itertools.count()
        self._model_ids: frozenset[str] | None = None
        self._lora_adapters: frozenset[str] = frozenset()
        #: Called with a worker's id when it turns healthy again.
        self.on_up: Callable[[int], None] | None = None
        #: Called with a worker's id when its ejection ends.
        self.on_return: Callable[[int], None] | None = None
        #: Called with a worker's id when it leaves the pool.
        self.on_remove: list[Callable[[int], None]] = []
        #: The clock of ejection times (seconds, monotonic).
        self.clock: Callable[[], float] = time.monotonic
        #: Parts that add their per-worker figures to :meth:`snapshot` (``/health``).
        self.reporters: list[Callable[[int], Mapping[str, Any]]] = []

    def bind(self, session: aiohttp.ClientSession | None) -> None:
        """Use ``session`` for health checks (None: unbind)."""
        self._session = session

    # -- membership --------------------------------------------------------------------

    def add(self, worker: int, spec: WorkerSpec) -> None:
        """A worker joins: known to the router, unhealthy until its first health check passes."""
        if worker in self.workers:
            self.workers[worker].spec = spec
            return
        self.workers[worker] = WorkerState(worker, spec, healthy=False, checked=False)
        self.router.add_worker(worker)
        self.router.mark_unhealthy(worker)
        log.info("worker %d (%s) joined; it takes requests once healthy", worker, spec.url)

    def exclude(self, worker: int) -> None:
        """Route no new request to ``worker`` and never pick it (it drains, or leaves)."""
        self.excluded = self.excluded | {worker}

    def remove(self, worker: int) -> None:
        """Forget ``worker``: requests still waiting on it fail over, its open responses close.

        The router's entry is the caller's to remove (after its KV events stop).
        """
        state = self.workers.pop(worker, None)
        self.excluded = self.excluded - {worker}
        if state is None:
            return
        if state.down is not None and not state.down.done():
            state.down.set_result(None)
        for resp in list(state.responses):
            resp.close()
        state.responses.clear()
        self._models_changed()
        for hook in self.on_remove:
            hook(worker)
        log.info("worker %d (%s) left", worker, state.url)

    # -- health ------------------------------------------------------------------------

    def url(self, worker: int) -> str:
        """A worker's base URL."""
        return self.workers[worker].url

    def down_future(self, worker: int) -> asyncio.Future[None]:
        """A future resolved when ``worker`` is marked unhealthy (already done while it is,
        or once it left)."""
        state = self.workers.get(worker)
        if state is None:
            gone = asyncio.get_running_loop().create_future()
            gone.set_result(None)
            return gone
        if state.down is None:
            state.down = asyncio.get_running_loop().create_future()
            if not state.healthy:
                state.down.set_result(None)
        return state.down

    def mark_down(self, worker: int, reason: str) -> None:
        """Mark ``worker`` unhealthy; fail over requests waiting on it. (A no-op once it left.)"""
        state = self.workers.get(worker)
        if state is None:
            return
        if state.healthy:
            state.healthy = False
            self.router.mark_unhealthy(worker)
            log.warning("worker %d (%s) marked unhealthy: %s", worker, state.url, reason)
        if state.down is not None and not state.down.done():
            state.down.set_result(None)
        for resp in list(state.responses):
            resp.close()
        state.responses.clear()
        if not self.healthy():
            # An ejection must never empty the fleet: with no other worker
            # left, the ejected ones are the best there is.
            self.release_ejections(force=True)

    def mark_up(self, worker: int) -> None:
        """Mark ``worker`` healthy again. (A no-op once it left.)"""
        state = self.workers.get(worker)
        if state is None:
            return
        state.failures = 0
        if not state.healthy:
            state.healthy = True
            state.down = None
            state.models_known = False  # it may have restarted with other models
            self._models_changed()
            if state.ejected_until is None:
                self.router.mark_healthy(worker)
            again = "is healthy again" if state.checked else "is healthy: it takes requests"
            state.checked = True
            log.info("worker %d (%s) %s", worker, state.url, again)
            if self.on_up is not None:
                self.on_up(worker)

    def track(self, worker: int, response: aiohttp.ClientResponse) -> None:
        """Close ``response`` if ``worker`` is marked unhealthy (or leaves) while it is open."""
        state = self.workers.get(worker)
        if state is None:
            response.close()
            return
        state.responses.add(response)

    def untrack(self, worker: int, response: aiohttp.ClientResponse) -> None:
        """Forget ``response`` (it is finished)."""
        state = self.workers.get(worker)
        if state is not None:
            state.responses.discard(response)

    def healthy(self) -> list[int]:
        """Healthy worker ids that are not ejected (those routing may use), ascending."""
        return [i for i, s in self.workers.items() if s.healthy and s.ejected_until is None]

    def is_routable(self, worker: int) -> bool:
        """Whether ``worker`` is healthy and not ejected."""
        state = self.workers[worker]
        return state.healthy and state.ejected_until is None

    # -- ejection ----------------------------------------------------------------------

    def ejected_count(self) -> int:
        """Workers ejected now."""
        return sum(s.ejected_until is not None for s in self.workers.values())

    def eject(self, worker: int, seconds: float, reason: str) -> None:
        """Take ``worker`` out of routing for ``seconds``; its running requests go on."""
        state = self.workers[worker]
        state.ejected_until = self.clock() + seconds
        if state.healthy:
            self.router.mark_unhealthy(worker)
        log.warning(
            "worker %d (%s) ejected for %.1f s: %s", worker, state.url, seconds, reason
        )

    def release_ejections(self, *, force: bool = False) -> list[int]:
        """Return the workers whose ejection time is up (every ejected one with ``force``).

        :returns: the workers returned, ascending.
        """
        now = self.clock()
        back = []
        for w, state in self.workers.items():
            until = state.ejected_until
            if until is None or (until > now and not force):
                continue
            state.ejected_until = None
            back.append(w)
            if state.healthy:
                self.router.mark_healthy(w)
            log.info("worker %d (%s): ejection over, on probation", w, state.url)
            if self.on_return is not None:
                self.on_return(w)
        return back

    def pick(self, exclude: Iterable[int] = ()) -> int | None:
        """A healthy worker not in ``exclude`` nor excluded, in rotation (to tokenize and count)."""
        skip = set(exclude) | self.excluded
        ids = [i for i in self.healthy() if i not in skip]
        if not ids:
            return None
        return ids[next(self._rotation) % len(ids)]

    # -- models ------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The union of the workers' ``/v1/models`` entries, by id, in worker order."""
        seen: dict[str, dict[str, Any]] = {}
        for state in self.workers.values():
            for entry in state.models:
                seen.setdefault(str(entry.get("id")), entry)
        return list(seen.values())

    def model_ids(self) -> frozenset[str] | None:
        """The served model ids, or None while no worker has said."""
        return self._model_ids

    def lora_adapters(self) -> frozenset[str]:
        """The model ids the workers list as LoRA adapters (vLLM gives them a ``parent``)."""
        return self._lora_adapters

    def _models_changed(self) -> None:
        # Every request reads these two: kept up to date here, not rebuilt per request.
        entries = self.models()
        known = any(s.models_known for s in self.workers.values())
        self._model_ids = frozenset(str(m.get("id")) for m in entries) if known else None
        self._lora_adapters = frozenset(str(m.get("id")) for m in entries if m.get("parent"))

    # -- checks ------------------------------------------------------------------------

    async def _get(self, worker: int, path: str) -> tuple[int, bytes]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout)
        async with self._session.get(self.url(worker) + path, timeout=timeout) as r:
            return r.status, await r.read()

    async def check(self, worker: int) -> None:
        """One health check of ``worker`` (and its models and metrics when healthy)."""
        state = self.workers.get(worker)
        if state is None:
            return
        try:
            status, _ = await self._get(worker, "/health")
            ok = status == 200
            reason = f"GET /health answered {status}"
        except aiohttp.ClientConnectorError as e:
            self.mark_down(worker, f"health check: {e}")
            return
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            ok, reason = False, f"health check failed: {type(e).__name__} {e}".strip()
        if not ok:
            state.failures += 1
            if state.healthy and state.failures >= self.config.unhealthy_after:
                self.mark_down(worker, reason)
            return
        self.mark_up(worker)
        if not state.models_known:
            await self._read_models(state)
        if self.config.scrape_metrics:
            await self._read_metrics(state)

    async def _read_models(self, state: WorkerState) -> None:
        import json

        try:
            status, data = await self._get(state.id, "/v1/models")
            entries = json.loads(data).get("data") if status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, AttributeError):
            return
        if isinstance(entries, list):
            state.models = [e for e in entries if isinstance(e, dict) and "id" in e]
            state.models_known = True
            self._models_changed()

    async def _read_metrics(self, state: WorkerState) -> None:
        try:
            status, data = await self._get(state.id, "/metrics")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return
        if status != 200:
            return
        waiting, usage = parse_worker_metrics(data.decode("utf-8", errors="replace"))
        state.waiting, state.kv_usage = waiting, usage
        if waiting is not None or usage is not None:
            with contextlib.suppress(ValueError, TypeError):
                self.router.update_worker_metrics(
                    state.id, waiting_requests=waiting, kv_usage=usage
                )

    async def check_all(self) -> None:
        """One health round over every worker, concurrently (ejections that are over end first)."""
        self.release_ejections()
        await asyncio.gather(*(self.check(w) for w in list(self.workers)))

    async def run(self) -> None:
        """Check every ``health_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking
                log.exception("health round failed")

    def snapshot(self) -> list[Mapping[str, Any]]:
        """Per worker (for ``/health``): id, url, healthy (routable), draining, and its state.

        ``state`` is ``healthy``, ``unhealthy`` (its checks or a request
        failed to reach it) or ``ejected`` (``ejected_for``: seconds left);
        then what each of :attr:`reporters` adds.
        """
        now = self.clock()
        out: list[Mapping[str, Any]] = []
        for s in self.workers.values():
            entry: dict[str, Any] = {
                "id": s.id,
                "url": s.url,
                "healthy": self.is_routable(s.id),
                "draining": s.id in self.excluded,
            }
            if s.ejected_until is not None:
                entry["state"] = "ejected"
                entry["ejected_for"] = round(max(s.ejected_until - now, 0.0), 3)
            else:
                entry["state"] = "healthy" if s.healthy else "unhealthy"
            for report in self.reporters:
                entry.update(report(s.id))
            out.append(entry)
        return out

"""The admin API: the fleet's workers, listed, added, removed and drained over HTTP.

Served only when the proxy has an admin token (``--admin-token``, or
``$KVROUTE_ADMIN_TOKEN``); without one these paths do not exist (404). Every
request must carry ``Authorization: Bearer TOKEN`` (compared in constant
time), else it gets 401 and nothing changes.

======  ==============================  =============================================
GET     ``/admin/workers``              every worker: ``{"workers": [...]}``
GET     ``/admin/workers/{id}``         one worker
POST    ``/admin/workers``              add one: the body is a worker mapping
                                        (``url``, ``events_endpoint``, ...);
                                        201 (new) or 200 (known: the admin's claim
                                        is updated), with the worker
DELETE  ``/admin/workers/{id}``         remove it now (its requests in flight are
                                        cut); 200 with the worker as it was
POST    ``/admin/workers/{id}/drain``   no new requests; those in flight finish,
                                        then it leaves; 202 with the worker
======  ==============================  =============================================

A worker is answered as ``{"id", "name", "url", "spec", "state", "source",
"sources", "healthy", "active_requests", "load"}``: ``spec`` is its
:meth:`~kvroute.fleet.spec.WorkerSpec.to_mapping`, ``state`` is
``"active"``, ``"draining"`` or (in a DELETE's answer) ``"removed"``,
``sources`` every source naming it (:mod:`kvroute.fleet.membership` says
which one wins), ``active_requests`` its requests in flight through this
proxy, ``load`` the router's view of it. Ids are exact in JSON (below 2**53).

The answers to POST, DELETE and drain come once the change is applied to
the router and the worker pool: after a drain's answer no new request goes
to the worker; a new worker's answer comes after its first health check
(``healthy`` says how it went; it takes requests once healthy).

Errors are ``{"error": {"message", "type", "param", "code"}}`` (the OpenAI
shape every endpoint of the proxy uses), with ``code`` one of
``unauthorized``, ``invalid_worker``, ``invalid_json``, ``worker_not_found``,
``worker_draining``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..fleet.membership import Member
from ..fleet.spec import WorkerSpec
from .errors import ProxyError, error_body
from .fleet import ProxyFleet

__all__ = ["AdminApi"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(error: ProxyError) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="kvroute-admin"'} if error.status == 401 else None
    return web.json_response(error_body("openai", error), status=error.status, headers=headers)


class AdminApi:
    """The ``/admin/workers`` endpoints over a proxy's fleet.

    :param token: the bearer token every request must carry.
    :param fleet: the proxy's fleet (its membership, pool and router).
    :raises ValueError: an empty token.
    """

    def __init__(self, token: str, fleet: ProxyFleet) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self._token = token.encode()
        self.fleet = fleet

    def install(self, app: web.Application) -> None:
        """Add the admin routes to ``app``."""
        app.router.add_get("/admin/workers", self._guard(self._list))
        app.router.add_post("/admin/workers", self._guard(self._add))
        app.router.add_get("/admin/workers/{id}", self._guard(self._get))
        app.router.add_delete("/admin/workers/{id}", self._guard(self._delete))
        app.router.add_post("/admin/workers/{id}/drain", self._guard(self._drain))

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (compared in constant time)."""
        if header is None:
            return False
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    def _guard(self, handler: _Handler) -> _Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.authorized(request.headers.get("Authorization")):
                return _error(
                    ProxyError(401, "the admin API needs 'Authorization: Bearer <admin token>'",
                               code="unauthorized")
                )  # fmt: skip
            try:
                return await handler(request)
            except ProxyError as e:
                return _error(e)

        return guarded

    # -- answers -------------------------------------------------------------------------

    def describe(self, member: Member, state: str | None = None) -> dict[str, Any]:
        """A worker as the admin API answers it."""
        pool = self.fleet.pool
        wid = member.id
        health = pool.workers.get(wid)
        try:
            load: dict[str, Any] | None = dict(self.fleet.router.load(wid))
        except KeyError:
            load = None
        return {
            "id": wid,
            "name": member.spec.label,
            "url": member.spec.url,
            "spec": member.spec.to_mapping(),
            "state": state or member.state,
            "source": member.source,
            "sources": list(self.fleet.membership.sources(wid)),
            "healthy": None if health is None else health.healthy,
            "active_requests": 0 if load is None else int(load.pop("active_requests")),
            "load": load,
        }

    def _member(self, request: web.Request) -> Member:
        text = request.match_info["id"]
        member = None
        if text.isdigit():
            member = self.fleet.membership.get(int(text))
        if member is None:
            raise ProxyError(404, f"no worker with id {text!r}", code="worker_not_found")
        return member

    # -- endpoints -----------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.StreamResponse:
        members = self.fleet.membership.members().values()
        return web.json_response({"workers": [self.describe(m) for m in members]})

    async def _get(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.describe(self._member(request)))

    async def _add(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as e:
            raise ProxyError(400, f"the body is not JSON: {e}", code="invalid_json") from None
        try:
            spec = WorkerSpec.from_mapping(body)
        except (ValueError, TypeError) as e:
            raise ProxyError(400, str(e), code="invalid_worker") from None
        self._check_events(spec)
        membership = self.fleet.membership
        known = membership.by_url(spec.url)
        if known is not None and known.state == "draining":
            raise ProxyError(
                409,
                f"worker {known.id} ({spec.url}) is draining; add it again once it has left",
                code="worker_draining",
            )
        try:
            member = membership.add(spec, source="admin")
        except ValueError as e:  # pragma: no cover - a 52-bit id collision
            raise ProxyError(409, str(e), code="invalid_worker") from None
        await self.fleet.settled()
        await self.fleet.pool.check(member.id)
        current = membership.get(member.id) or member
        return web.json_response(self.describe(current), status=200 if known else 201)

    def _check_events(self, spec: WorkerSpec) -> None:
        """A worker's events must be followable: a known format, a transport that fits it."""
        from .event_sources import check_worker_events

        config = self.fleet.config
        try:
            check_worker_events(spec, config.events_format, sync_url=config.sync_url)
        except ValueError as e:
            raise ProxyError(400, str(e), code="invalid_worker") from None

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        member = self._member(request)
        gone = self.fleet.membership.remove(member.id, source="admin")
        described = self.describe(gone or member, "removed")
        await self.fleet.settled()
        return web.json_response(described)

    async def _drain(self, request: web.Request) -> web.StreamResponse:
        member = self._member(request)
        draining = self.fleet.membership.drain(member.id, source="admin") or member
        await self.fleet.settled()
        current = self.fleet.membership.get(member.id)
        if current is None:  # nothing was in flight: it has left already
            return web.json_response(self.describe(draining, "removed"), status=202)
        return web.json_response(self.describe(current), status=202)

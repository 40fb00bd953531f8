"""Pass-through endpoints: ``/v1/embeddings``, ``/tokenize``, ``/detokenize``, sent to one worker.

None of them is routed by prefix: an embedding request fills no prefix
cache that a later request could reuse (vLLM runs pooling models without
prefix caching), and tokenizing is the same on every worker. So:

- ``/v1/embeddings`` goes to the least-loaded healthy worker, by the
  router's view (requests in flight plus the worker's reported waiting
  requests; ties in rotation). It is not tracked as load itself: it is short
  and leaves nothing behind.
- ``/tokenize`` and ``/detokenize`` go to the healthy workers in rotation.

The body must be a JSON object; its ``model`` is mapped and checked as for
generation (a 404 for a model not served). The first answer below 500 is
passed on (a 4xx in the proxy's OpenAI error shape); a worker that cannot be
reached or answers 5xx is skipped for the next one, each worker tried once.
No healthy worker: 503. Every worker failed: the last one's 5xx, or 502.
Answers carry ``X-Request-Id`` and ``X-Kvroute-Worker``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from aiohttp import web

from ..router import Router
from .errors import ProxyError
from .prepare import Preparer
from .relay import WORKER_HEADER, error_response
from .upstream import CONNECTION_ERRORS, AttemptFailed, Upstream

__all__ = ["PASS_THROUGH_PATHS", "PassThrough"]

#: The endpoints this part serves.
PASS_THROUGH_PATHS = ("/v1/embeddings", "/tokenize", "/detokenize")


class PassThrough:
    """Serves the pass-through endpoints through one healthy worker.

    :param router: its load view picks the embeddings worker.
    :param preparer: reads the body, maps the model, builds the forwarded headers.
    :param upstream: the calls to workers.
    """

    def __init__(self, router: Router, preparer: Preparer, upstream: Upstream) -> None:
        self.router = router
        self.preparer = preparer
        self.upstream = upstream

    def least_loaded(self, exclude: Iterable[int] = ()) -> int | None:
        """The healthy worker outside ``exclude`` with the least load (ties: in rotation)."""
        pool = self.upstream.pool
        first = pool.pick(exclude)  # rotation: which of equals comes first
        if first is None:
            return None
        skip = set(exclude)
        ids = [w for w in pool.healthy() if w not in skip]
        start = ids.index(first)

        def load(w: int) -> float:
            try:
                view = self.router.load(w)
            except KeyError:  # left the router while the pool still lists it
                return float("inf")
            return float(view["active_requests"]) + float(view["waiting_requests"])

        rotated = ids[start:] + ids[:start]
        return min(rotated, key=load)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """Forward ``request`` to a worker and pass its answer on.

        :raises ProxyError: 4xx for the body or the model; 503 with no healthy
            worker; 502 when no worker answered at all.
        """
        body, raw = await self.preparer.read_json(request)
        data = json.dumps(body).encode() if self.preparer.models.resolve(body) else raw
        client_id = self.preparer.client_id(request)
        headers = self.preparer.forward_headers(request, client_id)
        embeddings = request.path == "/v1/embeddings"
        pool = self.upstream.pool
        tried: list[int] = []
        failure: AttemptFailed | None = None
        while (w := self.least_loaded(tried) if embeddings else pool.pick(tried)) is not None:
            tried.append(w)
            response = None
            try:
                response = await self.upstream.open(w, request.path, data, headers)
                answer = await response.read()
                status = response.status
                ctype = response.headers.get("Content-Type", "application/json")
            except AttemptFailed as e:
                failure = e
                continue
            except CONNECTION_ERRORS as e:
                pool.mark_down(w, f"reading the answer: {type(e).__name__} {e}")
                failure = AttemptFailed(f"worker {w}: {type(e).__name__}")
                continue
            finally:
                if response is not None:
                    pool.untrack(w, response)
                    response.release()
            if status >= 500:
                failure = AttemptFailed(f"worker {w} answered {status}", status, answer, ctype)
                continue
            out = {"Content-Type": ctype, "X-Request-Id": client_id, WORKER_HEADER: str(w)}
            if status >= 400:
                return error_response("openai", status, answer, out)
            return web.Response(status=status, body=answer, headers=out)
        if failure is None:
            raise ProxyError(503, "no healthy worker", code="no_worker_available")
        if failure.status is not None:
            out = {"Content-Type": failure.content_type, "X-Request-Id": client_id}
            return error_response("openai", failure.status, failure.body, out)
        raise ProxyError(502, f"no worker could serve the request: {failure.reason}",
                         code="upstream_error")  # fmt: skip

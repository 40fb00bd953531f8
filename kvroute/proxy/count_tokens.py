"""``POST /v1/messages/count_tokens``: the workers' count, else the prompt as routing tokenizes it.

The body is checked as a Messages request (no ``max_tokens`` needed) and
its model mapped. It is forwarded to the healthy workers in turn: the first
answer below 500 is passed on (a 4xx in Anthropic's shape). When the
workers lack the endpoint (404 / 405 not about the model) or none answers,
the prompt is tokenized as for routing a ``/v1/messages`` request (see
:meth:`~kvroute.proxy.prepare.Preparer.tokens`) and the answer is
``{"input_tokens": N}``.
"""

from __future__ import annotations

import json

from aiohttp import web

from .anthropic import validate_messages
from .call import Call
from .errors import lacks_endpoint, upstream_message
from .prepare import Preparer
from .relay import error_response
from .upstream import AttemptFailed, Upstream

__all__ = ["count_tokens"]


async def count_tokens(
    request: web.Request, prepare: Preparer, upstream: Upstream
) -> web.StreamResponse:
    """``{"input_tokens": N}`` for a ``count_tokens`` request, or the worker's own answer.

    :raises ProxyError: the body is invalid, the model is not served, or the
        proxy cannot tokenize the prompt either.
    """
    body, raw = await prepare.read_json(request)
    validate_messages(body, count_tokens=True)
    data = json.dumps(body).encode() if prepare.models.resolve(body) else raw
    client_id = prepare.client_id(request)
    headers = prepare.forward_headers(request, client_id)
    tried: set[int] = set()
    while (w := upstream.pool.pick(tried)) is not None:
        try:
            status, answer, ctype = await upstream.exchange(w, request.path, data, headers)
        except AttemptFailed:
            tried.add(w)
            continue
        if status >= 500:
            tried.add(w)
            continue
        if status < 400:
            return web.Response(status=status, body=answer, headers={"Content-Type": ctype})
        try:
            obj = json.loads(answer)
        except ValueError:
            obj = None
        message = upstream_message(obj)
        if lacks_endpoint(status, message):
            break  # the workers serve no count_tokens endpoint
        return error_response(
            "anthropic", status, answer, {"Content-Type": ctype},
            fallback=f"the worker could not count tokens ({status})",
        )  # fmt: skip
    # vLLM's Messages request model (the render endpoint parses it) requires
    # max_tokens, which counting has no use for: ask for the least.
    render_body = body if "max_tokens" in body else {**body, "max_tokens": 1}
    call = Call(
        kind="messages",
        path="/v1/messages",
        body=body,
        data=json.dumps(render_body, ensure_ascii=False).encode(),
        stream=False,
        strip_usage=False,
        client_id=client_id,
        headers=headers,
    )
    return web.json_response({"input_tokens": len(await prepare.tokens(call))})

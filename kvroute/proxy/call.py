"""A client's call as the proxy forwards it: its kind, its API, and what goes to a worker.

A leaf of the proxy (it imports nothing of kvroute), so every part may use it:
:mod:`~kvroute.proxy.prepare` makes a :class:`Call`,
:mod:`~kvroute.proxy.upstream` sends it, :mod:`~kvroute.proxy.relay`
answers it, :mod:`~kvroute.proxy.warmup` continues it.

>>> call = Call("chat", "/v1/chat/completions", {"model": "m"}, b'{"model": "m"}',
...             stream=False, strip_usage=False, client_id="r1", headers={})
>>> call.api, api_of("messages")
('openai', 'anthropic')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Api", "Call", "Kind", "api_of"]

#: The generation endpoints a prompt comes from.
Kind = Literal["completions", "chat", "messages", "responses"]
#: Which API's conventions a response follows.
Api = Literal["openai", "anthropic"]


def api_of(kind: Kind) -> Api:
    """The API whose conventions a request of ``kind`` is answered in."""
    return "anthropic" if kind == "messages" else "openai"


@dataclass(frozen=True, slots=True)
class Call:
    """One client request on its way to a worker; the same for every attempt.

    :param kind: the endpoint it came to.
    :param path: the path it is posted to on a worker.
    :param body: the parsed body, as sent (model mapped, usage asked for).
    :param data: the bytes sent: the client's own when the body is unchanged.
    :param stream: the client asked for a stream.
    :param strip_usage: the proxy asked for the usage chunk the client did not
        (:class:`~kvroute.proxy.openai.OpenAIStream` drops it again).
    :param client_id: the request id (the client's ``X-Request-Id``, else new).
    :param headers: the headers sent to the worker.
    :param strip_token_ids: the proxy asked for the stream's token ids (so
        that it can be continued elsewhere, see :mod:`~kvroute.proxy.migration`)
        and the client did not: they are stripped from its chunks.
    """

    kind: Kind
    path: str
    body: dict[str, Any]
    data: bytes
    stream: bool
    strip_usage: bool
    client_id: str
    headers: dict[str, str]
    strip_token_ids: bool = False

    @property
    def api(self) -> Api:
        """The API whose conventions the answer follows."""
        return api_of(self.kind)

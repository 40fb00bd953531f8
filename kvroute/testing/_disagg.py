"""The mock worker's prefill/decode roles: vLLM's NIXL flow and SGLang's bootstrap flow, mocked.

A :class:`~kvroute.testing.MockWorker` started with ``role="prefill"`` or
``role="decode"`` speaks the disaggregation protocol its ``disagg_protocol``
names, as the engines' HTTP servers do, so a proxy under test runs the real
message flow. The KV transfer itself is mocked over HTTP: the prefill mock
*offers* a request's full prompt blocks (their token ids) for one pull, and the
decode mock *pulls* them at ``POST /kvroute/mock/kv_pull`` on the address the
request names, refusing the request when nothing was offered.

**vLLM** (NixlConnector, as vLLM's disaggregated-serving proxy drives it):

- prefill: a request whose ``kv_transfer_params`` has ``do_remote_decode``
  (the proxy sends ``max_tokens`` 1, no stream) is served as usual (its blocks
  cached, its KV events published); its answer gains ``kv_transfer_params``
  ``{do_remote_prefill: true, do_remote_decode: false, remote_block_ids,
  remote_engine_id, remote_request_id, remote_host, remote_port, tp_size}``
  (the mock's HTTP port stands in for NIXL's side channel) and the blocks stay
  offered for ``transfer_timeout`` seconds (vLLM holds them until the decode
  side has read them);
- decode: a request whose ``kv_transfer_params`` has ``do_remote_prefill``
  pulls ``remote_block_ids`` of ``remote_request_id`` from
  ``remote_host:remote_port``; the engine id and block ids must be the offered
  ones and the tokens this prompt's first ones, else the request fails (500).
  Without the parameters a request is served as usual (vLLM's decode
  instance can prefill: conditional disaggregation).

**SGLang** (``--disaggregation-mode prefill|decode``, as its load balancer
drives it: the same request to both at once, with ``bootstrap_host``,
``bootstrap_port`` and ``bootstrap_room``):

- prefill: generates one token, offers the blocks under the room on its
  bootstrap server (``bootstrap_port``, serving the same routes), and answers
  once the decode side has pulled them, or fails after ``transfer_timeout``;
- decode: the bootstrap fields are required (a decode server cannot prefill
  alone: 400 without them); pulls the room from
  ``bootstrap_host:bootstrap_port``, waiting for the prefill side to offer it.

A decode mock counts the transferred tokens as computed (no prefill delay for
them) and reports them in ``cached_tokens``, as vLLM counts a remote prefill's
tokens; it caches the received blocks, publishing their ``BlockStored``, as the
real decode engine does. The mock's KV events stay in vLLM's format whatever
the protocol.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import aiohttp
from aiohttp import web

from ._engine import Engine
from ._tokenizer import RequestError

if TYPE_CHECKING:
    from ._http import HttpApi

__all__ = ["MAX_TOKENS_OVERRIDE", "PULL_PATH", "DisaggMock", "Protocol", "TransferStats"]

#: A decode mock pulls a request's KV from its prefill mock at this path.
PULL_PATH: Final = "/kvroute/mock/kv_pull"
#: The generation routes that take part in a disaggregated flow.
_PATHS: Final = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/messages"})

#: When set, the output length every generation endpoint uses (an SGLang prefill
#: server generates one token whatever the request asks).
MAX_TOKENS_OVERRIDE: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "kvroute_mock_max_tokens", default=None
)

Protocol = Literal["vllm", "sglang"]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class TransferStats:
    """What a mock's transfers came to (counters over its life).

    :ivar offered: requests whose blocks a prefill mock offered.
    :ivar pulled: offers a decode side pulled (counted on the prefill mock).
    :ivar refused: pulls a prefill mock refused (nothing offered, or not these blocks).
    :ivar expired: offers nobody pulled within ``transfer_timeout``.
    :ivar received: requests whose KV a decode mock received.
    :ivar received_tokens: tokens it received.
    """

    offered: int = 0
    pulled: int = 0
    refused: int = 0
    expired: int = 0
    received: int = 0
    received_tokens: int = 0


@dataclass(eq=False)
class _Offer:
    tokens: tuple[int, ...]
    block_ids: list[int]
    expires: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pulled: asyncio.Event = field(default_factory=asyncio.Event)


def _bad(message: str, status: int = 400) -> RequestError:
    return RequestError(message, status)


class DisaggMock:
    """One mock worker's role in a disaggregated flow: an aiohttp middleware and a route.

    :param engine: the mock engine (its cache, log and tokenizer).
    :param role: ``"both"`` (nothing changes), ``"prefill"`` or ``"decode"``.
    :param protocol: ``"vllm"`` or ``"sglang"``.
    :param transfer_timeout: seconds an offer waits for its pull (and a pull for its offer).
    :raises ValueError: an unknown role or protocol, or a timeout <= 0.
    """

    def __init__(
        self, engine: Engine, role: str, protocol: str, transfer_timeout: float = 30.0
    ) -> None:
        if role not in ("both", "prefill", "decode"):
            raise ValueError(f"role must be both, prefill or decode, not {role!r}")
        if protocol not in ("vllm", "sglang"):
            raise ValueError(f"disagg_protocol must be vllm or sglang, not {protocol!r}")
        if not transfer_timeout > 0:
            raise ValueError("transfer_timeout must be > 0")
        self.engine = engine
        self.role = role
        self.protocol: Protocol = protocol  # type: ignore[assignment]
        self.transfer_timeout = float(transfer_timeout)
        #: vLLM's ``remote_engine_id`` of this worker.
        self.engine_id = uuid.uuid4().hex
        self.api: HttpApi | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self._offers: dict[tuple[str, Any], _Offer] = {}
        self._block_ids = itertools.count(1)
        self._stats = TransferStats()

    @property
    def stats(self) -> TransferStats:
        """The transfer counters."""
        return self._stats

    def _count(self, **inc: int) -> None:
        s = self._stats
        self._stats = TransferStats(**{k: getattr(s, k) + inc.get(k, 0) for k in s.__slots__})

    # -- the application's parts -----------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Add the pull route to ``app`` (its middleware is :meth:`middleware`)."""
        app.router.add_post(PULL_PATH, self._pull)

    @web.middleware
    async def middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Run a generation request through this worker's role (others pass through)."""
        if self.role == "both" or request.method != "POST" or request.path not in _PATHS:
            return await handler(request)
        try:
            body = await request.json()
        except ValueError:
            return await handler(request)  # the handler answers the bad body
        if not isinstance(body, dict):
            return await handler(request)
        if self.role == "prefill":
            if self.protocol == "vllm":
                return await self._vllm_prefill(request, body, handler)
            return await self._sglang_prefill(request, body, handler)
        if self.protocol == "vllm":
            return await self._vllm_decode(request, body, handler)
        return await self._sglang_decode(request, body, handler)

    # -- the prompt, as the handlers render it ---------------------------------------

    def _tokens(self, path: str, body: Mapping[str, Any]) -> list[int]:
        assert self.api is not None
        if path == "/v1/chat/completions":
            return self.api._chat_tokens(body)
        if path == "/v1/messages":
            return self.engine.tokenizer.render_anthropic(body)
        prompts = self.api._prompts(body)
        if len(prompts) != 1:
            raise _bad("a disaggregated completions request takes one prompt")
        return prompts[0]

    def _full_blocks(self, tokens: list[int]) -> tuple[int, ...]:
        bs = self.engine.block_size
        return tuple(tokens[: len(tokens) // bs * bs])

    def _offer(self, key: tuple[str, Any], tokens: tuple[int, ...]) -> _Offer:
        self._expire()
        n = len(tokens) // self.engine.block_size
        offer = _Offer(
            tokens,
            [next(self._block_ids) for _ in range(n)],
            time.monotonic() + self.transfer_timeout,
        )
        self._offers[key] = offer
        self._count(offered=1)
        return offer

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, o in self._offers.items() if o.expires <= now]:
            del self._offers[key]
            self._count(expired=1)

    # -- vLLM ------------------------------------------------------------------------

    async def _vllm_prefill(
        self, request: web.Request, body: dict[str, Any], handler: _Handler
    ) -> web.StreamResponse:
        params = body.get("kv_transfer_params")
        if not (isinstance(params, dict) and params.get("do_remote_decode")):
            return await handler(request)
        if body.get("stream"):
            raise _bad("a remote-decode prefill request must not stream")
        tokens = self._tokens(request.path, body)
        resp = await handler(request)
        if resp.status != 200 or not isinstance(resp, web.Response) or resp.body is None:
            return resp
        from ._http import _request_id

        rid = _request_id(request, body)
        offer = self._offer(("vllm", rid), self._full_blocks(tokens))
        offer.ready.set()
        answer = json.loads(resp.body)  # type: ignore[arg-type]
        answer["kv_transfer_params"] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(offer.block_ids),
            "remote_engine_id": self.engine_id,
            "remote_request_id": rid,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": 1,
        }
        return web.json_response(answer, headers={"X-Request-Id": rid})

    async def _vllm_decode(
        self, request: web.Request, body: dict[str, Any], handler: _Handler
    ) -> web.StreamResponse:
        params = body.get("kv_transfer_params")
        if not (isinstance(params, dict) and params.get("do_remote_prefill")):
            return await handler(request)
        missing = [
            k
            for k in ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")
            if params.get(k) is None
        ]
        if missing:
            raise _bad(f"kv_transfer_params lacks {', '.join(missing)}")
        ask = {
            "protocol": "vllm",
            "engine_id": params["remote_engine_id"],
            "request_id": params["remote_request_id"],
            "block_ids": params.get("remote_block_ids") or [],
        }
        got = await self._pull_from(str(params["remote_host"]), params["remote_port"], ask)
        return await self._decode(request, body, handler, got)

    # -- SGLang ----------------------------------------------------------------------

    @staticmethod
    def _bootstrap(body: Mapping[str, Any]) -> tuple[str, int, int] | None:
        names = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
        host, port, room = (body.get(k) for k in names)
        if host is None and port is None and room is None:
            return None
        if not isinstance(host, str) or not host:
            raise _bad("bootstrap_host must be a host name")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise _bad("bootstrap_port must be a port number")
        if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room < 2**63:
            raise _bad("bootstrap_room must be an int in [0, 2**63)")
        return host, port, room

    async def _sglang_prefill(
        self, request: web.Request, body: dict[str, Any], handler: _Handler
    ) -> web.StreamResponse:
        boot = self._bootstrap(body)
        if boot is None:
            return await handler(request)
        tokens = self._tokens(request.path, body)
        offer = self._offer(("sglang", boot[2]), self._full_blocks(tokens))
        token = MAX_TOKENS_OVERRIDE.set(1)
        try:
            resp = await handler(request)
        finally:
            MAX_TOKENS_OVERRIDE.reset(token)
        offer.ready.set()
        # SGLang's prefill sends the KV once the decode side has bootstrapped the room
        try:
            await asyncio.wait_for(offer.pulled.wait(), max(offer.expires - time.monotonic(), 0))
        except TimeoutError:
            if self._offers.pop(("sglang", boot[2]), None) is not None:
                self._count(expired=1)
            if resp.prepared:  # streamed already: nothing left to answer
                return resp
            raise _bad(f"bootstrap room {boot[2]}: no decode server came for the KV", 500) from None
        return resp

    async def _sglang_decode(
        self, request: web.Request, body: dict[str, Any], handler: _Handler
    ) -> web.StreamResponse:
        boot = self._bootstrap(body)
        if boot is None:
            raise _bad(
                "this decode server needs bootstrap_host, bootstrap_port and bootstrap_room"
                " (SGLang's --disaggregation-mode decode)"
            )
        host, port, room = boot
        got = await self._pull_from(host, port, {"protocol": "sglang", "room": room})
        return await self._decode(request, body, handler, got)

    # -- the decode side's common part -----------------------------------------------

    async def _pull_from(self, host: str, port: object, ask: dict[str, Any]) -> list[int]:
        timeout = aiohttp.ClientTimeout(total=self.transfer_timeout + 5.0)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(f"http://{host}:{port}{PULL_PATH}", json=ask) as r,
            ):
                answer = await r.json(content_type=None)
                status = r.status
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            what = f"{type(e).__name__} {e}"
            raise _bad(f"KV transfer from {host}:{port} failed: {what}", 500) from None
        if status != 200 or not isinstance(answer, dict):
            why = answer.get("error") if isinstance(answer, dict) else answer
            raise _bad(f"KV transfer refused by {host}:{port}: {why}", 500)
        tokens = answer.get("token_ids")
        if not isinstance(tokens, list):
            raise _bad("KV transfer: no token_ids", 500)
        return tokens

    async def _decode(
        self, request: web.Request, body: dict[str, Any], handler: _Handler, got: list[int]
    ) -> web.StreamResponse:
        tokens = self._tokens(request.path, body)
        if tokens[: len(got)] != got:
            raise _bad("KV transfer: the blocks received are not this prompt's", 500)
        from ._http import _request_id

        self._count(received=1, received_tokens=len(got))
        self.engine.expect_transfer(_request_id(request, body), len(got))
        return await handler(request)

    # -- the prefill side's pull route ----------------------------------------------

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        try:
            ask = await request.json()
        except ValueError:
            ask = None
        if not isinstance(ask, dict):
            return web.json_response({"error": "a JSON object is expected"}, status=400)
        self._expire()
        if ask.get("protocol") == "sglang":
            key: tuple[str, Any] = ("sglang", ask.get("room"))
            deadline = time.monotonic() + self.transfer_timeout
            # the decode side may ask before the prefill side has offered
            while key not in self._offers and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            offer = self._offers.get(key)
            if offer is not None:
                try:
                    await asyncio.wait_for(offer.ready.wait(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    offer = None
        else:
            key = ("vllm", ask.get("request_id"))
            offer = self._offers.get(key)
            if offer is not None and (
                ask.get("engine_id") != self.engine_id or ask.get("block_ids") != offer.block_ids
            ):
                self._count(refused=1)
                return web.json_response(
                    {"error": f"request {key[1]!r}: these are not the blocks offered"}, status=409
                )
        if offer is None or self._offers.get(key) is not offer:
            self._count(refused=1)
            return web.json_response({"error": f"nothing offered for {key[1]!r}"}, status=404)
        del self._offers[key]
        offer.pulled.set()
        self._count(pulled=1)
        return web.json_response({"token_ids": list(offer.tokens)})

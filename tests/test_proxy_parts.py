"""The proxy's parts, each tested without :class:`~kvroute.proxy.ProxyApp` around it.

Real components throughout: :class:`~kvroute.testing.MockWorker` fleets on
loopback, a real :class:`~kvroute.Router`, and, for the parts that answer a
client (preparation, relay), a real aiohttp server on loopback whose one
handler runs the part alone. The end-to-end behaviour of the assembled
proxy is in the other ``test_proxy*`` modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from aiohttp import web  # noqa: E402
from test_proxy_support import FAST_HEALTH, SYSTEM, chat, serving, sse_data  # noqa: E402

from kvroute import Request, Router  # noqa: E402
from kvroute.events.metrics import Metrics  # noqa: E402
from kvroute.proxy import ProxyConfig, ProxyError, WorkerSpec  # noqa: E402
from kvroute.proxy.call import Call  # noqa: E402
from kvroute.proxy.models import Models  # noqa: E402
from kvroute.proxy.prepare import Prepared, Preparer  # noqa: E402
from kvroute.proxy.relay import (  # noqa: E402
    CACHE_SOURCE_HEADER,
    PREDICTED_HEADER,
    WORKER_HEADER,
    Relay,
    error_response,
    failure_response,
)
from kvroute.proxy.subscription import EventSubscription  # noqa: E402
from kvroute.proxy.upstream import AttemptFailed, Lifecycle, Upstream  # noqa: E402
from kvroute.proxy.warmup import Warmups  # noqa: E402
from kvroute.proxy.workers import WorkerPool  # noqa: E402
from kvroute.testing import MockWorker  # noqa: E402

MODEL = "mock-model"
CHAT = "/v1/chat/completions"


@contextlib.contextmanager
def _workers(n: int, **kw: Any) -> Iterator[list[MockWorker]]:
    workers: list[MockWorker] = []
    try:
        for _ in range(n):
            workers.append(MockWorker(**{"publish_events": False, **kw}).start())
        yield workers
    finally:
        for w in workers:
            if w.paused:
                w.resume()
            w.stop()


@dataclass
class _Parts:
    config: ProxyConfig
    router: Router
    metrics: Metrics
    pool: WorkerPool
    upstream: Upstream


@contextlib.asynccontextmanager
async def _parts(workers: list[MockWorker], **config_kw: Any) -> AsyncIterator[_Parts]:
    """An event-free router, a worker pool and open upstream connections over ``workers``."""
    config = ProxyConfig([WorkerSpec(w.url) for w in workers], **{**FAST_HEALTH, **config_kw})
    router = Router(
        block_size=config.block_size, workers=range(len(workers)), kv_events=False, journal=True
    )
    metrics = Metrics(router)
    pool = WorkerPool(router, config)
    upstream = Upstream(router, pool, config, metrics)
    await upstream.start()
    try:
        yield _Parts(config, router, metrics, pool, upstream)
    finally:
        await upstream.close()


def _ops(router: Router) -> list[tuple[str, Any]]:
    """The router's journal as ``(method, the excluded workers or the request id)``."""
    out: list[tuple[str, Any]] = []
    for _, op, args, kwargs in router.journal():
        if op == "route":
            out.append((op, sorted(kwargs.get("exclude", ()))))
        elif op in ("first_token", "finished", "failed"):
            out.append((op, args[0]))
    return out


def _chat_call(body: dict[str, Any], client_id: str = "r1", **kw: Any) -> Call:
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": client_id}
    fields: dict[str, Any] = {"stream": False, "strip_usage": False, **kw}
    return Call("chat", CHAT, body, data, client_id=client_id, headers=headers, **fields)


async def _read_json(decision: Any, response: aiohttp.ClientResponse, lc: Lifecycle) -> Any:
    """A handler that reads the worker's answer whole, as a prefill leg would."""
    lc.first_token()
    answer = (decision.worker, response.status, await response.json())
    lc.finish()
    return answer


# -- upstream: calls, attempts and failover ----------------------------------------------


def test_a_5xx_is_retried_on_another_worker_and_the_router_hears_each_attempt() -> None:
    body = {"model": MODEL, "messages": chat(1), "max_tokens": 2}
    tokens = list(range(64))

    async def scenario(workers: list[MockWorker]) -> None:
        async with _parts(workers) as p:
            # The prompt is predicted cached where it went first: it goes there again.
            call = _chat_call(body)
            first, *_ = await p.upstream.send(Request(0, tokens=tokens), call, _read_json)
            workers[first].fail_next(1, 503)
            worker, status, answer = await p.upstream.send(
                Request(1, tokens=tokens), _chat_call(body, "r2"), _read_json
            )
            assert worker == 1 - first and status == 200 and answer["choices"]
            assert _ops(p.router) == [
                ("route", []), ("first_token", 0), ("finished", 0),
                ("route", []), ("failed", 1),
                ("route", [first]), ("first_token", 1), ("finished", 1),
            ]  # fmt: skip
            assert p.metrics.value("kvroute_proxy_retries_total") == 1
            labels = {"worker": str(first)}
            assert p.metrics.value("kvroute_upstream_errors_total", labels) == 1
            # A worker that answers, if with a 5xx, is not unhealthy.
            assert p.pool.healthy() == [0, 1]

    with _workers(2) as workers:
        asyncio.run(scenario(workers))
        assert sum(len(w.requests()) for w in workers) == 2  # the failed one was never admitted


def test_when_every_attempt_fails_the_last_answer_is_raised() -> None:
    async def scenario(workers: list[MockWorker]) -> None:
        async with _parts(workers, retries=5) as p:
            for w in workers:
                w.fail_next(1, 503)
            body = {"model": MODEL, "messages": chat(1), "max_tokens": 2}
            with pytest.raises(AttemptFailed) as info:
                await p.upstream.send(Request(0, tokens=[1, 2, 3]), _chat_call(body), _read_json)
            failure = info.value
            assert failure.status == 503 and json.loads(failure.body)["error"]["message"]
            # Two workers, two attempts: the third found no worker left to try.
            assert [op for op, _ in _ops(p.router)] == ["route", "failed", "route", "failed"]
            response = failure_response(_chat_call(body, "last"), failure)
            # the worker's message, in the proxy's OpenAI shape (a string code)
            passed = json.loads(response.body)["error"]
            assert response.status == 503 and passed["code"] == "service_unavailable"
            assert passed["message"] == json.loads(failure.body)["error"]["message"]
            assert response.headers["X-Request-Id"] == "last"

    with _workers(2) as workers:
        asyncio.run(scenario(workers))


def test_no_routable_worker_is_a_503_and_a_handler_failure_fails_over() -> None:
    async def scenario(workers: list[MockWorker]) -> None:
        async with _parts(workers) as p:
            body = {"model": MODEL, "messages": chat(1), "max_tokens": 2}
            calls: list[int] = []

            async def breaks_first(
                decision: Any, response: aiohttp.ClientResponse, lc: Lifecycle
            ) -> int:
                calls.append(decision.worker)
                if len(calls) == 1:
                    raise AttemptFailed("the answer broke off before a byte went out")
                return (await _read_json(decision, response, lc))[0]

            call = _chat_call(body)
            served = await p.upstream.send(Request(0, tokens=[1, 2]), call, breaks_first)
            assert calls == [calls[0], served] and served != calls[0]
            assert [op for op, _ in _ops(p.router)][:2] == ["route", "failed"]
            for w in range(len(workers)):
                p.pool.mark_down(w, "test")
            with pytest.raises(ProxyError) as info:
                await p.upstream.send(Request(1, tokens=[1, 2]), _chat_call(body), _read_json)
            assert info.value.status == 503 and info.value.code == "no_worker_available"

    with _workers(2) as workers:
        asyncio.run(scenario(workers))


def test_an_unreachable_worker_is_marked_down_by_calls_but_not_by_calls_aside() -> None:
    async def scenario(workers: list[MockWorker]) -> None:
        async with _parts(workers) as p:
            workers[0].stop()
            data = json.dumps({"model": MODEL, "prompt": "x"}).encode()
            with pytest.raises(aiohttp.ClientConnectionError):
                await p.upstream.post_aside(0, "/v1/completions", data, {})
            assert p.pool.healthy() == [0, 1]
            with pytest.raises(AttemptFailed, match="POST /tokenize"):
                await p.upstream.exchange(0, "/tokenize", data, {})
            assert p.pool.healthy() == [1] and not p.router.load(0)["healthy"]
            # The other worker answers the same calls.
            status, answer, ctype = await p.upstream.exchange(1, "/tokenize", data, {})
            assert status == 200 and json.loads(answer)["tokens"] and "json" in ctype
            assert await p.upstream.post_aside(1, "/v1/completions", data, {}) == 200

    with _workers(2) as workers:
        asyncio.run(scenario(workers))


def test_a_worker_going_down_fails_the_call_waiting_on_it_and_nothing_else() -> None:
    # A call runs in its caller's task; the worker's going down cancels it there,
    # and that cancellation (only that one) becomes AttemptFailed.
    async def scenario(workers: list[MockWorker]) -> None:
        async with _parts(workers) as p:
            started = asyncio.Event()

            async def slow() -> str:
                started.set()
                await asyncio.sleep(30)
                return "late"

            call = asyncio.create_task(p.upstream._until_down(0, "POST /x", slow))
            await started.wait()
            p.pool.mark_down(0, "test")
            with pytest.raises(AttemptFailed, match="marked unhealthy"):
                await call
            with pytest.raises(AttemptFailed, match="is unhealthy"):
                await p.upstream._until_down(0, "POST /x", slow)

            async def failing_over() -> str:
                # the task goes on after the failure: not cancelled again
                with contextlib.suppress(AttemptFailed):
                    await p.upstream._until_down(1, "POST /x", slow_then_down)
                await asyncio.sleep(0.01)
                return "went on"

            async def slow_then_down() -> str:
                asyncio.get_running_loop().call_soon(p.pool.mark_down, 1, "test")
                await asyncio.sleep(30)
                return "late"

            assert await failing_over() == "went on"
            p.pool.workers[0].healthy = p.pool.workers[1].healthy = True
            p.pool.workers[0].down = p.pool.workers[1].down = None

            # the client's cancellation stays a cancellation, even when the worker goes down too
            started.clear()
            call = asyncio.create_task(p.upstream._until_down(0, "POST /x", slow))
            await started.wait()
            p.pool.mark_down(0, "test")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

            # a call that ended is not cut afterwards by its worker going down
            async def quick() -> str:
                p.pool.mark_down(1, "test")  # its callbacks run once the call returned
                return "done"

            async def then_wait() -> str:
                got = await p.upstream._until_down(1, "POST /x", quick)
                await asyncio.sleep(0.01)
                return got

            assert await then_wait() == "done"

    with _workers(2) as workers:
        asyncio.run(scenario(workers))


def test_lifecycle_reports_once_and_never_after_the_end() -> None:
    router = Router(block_size=4, workers=[0], journal=True)
    orders = [("first_token", "finish", "fail"), ("fail", "first_token", "finish")]
    for rid, steps in enumerate(orders):
        decision = router.route(Request(rid, tokens=[1, 2, 3, 4]))
        lc = Lifecycle(router, int(decision.request_id))
        for step in steps:
            getattr(lc, step)()
    assert [op for op in _ops(router) if op[0] != "route"] == [
        ("first_token", 0), ("finished", 0), ("failed", 1),
    ]  # fmt: skip
    assert router.load(0)["active_requests"] == 0


# -- relay -------------------------------------------------------------------------------


def _relaying(p: _Parts, relay: Relay, replies: list[Any]) -> Any:
    """A client-facing handler: upstream + relay, without preparation (body as given)."""
    ids = itertools.count()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        call = _chat_call(body, request.headers["X-Request-Id"], stream=bool(body.get("stream")),
                          strip_usage=request.headers.get("X-Strip") == "1")  # fmt: skip

        async def answer(decision: Any, response: aiohttp.ClientResponse, lc: Lifecycle) -> Any:
            return await relay.answer(request, call, decision, response, lc, collect=True)

        relayed = await p.upstream.send(Request(next(ids), tokens=[7] * 40), call, answer)
        replies.append(relayed.reply)
        return relayed.response

    return handler


def test_relay_passes_json_on_with_its_headers_counts_the_cache_and_keeps_the_reply() -> None:
    async def scenario(workers: list[MockWorker]) -> None:
        async with _parts(workers) as p:
            replies: list[Any] = []
            relay = Relay(p.pool, p.metrics)
            body = {"model": MODEL, "messages": chat(2), "max_tokens": 3}
            async with serving(_relaying(p, relay, replies)) as url, aiohttp.ClientSession() as s:
                for rid in ("j1", "j2"):
                    async with s.post(url + CHAT, json=body, headers={"X-Request-Id": rid}) as r:
                        assert r.status == 200
                        answer = await r.json()
                        headers = r.headers
            assert headers["X-Request-Id"] == "j2" and headers[WORKER_HEADER] == "0"
            assert int(headers[PREDICTED_HEADER]) >= 0
            assert headers[CACHE_SOURCE_HEADER] == "worker"
            message = answer["choices"][0]["message"]
            assert replies[-1] == {"role": "assistant", "content": message["content"]}
            # The second turn hit the first one's blocks: counted from the worker's usage.
            cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached > 0
            assert p.metrics.value("kvroute_cache_read_tokens_total") == cached
            assert [op for op, _ in _ops(p.router)].count("finished") == 2

    with _workers(1) as workers:
        asyncio.run(scenario(workers))


def test_relay_streams_strips_the_usage_it_asked_for_and_rebuilds_the_reply() -> None:
    async def scenario(workers: list[MockWorker]) -> None:
        async with _parts(workers) as p:
            replies: list[Any] = []
            relay = Relay(p.pool, p.metrics)
            body = {"model": MODEL, "messages": chat(1), "max_tokens": 4, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            headers = {"X-Request-Id": "s1", "X-Strip": "1"}
            async with (
                serving(_relaying(p, relay, replies)) as url,
                aiohttp.ClientSession() as s,
                s.post(url + CHAT, json=body, headers=headers) as r,
            ):
                assert r.status == 200 and r.headers[WORKER_HEADER] == "0"
                assert r.headers["Content-Type"].startswith("text/event-stream")
                events = sse_data(await r.read())
            assert events[-1] == "[DONE]"
            chunks = events[:-1]
            assert chunks and not any("usage" in c and not c["choices"] for c in chunks)
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert replies == [{"role": "assistant", "content": text}] and text
            # The usage it stripped was still counted.
            prompt = len(workers[0].requests()[-1].prompt_token_ids)
            written = p.metrics.value("kvroute_cache_creation_tokens_total")
            assert p.metrics.value("kvroute_cache_read_tokens_total") + written == prompt

    with _workers(1) as workers:
        asyncio.run(scenario(workers))


def test_error_answers_pass_on_in_the_apis_shape() -> None:
    html = b"<html>502 Bad Gateway</html>"
    r = error_response("anthropic", 502, html, {"Content-Type": "text/html", "X": "1"})
    assert r.headers["Content-Type"] == "application/json" and r.headers["X"] == "1"
    assert json.loads(r.body) == {
        "type": "error", "error": {"type": "api_error", "message": "the worker answered 502"},
    }  # fmt: skip
    openai_shaped = json.dumps({"error": {"message": "max_tokens is too large"}}).encode()
    r = error_response("anthropic", 400, openai_shaped, {}, fallback="unused")
    assert json.loads(r.body)["error"] == {
        "type": "invalid_request_error", "message": "max_tokens is too large",
    }  # fmt: skip
    r = error_response("anthropic", 404, b"", {}, fallback="no count_tokens here")
    assert json.loads(r.body)["error"]["message"] == "no count_tokens here"
    anthropic_shaped = b'{"type": "error", "error": {"type": "overloaded_error", "message": "m"}}'
    r = error_response("anthropic", 503, anthropic_shaped, {"Content-Type": "x/y"})
    assert r.body == anthropic_shaped and r.headers["Content-Type"] == "x/y"  # byte for byte
    # OpenAI endpoints: one shape too, whatever the worker sent
    r = error_response("openai", 503, html, {"Content-Type": "text/html", "X": "1"})
    assert r.headers["Content-Type"] == "application/json" and r.headers["X"] == "1"
    assert json.loads(r.body) == {"error": {
        "message": "the worker answered 503", "type": "server_error", "param": None,
        "code": "service_unavailable"}}  # fmt: skip
    with pytest.raises(ProxyError) as info:
        failure_response(_chat_call({}), AttemptFailed("POST /v1/chat/completions: refused"))
    assert info.value.status == 502 and "refused" in info.value.message


# -- warm-ups ----------------------------------------------------------------------------


def _plan(router: Router, rid: int, session: str) -> int:
    """Route and finish a speculative-prefill request: a plan for ``session``; its worker."""
    request = Request(rid, tokens=[5] * 32, session_id=session, speculative_prefill=True)
    decision = router.route(request)
    router.finished(decision.request_id)
    return decision.worker


def test_warmups_send_the_next_turn_where_the_plan_says_and_take_every_plan() -> None:
    reply = {"role": "assistant", "content": "done"}

    async def scenario(workers: list[MockWorker]) -> int:
        async with _parts(workers) as p:
            warmups = Warmups(p.router, p.upstream, p.metrics)
            call = _chat_call({"model": MODEL, "messages": chat(1), "stream": True}, "t1")
            warmups.warm(call, "no-plan", reply)  # nothing planned: nothing sent
            _plan(p.router, 0, "left")
            warmups.warm(call, "left", None)  # no reply: the plan is taken all the same
            assert p.router.stats()["warmup_plans"] == 0
            worker = _plan(p.router, 1, "s")
            warmups.warm(call, "s", reply)
            for _ in range(1000):
                if p.metrics.value("kvroute_warmups_total", {"outcome": "sent"}):
                    break
                await asyncio.sleep(0.01)
            await warmups.close()
            assert p.metrics.value("kvroute_warmups_total", {"outcome": "sent"}) == 1
            return worker

    with _workers(2) as workers:
        worker = asyncio.run(scenario(workers))
        assert [r.request_id for w in workers for r in w.requests()] == ["t1-warmup"]
        (record,) = workers[worker].requests()
        # The conversation with the reply appended, one token, not streamed.
        expected = workers[worker].tokenizer.render_chat([*chat(1), reply])
        assert list(record.prompt_token_ids) == expected


def test_closing_warmups_cancels_those_still_being_sent() -> None:
    async def scenario(workers: list[MockWorker]) -> None:
        async with _parts(workers) as p:
            warmups = Warmups(p.router, p.upstream, p.metrics)
            worker = _plan(p.router, 0, "s")
            workers[worker].pause()
            call = _chat_call({"model": MODEL, "messages": chat(1)}, "hung")
            warmups.warm(call, "s", {"role": "assistant", "content": "a"})
            await asyncio.sleep(0.1)
            assert warmups.pending == 1  # still waiting on the paused worker
            await warmups.close()
            assert warmups.pending == 0
            for outcome in ("sent", "refused", "failed"):
                assert p.metrics.value("kvroute_warmups_total", {"outcome": outcome}) == 0

    with _workers(1) as workers:
        asyncio.run(scenario(workers))


# -- the event subscription ----------------------------------------------------------------


def test_the_event_subscription_subscribes_to_every_publisher_and_stops() -> None:
    async def scenario(workers: list[MockWorker]) -> None:
        specs = [WorkerSpec(w.url, w.events_endpoint, w.replay_endpoint) for w in workers]
        config = ProxyConfig(specs)
        router = Router(block_size=16, workers=[0, 1], kv_events=True)
        pool = WorkerPool(router, config)
        events = EventSubscription(router, config, Metrics(router), pool)
        events.start()
        try:
            assert events.subscriber is not None and pool.on_up is not None
            for w in workers:
                assert await asyncio.to_thread(w.wait_for_subscribers, 1, 10.0)
        finally:
            await events.stop()
        assert events.subscriber is None and pool.on_up is None
        await events.stop()  # idempotent

    with _workers(2, publish_events=True) as workers:
        asyncio.run(scenario(workers))
    # Without KV events there is nothing to run.
    config = ProxyConfig([WorkerSpec("http://127.0.0.1:9")])
    router = Router(block_size=16, workers=[0])
    events = EventSubscription(router, config, Metrics(router), WorkerPool(router, config))
    events.start()
    assert events.subscriber is None


# -- models --------------------------------------------------------------------------------


def test_models_map_check_and_list_names() -> None:
    config = ProxyConfig([WorkerSpec("http://127.0.0.1:9")], models=["qwen", "llama"],
                         model_map=[("claude-*", "qwen"), ("gpt", "llama"), ("x", "nope")],
                         lora_adapters=["sql"])  # fmt: skip
    models = Models(config, WorkerPool(Router(block_size=16, workers=[0]), config))
    body: dict[str, Any] = {"model": "claude-opus"}
    assert models.resolve(body) and body == {"model": "qwen"}
    assert not models.resolve(body) and not models.resolve({})
    with pytest.raises(ProxyError) as info:
        models.resolve({"model": "x"})
    assert info.value.status == 404 and "`x (mapped to nope)`" in info.value.message
    with pytest.raises(ProxyError, match="must be a string"):
        models.resolve({"model": 3})
    assert models.lora_name("sql") == "sql" and models.lora_name("qwen") is None
    listed = models.listing(anthropic=False)["data"]
    # Two base models: an adapter's parent is unknown. Exact aliases of served models show.
    assert [(m["id"], m.get("parent"), m.get("root")) for m in listed] == [
        ("qwen", None, None), ("llama", None, None), ("sql", None, None), ("gpt", None, "llama"),
    ]  # fmt: skip
    anthropic = models.listing(anthropic=True)
    assert anthropic["first_id"] == "qwen" and anthropic["last_id"] == "gpt"
    assert anthropic["data"][0] == {"type": "model", "id": "qwen", "display_name": "qwen",
                                    "created_at": "1970-01-01T00:00:00Z"}  # fmt: skip
    # No models configured and none listed by a worker yet: every name passes.
    open_config = ProxyConfig([WorkerSpec("http://127.0.0.1:9")])
    unknown = Models(open_config, WorkerPool(Router(block_size=16, workers=[0]), open_config))
    assert unknown.served() is None and not unknown.resolve({"model": "anything"})


# -- preparation ---------------------------------------------------------------------------


def _summary(prepared: Prepared) -> dict[str, Any]:
    call, request = prepared.call, prepared.request
    return {
        "data": call.data.decode(), "stream": call.stream, "strip_usage": call.strip_usage,
        "client_id": call.client_id, "headers": call.headers, "path": call.path,
        "tokens": [int(t) for t in request.tokens], "session_id": request.session_id,
        "priority": request.priority, "lora_name": request.lora_name,
        "speculative_prefill": request.speculative_prefill,
        "cache_control": [[c.ttl, c.prefix_tokens] for c in request.cache_control or ()],
    }  # fmt: skip


@contextlib.asynccontextmanager
async def _preparing(p: _Parts) -> AsyncIterator[str]:
    """A loopback server answering each POST with what :class:`Preparer` made of it."""
    preparer = Preparer(p.config, p.router, Models(p.config, p.pool), p.upstream, None)
    kinds = {CHAT: "chat", "/v1/completions": "completions", "/v1/messages": "messages"}

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            prepared = await preparer.prepare(request, kinds[request.path])
        except ProxyError as e:
            return web.json_response({"error": e.message}, status=e.status)
        return web.json_response(_summary(prepared))

    async with serving(handler) as url:
        yield url


def test_preparation_forwards_the_clients_bytes_unless_it_changed_the_body() -> None:
    async def scenario(workers: list[MockWorker]) -> None:
        options = {"models": [MODEL], "model_map": [("alias", MODEL)],
                   "upstream_api_key": "secret", "max_body_size": 4096}  # fmt: skip
        async with (
            _parts(workers, **options) as p,
            _preparing(p) as url,
            aiohttp.ClientSession() as s,
        ):

            async def prepare(raw: bytes, **headers: str) -> tuple[int, Any]:
                h = {"Content-Type": "application/json", **headers}
                async with s.post(url + CHAT, data=raw, headers=h) as r:
                    return r.status, await r.json()

            raw = b'{"model":"mock-model",   "messages": [{"role": "user", "content": "hi"}]}'
            status, got = await prepare(raw, **{"X-Request-Id": "mine", "anthropic-beta": "b",
                                                "Authorization": "Bearer client",
                                                "Accept": "application/json"})  # fmt: skip
            assert status == 200 and got["data"] == raw.decode() and not got["stream"]
            assert got["client_id"] == "mine" and got["path"] == CHAT
            assert got["headers"] == {
                "Content-Type": "application/json", "X-Request-Id": "mine",
                "anthropic-beta": "b", "accept": "application/json",
                "authorization": "Bearer secret",
            }  # fmt: skip
            # A mapped model and a stream that did not ask for its usage change the body.
            raw = json.dumps({"model": "alias", "messages": [{"role": "user", "content": "x"}],
                              "stream": True, "stream_options": {"x": 1}}).encode()  # fmt: skip
            status, got = await prepare(raw)
            sent = json.loads(got["data"])
            assert sent["model"] == MODEL and sent["stream_options"] == {
                "x": 1, "include_usage": True}  # fmt: skip
            assert got["stream"] and got["strip_usage"] and len(got["client_id"]) == 32
            # The one change the usage chunk: the client's bytes go on, the key put in front.
            raw = b' {"model": "mock-model", "messages": [{"role": "user", "content": "x"}],  ' \
                  b'"stream": true}'  # fmt: skip
            status, got = await prepare(raw)
            assert got["strip_usage"] and got["data"].encode() == (
                b' {"stream_options":{"include_usage":true},' + raw[2:])
            status, got = await prepare(raw.replace(b"true}", b'true, "stream_options": null}'))
            assert json.loads(got["data"])["stream_options"] == {"include_usage": True}
            assert got["data"].count("stream_options") == 1  # re-encoded: one key
            status, got = await prepare(b"{" + b" " * 5000 + b"}")
            assert status == 413
            assert (await prepare(b"[1]"))[0] == 400
            assert (await prepare(b'{"model": "other", "messages": [{}]}'))[0] == 404

    with _workers(1) as workers:
        asyncio.run(scenario(workers))


@pytest.mark.parametrize("tokenize_with", ["render", "tokenize"])
def test_preparation_tokenizes_on_a_worker_and_measures_breakpoints(tokenize_with: str) -> None:
    system = {"role": "system", "content": SYSTEM,
              "cache_control": {"type": "ephemeral", "ttl": "1h"}}  # fmt: skip
    messages = [system, {"role": "user", "content": "fix the test"}]

    async def scenario(workers: list[MockWorker]) -> Any:
        async with (
            _parts(workers, tokenize_with=tokenize_with) as p,
            _preparing(p) as url,
            aiohttp.ClientSession() as s,
        ):
            body = {"model": MODEL, "messages": messages, "session_id": "s", "priority": 2}
            headers = {"X-Kvroute-Speculative-Prefill": "1"}
            async with s.post(url + CHAT, json=body, headers=headers) as r:
                return await r.json()

    with _workers(1) as workers:
        got = asyncio.run(scenario(workers))
        tok = workers[0].tokenizer
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        assert got["tokens"] == tok.render_chat(plain)
        assert got["session_id"] == "s" and got["priority"] == 2 and got["speculative_prefill"]
        # The event-free router gets the system prompt's length as the breakpoint's prefix.
        prefix = len(tok.render_chat(plain[:1], add_generation_prompt=False))
        assert got["cache_control"] == [[3600.0, prefix]]
        # The request and its cut, each tokenized the chosen way.
        render = "/v1/chat/completions/render"
        served = workers[0].http_requests()
        assert served == ({render: 2} if tokenize_with == "render" else {"/tokenize": 2})

"""kvroute.proxy, Anthropic side, when things go wrong; and what the proxy reports about itself.

Workers failing mid-stream, all failing, all gone, and paths that do not
exist: every answer on ``/v1/messages*`` is Anthropic-shaped, and the
official ``anthropic`` SDK raises it as the error it is. ``count_tokens``
answers ``{"input_tokens": N}`` by whatever means the proxy has (the
worker's endpoint, its render endpoint, its ``/tokenize``, a local
tokenizer) and a clear error when it has none. Also the routed requests'
predicted cache hits as ``/metrics`` exposes them, and the log line that
says a response's usage carries the router's prediction.

Workers lacking endpoints are a :class:`_Front`: a real HTTP server in front
of a :class:`~kvroute.testing.MockWorker` that answers 404 on some paths.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.request
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

anthropic = pytest.importorskip("anthropic")
aiohttp = pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from aiohttp import web  # noqa: E402
from helpers import wait_until  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_proxy_support import FAST_HEALTH, SYSTEM, chat, fleet, get, post  # noqa: E402

from kvroute._serve import ServerThread  # noqa: E402
from kvroute.proxy import (  # noqa: E402
    CACHE_SOURCE_HEADER,
    PREDICTED_HEADER,
    WORKER_HEADER,
    ProxyConfig,
    ProxyServer,
    WorkerSpec,
)
from kvroute.proxy.tokenize import RENDER_PATHS  # noqa: E402
from kvroute.testing import DEFAULT_CHAT_TEMPLATE, MockWorker  # noqa: E402

MODEL = "mock-model"
COUNT, RENDER, TOKENIZE = "/v1/messages/count_tokens", "/v1/messages/render", "/tokenize"
NO_TOKENIZER = (
    "the routing proxy cannot tokenize the request: {who} neither {render} nor /tokenize;"
    " start the proxy with --tokenizer (the model's tokenizer.json and chat template)"
)


def _body(**extra: Any) -> dict[str, Any]:
    """A tool-use turn with a cached system prompt (no ``max_tokens``: count_tokens has none)."""
    return {
        "model": MODEL,
        "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "grep", "description": "Search files.",
                   "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
        "messages": [
            {"role": "user", "content": "find the bug"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "grep", "input": {"q": "TODO"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "a.py:3: TODO"}]},
        ],
        **extra,
    }  # fmt: skip


def _anthropic_error(raw: bytes) -> dict[str, str]:
    """The ``error`` of an Anthropic error body, which must have exactly that shape."""
    body = json.loads(raw)
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    return dict(body["error"])


def _sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` of each event in an Anthropic SSE body."""
    out = []
    for block in raw.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


# -- a worker without some endpoints -------------------------------------------------------


class _Front:
    """A worker lacking some endpoints: real HTTP on loopback, forwarding the rest to a MockWorker.

    Stands in for engines without them (a vLLM without the render endpoints
    or ``count_tokens``, a server without ``/tokenize``): a missing path
    answers as an aiohttp server without the route does, ``404: Not Found``
    in plain text. ``answers[path] = (status, content type, body)`` replaces
    a path's answer.

    :param worker: the worker answering everything else.
    :param missing: the paths it lacks.
    """

    def __init__(self, worker: MockWorker, missing: Collection[str] = ()) -> None:
        self.worker = worker
        self.missing = set(missing)
        self.answers: dict[str, tuple[int, str, bytes]] = {}
        #: The path of every POST it received, in order.
        self.posted: list[str] = []
        #: The headers of every POST, in order (case-insensitive mappings).
        self.posted_headers: list[Mapping[str, str]] = []
        self.port = 0
        self._thread = ServerThread("front", self._startup, self._shutdown)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Front:
        self._thread.start(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop listening (its port then refuses connections) and join the thread."""
        self._thread.stop(10)

    async def _startup(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site.port

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            self.posted.append(request.path)
            self.posted_headers.append(request.headers.copy())
        if request.path in self.answers:
            status, content_type, body = self.answers[request.path]
            return web.Response(status=status, body=body, headers={"Content-Type": content_type})
        if request.path in self.missing:
            raise web.HTTPNotFound()
        assert self._session is not None
        headers = {
            k: request.headers[k] for k in ("Content-Type", "X-Request-Id") if k in request.headers
        }
        url = self.worker.url + request.path_qs
        data = await request.read()
        async with self._session.request(request.method, url, data=data, headers=headers) as r:
            content_type = r.headers.get("Content-Type", "application/json")
            return web.Response(status=r.status, body=await r.read(), headers={
                "Content-Type": content_type})  # fmt: skip


@contextlib.contextmanager
def _fronted(
    missing: list[Collection[str]], worker_kw: dict[str, Any] | None = None, **config_kw: Any
) -> Iterator[tuple[ProxyServer, list[_Front]]]:
    """A proxy in front of one :class:`_Front` per entry of ``missing``."""
    with contextlib.ExitStack() as stack:
        fronts = []
        for paths in missing:
            worker = stack.enter_context(MockWorker(publish_events=False, **(worker_kw or {})))
            fronts.append(stack.enter_context(_Front(worker, paths)))
        config = ProxyConfig([WorkerSpec(f.url) for f in fronts], **{**FAST_HEALTH, **config_kw})
        yield stack.enter_context(ProxyServer(config)), fronts


# -- workers failing -----------------------------------------------------------------------


def test_worker_failing_mid_stream_ends_the_messages_stream_with_an_error_the_sdk_raises(
    anthropic_client: Any,
) -> None:
    with fleet(2, worker_kw={"token_delay": 0.05}) as (proxy, workers):
        body = {"model": MODEL, "max_tokens": 60, "stream": True,
                "messages": [{"role": "user", "content": "hello " * 30}]}  # fmt: skip
        req = urllib.request.Request(
            proxy.url + "/v1/messages",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-Session-Id": "agent",
                     "X-Kvroute-Speculative-Prefill": "true"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=20) as r:
            worker = int(r.headers[WORKER_HEADER])
            head = b""
            while b"event: content_block_delta" not in head:
                head += r.readline()
            workers[worker].pause()  # silent from now on: the proxy gives up on it
            raw = head + r.read()
        events = _sse(raw)
        assert events[0][0] == "message_start"
        assert "message_stop" not in [name for name, _ in events]
        name, data = events[-1]
        assert name == "error"
        assert data == {"type": "error", "error": {"type": "api_error",
                        "message": data["error"]["message"]}}  # fmt: skip
        assert data["error"]["message"].startswith("the worker failed mid-stream: ")
        assert proxy.router.load(worker)["healthy"] is False
        assert proxy.router.load(worker)["active_requests"] == 0
        m = proxy.proxy.metrics
        assert m.value("kvroute_upstream_errors_total", {"worker": str(worker)}) == 1
        # a failed response has nothing to continue: no warm-up, no plan kept
        assert proxy.router.stats()["warmup_plans"] == 0
        assert all(
            m.value("kvroute_warmups_total", {"outcome": o}) == 0
            for o in ("sent", "refused", "failed")
        )

        workers[worker].resume()
        assert wait_until(lambda: proxy.router.load(worker)["healthy"], timeout=10)
        client = anthropic_client(proxy.url)
        # The SDK raises the error event, after the text it had streamed.
        stream = client.messages.stream(
            model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "hi " * 20}]
        )
        with pytest.raises(anthropic.APIStatusError) as info, stream as s:
            served = int(s.response.headers[WORKER_HEADER])
            for event in s:
                if event.type == "content_block_delta" and not workers[served].paused:
                    workers[served].pause()
        err = info.value.body
        assert err["type"] == "error" and err["error"]["type"] == "api_error"
        assert err["error"]["message"].startswith("the worker failed mid-stream: ")
        assert s.current_message_snapshot.content[0].text  # streamed before the failure


def test_every_worker_failing_passes_the_last_anthropic_error_on_and_unknown_paths_404(
    anthropic_client: Any,
) -> None:
    with fleet(2, retries=1) as (proxy, workers):
        client = anthropic_client(proxy.url)
        ok = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        for w in workers:
            w.fail_next(1, status=503)
        status, headers, raw = post(proxy.url + "/v1/messages", ok, {"X-Request-Id": "r1"})
        # Both attempts failed; the last worker's own answer (Anthropic-shaped) says why.
        assert status == 503 and headers["X-Request-Id"] == "r1"
        assert _anthropic_error(raw)["message"] == "injected failure (HTTP 503)"
        assert proxy.router.stats()["routed"] == 2
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_retries_total") == 1
        for w in range(2):
            assert m.value("kvroute_upstream_errors_total", {"worker": str(w)}) == 1
        for w in workers:
            w.fail_next(1, status=500)
        with pytest.raises(anthropic.InternalServerError) as info:
            client.messages.create(**ok)
        assert info.value.status_code == 500
        assert info.value.body["error"]["message"] == "injected failure (HTTP 500)"
        assert client.messages.create(**ok).content[0].type == "text"  # serving again

        # Paths and methods the proxy does not serve.
        status, _, raw = post(proxy.url + "/v1/messages/batches", ok)
        assert status == 404
        assert _anthropic_error(raw) == {"type": "not_found_error", "message": "Not Found"}
        status, _, raw = get(proxy.url + "/v1/messages")
        assert status == 405 and _anthropic_error(raw)["type"] == "invalid_request_error"
        with pytest.raises(anthropic.NotFoundError) as info:
            client.post("/v1/messages/batches", body=ok, cast_to=object)
        assert info.value.body["error"]["type"] == "not_found_error"


def test_worker_errors_not_in_anthropic_shape_are_rewrapped_on_messages() -> None:
    # A gateway's HTML page, an OpenAI-shaped error: the client still gets Anthropic's shape,
    # the worker's status and its message.
    ok = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with _fronted([()], retries=0) as (proxy, (front,)):
        front.answers["/v1/messages"] = (502, "text/html", b"<html>Bad Gateway</html>")
        status, headers, raw = post(proxy.url + "/v1/messages", ok)
        assert status == 502 and headers["Content-Type"].startswith("application/json")
        assert _anthropic_error(raw) == {"type": "api_error", "message": "the worker answered 502"}
        openai_shaped = {"error": {"message": "prompt too long", "type": "BadRequestError"}}
        front.answers["/v1/messages"] = (
            400,
            "application/json",
            json.dumps(openai_shaped).encode(),
        )
        status, _, raw = post(proxy.url + "/v1/messages", ok)
        assert status == 400
        assert _anthropic_error(raw) == {
            "type": "invalid_request_error",
            "message": "prompt too long",
        }
        # the OpenAI endpoints pass them on in OpenAI's one shape: message kept,
        # type and code the proxy's (a string), param null when none is named
        front.answers["/v1/chat/completions"] = (
            400,
            "application/json",
            json.dumps(openai_shaped).encode(),
        )
        chat = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        status, _, raw = post(proxy.url + "/v1/chat/completions", chat)
        assert status == 400 and json.loads(raw) == {"error": {
            "message": "prompt too long", "type": "invalid_request_error", "param": None,
            "code": "bad_request"}}  # fmt: skip
        front.answers["/v1/chat/completions"] = (502, "text/html", b"<html>Bad Gateway</html>")
        status, _, raw = post(proxy.url + "/v1/chat/completions", chat)
        assert status == 502 and json.loads(raw)["error"] == {
            "message": "the worker answered 502", "type": "server_error", "param": None,
            "code": "bad_gateway"}  # fmt: skip


def test_no_healthy_worker_answers_503_overloaded_on_messages_and_count_tokens(
    anthropic_client: Any,
) -> None:
    with fleet(2) as (proxy, workers):
        for w in workers:
            w.stop()
        assert wait_until(lambda: not any(proxy.router.load(w)["healthy"] for w in range(2)))
        ok = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        for path, body in (("/v1/messages", ok), (COUNT, _body())):
            status, _, raw = post(proxy.url + path, body)
            assert status == 503, path
            err = _anthropic_error(raw)
            assert err == {"type": "overloaded_error",
                           "message": "cannot tokenize the request: no healthy worker"}  # fmt: skip
        client = anthropic_client(proxy.url)
        with pytest.raises(anthropic.InternalServerError) as info:
            client.messages.create(**ok)
        assert info.value.status_code == 503
        assert info.value.body["error"]["type"] == "overloaded_error"


# -- count_tokens by every means, and /v1/messages without any -----------------------------


# how the proxy counts -> (the endpoints the worker lacks, a local tokenizer, the POSTs it gets)
_COUNTING: dict[str, tuple[tuple[str, ...], bool, list[str]]] = {
    "worker_endpoint": ((), False, [COUNT]),
    "render": ((COUNT,), False, [COUNT, RENDER]),
    "tokenize": ((COUNT, RENDER), False, [COUNT, RENDER, TOKENIZE]),
    "local_tokenizer": ((COUNT, RENDER, TOKENIZE), True, [COUNT]),
}


@pytest.mark.parametrize("means", list(_COUNTING))
def test_count_tokens_counts_by_any_means_the_proxy_has(
    means: str, tokenizer_json: Path, anthropic_client: Any
) -> None:
    missing, local, asked = _COUNTING[means]
    config: dict[str, Any] = {}
    if local:
        config.update(tokenizer=str(tokenizer_json), chat_template=DEFAULT_CHAT_TEMPLATE)
    worker_kw = {"tokenizer": tokenizer_json}
    with _fronted([missing], worker_kw, **config) as (proxy, [front]):
        expected = len(front.worker.tokenizer.render_anthropic(_body()))
        status, headers, raw = post(proxy.url + COUNT, _body())
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(raw) == {"input_tokens": expected}
        assert front.posted == asked
        client = anthropic_client(proxy.url)
        assert client.messages.count_tokens(**_body()).input_tokens == expected
        assert proxy.router.stats()["routed"] == 0  # counting is not routed
        if local:
            # A worker that cannot be reached at all: still counted in the proxy.
            front.stop()
            assert client.messages.count_tokens(**_body()).input_tokens == expected
            assert proxy.router.load(0)["healthy"] is False
            # A generation request has no worker to go to.
            status, _, raw = post(proxy.url + "/v1/messages", _body(max_tokens=2))
            assert status == 503 and _anthropic_error(raw)["type"] == "overloaded_error"


def test_count_tokens_passes_worker_errors_on_in_anthropic_shape(anthropic_client: Any) -> None:
    with _fronted([()], models=[MODEL, "retired-model"]) as (proxy, [front]):
        # Served as far as the proxy knows, not by the worker: its own 404, not a count.
        status, _, raw = post(proxy.url + COUNT, _body(model="retired-model"))
        assert status == 404 and front.posted == [COUNT]
        assert _anthropic_error(raw) == {
            "type": "not_found_error",
            "message": "The model `retired-model` does not exist.",
        }
        # An error in OpenAI's shape (vLLM's own routes), or in none.
        front.answers[COUNT] = (
            400,
            "application/json",
            b'{"error": {"message": "prompt too long", "code": 400}}',
        )
        status, _, raw = post(proxy.url + COUNT, _body())
        assert status == 400
        assert _anthropic_error(raw) == {
            "type": "invalid_request_error",
            "message": "prompt too long",
        }
        front.answers[COUNT] = (422, "text/plain", b"Unprocessable Entity")
        with pytest.raises(anthropic.UnprocessableEntityError) as info:
            anthropic_client(proxy.url).messages.count_tokens(**_body())
        assert info.value.body == {"type": "error", "error": {
            "type": "invalid_request_error",
            "message": "the worker could not count tokens (422)"}}  # fmt: skip
        assert RENDER not in front.posted  # a worker's error is an answer: no fallback


def test_workers_without_render_or_tokenize_and_no_tokenizer_get_a_clear_502(
    anthropic_client: Any,
) -> None:
    none = (COUNT, TOKENIZE, *RENDER_PATHS.values())
    with _fronted([none, none]) as (proxy, fronts):
        message = NO_TOKENIZER.format(who="workers 0, 1 serve", render=RENDER)
        for path, body in ((COUNT, _body()), ("/v1/messages", _body(max_tokens=2))):
            status, headers, raw = post(proxy.url + path, body)
            assert status == 502, path
            assert _anthropic_error(raw) == {"type": "api_error", "message": message}
            assert headers["x-should-retry"] == "false"  # retrying cannot help
        # The SDK, which retries 5xx answers by default, asks once.
        client = anthropic_client(proxy.url, max_retries=2)
        answered = proxy.proxy.metrics.value(
            "kvroute_proxy_requests_total", {"endpoint": "/v1/messages", "status": "502"}
        )
        with pytest.raises(anthropic.InternalServerError) as info:
            client.messages.create(**_body(max_tokens=2))
        assert info.value.status_code == 502 and info.value.body["error"]["message"] == message
        assert (
            proxy.proxy.metrics.value(
                "kvroute_proxy_requests_total", {"endpoint": "/v1/messages", "status": "502"}
            )
            == answered + 1
        )
        chat_body = {"model": MODEL, "messages": chat(1), "max_tokens": 2}
        status, _, raw = post(proxy.url + "/v1/chat/completions", chat_body)
        err = json.loads(raw)["error"]
        assert status == 502 and err["code"] == "tokenizer_unavailable"
        assert "neither /v1/chat/completions/render nor /tokenize" in err["message"]
        generation = ("/v1/messages", "/v1/chat/completions")
        assert not [p for f in fronts for p in f.posted if p in generation]
        assert proxy.router.stats()["routed"] == 0
    with _fronted([none], tokenize_with="tokenize") as (proxy, _):
        status, _, raw = post(proxy.url + "/v1/messages", _body(max_tokens=2))
        assert status == 502
        assert _anthropic_error(raw)["message"].startswith(
            "the routing proxy cannot tokenize the request: worker 0 serves no /tokenize;"
        )


def test_a_worker_without_render_or_tokenize_does_not_fail_a_request_another_can_tokenize() -> None:
    with _fronted([(RENDER, TOKENIZE), (RENDER,)]) as (proxy, fronts):
        for _ in range(3):  # the tokenizing calls rotate over the two
            status, _, raw = post(proxy.url + "/v1/messages", _body(max_tokens=2))
            assert status == 200, raw
        # Asked, the first could not tokenize; the second did.
        assert TOKENIZE in fronts[0].posted and TOKENIZE in fronts[1].posted
        assert proxy.router.stats()["routed"] == 3


# -- metrics and logs ------------------------------------------------------------------------


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` over HTTP: ``(sample name, sorted labels) -> value``."""
    status, _, raw = get(url + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(raw.decode())
        for s in family.samples
    }


def test_predicted_cached_tokens_on_metrics_are_the_routed_responses_predictions(
    anthropic_client: Any,
) -> None:
    with fleet(2) as (proxy, _):
        client = anthropic_client(proxy.url)
        predicted: list[int] = []
        served: list[int] = []
        messages: list[dict[str, Any]] = []
        for turn in range(3):
            messages.append({"role": "user", "content": f"step {turn}: run the tests " * 8})
            kwargs = {"model": MODEL, "max_tokens": 4, "system": SYSTEM, "messages": messages,
                      "metadata": {"user_id": "agent-1"}}  # fmt: skip
            raw = client.messages.with_raw_response.create(**kwargs)
            messages.append({"role": "assistant", "content": raw.parse().content[0].text})
            predicted.append(int(raw.headers[PREDICTED_HEADER]))
            served.append(int(raw.headers[WORKER_HEADER]))
        messages.append({"role": "user", "content": "and now?"})
        with client.messages.stream(**{**kwargs, "messages": messages}) as s:
            s.get_final_message()
            predicted.append(int(s.response.headers[PREDICTED_HEADER]))
            served.append(int(s.response.headers[WORKER_HEADER]))
        for path, body in (
            ("/v1/chat/completions", {"model": MODEL, "messages": chat(2), "max_tokens": 2}),
            ("/v1/completions", {"model": MODEL, "prompt": [5] * 80, "max_tokens": 2}),
        ):
            status, headers, _ = post(proxy.url + path, body)
            assert status == 200
            predicted.append(int(headers[PREDICTED_HEADER]))
            served.append(int(headers[WORKER_HEADER]))
        assert sum(predicted[1:4]) > 0  # the session's later turns were predicted hits

        metrics = _scrape(proxy.url)
        name = "kvroute_predicted_cached_tokens"
        assert metrics[(name + "_count", ())] == len(predicted) == proxy.router.stats()["routed"]
        assert metrics[(name + "_sum", ())] == sum(predicted)
        buckets = {dict(k[1])["le"]: v for k, v in metrics.items() if k[0] == name + "_bucket"}
        assert buckets["+Inf"] == len(predicted)
        for le, count in buckets.items():
            assert count == sum(p <= float(le) for p in predicted), le
        for w in range(2):
            key = ("kvroute_routed_requests_total", (("worker", str(w)),))
            assert metrics.get(key, 0.0) == served.count(w)


_PREDICTION_LOG = "usage carries the router's prediction"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_usage_filled_from_the_prediction_is_logged_exactly_when_the_worker_reports_no_reads(
    stream: bool,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    anthropic_client: Any,
) -> None:
    def send(client: Any, rid: str, messages: list[dict[str, Any]]) -> tuple[Any, int, str]:
        kwargs: dict[str, Any] = {
            "model": MODEL, "max_tokens": 3, "system": SYSTEM, "messages": messages,
            "metadata": {"user_id": "s"}, "extra_headers": {"X-Request-Id": rid},
        }  # fmt: skip
        if stream:
            with client.messages.stream(**kwargs) as s:
                return s.get_final_message(), int(s.response.headers[WORKER_HEADER]), ""
        raw = client.messages.with_raw_response.create(**kwargs)
        return raw.parse(), int(raw.headers[WORKER_HEADER]), raw.headers[CACHE_SOURCE_HEADER]

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if _PREDICTION_LOG in r.getMessage()]

    caplog.set_level(logging.INFO, logger="kvroute.proxy")
    with fleet(2) as (proxy, workers):
        client = anthropic_client(proxy.url)
        history = [{"role": "user", "content": "read the file " * 10}]
        for turn in range(2):  # the worker reports its cache reads: nothing to log
            message, _, source = send(client, f"w{turn}", history)
            assert source in ("", "worker")
            history += [{"role": "assistant", "content": message.content[0].text},
                        {"role": "user", "content": f"next {turn}"}]  # fmt: skip
        assert logged() == []

        # vLLM's own /v1/messages usage: no cache figures at all.
        def vllm_usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict[str, Any]:
            return {"input_tokens": prompt_tokens, "output_tokens": output_tokens}

        monkeypatch.setattr("kvroute.testing._http.anthropic_usage", vllm_usage)
        for n in range(1, 3):
            rid = f"p{n}"
            message, worker, source = send(client, rid, history)
            assert source in ("", "predicted")
            record = workers[worker].requests()[-1]
            assert record.request_id == rid
            # Logged once, after the response was relayed (a stream's at its end).
            assert wait_until(lambda n=n: len(logged()) == n)
            line = logged()[-1]
            assert line.name == "kvroute.proxy" and line.levelno == logging.INFO
            reads = message.usage.cache_read_input_tokens
            assert line.args == (rid, worker, "usage carries", reads, record.prompt_tokens)
            assert reads == workers[worker].cache_hits()[rid] > 0
            history += [{"role": "assistant", "content": message.content[0].text},
                        {"role": "user", "content": f"later {n}"}]  # fmt: skip
        assert len(logged()) == 2


def test_openai_answers_without_cached_tokens_count_the_prediction_in_the_metrics(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM's default OpenAI usage has no prompt_tokens_details: the read/write
    # ratio must not take "not reported" for "nothing read".
    def vllm_usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip

    monkeypatch.setattr("kvroute.testing._http.openai_usage", vllm_usage)
    caplog.set_level(logging.INFO, logger="kvroute.proxy")
    with fleet(2) as (proxy, workers):
        messages = chat(1)
        for turn in range(3):
            status, headers, raw = post(
                proxy.url + "/v1/chat/completions",
                {"model": MODEL, "messages": messages, "max_tokens": 3},
                {"X-Session-Id": "s", "X-Request-Id": f"o{turn}"},
            )
            assert status == 200 and "prompt_tokens_details" not in json.loads(raw)["usage"]
            assert headers[CACHE_SOURCE_HEADER] == "predicted"
            messages = [*messages, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": f"next {turn}"}]  # fmt: skip
        hits = sum(w.cache_hits().get(f"o{t}", 0) for w in workers for t in range(3))
        prompts = sum(r.prompt_tokens for w in workers for r in w.requests())
        m = proxy.proxy.metrics
        # event-free routing predicts exactly the workers' hits
        assert hits > 0 and m.value("kvroute_cache_read_tokens_total") == hits
        assert m.value("kvroute_cache_creation_tokens_total") == prompts - hits
        lines = [r for r in caplog.records if "the cache metrics count" in r.getMessage()]
        assert [r.args[0] for r in lines] == ["o0", "o1", "o2"]


def test_a_warm_up_carries_the_requests_credentials() -> None:
    # Against a vLLM started with --api-key a warm-up without them would be refused.
    with _fronted([()], upstream_api_key="sk-fleet", speculative_prefill=True) as (proxy, (f,)):
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 2}
        headers = {"X-Session-Id": "s", "X-Request-Id": "r1", "anthropic-version": "2023-06-01"}
        assert post(proxy.url + "/v1/chat/completions", body, headers)[0] == 200
        assert wait_until(
            lambda: any(h.get("X-Request-Id") == "r1-warmup" for h in f.posted_headers)
        )
        (warm,) = [h for h in f.posted_headers if h.get("X-Request-Id") == "r1-warmup"]
        assert warm["Authorization"] == "Bearer sk-fleet"
        assert warm["anthropic-version"] == "2023-06-01"

"""Per-request deadlines (issue 16, item 11).

Only a connect timeout and a 600 s silence timeout used to bound a request.
Now a deadline (``deadline``, or the client's ``X-Kvroute-Deadline`` up to
``max_deadline``) bounds it whole: past it a request that has sent nothing is
answered 504, a stream ends with an error event, and either way the worker's
request is aborted and its load released at once. The SDKs'
``X-Stainless-Timeout`` bounds the time to the first byte only.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import wait_until
from test_proxy_support import fleet, post, sse_data

from kvroute.proxy import ProxyConfig, WorkerSpec
from kvroute.proxy.deadlines import Deadlines

MODEL = "mock-model"
SLOW = {"token_delay": 0.05}


def _body(rid: str, **kw: Any) -> tuple[dict[str, Any], dict[str, str]]:
    body = {"model": MODEL, "prompt": list(range(1, 41)), "max_tokens": 100, **kw}
    return body, {"X-Request-Id": rid}


def _record(worker: Any, rid: str) -> Any:
    return next(r for r in worker.requests() if r.request_id == rid)


@pytest.mark.parametrize("how", ["config", "header"])
def test_a_request_past_its_deadline_is_answered_504_and_the_worker_stops(how: str) -> None:
    config_kw: dict[str, Any] = {"deadline": 0.5} if how == "config" else {}
    with fleet(1, worker_kw=SLOW, **config_kw) as (proxy, (worker,)):
        body, headers = _body("d1")
        if how == "header":
            headers["X-Kvroute-Deadline"] = "0.5"
        status, got, raw = post(proxy.url + "/v1/completions", body, headers)
        err = json.loads(raw)["error"]
        assert status == 504 and err["code"] == "deadline_exceeded", raw
        assert "deadline passed (0.5 s)" in err["message"]
        assert got.get("x-should-retry") == "false"
        assert wait_until(lambda: _record(worker, "d1").status == "aborted", timeout=5)
        assert _record(worker, "d1").completion_tokens < 100
        assert proxy.router.load(0)["active_requests"] == 0
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_deadlines_exceeded_total", {"stage": "waiting"}) == 1
        assert proxy.router.load(0)["healthy"] is True  # not the worker's fault
        assert proxy.proxy.outliers.state(0).consecutive == 0


def test_an_anthropic_request_past_its_deadline_gets_a_timeout_error() -> None:
    with fleet(1, worker_kw=SLOW, deadline=0.3) as (proxy, _):
        body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}
        status, _, raw = post(proxy.url + "/v1/messages", body)
        assert status == 504 and json.loads(raw)["error"]["type"] == "timeout_error", raw


def test_a_stream_past_its_deadline_ends_with_an_error_event() -> None:
    with fleet(1, worker_kw=SLOW, deadline=0.6) as (proxy, (worker,)):
        body, headers = _body("s1", stream=True)
        status, _, raw = post(proxy.url + "/v1/completions", body, headers)
        assert status == 200
        events = sse_data(raw)
        assert sum(1 for e in events if isinstance(e, dict) and e.get("choices")) >= 3
        assert events[-1]["error"]["code"] == "deadline_exceeded"
        assert wait_until(lambda: _record(worker, "s1").status == "aborted", timeout=5)
        assert wait_until(lambda: proxy.router.load(0)["active_requests"] == 0)
        m = proxy.proxy.metrics
        assert m.value("kvroute_proxy_deadlines_exceeded_total", {"stage": "streaming"}) == 1
        # the first token went out: the request finished (its prompt is cached there)
        ends = [op for _, op, _, _ in proxy.router.journal() if op in ("finished", "failed")]
        assert ends == ["finished"]


def test_the_sdk_timeout_bounds_the_first_byte_not_the_stream() -> None:
    with fleet(1, worker_kw={"token_delay": 0.02}) as (proxy, _):
        body, headers = _body("t1", stream=True, max_tokens=40)  # 0.8 s of tokens
        headers["X-Stainless-Timeout"] = "0.4"
        status, _, raw = post(proxy.url + "/v1/completions", body, headers)
        events = sse_data(raw)
        assert status == 200 and events[-1] == "[DONE]"
        assert sum(1 for e in events if isinstance(e, dict) and e.get("choices")) == 40
        # a JSON answer is its first byte: the same bound cuts it
        body, headers = _body("t2", max_tokens=40)
        headers["X-Stainless-Timeout"] = "0.4"
        status, _, raw = post(proxy.url + "/v1/completions", body, headers)
        assert status == 504, raw
        assert "client's timeout (0.4 s)" in json.loads(raw)["error"]["message"]


def test_a_malformed_deadline_header_is_a_400() -> None:
    with fleet(1) as (proxy, _):
        body, headers = _body("b1", max_tokens=1)
        for bad in ("soon", "-1", "0", "nan"):
            headers["X-Kvroute-Deadline"] = bad
            status, _, raw = post(proxy.url + "/v1/completions", body, headers)
            assert status == 400 and "X-Kvroute-Deadline" in json.loads(raw)["error"]["message"]


def test_deadlines_come_from_the_config_and_headers_capped_by_max_deadline() -> None:
    ds = Deadlines(ProxyConfig([WorkerSpec("http://w")], deadline=60, max_deadline=120))
    assert ds.seconds({}) == (60, None)
    assert ds.seconds({"X-Kvroute-Deadline": "5"}) == (5, None)  # shorter
    assert ds.seconds({"X-Kvroute-Deadline": "90"}) == (90, None)  # longer, within the cap
    assert ds.seconds({"X-Kvroute-Deadline": "999"}) == (120, None)
    assert ds.seconds({"X-Stainless-Timeout": "600"}) == (60, 120)
    assert ds.seconds({"X-Stainless-Timeout": "x"}) == (60, None)  # an SDK's oddity: ignored
    none = Deadlines(ProxyConfig([WorkerSpec("http://w")]))
    assert none.seconds({}) == (None, None)
    with pytest.raises(ValueError):
        ProxyConfig([WorkerSpec("http://w")], deadline=200, max_deadline=100)


def test_a_request_within_its_deadline_is_untouched() -> None:
    with fleet(1, deadline=30) as (proxy, _):
        body, headers = _body("ok", max_tokens=3)
        assert post(proxy.url + "/v1/completions", body, headers)[0] == 200
        req = urllib.request.Request(proxy.url + "/health")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        assert proxy.proxy.deadlines.exceeded == {"waiting": 0, "streaming": 0}

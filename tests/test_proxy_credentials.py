"""The client's credentials never reach a worker when the proxy has its own (issue 16, item 8).

With ``upstream_api_key`` the proxy authenticates to the workers itself: the
client's ``Authorization``, ``x-api-key`` and any other credential header
(cookies, ``proxy-authorization``...) stay with the proxy, on every call made
for the request (tokenizing, generating, warming up). Without it, the
client's ``Authorization`` and ``x-api-key`` pass on, as before.
"""

from __future__ import annotations

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")

from helpers import wait_until
from test_proxy_support import chat, fleet, post

MODEL = "mock-model"

CLIENT = {
    "Authorization": "Bearer client-token",
    "x-api-key": "client-key",
    "Cookie": "session=client-cookie",
    "Proxy-Authorization": "Basic Y2xpZW50",
    "api-key": "client-azure-key",
}


def _sent(workers: list, rid: str) -> list[tuple[str, dict[str, str]]]:
    return [(p, h) for w in workers for p, h in w.request_headers() if h.get("x-request-id") == rid]


def test_with_an_upstream_key_no_client_credential_goes_upstream() -> None:
    with fleet(2, upstream_api_key="sk-fleet", speculative_prefill=True) as (proxy, workers):
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 2}
        headers = {**CLIENT, "X-Request-Id": "c1", "X-Session-Id": "s"}
        status, _, raw = post(proxy.url + "/v1/chat/completions", body, headers)
        assert status == 200, raw
        # the render call, the generation, and the warm-up of the session's next turn
        assert wait_until(lambda: len(_sent(workers, "c1-warmup")) == 1)
        sent = _sent(workers, "c1") + _sent(workers, "c1-warmup")
        paths = sorted(p for p, _ in sent)
        assert paths == ["/v1/chat/completions", "/v1/chat/completions",
                         "/v1/chat/completions/render"]  # fmt: skip
        for path, h in sent:
            assert h["authorization"] == "Bearer sk-fleet", path
            for name in ("x-api-key", "cookie", "proxy-authorization", "api-key"):
                assert name not in h, (path, name)
            assert "client" not in " ".join(h.values()), (path, h)


def test_anthropic_clients_key_stays_with_the_proxy() -> None:
    with fleet(1, upstream_api_key="sk-fleet") as (proxy, workers):
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"x-api-key": "client-key", "anthropic-version": "2023-06-01",
                   "X-Request-Id": "a1"}  # fmt: skip
        assert post(proxy.url + "/v1/messages", body, headers)[0] == 200
        assert post(proxy.url + "/v1/messages/count_tokens", body, headers)[0] == 200
        sent = _sent(workers, "a1")
        assert {p for p, _ in sent} >= {"/v1/messages", "/v1/messages/count_tokens"}
        for path, h in sent:
            assert h["authorization"] == "Bearer sk-fleet" and "x-api-key" not in h, path
            assert h["anthropic-version"] == "2023-06-01"


def test_without_an_upstream_key_the_clients_credentials_pass_on_but_not_its_cookies() -> None:
    with fleet(1) as (proxy, workers):
        body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}
        assert post(proxy.url + "/v1/completions", body, {**CLIENT, "X-Request-Id": "p1"})[0] == 200
        ((_, h),) = _sent(workers, "p1")
        assert h["authorization"] == "Bearer client-token" and h["x-api-key"] == "client-key"
        assert "cookie" not in h and "proxy-authorization" not in h

"""MockWorkerProcess (a MockWorker in its own process, for real signals) and the mock's
additions for fault injection: token ids in completions streams, continuing a final
message, the generation-token counter, and the headers it received.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("jinja2")

from test_proxy_support import sse_data

from kvroute.testing import MockTokenizer, MockWorker
from kvroute.testing.process import MockWorkerProcess

MODEL = "mock-model"


def _post(url: str, body: dict[str, Any], timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def test_a_worker_process_serves_dies_to_sigkill_freezes_and_restarts_on_its_port() -> None:
    w = MockWorkerProcess(publish_events=False, fail_next=(1, 503))
    with w:
        port, pid = w.port, w.pid
        body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
        assert _post(w.url + "/v1/completions", body)[0] == 503  # the queued failure
        assert _post(w.url + "/v1/completions", body)[0] == 200
        w.pause()  # SIGSTOP: connections are accepted by the kernel, never answered
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            urllib.request.urlopen(w.url + "/health", timeout=0.5)
        w.resume()
        assert urllib.request.urlopen(w.url + "/health", timeout=10).status == 200
        w.kill()
        assert not w.running
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(w.url + "/health", timeout=2)
        w.start()
        assert (w.port, w.running) == (port, True) and w.pid != pid
        assert _post(w.url + "/v1/completions", body)[0] == 503  # queued again at the start
    assert not w.running


def test_a_worker_process_with_events_reports_its_endpoints() -> None:
    with MockWorkerProcess() as w:
        assert w.events_endpoint is not None and w.events_endpoint.startswith("tcp://127.0.0.1:")
        assert w.replay_endpoint is not None


def test_completions_return_token_ids_as_vllm_does() -> None:
    with MockWorker(publish_events=False) as w:
        prompt = [5, 6, 7, 8]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": True,
                "return_token_ids": True}  # fmt: skip
        status, raw = _post(w.url + "/v1/completions", body)
        assert status == 200
        chunks = [e for e in sse_data(raw) if isinstance(e, dict)]
        choices = [c["choices"][0] for c in chunks]
        assert choices[0]["prompt_token_ids"] == prompt
        assert all("prompt_token_ids" not in c for c in choices[1:])
        tok = MockTokenizer()
        assert [c["token_ids"] for c in choices] == [
            [tok.encode(c["text"].strip())[-1]] for c in choices
        ]
        # the counter vLLM exports
        with urllib.request.urlopen(w.url + "/metrics", timeout=10) as r:
            assert 'vllm:generation_tokens_total{model_name="mock-model"} 3' in r.read().decode()
        plain = {**body, "return_token_ids": False}
        chunks = [e for e in sse_data(_post(w.url + "/v1/completions", plain)[1]) if e != "[DONE]"]
        assert all("token_ids" not in c["choices"][0] for c in chunks)


def test_chat_continues_a_final_assistant_message() -> None:
    with MockWorker(publish_events=False) as w:
        messages = [{"role": "user", "content": "Spell it"},
                    {"role": "assistant", "content": "alpha bra"}]  # fmt: skip
        body = {"model": MODEL, "messages": messages, "max_tokens": 1,
                "add_generation_prompt": False, "continue_final_message": True,
                "stream": False}  # fmt: skip
        assert _post(w.url + "/v1/chat/completions", body)[0] == 200
        tok = MockTokenizer()
        text = tok.apply_chat_template(messages, add_generation_prompt=False)
        cut = text[: text.rfind("alpha bra") + len("alpha bra")]
        assert list(w.requests()[-1].prompt_token_ids) == tok.encode(cut)
        assert cut != text  # the closing of the assistant's turn is left out
        both = {**body, "add_generation_prompt": True}
        assert _post(w.url + "/v1/chat/completions", both)[0] == 400


def test_request_headers_are_recorded() -> None:
    with MockWorker(publish_events=False) as w:
        req = urllib.request.Request(w.url + "/health", headers={"X-Probe": "1"})
        urllib.request.urlopen(req, timeout=10).close()
        ((path, headers),) = w.request_headers()
        assert path == "/health" and headers["x-probe"] == "1"
        w.clear_log()
        assert w.request_headers() == []

"""kvroute.proxy pieces: SSE splitting, configuration, the CLI, and tokenizing like the engine.

The tokenizer tests give the proxy and the MockWorkers the same Hugging Face
``tokenizer.json`` and chat template, and check that every way the proxy can
tokenize (locally, a worker's render endpoint, a worker's ``/tokenize``) gives
the token ids the worker itself admitted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("jinja2")
tokenizers = pytest.importorskip("tokenizers")

from test_proxy_support import SYSTEM, chat, fleet, get, post, routed_requests  # noqa: E402

from kvroute import __main__ as cli  # noqa: E402
from kvroute.proxy import (  # noqa: E402
    ProxyApp,
    ProxyConfig,
    ProxyError,
    WorkerSpec,
    parse_model_map,
    parse_worker,
)
from kvroute.proxy.anthropic import to_chat, validate_messages  # noqa: E402
from kvroute.proxy.cli import parse_size  # noqa: E402
from kvroute.proxy.sse import SseSplitter  # noqa: E402
from kvroute.proxy.tokenize import LocalTokenizer  # noqa: E402
from kvroute.proxy.workers import parse_worker_metrics  # noqa: E402
from kvroute.testing import DEFAULT_CHAT_TEMPLATE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mock-model"

# -- SSE ---------------------------------------------------------------------------------


def test_sse_splitter_keeps_bytes_across_any_chunking() -> None:
    stream = (
        b": keep-alive\n\n"
        b'event: message_start\r\ndata: {"a": 1}\r\n\r\n'
        b"data: line one\ndata: line two\n\n"
        b"data: [DONE]\n\n"
    )
    for size in (1, 2, 3, 7, len(stream)):
        s = SseSplitter()
        events = []
        for i in range(0, len(stream), size):
            events.extend(s.feed(stream[i : i + size]))
        assert b"".join(e.raw for e in events) == stream
        assert [(e.event, e.data) for e in events] == [
            (None, ""),
            ("message_start", '{"a": 1}'),
            (None, "line one\nline two"),
            (None, "[DONE]"),
        ]
        assert s.flush() == b""
    s = SseSplitter()
    assert list(s.feed(b"data: unterminated")) == [] and s.flush() == b"data: unterminated"


def test_sse_events_decode_the_same_on_the_single_line_path_and_the_general_one() -> None:
    # one data line (the engines' usual event) takes a fast path; the rest split lines
    chunk = {"choices": [{"delta": {"content": "a\u2028b"}}], "n": 2**70, "x": float("nan")}
    one_line = ("data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n").encode()
    shapes = [
        one_line,
        one_line.replace(b"\n\n", b"\r\n\r\n"),
        b"event: x\n" + one_line,
        one_line.replace(b"data: ", b"data:"),
        b"data: [DONE]\n\n",
        b"data: \xff{\n\n",
    ]
    for i, raw in enumerate(shapes):
        (ev,) = SseSplitter().feed(raw)
        assert ev.raw == raw
        if i < 4:  # the chunk, whichever way it was framed
            assert ev.json()["choices"] == chunk["choices"]
            assert ev.event == ("x" if i == 2 else None)
    (ev,) = SseSplitter().feed(one_line)
    # U+2028 is no SSE line end; msgspec declines NaN and 2**70, json takes them
    assert ev.data == json.dumps(chunk, ensure_ascii=False)
    got = ev.json()
    assert got["choices"] == chunk["choices"] and got["n"] == 2**70 and got["x"] != got["x"]
    (ev,) = SseSplitter().feed(b"data: [DONE]\n\n")
    assert ev.data == "[DONE]" and ev.json() is None


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("http://h:8000", WorkerSpec("http://h:8000")),
        ("h:8000/", WorkerSpec("http://h:8000")),
        ("https://h=tcp://h:5557", WorkerSpec("https://h", "tcp://h:5557")),
        ("http://h:1=tcp://h:2,tcp://h:3", WorkerSpec("http://h:1", "tcp://h:2", "tcp://h:3")),
        ("http://h:1=ipc:///tmp/ev", WorkerSpec("http://h:1", "ipc:///tmp/ev")),
    ],
)
def test_parse_worker_forms(text: str, spec: WorkerSpec) -> None:
    assert parse_worker(text) == spec


@pytest.mark.parametrize(
    "text",
    ["", "=tcp://h:1", "ftp://h", "http://h:1=", "http://h:1=h:2", "http://h:99999", "http://h/v1"],
)
def test_parse_worker_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="worker"):
        parse_worker(text)


def test_config_validation_and_helpers() -> None:
    w = [WorkerSpec("http://h:1")]
    with pytest.raises(ValueError, match="at least one worker"):
        ProxyConfig([])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        ProxyConfig(w, tokenize_with="local")
    with pytest.raises(ValueError, match="read_timeout"):
        ProxyConfig(w, read_timeout=0)
    cfg = ProxyConfig([*w, WorkerSpec("http://h:2", "tcp://h:3")], model_map=[("a*", "b")])
    assert cfg.kv_events and not cfg.local_tokenizer
    assert cfg.map_model("abc") == "b" and cfg.map_model("xyz") == "xyz"
    assert parse_model_map("claude-*=qwen") == ("claude-*", "qwen")
    with pytest.raises(ValueError):
        parse_model_map("nothing")
    assert parse_size("1G") == 1 << 30
    with pytest.raises(ValueError):
        parse_size("12 parsecs")
    assert "upstream_api_key" not in repr(ProxyConfig(w, upstream_api_key="secret"))
    assert ProxyConfig(w, lora_adapters=["sql-lora"]).lora_adapters == ("sql-lora",)
    for bad in ([""], [None]):
        with pytest.raises(ValueError, match="LoRA adapter name"):
            ProxyConfig(w, lora_adapters=bad)


def test_parse_worker_metrics_of_vllm_and_sglang() -> None:
    text = (
        "# HELP vllm:num_requests_waiting x\n"
        'vllm:num_requests_waiting{engine="0",model_name="a b"} 2.0\n'
        'vllm:num_requests_waiting{engine="1",model_name="a b"} 3.0\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.5 1700000000\n'
        "sglang:token_usage 0.75\n"
        "vllm:num_requests_running 9\n"
    )
    assert parse_worker_metrics(text) == (5.0, 0.75)


def test_anthropic_validation_and_chat_form() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc=1;"},
                   {"type": "text", "text": "Be careful."}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "tool_use", "id": "t1", "name": "ls", "input": {"d": "."}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1",
                 "content": [{"type": "text", "text": "a.py"}, {"type": "text", "text": "b.py"}]},
                {"type": "text", "text": "now what?"}]},
        ],
    }  # fmt: skip
    validate_messages(body, count_tokens=True)
    messages, tools = to_chat(body)
    assert tools is None
    assert messages == [
        {"role": "system", "content": "Be careful."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "reasoning": "hmm", "tool_calls": [{
            "id": "t1", "type": "function",
            "function": {"name": "ls", "arguments": '{"d": "."}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "a.py\nb.py"},
        {"role": "user", "content": "now what?"},
    ]  # fmt: skip
    # Inside a tool_result vLLM takes objects of any type and reads text, images
    # and tool references: only those are checked.
    nested = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "x", "content": [{"type": "audio"}]}]}]}  # fmt: skip
    validate_messages(nested)
    nested["messages"][0]["content"][0]["content"] = [{"type": "text", "text": 5}]
    with pytest.raises(ProxyError, match=r"content\[0\]\.content\[0\]\.text: must be a string"):
        validate_messages(nested)


# -- the command line --------------------------------------------------------------------


def test_cli_parses_worker_forms() -> None:
    parser = cli.build_parser()
    args = parser.parse_args([
        "proxy", "--worker", "http://a:1=tcp://a:2,tcp://a:3", "--worker", "b:2",
        "--model-map", "claude-*=m", "--max-body-size", "1M", "--port", "0",
        "--lora-adapter", "sql-lora", "--lora-adapter", "doc-lora", "--speculative-prefill",
    ])  # fmt: skip
    assert args.workers == [WorkerSpec("http://a:1", "tcp://a:2", "tcp://a:3"),
                            WorkerSpec("http://b:2")]  # fmt: skip
    assert args.model_map == [("claude-*", "m")] and args.max_body_size == 1 << 20
    from kvroute.proxy.cli import build_config

    config = build_config(args)
    assert config.kv_events and config.session_header == "X-Session-Id"
    assert config.lora_adapters == ("sql-lora", "doc-lora")
    assert config.speculative_prefill
    assert not build_config(parser.parse_args(["proxy", "--worker", "b:2"])).speculative_prefill
    assert args._run is next(c.run for c in cli.COMMANDS if c.name == "proxy")


def test_cli_image_placeholder_reaches_the_local_tokenizer(tokenizer_json: Path) -> None:
    from kvroute.proxy.cli import build_config

    def tokenizer(*extra: str) -> Any:
        argv = ["proxy", "--worker", "http://a:1", "--tokenizer", str(tokenizer_json), *extra]
        return ProxyApp(build_config(cli.build_parser().parse_args(argv))).tokenizer

    assert tokenizer("--image-placeholder", "<|vision_pad|>").image_placeholder == "<|vision_pad|>"
    assert tokenizer().image_placeholder == "<image>"  # this tokenizer config names none


@pytest.mark.parametrize(
    "argv",
    [
        ["proxy"],
        ["proxy", "--worker", "ftp://x"],
        ["proxy", "--worker", "http://a:1", "--retries", "-1"],
        ["proxy", "--worker", "http://a:1", "--max-body-size", "lots"],
        ["proxy", "--worker", "http://a:1", "--read-timeout", "0"],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: kvroute proxy" in capsys.readouterr().err


def test_cli_unknown_policy_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["proxy", "--worker", "http://a:1", "--policy", "nosuch"]) == 2
    assert "unknown routing policy 'nosuch'" in capsys.readouterr().err


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_cli_help_in_a_subprocess() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "kvroute", "proxy", "--help"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    for flag in ("--worker", "--tokenizer", "--session-header", "--model-map", "exit status"):
        assert flag in p.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_until_interrupted() -> None:
    with fleet(1) as (_, workers):
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvroute", "proxy", "--worker", workers[0].url,
             "--port", str(port), "--log-level", "warning"],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if get(url + "/health")[0] == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            body = {"model": MODEL, "messages": chat(1), "max_tokens": 2}
            status, _, raw = post(url + "/v1/chat/completions", body)
            assert status == 200, raw
        finally:
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


# -- tokenizing like the engine ----------------------------------------------------------


def _anthropic_session() -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 3,
        "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "grep", "description": "Search files.",
                   "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}],
        "messages": [
            {"role": "user", "content": "find the bug"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Searching."},
                {"type": "tool_use", "id": "t1", "name": "grep", "input": {"q": "TODO"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "a.py:3: TODO"},
                {"type": "text", "text": "and?", "cache_control": {"type": "ephemeral"}}]},
        ],
    }  # fmt: skip


@pytest.mark.parametrize("mode", ["local", "render", "tokenize"])
def test_every_tokenizing_mode_gives_the_workers_token_ids(mode: str, tokenizer_json: Path) -> None:
    kw: dict[str, Any] = {"tokenize_with": mode}
    if mode == "local":
        kw.update(tokenizer=str(tokenizer_json), chat_template=DEFAULT_CHAT_TEMPLATE)
    worker_kw = {"tokenizer": tokenizer_json}
    with fleet(2, worker_kw=worker_kw, **kw) as (proxy, workers):
        assert (proxy.proxy.tokenizer is not None) == (mode == "local")
        requests = [
            ("/v1/chat/completions",
             {"model": MODEL, "messages": chat(2), "max_tokens": 2,
              "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
            ("/v1/completions", {"model": MODEL, "prompt": SYSTEM + "<|user|>x", "max_tokens": 2}),
            ("/v1/messages", _anthropic_session()),
        ]  # fmt: skip
        for path, body in requests:
            status, headers, raw = post(proxy.url + path, body, {"X-Request-Id": path})
            assert status == 200, raw
            worker = workers[int(headers["X-Kvroute-Worker"])]
            record = worker.requests()[-1]
            assert record.request_id == path
            routed = routed_requests(proxy.router)[-1]
            assert list(routed.tokens) == list(record.prompt_token_ids), path
        # The tokens came the chosen way, not through a silent fallback.
        served: dict[str, int] = {}
        for w in workers:
            for p, n in w.http_requests().items():
                served[p] = served.get(p, 0) + n
        render_paths = ["/v1/chat/completions/render", "/v1/completions/render",
                        "/v1/messages/render"]  # fmt: skip
        if mode == "render":
            assert all(served.get(p) for p in render_paths), served
            assert "/tokenize" not in served and not proxy.proxy.preparer.no_render
        elif mode == "tokenize":
            assert served.get("/tokenize") and not any(p in served for p in render_paths)
        else:
            assert not any(p in served for p in [*render_paths, "/tokenize"]), served


def test_local_tokenizer_from_a_model_directory(tmp_path: Path, tokenizer_json: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|bos|>"}, "eos_token": "<|eos|>",
        "chat_template": [{"name": "default", "template":
                           "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                           "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}],
    }))  # fmt: skip
    tok = LocalTokenizer(tmp_path)
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    ids = tok.render_chat([{"role": "user", "content": parts}])
    # This template prints content as a string: text parts are joined, as vLLM does.
    assert ids == tok.encode("<|bos|>[user]a\nb[assistant]", add_special_tokens=False)
    with pytest.raises(FileNotFoundError):
        LocalTokenizer(tmp_path / "missing")
    bad = LocalTokenizer(tokenizer_json, "{{ raise_exception('no system role') }}")
    with pytest.raises(ProxyError, match="no system role") as info:
        bad.render_chat([{"role": "system", "content": "x"}])
    assert info.value.status == 400


def test_render_falls_back_to_tokenize_and_template_errors_are_400(
    tokenizer_json: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvroute.proxy.prepare as prepare_module

    # Render paths the workers do not serve: they answer 404, as an older vLLM does.
    missing = {k: v + "-missing" for k, v in prepare_module.RENDER_PATHS.items()}
    monkeypatch.setattr(prepare_module, "RENDER_PATHS", missing)
    with fleet(1) as (proxy, workers):
        body = {"model": MODEL, "messages": chat(1), "max_tokens": 1}
        status, _, raw = post(proxy.url + "/v1/chat/completions", body)
        assert status == 200
        assert proxy.proxy.preparer.no_render == {missing["chat"]}
        record = workers[0].requests()[-1]
        assert list(routed_requests(proxy.router)[-1].tokens) == list(record.prompt_token_ids)
        bad = {"model": MODEL, "messages": [{"role": "user", "content": 7}], "max_tokens": 1}
        status, _, raw = post(proxy.url + "/v1/chat/completions", bad)
        assert status == 400 and json.loads(raw)["error"]["message"]
    with fleet(1, tokenizer=str(tokenizer_json), chat_template="{{ raise_exception('nope') }}") as (
        proxy,
        workers,
    ):
        status, _, raw = post(proxy.url + "/v1/chat/completions", body)
        assert status == 400 and "nope" in json.loads(raw)["error"]["message"]
        assert workers[0].requests() == []


# -- token ids in a worker's answer ------------------------------------------------------

_answers = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["token_ids", "tokens", "request_id", "error"]), inner, max_size=3),
    max_leaves=12,
)  # fmt: skip


@given(
    kind=st.sampled_from(["completions", "chat", "messages"]),
    render=st.booleans(),
    answer=_answers | st.fixed_dictionaries(
        {"token_ids": st.lists(st.integers(0, 2**64 - 1)),
         "tokens": st.lists(st.integers(-5, 2**63))}),
)  # fmt: skip
def test_the_fast_token_id_reader_agrees_with_the_slow_one(
    kind: str, render: bool, answer: object
) -> None:
    from kvroute.proxy.tokenize import answer_token_ids, render_token_ids, tokenize_token_ids

    slow_reader = render_token_ids if render else None
    try:
        slow = slow_reader(kind, answer) if slow_reader else tokenize_token_ids(answer)  # type: ignore[arg-type]
    except ValueError:
        slow = None
    got = answer_token_ids(kind, render, json.dumps(answer).encode())  # type: ignore[arg-type]
    # a uint32 array when every id fits in 32 bits, else the list msgspec reads
    fast = None if got is None else [int(t) for t in got]
    # the fast path answers only when it reads what the slow one reads; else it defers
    assert fast is None or fast == slow
    if slow is not None and not any(isinstance(t, bool) or not -(2**63) <= t < 2**64 for t in slow):
        assert fast == slow
    if slow is not None and all(not isinstance(t, bool) and 0 <= t < 2**32 for t in slow):
        assert isinstance(got, np.ndarray) and got.dtype == np.uint32


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        # vLLM's head: plain members, then the ids (read without decoding the answer)
        (b'{"request_id": "r-1", "token_ids": [5, 6], "model": "m"}', [5, 6]),
        (b' \n{ "n" : -1.5e3 ,"ok":true,"x":null, "token_ids" :[7] }\n', [7]),
        # a key that only looks like it: inside a string, under a nested member
        (b'{"request_id": "\\"token_ids\\": [1]", "token_ids": [2]}', [2]),
        (b'{"features": {"token_ids": [1]}, "token_ids": [2]}', [2]),
        (b'{"features": [{"token_ids": [1]}], "token_ids": [3]}', [3]),
        # a second top-level key: the decoder judges (the last one counts)
        (b'{"token_ids": [1], "token_ids": [4]}', [4]),
        # not an answer at all, or cut short
        (b'{"token_ids": [1, 2]', None),
        (b'{"token_ids": [1, 2]} trailing', None),
    ],
)
def test_the_token_id_reader_finds_only_the_top_level_ids(
    text: bytes, ids: list[int] | None
) -> None:
    from kvroute.proxy.tokenize import answer_token_ids

    got = answer_token_ids("chat", True, text)
    assert (None if got is None else [int(t) for t in got]) == ids

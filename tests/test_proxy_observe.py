"""What the proxy tells operators: the access log, the request metrics, the probes, the spans.

In-process proxies (:class:`~kvroute.proxy.ProxyServer`) in front of
MockWorkers for the log lines, /metrics, /livez and /readyz and the spans
(the SDK's in-memory exporter, trace context passed through two proxies on
real HTTP); the command line in a subprocess for the start line, a port in
use, draining on SIGTERM and the console span exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_proxy_support import FAST_HEALTH, SYSTEM, chat, fleet, get, post

from kvroute import Router
from kvroute.events.metrics import LiteHistogram, Metrics
from kvroute.proxy import ProxyConfig, ProxyServer, WorkerSpec
from kvroute.proxy.access_log import FIELDS, AccessLog, open_access_log
from kvroute.proxy.record import RequestRecord
from kvroute.testing import MockWorker

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mock-model"


def _lines(path: Path) -> dict[str, dict[str, Any]]:
    """The access log's JSON lines, by request id."""
    out = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        assert list(entry) == list(FIELDS)
        out[entry["id"]] = entry
    return out


def _stream_body(max_tokens: int = 4) -> dict[str, Any]:
    return {"model": MODEL, "messages": chat(1), "max_tokens": max_tokens, "stream": True}


def _hang_up_mid_stream(url: str, request_id: str) -> None:
    """Start a streamed request, read its first bytes, and close the connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    body = json.dumps(_stream_body(200)).encode()
    conn.request(
        "POST", "/v1/chat/completions", body,
        {"Content-Type": "application/json", "X-Request-Id": request_id},
    )  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 200
    while True:  # the stream began: read up to its first token
        line = resp.readline()
        assert line, "the stream ended before its first token"
        if line.startswith(b"data: {"):
            (choice,) = json.loads(line[6:])["choices"]
            if choice["delta"].get("content"):
                break
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


# -- the access log ----------------------------------------------------------------------


def test_access_log_lines_for_json_stream_failure_and_hang_up(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with fleet(2, access_log=str(path)) as (proxy, workers):
        headers = {"X-Session-Id": "s1"}
        body = {"model": MODEL, "messages": chat(2), "max_tokens": 3}
        status, h, _ = post(proxy.url + "/v1/chat/completions", body,
                            {**headers, "X-Request-Id": "json-1"})  # fmt: skip
        assert status == 200
        json_worker = int(h["X-Kvroute-Worker"])
        status, h, raw = post(proxy.url + "/v1/chat/completions", _stream_body(),
                              {**headers, "X-Request-Id": "stream-1"})  # fmt: skip
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
        status, _, _ = post(proxy.url + "/v1/chat/completions", raw=b"{nope",
                            headers={"X-Request-Id": "bad-1"})  # fmt: skip
        assert status == 400
        for w in workers:
            w.fail_next(1, 500)
        status, _, _ = post(proxy.url + "/v1/completions",
                            {"model": MODEL, "prompt": SYSTEM, "max_tokens": 2},
                            {"X-Request-Id": "failed-1"})  # fmt: skip
        assert status == 500
        for w in workers:
            w.token_delay = 0.02
        _hang_up_mid_stream(proxy.url, "gone-1")
        assert wait_until(lambda: "gone-1" in path.read_text(), timeout=10)
        record = {r.request_id: r for w in workers for r in w.requests()}
    lines = _lines(path)
    assert set(lines) == {"json-1", "stream-1", "bad-1", "failed-1", "gone-1"}

    ok = lines["json-1"]
    served = record["json-1"]
    assert ok["method"] == "POST" and ok["path"] == "/v1/chat/completions"
    assert ok["status"] == 200 and ok["outcome"] == "ok" and ok["stream"] is False
    assert ok["model"] == MODEL and ok["session"] == "s1" and ok["client"] == "127.0.0.1"
    assert ok["worker"] == json_worker and ok["worker_label"] == workers[json_worker].url[7:]
    assert ok["policy"] == "kvroute" and ok["retries"] == 0
    assert ok["prompt_tokens"] == served.prompt_tokens and ok["output_tokens"] == 3
    assert ok["reported_cached_tokens"] == served.cached_tokens
    assert ok["predicted_cached_tokens"] >= 0 and ok["matched_blocks"] >= 0
    assert 0 < ok["ttft_ms"] <= ok["duration_ms"] and ok["tokenize_ms"] > 0
    assert ok["time"].endswith("Z") and ok["time"][10] == "T"

    st = lines["stream-1"]
    assert st["stream"] is True and st["status"] == 200 and st["outcome"] == "ok"
    assert st["output_tokens"] == 4 and st["prompt_tokens"] == record["stream-1"].prompt_tokens
    # the second turn of session s1 went where the first did, and hit its cache
    assert st["worker"] == json_worker and st["matched_blocks"] > 0
    assert st["predicted_cached_tokens"] == st["matched_blocks"] * 16
    assert 0 < st["ttft_ms"] < st["duration_ms"]

    bad = lines["bad-1"]
    assert bad["status"] == 400 and bad["outcome"] == "error"
    assert bad["worker"] is None and bad["retries"] is None and bad["ttft_ms"] is None
    assert bad["duration_ms"] >= 0

    failed = lines["failed-1"]
    assert failed["status"] == 500 and failed["outcome"] == "upstream_failed"
    assert failed["retries"] == 1 and failed["worker"] in (0, 1)
    assert failed["output_tokens"] is None and failed["ttft_ms"] is None

    gone = lines["gone-1"]
    assert gone["status"] == 200 and gone["outcome"] == "client_closed"
    assert gone["ttft_ms"] is not None and gone["output_tokens"] is None


def test_text_access_log_and_off(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    with fleet(1, access_log=str(path), access_log_format="text") as (proxy, _):
        body = {"model": MODEL, "prompt": "hello there", "max_tokens": 2}
        assert post(proxy.url + "/v1/completions", body, {"X-Request-Id": "t 1"})[0] == 200
        assert get(proxy.url + "/health")[0] == 200  # probes and scrapes are not logged
        assert get(proxy.url + "/metrics")[0] == 200
    (line,) = path.read_text().splitlines()
    assert line.startswith("time=") and ' id="t 1" ' in line
    assert " path=/v1/completions status=200 outcome=ok model=mock-model " in line
    assert " session=" not in line and " worker=0 " in line  # None fields left out
    with fleet(1, access_log="off") as (proxy, _):
        assert proxy.proxy.observer.access_log is None
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        assert post(proxy.url + "/v1/completions", body)[0] == 200


def test_access_log_buffers_until_the_interval_or_64k() -> None:
    out = io.StringIO()

    async def go() -> tuple[str, str, str]:
        log = AccessLog(out, "json", flush_interval=0.05)
        log.write({"id": "a"})
        early = out.getvalue()
        await asyncio.sleep(0.2)
        timed = out.getvalue()
        log.write({"id": "x" * (1 << 16)})  # over 64 KiB: written at once
        return early, timed, out.getvalue()

    early, timed, big = asyncio.run(go())
    assert early == "" and timed == '{"id":"a"}\n' and len(big) > 1 << 16
    text = io.StringIO()
    AccessLog(text, "text").write({"a": 'say "hi"', "b": None, "c": True, "d": ""})
    assert text.getvalue() == 'a="say \\"hi\\"" c=true d=""\n'  # written at once: no loop
    assert open_access_log("off") is None
    with pytest.raises(ValueError, match="format must be 'json' or 'text'"):
        AccessLog(text, "xml")


def test_access_log_file_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_text("earlier\n")
    log = open_access_log(str(path), "json")
    assert log is not None
    log.write({"id": "r"})
    log.close()
    log.close()
    assert path.read_text() == 'earlier\n{"id":"r"}\n'
    with pytest.raises(OSError):
        open_access_log(str(tmp_path / "missing" / "a.log"))


def test_a_record_json_line_equals_its_fields() -> None:
    r = RequestRecord("POST", '/v1/"odd"', start=5.0)
    r.id, r.model, r.session, r.client = "i\n1", "m\u00e9", None, "::1"
    r.worker, r.policy, r.matched_blocks, r.predicted_cached_tokens = 2, "pin", 3, 48
    r.prompt_tokens, r.cached_tokens, r.output_tokens, r.stream = 60, None, 7, True
    r.first, r.end, r.tokenize_seconds, r.attempts, r.status = 5.0125, 5.5, 0.002, 3, 200
    assert json.loads(r.json_line("w-2", 1e9)) == r.fields("w-2", 1e9)
    assert r.fields("w-2", 1e9)["retries"] == 2 and r.inter_token == pytest.approx(0.4875 / 6)


# -- metrics -----------------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sum(family: Any, suffix: str, **labels: str) -> float:
    return sum(
        s.value for s in family.samples
        if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items())
    )  # fmt: skip


def test_metrics_histograms_count_every_routed_request() -> None:
    with fleet(2) as (proxy, workers):
        for i in range(3):
            body = {"model": MODEL, "messages": chat(i + 1), "max_tokens": 2}
            assert post(proxy.url + "/v1/chat/completions", body)[0] == 200
        for _ in range(2):
            assert post(proxy.url + "/v1/chat/completions", _stream_body(5))[0] == 200
        post(proxy.url + "/v1/chat/completions", raw=b"[]")  # 400: counted nowhere below
        # a health round scrapes the workers' /metrics
        def scraped() -> bool:
            return "kvroute_worker_kv_usage{" in get(proxy.url + "/metrics")[2].decode()

        assert wait_until(scraped)
        text = get(proxy.url + "/metrics")[2].decode()
        prompt_total = sum(r.prompt_tokens for w in workers for r in w.requests())
    assert "_created" not in text
    fams = _families(text)
    assert _sum(fams["kvroute_proxy_request_seconds"], "_count") == 5
    assert _sum(fams["kvroute_proxy_ttft_seconds"], "_count") == 5
    assert _sum(fams["kvroute_proxy_inter_token_seconds"], "_count") == 2  # streams only
    assert _sum(fams["kvroute_proxy_output_tokens"], "_count") == 5
    assert _sum(fams["kvroute_proxy_output_tokens"], "_sum") == 3 * 2 + 2 * 5
    assert _sum(fams["kvroute_proxy_prompt_tokens"], "_sum") == prompt_total
    assert _sum(fams["kvroute_tokenize_seconds"], "_count") == 5
    assert _sum(fams["kvroute_route_seconds"], "_count") == 5
    # buckets are cumulative and end in +Inf = count
    ttft = fams["kvroute_proxy_ttft_seconds"]
    for w in ("0", "1"):
        inf = _sum(ttft, "_bucket", worker=w, le="+Inf")
        assert inf == _sum(ttft, "_count", worker=w)
    info = {s.labels["worker"]: s.labels for s in fams["kvroute_worker_info"].samples}
    assert info["0"]["url"] == workers[0].url and info["1"]["name"] == workers[1].url[7:]
    assert info["0"]["role"] == "both"
    usage = {s.labels["worker"] for s in fams["kvroute_worker_kv_usage"].samples}
    assert usage <= {"0", "1"} and usage
    assert _sum(fams["kvroute_proxy_requests_in_flight"], "") == 0


def test_worker_info_names_a_named_worker() -> None:
    w = MockWorker(publish_events=False).start()
    try:
        config = ProxyConfig([WorkerSpec(w.url, name="gpu-a")], access_log="off", **FAST_HEALTH)
        router = Router(block_size=16, kv_events=False)
        with ProxyServer(config, router=router) as server:
            text = get(server.url + "/metrics")[2].decode()
    finally:
        w.stop()
    (sample,) = _families(text)["kvroute_worker_info"].samples
    assert sample.labels == {
        "worker": "0", "url": w.url, "name": "gpu-a", "role": "both", "state": "active",
        "source": "flag",
    }  # fmt: skip


def test_lite_histogram_exposes_what_prometheus_client_would() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    values = [0.003, 0.05, 0.05, 0.7, 12.0, 900.0]
    ours = Metrics()
    reg = CollectorRegistry()
    theirs = Histogram("kvroute_proxy_ttft_seconds", "x", ["worker"], registry=reg,
                       buckets=[float(b.labels["le"]) for b in _buckets(ours)])  # fmt: skip
    for v in values:
        ours.request_finished(1, 1.0, v, None, None, None)
        theirs.labels("1").observe(v)

    def samples(text: bytes) -> set[tuple[str, str, float]]:
        fam = _families(text.decode())["kvroute_proxy_ttft_seconds"]
        return {(s.name, s.labels.get("le", ""), s.value) for s in fam.samples
                if not s.name.endswith("_created")}  # fmt: skip

    assert samples(ours.render()) == samples(generate_latest(reg))
    h = LiteHistogram("x_seconds", "x", ("a",), (1.0,))
    with pytest.raises(ValueError, match="takes labels"):
        h.labels()


def _buckets(m: Metrics) -> list[Any]:
    m.request_finished(0, 1.0, 1.0, None, None, None)
    fam = _families(m.render().decode())["kvroute_proxy_ttft_seconds"]
    out = [s for s in fam.samples if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
    m.ttft_seconds._children.clear()
    m._per_worker.clear()
    return out


# -- probes ------------------------------------------------------------------------------


def test_livez_and_readyz_through_drain_and_a_dead_fleet() -> None:
    with fleet(1) as (proxy, workers):
        assert json.loads(get(proxy.url + "/livez")[2]) == {"status": "ok"}
        status, _, raw = get(proxy.url + "/readyz")
        assert status == 200 and json.loads(raw) == {"status": "ready"}
        proxy.proxy.probes.drain()
        status, _, raw = get(proxy.url + "/readyz")
        assert status == 503 and json.loads(raw)["reasons"] == ["draining"]
        assert get(proxy.url + "/livez")[0] == 200
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
        assert post(proxy.url + "/v1/completions", body)[0] == 200  # still serving
        proxy.proxy.probes.draining = False
        workers[0].stop()
        assert wait_until(lambda: get(proxy.url + "/readyz")[0] == 503, timeout=10)
        assert json.loads(get(proxy.url + "/readyz")[2])["reasons"] == ["no healthy worker"]
        assert get(proxy.url + "/livez")[0] == 200
        workers[0].start()


def test_readyz_needs_the_event_subscriber_with_kv_events() -> None:
    worker = MockWorker().start()
    try:
        spec = WorkerSpec(worker.url, worker.events_endpoint, worker.replay_endpoint)
        config = ProxyConfig([spec], access_log="off", **FAST_HEALTH)
        with ProxyServer(config) as server:
            assert get(server.url + "/readyz")[0] == 200
            server.proxy.subscriber.stop()
            status, _, raw = get(server.url + "/readyz")
            assert status == 503
            assert json.loads(raw)["reasons"] == ["the KV-event subscriber is not running"]
    finally:
        worker.stop()


# -- tracing -----------------------------------------------------------------------------


def test_spans_carry_the_decision_and_the_trace_reaches_the_worker(
    tokenizer_json: Path,
) -> None:
    """A client -> proxy A -> proxy B -> MockWorker: one trace, each span the parent of the next."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from kvroute.proxy.tracing import Tracing
    from kvroute.testing import DEFAULT_CHAT_TEMPLATE

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker = MockWorker(publish_events=False, tokenizer=tokenizer_json).start()
    try:
        inner_cfg = ProxyConfig([WorkerSpec(worker.url, name="engine")], access_log="off",
                                tracing=True, **FAST_HEALTH)  # fmt: skip
        inner = ProxyServer(inner_cfg, router=Router(block_size=16, kv_events=False))
        inner.proxy.observer.tracing = Tracing(provider)
        with inner:
            outer_cfg = ProxyConfig(
                [WorkerSpec(inner.url, name="inner-proxy")], access_log="off", tracing=True,
                tokenizer=str(tokenizer_json), chat_template=DEFAULT_CHAT_TEMPLATE, **FAST_HEALTH,
            )  # fmt: skip
            outer = ProxyServer(outer_cfg, router=Router(block_size=16, kv_events=False))
            outer.proxy.observer.tracing = Tracing(provider)
            with outer:
                client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
                parent = f"00-{client_trace}-00f067aa0ba902b7-01"
                body = {"model": MODEL, "messages": chat(2), "max_tokens": 2}
                status, _, _ = post(outer.url + "/v1/chat/completions", body,
                                    {"traceparent": parent, "X-Session-Id": "t"})  # fmt: skip
                assert status == 200
                assert get(outer.url + "/health")[0] == 200  # probes make no span
    finally:
        worker.stop()
    spans = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/chat/completions"]
    assert len(spans) == 2
    outer_span = next(s for s in spans if s.attributes["kvroute.worker.label"] == "inner-proxy")
    inner_span = next(s for s in spans if s.attributes["kvroute.worker.label"] == "engine")
    assert f"{outer_span.context.trace_id:032x}" == client_trace
    assert f"{outer_span.parent.span_id:016x}" == "00f067aa0ba902b7"
    # the traceparent the outer proxy sent made the inner proxy's span its child
    assert inner_span.context.trace_id == outer_span.context.trace_id
    assert inner_span.parent.span_id == outer_span.context.span_id
    attrs = outer_span.attributes
    assert attrs["kvroute.worker"] == 0 and attrs["kvroute.policy"] == "kvroute"
    assert attrs["kvroute.retries"] == 0 and attrs["http.response.status_code"] == 200
    assert attrs["kvroute.matched_blocks"] >= 0 and attrs["kvroute.predicted_cached_tokens"] >= 0
    assert attrs["gen_ai.request.model"] == MODEL and attrs["gen_ai.usage.output_tokens"] == 2
    assert attrs["kvroute.session"] == "t" and attrs["kvroute.outcome"] == "ok"
    assert outer_span.kind.name == "SERVER"


def test_the_proxy_without_tracing_never_imports_opentelemetry() -> None:
    code = (
        "import sys\n"
        "from kvroute.proxy import ProxyConfig, ProxyServer, parse_worker\n"
        "from kvroute.proxy.cli import build_config\n"
        "ProxyServer(ProxyConfig([parse_worker('http://127.0.0.1:9')]))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -- the command line: start, port in use, drain, console spans ----------------------------


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _proxy_process(*args: str, **env: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvroute", "proxy", "--port", str(port), *args],
        cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        ready = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if get(url + "/livez")[0] == 200:
                    ready = True
                    break
            time.sleep(0.05)
        assert ready, proc.communicate(timeout=30)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_cli_drains_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    worker = MockWorker(publish_events=False, token_delay=0.1).start()
    try:
        with _proxy_process("--worker", worker.url, "--shutdown-delay", "1", "--access-log",
                            str(log), "--health-interval", "0.2") as (proc, url):  # fmt: skip
            got: dict[str, Any] = {}

            def stream() -> None:
                got["answer"] = post(url + "/v1/chat/completions", _stream_body(20),
                                     {"X-Request-Id": "long"}, timeout=30)  # fmt: skip

            t = threading.Thread(target=stream)
            t.start()
            assert wait_until(lambda: _generating(worker))
            proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda: get(url + "/readyz")[0] == 503, timeout=5)
            assert json.loads(get(url + "/readyz")[2])["reasons"] == ["draining"]
            assert get(url + "/livez")[0] == 200
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
            assert post(url + "/v1/completions", body, {"X-Request-Id": "late"})[0] == 200
            t.join(30)
            _out, err = proc.communicate(timeout=30)
        status, _, raw = got["answer"]
        assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
        assert raw.count(b'"content"') >= 20  # the whole stream, not cut by the stop
        assert proc.returncode == 0, err
    finally:
        worker.stop()
    assert "kvroute proxy listening on http://127.0.0.1:" in err
    assert f"; 1 worker (1 healthy: 0={worker.url[7:]}); policy kvroute;" in err
    assert "KV events off (approximate mode)" in err and "settings from command line" in err
    assert "SIGTERM received: draining 1 request (up to 30s)" in err
    assert err.rstrip().endswith("kvroute.proxy: stopped"), err
    lines = _lines(log)
    assert lines["long"]["outcome"] == "ok" and lines["long"]["output_tokens"] == 20
    assert lines["late"]["status"] == 200


def test_cli_cuts_off_what_outlives_the_shutdown_timeout(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    worker = MockWorker(publish_events=False, token_delay=0.1).start()
    try:
        with _proxy_process("--worker", worker.url, "--shutdown-timeout", "0.5",
                            "--access-log", str(log)) as (proc, url):  # fmt: skip
            def cut_off() -> None:
                # the stream is cut when the proxy stops: the read fails
                with contextlib.suppress(OSError, http.client.HTTPException):
                    post(url + "/v1/chat/completions", _stream_body(100),
                         {"X-Request-Id": "long"}, timeout=30)  # fmt: skip

            t = threading.Thread(target=cut_off)
            t.start()
            assert wait_until(lambda: _generating(worker))
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=30)
            t.join(30)
    finally:
        worker.stop()
    assert proc.returncode == 0, err
    assert "SIGINT received: draining 1 request (up to 0.5s)" in err
    assert "stopped: 1 request cut off" in err
    line = _lines(log)["long"]
    # its status line went out before the cut: 200, as kvroute_proxy_requests_total counts it
    assert line["outcome"] == "shutdown" and line["status"] == 200


def test_cli_port_in_use_fails_before_announcing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "kvroute", "proxy", "--worker", "127.0.0.1:9",
             "--port", str(port), "--health-timeout", "0.2"],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 2
    assert f"kvroute proxy: error: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        done.stderr
    )
    assert "listening" not in done.stderr


def test_cli_tracing_exports_spans_to_the_console() -> None:
    pytest.importorskip("opentelemetry.sdk")
    worker = MockWorker(publish_events=False).start()
    try:
        with _proxy_process("--worker", worker.url, "--tracing", "--access-log", "off",
                            OTEL_TRACES_EXPORTER="console") as (proc, url):  # fmt: skip
            body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
            assert post(url + "/v1/completions", body, {"X-Request-Id": "traced"})[0] == 200
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    finally:
        worker.stop()
    assert proc.returncode == 0, err
    assert "tracing: spans go to console" in err
    span = json.loads(out[out.index("{"):])  # one span: the request's
    assert span["name"] == "POST /v1/completions" and span["kind"] == "SpanKind.SERVER"
    assert span["attributes"]["kvroute.request_id"] == "traced"
    assert span["attributes"]["kvroute.worker"] == 0
    assert span["resource"]["attributes"]["service.name"] == "kvroute-proxy"


def _generating(worker: MockWorker) -> bool:
    """The worker's latest request has produced a token."""
    records = worker.requests()
    return bool(records) and records[-1].completion_tokens > 0

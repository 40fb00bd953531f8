"""WorkerSpec: the one definition of a worker that flags, files, the admin API and DNS share."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvroute.fleet import ROLES, WorkerSpec, normalize_url, parse_worker


def test_the_proxy_re_exports_the_fleet_definition() -> None:
    from kvroute import proxy

    assert proxy.WorkerSpec is WorkerSpec and proxy.parse_worker is parse_worker


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("h:8000", "http://h:8000"),
        (" https://h:1/ ", "https://h:1"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_urls_are_normalized_once(text: str, url: str) -> None:
    assert normalize_url(text) == url
    assert WorkerSpec(text).url == url
    # the same worker, however it was spelled
    assert WorkerSpec(text) == WorkerSpec(url)


def test_flags_give_roles() -> None:
    spec = parse_worker("h:1=tcp://h:2", role="prefill")
    assert spec == WorkerSpec("http://h:1", "tcp://h:2", role="prefill")
    with pytest.raises(ValueError, match="worker 'h:1': role must be one of"):
        parse_worker("h:1", role="both-ish")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({}, ValueError, "'url' is missing"),
        ({"url": "h:1", "port": 5}, ValueError, "unknown key 'port'"),
        ({"url": "h:1", "events": "tcp://h:2", "events_endpoint": "tcp://h:3"}, ValueError,
         "given twice"),
        ({"url": "h:1", "replay": "tcp://h:3"}, ValueError, "replay_endpoint needs an events"),
        ({"url": "h:1", "events": "h:2"}, ValueError, "needs a scheme"),
        ({"url": "h:1", "events": 5557}, TypeError, "must be a string"),
        ({"url": "h:1", "role": "prefil"}, ValueError, "role must be one of both, prefill"),
        ({"url": "h:1", "bootstrap_port": 0}, ValueError, "bootstrap_port"),
        ({"url": "h:1", "bootstrap_port": True}, ValueError, "bootstrap_port"),
        ({"url": "h:1", "bootstrap_port": "8998"}, ValueError, "bootstrap_port"),
        ({"url": "h:1", "events_format": "vLLM 0.33"}, ValueError, "events_format"),
        ({"url": "h:1", "name": " "}, ValueError, "name must be a non-empty string"),
        ({"url": 8000}, TypeError, "url must be a string"),
    ],
)  # fmt: skip
def test_from_mapping_names_what_is_wrong(
    data: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        WorkerSpec.from_mapping(data)
    if "url" in data:
        with pytest.raises(error, match=f"worker {data['url']!r}"):
            WorkerSpec.from_mapping(data)


def test_from_mapping_refuses_what_is_not_a_mapping() -> None:
    with pytest.raises(TypeError, match="a worker must be a mapping"):
        WorkerSpec.from_mapping(["http://h:1"])  # type: ignore[arg-type]


def test_label_defaults_and_format_defaults() -> None:
    spec = WorkerSpec("http://10.0.0.5:8000/")
    assert spec.label == "10.0.0.5:8000" and spec.host == "10.0.0.5"
    assert WorkerSpec("h:1", name="decode-0").label == "decode-0"
    assert spec.with_defaults(events_format="sglang").events_format == "sglang"
    trt = WorkerSpec("h:1", events_format="trtllm")
    assert trt.with_defaults(events_format="vllm") is trt


specs = st.builds(
    WorkerSpec,
    url=st.sampled_from(["http://a:1", "https://b", "c:8000"]),
    events_endpoint=st.one_of(st.none(), st.just("tcp://a:5557")),
    events_format=st.sampled_from([None, "vllm", "sglang", "trtllm"]),
    role=st.sampled_from(ROLES),
    bootstrap_port=st.one_of(st.none(), st.integers(1, 65535)),
    name=st.one_of(st.none(), st.text(min_size=1).filter(str.strip)),
)


@given(specs)
def test_to_mapping_round_trips_through_json(spec: WorkerSpec) -> None:
    data = json.loads(json.dumps(spec.to_mapping()))
    assert WorkerSpec.from_mapping(data) == spec
    assert set(data) <= {"url", "events_endpoint", "replay_endpoint", "events_format", "role",
                         "bootstrap_port", "name"}  # fmt: skip


def test_runtime_ids_agree_across_spellings_and_stay_clear_of_positions() -> None:
    from kvroute.fleet import RUNTIME_ID_BASE, runtime_worker_id

    urls = [f"http://10.0.{i // 256}.{i % 256}:8000" for i in range(2000)]
    ids = {runtime_worker_id(u) for u in urls}
    assert len(ids) == len(urls)  # no collision in a large fleet
    assert all(RUNTIME_ID_BASE <= i < 2**53 for i in ids)
    assert runtime_worker_id("10.0.0.1:8000/") == runtime_worker_id("http://10.0.0.1:8000")
    assert runtime_worker_id("https://10.0.0.1:8000") != runtime_worker_id("http://10.0.0.1:8000")

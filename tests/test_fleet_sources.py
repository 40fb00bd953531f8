"""The workers file and DNS discovery: what they claim, what they take back, what they survive."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

from kvroute.fleet import WorkerSpec
from kvroute.fleet.dns import DnsDiscovery, DnsName, parse_worker_dns, resolve_addresses
from kvroute.fleet.files import WorkersFile, load_workers_file, parse_workers
from kvroute.fleet.membership import Membership


def write(path: Path, data: object, *, yaml_text: str | None = None) -> None:
    """Write a new version of the file (a new inode, as editors and ConfigMaps do)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml_text if yaml_text is not None else json.dumps(data))
    os.replace(tmp, path)


# -- the workers file ----------------------------------------------------------------------


def test_json_and_yaml_files_give_the_same_workers(tmp_path: Path) -> None:
    entries = [
        {"url": "http://p0:8000", "events": "tcp://p0:5557", "role": "prefill",
         "bootstrap_port": 8998, "name": "p0"},
        "d0:8000=tcp://d0:5557,tcp://d0:5558",
    ]  # fmt: skip
    j = tmp_path / "workers.json"
    write(j, entries)
    y = tmp_path / "workers.yaml"
    write(y, None, yaml_text="""
workers:
  - url: http://p0:8000
    events: tcp://p0:5557
    role: prefill
    bootstrap_port: 8998
    name: p0
  - d0:8000=tcp://d0:5557,tcp://d0:5558
""")
    assert load_workers_file(j) == load_workers_file(y)
    specs = load_workers_file(y)
    assert specs[0].role == "prefill" and specs[0].bootstrap_port == 8998
    assert specs[1] == WorkerSpec("http://d0:8000", "tcp://d0:5557", "tcp://d0:5558")
    empty = tmp_path / "empty.yaml"
    write(empty, None, yaml_text="")
    assert load_workers_file(empty) == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"url": "h:1"}', "expected a list of workers"),
        ('[{"url": "h:1", "port": 2}]', r"\[0\]: worker 'h:1': unknown key 'port'"),
        ('["h:1", "ftp://x"]', r"\[1\]: .*not an http"),
        ('["h:1", "h:1/"]', r"\[1\]: http://h:1 is already .*\[0\]"),
        ("[1, ", "not valid JSON"),
    ],
)
def test_a_bad_file_is_refused_with_the_entry_named(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_workers_file(path)


def test_bad_yaml_and_a_missing_file() -> None:
    with pytest.raises(ValueError, match="expected a list"):
        parse_workers("h:1")
    with pytest.raises(OSError):
        load_workers_file("/nonexistent/workers.yaml")


def test_a_file_reloads_what_changed_and_keeps_its_workers_when_bad(tmp_path: Path) -> None:
    path = tmp_path / "workers.json"
    write(path, ["a:1", "b:1"])
    m = Membership()
    heard: list[tuple[str, str]] = []
    m.listen(lambda c: heard.append((c.kind, c.member.spec.url)))
    f = WorkersFile(path, m, interval=0.5)
    f.load()
    assert [w.spec.url for w in m] == ["http://a:1", "http://b:1"]
    assert not f.poll()  # unchanged
    write(path, ["a:1=tcp://a:2", "c:1"])
    assert f.poll() and f.reloads == 1
    assert heard[2:] == [("updated", "http://a:1"), ("added", "http://c:1"),
                         ("draining", "http://b:1")]  # fmt: skip
    # a bad version is logged once and changes nothing
    write(path, None, yaml_text="[not json")
    assert not f.poll() and not f.poll()
    assert f.errors == 1 and len(heard) == 5
    path.unlink()
    assert not f.poll() and not f.poll() and f.errors == 2
    # fixed: reloaded against the last good version
    write(path, ["a:1=tcp://a:2", "c:1", "d:1"])
    assert f.poll() and heard[-1] == ("added", "http://d:1")


def test_a_file_dropping_a_worker_the_admin_also_added_leaves_it_in(tmp_path: Path) -> None:
    path = tmp_path / "workers.json"
    write(path, [{"url": "w:1", "name": "filed"}])
    m = Membership()
    f = WorkersFile(path, m)
    f.load()
    wid = m.add(WorkerSpec("w:1", name="posted"), source="admin").id
    write(path, [])
    assert f.poll()
    w = m.get(wid)
    assert w is not None and w.state == "active" and w.spec.name == "posted"


def test_the_file_is_required_to_parse_at_start(tmp_path: Path) -> None:
    path = tmp_path / "workers.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        WorkersFile(path, Membership()).load()
    with pytest.raises(ValueError, match="interval"):
        WorkersFile(path, Membership(), interval=0)


def test_the_watcher_runs_until_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "workers.json"
    write(path, ["a:1"])
    m = Membership()
    f = WorkersFile(path, m, interval=0.01)
    f.load()

    async def scenario() -> None:
        task = asyncio.create_task(f.run())
        write(path, ["a:1", "b:1"])
        while m.by_url("b:1") is None:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


# -- DNS -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("svc:8000", DnsName("svc", 8000)),
        ("svc.ns.svc.cluster.local:8000=5557", DnsName("svc.ns.svc.cluster.local", 8000, 5557)),
        ("svc:8000=5557,5558", DnsName("svc", 8000, 5557, 5558)),
        ("https://svc:443", DnsName("svc", 443, scheme="https")),
        ("[::1]:8000=5557", DnsName("::1", 8000, 5557)),
    ],
)
def test_dns_names_parse_and_print_back(text: str, name: DnsName) -> None:
    assert parse_worker_dns(text) == name
    assert parse_worker_dns(str(name)) == name


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("svc", "expected HOST:PORT"),
        (":8000", "expected HOST:PORT"),
        ("svc:http", "port 'http' is not a port number"),
        ("svc:8000=0", "events port 0 is not in 1..65535"),
        ("svc:8000=5557,x", "replay port 'x'"),
        ("ftp://svc:21", "scheme must be http or https"),
    ],
)
def test_bad_dns_names(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_worker_dns(text)


class Resolver:
    """Answers from a table the test edits; an entry that is an exception is raised."""

    def __init__(self, table: dict[str, Iterable[str] | OSError]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str) -> Iterable[str]:
        self.asked.append(host)
        answer = self.table[host]
        if isinstance(answer, OSError):
            raise answer
        return answer


def test_dns_claims_new_addresses_and_drains_the_ones_gone() -> None:
    m = Membership()
    heard: list[tuple[str, str]] = []
    m.listen(lambda c: heard.append((c.kind, c.member.spec.url)))
    resolver = Resolver({"svc": ["10.0.0.1", "10.0.0.2"], "other": ["10.0.0.2", "fd00::9"]})
    names = [parse_worker_dns("svc:8000=5557,5558"), parse_worker_dns("other:8000=5557,5558")]
    dns = DnsDiscovery(names, m, resolver=resolver)

    async def scenario() -> None:
        assert await dns.resolve()
        assert sorted(w.spec.url for w in m) == [
            "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://[fd00::9]:8000"]  # fmt: skip
        w = m.by_url("http://[fd00::9]:8000")
        assert w is not None and w.source == "dns"
        assert w.spec.events_endpoint == "tcp://[fd00::9]:5557"
        assert not await dns.resolve()  # the same answers: nothing to do
        # svc loses 10.0.0.2, which other still has; other fails: its addresses stay
        resolver.table["svc"] = ["10.0.0.1", "10.0.0.3"]
        resolver.table["other"] = OSError("SERVFAIL")
        assert await dns.resolve()
        assert heard[-1] == ("added", "http://10.0.0.3:8000") and len(heard) == 4
        # other answers without fd00::9: it drains
        resolver.table["other"] = ["10.0.0.2"]
        assert await dns.resolve()
        assert heard[-1] == ("draining", "http://[fd00::9]:8000")

    asyncio.run(scenario())


def test_dns_loses_no_claim_of_the_file() -> None:
    m = Membership()
    filed = m.add(WorkerSpec("http://10.0.0.1:8000", name="pinned"), source="file")
    resolver = Resolver({"svc": ["10.0.0.1"]})
    dns = DnsDiscovery([DnsName("svc", 8000)], m, resolver=resolver)

    async def scenario() -> None:
        await dns.resolve()
        resolver.table["svc"] = []
        await dns.resolve()

    asyncio.run(scenario())
    assert m.get(filed.id) == filed


def test_real_getaddrinfo_resolves_localhost() -> None:
    addresses = asyncio.run(resolve_addresses("localhost"))
    assert "127.0.0.1" in addresses or "::1" in addresses
    with pytest.raises(OSError):
        asyncio.run(resolve_addresses("no-such-host.invalid"))
    m = Membership()
    dns = DnsDiscovery([parse_worker_dns("localhost:8000=5557")], m)
    assert asyncio.run(dns.resolve())
    urls = {w.spec.url for w in m}
    assert urls & {"http://127.0.0.1:8000", "http://[::1]:8000"}
    with pytest.raises(ValueError, match="interval"):
        DnsDiscovery([], m, interval=-1)

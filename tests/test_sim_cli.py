"""``kvroute replay``: one seed fixes the run, the report records what reproduces it, errors first.

Reproducibility is checked across processes (each with its own
``PYTHONHASHSEED``), since a dependence on str hashing or on what ran
before in the process cannot show inside one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kvroute import __main__ as cli
from kvroute.policies import get_policy
from kvroute.sim import cli as sim_cli
from kvroute.sim.engine import EngineConfig
from kvroute.sim.plots import policy_styles
from kvroute.sim.replay import RouterDispatcher, SimClock, make_dispatcher
from kvroute.sim.report import REPORT_FORMAT, REPORT_VERSION, without_run_facts
from kvroute.sim.seeding import derive_seed, policy_parameters, policy_seed

ROOT = Path(__file__).resolve().parents[1]

#: Every random stream at once: the agentic generator (str session ids), policies
#: that break ties or sample, and KV event loss with lag.
RANDOM_RUN = [
    "replay", "agentic:3", "--policy", "kvroute,kv_cost,power_of_two,random,cache_aware",
    "--workers", "4", "--gpu-blocks", "512", "--event-loss", "0.2", "--event-lag", "0.05",
]  # fmt: skip
SMALL_MOONCAKE = ["replay", "default", "--limit", "300", "--workers", "4", "--gpu-blocks", "1024"]


def run_cli(*args: str, hashseed: str = "0") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": hashseed}
    return subprocess.run(
        [sys.executable, "-m", "kvroute", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def split_run_facts(text: str) -> tuple[str, dict[str, Any]]:
    """The report's text before its run-facts block, and the block; the block comes last."""
    doc = json.loads(text)
    assert list(doc)[-1] == "run"
    head, sep, _ = text.rpartition('\n "run": ')
    assert sep
    return head, doc["run"]


def report(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "r.json"
    assert cli.main([*args, "--json", str(out), "-q"]) == 0
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


# -- one seed, one run ----------------------------------------------------------------


def test_two_processes_print_the_same_table_and_write_the_same_report(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    first = run_cli(*RANDOM_RUN, "--seed", "3", "--json", str(out), hashseed="1")
    assert first.returncode == 0, first.stderr
    text1 = out.read_text()
    second = run_cli(*RANDOM_RUN, "--seed", "3", "--json", str(out), hashseed="2")
    assert second.returncode == 0, second.stderr
    text2 = out.read_text()
    assert first.stdout == second.stdout
    head1, run1 = split_run_facts(text1)
    head2, run2 = split_run_facts(text2)
    assert head1.encode() == head2.encode()
    assert set(run1) >= {"started_utc", "wall_s", "argv"} and set(run1) == set(run2)


def test_the_seed_changes_what_draws_random_numbers_and_nothing_else(tmp_path: Path) -> None:
    a = report(tmp_path, *RANDOM_RUN, "--seed", "3")["results"]["policies"]
    b = report(tmp_path, *RANDOM_RUN, "--seed", "4")["results"]["policies"]
    # the agentic generator takes the seed: another seed is another workload
    assert a["power_of_two"]["requests"] != b["power_of_two"]["requests"] or (
        a["power_of_two"]["ttft_ms"] != b["power_of_two"]["ttft_ms"]
    )
    moon = [*SMALL_MOONCAKE, "--policy", "power_of_two,random,round_robin,cache_aware"]
    c = report(tmp_path, *moon, "--seed", "0")["results"]["policies"]
    d = report(tmp_path, *moon, "--seed", "1")["results"]["policies"]
    for name in ("power_of_two", "random"):  # their draws move with the seed
        assert c[name]["ttft_ms"] != d[name]["ttft_ms"]
    for name in ("round_robin", "cache_aware"):  # deterministic: the seed is not theirs
        assert c[name] == d[name]


def test_a_policys_figures_do_not_depend_on_the_policies_run_before_it(tmp_path: Path) -> None:
    """Regression: unnamed blocks took keys from a process-wide counter."""
    a = report(tmp_path, *SMALL_MOONCAKE, "--policy", "kvroute,power_of_two")
    b = report(tmp_path, *SMALL_MOONCAKE, "--policy", "power_of_two,kvroute")
    assert a["results"]["policies"] == {
        k: b["results"]["policies"][k] for k in ("kvroute", "power_of_two")
    }


def test_policy_seeds_come_from_the_run_seed_unless_given() -> None:
    params = policy_parameters("kv_cost", seed=5)
    assert params["seed"] == policy_seed(5, "kv_cost") == derive_seed(5, "policy", "kv_cost")
    assert policy_parameters("kv_cost", {"seed": 11}, seed=5)["seed"] == 11
    assert "seed" not in policy_parameters("cache_aware", seed=5)

    def rng_state(policy_params: dict[str, Any] | None, seed: int | None) -> Any:
        kw = {} if policy_params is None else {"policy_params": policy_params}
        d = make_dispatcher("kv_cost", seed=seed, **kw)(SimClock(), 2, EngineConfig())
        assert isinstance(d, RouterDispatcher)
        return d.router.policy._rng.bit_generator.state  # type: ignore[attr-defined]

    def state_of(seed: int) -> Any:
        return get_policy("kv_cost", seed=seed)._rng.bit_generator.state  # type: ignore[attr-defined]

    assert rng_state(None, 5) == state_of(policy_seed(5, "kv_cost"))
    assert rng_state({"seed": 11}, 5) == state_of(11)
    assert rng_state({"router_temperature": 0.5}, 5) == state_of(policy_seed(5, "kv_cost"))


# -- the report -----------------------------------------------------------------------


def test_the_report_records_what_reproduces_the_run_once(tmp_path: Path) -> None:
    doc = report(tmp_path, *SMALL_MOONCAKE, "--policy", "kvroute,round_robin", "--seed", "2")
    assert list(doc) == [
        "format", "format_version", "kvroute_version", "command", "seed", "parameters",
        "trace", "results", "run",
    ]  # fmt: skip
    assert (doc["format"], doc["format_version"], doc["seed"]) == (REPORT_FORMAT, REPORT_VERSION, 2)
    p = doc["parameters"]
    assert list(p) == ["workload", "fleet", "engine", "router", "events", "policies"]
    assert p["engine"]["num_gpu_blocks"] == 1024 and p["engine"]["timing"]["prefill_c"] > 0
    assert p["policies"]["kvroute"]["seed"] == policy_seed(2, "kvroute")
    assert p["policies"]["kvroute"]["uncached_weight"] == 1.5  # defaults are recorded too
    assert p["policies"]["round_robin"] == {"start": 0}
    trace = doc["trace"]
    bundled = ROOT / "kvroute" / "data" / "mooncake_conversation.jsonl.gz"
    assert trace["sha256"] == hashlib.sha256(bundled.read_bytes()).hexdigest()
    assert trace["requests"] == 300 and len(trace["requests_sha256"]) == 64
    for figures in doc["results"]["policies"].values():
        assert "ttft_mean_ms" not in figures and "wall_s" not in figures  # each figure once
        assert figures["rejected"] == 0 and figures["completed"] == 300
    assert set(doc["results"]["bounds"]) == {"unbounded", "pooled_lru"}
    # the recorded command, run again, is the same run
    again = tmp_path / "again.json"
    argv = shlex.split(doc["command"])
    assert argv[:2] == ["kvroute", "replay"] and "--json" not in argv
    assert cli.main([*argv[1:], "--json", str(again), "-q"]) == 0
    assert without_run_facts(json.loads(again.read_text())) == without_run_facts(doc)


def test_the_trace_identity_follows_what_was_replayed(tmp_path: Path) -> None:
    a = report(tmp_path, *SMALL_MOONCAKE, "--policy", "round_robin")["trace"]
    b = report(tmp_path, *SMALL_MOONCAKE, "--policy", "round_robin", "--limit", "200")["trace"]
    assert a["sha256"] == b["sha256"]  # one file
    assert a["requests_sha256"] != b["requests_sha256"]  # other requests
    g = report(tmp_path, "replay", "agentic:2", "--policy", "round_robin")
    assert g["trace"]["path"] is None and g["trace"]["sha256"] is None
    assert g["parameters"]["workload"]["agentic"]["sessions"] == 2


def test_nan_figures_are_written_as_null(tmp_path: Path) -> None:
    trace = tmp_path / "one.jsonl"  # one-token outputs: no TPOT
    rows = [{"timestamp": i, "input_length": 600, "output_length": 1, "hash_ids": [0, i]}
            for i in range(3)]  # fmt: skip
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    doc = report(tmp_path, "replay", str(trace), "--policy", "round_robin", "--workers", "2")
    assert doc["results"]["policies"]["round_robin"]["tpot_ms"]["mean"] is None
    assert "NaN" not in (tmp_path / "r.json").read_text()


def test_the_table_has_units_and_says_what_spread_and_regret_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main([*SMALL_MOONCAKE, "--policy", "kvroute", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "Mooncake conversation trace (bundled): 300 requests on 4 workers x 1,024 blocks x "
        "512 tokens, seed 0\n"
    )
    assert "TTFT (ms)" in out and "req/s" in out
    assert "load spread: requests" in out and "overlap regret: prompt blocks" in out
    assert "bound: pooled LRU" in out and "bound: unbounded" in out


# -- failures are said, and said first -------------------------------------------------


def test_a_fleet_where_nothing_fits_fails_before_replaying(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    p = run_cli(*SMALL_MOONCAKE, "--gpu-blocks", "1", "--json", str(out))
    assert p.returncode == 2 and p.stdout == ""
    assert "no request fits one worker's KV cache" in p.stderr and "--gpu-blocks is 1" in p.stderr
    assert not out.exists()


def test_an_empty_trace_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    p = run_cli("replay", str(empty))
    assert p.returncode == 2 and "no requests to replay" in p.stderr and p.stdout == ""


def test_requests_too_large_for_a_worker_are_reported(tmp_path: Path) -> None:
    p = run_cli(*SMALL_MOONCAKE[:3], "50", "--gpu-blocks", "40", "--policy", "round_robin")
    assert p.returncode == 0, p.stderr
    assert "8 of 50 requests need more KV blocks than a worker has" in p.stderr
    assert "note: round_robin: 8 of 50 requests rejected" in p.stdout


@pytest.mark.parametrize(
    ("flag", "target", "message"),
    [
        ("--json", "missing/r.json", "does not exist"),
        ("--json", ".", "is a directory"),
        ("--plot", "missing/deeper", "does not exist"),
        ("--plot", "file.txt", "is not a directory"),
    ],
)
def test_a_bad_output_path_fails_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    target: str,
    message: str,
) -> None:
    (tmp_path / "file.txt").write_text("")

    def must_not_run(*a: object, **k: object) -> None:
        raise AssertionError("the trace was loaded before the outputs were checked")

    monkeypatch.setattr(sim_cli, "load_mooncake", must_not_run)
    assert cli.main(["replay", "default", flag, str(tmp_path / target)]) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} " in err and message in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_directory_fails_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert cli.main(["replay", "default", "--json", str(locked / "r.json")]) == 2
        assert "no permission" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_plots_are_written_with_the_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    img = tmp_path / "img"  # created: its folder exists
    assert cli.main([*SMALL_MOONCAKE, "--policy", "kvroute,round_robin", "--plot", str(img),
                     "-q"]) == 0  # fmt: skip
    assert sorted(p.name for p in img.iterdir()) == ["reuse.png", "ttft_cdf.png"]
    for p in img.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_files_are_written_before_the_table(tmp_path: Path) -> None:
    """Regression: `kvroute replay ... --json r.json | head` lost the report."""
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [*SMALL_MOONCAKE, "--policy", "round_robin", "--json", str(out)]
    with subprocess.Popen(
        [sys.executable, "-m", "kvroute", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    ) as p:  # fmt: skip
        assert p.stdout is not None
        p.stdout.close()  # the reader is gone before the table is printed
        assert p.wait(timeout=300) == 0
    assert json.loads(out.read_text())["trace"]["requests"] == 300


# -- progress -------------------------------------------------------------------------


def test_progress_shows_elapsed_and_eta_only_when_enabled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("tqdm")
    with sim_cli._progress("kvroute (1/1)", 10, enabled=False) as bar:
        assert bar is None
    with sim_cli._progress("kvroute (1/1)", 10, enabled=True) as bar:
        assert bar is not None
        bar(5, 10)
        bar(10, 10)
    err = capsys.readouterr().err
    assert "kvroute (1/1)" in err and "10/10" in err and "<" in err  # elapsed<remaining
    p = run_cli(*SMALL_MOONCAKE, "--limit", "20", "--policy", "round_robin")
    assert "req/s]" not in p.stderr  # stderr is a pipe: no bar


def test_styles_tell_eight_policies_and_more_apart() -> None:
    names = ["round_robin", "random", "least_loaded", "power_of_two", "session_affinity",
             "cache_aware", "kv_cost", "kvroute", "mine", "yours", "theirs"]  # fmt: skip
    s = policy_styles(names)
    looks = {(v["color"], v["linestyle"]) for v in s.values()}
    assert len(looks) == len(names)
    assert len({s[k]["color"] for k in names[:8]}) == 8
    assert policy_styles(["kvroute"])["kvroute"] == s["kvroute"]  # fixed across figures

"""The replay sweep: grid, real replays on trace slices, seeds, markdown tables, PNGs, script."""

from __future__ import annotations

import doctest
import importlib.util
import json
import math
import struct
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvroute.sim import (
    AgenticConfig,
    EngineConfig,
    ReplayResult,
    load_mooncake,
    make_dispatcher,
    pooled_lru_reuse,
    replay,
    unbounded_reuse,
)
from kvroute.sim import plots as P
from kvroute.sim import sweep as S
from kvroute.sim.sweep import GridPoint, SweepRow

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 400  # Mooncake requests: enough to share prefixes and evict on a small fleet
CENTER = (2, 512, 1.0)
POLICIES = ["round_robin", "cache_aware", "kvroute"]
SEEDS = (0, 1)
WORKLOADS = {
    "mooncake": S.mooncake_workload(limit=LIMIT),
    "agentic": S.agentic_workload(replace(AgenticConfig(), sessions=3)),
}


def test_doctests() -> None:
    result = doctest.testmod(S)
    assert result.attempted > 0 and result.failed == 0


# -- grid ---------------------------------------------------------------------------


def test_star_grid_varies_one_factor_at_a_time_around_the_centre() -> None:
    pts = S.star_grid(["m", "a"], workers=(4, 8, 16), gpu_blocks=(1024, 2048), speedups=(1, 2))
    per = len(pts) // 2
    assert per == 1 + 2 + 1 + 1  # the centre once, then each axis without it
    assert pts[0] == GridPoint("m", *S.CENTER) and pts[per] == GridPoint("a", *S.CENTER)
    assert len(set(pts)) == len(pts)
    for p in pts:
        moved = sum(
            v != c for v, c in zip((p.workers, p.gpu_blocks, p.speedup), S.CENTER, strict=True)
        )
        assert moved <= 1


@pytest.mark.parametrize(
    "bad", [{"workers": 0}, {"gpu_blocks": -1}, {"speedup": 0.0}, {"speedup": math.nan}]
)
def test_grid_point_rejects_nonpositive_settings(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GridPoint(**{"workload": "m", "workers": 2, "gpu_blocks": 8, "speedup": 1.0, **bad})


# -- real replays -------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept() -> tuple[list[GridPoint], list[SweepRow], list[tuple[Any, ...]]]:
    pts = S.star_grid(
        list(WORKLOADS), workers=(2, 4), gpu_blocks=(512,), speedups=(1.0, 2.0), center=CENTER
    )
    calls: list[tuple[Any, ...]] = []

    def keep(p: GridPoint, policy: str, seed: int | None, r: ReplayResult) -> None:
        calls.append((p, policy, seed, r.summary["ttft_ms"]["mean"]))

    rows = S.run_sweep(pts, POLICIES, WORKLOADS, seeds=SEEDS, on_replay=keep)
    return pts, rows, calls


def test_one_row_per_point_policy_and_seed_of_a_seeded_policy(swept: Any) -> None:
    pts, rows, calls = swept
    assert len(pts) == 6
    assert len(rows) == len(pts) * (1 + 1 + len(SEEDS)) == len(calls)
    assert [(r.point, r.policy, r.seeds) for r in rows] == [
        (p, k, () if s is None else (s,)) for p, k, s, _ in calls
    ]
    assert {r.seeds for r in rows if r.policy == "kvroute"} == {(0,), (1,)}
    assert all(r.seeds == () for r in rows if r.policy != "kvroute")
    moon = [r for r in rows if r.workload == "mooncake"]
    assert all(r.requests == LIMIT == r.completed for r in moon)


def test_rows_are_the_replay_api_figures(swept: Any) -> None:
    """A row is what replay() gives for the same fleet, trace and policy seed."""
    _, rows, _ = swept
    row = next(r for r in rows if r.policy == "kvroute" and r.seeds == (1,) and r.speedup == 2.0)
    reqs = load_mooncake(block_size=512, speedup=2.0, limit=LIMIT)
    cfg = EngineConfig(num_gpu_blocks=row.gpu_blocks, block_size=512)
    disp = make_dispatcher("kvroute", policy_params={"seed": 1})
    s = replay(reqs, disp, num_workers=row.workers, config=cfg).summary
    assert (row.prefix_reuse, row.ttft_mean_ms, row.ttft_p99_ms) == (
        s["prefix_reuse"],
        s["ttft_ms"]["mean"],
        s["ttft_ms"]["p99"],
    )
    assert row.bounds == {
        "unbounded": unbounded_reuse(reqs, 512)["prefix_reuse"],
        "pooled_lru": pooled_lru_reuse(reqs, 512, row.workers * row.gpu_blocks)["prefix_reuse"],
    }


def test_no_policy_beats_the_unbounded_cache_and_the_pool_grows_with_the_fleet(
    swept: Any,
) -> None:
    _, rows, _ = swept
    assert rows
    for r in rows:
        assert 0.0 < r.prefix_reuse <= r.bounds["unbounded"] + 1e-12
        assert r.bounds["pooled_lru"] <= r.bounds["unbounded"] + 1e-12
    for wl in WORKLOADS:
        b = {r.workers: r.bounds for r in rows if r.workload == wl and r.speedup == 1.0}
        assert b[4]["unbounded"] == b[2]["unbounded"]
        assert b[4]["pooled_lru"] >= b[2]["pooled_lru"]  # LRU: a bigger cache holds a superset
    # some request reuses something under every policy, but round-robin is not the best at it
    moon = S.median_rows(r for r in rows if r.workload == "mooncake" and r.point.workers == 4)
    by = {r.policy: r.prefix_reuse for r in moon if r.speedup == 1.0}
    assert max(by, key=lambda k: by[k]) != "round_robin"


def test_median_rows_merges_seeds(swept: Any) -> None:
    pts, rows, _ = swept
    med = S.median_rows(rows)
    assert len(med) == len(pts) * len(POLICIES)
    for m in med:
        same = [r for r in rows if r.point == m.point and r.policy == m.policy]
        assert m.seeds == tuple(s for r in same for s in r.seeds)
        assert m.ttft_mean_ms == pytest.approx(sum(r.ttft_mean_ms for r in same) / len(same))


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_win_table_names_the_argmin_and_argmax(swept: Any) -> None:
    _, rows, _ = swept
    med = S.median_rows(rows)
    table = S.win_table(med, baselines=("round_robin", "cache_aware"), center=CENTER)
    lines = _cells(table)
    points = list(dict.fromkeys(r.point for r in med))
    assert len(lines) == len(points) + 1
    for p, cells in zip(points, lines[:-1], strict=True):
        here = {r.policy: r for r in med if r.point == p}
        fastest = min(here, key=lambda k: here[k].ttft_mean_ms)
        tail = min(here, key=lambda k: here[k].ttft_p99_ms)
        reuse = max(here, key=lambda k: here[k].prefix_reuse)
        assert cells[4].split()[0].rstrip(",") == fastest
        assert cells[4].endswith(f" {here[fastest].ttft_mean_ms:.0f}")
        assert tail in cells[5] and reuse in cells[6]
        kv, rr = here["kvroute"], here["round_robin"]
        assert cells[7] == f"{kv.ttft_mean_ms / rr.ttft_mean_ms:.2f} / " + (
            f"{kv.ttft_p99_ms / rr.ttft_p99_ms:.2f}"
        )
        assert cells[2] == "512"
        assert cells[1] == ("2" if p.workers == 2 else f"**{p.workers}**")
    tally = lines[-1]
    assert tally[0] == f"wins (of {len(points)})"
    assert sum(int(x.split()[-1]) for x in tally[4].split(",")) >= len(points)


def test_tables_refuse_unmerged_seeds(swept: Any) -> None:
    _, rows, _ = swept
    with pytest.raises(ValueError, match="median_rows"):
        S.win_table(rows)
    with pytest.raises(ValueError, match="median_rows"):
        S.metric_table(rows, "ttft_mean_ms")


def test_metric_table_bolds_the_best(swept: Any) -> None:
    _, rows, _ = swept
    med = S.median_rows(rows)
    lines = _cells(S.metric_table(med, "prefix_reuse", digits=4, bounds=True))
    for cells in lines:
        vals = [float(c.strip("*")) for c in cells[4:7]]
        bold = [c.startswith("**") for c in cells[4:7]]
        if len(set(vals)) > 1:
            assert bold[vals.index(max(vals))]
        assert float(cells[7]) >= max(vals)  # the unbounded bound
    with pytest.raises(ValueError, match="unknown metric"):
        S.metric_table(med, "policy")


def test_unknown_names_fail_before_any_replay() -> None:
    calls: list[object] = []
    pt = [GridPoint("mooncake", 2, 64, 1.0)]
    with pytest.raises(KeyError, match="no_such_policy"):
        S.run_sweep(
            pt, ["round_robin", "no_such_policy"], WORKLOADS, on_replay=lambda *a: calls.append(a)
        )
    with pytest.raises(KeyError, match="nowhere"):
        S.run_sweep([replace(pt[0], workload="nowhere")], ["round_robin"], WORKLOADS)
    with pytest.raises(ValueError, match="seeds"):
        S.run_sweep(pt, ["round_robin"], WORKLOADS, seeds=())
    assert calls == []


# -- plots --------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert len(data) < 150_000
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_plots_write_small_valid_pngs(swept: Any, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, rows, _ = swept
    med = S.median_rows(rows)
    out = tmp_path / "sweep.png"
    P.plot_sweep(med, out, center=CENTER, dpi=50)
    w, h = _png_size(out)
    assert w > h > 100
    with pytest.raises(ValueError, match="axes"):
        P.plot_sweep(med, tmp_path / "x.png", axes=("colour",))
    reqs = load_mooncake(block_size=512, limit=100)
    cfg = EngineConfig(num_gpu_blocks=256, block_size=512)
    runs = {k: replay(reqs, make_dispatcher(k), num_workers=2, config=cfg) for k in POLICIES}
    paths = P.plot_point(tmp_path / "img", runs, med[0].bounds, prefix="x_")
    assert [Path(p).name for p in paths] == ["x_ttft_cdf.png", "x_reuse.png"]
    for p in paths:
        assert min(_png_size(Path(p))) > 100


# -- the script ---------------------------------------------------------------------


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sweep_replay", ROOT / "benchmarks/sweep_replay.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_quick_writes_rows_tables_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert _script().main(["--quick", "--workloads", "agentic", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "## Where each policy wins" in out and "| agentic | 4 | 1024 | 1x |" in out
    doc = json.loads((tmp_path / "rows.json").read_text())
    assert len(doc["median"]) == len(doc["runs"]) == 4 * 2  # 4 points x 2 policies, one seed
    assert (tmp_path / "sweep.md").read_text() == out.rstrip("\n") + "\n"
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == [
        "sim_agentic_reuse.png",
        "sim_agentic_ttft_cdf.png",
        "sim_sweep_ttft_mean_ms.png",
        "sim_sweep_ttft_p99_ms.png",
    ]
    # --replot redoes the tables and the sweep plots from rows.json, without replaying
    img = tmp_path / "img"
    assert _script().main(["--replot", str(tmp_path / "rows.json"), "--img", str(img)]) == 0
    assert capsys.readouterr().out == out
    assert sorted(p.name for p in img.iterdir()) == names[2:]

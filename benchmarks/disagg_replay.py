"""The figures of docs/disaggregation.md: policies x conditional rule x workload, on a P/D fleet.

Replays the bundled Mooncake conversation trace and the default agentic
sessions on a disaggregated fleet (4 prefill + 4 decode workers x 2,048
blocks x 512 tokens, 100 Gbit/s per decode worker, 128 KiB of KV per token)
with kvroute's Router choosing both workers of each request, for each
prefill policy (``round_robin``, ``kv_cost``, ``cache_aware``, ``kvroute``)
and each conditional rule: always remote (threshold 0), the threshold alone
(2,048 tokens, ``local_if_held=False``: Dynamo's and llm-d's rule), and the
threshold with the held clause (kvroute's default). ``kv_cost`` and
``kvroute`` run with seeds 0, 1, 2 and the tables show medians; a threshold
sweep of ``kvroute`` follows. Writes ``rows.json`` and ``disagg.md`` (the
tables) into ``--out`` and the PNGs into ``--img``::

    PYTHONPATH=. nice -n 10 python benchmarks/disagg_replay.py --out /tmp/pd --img docs/img
    PYTHONPATH=. python benchmarks/disagg_replay.py --quick --out /tmp/pd-quick

The replay runs on simulated time: the figures do not depend on the machine,
only the wall seconds do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvroute.disagg import DisaggConfig
from kvroute.sim.disagg import DisaggFleet, DisaggResult, plot_disagg, replay_disagg
from kvroute.sim.engine import EngineConfig
from kvroute.sim.workloads import AgenticConfig, SimRequest, agentic_sessions, load_mooncake

POLICIES = ("round_robin", "kv_cost", "cache_aware", "kvroute")
SEEDED = ("kv_cost", "kvroute")
#: rule label -> (threshold, held clause)
RULES = {"remote": (0, True), "threshold": (2048, False), "conditional": (2048, True)}
SWEEP = (0, 512, 1024, 2048, 4096, 8192)


def _workloads(quick: bool) -> dict[str, Callable[[], list[SimRequest]]]:
    if quick:
        return {
            "agentic": lambda: agentic_sessions(AgenticConfig(sessions=6), block_size=512, seed=0),
            "mooncake": lambda: load_mooncake(block_size=512, limit=600),
        }
    return {
        "agentic": lambda: agentic_sessions(AgenticConfig(), block_size=512, seed=0),
        "mooncake": lambda: load_mooncake(block_size=512),
    }


def _row(s: dict[str, Any]) -> dict[str, float]:
    t = s["ttft_ms"]
    return {
        "reuse": s["prefix_reuse"],
        "local": s["local_share"],
        "ttft_mean": t["mean"],
        "ttft_p50": t["p50"],
        "ttft_p99": t["p99"],
        "tpot": s["tpot_ms"]["mean"],
        "e2e": s["e2e_ms"]["mean"],
        "req_s": s["throughput"]["requests_per_s"],
        "xfer_ms": s["transfer_ms"]["mean"],
        "gb": s["transfer_gb"],
        "p_spread": s["load_spread"]["prefill_requests"],
        "d_spread": s["load_spread"]["decode_requests"],
    }


def _median(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


COLS = (
    ("reuse", "reuse", 3), ("local", "local share", 2), ("ttft_mean", "TTFT mean", 1),
    ("ttft_p50", "p50", 1), ("ttft_p99", "p99", 1), ("tpot", "TPOT", 2), ("e2e", "E2E", 0),
    ("req_s", "req/s", 2), ("xfer_ms", "transfer ms", 1), ("gb", "GB moved", 0),
    ("p_spread", "P spread", 2), ("d_spread", "D spread", 2),
)  # fmt: skip


def _table(
    rows: dict[str, dict[str, float]], best: Sequence[str] = ("ttft_mean", "ttft_p99")
) -> str:
    head = "| run | " + " | ".join(c[1] for c in COLS) + " |"
    lines = [head, "|" + "---|" * (len(COLS) + 1)]
    lows = {k: min(r[k] for r in rows.values()) for k in best}
    for name, r in rows.items():
        cells = []
        for key, _, digits in COLS:
            v = r[key]
            text = "-" if v != v else f"{v:.{digits}f}"
            if key in lows and v == lows[key]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for rows.json and disagg.md")
    ap.add_argument("--img", default=None, help="directory for the PNGs (default: --out)")
    ap.add_argument("--quick", action="store_true", help="tiny workloads, one seed (seconds)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    img = a.img or a.out
    seeds = (0,) if a.quick else (0, 1, 2)
    cfg = EngineConfig(num_gpu_blocks=2048, block_size=512)
    fleet = DisaggFleet(4, 4, cfg, cfg, transfer_gbps=100.0)
    t0 = time.time()
    doc: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.system()}, CPython {platform.python_version()}",
        "fleet": "4 prefill + 4 decode x 2048 blocks x 512 tokens, 100 Gbit/s, 131072 B/token",
        "workloads": {},
    }
    md = [f"fleet: {doc['fleet']}; medians of seeds {list(seeds)} for {', '.join(SEEDED)}", ""]
    for wl, load in _workloads(a.quick).items():
        reqs = load()
        out: dict[str, Any] = {"requests": len(reqs), "runs": {}, "sweep": {}}
        plots: dict[str, DisaggResult] = {}
        for rule, (thr, held) in RULES.items():
            for pol in POLICIES:
                rows = []
                for seed in seeds if pol in SEEDED else (0,):
                    r = replay_disagg(
                        reqs,
                        pol,
                        fleet,
                        disagg=DisaggConfig(local_prefill_tokens=thr, local_if_held=held),
                        policy_params={"seed": seed} if pol in SEEDED else None,
                    )
                    rows.append(_row(r.summary))
                    if seed == 0 and rule != "threshold":
                        plots[f"{pol}@{rule}"] = r
                    sys.stderr.write(f"{wl} {pol} {rule} seed {seed}: {time.time() - t0:.0f}s\n")
                out["runs"][f"{pol} / {rule}"] = {"median": _median(rows), "seeds": rows}
        for thr in SWEEP:
            r = replay_disagg(
                reqs, "kvroute", fleet, local_prefill_tokens=thr, policy_params={"seed": 0}
            )
            out["sweep"][thr] = _row(r.summary)
            sys.stderr.write(f"{wl} sweep {thr}: {time.time() - t0:.0f}s\n")
        doc["workloads"][wl] = out
        try:
            plot_disagg(img, plots, prefix=f"{wl}_")
            _plot_sweep(img, wl, out["sweep"])
        except ImportError:
            sys.stderr.write("plots need matplotlib; skipped\n")
        md += [f"### {wl} ({len(reqs)} requests)", ""]
        md += [_table({k: v["median"] for k, v in out["runs"].items()}), ""]
        md += [f"kvroute, threshold sweep ({wl}):", ""]
        md += [_table({f"kvroute / {t}": r for t, r in out["sweep"].items()}), ""]
    doc["wall_s"] = time.time() - t0
    with open(os.path.join(a.out, "rows.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(a.out, "disagg.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + f"\n\n{doc['wall_s']:.0f} s wall; {doc['machine']}\n")
    print("\n".join(md))
    return 0


def _plot_sweep(directory: str, workload: str, sweep: dict[int, dict[str, float]]) -> None:
    from kvroute.sim.plots import _pyplot

    plt = _pyplot()
    thr = list(sweep)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(thr, [sweep[t]["ttft_mean"] for t in thr], "o-", label="TTFT mean (ms)")
    ax.plot(thr, [sweep[t]["ttft_p99"] / 10 for t in thr], "s-", label="TTFT p99 / 10 (ms)")
    ax.plot(thr, [sweep[t]["tpot"] * 10 for t in thr], "^-", label="TPOT x 10 (ms)")
    ax.set_xscale("symlog", linthresh=512)
    ax.set_xticks(thr, [str(t) for t in thr])
    ax.set_xlabel("local_prefill_tokens (kvroute, held clause on)")
    ax2 = ax.twinx()
    ax2.plot(thr, [sweep[t]["local"] for t in thr], "k--", label="local share")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share prefilled on the decode worker")
    ax.legend(fontsize=7, loc="center left")
    ax2.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(os.path.join(directory, f"pd_{workload}_threshold.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

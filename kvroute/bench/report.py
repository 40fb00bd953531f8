"""The ``bench`` command's report: the terminal tables and the JSON text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["dumps", "render_report"]


def _si(x: float) -> str:
    """Figures like 20.13 M, 980.2 k."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(cells[0]).ljust(widths[0])]
        parts += [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def render_report(report: dict[str, Any]) -> str:
    """The terminal form of a report made by the ``bench`` command.

    :param report: the dict also written by ``--json``.
    :returns: text with one table per section.
    """
    idx = report["index"]
    lines = [
        f"kvroute {report['kvroute_version']} index benchmark: {idx['implementation']} index"
        f" ({idx['module']}), Python {report['machine']['python']},"
        f" {report['machine']['cpus']} CPUs, single thread",
        "block ops/s = (query blocks + stored blocks) / s, as Dynamo's mooncake_bench counts;"
        " '+removed' counts removed blocks too",
        "",
    ]
    workloads = report.get("workloads", {})
    if workloads:
        rows = []
        for name, w in workloads.items():
            rows.append(
                [
                    name,
                    f"{w['requests']:,}",
                    str(w["workers"]),
                    f"{w['blocks']['query']:,}",
                    f"{w['blocks']['stored']:,}",
                    f"{w['blocks']['removed']:,}",
                    f"{w['build_seconds']:.1f}",
                ]
            )
        lines.append(
            _table(
                [
                    "workload",
                    "requests",
                    "workers",
                    "query blk",
                    "stored blk",
                    "removed blk",
                    "build s",
                ],
                rows,
            )
        )
        lines.append("")
        rows = []
        for name, w in workloads.items():
            rows.append(
                [
                    name,
                    f"{w['seconds']:.3f}",
                    _si(w["block_ops_per_s"]),
                    _si(w["block_ops_per_s_with_removals"]),
                    f"{w['residencies']:,}",
                    f"{w['peak_sizeof_bytes'] / 2**20:.1f}",
                    f"{w['bytes_per_residency']:.1f}",
                    f"{w['maxrss_bytes'] / 2**20:.0f}",
                    "ok" if w["state_ok"] else "WRONG",
                ]
            )
        lines.append(
            _table(
                [
                    "kvroute",
                    "seconds",
                    "block ops/s",
                    "+removed",
                    "residencies",
                    "sizeof MiB",
                    "B/res",
                    "maxrss MiB",
                    "state",
                ],
                rows,
            )
        )
        compared = {n: w["compare"] for n, w in workloads.items() if "compare" in w}
        if compared:
            lines.append("")
            rows = []
            for name, c in compared.items():
                rows.append(
                    [
                        name,
                        f"{c['seconds']:.3f}",
                        _si(c["block_ops_per_s"]),
                        _si(c["block_ops_per_s_with_removals"]),
                        f"{c['ratio']:.1f}x",
                        f"{c['mismatches']}/{c['queries_checked']:,}",
                    ]
                )
            lines.append(
                _table(
                    [
                        f"dynamo {report.get('dynamo_version', '')} RadixTree",
                        "seconds",
                        "block ops/s",
                        "+removed",
                        "kvroute/dynamo",
                        "mismatches",
                    ],
                    rows,
                )
            )
        lines.append(
            f"(median of {next(iter(workloads.values()))['repeat']} rounds;"
            " maxrss is the whole process so far)"
        )
    memory = report.get("memory", {})
    if memory:
        lines.append("")
        rows = []
        for name, m in memory.items():
            churn = m["churn"]
            rows.append(
                [
                    name,
                    f"{m['residencies']:,}",
                    f"{m['blocks']:,}",
                    f"{m['sizeof_bytes'] / 2**20:.1f}",
                    f"{m['bytes_per_residency']:.1f}",
                    f"{churn['rounds']} x {churn['residencies_per_round']:,}",
                    f"{churn['growth_first_round_bytes']:+,}",
                    f"{churn['growth_after_first_round_bytes']:+,}",
                    "ok" if churn["state_restored"] else "WRONG",
                ]
            )
        lines.append(
            _table(
                [
                    "memory",
                    "residencies",
                    "blocks",
                    "sizeof MiB",
                    "B/res",
                    "churn",
                    "growth 1st",
                    "growth later",
                    "state",
                ],
                rows,
            )
        )
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    """JSON text of a report (floats as Python writes them, keys in insertion order)."""
    return json.dumps(obj, indent=2)

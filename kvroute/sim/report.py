"""What ``kvroute replay`` reports: the table it prints and the JSON document it writes.

The JSON report (``--json``) records what reproduces the run, once, then
the results, then the facts of this particular run, in this order::

    format          "kvroute.sim.replay" (what the document is)
    format_version  REPORT_VERSION, bumped when a field changes meaning or goes
    kvroute_version the package's version
    command         the command with every option that changes the results
                    (defaults included; outputs and --quiet left out)
    seed            the run's seed; every random stream derives from it
    parameters      workload, fleet, engine, router, events, policies (each
                    policy's every parameter, defaults and seed included)
    trace           what was replayed: name, path, sha256 of the file (None
                    for a generated workload), requests, sha256 of the requests
    results         per policy: the figures of :func:`kvroute.sim.metrics.summarize`
                    plus rejected, preemptions, engine_steps; and the two bounds
    run             facts of this run only: start time, wall seconds, Python,
                    platform, compiled cores or twins

Two runs of one command write the same document but for ``run``
(:func:`without_run_facts` drops it). Floats are written with Python's
shortest round-trip repr; NaN (a figure with no sample) is written as null.
docs/simulator.md ("The JSON report") describes every field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, Final

from .workloads import SimRequest

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "RUN_FACTS",
    "TABLE_LEGEND",
    "dumps_report",
    "file_sha256",
    "format_table",
    "rejected_notes",
    "requests_sha256",
    "without_run_facts",
]

#: The ``format`` field: what the document is.
REPORT_FORMAT: Final = "kvroute.sim.replay"
#: The ``format_version`` field: bumped when a field changes meaning or is removed.
REPORT_VERSION: Final = 1

#: The key of the run-facts block, the only part that differs between two runs of one command.
RUN_FACTS: Final = "run"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, as hex (a compressed trace is hashed compressed).

    :param path: the file.
    :returns: 64 hex digits.
    :raises OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def requests_sha256(requests: Iterable[SimRequest]) -> str:
    """SHA-256 of the requests as replayed: ids, arrivals, lengths, sessions and block keys.

    Identifies a generated workload, and what a trace became after
    ``--limit``, ``--speedup`` and the block size: two runs with equal
    hashes replayed the same requests.

    >>> a = SimRequest(0, 0.5, 8, 1, (1, 2))
    >>> requests_sha256([a]) == requests_sha256([SimRequest(0, 0.5, 8, 1, [1, 2])])
    True
    >>> requests_sha256([a]) == requests_sha256([SimRequest(0, 0.5, 8, 2, (1, 2))])
    False

    :param requests: the workload.
    :returns: 64 hex digits.
    """
    h = hashlib.sha256()
    for r in requests:
        row = [r.request_id, r.arrival.hex(), r.prompt_len, r.output_len, r.session_id]
        h.update(json.dumps(row, separators=(",", ":")).encode())
        h.update(b":" + ",".join(map(str, r.hashes)).encode() + b"\n")
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    """NaN and infinities become None (JSON has no NaN); tuples become lists."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (str, int, bool)):
        return v
    if hasattr(v, "item"):  # a numpy scalar
        return _jsonable(v.item())
    return repr(v)


def dumps_report(doc: Mapping[str, Any]) -> str:
    """The report as JSON text: strict JSON (NaN as null), keys in the document's order.

    >>> dumps_report({"a": float("nan"), "b": (1, 2.5)})
    '{\\n "a": null,\\n "b": [\\n  1,\\n  2.5\\n ]\\n}\\n'

    :param doc: the document.
    :returns: the text, ending with a newline.
    """
    return json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n"


def without_run_facts(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The document without its run-facts block: equal for two runs of one command.

    >>> without_run_facts({"seed": 0, "run": {"wall_s": 1.0}})
    {'seed': 0}

    :param doc: a report (as written, or as read back).
    :returns: a shallow copy without ``run``.
    """
    return {k: v for k, v in doc.items() if k != RUN_FACTS}


#: What the table's columns mean, printed under it.
TABLE_LEGEND: Final = (
    "prefix reuse: cached prompt tokens / prompt tokens. TTFT: time to first token; TPOT: time\n"
    "per output token after the first; E2E: arrival to last token (simulated time, ms; TPOT and\n"
    "E2E are means). done req/s: completed requests per simulated second. load spread: requests\n"
    "on the busiest worker / the mean per worker (1.00: even). overlap regret: prompt blocks\n"
    "cached on the best-placed worker minus on the chosen one, at routing time, mean per request\n"
    "(0: always the largest cache hit on offer). Bounds: the prefix reuse of one cache that never\n"
    "evicts, and of one LRU cache of the fleet's total capacity, fed the same requests."
)


def _fmt(v: object, digits: int) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:,.{digits}f}"
    return str(v)


def format_table(
    results: Mapping[str, Mapping[str, Any]],
    bounds: Mapping[str, float],
    *,
    title: str = "",
    bound_labels: Mapping[str, str] | None = None,
) -> str:
    """The replay's table: a row per policy, then the bounds; units in the header.

    >>> s = {"prefix_reuse": 0.25, "ttft_ms": {"mean": 12.5, "p50": 10.0, "p95": 30.0,
    ...      "p99": 40.0}, "tpot_ms": {"mean": 5.0}, "e2e_ms": {"mean": 100.0},
    ...      "throughput": {"requests_per_s": 2.0},
    ...      "load_spread": {"requests": {"max_over_mean": 1.0}},
    ...      "overlap_regret_blocks": {"mean": 0.0}}
    >>> t = format_table({"kvroute": s}, {"unbounded": 0.5}).splitlines()
    >>> t[0].split()
    ['prefix', 'TTFT', '(ms)', 'TPOT', 'E2E', 'done', 'load', 'overlap']
    >>> t[1].split()
    ['policy', 'reuse', 'mean', 'p50', 'p95', 'p99', '(ms)', '(ms)', 'req/s', 'spread', 'regret']
    >>> t[3].split()
    ['kvroute', '0.250', '12.5', '10.0', '30.0', '40.0', '5.00', '100', '2.00', '1.00', '0.00']
    >>> t[4].split()
    ['bound:', 'unbounded', '0.500']

    :param results: policy -> its summary (as :func:`kvroute.sim.replay.replay` gives it).
    :param bounds: bound name -> prefix reuse.
    :param title: a first line (what was replayed), if any.
    :param bound_labels: bound name -> label (default: the name).
    :returns: the table, without a trailing newline.
    """
    labels = {k: f"bound: {(bound_labels or {}).get(k, k)}" for k in bounds}
    w = max([len(k) for k in [*results, *labels.values()]] + [12]) + 2
    head1 = (
        f"{'':<{w}}{'prefix':>6}  {'TTFT (ms)':<36}{'TPOT':>7}{'E2E':>8}{'done':>7}"
        f"{'load':>7}{'overlap':>9}"
    )
    head2 = (
        f"{'policy':<{w}}{'reuse':>6}{'mean':>9}{'p50':>9}{'p95':>9}{'p99':>9}{'(ms)':>7}"
        f"{'(ms)':>8}{'req/s':>7}{'spread':>7}{'regret':>9}"
    )
    lines = [title] if title else []
    lines += [head1, head2, "-" * len(head2)]
    for name, s in results.items():
        t = s["ttft_ms"]
        lines.append(
            f"{name:<{w}}{_fmt(s['prefix_reuse'], 3):>6}{_fmt(t['mean'], 1):>9}"
            f"{_fmt(t['p50'], 1):>9}{_fmt(t['p95'], 1):>9}{_fmt(t['p99'], 1):>9}"
            f"{_fmt(s['tpot_ms']['mean'], 2):>7}{_fmt(s['e2e_ms']['mean'], 0):>8}"
            f"{_fmt(s['throughput']['requests_per_s'], 2):>7}"
            f"{_fmt(s['load_spread']['requests']['max_over_mean'], 2):>7}"
            f"{_fmt(s['overlap_regret_blocks']['mean'], 2):>9}"
        )
    for k, v in bounds.items():
        lines.append(f"{labels[k]:<{w}}{_fmt(v, 3):>6}")
    return "\n".join(lines)


def rejected_notes(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per policy under which requests were rejected (they never fit a worker's cache).

    >>> rejected_notes({"a": {"rejected": 2, "requests": 10}, "b": {"rejected": 0, "requests": 10}})
    ["a: 2 of 10 requests rejected (larger than a worker's KV cache); figures cover the rest"]

    :param results: policy -> summary.
    :returns: the lines (empty if none was rejected).
    """
    return [
        f"{k}: {s['rejected']:,} of {s['requests']:,} requests rejected (larger than a worker's "
        "KV cache); figures cover the rest"
        for k, s in results.items()
        if s.get("rejected")
    ]

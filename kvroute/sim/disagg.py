"""Prefill/decode disaggregation on the simulated clock: a prefill pool, a decode pool, transfers.

:func:`replay_disagg` replays a workload through ``P`` prefill engines and
``D`` decode engines (each a :class:`~kvroute.sim.engine.Engine`), with
kvroute's real :class:`~kvroute.router.Router` choosing both workers of each
request (its roles, :mod:`kvroute.disagg`) from the KV events of both pools:

1. **Route** (at arrival): the decode worker, then where to prefill. Under
   the conditional rule (``local_prefill_tokens``) a request whose uncached
   part on its decode worker is small goes there whole, as in an
   aggregated fleet.
2. **Prefill** on the prefill worker: the prompt with ``max_tokens=1``, as
   vLLM's NIXL flow sends it; when its one token is out the router hears
   ``prefill_done``.
3. **Transfer**: the decode worker pulls the prompt's full blocks it does not
   hold (vLLM's decode side loads only the blocks missing from its own
   prefix cache), ``blocks x block_size x kv_bytes_per_token`` bytes over its
   inbound link at ``transfer_gbps`` plus ``transfer_latency_s``; transfers
   into one decode worker queue one after another on that link.
4. **Decode** on the decode worker: the transferred blocks are cached there
   without being computed (they emit ``stored`` events like any block), the
   partial last block is computed, the first token goes out (TTFT ends), then
   decoding as usual.

TTFT is the client's: arrival to the decode worker's first token. Reuse is
the prefill's: prompt tokens the prefilling engine found cached (the prefill
worker's, or the decode worker's when prefilled locally). Simplifications:
the prefill worker frees its blocks when it answers (vLLM holds them until
the decode side has pulled them); a request is admitted on the decode worker
once its KV has arrived (vLLM allocates first, then pulls); links are
per decode worker and nothing else contends for them.

The ``kvroute replay ... --prefill-workers P --decode-workers D`` command
line is :func:`run`; ``docs/disaggregation.md`` has the figures.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from ..disagg import DisaggConfig
from ..request import Request
from ..router import Router
from .engine import Engine, EngineConfig, PassResult
from .metrics import Records, percentiles, summarize
from .replay import SimClock
from .workloads import SimRequest

#: ``progress(label, total)``: a context manager giving a run's progress callback, or None.
Progress = Callable[[str, int], AbstractContextManager[Callable[[int, int], None] | None]]

__all__ = [
    "DEFAULT_KV_BYTES_PER_TOKEN",
    "DisaggFleet",
    "DisaggResult",
    "add_disagg_args",
    "main",
    "plot_disagg",
    "replay_disagg",
    "run",
    "table",
]

#: Llama-3.1-8B's KV bytes per token in bf16: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 B.
DEFAULT_KV_BYTES_PER_TOKEN = 131_072

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class DisaggFleet:
    """A disaggregated fleet: its two pools and the network between them.

    >>> f = DisaggFleet(2, 2, transfer_gbps=100.0)
    >>> round(f.transfer_s(blocks=10, block_size=512), 4)   # 640 MiB at 12.5 GB/s, plus 1 ms
    0.0547

    :param prefill_workers: engines that prefill (router ids ``0 .. P-1``).
    :param decode_workers: engines that decode (router ids ``P .. P+D-1``).
    :param prefill_config: each prefill engine's settings.
    :param decode_config: each decode engine's settings (same block size).
    :param transfer_gbps: each decode worker's inbound link, gigabits per second.
    :param kv_bytes_per_token: KV cache bytes per token moved (the model's).
    :param transfer_latency_s: fixed cost of one transfer (handshake, notification).
    :raises ValueError: a pool of no worker, a block size mismatch, or a
        non-positive rate.
    """

    prefill_workers: int
    decode_workers: int
    prefill_config: EngineConfig = field(default_factory=EngineConfig)
    decode_config: EngineConfig = field(default_factory=EngineConfig)
    transfer_gbps: float = 100.0
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    transfer_latency_s: float = 0.001

    def __post_init__(self) -> None:
        if self.prefill_workers < 1 or self.decode_workers < 1:
            raise ValueError("a disaggregated fleet needs >= 1 prefill and >= 1 decode worker")
        if self.prefill_config.block_size != self.decode_config.block_size:
            raise ValueError("both pools must use one block size")
        if not (self.transfer_gbps > 0 and math.isfinite(self.transfer_gbps)):
            raise ValueError(f"transfer_gbps must be > 0, got {self.transfer_gbps!r}")
        if self.kv_bytes_per_token < 0 or not self.transfer_latency_s >= 0:
            raise ValueError("kv_bytes_per_token and transfer_latency_s must be >= 0")

    @property
    def block_size(self) -> int:
        """Tokens per KV block (both pools')."""
        return self.prefill_config.block_size

    def transfer_s(self, blocks: int, block_size: int) -> float:
        """Seconds to move ``blocks`` full blocks over one link (latency included)."""
        nbytes = blocks * block_size * self.kv_bytes_per_token
        return self.transfer_latency_s + nbytes * 8.0 / (self.transfer_gbps * 1e9)


@dataclass(slots=True)
class DisaggResult:
    """The outcome of :func:`replay_disagg`.

    :param records: per-request outcomes (``worker`` is the prefilling worker).
    :param decode_worker: per request, its decode worker (-1: not routed).
    :param local: per request, prefilled on its decode worker.
    :param transfer_s: per request, seconds its KV spent moving, queueing on the
        link included (NaN: no transfer).
    :param transfer_blocks: per request, blocks moved.
    :param prefill_end: per request, when its prefill worker answered (NaN: prefilled locally).
    :param summary: :func:`kvroute.sim.metrics.summarize` plus ``local_share``,
        ``transfer_ms`` (mean, p99 over transferred requests), ``transfer_gb``,
        and the load spread of each pool.
    :param wall_s: wall-clock seconds the replay took.
    """

    records: Records
    decode_worker: npt.NDArray[np.int64]
    local: npt.NDArray[np.bool_]
    transfer_s: F64
    transfer_blocks: npt.NDArray[np.int64]
    prefill_end: F64
    summary: dict[str, Any]
    wall_s: float


_DELIVER, _XFER, _PASS = 0, 1, 2
_PREFILL, _FULL = 0, 1


def _spread(counts: F64) -> float:
    m = float(counts.mean()) if counts.size else 0.0
    return float(counts.max() / m) if m else float("nan")


def replay_disagg(
    requests: Sequence[SimRequest],
    policy: str,
    fleet: DisaggFleet,
    *,
    local_prefill_tokens: int = 0,
    policy_params: dict[str, Any] | None = None,
    disagg: DisaggConfig | None = None,
    event_lag: float = 0.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> DisaggResult:
    """Replay ``requests`` (sorted by arrival) on a disaggregated fleet routed by ``policy``.

    >>> from kvroute.sim.workloads import SimRequest
    >>> reqs = [SimRequest(i, 0.1 * i, 2048, 8, tuple(range(100 * i, 100 * i + 4)))
    ...         for i in range(4)]
    >>> cfg = EngineConfig(num_gpu_blocks=64, block_size=512)
    >>> r = replay_disagg(reqs, "round_robin", DisaggFleet(2, 2, cfg, cfg))
    >>> r.summary["completed"], r.summary["local_share"], sorted(set(r.records.worker.tolist()))
    (4, 0.0, [0, 1])

    :param policy: the Router policy choosing prefill workers (by name).
    :param fleet: the pools and the network.
    :param local_prefill_tokens: the conditional rule's threshold (0: always remote).
    :param policy_params: keyword parameters of the policy (e.g. its ``seed``).
    :param disagg: the decode choice's settings (default: ``DisaggConfig`` with
        ``local_prefill_tokens``; given, it wins).
    :param event_lag: seconds between a KV event and the router seeing it.
    :param seed: seeds the decode choice's tie-break (when ``disagg`` is not given).
    :param progress: called as ``progress(arrived, total)`` about 200 times.
    :returns: records, the per-request disaggregation figures, the summary.
    :raises ValueError: unsorted requests, or a bad parameter.
    """
    if not (event_lag >= 0 and math.isfinite(event_lag)):
        raise ValueError(f"event_lag must be a finite number >= 0, got {event_lag!r}")
    bs = fleet.block_size
    np_, nd = fleet.prefill_workers, fleet.decode_workers
    nw = np_ + nd
    clock = SimClock()
    cfg = disagg or DisaggConfig(local_prefill_tokens=local_prefill_tokens, seed=seed)
    router = Router(
        block_size=bs, policy=policy, policy_params=policy_params, clock=clock, disagg=cfg
    )
    for w in range(nw):
        conf = fleet.prefill_config if w < np_ else fleet.decode_config
        router.add_worker(
            w, kv_capacity_blocks=conf.num_gpu_blocks, role="prefill" if w < np_ else "decode"
        )
    engines = [Engine(fleet.prefill_config if w < np_ else fleet.decode_config) for w in range(nw)]
    t0 = time.perf_counter()
    n = len(requests)
    rec = Records.empty(n)
    decode_worker = np.full(n, -1, np.int64)
    local = np.zeros(n, np.bool_)
    xfer_s = np.full(n, np.nan)
    xfer_blocks = np.zeros(n, np.int64)
    prefill_end = np.full(n, np.nan)
    owner: list[list[tuple[int, int]]] = [[] for _ in range(nw)]
    version = [0] * nw
    busy = [False] * nw
    link_free = [0.0] * nw
    heap: list[tuple[float, int, int, Any, Any]] = []
    seq = 0
    step = max(1, n // 200)
    prev = -math.inf

    def kick(w: int, t: float) -> None:
        nonlocal seq
        eng = engines[w]
        if not busy[w]:
            end = eng.begin(t)
            if end is not None:
                busy[w] = True
                seq += 1
                heapq.heappush(heap, (end, _PASS, seq, w, version[w]))
            return
        cut = eng.interrupt(t)
        if cut is not None:
            version[w] += 1
            seq += 1
            heapq.heappush(heap, (cut, _PASS, seq, w, version[w]))

    def deliver(w: int, res: PassResult, t: float) -> None:
        nonlocal seq
        batches: list[tuple[Any, ...]] = []
        if res.removed:
            keys = np.fromiter(res.removed, np.uint64, len(res.removed))
            batches.append((router.apply_removed, w, keys))
        for chain, parent in res.stored:
            batches.append(
                (router.apply_stored, w, np.fromiter(chain, np.uint64, len(chain)), parent)
            )
        for b in batches:
            if event_lag:
                seq += 1
                heapq.heappush(heap, (t + event_lag, _DELIVER, seq, b, None))
            else:
                b[0](*b[1:])

    def full_blocks(req: SimRequest) -> int:
        return min(len(req.hashes), (req.prompt_len - 1) // bs)

    def start_transfer(g: int, t: float) -> None:
        nonlocal seq
        req = requests[g]
        d = int(decode_worker[g])
        nfull = full_blocks(req)
        move = nfull - engines[d].cached_prefix(req.hashes[:nfull])
        begin = max(t, link_free[d])
        end = begin + fleet.transfer_s(move, bs)
        link_free[d] = end
        xfer_s[g] = end - t
        xfer_blocks[g] = move
        seq += 1
        heapq.heappush(heap, (end, _XFER, seq, g, None))

    def on_pass_end(w: int, t: float) -> None:
        nonlocal seq
        eng = engines[w]
        res = eng.finish()
        own = owner[w]
        for li in res.first_token:
            g, phase = own[li]
            if phase == _PREFILL:
                rec.cached_tokens[g] = max(eng.requests[li].cached, 0)
                continue
            rec.first_token[g] = t
            if local[g]:
                rec.cached_tokens[g] = max(eng.requests[li].cached, 0)
            router.first_token(requests[g].request_id)
        for li in res.finished:
            g, phase = own[li]
            if phase == _PREFILL:
                prefill_end[g] = t
                router.prefill_done(requests[g].request_id)
                start_transfer(g, t)
                continue
            rec.finish[g] = t
            rec.output_tokens[g] = eng.requests[li].generated
            router.finished(requests[g].request_id)
        for li in res.rejected:
            router.failed(requests[own[li][0]].request_id)
        if res.stored or res.removed:
            deliver(w, res, t)
        end = eng.begin(t)
        if end is None:
            busy[w] = False
        else:
            seq += 1
            heapq.heappush(heap, (end, _PASS, seq, w, version[w]))

    def enqueue(w: int, g: int, req: SimRequest, phase: int, t: float, preloaded: int = 0) -> None:
        owner[w].append((g, phase))
        engines[w].enqueue(req, preloaded)
        kick(w, t)

    i = 0
    while i < n or heap:
        ta = requests[i].arrival if i < n else math.inf
        if heap and heap[0][0] <= ta:
            t, kind, _s, a, b = heapq.heappop(heap)
            clock.now = t
            if kind == _DELIVER:
                a[0](*a[1:])
            elif kind == _XFER:
                g = a
                req = requests[g]
                d = int(decode_worker[g])
                enqueue(d, g, req, _FULL, t, full_blocks(req) * bs)
            elif b == version[a]:
                on_pass_end(a, t)
            continue
        req = requests[i]
        if ta < prev:
            raise ValueError("requests must be sorted by arrival")
        prev = ta
        clock.now = ta
        nb = req.prompt_blocks(bs)
        keys = np.fromiter(req.hashes[:nb], np.uint64, nb)
        dec = router.route(
            Request(
                req.request_id, block_hashes=keys, prompt_tokens=req.prompt_len,
                session_id=req.session_id,
            )
        )  # fmt: skip
        rec.arrival[i] = ta
        rec.prompt_tokens[i] = req.prompt_len
        rec.worker[i] = dec.worker
        assert dec.decode_worker is not None
        decode_worker[i] = dec.decode_worker
        prompt_keys = req.hashes[: full_blocks(req)]
        ov = [engines[w].cached_prefix(prompt_keys) for w in range(np_)]
        rec.best_overlap[i] = max(ov)
        if dec.remote_prefill:
            rec.chosen_overlap[i] = ov[dec.worker]
            prefill_only = SimRequest(
                req.request_id, req.arrival, req.prompt_len, 1, req.hashes, req.session_id
            )
            enqueue(dec.worker, i, prefill_only, _PREFILL, ta)
        else:
            local[i] = True
            rec.chosen_overlap[i] = rec.best_overlap[i]  # no prefill worker was chosen
            enqueue(dec.decode_worker, i, req, _FULL, ta)
        i += 1
        if progress is not None and (i % step == 0 or i == n):
            progress(i, n)
    wall = time.perf_counter() - t0
    summary: dict[str, Any] = summarize(rec, nw)
    routed = decode_worker >= 0
    moved = ~np.isnan(xfer_s)
    xfer = percentiles(xfer_s[moved] * 1000.0, (50, 99))
    summary["local_share"] = float(local[routed].mean()) if routed.any() else float("nan")
    summary["transfer_ms"] = {
        "mean": float(xfer_s[moved].mean() * 1000.0) if moved.any() else float("nan"),
        "p50": xfer[0],
        "p99": xfer[1],
    }
    summary["transfer_gb"] = float(xfer_blocks.sum() * bs * fleet.kv_bytes_per_token / 1e9)
    prefilled = np.bincount(rec.worker[routed & ~local], minlength=nw)[:np_]
    decoded = np.bincount(decode_worker[routed], minlength=nw)[np_:]
    summary["load_spread"]["prefill_requests"] = _spread(np.asarray(prefilled, np.float64))
    summary["load_spread"]["decode_requests"] = _spread(np.asarray(decoded, np.float64))
    summary["preemptions"] = sum(e.preemptions for e in engines)
    router_stats = router.stats()
    summary["router"] = {k: router_stats[k] for k in ("remote_prefills", "local_prefills")}
    return DisaggResult(rec, decode_worker, local, xfer_s, xfer_blocks, prefill_end, summary, wall)


# -- the command line -----------------------------------------------------------


def add_disagg_args(p: argparse.ArgumentParser) -> None:
    """Add the disaggregated fleet's options to the ``replay`` command's parser."""
    g = p.add_argument_group("prefill/decode disaggregation")
    g.add_argument(
        "--prefill-workers", type=int, default=None, metavar="P",
        help="replay on a disaggregated fleet: P prefill workers (with --decode-workers)",
    )  # fmt: skip
    g.add_argument("--decode-workers", type=int, default=None, metavar="D", help="decode workers")
    g.add_argument(
        "--transfer-gbps", type=float, default=100.0, metavar="X",
        help="each decode worker's inbound KV link, Gbit/s (default 100)",
    )  # fmt: skip
    g.add_argument(
        "--kv-bytes-per-token", type=int, default=DEFAULT_KV_BYTES_PER_TOKEN, metavar="B",
        help="KV cache bytes per token (default 131072: Llama-3.1-8B, bf16)",
    )  # fmt: skip
    g.add_argument(
        "--local-prefill-tokens", default="0", metavar="T[,T...]",
        help="the conditional rule: prefill on the decode worker when fewer than T prompt"
        " tokens are uncached there (0: always remote; a list runs each)",
    )  # fmt: skip
    g.add_argument(
        "--prefill-gpu-blocks", type=int, default=None, metavar="N",
        help="KV blocks per prefill worker (default: --gpu-blocks)",
    )  # fmt: skip
    g.add_argument(
        "--decode-gpu-blocks", type=int, default=None, metavar="N",
        help="KV blocks per decode worker (default: --gpu-blocks)",
    )  # fmt: skip


def run(
    a: argparse.Namespace,
    requests: Sequence[SimRequest],
    config: EngineConfig,
    progress: Progress | None = None,
    policy_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, DisaggResult]]:
    """Replay ``requests`` on the disaggregated fleet ``a`` describes, every policy and threshold.

    :param a: the ``replay`` command's arguments (:func:`add_disagg_args`' included).
    :param requests: the workload.
    :param config: the engine settings; each pool's block count from its option.
    :param progress: ``progress(label, total)`` is a context manager giving a run's
        progress callback (or None).
    :param policy_params: policy name -> its constructor parameters (its seed).
    :returns: a JSON-ready document (the fleet and, per run label ``policy`` or
        ``policy@T``, its summary) and the runs themselves.
    :raises ValueError: a bad option.
    """
    if a.prefill_workers is None or a.decode_workers is None:
        raise ValueError("--prefill-workers and --decode-workers go together")
    pcfg = replace(config, num_gpu_blocks=a.prefill_gpu_blocks or config.num_gpu_blocks)
    dcfg = replace(config, num_gpu_blocks=a.decode_gpu_blocks or config.num_gpu_blocks)
    fleet = DisaggFleet(
        a.prefill_workers,
        a.decode_workers,
        pcfg,
        dcfg,
        transfer_gbps=a.transfer_gbps,
        kv_bytes_per_token=a.kv_bytes_per_token,
    )
    try:
        thresholds = [int(x) for x in str(a.local_prefill_tokens).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--local-prefill-tokens: {a.local_prefill_tokens!r}") from None
    runs: dict[str, DisaggResult] = {}
    for name in [x.strip() for x in a.policy.split(",") if x.strip()]:
        for thr in thresholds or [0]:
            label = name if len(thresholds) <= 1 else f"{name}@{thr}"
            params = (policy_params or {}).get(name)
            with progress(label, len(requests)) if progress else nullcontext() as bar:
                res = replay_disagg(
                    requests,
                    name,
                    fleet,
                    local_prefill_tokens=thr,
                    policy_params=dict(params) if params else None,
                    event_lag=a.event_lag,
                    seed=a.seed,
                    progress=bar,
                )
            res.summary["wall_s"] = res.wall_s
            res.summary["local_prefill_tokens"] = thr
            runs[label] = res
    doc = {
        "fleet": {
            "prefill_workers": a.prefill_workers,
            "decode_workers": a.decode_workers,
            "prefill_gpu_blocks": pcfg.num_gpu_blocks,
            "decode_gpu_blocks": dcfg.num_gpu_blocks,
            "block_size": config.block_size,
            "transfer_gbps": a.transfer_gbps,
            "kv_bytes_per_token": a.kv_bytes_per_token,
        },
        "policies": {k: r.summary for k, r in runs.items()},
    }
    return doc, runs


def plot_disagg(
    directory: str | os.PathLike[str], runs: dict[str, DisaggResult], *, prefix: str = ""
) -> list[str]:
    """Two figures of disaggregated runs: the TTFT CDF, and where each run's TTFT goes.

    The second stacks, per run, the mean of: the wait and prefill on the
    prefill worker, the transfer, and the rest until the decode worker's first
    token (for requests prefilled remotely), beside the mean TTFT of those
    prefilled locally.

    :param directory: where to write (created if missing).
    :param runs: run label -> its result.
    :param prefix: file name prefix.
    :returns: the paths written: ``<prefix>pd_ttft_cdf.png`` and ``<prefix>pd_ttft_parts.png``.
    :raises ImportError: matplotlib is missing.
    """
    from .plots import _pyplot

    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    cdf = os.path.join(os.fspath(directory), prefix + "pd_ttft_cdf.png")
    parts = os.path.join(os.fspath(directory), prefix + "pd_ttft_parts.png")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for k, r in runs.items():
        x = np.sort((r.records.first_token - r.records.arrival) * 1000.0)
        x = x[~np.isnan(x)]
        ax.plot(x, np.arange(1, len(x) + 1) / max(len(x), 1), label=k)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("CDF")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(cdf, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    names = list(runs)
    pos = np.arange(len(names))
    bottoms = np.zeros(len(names))
    pieces: dict[str, list[float]] = {"prefill worker": [], "transfer": [], "decode worker": []}
    local_ttft: list[float] = []
    for k in names:
        r = runs[k]
        rec = r.records
        ttft = (rec.first_token - rec.arrival) * 1000.0
        remote = ~r.local & ~np.isnan(ttft)
        pre = (r.prefill_end - rec.arrival) * 1000.0
        xf = r.transfer_s * 1000.0
        for key, v in (
            ("prefill worker", pre[remote]),
            ("transfer", xf[remote]),
            ("decode worker", (ttft - pre - xf)[remote]),
        ):
            pieces[key].append(float(v.mean()) if v.size else 0.0)
        loc = r.local & ~np.isnan(ttft)
        local_ttft.append(float(ttft[loc].mean()) if loc.any() else float("nan"))
    w = 0.4
    for key, vals in pieces.items():
        ax.bar(pos - w / 2, vals, w, bottom=bottoms, label=f"remote: {key}")
        bottoms += np.asarray(vals)
    ax.bar(pos + w / 2, local_ttft, w, label="prefilled locally", color="0.6")
    ax.set_xticks(pos, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("mean TTFT (ms)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(parts, dpi=120)
    plt.close(fig)
    return [cdf, parts]


def main(
    a: argparse.Namespace,
    requests: Sequence[SimRequest],
    config: EngineConfig,
    progress: Progress | None = None,
    policy_params: Mapping[str, Mapping[str, Any]] | None = None,
) -> int:
    """``kvroute replay ... --prefill-workers P --decode-workers D``: print, ``--json``, ``--plot``.

    :returns: the exit status (0).
    :raises ValueError: a bad option.
    """
    doc, runs = run(a, requests, config, progress, policy_params)
    print(table(doc["policies"]))
    if a.json_path:
        doc = {"trace": a.trace, "speedup": a.speedup, "event_lag_s": a.event_lag, **doc}
        with open(a.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    if a.plot:
        try:
            plot_disagg(a.plot, runs)
        except ImportError:
            sys.stderr.write("--plot needs matplotlib (pip install matplotlib); skipped\n")
    return 0


def table(runs: dict[str, dict[str, Any]]) -> str:
    """The disaggregated runs as a text table (ms; reuse and local share as fractions).

    :param runs: run label -> summary, as :func:`run` returns them.
    """
    head = (
        f"{'policy':<20}{'reuse':>7}{'local':>7}{'TTFT mean':>10}{'p50':>8}{'p99':>8}"
        f"{'TPOT':>7}{'E2E':>8}{'req/s':>7}{'xfer ms':>8}{'GB':>8}{'P/D spread':>11}"
    )
    lines = [head, "-" * len(head)]
    for name, s in runs.items():
        t = s["ttft_ms"]
        ls = s["load_spread"]
        lines.append(
            f"{name:<20}{s['prefix_reuse']:>7.3f}{s['local_share']:>7.2f}{t['mean']:>10.1f}"
            f"{t['p50']:>8.1f}{t['p99']:>8.1f}{s['tpot_ms']['mean']:>7.2f}"
            f"{s['e2e_ms']['mean']:>8.0f}{s['throughput']['requests_per_s']:>7.2f}"
            f"{s['transfer_ms']['mean']:>8.1f}{s['transfer_gb']:>8.1f}"
            f"{ls['prefill_requests']:>6.2f}/{ls['decode_requests']:<4.2f}"
        )
    return "\n".join(lines)

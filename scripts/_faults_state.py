"""State-side fault injection: the router's picture of the workers' caches, made to go wrong.

Each fault is a function that starts a fleet of :class:`~kvroute.testing.MockWorker`
engines (real HTTP and ZMQ servers on loopback, vLLM 0.33 KV events) under a
:class:`~kvroute.Router` fed by a :class:`~kvroute.events.ZmqSubscriber`
(:class:`~kvroute.testing.StateFleet`: routes each prompt, sends it to the
chosen worker, reports its cached tokens to ``Router.observe`` as the proxy
does), breaks the events the way real engines do (a restart, a cache reset,
lost batches with and without replay, junk and oversized frames, another
block size or hash seed, removals or stores lost silently), and returns a
:class:`Result`: what was tried, the counts, what held, and the recovery
time. Printed as the Markdown table docs/reliability.md ("State") quotes. Not a
command: scripts/faults.py imports it, and each fault registers itself
there with ``@fault(name, side="state")``::

    python scripts/faults.py --side state           # every state fault
    python scripts/faults.py gap-no-replay          # some of them
    python scripts/faults.py --side state --quick   # fewer requests

The fast, deterministic versions are tests/test_state_faults.py.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _faults_base import Options, Result, fault  # noqa: E402

from kvroute import Request, Router  # noqa: E402
from kvroute.events.engine_hashes import vllm_block_hashes  # noqa: E402
from kvroute.testing import (  # noqa: E402
    LoseEvents,
    Sent,
    StateFleet,
    agreement,
    drop_removals,
)
from kvroute.testing._state_faults import raw_publish  # noqa: E402

BS = 16
TOL = 2 * BS  # the drift detector's default tolerance, in tokens
GAP_AT = 45  # gap-no-replay: the request whose batch shows the gap (batches 40..44 are lost)


# -- workload --------------------------------------------------------------------------------


class Clock:
    """The router's clock, moved by the workload (:func:`run`: 10 s per batch).

    Real agents pause between turns (tools run, the model thinks); fresh
    decisions (5 s) then cover the siblings of a burst, not the next turn, as
    in production: a session's next turn is predicted from the KV events.
    """

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Agents:
    """Agent sessions over a shared harness prompt: each turn extends the session's prompt.

    :param n: sessions, interleaved round-robin.
    :param system: harness tokens every session starts with.
    :param first: tokens of a session's first user turn.
    :param turn: tokens each later turn appends (tool output, the reply...).
    :param turns: turns per session before it starts over (a new session).
    """

    def __init__(
        self, n: int, seed: int = 0, system: int = 320, first: int = 96, turn: int = 64,
        turns: int = 8,
    ) -> None:  # fmt: skip
        self.rng = random.Random(seed)
        self.system = self._tokens(system)
        self.first, self.turn, self.turns = first, turn, turns
        self.sessions = [self._new() for _ in range(n)]
        self.i = 0

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(1000, 30000) for _ in range(n)]

    def _new(self) -> list[Any]:
        return [self.system + self._tokens(self.first), 0]

    def next(self) -> list[int]:
        """The next request's prompt."""
        s = self.sessions[self.i % len(self.sessions)]
        self.i += 1
        if s[1] >= self.turns:
            s[:] = self._new()
        prompt = list(s[0])
        s[0] = s[0] + self._tokens(self.turn)
        s[1] += 1
        return prompt


#: Requests in flight together: each batch is routed at once, then served.
CONCURRENCY = 16


def run(f: StateFleet, clock: Clock, agents: Agents, n: int) -> list[Sent]:
    """``n`` requests, ``CONCURRENCY`` at a time, 10 s of clock per batch.

    A batch holds each session once at most: an agent's next turn waits for
    the answer to its last.
    """
    out: list[Sent] = []
    while len(out) < n:
        clock.t += 10.0
        k = min(CONCURRENCY, len(agents.sessions), n - len(out))
        out += f.send_many([agents.next() for _ in range(k)])
    return out


def tell_capacities(f: StateFleet) -> None:
    """Give the router every worker's KV capacity (it bounds a degraded worker's fallback)."""
    for i, w in enumerate(f.workers):
        f.r.update_worker_metrics(i, kv_capacity_blocks=w.num_blocks)


def degraded_at(f: StateFleet, worker: int, sent: Sequence[Sent]) -> int | None:
    """Requests served by ``worker`` so far, if it is degraded now."""
    if f.r.worker_states()[worker].state != "degraded":
        return None
    return sum(1 for s in sent if s.worker == worker)


def hit_rate(sent: Sequence[Sent]) -> float:
    return sum(s.reported for s in sent) / max(1, sum(s.prompt for s in sent))


def _ms(s: float | None) -> str:
    return "never" if s is None else f"{s * 1000:.0f} ms"


def _stats(xs: Sequence[float]) -> str:
    if not xs:
        return "-"
    return f"median {_ms(statistics.median(xs))}, max {_ms(max(xs))}"


def no_heal(f: StateFleet) -> None:
    """The baseline: the router's healing turned off, as kvroute was before issue 16.

    A gap no replay fills clears the worker's blocks and nothing else; nothing
    is degraded, anchored or observed.
    """
    r = f.r

    def degrade(worker: int, cause: str, reason: str) -> int:
        return int(r.index.clear(worker)) if cause == "events_lost" else 0

    r.degrade_worker = degrade  # type: ignore[method-assign]
    r.observe = lambda *a, **k: None  # type: ignore[method-assign]
    assert f.sub is not None
    f.sub.applier._orphan = lambda *a: "unknown_block"  # type: ignore[method-assign]


# -- the faults ---------------------------------------------------------------------------------


@fault("restart", side="state")
def restart(opts: Options) -> Result:
    """Restart a warm worker's engine (seq from 0, empty cache), then a burst on its prefix."""
    reps = 3 if opts.quick else 10
    burst_n = 6
    out: dict[str, dict[str, Any]] = {}
    for name in ("healed", "baseline"):
        noticed: list[float] = []
        stale = stale_lead = on_w = 0
        for rep in range(reps):
            clock = Clock()
            agents = Agents(8, seed=rep)
            rk = {"clock": clock, "policy_params": {"seed": rep}}
            with StateFleet(3, worker_kw={"num_blocks": 2048}, router_kw=rk) as f:
                r = f.r
                if name == "baseline":  # before issue 16: a restart cleared the index alone
                    r.apply_cleared = lambda w, r=r: int(r.index.clear(w))  # type: ignore[method-assign]
                run(f, clock, agents, 24)
                w = max(range(3), key=lambda i: r.index.worker_len(i))
                noticed.append(f.restart(w))
                # at once, a burst of new prompts on the harness prefix, all in flight
                burst = f.send_many([agents.system + agents._tokens(64) for _ in range(burst_n)])
                # the leader may find the harness on another worker, never on the restarted one
                stale_lead += burst[0].worker == w and burst[0].predicted > 0
                on_w += sum(1 for s in burst if s.worker == w)
                sent = burst + run(f, clock, agents, 24)
                stale += sum(1 for s in sent if s.predicted - s.reported > TOL)
        out[name] = {"noticed_s": noticed, "stale": stale, "stale_lead": stale_lead,
                     "burst_on_restarted": on_w}  # fmt: skip
    h, b = out["healed"], out["baseline"]
    ok = h["stale"] == h["stale_lead"] == 0
    return Result(
        "restart",
        "state",
        f"{reps} x: 3 workers, 8 agent sessions (24 requests), the busiest worker's engine"
        f" restarted (same ports, seq from 0), then at once a burst of {burst_n} new prompts on"
        " the harness prefix, then 24 more requests",
        f"requests predicted more than the engine served: {h['stale']} (clearing the index"
        f" alone, as before: {b['stale']}); burst leaders predicted a hit on the restarted"
        f" worker: {h['stale_lead']} (before: {b['stale_lead']}); burst requests sent to it:"
        f" {h['burst_on_restarted']} of {reps * burst_n} (before: {b['burst_on_restarted']})",
        "every belief about the old cache dropped at once (index, fresh decisions, pins,"
        " warm-up plans)" if ok else "NOT HELD: stale predictions",
        f"restart known to the router after {_stats(h['noticed_s'])} (ZMQ reconnect + resync)",
        ok,
        out,
    )


@fault("reset", side="state")
def reset(opts: Options) -> Result:
    """``reset_prefix_cache`` (AllBlocksCleared) on a warm worker."""
    reps = 3 if opts.quick else 10
    applied, stale = [], 0
    for rep in range(reps):
        clock = Clock()
        agents = Agents(8, seed=100 + rep)
        rk = {"clock": clock, "policy_params": {"seed": rep}}
        with StateFleet(3, worker_kw={"num_blocks": 2048}, router_kw=rk) as f:
            run(f, clock, agents, 24)
            w = max(range(3), key=lambda i: f.r.index.worker_len(i))
            applied.append(f.reset(w))
            sent = run(f, clock, agents, 24)
            stale += sum(1 for s in sent if s.predicted - s.reported > TOL)
    ok = stale == 0
    return Result(
        "reset",
        "state",
        f"{reps} x: the busiest of 3 workers clears its cache (AllBlocksCleared), 24 requests"
        " follow",
        f"requests predicted more than the engine served: {stale}",
        "the reset reached every record at once" if ok else "NOT HELD: stale predictions",
        f"applied {_stats(applied)} after the engine's reset",
        ok,
        {"applied_s": applied, "stale": stale},
    )


def _truth_run(
    f: StateFleet, clock: Clock, agents: Agents, n: int, capacity: int, every: int
) -> tuple[list[Sent], list[dict[str, Any]]]:
    """``n`` requests; every ``every``, the index against the engine, in cache turnovers."""
    sent: list[Sent] = []
    points = []
    w0 = f.workers[0]
    base = w0.stats().blocks_stored
    for i in range(n):
        clock.t += 10.0
        sent.append(f.send(agents.next()))
        if i > GAP_AT and "trusted_at" not in f.__dict__ and f.r.worker_states()[0].state == "ok":
            f.__dict__["trusted_at"] = (i - GAP_AT, (w0.stats().blocks_stored - base) / capacity)
        if i == GAP_AT:
            base = w0.stats().blocks_stored  # turnovers count from the gap
        if i >= GAP_AT and (i + 1) % every == 0:
            t = f.truth(0)
            turnover = (w0.stats().blocks_stored - base) / capacity
            points.append({
                "requests": i + 1, "turnover": round(turnover, 2),
                "precision": round(t.precision, 3), "recall": round(t.recall, 3),
            })  # fmt: skip
    return sent, points


@fault("gap-replay", side="state")
def gap_replay(opts: Options) -> Result:
    """Five batches lost in flight, the replay endpoint up: replayed, the index exact."""
    clock = Clock()
    agents = Agents(6, seed=7)
    lost = set(range(20, 25))
    kw = {"num_blocks": 256, "drop_seqs": lost}
    with StateFleet(1, worker_kw=kw, router_kw={"clock": clock}) as f:
        sent = run(f, clock, agents, 20)
        t0 = time.monotonic()
        sent += run(f, clock, agents, 6)  # the 6th batch reveals the gap, the replay fills it
        caught = time.monotonic() - t0
        sent += run(f, clock, agents, 40 if opts.quick else 100)
        truth = f.truth(0)
        counts = f.sub.streams()[0].counts
        state = f.r.worker_states()[0]
    ok = truth.precision == truth.recall == 1.0 and state.state == "ok"
    return Result(
        "gap-replay",
        "state",
        "1 worker (256-block cache), 5 batches lost in flight, replay endpoint up",
        f"gap {counts['gap']}, replayed {counts['replayed']} batches, replay_failed"
        f" {counts['replay_failed']}; index vs engine: precision {truth.precision:.3f},"
        f" recall {truth.recall:.3f}",
        "replayed to exact equality; never degraded" if ok else "NOT HELD",
        f"the 6 requests around the gap took {caught * 1000:.0f} ms, replay included",
        ok,
        {"truth": asdict(truth), "counts": dict(counts)},
    )


@fault("gap-no-replay", side="state")
def gap_no_replay(opts: Options) -> Result:
    """Five batches lost and no replay endpoint: degraded, anchored, converged back."""
    n = 300 if opts.quick else 700
    capacity = 256
    every = 5
    rows = {}
    for name in ("healed", "baseline"):
        clock = Clock()
        agents = Agents(6, seed=8)
        kw = {"num_blocks": capacity, "replay": False,
              "drop_seqs": set(range(GAP_AT - 5, GAP_AT))}  # fmt: skip
        with StateFleet(1, worker_kw=kw, router_kw={"clock": clock}, replay=False) as f:
            if name == "baseline":
                no_heal(f)
            sent, points = _truth_run(f, clock, agents, n, capacity, every)
            trusted_at = f.__dict__.get("trusted_at")
            st = f.r.worker_states()[0]
            counts = f.sub.streams()[0].counts
        after = sent[GAP_AT + 1:]
        # requests until the predictions agree again (10 in a row within the tolerance)
        agree_at = next((i for i in range(len(after) - 10)
                         if all(abs(s.predicted - s.reported) <= TOL for s in after[i:i + 10])),
                        None)  # fmt: skip
        rows[name] = {"points": points, "agreement": agreement(after, TOL), "state": st.state,
                      "degradations": st.degradations, "agree_at": agree_at,
                      "anchored": counts["anchored"], "skipped": counts["unknown_block"],
                      "hit_rate": hit_rate(after), "trusted_at": trusted_at}  # fmt: skip
    h, b = rows["healed"], rows["baseline"]
    conv = next((p for p in h["points"] if p["recall"] >= 0.9 and p["precision"] >= 0.99),
                None)  # fmt: skip
    last = h["points"][-1]
    ok = conv is not None and last["precision"] >= 0.99 and h["state"] == "ok"
    trusted = "never"
    if h["trusted_at"]:
        trusted = f"{h['trusted_at'][0]} requests ({h['trusted_at'][1]:.2f} turnovers)"
    turn = "never"
    if conv:
        turn = f"{conv['turnover']:.2f} turnovers, {conv['requests'] - GAP_AT - 1} requests"
    return Result(
        "gap-no-replay",
        "state",
        f"1 worker (256-block cache), 6 agent sessions on a 20-block harness, batches"
        f" {GAP_AT - 5}..{GAP_AT - 1}"
        f" lost, no replay endpoint; {n} requests",
        f"healed: {h['anchored']} stores anchored, {h['skipped']} events naming blocks the"
        f" index did not know (evictions of blocks stored before the gap); predictions within"
        f" 2 blocks {h['agreement']:.0%} after the gap; hit rate {h['hit_rate']:.1%}. Without"
        f" the healing: {b['skipped']} unknown, predictions within 2 blocks"
        f" {b['agreement']:.0%}, index recall at the end {b['points'][-1]['recall']:.2f}",
        f"degraded at the gap, index precision {last['precision']:.2f} / recall"
        f" {last['recall']:.2f} at the end, trusted again ({h['state']})"
        if ok else "NOT HELD",
        f"predictions agree again {h['agree_at']} requests after the gap; index recall >= 0.9"
        f" and precision >= 0.99 after {turn} (measured every {every} requests); trusted"
        f" again after {trusted}",
        ok,
        rows,
    )


@fault("junk-frames", side="state")
def junk_frames(opts: Options) -> Result:
    """Junk and oversized frames on a worker's event socket, between real batches."""
    n = 50 if opts.quick else 200
    rng = random.Random(9)
    with StateFleet(1, worker_kw={"num_blocks": 512}) as f:
        f.sub.max_message_bytes = 1 << 16
        clock_agents = Agents(4, seed=9)
        junk = 0
        for i in range(n):
            f.send(clock_agents.next())
            w = f.workers[0]
            kind = i % 4
            if kind == 0:
                raw_publish(w, [b""])
            elif kind == 1:
                raw_publish(w, [b"", b"short", b"x"])
            elif kind == 2:
                raw_publish(w, [b"", (w.next_seq + 10**6).to_bytes(8, "big"),
                                bytes(rng.randrange(256) for _ in range(70_000))])  # fmt: skip
            else:
                raw_publish(w, [b"", b"\x00" * 8, b"\x00" * 5, b"extra"])
            junk += 1
        f.send(clock_agents.next())
        truth = f.truth(0)
        c = f.sub.streams()[0].counts
    ok = truth.precision == truth.recall == 1.0 and c["gap"] == c["restart"] == 0
    return Result(
        "junk-frames",
        "state",
        f"{junk} junk messages (1, 3 and 4 frames, bad sequence numbers, 70 kB over a 64 kB"
        f" limit) between {n} real batches",
        f"malformed {c['malformed']}, rejected {c['rejected']}, gaps {c['gap']}, restarts"
        f" {c['restart']}; index vs engine: precision {truth.precision:.3f}, recall"
        f" {truth.recall:.3f}",
        "counted and ignored; the index stayed exact" if ok else "NOT HELD",
        "-",
        ok,
        {"counts": dict(c)},
    )


def _fleet_run(kw: Any, n: int, heal: bool, *, key_on: str = "kvroute", hashing: Any = None,
               window: int = 64, seed: int = 10,
               spoil: Callable[[StateFleet], None] | None = None,
               ) -> tuple[list[Sent], int | None, dict[int, Any]]:  # fmt: skip
    """Four workers, 24 agent sessions, ``n`` requests; worker 3 is the one ``kw`` or ``spoil``
    makes wrong. Returns what was sent, after how many requests to worker 3 it was degraded
    (None: never), and every worker's state at the end."""
    clock = Clock()
    agents = Agents(24, seed=seed)
    rk: dict[str, Any] = {"clock": clock, "policy_params": {"seed": 0}, "drift_window": window}
    if hashing is not None:
        rk["hashing"] = hashing
    with StateFleet(4, worker_kw=kw, router_kw=rk, key_on=key_on) as f:
        tell_capacities(f)
        if spoil is not None:
            spoil(f)
        if not heal:
            no_heal(f)
        found = None
        sent: list[Sent] = []
        while len(sent) < n:
            sent += run(f, clock, agents, CONCURRENCY)
            if found is None:
                found = degraded_at(f, 3, sent)
        states = f.r.worker_states()
    return sent, found, states


def _fleet_hit_rate(kw: Callable[[int], dict[str, Any]], n: int, heal: bool,
                    key_on: str = "kvroute", hashing: Any = None, window: int = 64,
                    seed: int = 10) -> dict[str, Any]:  # fmt: skip
    sent, found, st = _fleet_run(kw, n, heal, key_on=key_on, hashing=hashing, window=window,
                                 seed=seed)  # fmt: skip
    later = sent[n // 4:]
    return {
        "hit_rate": hit_rate(later),
        "on_3": sum(1 for s in later if s.worker == 3) / max(1, len(later)),
        "hit_3": hit_rate([s for s in later if s.worker == 3]),
        "found_after": found,
        "states": {w: s.state for w, s in st.items()},
        "degradations": {w: s.degradations for w, s in st.items()},
        "drift": {w: round(s.drift, 3) for w, s in st.items()},
        "agreement": agreement(later, TOL),
    }


def _trips(run: dict[str, Any], workers: range) -> int:
    """Degradations of workers that had nothing wrong: false trips."""
    return sum(run["degradations"][w] for w in workers)


@fault("block-size", side="state")
def block_size(opts: Options) -> Result:
    """One of four workers runs 32-token blocks (the router 16): nothing of it can be indexed."""
    n = 200 if opts.quick else 600
    ideal = _fleet_hit_rate(lambda i: {"num_blocks": 1024}, n, heal=True)
    bad = lambda i: {"num_blocks": 1024, **({"block_size": 32} if i == 3 else {})}  # noqa: E731
    healed = _fleet_hit_rate(bad, n, heal=True)
    base = _fleet_hit_rate(bad, n, heal=False)
    ok = healed["states"][3] == "degraded" and healed["hit_rate"] >= 0.9 * ideal["hit_rate"]
    return Result(
        "block-size",
        "state",
        f"4 workers, 24 agent sessions, 16 requests in flight, {n} requests; worker 3's engine"
        " uses 32-token blocks",
        f"fleet hit rate (last 3/4): all workers right {ideal['hit_rate']:.1%}; worker 3"
        f" wrong, healed {healed['hit_rate']:.1%} (worker 3's own {healed['hit_3']:.1%}, share"
        f" {healed['on_3']:.0%}); not healed {base['hit_rate']:.1%} (worker 3's own"
        f" {base['hit_3']:.1%}, share {base['on_3']:.0%}); false trips on the healthy"
        f" workers: {_trips(ideal, range(4)) + _trips(healed, range(3))}",
        "degraded at its first event (cause mismatch), routed on its own decisions: the"
        " fleet's hit rate kept" if ok else "NOT HELD",
        f"degraded after {healed['found_after']} request(s) to it",
        ok,
        {"ideal": ideal, "healed": healed, "baseline": base},
    )


def _vllm_hashing(tokens: Any, bs: int, *, lora_name: Any, cache_namespace: Any,
                  parent: Any) -> Any:  # fmt: skip
    if parent is not None:
        raise NotImplementedError("vLLM hashes cannot continue from a 64-bit key")
    return vllm_block_hashes(tokens, bs, algo="sha256", cache_salt=cache_namespace)


@fault("hash-seed", side="state")
def hash_seed(opts: Options) -> Result:
    """One of four engines runs another PYTHONHASHSEED: engine-keyed index, then kvroute-keyed."""
    n = 200 if opts.quick else 500
    kw = lambda i: {"num_blocks": 1024, **({"hash_seed": "4242"} if i == 3 else {})}  # noqa: E731
    engine = _fleet_hit_rate(kw, n, heal=True, key_on="engine", hashing=_vllm_hashing)
    kvr = _fleet_hit_rate(kw, n, heal=True)
    ok = (engine["states"][3] == "degraded" and set(kvr["states"].values()) == {"ok"}
          and max(kvr["drift"].values()) < 0.1)  # fmt: skip
    return Result(
        "hash-seed",
        "state",
        f"4 workers, {n} requests; worker 3's engine hashes with PYTHONHASHSEED=4242; the"
        " router keyed on engine hashes (vLLM's sha256, no seed), then on kvroute's",
        f"engine-keyed: worker 3 {engine['states'][3]}, hit rate {engine['hit_rate']:.1%};"
        f" kvroute-keyed: states {sorted(set(kvr['states'].values()))}, max drift"
        f" {max(kvr['drift'].values()):.3f}, hit rate {kvr['hit_rate']:.1%}; false trips"
        f" on the healthy workers: {_trips(engine, range(3)) + _trips(kvr, range(4))}",
        "detected where it matters (engine keys), never reported where it does not"
        if ok else "NOT HELD",
        f"engine-keyed: degraded after {engine['found_after']} request(s) to it",
        ok,
        {"engine": engine, "kvroute": kvr},
    )


@fault("silent-removals", side="state")
def silent_removals(opts: Options) -> Result:
    """One of four engines evicts without publishing BlockRemoved (no gap shows)."""
    n = 300 if opts.quick else 800

    def kw(i: int) -> dict[str, Any]:
        return {"num_blocks": 128 if i == 3 else 1024}

    def spoil(f: StateFleet) -> None:
        f.workers[3].event_filter = drop_removals

    res = {}
    for heal in (True, False):
        sent, found, states = _fleet_run(kw, n, heal, seed=11, spoil=spoil)
        st = states[3]
        false_trips = sum(states[w].degradations for w in range(3))
        later = sent[n // 2:]
        on3 = [s for s in later if s.worker == 3]
        res["healed" if heal else "baseline"] = {
            "found_after": found, "cause": st.cause, "state": st.state,
            "false_trips": false_trips,
            "over": sum(1 for s in on3 if s.predicted - s.reported > TOL) / max(1, len(on3)),
            "share_3": len(on3) / max(1, len(later)), "hit_rate": hit_rate(later),
        }  # fmt: skip
    h, b = res["healed"], res["baseline"]
    ok = h["cause"] == "drift_over" and h["found_after"] is not None and h["over"] < b["over"]
    return Result(
        "silent-removals",
        "state",
        f"4 workers, {n} requests; worker 3 (128-block cache) evicts without BlockRemoved",
        f"second half, requests on worker 3 over-predicted by > 2 blocks: healed {h['over']:.0%}"
        f" (its share of traffic {h['share_3']:.0%}), not healed {b['over']:.0%} (share"
        f" {b['share_3']:.0%}); fleet hit rate {h['hit_rate']:.1%} vs {b['hit_rate']:.1%};"
        f" false trips on the 3 healthy workers: {h['false_trips']}",
        "found by the drift detector (drift_over); its stale index ignored, routed on its own"
        " decisions" if ok else "NOT HELD",
        f"degraded after {h['found_after']} requests to it",
        ok,
        res,
    )


@fault("silent-stores", side="state")
def silent_stores(opts: Options) -> Result:
    """One of four engines stops publishing its events (empty batches: no gap shows)."""
    n = 300 if opts.quick else 600
    def spoil(f: StateFleet) -> None:
        f.workers[3].event_filter = LoseEvents(share=1.0, after=10)

    res = {}
    for heal in (True, False):
        sent, found, states = _fleet_run({"num_blocks": 1024}, n, heal, seed=12, spoil=spoil)
        st = states[3]
        false_trips = sum(states[w].degradations for w in range(3))
        later = sent[n // 2:]
        on3 = [s for s in later if s.worker == 3]
        res["healed" if heal else "baseline"] = {
            "found_after": found, "cause": st.cause, "false_trips": false_trips,
            "hit_3": hit_rate(on3), "share_3": len(on3) / max(1, len(later)),
            "hit_rate": hit_rate(later), "agreement_3": agreement(on3, TOL),
        }  # fmt: skip
    h, b = res["healed"], res["baseline"]
    ok = h["cause"] == "drift_under" and h["hit_rate"] >= b["hit_rate"] - 0.01
    return Result(
        "silent-stores",
        "state",
        f"4 workers, {n} requests; worker 3 publishes empty batches after its 10th",
        f"second half: fleet hit rate healed {h['hit_rate']:.1%} vs not {b['hit_rate']:.1%};"
        f" worker 3's predictions within 2 blocks {h['agreement_3']:.0%} vs"
        f" {b['agreement_3']:.0%} (share of traffic {h['share_3']:.0%} vs {b['share_3']:.0%});"
        f" false trips on the 3 healthy workers: {h['false_trips']}",
        "found by the drift detector (drift_under); routed on its own decisions" if ok
        else "NOT HELD",
        f"degraded after {h['found_after']} requests to it",
        ok,
        res,
    )


@fault("steady", side="state")
def steady(opts: Options) -> Result:
    """No fault at all: how often the drift detector trips on healthy workers (false trips)."""
    n = 400 if opts.quick else 1500
    res: dict[str, dict[str, Any]] = {}
    # Caches of 1024 blocks, of 192 (about twice the blocks of the requests in flight on a
    # worker: evicting all the time) and of 96 (less than them: a request's blocks are
    # evicted by its siblings before it runs, so predictions are off however exact the
    # index is); the last also with the healing off, to see what its trips cost.
    for name, blocks, heal in (("1024", 1024, True), ("192", 192, True), ("96", 96, True),
                               ("96 not healed", 96, False)):  # fmt: skip
        clock = Clock()
        agents = Agents(24, seed=13)
        rk = {"clock": clock, "policy_params": {"seed": 0}}
        with StateFleet(4, worker_kw={"num_blocks": blocks}, router_kw=rk) as f:
            tell_capacities(f)
            if not heal:
                no_heal(f)
            sent = run(f, clock, agents, n)
            st = f.r.worker_states()
        judged = [s for s in sent if s.predicted or s.reported]
        res[name] = {
            "requests": n, "judged": len(judged), "false_trips": sum(x.degradations
            for x in st.values()), "max_drift": max(x.drift for x in st.values()),
            "agreement": agreement(judged, TOL), "hit_rate": hit_rate(sent[n // 4:]),
            "degraded_at_end": sum(x.state == "degraded" for x in st.values()),
        }  # fmt: skip
    ok = res["1024"]["false_trips"] == res["192"]["false_trips"] == 0
    cells = [
        f"{k} blocks: {r['false_trips']} trips, predictions within 2 blocks"
        f" {r['agreement']:.0%}, hit rate {r['hit_rate']:.1%}"
        for k, r in res.items()
        if k != "96 not healed"
    ]
    t = res["96"]
    return Result(
        "steady",
        "state",
        f"4 healthy workers, 24 agent sessions, 16 in flight, {n} requests each run; caches of"
        " 1024, 192 and 96 blocks (the last smaller than the blocks in flight on a worker);"
        " drift window 64, threshold 0.3",
        "; ".join(cells) + f"; 96 blocks with the healing off: hit rate"
        f" {res['96 not healed']['hit_rate']:.1%}",
        ("no trip while a worker's cache holds the blocks in flight on it; a thrashing cache"
         f" trips it ({t['false_trips']} in {n} requests, {t['degraded_at_end']} still degraded"
         f" at the end; hit rate {t['hit_rate']:.1%}, {res['96 not healed']['hit_rate']:.1%}"
         " with the healing off)") if ok else "NOT HELD: false trips",
        "-",
        ok,
        res,
    )


@fault("sessions", side="state")
def sessions(opts: Options) -> Result:
    """200,000 client-made sessions, each with a one-hour cache_control pin."""
    n = 50_000 if opts.quick else 200_000
    cc = {"type": "ephemeral", "ttl": "1h"}
    out = {}
    for cap in (10**9, 100_000):
        # fresh decisions off: only the sessions' own records are measured
        r = Router(block_size=BS, workers=range(4), max_sessions=cap, clock=lambda: 0.0,
                   predict_on_route=False)  # fmt: skip
        sids = [f"client-made-{i}" for i in range(n)]  # the client's strings, not the router's
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i, sid in enumerate(sids):
            r.route(Request(i, block_hashes=[i + 1], session_id=sid, cache_control=cc))
            r.finished(i)
        del sid
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grew = sum(s.size_diff for s in after.compare_to(before, "filename"))
        st = r.stats()
        out["unbounded" if cap == 10**9 else "bounded"] = {
            "bytes_per_session": grew / n, "kept": st["sessions"],
            "evicted": st["sessions_evicted"], "mb": grew / 2**20,
        }  # fmt: skip
    u, b = out["unbounded"], out["bounded"]
    ok = b["kept"] == min(n, 100_000) and b["evicted"] == max(0, n - 100_000)
    return Result(
        "sessions",
        "state",
        f"{n:,} sessions, each pinned for 1 h by cache_control; max_sessions unbounded, then"
        " the default 100,000",
        f"unbounded: {u['kept']:,} kept, {u['mb']:.1f} MiB ({u['bytes_per_session']:.0f} B a"
        f" session); bounded: {b['kept']:,} kept, {b['evicted']:,} evicted, {b['mb']:.1f} MiB",
        "bounded, least recently used evicted and counted" if ok else "NOT HELD",
        "-",
        ok,
        out,
    )

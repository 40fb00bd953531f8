"""``kvroute proxy``: the command line of the routing proxy.

This module imports nothing heavy at import time (the ``kvroute`` command
builds every subcommand's parser); :func:`run` loads the proxy itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final

from ..fleet.dns import parse_worker_dns
from ..policies.params import parse_assignment
from .config import (
    ACCESS_LOG_FORMATS,
    DEFAULT_GC_THRESHOLD,
    DEFAULT_MAX_BODY_SIZE,
    ProxyConfig,
    WorkerSpec,
    parse_model_map,
    parse_worker,
)

__all__ = ["DESCRIPTION", "EPILOG", "build_config", "configure", "parse_size", "run"]

DESCRIPTION: Final = """\
An OpenAI- and Anthropic-compatible HTTP proxy that sends each request to the
worker holding the longest prefix of its prompt in KV cache.

Serves /v1/completions, /v1/chat/completions, /v1/responses, /v1/messages
(streaming or not), /v1/messages/count_tokens, /v1/embeddings, /tokenize,
/detokenize, /v1/models, /health, /livez, /readyz and /metrics. Name workers
with --worker (their ids are their positions: 0, 1, ...; in a
prefill/decode-disaggregated fleet --prefill-worker and --decode-worker), in --config FILE,
a --workers-file (watched), --worker-dns (re-resolved), or the admin API
(--admin-token); see docs/workers.md. With an events endpoint per worker the
router follows the workers' KV events; without, it predicts residency from
its own decisions.

Every option can also be set in a TOML or YAML file (--config), under the
option's name with underscores (--read-timeout: read_timeout); secrets also
from the environment (KVROUTE_UPSTREAM_API_KEY, KVROUTE_ADMIN_TOKEN).
Precedence: command line > environment > config file > defaults.
--print-config shows the result.
"""

EPILOG: Final = """\
examples:
  kvroute proxy --worker http://10.0.0.5:8000 --worker http://10.0.0.6:8000
  kvroute proxy --worker-dns vllm-headless.default.svc:8000=5557,5558 --admin-token "$TOKEN"
  kvroute proxy --worker http://10.0.0.5:8000=tcp://10.0.0.5:5557,tcp://10.0.0.5:5558 \\
                --worker http://10.0.0.6:8000=tcp://10.0.0.6:5557 \\
                --tokenizer /models/Qwen3-Coder --port 8080 \\
                --model-map 'claude-*=Qwen/Qwen3-Coder-30B-A3B-Instruct'
  kvroute proxy --prefill-worker http://10.0.0.5:8100=tcp://10.0.0.5:5557 \
                --decode-worker http://10.0.0.6:8200=tcp://10.0.0.6:5557 \
                --disagg-protocol vllm --disagg-local-prefill-tokens 1024

  kvroute proxy --config proxy.toml --policy kv_cost --policy-param router_temperature=0.5
  kvroute proxy --config proxy.toml --print-config > effective.toml

agent hints (headers): X-Session-Id (see --session-header), X-Kvroute-Priority,
X-Kvroute-Cache-Ttl (5m|1h), X-Kvroute-Expected-Output-Tokens,
X-Kvroute-Speculative-Prefill; Anthropic requests also use metadata.user_id
and cache_control breakpoints.

environment: KVROUTE_CONFIG (the --config file), KVROUTE_<FIELD> for secrets
(KVROUTE_UPSTREAM_API_KEY); a config file may name variables as ${NAME}.

exit status: 0 stopped (SIGINT and SIGTERM drain and shut down cleanly), 2 bad usage or
configuration (an unknown key or bad value, named), or the port cannot be bound.
"""

_SIZE: Final = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``64K``, ``32M``, ``32MiB``, ``1G`` (binary units).

    >>> parse_size("32MiB"), parse_size("1024"), parse_size("64k")
    (33554432, 1024, 65536)

    :raises ValueError: anything else, or zero.
    """
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"expected a size like 32M, got {text!r}")
    unit = (m.group(2) or "").lower()[:1]
    value = int(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError("the size must be at least 1 byte")
    return value


def _arg(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a parser raising ValueError."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def _positive(kind: Callable[[str], float | int]) -> Callable[[str], object]:
    def positive(text: str) -> float | int:
        value = kind(text)
        if not value > 0:
            raise ValueError(f"must be > 0, got {text}")
        return value

    return _arg(positive)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {text}")
    return value


def _add_disagg_args(p: argparse.ArgumentParser) -> None:
    """Prefill/decode disaggregation: workers by role, the protocol, the conditional rule."""
    g = p.add_argument_group(
        "prefill/decode disaggregation",
        "A prefill worker prefills each request, its KV moves to a decode worker, which"
        " streams the reply (see docs/disaggregation.md).",
    )
    g.add_argument(
        "--prefill-worker",
        dest="workers",
        action="append",
        type=_arg(_prefill_worker),
        metavar="URL[=EVENTS[,REPLAY]]",
        help="a worker that only prefills (repeatable; ids follow the order of every worker flag)",
    )
    g.add_argument(
        "--decode-worker",
        dest="workers",
        action="append",
        type=_arg(_decode_worker),
        metavar="URL[=EVENTS[,REPLAY]]",
        help="a worker that only decodes (repeatable)",
    )
    g.add_argument(
        "--disagg-protocol",
        choices=("vllm", "sglang"),
        default="vllm",
        help="how the two legs talk to the workers: vllm (NixlConnector's kv_transfer_params,"
        " prefill then decode) or sglang (bootstrap_host/port/room, both at once; default: vllm)",
    )
    g.add_argument(
        "--disagg-local-prefill-tokens",
        type=_arg(_non_negative_int),
        default=0,
        metavar="N",
        help="conditional disaggregation: prefill on the decode worker when fewer than N prompt"
        " tokens are uncached there (vllm only; default 0: always on a prefill worker)",
    )
    g.add_argument(
        "--disagg-bootstrap-port",
        type=_arg(_port),
        default=8998,
        metavar="PORT",
        help="SGLang's bootstrap port on the prefill workers (default: 8998, SGLang's)",
    )


def _prefill_worker(text: str) -> WorkerSpec:
    return parse_worker(text, role="prefill")


def _decode_worker(text: str) -> WorkerSpec:
    return parse_worker(text, role="decode")


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError(f"must be a port number, got {text}")
    return value


def _events_format(text: str) -> str:
    """A registered ZMQ event format's name (the registry is loaded on first use)."""
    from ..events.decode import available_formats

    formats = available_formats(zmq=True)
    if text not in formats:
        raise ValueError(f"unknown events format {text!r} (choose from {', '.join(formats)})")
    return text


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"must be >= 0, got {text}")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    """Add ``proxy``'s arguments to its parser."""
    fleet = p.add_argument_group("fleet")
    fleet.add_argument(
        "--worker",
        dest="workers",
        action="append",
        type=_arg(parse_worker),
        metavar="URL[=EVENTS[,REPLAY]]",
        help="a worker's base URL, optionally with its ZMQ KV-event endpoint and replay"
        " endpoint (repeatable; ids follow the order given; at least one, here or in --config);"
        " it prefills and decodes",
    )
    fleet.add_argument(
        "--events-format",
        type=_arg(_events_format),
        default="vllm",
        metavar="FORMAT",
        help="the KV-event wire format of workers that name none: vllm (default), sglang,"
        " trtllm, or another registered ZMQ format. An http(s) events endpoint"
        " (URL=http://HOST:PORT/kv_cache_events) is trtllm-serve's, polled",
    )
    fleet.add_argument(
        "--block-size",
        type=_positive(int),
        default=16,
        metavar="N",
        help="the engines' KV block size in tokens (default: 16)",
    )
    fleet.add_argument(
        "--policy", default="kvroute", metavar="NAME", help="routing policy (default: kvroute)"
    )
    fleet.add_argument(
        "--upstream-api-key",
        default=os.environ.get("KVROUTE_UPSTREAM_API_KEY"),
        metavar="KEY",
        help="send 'Authorization: Bearer KEY' to workers (default: $KVROUTE_UPSTREAM_API_KEY;"
        " unset: the client's Authorization header is passed on)",
    )
    tok = p.add_argument_group("tokenizing (for routing)")
    tok.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a Hugging Face tokenizer.json, or a model directory holding it and"
        " tokenizer_config.json: tokenize in the proxy",
    )
    tok.add_argument(
        "--chat-template",
        metavar="PATH",
        help="a Jinja chat template file (overrides the tokenizer's)",
    )
    tok.add_argument(
        "--image-placeholder",
        metavar="TEXT",
        help="what an image becomes when tokenizing locally for a template that prints"
        " content as text (default: the tokenizer config's image_token, else <image>)",
    )
    tok.add_argument(
        "--tokenize-with",
        choices=("auto", "local", "render", "tokenize"),
        default="auto",
        help="local: --tokenizer; render: the workers' /v1/.../render endpoints (falling back"
        " to /tokenize); tokenize: the workers' /tokenize; auto (default): local with"
        " --tokenizer, else render",
    )
    api = p.add_argument_group("API")
    api.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    api.add_argument(
        "--port", type=_arg(_non_negative_int), default=8080, help="port (default: 8080)"
    )
    api.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="NAME",
        help="a served model name (repeatable; default: what the workers' /v1/models list)",
    )
    api.add_argument(
        "--model-map",
        action="append",
        default=[],
        type=_arg(parse_model_map),
        metavar="PATTERN=MODEL",
        help="send requests for models matching PATTERN (fnmatch, e.g. 'claude-*') as MODEL"
        " (repeatable; first match wins)",
    )
    api.add_argument(
        "--lora-adapter",
        dest="lora_adapters",
        action="append",
        default=[],
        metavar="NAME",
        help="a model name that selects a LoRA adapter (vLLM's --lora-modules NAME=PATH;"
        " repeatable; adapters the workers' /v1/models list are known without it)",
    )
    api.add_argument(
        "--session-header",
        default="X-Session-Id",
        metavar="NAME",
        help="request header naming the agent session (default: X-Session-Id)",
    )
    api.add_argument(
        "--speculative-prefill",
        action="store_true",
        help="after each response of a session, prefill its next turn's prefix on the same"
        " worker (as X-Kvroute-Speculative-Prefill: true does per request)",
    )
    api.add_argument(
        "--max-prompt-tokens",
        type=_positive(int),
        default=None,
        metavar="N",
        help="refuse longer prompts with 400 before routing them (a token-id prompt before"
        " its ids are parsed; default: no limit)",
    )
    api.add_argument(
        "--max-body-size",
        type=_arg(parse_size),
        default=DEFAULT_MAX_BODY_SIZE,
        metavar="SIZE",
        help="larger request bodies get 413 (default: 32M)",
    )
    rel = p.add_argument_group("failures and health")
    rel.add_argument(
        "--retries",
        type=_arg(_non_negative_int),
        default=2,
        metavar="N",
        help="attempts on other workers after a worker fails before answering (default: 2)",
    )
    rel.add_argument(
        "--connect-timeout", type=_positive(float), default=5.0, metavar="S",
        help="seconds to connect to a worker (default: 5)",
    )  # fmt: skip
    rel.add_argument(
        "--read-timeout", type=_positive(float), default=600.0, metavar="S",
        help="seconds of silence from a worker before it counts as failed; noticed within a"
        " quarter more (default: 600)",
    )  # fmt: skip
    rel.add_argument(
        "--health-interval", type=_positive(float), default=2.0, metavar="S",
        help="seconds between health checks of every worker (default: 2)",
    )  # fmt: skip
    rel.add_argument(
        "--health-timeout", type=_positive(float), default=2.0, metavar="S",
        help="seconds a health check may take (default: 2)",
    )  # fmt: skip
    rel.add_argument(
        "--unhealthy-after", type=_positive(int), default=2, metavar="N",
        help="failed health checks in a row that take a worker out (default: 2)",
    )  # fmt: skip
    rel.add_argument(
        "--no-scrape-metrics",
        dest="scrape_metrics",
        action="store_false",
        help="do not read the workers' /metrics (waiting requests, KV usage)",
    )
    _add_membership_args(p)
    _add_outlier_args(p)
    _add_connection_args(p)
    _add_deadline_args(p)
    _add_disagg_args(p)
    _add_sync_args(p)
    _add_state_args(p)
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log level (default: info)",
    )
    _add_config_args(p)
    _add_policy_args(p)
    _add_observability_args(p)
    _add_shutdown_args(p)


def _add_sync_args(p: argparse.ArgumentParser) -> None:
    """Replica sync: several proxies behind a load balancer share state through Redis."""
    g = p.add_argument_group("replicas (several proxies behind one load balancer)")
    g.add_argument(
        "--sync-url",
        default=os.environ.get("KVROUTE_SYNC_URL"),
        metavar="redis://HOST:PORT/DB",
        help="share load, routing decisions, pins and an index snapshot with the other"
        " replicas through this Redis or Valkey (default: $KVROUTE_SYNC_URL; unset: route"
        " alone). Every replica needs the same --worker list; workers added at run time"
        " (admin API, workers file, DNS) are shared. See docs/cluster.md",
    )
    g.add_argument(
        "--replica-id",
        metavar="NAME",
        help="this replica's name in the fleet (default: HOSTNAME-PID)",
    )
    g.add_argument(
        "--sync-prefix",
        default="kvroute",
        metavar="NAME",
        help="prefix of the fleet's Redis keys (default: kvroute)",
    )
    g.add_argument(
        "--sync-snapshot-interval",
        type=_arg(_non_negative_float),
        default=30.0,
        metavar="S",
        help="seconds between the index snapshots kept for replicas that start later"
        " (default: 30; 0: none); keep it well below the time the engines' KV-event"
        " replay buffers take to turn over",
    )


def _add_membership_args(p: argparse.ArgumentParser) -> None:
    """Workers at run time: the workers file, DNS discovery, the admin API, draining."""
    g = p.add_argument_group("workers at run time (docs/workers.md)")
    g.add_argument(
        "--workers-file",
        metavar="PATH",
        help="a JSON or YAML list of workers (mappings with url, events_endpoint, ..., or"
        " URL[=EVENTS[,REPLAY]] strings), reloaded when it changes",
    )
    g.add_argument(
        "--workers-file-interval", type=_positive(float), default=2.0, metavar="S",
        help="seconds between looks at the workers file (default: 2)",
    )  # fmt: skip
    g.add_argument(
        "--worker-dns",
        action="append",
        default=[],
        type=_arg(parse_worker_dns),
        metavar="HOST:PORT[=EVENTS_PORT[,REPLAY_PORT]]",
        help="every address HOST resolves to is a worker http://IP:PORT (events at"
        " tcp://IP:EVENTS_PORT); re-resolved periodically, e.g. a Kubernetes headless"
        " Service (repeatable)",
    )
    g.add_argument(
        "--worker-dns-interval", type=_positive(float), default=10.0, metavar="S",
        help="seconds between DNS resolutions (default: 10)",
    )  # fmt: skip
    g.add_argument(
        "--admin-token",
        default=os.environ.get("KVROUTE_ADMIN_TOKEN"),
        metavar="TOKEN",
        help="enable the admin API (/admin/workers) for requests with 'Authorization: Bearer"
        " TOKEN' (default: $KVROUTE_ADMIN_TOKEN; unset: no admin API)",
    )
    g.add_argument(
        "--drain-timeout", type=_positive(float), default=600.0, metavar="S",
        help="seconds a draining worker's requests may take before it is removed anyway"
        " (default: 600)",
    )  # fmt: skip


def _add_state_args(p: argparse.ArgumentParser) -> None:
    """The router's per-session state: bounded."""
    g = p.add_argument_group("router state")
    g.add_argument(
        "--max-sessions", type=_positive(int), default=100_000, metavar="N",
        help="agent sessions whose cache_control pin and warm-up plan the router keeps; the"
        " least recently used go past it (default: 100000)",
    )  # fmt: skip


def _require_workers(args: argparse.Namespace) -> None:
    """No source of workers at all is a usage error (with the usage line, from the parser)."""
    if args.workers or args.workers_file or args.worker_dns or args.admin_token:
        return
    message = (
        "no workers: give --worker (repeatable; or --prefill-worker and --decode-worker),"
        " workers in --config FILE, --workers-file or --worker-dns, or --admin-token to add"
        " them through the admin API"
    )
    parser = getattr(args, "_parser", None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)  # exits 2
    raise ValueError(message)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """--config and --print-config (kvroute.proxy.settings)."""
    g = p.add_argument_group(
        "configuration",
        "precedence: command line > environment (KVROUTE_<FIELD> for secrets) >"
        " config file > defaults",
    )
    g.add_argument(
        "--config",
        default=os.environ.get("KVROUTE_CONFIG"),
        metavar="FILE",
        help="a TOML (or .yaml/.yml) file of settings: any option, by its name with"
        " underscores, workers as [[workers]] tables (default: $KVROUTE_CONFIG)",
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (secrets redacted) as a file --config"
        " accepts, and exit",
    )


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    """--policy-param and --router-setting."""
    g = p.add_argument_group("routing policy and router")
    g.add_argument(
        "--policy-param",
        dest="policy_params",
        action="append",
        default=[],
        type=_arg(parse_assignment),
        metavar="NAME=VALUE",
        help="a parameter of the --policy, e.g. router_temperature=0.5 for kv_cost"
        " (repeatable; typed and checked by the policy's signature)",
    )
    g.add_argument(
        "--router-setting",
        dest="router",
        action="append",
        default=[],
        type=_arg(parse_assignment),
        metavar="NAME=VALUE",
        help="a Router setting: fresh_ttl, predicted_ttl, request_timeout, admission,"
        " busy_threshold.max_active_requests... (repeatable; see docs/operations.md)",
    )


def _add_observability_args(p: argparse.ArgumentParser) -> None:
    """The access log and tracing (kvroute.proxy.observe)."""
    g = p.add_argument_group("observability")
    g.add_argument(
        "--access-log",
        default="stderr",
        metavar="stderr|stdout|PATH|off",
        help="one line per API request, written when it ends (default: stderr)",
    )
    g.add_argument(
        "--access-log-format",
        choices=ACCESS_LOG_FORMATS,
        default="json",
        help="JSON lines, or logfmt text (default: json)",
    )
    g.add_argument(
        "--tracing",
        action="store_true",
        help="an OpenTelemetry span per request, its context sent to the worker (needs"
        " opentelemetry-api; exporters from OTEL_TRACES_EXPORTER, default otlp)",
    )


def _add_shutdown_args(p: argparse.ArgumentParser) -> None:
    """The proxy's own stop: draining on SIGTERM (kvroute.proxy.serving)."""
    g = p.add_argument_group("stopping the proxy")
    g.add_argument(
        "--shutdown-timeout", type=_positive(float), default=30.0, metavar="S",
        help="seconds the requests in flight get to finish after SIGINT/SIGTERM (default: 30)",
    )  # fmt: skip
    g.add_argument(
        "--shutdown-delay", type=_arg(_non_negative_float), default=0.0, metavar="S",
        help="seconds to keep accepting requests after SIGTERM while /readyz answers 503,"
        " for a load balancer to notice (default: 0)",
    )  # fmt: skip
    g = p.add_argument_group("the Python process")
    g.add_argument(
        "--gc-threshold", type=_arg(_non_negative_int), default=DEFAULT_GC_THRESHOLD,
        metavar="N",
        help="once serving, freeze the start-up heap out of Python's cyclic garbage collector"
        " and collect its young generation every N allocations; 0: leave the collector as"
        f" Python sets it (default: {DEFAULT_GC_THRESHOLD:,}; Python's own: 700)",
    )  # fmt: skip


def _add_outlier_args(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("outlier detection (workers failing every generation)")
    out.add_argument(
        "--eject-after", type=_arg(_non_negative_int), default=5, metavar="N",
        help="attempts a worker fails in a row (5xx, broken connections or streams) that eject"
        " it for a while; 0: never (default: 5)",
    )  # fmt: skip
    out.add_argument(
        "--ejection-time", type=_positive(float), default=10.0, metavar="S",
        help="seconds of a first ejection; the n-th lasts n times as long (default: 10)",
    )  # fmt: skip
    out.add_argument(
        "--max-ejection-time", type=_positive(float), default=300.0, metavar="S",
        help="the longest ejection, in seconds (default: 300)",
    )  # fmt: skip
    out.add_argument(
        "--max-ejected-percent", type=_arg(_percent), default=50.0, metavar="P",
        help="the most workers ejected at once, in percent of the fleet; one may always be,"
        " and never the last usable one (default: 50)",
    )  # fmt: skip


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    conn = p.add_argument_group("client connections (slow or too many clients)")
    conn.add_argument(
        "--max-connections", type=_positive(int), default=1024, metavar="N",
        help="open client connections beyond which a new one is refused with 503"
        " (default: 1024; mind the file-descriptor limit: each request also opens one"
        " to a worker)",
    )  # fmt: skip
    conn.add_argument(
        "--header-timeout", type=_positive(float), default=10.0, metavar="S",
        help="seconds a request's headers may take to arrive, else 408 (default: 10)",
    )  # fmt: skip
    conn.add_argument(
        "--body-timeout", type=_positive(float), default=60.0, metavar="S",
        help="seconds a request's body may take to arrive after its headers, else 408"
        " (default: 60)",
    )  # fmt: skip
    conn.add_argument(
        "--idle-timeout", type=_positive(float), default=75.0, metavar="S",
        help="seconds an idle kept-alive client connection stays open (default: 75)",
    )  # fmt: skip


def _add_deadline_args(p: argparse.ArgumentParser) -> None:
    dl = p.add_argument_group("deadlines and mid-stream recovery")
    dl.add_argument(
        "--deadline", type=_positive(float), default=None, metavar="S",
        help="seconds a generation request may take in all (default: none); a client sets"
        " its own with X-Kvroute-Deadline",
    )  # fmt: skip
    dl.add_argument(
        "--max-deadline", type=_positive(float), default=3600.0, metavar="S",
        help="the longest deadline a client may ask for (default: 3600)",
    )  # fmt: skip
    dl.add_argument(
        "--migrations", type=_arg(_non_negative_int), default=1, metavar="N",
        help="times a stream whose worker failed mid-way is continued on another worker;"
        " 0: never (default: 1)",
    )  # fmt: skip


def _percent(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise ValueError(f"must be within 0..100, got {text}")
    return value


def build_config(
    args: argparse.Namespace, flagless: Mapping[str, Any] | None = None
) -> ProxyConfig:
    """The :class:`ProxyConfig` for parsed arguments.

    :param flagless: values for fields without a flag (from a config file).
    :raises ValueError: an inconsistent option or an unknown policy.
    :raises OSError: the chat template cannot be read.
    """
    from ..policies import available_policies, params_by_policy
    from .settings import parse_pairs

    if args.policy not in available_policies():
        raise ValueError(
            f"unknown routing policy {args.policy!r}; choose from {', '.join(available_policies())}"
        )
    try:
        policy_params = params_by_policy([args.policy], args.policy_params)[args.policy]
    except ValueError as e:
        raise ValueError(f"policy_params.{e}") from None
    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    config = ProxyConfig(
        workers=args.workers or (),
        block_size=args.block_size,
        policy=args.policy,
        tokenizer=args.tokenizer,
        chat_template=template,
        image_placeholder=args.image_placeholder,
        tokenize_with=args.tokenize_with,
        models=args.models,
        model_map=args.model_map,
        lora_adapters=args.lora_adapters,
        session_header=args.session_header,
        speculative_prefill=args.speculative_prefill,
        max_body_size=args.max_body_size,
        max_prompt_tokens=args.max_prompt_tokens,
        retries=args.retries,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        unhealthy_after=args.unhealthy_after,
        scrape_metrics=args.scrape_metrics,
        events_format=args.events_format,
        upstream_api_key=args.upstream_api_key,
        workers_file=args.workers_file,
        workers_file_interval=args.workers_file_interval,
        worker_dns=args.worker_dns,
        worker_dns_interval=args.worker_dns_interval,
        admin_token=args.admin_token,
        drain_timeout=args.drain_timeout,
        policy_params=policy_params,
        router=parse_pairs(args.router),
        access_log=args.access_log,
        access_log_format=args.access_log_format,
        tracing=args.tracing,
        eject_after=args.eject_after,
        ejection_time=args.ejection_time,
        max_ejection_time=args.max_ejection_time,
        max_ejected_percent=args.max_ejected_percent,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        idle_timeout=args.idle_timeout,
        deadline=args.deadline,
        max_deadline=args.max_deadline,
        migrations=args.migrations,
        disagg_protocol=args.disagg_protocol,
        disagg_local_prefill_tokens=args.disagg_local_prefill_tokens,
        disagg_bootstrap_port=args.disagg_bootstrap_port,
        sync_url=args.sync_url,
        replica_id=args.replica_id,
        sync_prefix=args.sync_prefix,
        sync_snapshot_interval=args.sync_snapshot_interval,
        max_sessions=args.max_sessions,
    )
    # fields without a flag of their own are set by name
    return dataclasses.replace(config, **flagless) if flagless else config


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (or print the configuration); returns the exit status.

    :raises ValueError, OSError, RuntimeError, ImportError: bad configuration
        (a config file's error names its key), an unreadable tokenizer or
        template, a port in use, missing extras.
    """
    from .settings import apply_layers, load_file

    parser: argparse.ArgumentParser | None = getattr(args, "_parser", None)
    if parser is None:  # called without the kvroute command's parser
        parser = argparse.ArgumentParser(prog="kvroute proxy")
        configure(parser)
    argv = getattr(args, "argv", None)
    sub = argv[1:] if argv and argv[0] == getattr(args, "command", None) else None
    data = load_file(args.config) if args.config else None
    settings = apply_layers(parser, sub, args, data, args.config, os.environ)
    _require_workers(args)
    try:
        config = build_config(args, settings.flagless)
    except (TypeError, ValueError) as e:
        raise ValueError(settings.blame(str(e))) from None
    if args.print_config:
        from .settings import render_toml

        sys.stdout.write(render_toml(parser, args, config, settings))
        return 0
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("kvroute.proxy")
    provider = None
    if config.tracing:
        from .tracing import configure_sdk

        provider, where = configure_sdk()
        log.info("tracing: %s", where)
    from .app import ProxyApp
    from .serving import serve

    proxy = ProxyApp(config)
    try:
        asyncio.run(
            serve(
                proxy,
                args.host,
                args.port,
                shutdown_timeout=args.shutdown_timeout,
                shutdown_delay=args.shutdown_delay,
                source=settings.describe(),
                gc_threshold=args.gc_threshold,
            )
        )
    finally:
        if provider is not None:
            provider.shutdown()  # exports the spans still batched
    return 0

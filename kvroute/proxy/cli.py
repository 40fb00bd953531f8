"""``kvroute proxy``: the command line of the routing proxy.

This module imports nothing heavy at import time (the ``kvroute`` command
builds every subcommand's parser); :func:`run` loads the proxy itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable
from typing import Final

from ..fleet.dns import parse_worker_dns
from .config import DEFAULT_MAX_BODY_SIZE, ProxyConfig, parse_model_map, parse_worker

__all__ = ["DESCRIPTION", "EPILOG", "build_config", "configure", "parse_size", "run"]

DESCRIPTION: Final = """\
An OpenAI- and Anthropic-compatible HTTP proxy that sends each request to the
worker holding the longest prefix of its prompt in KV cache.

Serves /v1/completions, /v1/chat/completions, /v1/messages (streaming or
not), /v1/messages/count_tokens, /v1/models, /health and /metrics. Name workers
with --worker (their ids are their positions: 0, 1, ...), a --workers-file
(watched), --worker-dns (re-resolved), or the admin API (--admin-token); see
docs/workers.md. With an events endpoint per worker the router follows the
workers' KV events over ZMQ; without, it predicts residency from its own
decisions.
"""

EPILOG: Final = """\
examples:
  kvroute proxy --worker http://10.0.0.5:8000 --worker http://10.0.0.6:8000
  kvroute proxy --worker-dns vllm-headless.default.svc:8000=5557,5558 --admin-token "$TOKEN"
  kvroute proxy --worker http://10.0.0.5:8000=tcp://10.0.0.5:5557,tcp://10.0.0.5:5558 \\
                --worker http://10.0.0.6:8000=tcp://10.0.0.6:5557 \\
                --tokenizer /models/Qwen3-Coder --port 8080 \\
                --model-map 'claude-*=Qwen/Qwen3-Coder-30B-A3B-Instruct'

agent hints (headers): X-Session-Id (see --session-header), X-Kvroute-Priority,
X-Kvroute-Cache-Ttl (5m|1h), X-Kvroute-Expected-Output-Tokens,
X-Kvroute-Speculative-Prefill; Anthropic requests also use metadata.user_id
and cache_control breakpoints.

exit status: 0 stopped (SIGINT and SIGTERM shut down cleanly), 2 bad usage or configuration.
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


def _events_format(text: str) -> str:
    """A registered ZMQ event format's name (the registry is loaded on first use)."""
    from ..events.decode import available_formats

    formats = available_formats(zmq=True)
    if text not in formats:
        raise ValueError(f"unknown events format {text!r} (choose from {', '.join(formats)})")
    return text


def configure(p: argparse.ArgumentParser) -> None:
    """Add ``proxy``'s arguments to its parser."""
    fleet = p.add_argument_group("fleet")
    fleet.add_argument(
        "--worker",
        dest="workers",
        action="append",
        default=[],
        type=_arg(parse_worker),
        metavar="URL[=EVENTS[,REPLAY]]",
        help="a worker's base URL, optionally with its ZMQ KV-event endpoint and replay"
        " endpoint (repeatable; ids follow the order given)",
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
        help="seconds of silence from a worker before it counts as failed (default: 600)",
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
    _add_state_args(p)
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="log level (default: info)",
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
        "no workers: give --worker (repeatable), --workers-file or --worker-dns,"
        " or --admin-token to add them through the admin API"
    )
    parser = getattr(args, "_parser", None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)  # exits 2
    raise ValueError(message)


def build_config(args: argparse.Namespace) -> ProxyConfig:
    """The :class:`ProxyConfig` for parsed arguments.

    :raises ValueError: an inconsistent option or an unknown policy.
    :raises OSError: the chat template cannot be read.
    """
    from ..policies import available_policies

    if args.policy not in available_policies():
        raise ValueError(
            f"unknown routing policy {args.policy!r}; choose from {', '.join(available_policies())}"
        )
    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    return ProxyConfig(
        workers=args.workers,
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
        max_sessions=args.max_sessions,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit status.

    :raises ValueError, OSError, RuntimeError, ImportError: bad configuration,
        an unreadable tokenizer or template, a port in use, missing extras.
    """
    _require_workers(args)
    config = build_config(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from aiohttp import web

    from .app import ProxyApp

    proxy = ProxyApp(config)
    log = logging.getLogger("kvroute.proxy")
    log.info("listening on http://%s:%d", args.host, args.port)
    web.run_app(proxy.make_app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0

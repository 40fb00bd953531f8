"""The proxy's configuration: its workers and its options, validated once.

Workers are :class:`~kvroute.fleet.spec.WorkerSpec` objects, the one
definition of a worker every source shares (re-exported here).

>>> parse_worker("localhost:8001/=tcp://localhost:5557")
WorkerSpec(url='http://localhost:8001', events_endpoint='tcp://localhost:5557', \
replay_endpoint=None, events_format=None, role='both', bootstrap_port=None, name=None)
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from ..fleet.dns import DnsName, parse_worker_dns
from ..fleet.spec import WorkerSpec, parse_worker
from .event_sources import check_event_sources

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "ProxyConfig",
    "TokenizeWith",
    "WorkerSpec",
    "parse_model_map",
    "parse_worker",
]

#: Largest request body accepted by default (32 MiB: a 128k-token prompt with tool output).
DEFAULT_MAX_BODY_SIZE: Final = 32 << 20

#: How prompts are turned into token ids for routing (see :class:`ProxyConfig`).
TokenizeWith = Literal["auto", "local", "render", "tokenize"]


def parse_model_map(text: str) -> tuple[str, str]:
    """Parse ``PATTERN=MODEL`` (an fnmatch pattern over requested model names).

    >>> parse_model_map("claude-*=Qwen/Qwen3-Coder-30B-A3B-Instruct")
    ('claude-*', 'Qwen/Qwen3-Coder-30B-A3B-Instruct')

    :raises ValueError: no ``=``, or an empty side.
    """
    pattern, sep, model = text.partition("=")
    if not sep or not pattern.strip() or not model.strip():
        raise ValueError(f"model map {text!r}: expected PATTERN=MODEL")
    return pattern.strip(), model.strip()


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything the proxy needs to know; every option has a default.

    :param workers: the workers named at start (``--worker``); their ids are
        their positions in this list (0..n-1). Empty is allowed when workers
        come from ``workers_file``, ``worker_dns`` or the admin API.
    :param block_size: the engines' KV block size in tokens.
    :param policy: a registered routing policy name.
    :param tokenizer: a Hugging Face ``tokenizer.json``, or a directory holding
        it (and ``tokenizer_config.json`` for the chat template and BOS/EOS).
    :param chat_template: a Jinja chat template (text), overriding the tokenizer's.
    :param image_placeholder: what an image becomes when tokenizing locally
        for a template that prints content as a string (default: the tokenizer
        config's ``image_token``, else ``<image>``); the engine's own
        placeholder keeps the prefix before and after an image exact.
    :param tokenize_with: ``"local"`` (needs ``tokenizer``), ``"render"`` (a
        worker's ``/v1/.../render`` endpoints, falling back to ``/tokenize``),
        ``"tokenize"`` (a worker's ``/tokenize``), or ``"auto"``: local when a
        tokenizer is given, else render.
    :param models: the model names served; empty: ask the workers' ``/v1/models``.
    :param model_map: ``(pattern, model)`` pairs: a requested model matching
        ``pattern`` (fnmatch) is sent as ``model``; the first match wins.
    :param lora_adapters: model names that select a LoRA adapter on the workers
        (vLLM's ``--lora-modules NAME=PATH``). Requests for them are hashed with
        the adapter's name, as the engines salt an adapter's KV blocks with it,
        so they match the blocks the workers report. Adapters the workers'
        ``/v1/models`` list (entries with a ``parent``) count too.
    :param session_header: the request header naming the agent session.
    :param speculative_prefill: warm every session's next turn after each
        response, as if each request carried ``X-Kvroute-Speculative-Prefill``.
    :param max_body_size: larger request bodies are refused with 413.
    :param retries: extra attempts on other workers after a worker fails
        before any byte reached the client.
    :param connect_timeout: seconds to connect to a worker.
    :param read_timeout: seconds without a byte from a worker before it counts as failed.
    :param tokenize_timeout: seconds for a tokenize / render call.
    :param health_interval: seconds between health checks of every worker.
    :param health_timeout: seconds a health check may take.
    :param unhealthy_after: consecutive failed health checks that mark a worker unhealthy
        (a connection error on a request marks it at once).
    :param scrape_metrics: read each worker's ``/metrics`` (waiting requests,
        KV usage) with every health check.
    :param events_format: the KV-event wire format of workers that name none
        (``"vllm"``, ``"sglang"``, ``"trtllm"``: any registered ZMQ format). An
        http(s) events endpoint is polled as ``trtllm-serve``'s
        ``/kv_cache_events`` (see :mod:`kvroute.proxy.event_sources`).
    :param upstream_api_key: sent to workers as ``Authorization: Bearer``
        (default: the client's ``Authorization`` is passed on).
    :param workers_file: a JSON or YAML list of workers, read at start and
        reloaded when it changes (:mod:`kvroute.fleet.files`).
    :param workers_file_interval: seconds between looks at ``workers_file``.
    :param worker_dns: DNS names whose every address is a worker
        (:class:`~kvroute.fleet.dns.DnsName`, or ``HOST:PORT[=EVENTS_PORT[,REPLAY_PORT]]``
        strings, parsed here).
    :param worker_dns_interval: seconds between resolutions of ``worker_dns``.
    :param admin_token: enables the admin API (``/admin/workers``) for
        requests bearing this token (None: no admin API).
    :param drain_timeout: seconds a draining worker's requests in flight may
        take before it is removed anyway.
    :param max_sessions: agent sessions whose cache_control pin (and warm-up
        plan) the router keeps; past it the least recently used go
        (``RouterConfig.max_sessions``).
    :raises ValueError: an option out of range, or no source of workers at all.
    """

    workers: Sequence[WorkerSpec] = ()
    block_size: int = 16
    policy: str = "kvroute"
    tokenizer: str | None = None
    chat_template: str | None = None
    image_placeholder: str | None = None
    tokenize_with: TokenizeWith = "auto"
    models: Sequence[str] = ()
    model_map: Sequence[tuple[str, str]] = ()
    lora_adapters: Sequence[str] = ()
    session_header: str = "X-Session-Id"
    speculative_prefill: bool = False
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    retries: int = 2
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    tokenize_timeout: float = 30.0
    health_interval: float = 2.0
    health_timeout: float = 2.0
    unhealthy_after: int = 2
    scrape_metrics: bool = True
    events_format: str = "vllm"
    upstream_api_key: str | None = field(default=None, repr=False)
    # -- workers at run time (kvroute.proxy.fleet, kvroute.proxy.admin) --
    workers_file: str | None = None
    workers_file_interval: float = 2.0
    worker_dns: Sequence[DnsName] = ()
    worker_dns_interval: float = 10.0
    admin_token: str | None = field(default=None, repr=False)
    drain_timeout: float = 600.0
    # -- the router's per-session state (issue 16): bounded --
    max_sessions: int = 100_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", tuple(self.workers))
        self._check_fleet()
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "model_map", tuple(tuple(p) for p in self.model_map))
        object.__setattr__(self, "lora_adapters", tuple(self.lora_adapters))
        if not all(isinstance(w, WorkerSpec) for w in self.workers):
            raise TypeError("workers must be WorkerSpec objects (see parse_worker)")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.tokenize_with not in ("auto", "local", "render", "tokenize"):
            raise ValueError(f"unknown tokenize_with {self.tokenize_with!r}")
        if self.tokenize_with == "local" and self.tokenizer is None:
            raise ValueError("tokenize_with='local' needs a tokenizer")
        if self.max_body_size < 1 or self.retries < 0 or self.unhealthy_after < 1:
            raise ValueError("max_body_size and unhealthy_after must be >= 1, retries >= 0")
        for name in (
            "connect_timeout",
            "read_timeout",
            "tokenize_timeout",
            "health_interval",
            "health_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        check_event_sources(self)
        if not self.session_header.strip():
            raise ValueError("session_header must not be empty")
        if isinstance(self.max_sessions, bool) or not isinstance(self.max_sessions, int) or (
            self.max_sessions < 1
        ):
            raise ValueError(f"max_sessions must be an int >= 1, got {self.max_sessions!r}")
        for name in self.lora_adapters:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a LoRA adapter name must be a non-empty string, not {name!r}")

    def _check_fleet(self) -> None:
        """Validate (and normalize) the workers-at-run-time block."""
        dns = tuple(parse_worker_dns(d) if isinstance(d, str) else d for d in self.worker_dns)
        if not all(isinstance(d, DnsName) for d in dns):
            raise TypeError("worker_dns must hold DnsName objects or HOST:PORT strings")
        object.__setattr__(self, "worker_dns", dns)
        if self.workers_file is not None:
            object.__setattr__(self, "workers_file", os.fspath(self.workers_file))
        token = self.admin_token
        if token is not None and (
            not isinstance(token, str) or not token or token != token.strip()
        ):
            raise ValueError("admin_token must be a non-empty string without surrounding spaces")
        for name in ("workers_file_interval", "worker_dns_interval", "drain_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if not (self.workers or self.workers_file or dns or token):
            raise ValueError(
                "at least one worker is needed: give --worker, --workers-file or --worker-dns,"
                " or --admin-token to add workers through the admin API"
            )

    @property
    def kv_events(self) -> bool:
        """Whether any worker publishes KV events (else the router runs approximate)."""
        return any(w.events_endpoint for w in self.workers)

    @property
    def local_tokenizer(self) -> bool:
        """Whether prompts are tokenized in the proxy."""
        return self.tokenize_with == "local" or (
            self.tokenize_with == "auto" and self.tokenizer is not None
        )

    def map_model(self, model: str) -> str:
        """The model name to send for a requested ``model`` (unchanged when nothing matches).

        >>> ProxyConfig([WorkerSpec("http://w")], model_map=[("claude-*", "qwen")]).map_model(
        ...     "claude-sonnet-4-5")
        'qwen'
        """
        for pattern, target in self.model_map:
            if fnmatch.fnmatchcase(model, pattern):
                return target
        return model

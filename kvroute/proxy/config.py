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
import typing
from collections.abc import Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Final, Literal

from ..config import BusyThreshold, RouterConfig
from ..fleet.dns import DnsName, parse_worker_dns
from ..fleet.spec import WorkerSpec, parse_worker
from ..policies import available_policies, check_policy_params, get_policy
from ..policies.params import coerce
from .event_sources import check_event_sources

__all__ = [
    "ACCESS_LOG_FORMATS",
    "DEFAULT_GC_THRESHOLD",
    "DEFAULT_MAX_BODY_SIZE",
    "ROUTER_SETTINGS",
    "ProxyConfig",
    "TokenizeWith",
    "WorkerSpec",
    "is_secret",
    "parse_model_map",
    "parse_worker",
    "router_settings",
    "secret_field",
]

#: Allocations between young-generation collections once ``kvroute proxy`` serves
#: (Python's own: 700; see :func:`kvroute.proxy.serving.tune_gc`).
DEFAULT_GC_THRESHOLD: Final = 20_000

#: Largest request body accepted by default (32 MiB: a 128k-token prompt with tool output).
DEFAULT_MAX_BODY_SIZE: Final = 32 << 20

#: How prompts are turned into token ids for routing (see :class:`ProxyConfig`).
TokenizeWith = Literal["auto", "local", "render", "tokenize"]


#: Access log line formats: JSON lines, or logfmt ``key=value`` text.
ACCESS_LOG_FORMATS: Final = ("json", "text")

#: The :class:`~kvroute.config.RouterConfig` fields the proxy passes on from
#: ``router`` (``block_size`` and ``max_sessions`` are the proxy's own options;
#: ``kv_events`` follows from the workers' events endpoints).
ROUTER_SETTINGS: Final = tuple(
    f.name
    for f in fields(RouterConfig)
    if f.name not in ("block_size", "kv_events", "disagg", "max_sessions")
)


def secret_field() -> Any:
    """A ``str | None`` field holding a secret (default None).

    A secret is left out of the config's repr, redacted by ``--print-config``,
    and read from the environment as ``KVROUTE_<FIELD NAME>`` (see
    :func:`is_secret`).
    """
    return field(default=None, repr=False, metadata={"secret": True})


def is_secret(f: Field[Any]) -> bool:
    """Whether a :class:`ProxyConfig` field holds a secret (made by :func:`secret_field`,
    or declared ``repr=False``)."""
    return bool(f.metadata.get("secret")) or not f.repr


def router_settings(data: Mapping[str, object]) -> dict[str, object]:
    """Router settings (:data:`ROUTER_SETTINGS`) checked and typed by :class:`RouterConfig`.

    Values may be text (``"10"``, ``"sjf"``, ``"true"``) or typed;
    ``busy_threshold`` is a :class:`~kvroute.config.BusyThreshold` or a mapping
    of its fields (None: no threshold).

    >>> router_settings({"fresh_ttl": "10", "busy_threshold": {"max_active_requests": "8"}})
    {'fresh_ttl': 10.0, 'busy_threshold': BusyThreshold(max_prefill_tokens=None, \
max_active_requests=8, max_waiting_requests=None, max_kv_usage=None)}

    :raises ValueError: an unknown setting or a bad value, named as ``router.NAME``.
    """
    hints = typing.get_type_hints(RouterConfig)
    out: dict[str, object] = {}
    for key, value in data.items():
        what = f"router.{key}"
        if key not in ROUTER_SETTINGS:
            known = ", ".join(ROUTER_SETTINGS)
            raise ValueError(f"{what}: unknown router setting (known: {known})")
        if key == "busy_threshold":
            out[key] = _busy_threshold(value, what)
        else:
            out[key] = coerce(value, hints[key], what)
    try:
        RouterConfig(**out)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ValueError(f"router.{e}") from None
    return out


def _busy_threshold(value: object, what: str) -> BusyThreshold | None:
    if isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    if value is None or isinstance(value, BusyThreshold):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{what}: expected a table of limits, got {value!r}")
    hints = typing.get_type_hints(BusyThreshold)
    limits: dict[str, Any] = {}
    for key, limit in value.items():
        if key not in hints:
            known = ", ".join(hints)
            raise ValueError(f"{what}.{key}: unknown limit (known: {known})")
        limits[key] = coerce(limit, hints[key], f"{what}.{key}")
    try:
        return BusyThreshold(**limits)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}.{e}") from None


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
    :param read_timeout: seconds without a byte from a worker before it counts as failed;
        noticed within a quarter more once the answer's headers came (see
        :mod:`~kvroute.proxy.idle`).
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
        (default: the client's ``Authorization`` is passed on). A secret.
    :param workers_file: a JSON or YAML list of workers, read at start and
        reloaded when it changes (:mod:`kvroute.fleet.files`).
    :param workers_file_interval: seconds between looks at ``workers_file``.
    :param worker_dns: DNS names whose every address is a worker
        (:class:`~kvroute.fleet.dns.DnsName`, or ``HOST:PORT[=EVENTS_PORT[,REPLAY_PORT]]``
        strings, parsed here).
    :param worker_dns_interval: seconds between resolutions of ``worker_dns``.
    :param admin_token: enables the admin API (``/admin/workers``) for
        requests bearing this token (None: no admin API). A secret.
    :param drain_timeout: seconds a draining worker's requests in flight may
        take before it is removed anyway.
    :param policy_params: the routing policy's constructor parameters
        (name -> value, text or typed), checked against its signature and
        typed by it (see :func:`kvroute.policies.check_policy_params`).
    :param router: :class:`~kvroute.config.RouterConfig` settings for the
        router the proxy builds (:data:`ROUTER_SETTINGS`, see :func:`router_settings`).
    :param access_log: where the access log goes: ``"stderr"``, ``"stdout"``,
        a file path (appended to), or ``"off"``.
    :param access_log_format: ``"json"`` (JSON lines) or ``"text"`` (logfmt).
    :param tracing: an OpenTelemetry span per request (needs ``opentelemetry-api``).
    :param eject_after: attempts a worker fails in a row (5xx, broken
        connections or streams) that eject it for a while (0: never); see
        :mod:`~kvroute.proxy.outliers`.
    :param ejection_time: seconds of a worker's first ejection; the n-th lasts n times as long.
    :param max_ejection_time: the longest ejection, in seconds.
    :param max_ejected_percent: the most workers ejected at once, in percent of
        the fleet (one may always be, and never the last usable one).
    :param max_connections: open client connections beyond which a new one is
        refused with 503; see :mod:`~kvroute.proxy.connections`.
    :param header_timeout: seconds a request's headers may take to arrive (else 408).
    :param body_timeout: seconds a request's body may take to arrive, from its headers
        (else 408).
    :param idle_timeout: seconds an idle kept-alive client connection stays open.
    :param max_prompt_tokens: longer prompts are refused with 400
        (``context_length_exceeded``) before they are routed; a token-id
        prompt before its ids are parsed (see :mod:`~kvroute.proxy.bodies`).
        None: no limit (the engines check their own).
    :param deadline: seconds a generation request may take in all, from its
        arrival (None: no deadline); see :mod:`~kvroute.proxy.deadlines`.
    :param max_deadline: the longest deadline a client may set with
        ``X-Kvroute-Deadline`` (or its SDK's ``X-Stainless-Timeout``).
    :param migrations: times a stream whose worker failed mid-way may be
        continued on another worker (0: never); see :mod:`~kvroute.proxy.migration`.
    :param disagg_protocol: in a fleet with ``"prefill"`` / ``"decode"``
        workers, how a request's two legs talk to them: ``"vllm"`` (NIXL's
        ``kv_transfer_params``) or ``"sglang"`` (``bootstrap_*`` fields); see
        :mod:`kvroute.proxy.disagg`.
    :param disagg_local_prefill_tokens: conditional disaggregation: prefill on
        the decode worker when fewer than this many prompt tokens are uncached
        there (or it holds more of the prompt than every prefill worker);
        0: always on a prefill worker. vLLM only (an SGLang decode server
        cannot prefill).
    :param disagg_bootstrap_port: SGLang's bootstrap port of a prefill worker
        whose spec names none (SGLang's default, 8998).
    :param sync_url: ``redis://HOST:PORT/DB``: this proxy is one replica of a
        fleet sharing load, decisions and pins through that Redis / Valkey
        (:mod:`kvroute.fleet.sync`); None: it routes alone.
    :param replica_id: this replica's name in the fleet (default: ``HOST-PID``).
    :param sync_prefix: the prefix of the fleet's Redis keys.
    :param sync_snapshot_interval: seconds between the index snapshots one
        replica writes for replicas that start later (0: none); keep it well
        below the time the engines' replay buffers take to turn over.
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
    upstream_api_key: str | None = secret_field()
    # -- workers at run time (kvroute.proxy.fleet, kvroute.proxy.admin) --
    workers_file: str | None = None
    workers_file_interval: float = 2.0
    worker_dns: Sequence[DnsName] = ()
    worker_dns_interval: float = 10.0
    admin_token: str | None = secret_field()
    drain_timeout: float = 600.0
    # -- policy parameters, router settings, observability (operations)
    policy_params: Mapping[str, object] = field(default_factory=dict)
    router: Mapping[str, Any] = field(default_factory=dict)
    access_log: str = "stderr"
    access_log_format: Literal["json", "text"] = "json"
    tracing: bool = False
    # -- outlier detection (kvroute.proxy.outliers) --
    eject_after: int = 5
    ejection_time: float = 10.0
    max_ejection_time: float = 300.0
    max_ejected_percent: float = 50.0
    # -- client connections (kvroute.proxy.connections) --
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 75.0
    # -- big bodies (kvroute.proxy.bodies) --
    max_prompt_tokens: int | None = None
    # -- deadlines (kvroute.proxy.deadlines) and mid-stream migration (kvroute.proxy.migration) --
    deadline: float | None = None
    max_deadline: float = 3600.0
    migrations: int = 1
    # -- prefill/decode disaggregation (kvroute.proxy.disagg; workers with a role) --
    disagg_protocol: Literal["vllm", "sglang"] = "vllm"
    disagg_local_prefill_tokens: int = 0
    disagg_bootstrap_port: int = 8998
    # -- replica sync (kvroute.fleet.sync) --
    sync_url: str | None = secret_field()  # its URL may hold a password
    replica_id: str | None = None
    sync_prefix: str = "kvroute"
    sync_snapshot_interval: float = 30.0
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
        # -- policy parameters, router settings, observability
        params = dict(self.policy_params)
        if self.policy in available_policies():  # an unknown one fails when the router is built
            try:
                params = check_policy_params(self.policy, params)
                get_policy(self.policy, **params)  # its own range checks
            except (TypeError, ValueError) as e:
                raise ValueError(f"policy_params.{e}") from None
        object.__setattr__(self, "policy_params", MappingProxyType(params))
        object.__setattr__(self, "router", MappingProxyType(router_settings(self.router)))
        if not isinstance(self.access_log, str) or not self.access_log.strip():
            raise ValueError("access_log must be stderr, stdout, off or a file path")
        if self.access_log_format not in ACCESS_LOG_FORMATS:
            raise ValueError(
                f"access_log_format must be 'json' or 'text', not {self.access_log_format!r}"
            )
        self._check_outliers()
        self._check_connections()
        self._check_deadlines()
        self._check_disagg()
        self._check_sync()

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
                "at least one worker is needed: give --worker (or --prefill-worker and"
                " --decode-worker), --workers-file or --worker-dns, or --admin-token to add"
                " workers through the admin API"
            )

    def _check_deadlines(self) -> None:
        if self.deadline is not None and not 0 < self.deadline <= self.max_deadline:
            raise ValueError("deadline must be > 0 and <= max_deadline (or None)")
        if not self.max_deadline > 0:
            raise ValueError("max_deadline must be > 0")
        if self.migrations < 0:
            raise ValueError("migrations must be >= 0")

    def _check_connections(self) -> None:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be >= 1 (or None: no limit)")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        for name in ("header_timeout", "body_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    def _check_outliers(self) -> None:
        if self.eject_after < 0:
            raise ValueError("eject_after must be >= 0")
        if not 0 < self.ejection_time <= self.max_ejection_time:
            raise ValueError("ejection_time must be > 0 and <= max_ejection_time")
        if not 0 <= self.max_ejected_percent <= 100:
            raise ValueError("max_ejected_percent must be within 0..100")

    def _check_disagg(self) -> None:
        if self.disagg_protocol not in ("vllm", "sglang"):
            raise ValueError(
                f"disagg_protocol must be 'vllm' or 'sglang', not {self.disagg_protocol!r}"
            )
        n = self.disagg_local_prefill_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"disagg_local_prefill_tokens must be an int >= 0, got {n!r}")
        port = self.disagg_bootstrap_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"disagg_bootstrap_port must be a port number, not {port!r}")
        roles = {w.role for w in self.workers}
        if self.disagg_protocol == "sglang" and n:
            raise ValueError(
                "disagg_local_prefill_tokens needs disagg_protocol 'vllm': an SGLang decode"
                " server cannot prefill a request alone"
            )
        if roles <= {"both"} or self.workers_file or self.worker_dns or self.admin_token:
            return  # workers that join at run time may complete the fleet
        if not roles & {"prefill", "both"} or not roles & {"decode", "both"}:
            raise ValueError(
                "a disaggregated fleet needs a worker that prefills (--prefill-worker or"
                " --worker) and one that decodes (--decode-worker or --worker)"
            )

    @property
    def disaggregated(self) -> bool:
        """Whether some worker only prefills or only decodes."""
        return any(w.role != "both" for w in self.workers)

    def _check_sync(self) -> None:
        if self.sync_url is not None and not self.sync_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("sync_url must be redis://HOST:PORT/DB (or rediss://, unix://)")
        rid = self.replica_id
        if rid is not None and (not rid or any(c.isspace() for c in rid)):
            raise ValueError(f"replica_id must be a name without spaces, not {rid!r}")
        if not self.sync_snapshot_interval >= 0:
            raise ValueError("sync_snapshot_interval must be >= 0")
        if not self.sync_prefix or ":" in self.sync_prefix:
            raise ValueError(f"sync_prefix must be a name without ':', not {self.sync_prefix!r}")

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

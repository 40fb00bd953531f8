"""Where each worker's KV events come from: their format and transport, checked once.

A worker's ``events_endpoint`` names its transport by its scheme:

- ``tcp://`` / ``ipc://`` (any scheme but http): a ZMQ PUB stream in the
  worker's ``events_format`` (its own, else the proxy's default), with its
  ``replay_endpoint`` for gaps (:class:`kvroute.events.ZmqSubscriber`);
- ``http://`` / ``https://``: ``trtllm-serve``'s ``POST /kv_cache_events``,
  polled (:class:`kvroute.events.trtllm_http.HttpEventPoller`), e.g.
  ``http://10.0.0.5:8000/kv_cache_events``. Only the ``"trtllm"`` format is
  served that way, and the endpoint has no replay.

The HTTP endpoint **drains** the engine's event queue: each event reaches one
consumer only. So it cannot serve router replicas, which each need every
event (a replica would index only what it happened to poll first, and the
replicas' indexes would diverge silently): :func:`check_event_sources`
refuses it when the proxy syncs with replicas (``sync_url``).

>>> from kvroute.fleet.spec import WorkerSpec
>>> transport_of("http://10.0.0.5:8000/kv_cache_events"), transport_of("tcp://10.0.0.5:5557")
('http', 'zmq')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal, Protocol

if TYPE_CHECKING:
    from ..fleet.spec import WorkerSpec

__all__ = [
    "HTTP_FORMATS",
    "SINGLE_CONSUMER",
    "Sources",
    "Transport",
    "check_event_sources",
    "check_single_consumer",
    "check_worker_events",
    "transport_of",
    "worker_format",
]

class Sources(Protocol):
    """What these checks read of a :class:`~kvroute.proxy.config.ProxyConfig`."""

    @property
    def workers(self) -> Sequence[WorkerSpec]: ...
    @property
    def events_format(self) -> str: ...
    @property
    def sync_url(self) -> str | None: ...


#: How a worker's KV events reach the proxy.
Transport = Literal["zmq", "http"]

#: Transports whose every event reaches a single consumer.
SINGLE_CONSUMER: Final = frozenset({"http"})

#: The formats an http(s) events endpoint may be polled in.
HTTP_FORMATS: Final = frozenset({"trtllm"})


def transport_of(endpoint: str) -> Transport:
    """The transport an events endpoint names: ``"http"`` for http(s) URLs, else ``"zmq"``."""
    scheme = endpoint.partition("://")[0].lower()
    return "http" if scheme in ("http", "https") else "zmq"


def worker_format(spec: WorkerSpec, default: str) -> str:
    """The KV-event format of ``spec``'s events: its own, else the proxy's ``default``."""
    return spec.events_format if spec.events_format is not None else default


def check_single_consumer(config: Sources) -> None:
    """Refuse a single-consumer events transport together with replica sync.

    Keyed on ``config.sync_url``, set when the proxy runs as one of several
    replicas (:mod:`kvroute.proxy.replicas`).

    :raises ValueError: replica sync is on and some worker's events come over
        a single-consumer transport; the message says which and why.
    """
    for spec in config.workers:
        _refuse_single_consumer(spec, config.sync_url)


def _refuse_single_consumer(spec: WorkerSpec, sync_url: str | None) -> None:
    if sync_url and spec.events_endpoint and transport_of(spec.events_endpoint) in SINGLE_CONSUMER:
        raise ValueError(
            f"worker {spec.label}: its KV events come from {spec.events_endpoint}, which "
            "drains the engine's event queue, so each event reaches one consumer only; "
            f"with replica sync ({sync_url}) every replica needs every event, and each "
            "would index only the events it polled first. Give the worker TensorRT-LLM's "
            "ZMQ stream (KVEventsConfig, tcp://HOST:PORT) instead, or run one replica."
        )


def check_worker_events(
    spec: WorkerSpec, default_format: str, *, sync_url: str | None = None
) -> None:
    """Check one worker's events format and transport (also for a worker joining at run time).

    :param spec: the worker.
    :param default_format: the proxy's ``events_format``, for a worker naming none.
    :param sync_url: the proxy's replica-sync URL, or None.
    :raises ValueError: see :func:`check_event_sources`.
    """
    from ..events.decode import available_formats

    known = available_formats(zmq=True)
    fmt = worker_format(spec, default_format)
    if fmt not in known:
        raise ValueError(
            f"worker {spec.label}: events_format {fmt!r} is not a registered ZMQ event "
            f"format ({', '.join(known)})"
        )
    if spec.events_endpoint and transport_of(spec.events_endpoint) == "http":
        if fmt not in HTTP_FORMATS:
            raise ValueError(
                f"worker {spec.label}: an http(s) events endpoint is polled as trtllm-serve's "
                f"/kv_cache_events; give it events_format 'trtllm', not {fmt!r}"
            )
        if spec.replay_endpoint:
            raise ValueError(
                f"worker {spec.label}: its events come over HTTP ({spec.events_endpoint}), "
                "which has no replay; drop the replay endpoint"
            )
    _refuse_single_consumer(spec, sync_url)


def check_event_sources(config: Sources) -> None:
    """Check every worker's events format and transport (see the module docstring).

    :raises ValueError: an unregistered format (the message lists those that
        are), an http(s) endpoint in a format other than ``"trtllm"`` or with
        a replay endpoint, or a single-consumer transport with replica sync.
    """
    from ..events.decode import available_formats

    known = available_formats(zmq=True)
    if config.events_format not in known:
        raise ValueError(
            f"events_format must be a registered ZMQ event format ({', '.join(known)}), "
            f"not {config.events_format!r}"
        )
    for spec in config.workers:
        check_worker_events(spec, config.events_format)
    check_single_consumer(config)

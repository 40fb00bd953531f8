"""One definition of a worker, whatever names it: a flag, a file, the admin API, DNS, a config.

A :class:`WorkerSpec` is everything the proxy needs to reach one inference
worker and to follow its KV cache: its HTTP base URL, its KV-event endpoints
and their wire format, its role in a prefill/decode-disaggregated fleet, the
SGLang bootstrap port that role needs, and a name for logs and dashboards.

Every way of naming workers produces specs through the two parsers here:
:func:`parse_worker` for the command line's ``URL[=EVENTS[,REPLAY]]`` and
:func:`WorkerSpec.from_mapping` for structured sources (a workers file, a
config file, the admin API's JSON body, a replica's shared membership).
:meth:`WorkerSpec.to_mapping` is the inverse of the latter.

Identity: a worker *is* its normalized URL (scheme, host and port, no
trailing ``/``). Two sources that name the same URL name the same worker;
which one's other fields win is the membership's rule (see the fleet
documentation), never this module's.

>>> spec = parse_worker("http://10.0.0.5:8000=tcp://10.0.0.5:5557,tcp://10.0.0.5:5558")
>>> spec.url, spec.events_endpoint, spec.replay_endpoint, spec.role
('http://10.0.0.5:8000', 'tcp://10.0.0.5:5557', 'tcp://10.0.0.5:5558', 'both')
>>> parse_worker("localhost:8001/").label
'localhost:8001'
>>> w = WorkerSpec.from_mapping({"url": "http://p0:8000", "role": "prefill",
...                              "bootstrap_port": 8998, "name": "p0"})
>>> w.role, w.bootstrap_port, w.label
('prefill', 8998, 'p0')
>>> WorkerSpec.from_mapping(w.to_mapping()) == w
True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final, Literal, get_args
from urllib.parse import urlsplit

__all__ = [
    "ROLES",
    "RUNTIME_ID_BASE",
    "Role",
    "WorkerSpec",
    "normalize_url",
    "parse_worker",
    "runtime_worker_id",
]

#: A worker's part in serving: both prefill and decode, or one of them
#: (a prefill/decode-disaggregated fleet).
Role = Literal["both", "prefill", "decode"]
ROLES: Final[tuple[str, ...]] = get_args(Role)

_FORMAT: Final = re.compile(r"[a-z][a-z0-9_.-]*\Z")

#: Ids of workers that join at run time are at least this (2**52), and below
#: 2**53 so every JSON reader keeps them exact; workers named at start keep
#: their positions 0, 1, ... below it.
RUNTIME_ID_BASE: Final = 1 << 52


def normalize_url(text: str) -> str:
    """A worker's base URL as kvroute keys it: ``http://`` added if absent, no trailing ``/``.

    >>> normalize_url(" 10.0.0.5:8000/ ")
    'http://10.0.0.5:8000'

    :raises ValueError: empty, not http(s), no host, a bad port, or ending in ``/v1``.
    """
    url = text.strip().rstrip("/")
    if not url:
        raise ValueError("the URL is empty")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text.strip()!r} is not an http(s) URL like http://host:8000")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise ValueError(f"{text.strip()!r}: {e}") from None
    if url.endswith("/v1"):
        raise ValueError(f"{text.strip()!r}: give the base URL, without /v1")
    return url


def runtime_worker_id(url: str) -> int:
    """The id of a worker that joins at run time: the same on every replica, from its URL.

    Every replica derives it alone (no coordination), and a URL always gets
    the same id, so an id never names another worker while that worker's
    blocks may remain in some replica's index. 52 bits of XXH3-64 of the
    normalized URL: collisions are negligible for any real fleet (about
    n**2 / 2**53).

    >>> wid = runtime_worker_id("10.0.0.7:8000/")
    >>> wid == runtime_worker_id("http://10.0.0.7:8000") and RUNTIME_ID_BASE <= wid < 2**53
    True
    """
    import xxhash  # a core dependency; imported here to keep this module stdlib-only at import

    digest = xxhash.xxh3_64_intdigest(normalize_url(url).encode())
    return RUNTIME_ID_BASE | (digest & (RUNTIME_ID_BASE - 1))


def _endpoint(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string like tcp://host:5557, not {value!r}")
    text = value.strip()
    if not text:
        return None
    if "://" not in text:
        raise ValueError(f"{what} {text!r} needs a scheme (tcp://host:port)")
    return text


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker: where it serves, where it publishes KV events, and its role.

    :param url: base URL, e.g. ``http://10.0.0.5:8000`` (no trailing ``/v1``);
        normalized by :func:`normalize_url`. The worker's identity.
    :param events_endpoint: its ZMQ KV-event publisher, e.g. ``tcp://10.0.0.5:5557``,
        or ``trtllm-serve``'s ``http://10.0.0.5:8000/kv_cache_events`` (polled; see
        :mod:`kvroute.proxy.event_sources`).
    :param replay_endpoint: its replay (ROUTER) socket, for events missed in a gap.
    :param events_format: the wire format of its KV events, a registered
        decoder's name (``"vllm"``, ``"sglang"``, ...); None: the proxy's default.
    :param role: ``"both"`` (default), ``"prefill"`` or ``"decode"``.
    :param bootstrap_port: SGLang's disaggregation bootstrap port (prefill workers).
    :param name: a name for logs, metrics and the admin API (default: ``host:port``).
    :raises ValueError, TypeError: a field out of its range or of the wrong type.
    """

    url: str
    events_endpoint: str | None = None
    replay_endpoint: str | None = None
    events_format: str | None = None
    role: Role = "both"
    bootstrap_port: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise TypeError(f"url must be a string, not {self.url!r}")
        object.__setattr__(self, "url", normalize_url(self.url))
        events = _endpoint(self.events_endpoint, "events_endpoint")
        replay = _endpoint(self.replay_endpoint, "replay_endpoint")
        if replay is not None and events is None:
            raise ValueError("a replay_endpoint needs an events_endpoint")
        object.__setattr__(self, "events_endpoint", events)
        object.__setattr__(self, "replay_endpoint", replay)
        fmt = self.events_format
        if fmt is not None and (not isinstance(fmt, str) or not _FORMAT.match(fmt)):
            raise ValueError(f"events_format must be a decoder name like 'vllm', not {fmt!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        port = self.bootstrap_port
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
        ):
            raise ValueError(f"bootstrap_port must be a port number in 1..65535, not {port!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"name must be a non-empty string, not {self.name!r}")

    @property
    def label(self) -> str:
        """The worker's name, else its ``host:port``: what logs and metrics show."""
        if self.name is not None:
            return self.name
        return urlsplit(self.url).netloc

    @property
    def host(self) -> str:
        """The host part of :attr:`url` (SGLang's ``bootstrap_host``)."""
        host = urlsplit(self.url).hostname
        assert host is not None  # normalize_url checked it
        return host

    def with_defaults(self, *, events_format: str) -> WorkerSpec:
        """This spec with ``events_format`` filled in where it names none."""
        if self.events_format is not None:
            return self
        return replace(self, events_format=events_format)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> WorkerSpec:
        """A spec from a mapping (a workers file's entry, a config table, a JSON body).

        Keys are the field names; ``events`` and ``replay`` are accepted as
        short names for the endpoints. Unknown keys are refused, naming them.

        >>> WorkerSpec.from_mapping({"url": "w:8000", "events": "tcp://w:5557"}).events_endpoint
        'tcp://w:5557'
        >>> WorkerSpec.from_mapping({"url": "w:8000", "port": 1})
        Traceback (most recent call last):
        ...
        ValueError: worker 'w:8000': unknown key 'port' (known: url, events_endpoint, ...)

        :raises ValueError, TypeError: no ``url``, an unknown key, a bad value.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a worker must be a mapping with a 'url', not {data!r}")
        known = [f.name for f in fields(cls)]
        aliases = {"events": "events_endpoint", "replay": "replay_endpoint"}
        kwargs: dict[str, Any] = {}
        url = data.get("url")
        who = f"worker {url!r}" if url is not None else f"worker {dict(data)!r}"
        for key, value in data.items():
            name = aliases.get(key, key)
            if name not in known:
                raise ValueError(f"{who}: unknown key {key!r} (known: {', '.join(known[:2])}, ...)")
            if name in kwargs:
                raise ValueError(f"{who}: {name!r} given twice")
            kwargs[name] = value
        if "url" not in kwargs:
            raise ValueError(f"{who}: 'url' is missing")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{who}: {e}") from None

    def to_mapping(self) -> dict[str, Any]:
        """The spec as a JSON-ready mapping, fields left at their defaults omitted."""
        out: dict[str, Any] = {"url": self.url}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "url" and value != f.default:
                out[f.name] = value
        return out


def parse_worker(text: str, *, role: Role = "both") -> WorkerSpec:
    """Parse the command line's ``URL[=EVENTS_ENDPOINT[,REPLAY_ENDPOINT]]``.

    A URL without a scheme gets ``http://``; a trailing ``/`` is dropped.

    :param role: the role the flag gives (``--prefill-worker`` gives ``"prefill"``).
    :raises ValueError: an empty URL, a URL that is not http(s), a host
        missing, or a replay endpoint without an events endpoint.
    """
    url, sep, events = text.strip().partition("=")
    ev: str | None = None
    replay: str | None = None
    if sep:
        ev_text, _, replay_text = events.partition(",")
        ev = ev_text.strip() or None
        replay = replay_text.strip() or None
        if ev is None:
            raise ValueError(f"worker {text!r}: '=' must be followed by an events endpoint")
    try:
        return WorkerSpec(url, ev, replay, role=role)
    except (ValueError, TypeError) as e:
        raise ValueError(f"worker {text!r}: {e}") from None

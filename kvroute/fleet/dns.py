"""Workers found in DNS: every address of a name is a worker (a Kubernetes headless Service).

``--worker-dns HOST:PORT[=EVENTS_PORT[,REPLAY_PORT]]`` names a DNS name whose
every A and AAAA record is one worker: ``http://IP:PORT``, with its KV events
at ``tcp://IP:EVENTS_PORT`` and its replay socket at ``tcp://IP:REPLAY_PORT``
when those ports are given. A Kubernetes headless Service (``clusterIP:
None``) answers exactly that: one record per ready pod.

:class:`DnsDiscovery` resolves its names every ``interval`` seconds and
claims what it finds in a :class:`~kvroute.fleet.membership.Membership`
under the source ``"dns"``: a new address is claimed, an address gone takes
its claim back through :meth:`~kvroute.fleet.membership.Membership.drain`
(a pod leaving the Service finishes its requests in flight, then leaves). A
name that fails to resolve keeps the addresses it last had (one warning), so
a resolver hiccup never empties the fleet; a Service scaled to zero keeps
its last workers until their health checks take them out.

>>> name = parse_worker_dns("vllm.default.svc:8000=5557,5558")
>>> [s.url for s in name.specs(["10.1.0.4", "fd00::7"])]
['http://10.1.0.4:8000', 'http://[fd00::7]:8000']
>>> name.specs(["10.1.0.4"])[0].replay_endpoint
'tcp://10.1.0.4:5558'
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from .membership import Membership
from .spec import WorkerSpec

__all__ = ["DnsDiscovery", "DnsName", "Resolver", "parse_worker_dns", "resolve_addresses"]

log = logging.getLogger("kvroute.fleet")

#: Resolves a host name to its addresses (IPv4 and IPv6, as strings).
Resolver = Callable[[str], Awaitable[Iterable[str]]]


def _port(text: str, what: str, whole: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"worker DNS {whole!r}: {what} {text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"worker DNS {whole!r}: {what} {port} is not in 1..65535")
    return port


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address else address


@dataclass(frozen=True, slots=True)
class DnsName:
    """A DNS name whose every address is a worker.

    :param host: the name to resolve (or an address).
    :param port: the workers' HTTP port.
    :param events_port: their KV-event publisher port, or None.
    :param replay_port: their replay port, or None (needs ``events_port``).
    :param scheme: ``"http"`` or ``"https"``.
    """

    host: str
    port: int
    events_port: int | None = None
    replay_port: int | None = None
    scheme: str = "http"

    def __str__(self) -> str:
        out = f"{_bracket(self.host)}:{self.port}"
        if self.scheme != "http":
            out = f"{self.scheme}://{out}"
        if self.events_port is not None:
            out += f"={self.events_port}"
            if self.replay_port is not None:
                out += f",{self.replay_port}"
        return out

    def spec(self, address: str) -> WorkerSpec:
        """The worker at ``address``."""
        a = _bracket(address)
        events = None if self.events_port is None else f"tcp://{a}:{self.events_port}"
        replay = None if self.replay_port is None else f"tcp://{a}:{self.replay_port}"
        return WorkerSpec(f"{self.scheme}://{a}:{self.port}", events, replay)

    def specs(self, addresses: Iterable[str]) -> list[WorkerSpec]:
        """The workers at ``addresses``, in order, each address once."""
        return [self.spec(a) for a in dict.fromkeys(addresses)]


def parse_worker_dns(text: str) -> DnsName:
    """Parse ``HOST:PORT[=EVENTS_PORT[,REPLAY_PORT]]`` (``https://`` before HOST for TLS).

    >>> parse_worker_dns("vllm-headless:8000=5557")
    DnsName(host='vllm-headless', port=8000, events_port=5557, replay_port=None, scheme='http')

    :raises ValueError: no port, a bad port, an empty host or another scheme.
    """
    whole = text
    text = text.strip()
    scheme = "http"
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme not in ("http", "https"):
            raise ValueError(f"worker DNS {whole!r}: the scheme must be http or https")
    addr, sep, ports = text.partition("=")
    host, colon, port = addr.rstrip("/").rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host:
        raise ValueError(f"worker DNS {whole!r}: expected HOST:PORT[=EVENTS_PORT[,REPLAY_PORT]]")
    events = replay = None
    if sep:
        ev, _, rp = ports.partition(",")
        events = _port(ev.strip(), "events port", whole)
        if rp.strip():
            replay = _port(rp.strip(), "replay port", whole)
    return DnsName(host, _port(port.strip(), "port", whole), events, replay, scheme)


async def resolve_addresses(host: str) -> list[str]:
    """Every address (IPv4 and IPv6) ``host`` resolves to, through the system resolver.

    :raises OSError: the name does not resolve (``socket.gaierror``).
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class DnsDiscovery:
    """DNS names whose addresses a membership follows, under the source ``"dns"``.

    Use from one event loop.

    :param names: the names to resolve.
    :param membership: where their workers are claimed.
    :param interval: seconds between resolutions in :meth:`run`.
    :param resolver: resolves a name to addresses (default:
        :func:`resolve_addresses`, the system's ``getaddrinfo`` off the loop).
    :raises ValueError: ``interval`` is not > 0.
    """

    def __init__(
        self,
        names: Sequence[DnsName],
        membership: Membership,
        *,
        interval: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        self.names = tuple(names)
        self.membership = membership
        self.interval = float(interval)
        #: Resolves a name to its addresses.
        self.resolver: Resolver = resolver if resolver is not None else resolve_addresses
        #: Each name's addresses at its last good resolution.
        self.addresses: dict[DnsName, tuple[str, ...]] = {}
        #: The workers found, by URL.
        self.workers: dict[str, WorkerSpec] = {}
        self._failing: set[DnsName] = set()

    async def resolve(self) -> bool:
        """Resolve every name once and claim what changed.

        :returns: True when the workers found changed.
        """
        for name in self.names:
            try:
                found = tuple(dict.fromkeys(await self.resolver(name.host)))
            except (OSError, UnicodeError) as e:
                if name not in self._failing:
                    self._failing.add(name)
                    log.warning("worker DNS %s: cannot resolve (%s); keeping its last %d workers",
                                name, e, len(self.addresses.get(name, ())))  # fmt: skip
                continue
            if name in self._failing:
                self._failing.discard(name)
                log.info("worker DNS %s resolves again", name)
            self.addresses[name] = found
        new: dict[str, WorkerSpec] = {}
        for name in self.names:
            for spec in name.specs(self.addresses.get(name, ())):
                new.setdefault(spec.url, spec)
        if new == self.workers:
            return False
        m = self.membership
        for url, spec in new.items():
            if self.workers.get(url) != spec:
                try:
                    m.add(spec, source="dns")
                except ValueError as e:  # pragma: no cover - a 52-bit id collision
                    log.error("worker DNS: %s", e)
        for url in self.workers.keys() - new.keys():
            member = m.by_url(url)
            if member is not None:
                m.drain(member.id, source="dns")
        self.workers = new
        return True

    async def run(self) -> None:
        """Resolve every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.resolve()
            except Exception:  # a bug here must not stop discovery
                log.exception("worker DNS: resolution round failed")

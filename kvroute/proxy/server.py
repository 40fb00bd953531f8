"""Run a :class:`~kvroute.proxy.app.ProxyApp` on a background thread (tests, notebooks, embedding).

>>> from kvroute.proxy import ProxyConfig, ProxyServer, parse_worker
>>> server = ProxyServer(ProxyConfig([parse_worker("http://127.0.0.1:9")]))
>>> server.url                      # the port is known once started
Traceback (most recent call last):
...
RuntimeError: the proxy is not running
"""

from __future__ import annotations

import logging
from types import TracebackType

from aiohttp import web

from .._serve import ServerThread
from ..events.metrics import Metrics
from ..router import Router
from .app import ProxyApp
from .config import ProxyConfig
from .connections import GuardedSite, server_options
from .serving import start_line
from .tokenize import LocalTokenizer

__all__ = ["ProxyServer"]

log = logging.getLogger("kvroute.proxy")


class ProxyServer:
    """The proxy listening on ``host:port``, served by its own thread and event loop.

    ``start()`` returns once the proxy listens (its first health round done);
    ``stop()`` closes the listener, the upstream connections, the health
    checker and the event subscriber, then joins the thread.

    :param config: the proxy's configuration.
    :param host: the address to listen on.
    :param port: the port (0: a free one, kept across restarts).
    :param router: passed to :class:`ProxyApp`.
    :param metrics: passed to :class:`ProxyApp`.
    :param tokenizer: passed to :class:`ProxyApp`.
    """

    def __init__(
        self,
        config: ProxyConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        router: Router | None = None,
        metrics: Metrics | None = None,
        tokenizer: LocalTokenizer | None = None,
    ) -> None:
        #: The proxy (router, metrics, worker pool).
        self.proxy = ProxyApp(config, router=router, metrics=metrics, tokenizer=tokenizer)
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._thread = ServerThread("kvroute-proxy", self._startup, self._shutdown)

    @property
    def router(self) -> Router:
        """The proxy's router."""
        return self.proxy.router

    @property
    def port(self) -> int:
        """The port it listens on.

        :raises RuntimeError: before the first start with ``port=0``.
        """
        if not self._port:
            raise RuntimeError("the proxy is not running")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ProxyServer:
        """Start serving; return once listening.

        :raises RuntimeError: already running.
        :raises OSError: the port is taken.
        """
        if self._thread.running:
            raise RuntimeError("the proxy is already running")
        self._thread.start(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving and join the thread. Idempotent."""
        self._thread.stop(timeout)

    async def _startup(self) -> None:
        options = server_options(self.proxy.config)
        runner = web.AppRunner(
            self.proxy.make_app(), access_log=None, shutdown_timeout=1.0, **options
        )
        await runner.setup()
        self._runner = runner
        site = GuardedSite(runner, self.host, self._port, self.proxy.connections)
        await site.start()
        self._port = site.port
        log.info("%s", start_line(self.proxy, self.url))

    async def _shutdown(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

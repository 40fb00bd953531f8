"""Run a :class:`~kvroute.proxy.app.ProxyApp` on a background thread (tests, notebooks, embedding).

>>> from kvroute.proxy import ProxyConfig, ProxyServer, parse_worker
>>> server = ProxyServer(ProxyConfig([parse_worker("http://127.0.0.1:9")]))
>>> server.url                      # the port is known once started
Traceback (most recent call last):
...
RuntimeError: the proxy is not running
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from types import TracebackType
from typing import cast

from aiohttp import web

from .._aio import OwningLoop, close_loop
from ..events.metrics import Metrics
from ..router import Router
from .app import ProxyApp
from .config import ProxyConfig
from .tokenize import LocalTokenizer

__all__ = ["ProxyServer"]


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
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

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
        if self._thread is not None:
            raise RuntimeError("the proxy is already running")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._main, args=(ready,), name="kvroute-proxy", daemon=True
        )
        self._thread = thread
        thread.start()
        try:
            ready.result(timeout)
        except BaseException:
            self._signal_stop()
            thread.join(timeout)
            self._thread = None
            raise
        return self

    def _signal_stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving and join the thread. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._signal_stop()
        thread.join(timeout)
        self._thread = None

    def _main(self, ready: concurrent.futures.Future[None]) -> None:
        loop = OwningLoop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
        finally:
            self._loop = None
            close_loop(loop)

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.proxy.make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._port)
            await site.start()
            self._port = site.port
            ready.set_result(None)
            await self._stop.wait()
        finally:
            await runner.cleanup()
            # a client connection aiohttp let go of without closing: a stopped proxy closes it
            cast(OwningLoop, asyncio.get_running_loop()).abort_all()

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

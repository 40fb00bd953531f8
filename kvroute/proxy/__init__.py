"""``kvroute.proxy``: an OpenAI- and Anthropic-compatible routing proxy built on aiohttp.

>>> from kvroute.proxy import ProxyConfig, ProxyServer, parse_worker
>>> config = ProxyConfig([parse_worker("http://10.0.0.5:8000"), parse_worker("10.0.0.6:8000")])
>>> [w.url for w in config.workers]
['http://10.0.0.5:8000', 'http://10.0.0.6:8000']

Run it with ``python -m kvroute proxy --worker URL ...``, or in-process with
:class:`ProxyServer` (a background thread) or :meth:`ProxyApp.make_app`
(an aiohttp application to serve as you like). Needs ``aiohttp`` and
``prometheus_client``; ``tokenizers`` and ``jinja2`` for local tokenizing;
``pyzmq`` and ``msgspec`` for KV events. The core library never imports it.

Names are imported on first use, so ``kvroute``'s command line (which reads
:mod:`kvroute.proxy.cli` for its parser) does not load aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .app import ProxyApp
    from .config import (
        DEFAULT_MAX_BODY_SIZE,
        ProxyConfig,
        TokenizeWith,
        WorkerSpec,
        parse_model_map,
        parse_worker,
    )
    from .errors import ProxyError
    from .hints import (
        HEADER_CACHE_TTL,
        HEADER_EXPECTED_OUTPUT,
        HEADER_PRIORITY,
        HEADER_SPECULATIVE,
        Hints,
        Usage,
    )
    from .relay import CACHE_SOURCE_HEADER, PREDICTED_HEADER, WORKER_HEADER
    from .server import ProxyServer
    from .tokenize import LocalTokenizer

_WHERE: Final = {
    "CACHE_SOURCE_HEADER": "relay",
    "PREDICTED_HEADER": "relay",
    "WORKER_HEADER": "relay",
    "ProxyApp": "app",
    "DEFAULT_MAX_BODY_SIZE": "config",
    "ProxyConfig": "config",
    "TokenizeWith": "config",
    "WorkerSpec": "config",
    "parse_model_map": "config",
    "parse_worker": "config",
    "ProxyError": "errors",
    "HEADER_CACHE_TTL": "hints",
    "HEADER_EXPECTED_OUTPUT": "hints",
    "HEADER_PRIORITY": "hints",
    "HEADER_SPECULATIVE": "hints",
    "Hints": "hints",
    "Usage": "hints",
    "ProxyServer": "server",
    "LocalTokenizer": "tokenize",
}

__all__ = [
    "CACHE_SOURCE_HEADER",
    "DEFAULT_MAX_BODY_SIZE",
    "HEADER_CACHE_TTL",
    "HEADER_EXPECTED_OUTPUT",
    "HEADER_PRIORITY",
    "HEADER_SPECULATIVE",
    "PREDICTED_HEADER",
    "WORKER_HEADER",
    "Hints",
    "LocalTokenizer",
    "ProxyApp",
    "ProxyConfig",
    "ProxyError",
    "ProxyServer",
    "TokenizeWith",
    "Usage",
    "WorkerSpec",
    "parse_model_map",
    "parse_worker",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())

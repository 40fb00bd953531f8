"""kvroute: KV-cache-aware request routing for vLLM / SGLang fleets, in-process.

The public API is what ``__all__`` lists. ``BlockIndex`` is the compiled
index unless the extension is missing or ``KVROUTE_NO_EXTENSIONS`` is set, in
which case its pure-Python twin (same API, same results) is used.
"""

from __future__ import annotations

from ._compat import NO_EXTENSIONS
from ._convert import TIERS

if NO_EXTENSIONS:  # pragma: no cover - exercised by the KVROUTE_NO_EXTENSIONS run
    from ._index_py import MAX_COPIES, BlockIndex
else:
    try:
        from ._index import MAX_COPIES, BlockIndex
    except ImportError:  # pragma: no cover - a broken build; tests/test_build.py catches it
        from ._index_py import MAX_COPIES, BlockIndex

from .hashing import kvroute_block_hashes
from .policies import (
    Candidates,
    Choice,
    Features,
    RoutingPolicy,
    available_policies,
    get_policy,
    register_policy,
)
from .request import CacheControl, Decision, Request, WarmupPlan
from .router import BusyThreshold, NoWorkerAvailable, Router, RouterConfig

__version__ = "0.1.0"

__all__ = [
    "MAX_COPIES",
    "TIERS",
    "BlockIndex",
    "BusyThreshold",
    "CacheControl",
    "Candidates",
    "Choice",
    "Decision",
    "Features",
    "NoWorkerAvailable",
    "Request",
    "Router",
    "RouterConfig",
    "RoutingPolicy",
    "WarmupPlan",
    "__version__",
    "available_policies",
    "get_policy",
    "kvroute_block_hashes",
    "register_policy",
]

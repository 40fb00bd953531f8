"""kvroute: KV-cache-aware request routing for vLLM / SGLang fleets, in-process.

The public API is what ``__all__`` lists. ``BlockIndex`` is the compiled
index unless ``KVROUTE_NO_EXTENSIONS`` is set or the extension failed to
import, in which case its pure-Python twin (same API, same results, much
slower) is used; :data:`USE_EXTENSIONS` says which. A failed import also
warns (:class:`kvroute._compat.ExtensionWarning`), once for all the cores.

Importing kvroute costs numpy and xxhash only: the engine event layer
(:mod:`kvroute.events`), the proxy, the simulator and the benchmark are
subpackages imported on demand.
"""

from __future__ import annotations

from . import _compat
from ._compat import USE_EXTENSIONS
from ._convert import TIERS
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

# the compiled index, or its twin (kvroute._compat decides, once)
BlockIndex = _compat.index.BlockIndex
MAX_COPIES = _compat.index.MAX_COPIES

__version__ = "0.1.0"

__all__ = [
    "MAX_COPIES",
    "TIERS",
    "USE_EXTENSIONS",
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

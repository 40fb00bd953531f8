"""The fleet around a router: the definition of a worker, membership, and router replicas.

:mod:`kvroute.fleet.spec` is the one definition of a worker that every way
of naming one produces; :mod:`kvroute.fleet.sync` shares a router's state
with its replicas through Redis or Valkey (the ``fleet`` extra). Importing
this package costs nothing beyond the standard library.
"""

from .spec import (
    ROLES,
    RUNTIME_ID_BASE,
    Role,
    WorkerSpec,
    normalize_url,
    parse_worker,
    runtime_worker_id,
)

__all__ = [
    "ROLES",
    "RUNTIME_ID_BASE",
    "Role",
    "WorkerSpec",
    "normalize_url",
    "parse_worker",
    "runtime_worker_id",
]

"""The fleet around a router: the definition of a worker, its membership, and router replicas.

:mod:`kvroute.fleet.spec` is the one definition of a worker that every way
of naming one produces; :mod:`kvroute.fleet.membership` holds the fleet's
workers, who named them and which are draining; :mod:`kvroute.fleet.files`
and :mod:`kvroute.fleet.dns` are two of those ways. :mod:`kvroute.fleet.sync`
shares a router's state (and, through :mod:`kvroute.fleet.share`, its
membership) with its replicas through Redis or Valkey (the ``fleet`` extra).
Importing this package costs nothing beyond the standard library.
"""

from .membership import Member, Membership, MembershipChange
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
    "Member",
    "Membership",
    "MembershipChange",
    "Role",
    "WorkerSpec",
    "normalize_url",
    "parse_worker",
    "runtime_worker_id",
]

"""The fleet around a router: the definition of a worker, and (later) membership and replicas.

:mod:`kvroute.fleet.spec` is the one definition of a worker that every way
of naming one produces. Importing this package costs nothing beyond the
standard library.
"""

from .spec import ROLES, Role, WorkerSpec, normalize_url, parse_worker

__all__ = ["ROLES", "Role", "WorkerSpec", "normalize_url", "parse_worker"]

# The compiled router kernels have exactly the twin's API; mypy reads it from the twin.
from ._route_py import ActivePrefixes as ActivePrefixes
from ._route_py import ActiveRequest as ActiveRequest
from ._route_py import FreshDecisions as FreshDecisions
from ._route_py import LoadArrays as LoadArrays
from ._route_py import chained_common_prefix as chained_common_prefix
from ._route_py import common_prefix as common_prefix
from ._route_py import fresh_overlay as fresh_overlay
from ._route_py import kvroute_costs as kvroute_costs
from ._route_py import kvroute_step as kvroute_step

__all__ = [
    "ActivePrefixes",
    "ActiveRequest",
    "FreshDecisions",
    "LoadArrays",
    "chained_common_prefix",
    "common_prefix",
    "fresh_overlay",
    "kvroute_costs",
    "kvroute_step",
]

# The compiled index has exactly the twin's API; mypy reads it from the twin.
from ._index_py import MAX_COPIES as MAX_COPIES
from ._index_py import TIERS as TIERS
from ._index_py import BlockIndex as BlockIndex

__all__ = ["MAX_COPIES", "TIERS", "BlockIndex"]

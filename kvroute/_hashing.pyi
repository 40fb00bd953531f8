"""Types of the compiled block hasher: the same API as its pure-Python twin."""

from ._hashing_py import XXH3_SEED as XXH3_SEED
from ._hashing_py import block_hashes as block_hashes
from ._hashing_py import chained_block_hashes as chained_block_hashes
from ._hashing_py import check_block_size as check_block_size
from ._hashing_py import sequence_hashes as sequence_hashes
from ._hashing_py import token_ids_array as token_ids_array
from ._hashing_py import xxh3_64 as xxh3_64

__all__ = [
    "XXH3_SEED",
    "block_hashes",
    "chained_block_hashes",
    "check_block_size",
    "sequence_hashes",
    "token_ids_array",
    "xxh3_64",
]

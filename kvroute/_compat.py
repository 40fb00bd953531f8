"""Decide once whether the compiled cores are used."""

import os
import platform

#: True when the pure-Python twins must be used: the user asked for it with
#: KVROUTE_NO_EXTENSIONS, or this is not CPython (the Cython modules are CPython-only).
NO_EXTENSIONS: bool = bool(os.environ.get("KVROUTE_NO_EXTENSIONS")) or (
    platform.python_implementation() != "CPython"
)

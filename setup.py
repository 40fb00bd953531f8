"""Build the compiled cores with Cython unless KVROUTE_NO_EXTENSIONS is set.

KVROUTE_DEBUG_BUILD=1 turns on bounds checks and builds with -O0 -g.
"""

import os

from setuptools import Extension, setup

NO_EXTENSIONS = bool(os.environ.get("KVROUTE_NO_EXTENSIONS"))
DEBUG = bool(os.environ.get("KVROUTE_DEBUG_BUILD"))

ext_modules = []
if not NO_EXTENSIONS:
    from Cython.Build import cythonize

    # No fused multiply-add: kvroute/_route.pyx's cost arithmetic must round
    # exactly as its numpy twin does (aarch64 compilers contract by default).
    cflags = (["-O0", "-g"] if DEBUG else ["-O3"]) + ["-ffp-contract=off"]
    directives = {
        "language_level": 3,
        "embedsignature": True,
        "wraparound": False,
        "boundscheck": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": True,
    }
    ext_modules = cythonize(
        [
            Extension("kvroute._index", ["kvroute/_index.pyx"], extra_compile_args=cflags),
            Extension("kvroute._hashing", ["kvroute/_hashing.pyx"], extra_compile_args=cflags),
            Extension("kvroute._route", ["kvroute/_route.pyx"], extra_compile_args=cflags),
        ],
        compiler_directives=directives,
    )

setup(ext_modules=ext_modules)

"""Build the compiled hot path (trisocks.wire._relay) with Cython.

pyproject.toml holds the metadata; this file only declares the extension so
that `pip install .` compiles src/trisocks/wire/_relay.pyx.  Set
TRISOCKS_NO_EXTENSION=1 to build a pure-Python install (the package then runs
its reference implementation, trisocks.wire._relay_py).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("TRISOCKS_NO_EXTENSION") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "trisocks.wire._relay",
                ["src/trisocks/wire/_relay.pyx"],
                extra_compile_args=["-O3"],
            )
        ],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )

setup(ext_modules=ext_modules)

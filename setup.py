"""Build the compiled hot path (trisocks._relay) with Cython.

pyproject.toml holds the metadata; this file only declares the extension so
that `pip install .` compiles src/trisocks/_relay.pyx.  Set
TRISOCKS_NO_EXTENSION=1 to build a pure-Python install (the package then runs
its reference implementation, trisocks._relay_py).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("TRISOCKS_NO_EXTENSION") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "trisocks._relay",
                ["src/trisocks/_relay.pyx"],
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

"""Build the compiled hot path (trisocks.wire._relay) with Cython, or do without it.

pyproject.toml holds the metadata; this file only declares the extension so that
`pip install .` (or of the sdist, or `make dist`) compiles src/trisocks/wire/_relay.pyx.

- The sdist carries both the .pyx and the C file Cython generated from it when the sdist was
  made, and a build from the sdist compiles that C as it is: the same C as the wheel of the
  release, and no Cython run at install time. A build from a checkout (no PKG-INFO beside
  this file) runs Cython on the .pyx, as does one from an sdist whose .c is missing.
- When the extension cannot be built (no C compiler, no Python headers, a compiler error),
  the install goes on without it and prints one line saying so: the package then runs its
  pure-Python twin, trisocks.wire._relay_py (same behaviour, slower), and `trisocks version`
  says "pure hot path". pip shows a build's output only with `pip install -v`.
- TRISOCKS_REQUIRE_COMPILED=1 (as in CI) turns that fallback into a build failure.
- TRISOCKS_NO_EXTENSION=1 builds a pure-Python install on purpose, without a word.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

HERE = os.path.dirname(os.path.abspath(__file__))
PYX = "src/trisocks/wire/_relay.pyx"
C_FILE = "src/trisocks/wire/_relay.c"

# What a missing or failing compiler raises (CompileError and LinkError are CCompilerErrors);
# OSError for a compiler that cannot be started at all.
BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError)


def _required() -> bool:
    return os.environ.get("TRISOCKS_REQUIRE_COMPILED", "") not in ("", "0")


def _extensions():
    """The extension to build, and why it cannot be built (None when it can be tried)."""
    ext = Extension("trisocks.wire._relay", [PYX], extra_compile_args=["-O3"])
    have_c = os.path.exists(os.path.join(HERE, C_FILE))
    if have_c and os.path.exists(os.path.join(HERE, "PKG-INFO")):
        # an sdist: its C as generated when the sdist was made (Cython would regenerate it
        # anyway, since its own freshly installed .pxd files look newer than the .c)
        ext.sources = [C_FILE]
        return [ext], None
    try:
        from Cython.Build import cythonize
    except ImportError:
        if have_c:
            ext.sources = [C_FILE]
            return [ext], None
        return [], "Cython is not installed and there is no generated _relay.c to compile"
    return cythonize(
        [ext],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ), None


class BuildExtOrPure(build_ext):
    """build_ext that, when the compiler is missing or fails, builds no extension instead."""

    cannot_build = None  # set below when the extension cannot even be tried

    def run(self):
        if self.cannot_build:
            self._without_extension(self.cannot_build)
            return
        try:
            super().run()
        except BUILD_ERRORS as exc:
            self._without_extension(self._reason(exc))

    def _reason(self, exc: BaseException) -> str:
        """A few words for the warning: the compiler's command line is too long for one line."""
        cc = getattr(getattr(self, "compiler", None), "compiler_so", None) or ["cc"]
        if isinstance(exc, FileNotFoundError) or "No such file or directory" in str(exc):
            return f"no C compiler: {getattr(exc, 'filename', None) or cc[0]} not found"
        if isinstance(exc, CCompilerError):
            return f"the C compiler {cc[0]} failed"
        return " ".join(str(exc).split()) or type(exc).__name__

    def _without_extension(self, why: str) -> None:
        if _required():
            raise SystemExit(f"trisocks: error: the compiled extension trisocks.wire._relay could "
                             f"not be built ({why}) and TRISOCKS_REQUIRE_COMPILED is set")
        self.extensions = []
        self.distribution.ext_modules = []
        print(f"trisocks: WARNING: compiled extension not built ({why}); installing the pure-Python "
              f"hot path instead (works the same, slower; `trisocks version` says which runs)",
              file=sys.stderr, flush=True)


ext_modules = []
if os.environ.get("TRISOCKS_NO_EXTENSION") != "1":
    ext_modules, BuildExtOrPure.cannot_build = _extensions()
    if BuildExtOrPure.cannot_build:
        # keep a placeholder so that build_ext runs (and says why) and the wheel stays
        # platform-specific like every other build of this package
        ext_modules = [Extension("trisocks.wire._relay", [PYX])]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtOrPure})

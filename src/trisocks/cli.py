"""Command line (placeholder until the tunnel commands land)."""

import sys

from . import IMPLEMENTATION, __version__


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["version"]:
        print(f"trisocks {__version__} ({IMPLEMENTATION} hot path)")
        return 0
    print("usage: trisocks version", file=sys.stderr)
    return 2

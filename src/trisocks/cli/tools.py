"""The small commands: ``trisocks hash-key`` and ``trisocks version``."""

from __future__ import annotations

from .. import IMPLEMENTATION, __version__
from .common import Formatter


def add_parsers(sub) -> None:
    h = sub.add_parser(
        "hash-key", formatter_class=Formatter, help="print the hashed form of a management API key",
        description="Print the hashed form of a management API key, to configure with -k/--api-key "
        "or TRISOCKS_API_KEY so that the plaintext need not sit in a config file. The key is read "
        "from standard input (one line; prompted for on a terminal); with --generate a new random "
        "key is made and printed first.")
    h.add_argument("--scheme", choices=("scrypt", "pbkdf2", "sha256", "bcrypt"), default="scrypt",
                   help="the hash: scrypt and bcrypt are slow on purpose (a guessed key costs time), "
                   "sha256 is not and suits only long random keys")
    h.add_argument("--generate", action="store_true", help="make up a new random key and print it too")

    sub.add_parser("version", help="print the version and which hot path runs")


def version_line() -> str:
    return f"trisocks {__version__} ({IMPLEMENTATION} hot path)"


def cmd_version(args) -> int:
    print(version_line())
    return 0


def cmd_hash_key(args) -> int:
    from ..management.keys import hash_key_command

    return hash_key_command(args.scheme, args.generate)

"""trisocks: a SOCKS5-over-WebSocket tunnel on Trio, wire-compatible with LinkSocks."""

from ._version import __version__
from .wire.codec import IMPLEMENTATION

__all__ = ["__version__", "IMPLEMENTATION"]

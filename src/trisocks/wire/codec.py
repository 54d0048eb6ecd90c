"""Picks the hot-path implementation: the compiled ``_relay`` or its pure twin.

``TRISOCKS_REQUIRE_COMPILED=1`` turns a missing extension into an error (CI
sets it); ``TRISOCKS_PURE=1`` forces the pure-Python reference (for tests and
for comparing the two).
"""

from __future__ import annotations

import os

from .errors import ProtocolError

_require = os.environ.get("TRISOCKS_REQUIRE_COMPILED", "") not in ("", "0")
_force_pure = os.environ.get("TRISOCKS_PURE", "") not in ("", "0")

if _force_pure and _require:
    raise ImportError("TRISOCKS_PURE and TRISOCKS_REQUIRE_COMPILED are both set")

if _force_pure:
    from . import _relay_py as impl
else:
    try:
        from . import _relay as impl
    except ImportError as exc:
        if _require:
            raise ImportError(
                "TRISOCKS_REQUIRE_COMPILED is set but the compiled extension "
                f"trisocks.wire._relay cannot be imported ({exc}); build it with `make build`"
            ) from exc
        from . import _relay_py as impl

IMPLEMENTATION: str = impl.IMPLEMENTATION

Decoder = impl.Decoder
encode_frame = impl.encode_frame
encode_data = impl.encode_data
mask = impl.mask

NEED_DATA = impl.NEED_DATA
DATA = impl.DATA
MESSAGE = impl.MESSAGE
PING = impl.PING
PONG = impl.PONG
CLOSE = impl.CLOSE
TRUNCATED = impl.TRUNCATED

OP_CONT = impl.OP_CONT
OP_TEXT = impl.OP_TEXT
OP_BINARY = impl.OP_BINARY
OP_CLOSE = impl.OP_CLOSE
OP_PING = impl.OP_PING
OP_PONG = impl.OP_PONG

DATA_HEADER = impl.DATA_HEADER
HEADROOM = impl.HEADROOM

__all__ = [
    "IMPLEMENTATION",
    "ProtocolError",
    "Decoder",
    "encode_frame",
    "encode_data",
    "mask",
]

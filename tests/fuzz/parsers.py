"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of the sans-IO parsers.

    FUZZ_TARGET=decoder|protocol|socks5|all .venv/bin/python tests/fuzz/parsers.py -runs=100000
    (any libFuzzer flag works: -max_total_time=60, -seed=1, a corpus directory, ...)

- ``decoder``: the WebSocket Decoder (the pure twin, instrumented for coverage) on the input cut
  into reads of a fuzzed size, masked or not, with a fuzzed message cap. It may only fail with
  ProtocolError, and the compiled Decoder must produce exactly the same trace.
- ``protocol``: ``protocol.parse`` may only raise MessageError; whatever it returns packs
  again (except Unknown bodies), and a Data message's payload never exceeds the decompression cap.
- ``socks5``: the incremental SOCKS5 parsers may only return None (need more), a result with a
  consumed count within the buffer, or raise Socks5Error; ``parse_udp_header`` only the latter.

A crash writes the input to ``crash-<sha1>`` (``-artifact_prefix=DIR/``): rerun the script with
that file as its argument to reproduce it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["trisocks"]):
    from trisocks.wire import _relay_py, protocol, socks5
    from trisocks.wire.errors import MessageError

from tests import codec_helpers as H  # noqa: E402

MAX_DECOMPRESSED = 1 << 16


def fuzz_decoder(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    masked = fdp.ConsumeBool()
    chunk = fdp.ConsumeIntInRange(1, 70000)
    max_message = fdp.PickValueInList([16, 125, 1024, 65536, 32 << 20])
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    pure = H.drive(_relay_py, stream, [chunk], expect_masked=masked, max_message=max_message)
    if pure.error is not None and pure.error[0] != "ProtocolError":
        raise AssertionError(f"pure Decoder raised {pure.error}")
    if H.HAVE_COMPILED:
        compiled = H.drive(H._relay, stream, [chunk], expect_masked=masked, max_message=max_message)
        if (compiled.steps, compiled.error, compiled.ignored) != (pure.steps, pure.error, pure.ignored):
            raise AssertionError(f"compiled and pure Decoders differ:\n compiled {compiled}\n pure {pure}")


def fuzz_protocol(data: bytes) -> None:
    try:
        msg = protocol.parse(data, max_decompressed=MAX_DECOMPRESSED)
    except MessageError:
        return
    if isinstance(msg, protocol.Data) and len(msg.data) > MAX_DECOMPRESSED and data[19:20] == b"\x01":
        raise AssertionError(f"gzip payload inflated to {len(msg.data)} bytes past the cap")
    if not isinstance(msg, protocol.Unknown):
        try:
            protocol.pack(msg)
        except ValueError:
            pass  # lenient parse (e.g. a minor version) may give what pack refuses


def fuzz_socks5(data: bytes) -> None:
    if not data:
        return
    which, buf = data[0] % 6, data[1:]
    parser = [socks5.parse_greeting, socks5.parse_userpass, socks5.parse_request,
              socks5.parse_method_reply, socks5.parse_reply, socks5.parse_udp_header][which]
    view = memoryview(bytearray(buf)) if data[0] & 0x80 else buf
    try:
        result = parser(view)
    except socks5.Socks5Error:
        return
    if which == 5:
        return
    if result is not None:
        consumed = result[-1]
        if not 0 < consumed <= len(buf):
            raise AssertionError(f"{parser.__name__} consumed {consumed} of {len(buf)} bytes")


TARGETS = {"decoder": fuzz_decoder, "protocol": fuzz_protocol, "socks5": fuzz_socks5}


def fuzz_all(data: bytes) -> None:
    if data:
        list(TARGETS.values())[data[0] % 3](data[1:])


def main() -> None:
    name = os.environ.get("FUZZ_TARGET", "all")
    target = fuzz_all if name == "all" else TARGETS[name]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

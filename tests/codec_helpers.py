"""Shared helpers for the codec tests: an independent frame builder, a reference
model of what the decoder must report, a driver that feeds a decoder with a
given chunking, and hypothesis strategies for valid LinkSocks/WebSocket streams.

Nothing here uses the code under test to build inputs: frames are assembled by
hand (``build_frame``) and masked with a reference XOR (``xor_mask``), so the
tests compare the decoders against the model, not against their own encoder.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
from dataclasses import dataclass, field

from hypothesis import strategies as st

from trisocks.wire import _relay_py
from trisocks.wire.errors import ProtocolError

try:
    from trisocks.wire import _relay
except ImportError:
    if os.environ.get("TRISOCKS_REQUIRE_COMPILED", "") not in ("", "0"):
        raise
    _relay = None  # extension not built: the pure twin is tested alone, the differential skips

HAVE_COMPILED = _relay is not None

# The implementations; tests parametrize over this list.
IMPLS = [m for m in (_relay, _relay_py) if m is not None]
IMPL_IDS = [m.IMPLEMENTATION for m in IMPLS]

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

EVENT_NAMES = {
    _relay_py.DATA: "DATA",
    _relay_py.MESSAGE: "MESSAGE",
    _relay_py.PING: "PING",
    _relay_py.PONG: "PONG",
    _relay_py.CLOSE: "CLOSE",
    _relay_py.TRUNCATED: "TRUNCATED",
}

VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, *range(1007, 1015), 3000, 3999, 4000, 4999]


# ---------------------------------------------------------------------------
# Building frames and messages by hand
# ---------------------------------------------------------------------------


def xor_mask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """Reference RFC 6455 masking: byte i is XORed with key[(offset + i) % 4]."""
    return bytes(b ^ key[(offset + i) % 4] for i, b in enumerate(data))


def _xor_fast(data: bytes, key: bytes) -> bytes:
    # Same result as xor_mask(data, key), fast enough for 64 KiB payloads.
    n = len(data)
    if n == 0:
        return b""
    pattern = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pattern, "big")).to_bytes(n, "big")


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask_key: bytes | None = None,
    length_form: str = "min",
    rsv: int = 0,
    declared_length: int | None = None,
) -> bytes:
    """One WebSocket frame, built without the code under test.

    ``length_form`` is "min" (shortest encoding), "7", "16" or "64" (forcing
    that encoding, which may be non-minimal); ``rsv`` goes into bits 4-6 of the
    first byte; ``declared_length`` overrides the length field (the payload is
    still appended as given).
    """
    payload = bytes(payload)
    n = len(payload) if declared_length is None else declared_length
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mbit = 0x80 if mask_key is not None else 0
    if length_form == "min":
        length_form = "7" if n < 126 else "16" if n < 65536 else "64"
    if length_form == "7":
        assert n < 126
        head.append(mbit | n)
    elif length_form == "16":
        assert n < 65536
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    elif length_form == "64":
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    else:
        raise AssertionError(length_form)
    if mask_key is not None:
        assert len(mask_key) == 4
        head += mask_key
        payload = _xor_fast(payload, mask_key)
    return bytes(head) + payload


def data_message(channel: bytes, payload: bytes, *, data_len=None, version=0x01,
                 protocol=0x01, compression=0x00, trailer: bytes = b"") -> bytes:
    """A LinkSocks Data message: ``Version 04 Protocol Channel Compression DataLen Data``,
    then ``trailer``."""
    assert len(channel) == 16
    if data_len is None:
        data_len = len(payload)
    return (bytes([version, 0x04, protocol]) + channel + bytes([compression])
            + struct.pack("!I", data_len) + payload + trailer)


def close_payload(code: int | None = None, reason: bytes = b"") -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + reason


# ---------------------------------------------------------------------------
# The model: which events a correct decoder reports for a stream
# ---------------------------------------------------------------------------


def streams_as_data(body: bytes) -> bool:
    """True when a binary message is a TCP Data message the decoder streams."""
    return (len(body) >= 24 and body[0] >> 4 == 0 and body[1] == 0x04
            and body[2] == 0x01 and body[19] == 0)


@dataclass
class Control:
    opcode: int
    payload: bytes = b""
    mask_key: bytes | None = None


@dataclass
class Message:
    """A data message (text or binary) split into frames, with control frames between them."""

    opcode: int
    body: bytes
    cuts: list[int] = field(default_factory=list)  # fragment boundaries inside body
    between: list[list[Control]] = field(default_factory=list)  # after fragment i (not the last)
    mask_keys: list[bytes | None] = field(default_factory=list)  # one per fragment
    length_forms: list[str] = field(default_factory=list)  # one per fragment

    def fragments(self) -> list[tuple[int, int]]:
        points = [0, *sorted(self.cuts), len(self.body)]
        return list(itertools.pairwise(points))


def render(items, expect_masked: bool) -> bytes:
    """The byte stream for a list of Message/Control items."""
    out = bytearray()
    for item in items:
        if isinstance(item, Control):
            key = _key(item.mask_key, expect_masked)
            out += build_frame(item.opcode, item.payload, mask_key=key)
            continue
        frags = item.fragments()
        for i, (a, b) in enumerate(frags):
            last = i == len(frags) - 1
            key = item.mask_keys[i] if i < len(item.mask_keys) else None
            form = item.length_forms[i] if i < len(item.length_forms) else "min"
            if form == "7" and b - a > 125 or form == "16" and b - a > 65535:
                form = "min"
            out += build_frame(item.opcode if i == 0 else OP_CONT, item.body[a:b], fin=last,
                               mask_key=_key(key, expect_masked), length_form=form)
            if not last and i < len(item.between):
                for ctl in item.between[i]:
                    out += build_frame(ctl.opcode, ctl.payload,
                                       mask_key=_key(ctl.mask_key, expect_masked))
    return bytes(out)


def _key(key, expect_masked):
    if not expect_masked:
        return None
    return key if key is not None else b"\x5a\xa5\x0f\xf0"


def _control_event(ctl: Control):
    if ctl.opcode == OP_PING:
        return ("PING", ctl.payload)
    if ctl.opcode == OP_PONG:
        return ("PONG", ctl.payload)
    if not ctl.payload:
        return ("CLOSE", 1005, "")
    return ("CLOSE", struct.unpack("!H", ctl.payload[:2])[0], ctl.payload[2:].decode("utf-8"))


@dataclass
class Outcome:
    events: list  # normalized: adjacent DATA pieces of one channel merged
    error: ProtocolError | None
    ignored: int


def model(items, max_message: int = 32 << 20) -> Outcome:
    """What a correct decoder reports for ``items`` (all control frames must be valid)."""
    events = []
    ignored = 0
    for item in items:
        if isinstance(item, Control):
            events.append(_control_event(item))
            continue
        body = item.body
        stream = item.opcode == OP_BINARY and streams_as_data(body)
        if stream:
            channel = body[3:19]
            data_len = struct.unpack("!I", body[20:24])[0]
            lo, hi = 24, 24 + min(data_len, len(body) - 24)
        size = 0
        frags = item.fragments()
        for i, (a, b) in enumerate(frags):
            size += b - a
            if size > max_message:
                return Outcome(normalize(events), ProtocolError("message too big", 1009), ignored)
            if i == 0 and item.opcode == OP_TEXT:
                ignored += 1  # counted once its first frame is accepted
            if stream and max(a, lo) < min(b, hi):
                events.append(("DATA", channel, body[max(a, lo):min(b, hi)]))
            if i < len(frags) - 1 and i < len(item.between):
                events.extend(_control_event(c) for c in item.between[i])
        if item.opcode == OP_BINARY:
            if not stream:
                events.append(("MESSAGE", body))
            elif data_len > len(body) - 24:
                events.append(("TRUNCATED", channel))
    return Outcome(normalize(events), None, ignored)


def normalize(events):
    """Merge adjacent DATA pieces of the same channel (piece boundaries depend on chunking)."""
    out = []
    for ev in events:
        if ev[0] == "DATA" and out and out[-1][0] == "DATA" and out[-1][1] == ev[1]:
            out[-1] = ("DATA", ev[1], out[-1][2] + ev[2])
        else:
            out.append(ev)
    return out


# ---------------------------------------------------------------------------
# Driving a decoder
# ---------------------------------------------------------------------------


@dataclass
class Trace:
    """Everything a decoder did for one input: reads, events, the error (if any)."""

    steps: list  # ("READ", free_space, n) and event tuples, in order
    error: tuple | None  # (type name, message, close code, bytes fed) or None
    ignored: int
    fed: int

    def events(self):
        """Event tuples as recorded (with the type of ``.data`` and ``ignored``)."""
        return [s for s in self.steps if s[0] != "READ"]

    def pieces(self):
        """Events in model form but not merged: every DATA piece as the decoder cut it."""
        return [_strip((e[0], *e[1:-1])) for e in self.events()]

    def outcome(self) -> Outcome:
        err = None
        if self.error is not None:
            assert self.error[0] == "ProtocolError", self.error
            err = ProtocolError(self.error[1], self.error[2])
        return Outcome(normalize(self.pieces()), err, self.ignored)


def _strip(ev):
    # events carry (name, ..., type name of .data) for the differential check; drop the type
    if ev[0] in ("DATA", "MESSAGE", "PING", "PONG"):
        return ev[:-1]
    return ev


def describe(mod, d, ev) -> tuple:
    """An event as a comparable tuple (copying the data out of the decoder's buffer)."""
    name = EVENT_NAMES[ev]
    if name == "DATA":
        return (name, d.channel, bytes(d.data), type(d.data).__name__, d.ignored)
    if name in ("MESSAGE", "PING", "PONG"):
        return (name, bytes(d.data), type(d.data).__name__, d.ignored)
    if name == "CLOSE":
        return (name, d.close_code, d.close_reason, d.ignored)
    assert name == "TRUNCATED"
    return (name, d.channel, d.ignored)


def drive(mod, stream: bytes, chunks=(), *, expect_masked: bool, **decoder_kw) -> Trace:
    """Feed ``stream`` to a new ``mod.Decoder`` reading ``chunks[i % len(chunks)]`` bytes at a
    time (everything that fits when ``chunks`` is empty) and record what happens.

    Never raises for a decoder failure: the exception goes into the trace so
    that two implementations can be compared at the point where they fail.
    """
    d = mod.Decoder(expect_masked=expect_masked, **decoder_kw)
    steps = []
    pos = 0
    reads = 0
    error = None
    try:
        while True:
            ev = d.next_event()
            if ev != mod.NEED_DATA:
                steps.append(describe(mod, d, ev))
                continue
            if pos >= len(stream):
                # NEED_DATA is stable: asking again without feeding changes nothing
                if d.next_event() != mod.NEED_DATA:
                    raise AssertionError("NEED_DATA followed by an event without new bytes")
                break
            space = d.get_buffer()
            want = chunks[reads % len(chunks)] if chunks else len(stream)
            n = min(want, len(space), len(stream) - pos)
            assert n > 0, "the decoder buffer is full although it asked for data"
            space[:n] = stream[pos:pos + n]
            d.feed(n)
            steps.append(("READ", len(space), n))
            pos += n
            reads += 1
    except ProtocolError as exc:
        error = ("ProtocolError", exc.reason, exc.close_code, pos)
    except Exception as exc:
        error = (type(exc).__name__, str(exc), None, pos)
    return Trace(steps, error, d.ignored, pos)


def decode(mod, stream: bytes, chunks=(), *, expect_masked: bool, **decoder_kw) -> Outcome:
    """Model-comparable outcome of decoding ``stream`` with ``mod``."""
    return drive(mod, stream, chunks, expect_masked=expect_masked, **decoder_kw).outcome()


def decode_events(mod, stream: bytes, chunks=(), *, expect_masked: bool, **decoder_kw):
    """Events of a stream that must decode without error (raises the ProtocolError otherwise)."""
    out = decode(mod, stream, chunks, expect_masked=expect_masked, **decoder_kw)
    if out.error is not None:
        raise out.error
    return out.events


def decode_error(mod, stream: bytes, chunks=(), *, expect_masked: bool, **decoder_kw):
    """The ProtocolError a stream must cause (fails when there is none)."""
    out = decode(mod, stream, chunks, expect_masked=expect_masked, **decoder_kw)
    assert out.error is not None, f"no error; events {out.events!r}"
    return out.error


# ---------------------------------------------------------------------------
# Hypothesis strategies
# ---------------------------------------------------------------------------

channels = st.binary(min_size=16, max_size=16)
mask_keys = st.binary(min_size=4, max_size=4)


@st.composite
def payloads(draw, max_small=300):
    """Mostly small payloads; now and then one around the 16/64-bit length boundaries."""
    if draw(st.integers(0, 24)) == 0:
        n = draw(st.sampled_from([125, 126, 127, 1023, 1024, 1025,
                                  65511, 65512, 65535, 65536, 70000]))
        seed = draw(st.integers(0, 2**32 - 1))
        return random.Random(seed).randbytes(n)
    return draw(st.binary(max_size=max_small))


@st.composite
def tcp_data_bodies(draw):
    payload = draw(payloads())
    mode = draw(st.sampled_from(["exact", "exact", "trailer", "truncated"]))
    data_len, trailer = len(payload), b""
    if mode == "trailer":
        trailer = draw(st.binary(min_size=1, max_size=40))
    elif mode == "truncated":
        data_len = draw(st.one_of(st.integers(len(payload) + 1, len(payload) + 64),
                                  st.integers(len(payload) + 1, 2**32 - 1)))
    version = draw(st.sampled_from([0x01, 0x01, 0x01, 0x00, 0x02, 0x0F]))
    return data_message(draw(channels), payload, data_len=data_len, version=version,
                        trailer=trailer)


@st.composite
def other_binary_bodies(draw):
    """Binary messages the decoder must deliver whole as MESSAGE."""
    kind = draw(st.sampled_from(["udp", "gzip", "major", "type", "short", "garbage"]))
    ch = draw(channels)
    if kind == "udp":
        addr = draw(st.binary(max_size=20))
        tail = bytes([len(addr)]) + addr + b"\x00\x35" + bytes([len(addr)]) + addr + b"\x13\x88"
        return data_message(ch, draw(st.binary(max_size=200)), protocol=0x02, trailer=tail)
    if kind == "gzip":
        return data_message(ch, draw(st.binary(max_size=200)), compression=0x01)
    if kind == "major":  # a different major version is not ours to stream
        return data_message(ch, draw(st.binary(max_size=50)),
                            version=draw(st.sampled_from([0x10, 0x11, 0xF1])))
    if kind == "type":
        mtype = draw(st.sampled_from([0x01, 0x02, 0x03, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A,
                                      0x0B, 0x0C, 0x0D, 0x0E, 0xFF]))
        return bytes([0x01, mtype]) + draw(st.binary(max_size=80))
    if kind == "short":  # a Data header cut short: fewer than 24 bytes
        full = data_message(ch, b"", data_len=draw(st.integers(0, 2**32 - 1)))
        return full[: draw(st.integers(0, 23))]
    return draw(st.binary(max_size=40))


binary_bodies = st.one_of(tcp_data_bodies(), tcp_data_bodies(), other_binary_bodies())


@st.composite
def close_controls(draw):
    if draw(st.booleans()):
        return Control(OP_CLOSE, b"", draw(mask_keys))
    code = draw(st.one_of(st.sampled_from(VALID_CLOSE_CODES), st.integers(3000, 4999)))
    reason = draw(st.text(max_size=30)).encode("utf-8")[:123]
    reason = reason.decode("utf-8", "ignore").encode("utf-8")  # cut at a character boundary
    return Control(OP_CLOSE, close_payload(code, reason), draw(mask_keys))


@st.composite
def ping_pongs(draw):
    return Control(draw(st.sampled_from([OP_PING, OP_PONG])), draw(st.binary(max_size=125)),
                   draw(mask_keys))


controls = st.one_of(ping_pongs(), ping_pongs(), ping_pongs(), close_controls())


@st.composite
def messages(draw):
    if draw(st.integers(0, 5)) == 0:
        opcode, body = OP_TEXT, draw(st.binary(max_size=100))
    else:
        opcode, body = OP_BINARY, draw(binary_bodies)
    n = len(body)
    # cut points anywhere, plus cuts biased into the 24-byte Data header
    cuts = draw(st.lists(st.integers(0, n), max_size=4))
    cuts += draw(st.lists(st.integers(0, min(n, 25)), max_size=3))
    cuts.sort()
    nfrag = len(cuts) + 1
    between = [draw(st.lists(controls, max_size=2)) for _ in range(nfrag - 1)]
    keys = [draw(mask_keys) for _ in range(nfrag)]
    forms = [draw(st.sampled_from(["min", "min", "min", "7", "16", "64"])) for _ in range(nfrag)]
    return Message(opcode, body, cuts, between, keys, forms)


items_lists = st.lists(st.one_of(messages(), messages(), messages(), controls), max_size=7)

# How many bytes each read delivers: tiny reads (headers split byte by byte), middling
# ones, and reads that fill a large buffer.
chunkings = st.lists(st.one_of(st.integers(1, 8), st.integers(1, 5000), st.integers(1, 300_000)),
                     max_size=12)

# Close codes around every edge of the valid ranges, plus anything 16-bit.
CLOSE_CODE_EDGES = [0, 999, 1000, 1003, 1004, 1005, 1006, 1007, 1011, 1014, 1015, 1016,
                    2999, 3000, 4999, 5000, 65535]
any_close_codes = st.one_of(st.sampled_from(CLOSE_CODE_EDGES), st.sampled_from(CLOSE_CODE_EDGES),
                            st.integers(0, 65535))


@st.composite
def any_close_payloads(draw):
    """Close payloads that may be invalid: empty, 1 byte, any code, any reason bytes."""
    kind = draw(st.sampled_from(["empty", "one", "text", "bytes"]))
    if kind == "empty":
        return b""
    if kind == "one":
        return draw(st.binary(min_size=1, max_size=1))
    code = draw(any_close_codes)
    if kind == "text":
        reason = draw(st.text(max_size=20)).encode("utf-8")
    else:
        reason = draw(st.binary(max_size=20))
    return close_payload(code, reason)

buffer_sizes = st.sampled_from([1024, 1024, 1031, 4096, 65536, 256 << 10])
max_messages = st.one_of(st.just(32 << 20),
                         st.sampled_from([0, 1, 23, 24, 25, 100, 300, 1024, 65536]))


def max_messages_for(items):
    """Limits that matter for these items: each message's size and one byte less, so that
    some messages fit exactly and others are one byte too big."""
    sizes = {len(i.body) for i in items if isinstance(i, Message)}
    near = sorted({s - d for s in sizes for d in (0, 1) if s - d >= 0})
    return st.one_of(max_messages, st.sampled_from(near)) if near else max_messages


# (items, max_message) pairs
items_and_limits = items_lists.flatmap(
    lambda items: st.tuples(st.just(items), max_messages_for(items)))

"""RFC 6455 framing rules and the decoder's buffer contract, for both codecs.

Every test runs against the compiled ``_relay`` and the pure ``_relay_py``.
Frames are built by hand (``codec_helpers.build_frame``), not with the encoder
under test. Section numbers refer to RFC 6455.
"""

from __future__ import annotations

import itertools
import random

import pytest

from trisocks.wire.errors import ProtocolError

from . import codec_helpers as H
from .codec_helpers import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, build_frame


@pytest.fixture(params=H.IMPLS, ids=H.IMPL_IDS)
def mod(request):
    """The codec module under test: ``_relay`` (compiled) and ``_relay_py`` (pure)."""
    return request.param


KEY = b"\x37\xfa\x21\x3d"
CHANNEL = bytes(range(0xA0, 0xB0))


def server(mod, stream, chunks=(), **kw):
    """Events a server-side decoder (client frames are masked) reports for ``stream``."""
    return H.decode_events(mod, stream, chunks, expect_masked=True, **kw)


def server_error(mod, stream, chunks=(), **kw):
    return H.decode_error(mod, stream, chunks, expect_masked=True, **kw)


def masked(opcode, payload=b"", **kw):
    return build_frame(opcode, payload, mask_key=KEY, **kw)


# ---------------------------------------------------------------------------
# 5.2 base framing: reserved bits, opcodes, control frames
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rsv", [0b100, 0b010, 0b001, 0b111], ids=["rsv1", "rsv2", "rsv3", "all"])
@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT, OP_PING, OP_CLOSE])
def test_reserved_bits_rejected(mod, rsv, opcode):
    # No extension is negotiated, so any RSV bit is a protocol error (5.2).
    assert server_error(mod, masked(opcode, b"hi", rsv=rsv)) == ProtocolError("reserved bits set")


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_rejected(mod, opcode):
    assert server_error(mod, masked(opcode, b"x")) == ProtocolError(f"unknown opcode {opcode}")


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_fragmented_control_frame_rejected(mod, opcode):
    # 5.5: control frames MUST NOT be fragmented.
    stream = masked(opcode, b"", fin=False)
    assert server_error(mod, stream) == ProtocolError("fragmented control frame")


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
@pytest.mark.parametrize("length,form", [(126, "16"), (65535, "16"), (65536, "64"), (125, "16"),
                                         (0, "64")])
def test_control_frame_longer_than_125_rejected(mod, opcode, length, form):
    # 5.5: payload length 125 or less, so the 7-bit form; 126/127 in the length field is an error
    # even when the extended length would be small.
    stream = masked(opcode, b"", declared_length=length, length_form=form)
    assert server_error(mod, stream) == ProtocolError("control frame too long")


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG])
def test_control_frame_of_125_bytes_accepted(mod, opcode):
    payload = bytes(range(125))
    name = "PING" if opcode == OP_PING else "PONG"
    assert server(mod, masked(opcode, payload)) == [(name, payload)]


# ---------------------------------------------------------------------------
# 5.1 / 5.3 masking direction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT, OP_PING, OP_CLOSE])
def test_unmasked_frame_to_server_rejected(mod, opcode):
    stream = build_frame(opcode, b"")
    assert server_error(mod, stream) == ProtocolError("unmasked client frame")


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT, OP_PING, OP_CLOSE])
def test_masked_frame_to_client_rejected(mod, opcode):
    stream = masked(opcode, b"")
    err = H.decode_error(mod, stream, expect_masked=False)
    assert err == ProtocolError("masked server frame")


def test_mask_bit_checked_on_every_frame(mod):
    # A good first fragment does not excuse an unmasked continuation.
    stream = masked(OP_BINARY, b"ab", fin=False) + build_frame(OP_CONT, b"cd")
    assert server_error(mod, stream) == ProtocolError("unmasked client frame")


# ---------------------------------------------------------------------------
# 5.4 fragmentation
# ---------------------------------------------------------------------------


def test_continuation_without_start_rejected(mod):
    err = server_error(mod, masked(OP_CONT, b"x"))
    assert err == ProtocolError("unexpected continuation frame")


def test_continuation_after_finished_message_rejected(mod):
    stream = masked(OP_BINARY, b"\x01\x02whole") + masked(OP_CONT, b"more")
    out = H.decode(mod, stream, expect_masked=True)
    assert out.events == [("MESSAGE", b"\x01\x02whole")]
    assert out.error == ProtocolError("unexpected continuation frame")


@pytest.mark.parametrize("first,second", [(OP_BINARY, OP_BINARY), (OP_BINARY, OP_TEXT),
                                          (OP_TEXT, OP_BINARY), (OP_TEXT, OP_TEXT)])
def test_new_data_frame_inside_fragmented_message_rejected(mod, first, second):
    stream = masked(first, b"part", fin=False) + masked(second, b"new")
    assert server_error(mod, stream) == ProtocolError("expected a continuation frame")


def test_control_frames_between_fragments_accepted(mod):
    # 5.4: control frames MAY be injected in the middle of a fragmented message.
    body = H.data_message(CHANNEL, b"hello world")
    stream = (masked(OP_BINARY, body[:5], fin=False) + masked(OP_PING, b"p1")
              + masked(OP_CONT, body[5:30], fin=False) + masked(OP_PONG, b"p2")
              + masked(OP_CONT, body[30:]))
    assert server(mod, stream) == [("PING", b"p1"), ("DATA", CHANNEL, b"hello "),
                                   ("PONG", b"p2"), ("DATA", CHANNEL, b"world")]


def test_zero_length_fragments_accepted(mod):
    stream = (masked(OP_BINARY, b"", fin=False) + masked(OP_CONT, b"\x01", fin=False)
              + masked(OP_CONT, b"", fin=False) + masked(OP_CONT, b"\x07xyz"))
    assert server(mod, stream) == [("MESSAGE", b"\x01\x07xyz")]


def test_empty_binary_message_is_an_empty_message(mod):
    assert server(mod, masked(OP_BINARY, b"")) == [("MESSAGE", b"")]


def test_text_messages_are_ignored_and_counted(mod):
    # LinkSocks only speaks binary; text (even invalid UTF-8) is skipped and counted.
    stream = (masked(OP_TEXT, b"\xff\xfe not utf-8", fin=False) + masked(OP_PING, b"!")
              + masked(OP_CONT, b"rest") + masked(OP_TEXT, b"second")
              + masked(OP_BINARY, b"\x01\x0a{}"))
    trace = H.drive(mod, stream, expect_masked=True)
    assert trace.error is None
    assert trace.outcome().events == [("PING", b"!"), ("MESSAGE", b"\x01\x0a{}")]
    assert trace.ignored == 2


# ---------------------------------------------------------------------------
# 5.2 payload length: 7-bit, 16-bit, 64-bit
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("length,header", [
    (0, b"\x82\x00"), (125, b"\x82\x7d"), (126, b"\x82\x7e\x00\x7e"),
    (65535, b"\x82\x7e\xff\xff"), (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_length_encoding_at_boundaries(mod, length, header):
    payload = random.Random(length).randbytes(length)
    frame = mod.encode_frame(OP_BINARY, payload)
    assert frame[: len(header)] == header and frame[len(header):] == payload
    # and the decoder reads each form back, also through a buffer smaller than the frame
    payload = b"\x01\x09" + payload[2:] if length >= 2 else payload
    for chunks in [(), [1000], [1, 2, 3]]:
        got = H.decode_events(mod, build_frame(OP_BINARY, payload), chunks, expect_masked=False,
                              buffer_size=1024)
        assert got == [("MESSAGE", payload)]


@pytest.mark.parametrize("length", [125, 126, 65535, 65536])
def test_masked_length_boundaries(mod, length):
    payload = random.Random(length).randbytes(length - 24)
    stream = masked(OP_BINARY, H.data_message(CHANNEL, payload))
    assert len(stream) - 2 - 4 - {125: 0, 126: 2, 65535: 2, 65536: 8}[length] == length
    assert server(mod, stream, [777]) == [("DATA", CHANNEL, payload)]


@pytest.mark.parametrize("length,form", [(0, "16"), (5, "16"), (125, "16"), (0, "64"), (126, "64"),
                                         (65535, "64")])
def test_non_minimal_lengths_accepted(mod, length, form):
    # The minimal encoding is a sender's duty (5.2); the decoder reads any well-formed length.
    payload = b"\x01\x05" + bytes(max(0, length - 2))
    payload = payload[:length]
    assert server(mod, masked(OP_BINARY, payload, length_form=form)) == [("MESSAGE", payload)]


def test_64bit_length_with_top_bit_set_rejected(mod):
    # 5.2: the most significant bit of the 64-bit length MUST be 0.
    stream = masked(OP_BINARY, b"", declared_length=1 << 63, length_form="64")
    assert server_error(mod, stream) == ProtocolError("invalid frame length")
    stream = masked(OP_BINARY, b"", declared_length=(1 << 64) - 1, length_form="64")
    assert server_error(mod, stream) == ProtocolError("invalid frame length")


def test_largest_64bit_length_is_too_big_not_invalid(mod):
    stream = masked(OP_BINARY, b"", declared_length=(1 << 63) - 1, length_form="64")
    assert server_error(mod, stream) == ProtocolError("message too big", 1009)


# ---------------------------------------------------------------------------
# 7.4.1 / 10.4 message size limit -> 1009
# ---------------------------------------------------------------------------


TOO_BIG = ProtocolError("message too big", 1009)


def test_message_bigger_than_max_message_is_1009(mod):
    stream = masked(OP_BINARY, b"\x01\x02" + bytes(99))
    assert server_error(mod, stream, max_message=100) == TOO_BIG
    assert server(mod, stream, max_message=101) == [("MESSAGE", b"\x01\x02" + bytes(99))]


def test_1009_raised_from_the_header_alone(mod):
    # The limit is enforced before any payload arrives (no buffering of a huge message).
    stream = masked(OP_BINARY, b"", declared_length=10 << 20, length_form="64")
    assert server_error(mod, stream, max_message=1 << 20) == TOO_BIG


def test_1009_when_the_excess_comes_from_continuation_frames(mod):
    body = H.data_message(CHANNEL, bytes(80))  # 104 bytes in three frames
    stream = (masked(OP_BINARY, body[:50], fin=False) + masked(OP_PING, b"still fine")
              + masked(OP_CONT, body[50:100], fin=False) + masked(OP_CONT, body[100:]))
    out = H.decode(mod, stream, expect_masked=True, max_message=103)
    assert out.events == [("DATA", CHANNEL, bytes(26)), ("PING", b"still fine"),
                          ("DATA", CHANNEL, bytes(50))]
    assert out.error == TOO_BIG
    assert server(mod, stream, max_message=104) == [
        ("DATA", CHANNEL, bytes(26)), ("PING", b"still fine"), ("DATA", CHANNEL, bytes(54))]


def test_max_message_applies_to_each_message_separately(mod):
    # Regression: the size of the previous message used to count against the next one.
    one = masked(OP_BINARY, b"\x01\x02" + bytes(58))
    frag = masked(OP_BINARY, b"\x01\x03" + bytes(28), fin=False) + masked(OP_CONT, bytes(30))
    text = masked(OP_TEXT, b"t" * 60)
    stream = one + one + frag + text + one
    events = server(mod, stream, max_message=60)
    assert events == [("MESSAGE", b"\x01\x02" + bytes(58))] * 2 + [
        ("MESSAGE", b"\x01\x03" + bytes(58)), ("MESSAGE", b"\x01\x02" + bytes(58))]


def test_text_messages_count_toward_max_message(mod):
    assert server_error(mod, masked(OP_TEXT, b"t" * 61), max_message=60) == TOO_BIG


def test_control_frames_do_not_count_toward_max_message(mod):
    stream = (masked(OP_BINARY, b"\x01\x02", fin=False) + masked(OP_PING, bytes(100))
              + masked(OP_CONT, b"ab"))
    assert server(mod, stream, max_message=4) == [("PING", bytes(100)), ("MESSAGE", b"\x01\x02ab")]


# ---------------------------------------------------------------------------
# 5.5.1 / 7.4 close frames
# ---------------------------------------------------------------------------


def test_close_without_payload_is_1005(mod):
    assert server(mod, masked(OP_CLOSE)) == [("CLOSE", 1005, "")]


def test_close_with_one_byte_payload_rejected(mod):
    err = server_error(mod, masked(OP_CLOSE, b"\x03"))
    assert err == ProtocolError("invalid close frame payload")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_close_with_invalid_code_rejected(mod, code):
    stream = masked(OP_CLOSE, H.close_payload(code, b"bye"))
    assert server_error(mod, stream) == ProtocolError(f"invalid close code {code}")


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                                  1014, 3000, 3999, 4000, 4999])
def test_close_with_valid_code_accepted(mod, code):
    assert server(mod, masked(OP_CLOSE, H.close_payload(code))) == [("CLOSE", code, "")]


def test_close_reason_is_decoded(mod):
    reason = "going away – ünïcödé ✓"
    stream = masked(OP_CLOSE, H.close_payload(1001, reason.encode()))
    assert server(mod, stream, [1]) == [("CLOSE", 1001, reason)]


def test_close_reason_of_maximum_length(mod):
    reason = "r" * 123
    stream = masked(OP_CLOSE, H.close_payload(4000, reason.encode()))
    assert server(mod, stream) == [("CLOSE", 4000, reason)]


@pytest.mark.parametrize("reason", [b"\xff", b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"a\x80b"],
                         ids=["ff", "cut-short", "surrogate", "overlong", "stray-continuation"])
def test_close_reason_invalid_utf8_is_1007(mod, reason):
    stream = masked(OP_CLOSE, H.close_payload(1000, reason))
    assert server_error(mod, stream) == ProtocolError("invalid UTF-8 in close reason", 1007)


def test_close_between_fragments_is_reported(mod):
    stream = (masked(OP_BINARY, b"\x01\x02", fin=False) + masked(OP_CLOSE, H.close_payload(1000))
              + masked(OP_CONT, b"zz"))
    assert server(mod, stream) == [("CLOSE", 1000, ""), ("MESSAGE", b"\x01\x02zz")]


# ---------------------------------------------------------------------------
# 5.5.2 / 5.5.3 ping and pong
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 7, 8, 9, 16, 17, 124, 125])
@pytest.mark.parametrize("opcode,name", [(OP_PING, "PING"), (OP_PONG, "PONG")])
def test_ping_payload_returned_intact(mod, size, opcode, name):
    payload = bytes((i * 37 + 11) & 0xFF for i in range(size))
    for chunks in [(), [1], [2, 5]]:
        assert server(mod, masked(opcode, payload), chunks) == [(name, payload)]
    assert H.decode_events(mod, build_frame(opcode, payload), [3], expect_masked=False) == [
        (name, payload)]


def test_ping_data_is_bytes(mod):
    d = mod.Decoder(expect_masked=True)
    d.feed_bytes(masked(OP_PING, b"abc"))
    assert d.next_event() == mod.PING
    assert type(d.data) is bytes and d.data == b"abc"


# ---------------------------------------------------------------------------
# 5.3 masking: every key offset, payloads arriving a byte at a time
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x04\x08",
                                 KEY], ids=["zero", "ones", "bits", "mixed"])
@pytest.mark.parametrize("kind", ["data", "message", "ping"])
def test_masking_one_byte_at_a_time(mod, key, kind):
    # Each one-byte read unmasks with the next key byte: offsets 0, 1, 2, 3, 0, ...
    payload = bytes(range(1, 38))  # odd length, crosses the 8-byte fast path several times
    if kind == "data":
        frame, expected = H.data_message(CHANNEL, payload), ("DATA", CHANNEL, payload)
    elif kind == "message":
        frame, expected = b"\x01\x06" + payload, ("MESSAGE", b"\x01\x06" + payload)
    else:
        frame, expected = payload, ("PING", payload)
    opcode = OP_PING if kind == "ping" else OP_BINARY
    stream = build_frame(opcode, frame, mask_key=key)
    assert server(mod, stream, [1]) == [expected]


@pytest.mark.parametrize("first", range(12))
def test_masking_resumes_at_every_offset(mod, first):
    # The payload arrives as `first` bytes then the rest: the second unmask starts at key
    # offset first % 4 and runs through the 8-bytes-at-a-time path and its tail.
    payload = bytes(range(200, 255))
    stream = masked(OP_BINARY, H.data_message(CHANNEL, payload))
    header = len(stream) - len(payload)
    chunks = [header + first, 1000]
    assert server(mod, stream, chunks) == [("DATA", CHANNEL, payload)]
    pieces = H.drive(mod, stream, chunks, expect_masked=True).pieces()
    assert pieces == [("DATA", CHANNEL, p) for p in (payload[:first], payload[first:]) if p]


def test_each_fragment_has_its_own_mask_key(mod):
    body = H.data_message(CHANNEL, b"0123456789abcdef")
    stream = b"".join(build_frame(OP_BINARY if i == 0 else OP_CONT, body[i:i + 7],
                                  fin=i + 7 >= len(body), mask_key=bytes([i, 0x55, 0xAA, i ^ 0xFF]))
                      for i in range(0, len(body), 7))
    assert server(mod, stream, [3]) == [("DATA", CHANNEL, b"0123456789abcdef")]


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 7, -1])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33])
def test_mask_function_offsets(mod, offset, length):
    key = 0x9A3F0C71
    data = bytes((i * 29 + 3) & 0xFF for i in range(length))
    buf = bytearray(data)
    mod.mask(buf, key, offset)
    assert bytes(buf) == H.xor_mask(data, key.to_bytes(4, "big"), offset % 4)
    mod.mask(buf, key, offset)
    assert bytes(buf) == data  # masking is its own inverse


def test_mask_function_default_offset_and_views(mod):
    owner = bytearray(b"--" + bytes(10) + b"--")
    mod.mask(memoryview(owner)[2:-2], 0x01020304)
    assert owner == b"--" + b"\x01\x02\x03\x04" * 2 + b"\x01\x02" + b"--"


# ---------------------------------------------------------------------------
# encoders (6.1)
# ---------------------------------------------------------------------------


def test_encode_frame_rejects_bad_frames(mod):
    with pytest.raises(ValueError, match="invalid opcode 3"):
        mod.encode_frame(3, b"")
    with pytest.raises(ValueError, match="control frames"):
        mod.encode_frame(OP_PING, bytes(126))
    with pytest.raises(ValueError, match="control frames"):
        mod.encode_frame(OP_CLOSE, b"", fin=False)


def test_encode_frame_masks_for_clients(mod):
    frame = mod.encode_frame(OP_BINARY, b"\x01\x02abc", mask_key=0x37FA213D)
    assert frame == build_frame(OP_BINARY, b"\x01\x02abc", mask_key=KEY)
    assert server(mod, frame) == [("MESSAGE", b"\x01\x02abc")]


@pytest.mark.parametrize("size", [0, 1, 101, 102, 65511, 65512, 70000])
@pytest.mark.parametrize("mask_key", [None, 0x37FA213D])
def test_encode_data_uses_exactly_the_headroom_it_needs(mod, size, mask_key):
    # 101/102 and 65511/65512 put the message (24 + size) on either side of 126 and 65536.
    payload = random.Random(size).randbytes(size)
    buf = bytearray(mod.HEADROOM) + payload
    start = mod.encode_data(buf, mod.HEADROOM, size, CHANNEL, mask_key)
    key = None if mask_key is None else mask_key.to_bytes(4, "big")
    expected = build_frame(OP_BINARY, H.data_message(CHANNEL, payload), mask_key=key)
    assert bytes(buf[start:]) == expected
    assert buf[:start] == bytes(start)
    # the least headroom that works is exactly what was used
    need = mod.HEADROOM - start
    tight = bytearray(need) + payload
    assert mod.encode_data(tight, need, size, CHANNEL, mask_key) == 0
    with pytest.raises(ValueError, match="not enough headroom"):
        mod.encode_data(bytearray(need - 1) + payload, need - 1, size, CHANNEL, mask_key)


def test_encode_data_rejects_bad_arguments(mod):
    buf = bytearray(100)
    with pytest.raises(ValueError, match="channel id must be 16 bytes"):
        mod.encode_data(buf, 50, 10, b"short")
    with pytest.raises(ValueError, match="payload outside the buffer"):
        mod.encode_data(buf, 50, 51, CHANNEL)
    with pytest.raises(ValueError, match="payload outside the buffer"):
        mod.encode_data(buf, 50, -1, CHANNEL)
    assert buf == bytes(100)  # nothing written on failure


# ---------------------------------------------------------------------------
# LinkSocks Data streaming over the WebSocket framing
# ---------------------------------------------------------------------------


def test_data_header_split_across_frames(mod):
    payload = b"payload bytes"
    body = H.data_message(CHANNEL, payload)
    for cut in range(25):
        stream = (masked(OP_BINARY, body[:cut], fin=False) + masked(OP_PONG, b"x")
                  + masked(OP_CONT, body[cut:]))
        assert server(mod, stream) == [("PONG", b"x"), ("DATA", CHANNEL, payload)], cut


def test_data_trailer_ignored_and_truncation_reported(mod):
    exact = H.data_message(CHANNEL, b"abc")
    trailer = H.data_message(CHANNEL, b"abcdef", data_len=3)
    short = H.data_message(CHANNEL, b"abc", data_len=10)
    stream = masked(OP_BINARY, exact) + masked(OP_BINARY, trailer) + masked(OP_BINARY, short)
    trace = H.drive(mod, stream, expect_masked=True)
    assert trace.error is None
    assert trace.pieces() == [
        ("DATA", CHANNEL, b"abc"), ("DATA", CHANNEL, b"abc"), ("DATA", CHANNEL, b"abc"),
        ("TRUNCATED", CHANNEL)]


@pytest.mark.parametrize("carried,data_len",
                         [(0, 1), (5, 6), (5, 4), (5, 5), (5, 0), (0, 0xFFFFFFFF)])
def test_truncated_exactly_when_data_len_exceeds_the_message(mod, carried, data_len):
    payload = bytes(range(1, carried + 1))
    stream = masked(OP_BINARY, H.data_message(CHANNEL, payload, data_len=data_len))
    expected = [("DATA", CHANNEL, payload[:data_len])] if payload[:data_len] else []
    if data_len > carried:
        expected.append(("TRUNCATED", CHANNEL))
    for chunks in [(), [1]]:
        assert server(mod, stream + masked(OP_PING), chunks) == expected + [("PING", b"")]


def test_data_with_zero_length_gives_no_event(mod):
    stream = masked(OP_BINARY, H.data_message(CHANNEL, b"")) + masked(OP_PING, b"next")
    assert server(mod, stream) == [("PING", b"next")]


@pytest.mark.parametrize("body", [
    H.data_message(CHANNEL, b"udp", protocol=0x02, trailer=b"\x00\x00\x00\x00\x00\x00"),
    H.data_message(CHANNEL, b"\x1f\x8b gzip", compression=0x01),
    H.data_message(CHANNEL, b"v2", version=0x11),
    H.data_message(CHANNEL, b"abc")[:23],
    b"\x01\x03\x01" + CHANNEL + b"\x09example.org\x01\xbb",
], ids=["udp", "gzip", "major-version", "short-header", "connect"])
def test_other_binary_messages_delivered_whole(mod, body):
    cuts = [masked(OP_BINARY, body[:3], fin=False), masked(OP_CONT, body[3:])]
    assert server(mod, b"".join(cuts), [1]) == [("MESSAGE", body)]


def test_channels_reported_per_message(mod):
    other = bytes(16)
    stream = (masked(OP_BINARY, H.data_message(CHANNEL, b"one"))
              + masked(OP_BINARY, H.data_message(other, b"two"))
              + masked(OP_BINARY, H.data_message(CHANNEL, b"three", data_len=9)))
    assert server(mod, stream) == [("DATA", CHANNEL, b"one"), ("DATA", other, b"two"),
                                   ("DATA", CHANNEL, b"three"), ("TRUNCATED", CHANNEL)]


# ---------------------------------------------------------------------------
# buffer contract: get_buffer / feed / feed_bytes
# ---------------------------------------------------------------------------


def test_decoder_buffer_must_hold_1024_bytes(mod):
    with pytest.raises(ValueError):
        mod.Decoder(expect_masked=True, buffer_size=1023)
    assert len(mod.Decoder(expect_masked=True, buffer_size=1024).get_buffer()) == 1024


def test_get_buffer_compacts_a_partial_header(mod):
    # A complete ping and the first 3 bytes of a 14-byte header (64-bit length, masked).
    payload = b"\x01\x02" + bytes(range(98))
    frame = masked(OP_BINARY, payload, length_form="64")
    ping = masked(OP_PING, b"hello")
    d = mod.Decoder(expect_masked=True, buffer_size=1024)
    d.feed_bytes(ping + frame[:3])
    assert d.next_event() == mod.PING and d.data == b"hello"
    assert d.next_event() == mod.NEED_DATA
    # the 3 pending bytes move to the front: all the rest is free
    held = 3
    for i in range(3, 14):  # the rest of the header, one read per byte
        space = d.get_buffer()
        assert len(space) == 1024 - held
        space[0] = frame[i]
        d.feed(1)
        held += 1
        assert d.next_event() == mod.NEED_DATA
    # held counts 14 bytes now, but the complete header was parsed and consumed
    space = d.get_buffer()
    assert len(space) == 1024
    space[: len(payload)] = frame[14:]
    d.feed(len(payload))
    assert d.next_event() == mod.MESSAGE and d.data == payload
    assert d.next_event() == mod.NEED_DATA
    assert len(d.get_buffer()) == 1024  # everything consumed: the whole buffer is free again


@pytest.mark.parametrize("expect_masked", [True, False], ids=["server", "client"])
@pytest.mark.parametrize("before", range(8))
def test_get_buffer_compacts_after_any_amount_consumed(mod, expect_masked, before):
    # `before` empty pings are consumed, then 1..13 bytes of a header are pending; the next
    # get_buffer moves them to the front and the header is read correctly from there.
    key = KEY if expect_masked else None
    payload = b"\x01\x0b" + bytes(range(40))
    frame = build_frame(OP_BINARY, payload, mask_key=key, length_form="64")
    hlen = len(frame) - len(payload)
    for pending in range(1, hlen):
        d = mod.Decoder(expect_masked=expect_masked, buffer_size=1024)
        d.feed_bytes(build_frame(OP_PING, b"", mask_key=key) * before + frame[:pending])
        assert [d.next_event() for _ in range(before + 1)] == [mod.PING] * before + [mod.NEED_DATA]
        space = d.get_buffer()
        assert len(space) == 1024 - pending
        rest = frame[pending:]
        space[: len(rest)] = rest
        d.feed(len(rest))
        assert d.next_event() == mod.MESSAGE and d.data == payload


def test_one_read_gives_one_piece(mod):
    # Bytes that arrive together are handed out together, not cut into smaller pieces.
    payload = random.Random(5).randbytes(200_000)
    stream = masked(OP_BINARY, H.data_message(CHANNEL, payload))
    trace = H.drive(mod, stream, [len(stream) - 1000, 1000], expect_masked=True,
                    buffer_size=256 << 10)
    assert trace.pieces() == [("DATA", CHANNEL, payload[:-1000]),
                              ("DATA", CHANNEL, payload[-1000:])]


@pytest.mark.parametrize("form", ["7", "16", "64"])
def test_header_split_over_many_reads(mod, form):
    payload = b"\x01\x05\x01" + bytes(60)  # a ConnectResponse: delivered whole
    ping = masked(OP_PING, b"p")
    frame = masked(OP_BINARY, payload, length_form=form)
    stream = ping * 3 + frame + ping
    expected = [("PING", b"p")] * 3 + [("MESSAGE", payload), ("PING", b"p")]
    for chunks in ([1], [2], [3], [5], [1, 13], [len(ping) + 1, 1]):
        assert server(mod, stream, chunks, buffer_size=1024) == expected, chunks


def test_feed_beyond_the_buffer_raises(mod):
    d = mod.Decoder(expect_masked=True, buffer_size=1024)
    d.feed_bytes(b"\x82")  # one byte of a header pending
    assert d.next_event() == mod.NEED_DATA
    space = d.get_buffer()
    assert len(space) == 1023
    with pytest.raises(ValueError):
        d.feed(len(space) + 1)
    with pytest.raises(ValueError):
        d.feed(-1)
    # the failed calls changed nothing: the decoder carries on
    frame = masked(OP_BINARY, b"\x01\x02ok")
    space[: len(frame) - 1] = frame[1:]
    d.feed(len(frame) - 1)
    assert d.next_event() == mod.MESSAGE and d.data == b"\x01\x02ok"


def test_feed_bytes_of_too_much_raises(mod):
    d = mod.Decoder(expect_masked=True, buffer_size=1024)
    with pytest.raises(ValueError):
        d.feed_bytes(bytes(1025))
    d.feed_bytes(b"\x89")
    assert d.next_event() == mod.NEED_DATA
    with pytest.raises(ValueError):
        d.feed_bytes(bytes(1024))
    d.feed_bytes(b"\x80" + KEY)  # what fits is accepted: an empty masked ping
    assert d.next_event() == mod.PING and d.data == b""
    assert d.next_event() == mod.NEED_DATA
    d.feed_bytes(bytes(1024))  # exactly the whole buffer


@pytest.mark.parametrize("expect_masked", [True, False], ids=["server", "client"])
@pytest.mark.parametrize("read", [1024, 700, 4096])
def test_data_far_larger_than_the_buffer_streams_through(mod, expect_masked, read):
    payload = random.Random(7).randbytes(1 << 20)
    key = KEY if expect_masked else None
    stream = (build_frame(OP_BINARY, H.data_message(CHANNEL, payload), mask_key=key)
              + build_frame(OP_BINARY, H.data_message(CHANNEL, b"next"), mask_key=key))
    d = mod.Decoder(expect_masked=expect_masked, buffer_size=1024)
    pieces = []
    pos = 0
    while True:
        ev = d.next_event()
        if ev == mod.DATA:
            assert d.channel == CHANNEL
            assert isinstance(d.data, memoryview) and 0 < len(d.data) <= 1024
            pieces.append(bytes(d.data))
        elif ev == mod.NEED_DATA:
            if pos == len(stream):
                break
            space = d.get_buffer()
            n = min(read, len(space), len(stream) - pos)
            space[:n] = stream[pos:pos + n]
            d.feed(n)
            pos += n
        else:
            raise AssertionError(f"unexpected event {ev}")
    assert pieces[-1] == b"next"
    assert b"".join(pieces[:-1]) == payload
    assert len(pieces) > (1 << 20) // 1024  # it really came in pieces, none buffered whole


def test_fragmented_data_larger_than_the_buffer(mod):
    payload = random.Random(3).randbytes(50_000)
    body = H.data_message(CHANNEL, payload)
    cuts = [0, 10, 3000, 3001, 20_000, len(body)]
    stream = b"".join(
        masked(OP_BINARY if i == 0 else OP_CONT, body[a:b], fin=b == len(body))
        + (masked(OP_PING, b"%d" % i) if b != len(body) else b"")
        for i, (a, b) in enumerate(itertools.pairwise(cuts)))
    events = server(mod, stream, [1024], buffer_size=1024)
    assert [e for e in events if e[0] == "PING"] == [("PING", b"%d" % i) for i in range(4)]
    assert b"".join(e[2] for e in events if e[0] == "DATA") == payload


def test_data_view_reads_the_decoder_buffer(mod):
    # DATA hands out a view into the decoder's own buffer (no copy); it is read before
    # the next get_buffer.
    d = mod.Decoder(expect_masked=False, buffer_size=1024)
    d.feed_bytes(build_frame(OP_BINARY, H.data_message(CHANNEL, b"zero-copy")))
    assert d.next_event() == mod.DATA
    data = d.data
    assert isinstance(data, memoryview) and data.tobytes() == b"zero-copy"
    assert d.next_event() == mod.NEED_DATA
    assert data.obj is d.get_buffer().obj

"""The compiled codec (``_relay``) and its pure-Python reference (``_relay_py``)
must give the same results for every input, and both must match the model.

Differential part: the same bytes, with the same chunking, go into both
decoders; the traces (free space offered at each read, every event with its
bytes, channel, close code/reason and ``ignored`` counter, and the exception
with the number of bytes fed when it happened) must be identical. The encoders
and ``mask`` must give byte-identical output or the same exception.

Model part: for generated valid streams, the events (DATA pieces of one
message concatenated) must be exactly what ``codec_helpers.model`` predicts.
"""

from __future__ import annotations

import array
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trisocks.wire.errors import ProtocolError

from . import codec_helpers as H
from .codec_helpers import _relay, _relay_py

pytestmark = pytest.mark.skipif(not H.HAVE_COMPILED, reason="the compiled extension is not built")

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_MORE = settings(FUZZ, max_examples=600)


def _short(value, limit=200):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def assert_same_trace(stream: bytes, chunks, **kw) -> H.Trace:
    """Run both decoders and fail with the first divergence, readably."""
    compiled = H.drive(_relay, stream, chunks, **kw)
    pure = H.drive(_relay_py, stream, chunks, **kw)
    for i, (a, b) in enumerate(zip(compiled.steps, pure.steps, strict=False)):
        assert a == b, f"step {i} differs:\n compiled {_short(a)}\n pure     {_short(b)}"
    common = min(len(compiled.steps), len(pure.steps))
    longer = compiled.steps if len(compiled.steps) > common else pure.steps
    assert len(compiled.steps) == len(pure.steps), (
        f"compiled has {len(compiled.steps)} steps, pure {len(pure.steps)}; the longer one "
        f"continues with {_short(longer[common:common + 1])}"
    )
    assert compiled.error == pure.error
    assert compiled.ignored == pure.ignored
    assert compiled.fed == pure.fed
    # Whatever the input, a decoder only ever fails with ProtocolError.
    assert compiled.error is None or compiled.error[0] == "ProtocolError", compiled.error
    return compiled


def _call(fn, *args, **kw):
    try:
        return ("ok", fn(*args, **kw))
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


# ---------------------------------------------------------------------------
# 1a. fully random bytes
# ---------------------------------------------------------------------------


@FUZZ_MORE
@given(
    stream=st.binary(max_size=3000),
    chunks=H.chunkings,
    expect_masked=st.booleans(),
    buffer_size=H.buffer_sizes,
    max_message=H.max_messages,
)
def test_random_bytes_same_events(stream, chunks, expect_masked, buffer_size, max_message):
    assert_same_trace(stream, chunks, expect_masked=expect_masked,
                      buffer_size=buffer_size, max_message=max_message)


@st.composite
def plausible_frames(draw):
    """Random frames with a header that passes the first checks more often than random bytes:
    opcode and mask bit drawn from the legal values, payload bytes random."""
    expect_masked = draw(st.booleans())
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        opcode = draw(st.sampled_from([0, 1, 2, 2, 2, 8, 9, 10]))
        fin = draw(st.booleans())
        if opcode == 8 and draw(st.booleans()):
            payload = draw(H.any_close_payloads())
        else:
            payload = draw(st.binary(max_size=200))
        right_mask_bit = draw(st.integers(0, 9)) > 0  # now and then the wrong one
        key = draw(H.mask_keys) if expect_masked == right_mask_bit else None
        form = "min" if len(payload) > 125 else draw(st.sampled_from(["min", "7", "16", "64"]))
        out += H.build_frame(opcode, payload, fin=fin, mask_key=key, length_form=form)
    return expect_masked, bytes(out)


@FUZZ
@given(case=plausible_frames(), chunks=H.chunkings, buffer_size=H.buffer_sizes,
       max_message=H.max_messages)
def test_random_frames_same_events(case, chunks, buffer_size, max_message):
    expect_masked, stream = case
    assert_same_trace(stream, chunks, expect_masked=expect_masked,
                      buffer_size=buffer_size, max_message=max_message)


@FUZZ
@given(payload=H.any_close_payloads(), key=H.mask_keys, expect_masked=st.booleans(),
       chunks=H.chunkings)
def test_close_frames_same_result(payload, key, expect_masked, chunks):
    # Close codes and reasons, valid or not, must be judged alike.
    frame = H.build_frame(H.OP_CLOSE, payload, mask_key=key if expect_masked else None)
    trace = assert_same_trace(frame, chunks, expect_masked=expect_masked)
    if len(payload) >= 2 and trace.error is None:
        code = struct.unpack("!H", payload[:2])[0]
        assert trace.pieces() == [("CLOSE", code, payload[2:].decode("utf-8"))]


# ---------------------------------------------------------------------------
# 1b. valid streams; 2. correctness against the model
# ---------------------------------------------------------------------------


@FUZZ_MORE
@given(case=H.items_and_limits, chunks=H.chunkings, expect_masked=st.booleans(),
       buffer_size=H.buffer_sizes)
def test_valid_streams_same_events_and_match_model(case, chunks, expect_masked, buffer_size):
    items, max_message = case
    stream = H.render(items, expect_masked)
    trace = assert_same_trace(stream, chunks, expect_masked=expect_masked,
                              buffer_size=buffer_size, max_message=max_message)
    expected = H.model(items, max_message=max_message)
    got = trace.outcome()
    assert got.error == expected.error
    assert got.events == expected.events
    assert got.ignored == expected.ignored
    # every DATA piece is a non-empty slice of the decoder's buffer, never more than it holds
    for ev in trace.events():
        if ev[0] == "DATA":
            assert 0 < len(ev[2]) <= buffer_size
            assert ev[3] == "memoryview"
        elif ev[0] in ("MESSAGE", "PING", "PONG"):
            assert ev[2] == "bytes"


@FUZZ
@given(case=H.items_and_limits, expect_masked=st.booleans())
def test_valid_streams_one_byte_at_a_time(case, expect_masked):
    items, max_message = case
    # The hardest chunking for the state machine: every header split at every byte.
    stream = H.render(items, expect_masked)[:20000]
    assert_same_trace(stream, [1], expect_masked=expect_masked, buffer_size=1024,
                      max_message=max_message)


@st.composite
def data_message_items(draw):
    """One TCP Data message with a model-checked payload, plus its expectations."""
    payload = draw(H.payloads())
    data_len = draw(st.one_of(st.just(len(payload)), st.integers(0, len(payload) + 50)))
    return H.data_message(draw(H.channels), payload, data_len=data_len), data_len


@FUZZ
@given(case=data_message_items(), cuts=st.lists(st.integers(0, 100), max_size=5),
       chunks=H.chunkings, expect_masked=st.booleans())
def test_data_message_payload_truncated_and_trailer(case, cuts, chunks, expect_masked):
    """Requirement 2 spelled out: DATA pieces concatenate to exactly the first DataLen bytes,
    TRUNCATED comes exactly when DataLen exceeds what the message carried, and bytes after
    the payload inside the same message are ignored."""
    body, data_len = case
    cuts = sorted(min(c, len(body)) for c in cuts)
    msg = H.Message(H.OP_BINARY, body, cuts, [], [b"\x01\x02\x03\x04"] * (len(cuts) + 1))
    follow = H.Control(H.OP_PING, b"after")  # the decoder must still be in sync afterwards
    stream = H.render([msg, follow], expect_masked)
    for mod in H.IMPLS:
        out = H.decode(mod, stream, chunks, expect_masked=expect_masked)
        assert out.error is None
        carried = len(body) - 24
        data = body[24:24 + min(data_len, carried)]
        expected = [("DATA", body[3:19], data)] if data else []
        if data_len > carried:
            expected.append(("TRUNCATED", body[3:19]))
        expected.append(("PING", b"after"))
        assert out.events == expected, mod.IMPLEMENTATION


# ---------------------------------------------------------------------------
# 1c. valid streams with corruptions and truncations
# ---------------------------------------------------------------------------


@FUZZ_MORE
@given(items=H.items_lists.filter(bool),
       flips=st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.integers(0)), chunks=H.chunkings, expect_masked=st.booleans(),
       buffer_size=H.buffer_sizes, max_message=H.max_messages)
def test_corrupted_streams_same_events(items, flips, cut, chunks, expect_masked, buffer_size,
                                       max_message):
    stream = bytearray(H.render(items, expect_masked))
    if not stream:
        return
    for pos, xor in flips:
        stream[pos % len(stream)] ^= xor
    if cut is not None:
        del stream[cut % (len(stream) + 1):]
    assert_same_trace(bytes(stream), chunks, expect_masked=expect_masked,
                      buffer_size=buffer_size, max_message=max_message)


@FUZZ
@given(items=H.items_lists.filter(bool), cut=st.integers(0), chunks=H.chunkings,
       expect_masked=st.booleans())
def test_truncated_streams_are_a_prefix_of_the_full_result(items, cut, chunks, expect_masked):
    """A valid stream cut anywhere gives no error and a prefix of the full event list."""
    stream = H.render(items, expect_masked)
    prefix = stream[: cut % (len(stream) + 1)]
    full = H.model(items).events
    for mod in H.IMPLS:
        out = H.decode(mod, prefix, chunks, expect_masked=expect_masked)
        assert out.error is None
        got = out.events
        # the last DATA run may be cut short; everything before it is complete
        if got and got[-1][0] == "DATA":
            i = len(got) - 1
            assert got[:i] == full[:i]
            assert full[i][0] == "DATA" and full[i][1] == got[i][1]
            assert full[i][2].startswith(got[i][2])
        else:
            assert got == full[: len(got)]
    assert_same_trace(prefix, chunks, expect_masked=expect_masked)


# ---------------------------------------------------------------------------
# encoders and mask
# ---------------------------------------------------------------------------

opcodes = st.one_of(st.sampled_from([0, 1, 2, 8, 9, 10]), st.integers(-3, 20))
mask_key_args = st.one_of(st.none(), st.integers(0, 2**32 - 1))


@st.composite
def payload_objects(draw):
    """The same bytes as bytes, bytearray, memoryview, a strided view or an array of wider items."""
    raw = draw(st.one_of(st.binary(max_size=300), H.payloads()))
    kind = draw(st.sampled_from(["bytes", "bytearray", "memoryview", "slice", "strided",
                                 "array-H", "array-I", "array-Q"]))
    if kind == "bytes":
        return raw
    if kind == "bytearray":
        return bytearray(raw)
    if kind == "memoryview":
        return memoryview(raw)
    if kind == "slice":
        return memoryview(b"xyz" + raw + b"tail")[3:3 + len(raw)]
    if kind == "strided":
        doubled = bytes(b for c in raw for b in (c, 0xEE))
        return memoryview(doubled)[::2]
    code = kind[-1]
    size = array.array(code).itemsize
    raw = raw[: len(raw) - len(raw) % size]
    return array.array(code, raw)


@FUZZ_MORE
@given(opcode=opcodes, payload=payload_objects(), mask_key=mask_key_args, fin=st.booleans())
def test_encode_frame_same_bytes(opcode, payload, mask_key, fin):
    compiled = _call(_relay.encode_frame, opcode, payload, mask_key, fin)
    pure = _call(_relay_py.encode_frame, opcode, payload, mask_key, fin)
    assert compiled == pure
    if compiled[0] == "ok":
        # and both are right: same as the independent builder
        key = None if mask_key is None else mask_key.to_bytes(4, "big")
        assert compiled[1] == H.build_frame(opcode, bytes(payload), fin=fin, mask_key=key)
        assert type(compiled[1]) is bytes and type(pure[1]) is bytes


@FUZZ
@given(opcode=st.sampled_from([0, 1, 2, 8, 9, 10]), payload=st.binary(max_size=300),
       mask_key=st.integers(-(2**40), 2**40), fin=st.booleans())
def test_encode_frame_mask_key_wider_than_32_bits(opcode, payload, mask_key, fin):
    # Both take the low 32 bits of any integer key.
    assert _call(_relay.encode_frame, opcode, payload, mask_key, fin) == _call(
        _relay_py.encode_frame, opcode, payload, mask_key, fin)


@st.composite
def encode_data_cases(draw):
    if draw(st.integers(0, 15)) == 0:  # a payload big enough for the 16- or 64-bit length
        size = draw(st.sampled_from([65511 + 38, 65512 + 38, 70000]))
    else:
        size = draw(st.integers(0, 400))
    content = random.Random(draw(st.integers(0, 2**32 - 1))).randbytes(size)
    start = draw(st.one_of(st.integers(-3, size + 3), st.integers(30, 42)))
    length = draw(st.one_of(st.integers(-3, size + 3), st.just(max(0, size - start))))
    channel = draw(st.one_of(H.channels, H.channels, H.channels, st.binary(max_size=20)))
    wrap = draw(st.sampled_from(["bytearray", "memoryview", "slice"]))
    return content, start, length, channel, wrap


def _wrap(content: bytes, wrap: str):
    """(owner, buffer passed to encode_data); ``bytes(owner)`` shows every byte written."""
    if wrap == "bytearray":
        buf = bytearray(content)
        return buf, buf
    if wrap == "memoryview":
        buf = bytearray(content)
        return buf, memoryview(buf)
    owner = bytearray(b"!!" + content + b"??")  # a view into the middle of a larger buffer
    return owner, memoryview(owner)[2:-2]


@FUZZ_MORE
@given(case=encode_data_cases(), mask_key=mask_key_args)
def test_encode_data_same_bytes(case, mask_key):
    content, start, length, channel, wrap = case
    results = []
    for mod in H.IMPLS:
        owner, buf = _wrap(content, wrap)
        outcome = _call(mod.encode_data, buf, start, length, channel, mask_key)
        results.append((outcome, bytes(owner)))
    assert results[0] == results[1]
    (outcome, after) = results[0]
    if outcome[0] == "ok":
        frame_start = outcome[1]
        if wrap == "slice":
            assert after[:2] == b"!!" and after[-2:] == b"??"
            after = after[2:-2]
        key = None if mask_key is None else mask_key.to_bytes(4, "big")
        body = H.data_message(channel, content[start:start + length])
        assert after[frame_start:start + length] == H.build_frame(H.OP_BINARY, body, mask_key=key)
        assert after[:frame_start] == content[:frame_start]  # nothing before the frame touched
        assert after[start + length:] == content[start + length:]  # nor after the payload


@FUZZ_MORE
@given(raw=st.binary(max_size=200), key=st.integers(0, 2**32 - 1),
       offset=st.one_of(st.integers(0, 3), st.integers(-9, 2**40)),
       kind=st.sampled_from(["bytearray", "slice", "array-H", "array-I"]))
def test_mask_same_bytes(raw, key, offset, kind):
    outs = []
    for mod in H.IMPLS:
        if kind == "bytearray":
            owner = buf = bytearray(raw)
        elif kind == "slice":
            owner = bytearray(b"ab" + raw + b"cd")
            buf = memoryview(owner)[2:-2]
        else:
            code = kind[-1]
            size = array.array(code).itemsize
            owner = buf = array.array(code, raw[: len(raw) - len(raw) % size])
        outs.append((_call(mod.mask, buf, key, offset), bytes(owner)))
    assert outs[0] == outs[1]
    if kind == "bytearray":
        assert outs[0][1] == H.xor_mask(raw, key.to_bytes(4, "big"), offset % 4)


@FUZZ
@given(raw=st.binary(max_size=100), key=st.integers(0, 2**32 - 1), split=st.integers(0, 100))
def test_mask_in_two_steps_equals_one(raw, key, split):
    """Masking [0:k] at offset 0 then [k:] at offset k equals masking everything at once."""
    split = min(split, len(raw))
    for mod in H.IMPLS:
        buf = bytearray(raw)
        view = memoryview(buf)
        mod.mask(view[:split], key, 0)
        mod.mask(view[split:], key, split)
        assert bytes(buf) == H.xor_mask(raw, key.to_bytes(4, "big"))


# ---------------------------------------------------------------------------
# round trip through both encoders and both decoders
# ---------------------------------------------------------------------------


@FUZZ
@given(payload=H.payloads(), channel=H.channels, key=st.integers(0, 2**32 - 1),
       chunks=H.chunkings, masked=st.booleans())
def test_encode_data_round_trip_across_implementations(payload, channel, key, chunks, masked):
    mask_key = key if masked else None
    for enc in H.IMPLS:
        buf = bytearray(_relay.HEADROOM) + bytearray(payload)
        start = enc.encode_data(buf, _relay.HEADROOM, len(payload), channel, mask_key)
        frame = bytes(buf[start:])
        for dec in H.IMPLS:
            out = H.decode(dec, frame, chunks, expect_masked=masked)
            assert out.error is None
            assert out.events == ([("DATA", channel, payload)] if payload else [])


def test_constants_agree():
    for name in ["NEED_DATA", "DATA", "MESSAGE", "PING", "PONG", "CLOSE", "TRUNCATED",
                 "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
                 "DATA_HEADER", "HEADROOM"]:
        assert getattr(_relay, name) == getattr(_relay_py, name), name
    assert _relay.HEADROOM == 2 + 8 + 4 + 24
    assert struct.calcsize("!BBB16sBI") == _relay.DATA_HEADER


def _hand_over(mod, stream: bytes, expect_masked: bool):
    """What the server does at authentication: a small decoder until its first message,
    then the bytes it holds unparsed go on in a full decoder, which decodes the rest."""
    small = mod.Decoder(expect_masked=expect_masked, max_message=4096, buffer_size=1024)
    pos, out = 0, []
    try:
        while True:
            ev = small.next_event()
            if ev == mod.MESSAGE:
                out.append(("first", bytes(small.data)))
                break
            if ev != mod.NEED_DATA:
                out.append(H.describe(mod, small, ev))
                continue
            space = small.get_buffer()
            n = min(len(space), len(stream) - pos)
            if n == 0:
                return out, ("no first message",)
            space[:n] = stream[pos:pos + n]
            small.feed(n)
            pos += n
        rest = small.take_unparsed() + stream[pos:]
    except (ProtocolError, ValueError) as exc:
        return out, (type(exc).__name__, str(exc))
    full = H.drive(mod, rest, expect_masked=expect_masked)
    return out, full.steps, full.error


@FUZZ
@given(case=plausible_frames())
def test_take_unparsed_hands_over_the_same_way(case):
    expect_masked, stream = case
    assert _hand_over(_relay, stream, expect_masked) == _hand_over(_relay_py, stream, expect_masked)


@pytest.mark.parametrize("mod", [_relay, _relay_py], ids=["compiled", "pure"])
def test_take_unparsed_only_between_messages(mod):
    d = mod.Decoder(expect_masked=False, buffer_size=1024)
    d.feed_bytes(H.build_frame(2, b"\x01\x55ab") + H.build_frame(2, b"\x01\x55cdef")[:3])
    assert d.next_event() == mod.MESSAGE and d.data == b"\x01\x55ab"
    assert d.take_unparsed() == H.build_frame(2, b"\x01\x55cdef")[:3]
    assert d.take_unparsed() == b""
    d.feed_bytes(H.build_frame(2, b"\x01\x55cdef")[:3])
    assert d.next_event() == mod.NEED_DATA
    with pytest.raises(ValueError):
        d.take_unparsed()

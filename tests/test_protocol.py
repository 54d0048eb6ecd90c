"""The LinkSocks message codec: golden bytes, round trips and hostile input."""

from __future__ import annotations

import gzip
import re
import uuid

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from trisocks.wire import protocol as p
from trisocks.wire.errors import MessageError

CH = bytes.fromhex("00112233445566778899aabbccddeeff")
INSTANCE = bytes.fromhex("0f0e0d0c0b0a09080706050403020100")
CH_HEX = CH.hex()


def h(text: str) -> bytes:
    """Hex with spaces and ``'ascii'`` runs, so golden vectors read like the table."""
    out = b""
    for i, part in enumerate(text.split("'")):
        out += part.encode() if i % 2 else bytes.fromhex(part)
    return out


# --- golden vectors, written by hand from the layout table --------------------

GOLDEN: list[tuple[p.Message, bytes]] = [
    (
        p.Auth("abc", True, INSTANCE),
        h("01 01  03 'abc'  01  0f0e0d0c0b0a09080706050403020100"),
    ),
    (p.Auth("", False, INSTANCE), h("01 01  00  00  0f0e0d0c0b0a09080706050403020100")),
    (p.AuthResponse(True), h("01 02  01")),
    (p.AuthResponse(False, "invalid token"), h("01 02  00  0d 'invalid token'")),
    (
        p.Connect(p.TCP, CH, "example.com", 443),
        h(f"01 03  01  {CH_HEX}  0b 'example.com'  01bb"),
    ),
    (p.Connect(p.UDP, CH), h(f"01 03  02  {CH_HEX}")),
    (p.ConnectResponse(True, CH), h(f"01 05  01  {CH_HEX}")),
    (
        p.ConnectResponse(False, CH, "connection refused"),
        h(f"01 05  00  {CH_HEX}  12 'connection refused'"),
    ),
    (p.Data(p.TCP, CH, b"abc"), h(f"01 04  01  {CH_HEX}  00  00000003 'abc'")),
    (
        # SOCKS side -> remote: the destination travels as the target.
        p.Data(p.UDP, CH, b"hi", target_address="8.8.8.8", target_port=53),
        h(f"01 04  02  {CH_HEX}  00  00000002 'hi'  00 0000  07 '8.8.8.8' 0035"),
    ),
    (
        # remote -> SOCKS side: the source travels as the address.
        p.Data(p.UDP, CH, b"", address="::1", port=5353),
        h(f"01 04  02  {CH_HEX}  00  00000000  03 '::1' 14e9  00 0000"),
    ),
    (p.Disconnect(CH), h(f"01 06  {CH_HEX}")),
    (p.Disconnect(CH, "EOF"), h(f"01 06  {CH_HEX}  03 'EOF'")),
    (p.Connector(CH, "tok", p.ADD), h(f"01 07  {CH_HEX}  03 'tok'  01")),
    (p.Connector(CH, "tok", p.REMOVE), h(f"01 07  {CH_HEX}  03 'tok'  02")),
    (p.ConnectorResponse(CH, True, token="tok"), h(f"01 08  {CH_HEX}  01  03 'tok'")),
    (p.ConnectorResponse(CH, True), h(f"01 08  {CH_HEX}  01")),
    (p.ConnectorResponse(CH, False, "exists"), h(f"01 08  {CH_HEX}  00  06 'exists'")),
    (p.Log("info", "hi"), h("""01 09  0000001b '{"level":"info","msg":"hi"}'""")),
    (p.Partners(2), h("""01 0a  0000000b '{"count":2}'""")),
    (p.Direct(p.T_DIRECT_STATUS, b"{}"), h("01 0d  00000002 '{}'")),
    (p.WindowUpdate(CH, 65536), h(f"01 70  {CH_HEX}  00010000")),
    (p.Unknown(0x42, b"\x01\x02"), h("01 42  0102")),
]


@pytest.mark.parametrize(("msg", "raw"), GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_pack(msg: p.Message, raw: bytes) -> None:
    assert p.pack(msg) == raw


@pytest.mark.parametrize(("msg", "raw"), GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_parse(msg: p.Message, raw: bytes) -> None:
    assert p.parse(raw) == msg


def test_constants() -> None:
    assert p.PROTOCOL_VERSION == 0x01
    assert (p.T_AUTH, p.T_PARTNERS, p.T_DIRECT_STATUS, p.T_WINDOW_UPDATE) == (1, 10, 13, 0x70)


# --- round trips of every message type ----------------------------------------

S255 = "é" * 127 + "x"  # exactly 255 bytes of UTF-8

ROUND_TRIP: list[p.Message] = [
    p.Auth(S255, True, INSTANCE),
    p.AuthResponse(False, S255),
    p.AuthResponse(False),
    p.Connect(p.TCP, CH, S255, 65535),
    p.Connect(p.TCP, CH, "", 0),
    p.ConnectResponse(False, CH, S255),
    p.Data(p.TCP, CH, b"\x00" * 70000),
    p.Data(p.TCP, CH, b"payload " * 1000, p.COMPRESSION_GZIP),
    p.Data(p.TCP, CH, b"", p.COMPRESSION_GZIP),
    p.Data(p.UDP, CH, b"dgram", p.COMPRESSION_GZIP, target_address=S255, target_port=1),
    p.Data(p.UDP, CH, b"dgram", address="2001:db8::1", port=65535),
    p.Disconnect(CH, S255),
    p.Connector(CH, S255, p.REMOVE),
    p.ConnectorResponse(CH, True, token=S255),
    p.ConnectorResponse(CH, False, S255),
    p.Log("", ""),
    p.Log("warn", 'quote " backslash \\ newline \n ünïcode ☃'),
    p.Partners(0),
    p.Partners(-1),
    p.Partners((1 << 63) - 1),
    p.Direct(p.T_DIRECT_CAPABILITIES, b'{"session_id":"x"}'),
    p.Direct(p.T_DIRECT_RENDEZVOUS, b"not even json"),
    p.WindowUpdate(CH, 0),
    p.WindowUpdate(CH, 0xFFFFFFFF),
    p.Unknown(0x00, b""),
    p.Unknown(0xFF, b"\xff" * 300),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=lambda v: type(v).__name__)
def test_round_trip(msg: p.Message) -> None:
    assert p.parse(p.pack(msg)) == msg


def test_gzip_data_is_compressed_on_the_wire() -> None:
    data = b"a" * 100_000
    raw = p.pack(p.Data(p.TCP, CH, data, p.COMPRESSION_GZIP))
    assert len(raw) < 1000
    assert raw[19] == p.COMPRESSION_GZIP
    assert gzip.decompress(raw[24:]) == data


def test_parse_accepts_any_bytes_like_and_returns_bytes() -> None:
    raw = p.pack(p.Data(p.TCP, CH, b"xyz"))
    for buf in (bytearray(raw), memoryview(raw)):
        msg = p.parse(buf)  # type: ignore[arg-type]
        assert msg == p.Data(p.TCP, CH, b"xyz")
        assert isinstance(msg, p.Data)
        assert type(msg.data) is bytes and type(msg.channel) is bytes


# --- leniency that LinkSocks and pywssocks rely on ----------------------------


def test_minor_version_accepted_major_refused() -> None:
    raw = p.pack(p.Disconnect(CH))
    for version in (0x00, 0x02, 0x0F):
        assert p.parse(bytes((version,)) + raw[1:]) == p.Disconnect(CH)
        assert p.version_of(bytes((version,)) + raw[1:]) == version
    for version in (0x10, 0x11, 0x21, 0xFF):
        with pytest.raises(MessageError, match="major version"):
            p.parse(bytes((version,)) + raw[1:])


def test_version_of() -> None:
    assert p.version_of(b"\x01") == 1
    with pytest.raises(MessageError):
        p.version_of(b"")


@pytest.mark.parametrize("msg_type", [0x00, 0x0E, 0x6F, 0x72, 0xFF])
def test_unknown_type_is_not_an_error(msg_type: int) -> None:
    assert p.parse(bytes((1, msg_type)) + b"body") == p.Unknown(msg_type, b"body")
    assert p.parse(bytes((1, msg_type))) == p.Unknown(msg_type, b"")


@pytest.mark.parametrize(("msg", "raw"), GOLDEN, ids=lambda v: type(v).__name__)
def test_trailing_bytes_are_ignored(msg: p.Message, raw: bytes) -> None:
    if isinstance(msg, p.Unknown | p.Disconnect | p.AuthResponse | p.ConnectResponse):
        return  # the body is everything / optional trailing fields change meaning
    if isinstance(msg, p.ConnectorResponse) and not msg.token and msg.success:
        return
    assert p.parse(raw + b"\x00garbage") == msg


def test_trailing_bytes_after_optional_fields() -> None:
    assert p.parse(p.pack(p.Disconnect(CH, "x")) + b"zz") == p.Disconnect(CH, "x")
    assert p.parse(p.pack(p.AuthResponse(True)) + b"zz") == p.AuthResponse(True)
    assert p.parse(p.pack(p.ConnectResponse(True, CH)) + b"z") == p.ConnectResponse(True, CH)


def test_disconnect_with_zero_error_length() -> None:
    assert p.parse(h(f"01 06 {CH_HEX} 00")) == p.Disconnect(CH, "")


def test_failures_without_error_text() -> None:
    # LinkSocks accepts these; pywssocks sends them when it has no error text.
    assert p.parse(h("01 02 00")) == p.AuthResponse(False, "")
    assert p.parse(h(f"01 05 00 {CH_HEX}")) == p.ConnectResponse(False, CH, "")
    assert p.parse(h(f"01 08 {CH_HEX} 00")) == p.ConnectorResponse(CH, False, "")


def test_nonzero_flags_are_true() -> None:
    assert p.parse(h("01 02 07")) == p.AuthResponse(True)
    assert p.parse(h(f"01 01 00 ff {INSTANCE.hex()}")) == p.Auth("", True, INSTANCE)


def test_error_texts_are_decoded_leniently() -> None:
    # Go cuts long errors at a byte count, possibly mid-character.
    raw = h(f"01 06 {CH_HEX} 03 'ab' c3")
    assert p.parse(raw) == p.Disconnect(CH, "ab\ufffd")
    raw = h(f"01 05 00 {CH_HEX} 01 ff")
    assert p.parse(raw) == p.ConnectResponse(False, CH, "\ufffd")


def test_json_missing_and_extra_fields() -> None:
    def log(body: bytes) -> bytes:
        return h("01 09") + len(body).to_bytes(4, "big") + body

    assert p.parse(log(b"{}")) == p.Log("", "")
    assert p.parse(log(b'{"msg":"m","extra":[1,2],"level":"debug"}')) == p.Log("debug", "m")
    assert p.parse(h("01 0a 00000002 '{}'")) == p.Partners(0)


# --- malformed input ----------------------------------------------------------

MALFORMED: list[tuple[bytes, str]] = [
    (b"", "shorter than its header"),
    (b"\x01", "shorter than its header"),
    (h("01 01"), "Auth: truncated token length"),
    (h("01 01 05 'abc'"), "Auth: truncated token"),
    (h("01 01 03 'abc' 01 0011"), "Auth: truncated reverse"),
    (h("01 01 02 ff fe 00") + INSTANCE, "Auth: token is not valid UTF-8"),
    (h("01 02"), "AuthResponse: truncated success"),
    (h("01 02 00 05 'abc'"), "AuthResponse: truncated error"),
    (h(f"01 03 01 {CH_HEX[:20]}"), "Connect: truncated protocol and channel"),
    (h(f"01 03 03 {CH_HEX}"), "Connect: unknown protocol 0x03"),
    (h(f"01 03 00 {CH_HEX}"), "Connect: unknown protocol 0x00"),
    (h(f"01 03 01 {CH_HEX}"), "Connect: truncated address length"),
    (h(f"01 03 01 {CH_HEX} 04 'abc'"), "Connect: truncated address"),
    (h(f"01 03 01 {CH_HEX} 03 'abc' 01"), "Connect: truncated port"),
    (h(f"01 03 01 {CH_HEX} 02 c328 0050"), "Connect: address is not valid UTF-8"),
    (h(f"01 04 01 {CH_HEX} 00 000000"), "Data: truncated header"),
    (h(f"01 04 01 {CH_HEX} 00 00000005 'abc'"), "Data: truncated payload"),
    (h(f"01 04 05 {CH_HEX} 00 00000000"), "Data: unknown protocol"),
    (h(f"01 04 01 {CH_HEX} 02 00000000"), "Data: unknown compression 0x02"),
    (h(f"01 04 02 {CH_HEX} 00 00000000"), "Data: truncated UDP address length"),
    (h(f"01 04 02 {CH_HEX} 00 00000000 00 00"), "Data: truncated UDP port"),
    (h(f"01 04 02 {CH_HEX} 00 00000000 00 0000"), "Data: truncated UDP target address length"),
    (h(f"01 04 02 {CH_HEX} 00 00000000 00 0000 01 'x' 00"), "Data: truncated UDP target port"),
    (h(f"01 04 02 {CH_HEX} 00 00000000 01 ff 0000 00 0000"), "Data: UDP address is not valid"),
    (h(f"01 04 01 {CH_HEX} 01 00000003 'abc'"), "Data: bad gzip"),
    (h(f"01 04 01 {CH_HEX} 01 00000000"), "Data: truncated gzip"),
    (h(f"01 06 {CH_HEX[:30]}"), "Disconnect: truncated channel"),
    (h(f"01 06 {CH_HEX} 05 'abc'"), "Disconnect: truncated error"),
    (h(f"01 07 {CH_HEX}"), "Connector: truncated token length"),
    (h(f"01 07 {CH_HEX} 03 'tok'"), "Connector: truncated operation"),
    (h(f"01 07 {CH_HEX} 03 'tok' 03"), "Connector: unknown operation 0x03"),
    (h(f"01 07 {CH_HEX} 01 80 01"), "Connector: token is not valid UTF-8"),
    (h(f"01 08 {CH_HEX}"), "ConnectorResponse: truncated channel id and success"),
    (h(f"01 08 {CH_HEX} 00 04 'abc'"), "ConnectorResponse: truncated error"),
    (h(f"01 08 {CH_HEX} 01 04 'abc'"), "ConnectorResponse: truncated token"),
    (h(f"01 08 {CH_HEX} 01 01 ff"), "ConnectorResponse: token is not valid UTF-8"),
    (h("01 09 000000"), "Log: truncated JSON body length"),
    (h("01 09 00000005 '{}'"), "Log: truncated JSON body"),
    (h("01 09 00000002 '[]'"), "Log: bad JSON"),
    (h("01 09 00000004 'null'"), "Log: bad JSON"),
    (h("""01 09 0000000b '{"level":1}'"""), "Log: bad JSON"),
    (h("01 09 00000001 '{'"), "Log: bad JSON"),
    (h("01 09 00000001 ff"), "Log: bad JSON"),
    (h("""01 09 0000000c '{"level":"' a2 '"}'"""), "Log: bad JSON"),  # bad UTF-8 in a string
    (h("""01 0a 0000000d '{"count":"2"}'"""), "Partners: bad JSON"),
    (h("""01 0a 0000000d '{"count":2.5}'"""), "Partners: bad JSON"),
    (h("""01 0a 0000000e '{"count":true}'"""), "Partners: bad JSON"),
    (h("""01 0a 0000001d '{"count":9223372036854775808}'"""), "Partners: bad JSON"),
    (h("01 0b 00000003 '{}'"), "Direct 0x0B: truncated JSON body"),
    (h("01 0c"), "Direct 0x0C: truncated JSON body length"),
    (h(f"01 70 {CH_HEX} 0000"), "WindowUpdate: truncated"),
]


@pytest.mark.parametrize(("raw", "error"), MALFORMED)
def test_malformed(raw: bytes, error: str) -> None:
    with pytest.raises(MessageError, match=re.escape(error)):
        p.parse(raw)


STRICT_PREFIXES = [
    m
    for m, _ in GOLDEN
    if not isinstance(
        m, p.Unknown | p.Disconnect | p.AuthResponse | p.ConnectResponse | p.ConnectorResponse
    )
]


@pytest.mark.parametrize("msg", STRICT_PREFIXES, ids=lambda v: type(v).__name__)
def test_every_truncation_is_an_error(msg: p.Message) -> None:
    raw = p.pack(msg)
    for n in range(len(raw)):
        with pytest.raises(MessageError):
            p.parse(raw[:n])


# --- gzip ---------------------------------------------------------------------


def _gzip_data(payload: bytes, protocol: int = p.TCP) -> bytes:
    body = gzip.compress(payload)
    head = bytes((1, p.T_DATA, protocol)) + CH + b"\x01" + len(body).to_bytes(4, "big")
    return head + body


def test_decompression_bound() -> None:
    raw = _gzip_data(b"\x00" * 10_000)
    assert p.parse(raw, max_decompressed=10_000) == p.Data(p.TCP, CH, b"\x00" * 10_000, 1)
    with pytest.raises(MessageError, match="inflates beyond 9999 bytes"):
        p.parse(raw, max_decompressed=9_999)


def test_default_decompression_bound_stops_a_bomb() -> None:
    raw = _gzip_data(b"\x00" * ((32 << 20) + 1))
    assert len(raw) < 64 << 10
    with pytest.raises(MessageError, match="inflates beyond"):
        p.parse(raw)


def test_gzip_members_are_concatenated_and_share_the_bound() -> None:
    body = gzip.compress(b"abc") + gzip.compress(b"def")
    raw = bytes((1, p.T_DATA, p.TCP)) + CH + b"\x01" + len(body).to_bytes(4, "big") + body
    assert p.parse(raw) == p.Data(p.TCP, CH, b"abcdef", 1)
    assert p.parse(raw, max_decompressed=6) == p.Data(p.TCP, CH, b"abcdef", 1)
    with pytest.raises(MessageError, match="inflates beyond 5 bytes"):
        p.parse(raw, max_decompressed=5)


def test_gzip_trailing_garbage_is_an_error() -> None:
    body = gzip.compress(b"abc") + b"junk"
    raw = bytes((1, p.T_DATA, p.TCP)) + CH + b"\x01" + len(body).to_bytes(4, "big") + body
    with pytest.raises(MessageError, match="gzip"):
        p.parse(raw)


def test_gzip_truncated_payload_is_an_error() -> None:
    raw = _gzip_data(b"hello world" * 10)
    body = raw[24:-3]
    head = raw[:20] + len(body).to_bytes(4, "big")
    with pytest.raises(MessageError, match="gzip"):
        p.parse(head + body)


# --- pack refuses what the wire cannot carry ----------------------------------

UNPACKABLE: list[p.Message] = [
    p.Auth("x" * 256, False, INSTANCE),
    p.Auth("é" * 128, False, INSTANCE),  # 128 characters, 256 bytes
    p.Auth("t", False, INSTANCE[:15]),
    p.Auth("\ud800", False, INSTANCE),  # not encodable as UTF-8
    p.AuthResponse(True, "error on success"),
    p.Connect(p.TCP, CH, "host", 65536),
    p.Connect(p.TCP, CH, "host", -1),
    p.Connect(p.TCP, CH + b"\x00", "host", 80),
    p.Connect(3, CH),
    p.Connect(p.UDP, CH, "udp connect has no address"),
    p.ConnectResponse(True, CH, "error on success"),
    p.ConnectResponse(False, b"short"),
    p.Data(0, CH, b""),
    p.Data(p.TCP, CH, b"", compression=2),
    p.Data(p.TCP, CH, b"", address="tcp data has no address"),
    p.Data(p.TCP, CH, b"", target_port=1),
    p.Data(p.UDP, CH, b"", target_address="h", target_port=70000),
    p.Data(p.UDP, CH, b"", address="a" * 256),
    p.Disconnect(b""),
    p.Connector(CH, "tok", 3),
    p.Connector(CH, "t" * 256, p.ADD),
    p.ConnectorResponse(CH, False, "err", token="token on failure"),
    p.ConnectorResponse(CH, True, error="error on success"),
    p.Log("info", "\udcff"),
    p.Partners(1 << 63),
    p.Partners(True),
    p.Direct(p.T_LOG, b"{}"),
    p.WindowUpdate(CH, -1),
    p.WindowUpdate(CH, 1 << 32),
    p.Unknown(p.T_DATA, b""),
    p.Unknown(256, b""),
]


@pytest.mark.parametrize(
    "msg",
    [
        p.AuthResponse(False, "e" * 300),
        p.ConnectResponse(False, CH, "é" * 200),
        p.Disconnect(CH, "e" * 256),
        p.ConnectorResponse(CH, False, "x" * 1000),
    ],
    ids=lambda v: type(v).__name__,
)
def test_long_error_texts_are_cut_to_255_bytes(msg: p.Message) -> None:
    # Error texts come from the OS or from Go; they are cut rather than refused,
    # on a UTF-8 character boundary.
    back = p.parse(p.pack(msg))
    assert len(back.error.encode()) <= 255
    assert msg.error.startswith(back.error)
    assert len(back.error.encode()) > 250


@pytest.mark.parametrize("msg", UNPACKABLE, ids=lambda v: type(v).__name__)
def test_pack_refuses(msg: p.Message) -> None:
    with pytest.raises(ValueError):
        p.pack(msg)


def test_pack_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        p.pack(object())  # type: ignore[arg-type]


# --- helpers ------------------------------------------------------------------


def test_new_channel_id_is_a_uuid4() -> None:
    ids = {p.new_channel_id() for _ in range(100)}
    assert len(ids) == 100
    for channel in ids:
        assert len(channel) == 16
        assert uuid.UUID(bytes=channel).version == 4


def test_channel_str() -> None:
    assert p.channel_str(CH) == "00112233-4455-6677-8899-aabbccddeeff"
    assert p.channel_str(b"\x01\x02") == "0102"  # never raises in a log line


# --- property tests -----------------------------------------------------------

# Up to 63 characters is at most 252 bytes; the second branch hits the 255 limit.
names = st.text(max_size=63) | st.text(alphabet="ab", min_size=255, max_size=255)
channels = st.binary(min_size=16, max_size=16)
ports = st.integers(0, 0xFFFF)
payloads = st.binary(max_size=2048)
compressions = st.sampled_from([p.COMPRESSION_NONE, p.COMPRESSION_GZIP])
KNOWN_TYPES = {
    p.T_AUTH,
    p.T_AUTH_RESPONSE,
    p.T_CONNECT,
    p.T_DATA,
    p.T_CONNECT_RESPONSE,
    p.T_DISCONNECT,
    p.T_CONNECTOR,
    p.T_CONNECTOR_RESPONSE,
    p.T_LOG,
    p.T_PARTNERS,
    p.T_DIRECT_CAPABILITIES,
    p.T_DIRECT_RENDEZVOUS,
    p.T_DIRECT_STATUS,
    p.T_WINDOW_UPDATE,
}

messages: st.SearchStrategy[p.Message] = st.one_of(
    st.builds(p.Auth, names, st.booleans(), channels),
    st.builds(p.AuthResponse, st.just(True)),
    st.builds(p.AuthResponse, st.just(False), names),
    st.builds(p.Connect, st.just(p.TCP), channels, names, ports),
    st.builds(p.Connect, st.just(p.UDP), channels),
    st.builds(p.ConnectResponse, st.just(True), channels),
    st.builds(p.ConnectResponse, st.just(False), channels, names),
    st.builds(p.Data, st.just(p.TCP), channels, payloads, compressions),
    st.builds(p.Data, st.just(p.UDP), channels, payloads, compressions, names, ports, names, ports),
    st.builds(p.Disconnect, channels, names),
    st.builds(p.Connector, channels, names, st.sampled_from([p.ADD, p.REMOVE])),
    st.builds(p.ConnectorResponse, channels, st.just(True), st.just(""), names),
    st.builds(p.ConnectorResponse, channels, st.just(False), names),
    st.builds(p.Log, st.text(), st.text()),
    st.builds(p.Partners, st.integers(-(1 << 63), (1 << 63) - 1)),
    st.builds(
        p.Direct,
        st.sampled_from([p.T_DIRECT_CAPABILITIES, p.T_DIRECT_RENDEZVOUS, p.T_DIRECT_STATUS]),
        payloads,
    ),
    st.builds(p.WindowUpdate, channels, st.integers(0, 0xFFFFFFFF)),
    st.builds(p.Unknown, st.integers(0, 255).filter(lambda t: t not in KNOWN_TYPES), payloads),
)


@given(messages)
def test_property_round_trip(msg: p.Message) -> None:
    assert p.parse(p.pack(msg)) == msg


def _parse_or_message_error(raw: bytes, **kwargs: int) -> None:
    try:
        p.parse(raw, **kwargs)
    except MessageError:
        pass


@given(st.binary(max_size=512))
@example(b"")
def test_property_random_bytes(raw: bytes) -> None:
    _parse_or_message_error(raw)


@given(
    st.sampled_from([0x01, 0x00, 0x0F, 0x10]),
    st.sampled_from(sorted(KNOWN_TYPES)) | st.integers(0, 255),
    st.binary(max_size=512),
)
def test_property_random_bodies(version: int, msg_type: int, body: bytes) -> None:
    # Biased towards valid headers so the body parsers get most of the noise.
    _parse_or_message_error(bytes((version, msg_type)) + body, max_decompressed=1 << 16)


@given(messages, st.data())
def test_property_truncations_and_corruptions(msg: p.Message, data: st.DataObject) -> None:
    raw = p.pack(msg)
    _parse_or_message_error(raw[: data.draw(st.integers(0, len(raw)), label="cut")])
    if len(raw) > 2:
        i = data.draw(st.integers(1, len(raw) - 1), label="index")
        flipped = raw[:i] + bytes((raw[i] ^ data.draw(st.integers(1, 255)),)) + raw[i + 1 :]
        _parse_or_message_error(flipped)


def test_gzip_members_are_capped_and_linear() -> None:
    member = gzip.compress(b"")
    body = member * ((1 << 20) // len(member))  # ~50,000 empty members: was 17 s of work
    raw = bytes((1, p.T_DATA, p.TCP)) + CH + b"\x01" + len(body).to_bytes(4, "big") + body
    with pytest.raises(MessageError, match="members"):
        p.parse(raw)
    body = member * p.MAX_GZIP_MEMBERS
    raw = bytes((1, p.T_DATA, p.TCP)) + CH + b"\x01" + len(body).to_bytes(4, "big") + body
    assert p.parse(raw) == p.Data(p.TCP, CH, b"", 1)

"""The LinkSocks v0x01 message codec, sans-IO.

Every LinkSocks message travels as one binary WebSocket message::

    Version(1) Type(1) Body

Integers are big-endian, strings carry a 1-byte length (at most 255 bytes of
UTF-8) and channel / instance ids are 16 raw UUID bytes. :func:`pack` turns a
message object into bytes and :func:`parse` turns bytes back into one; neither
does any I/O, so both serve the client, the server and the tests alike.

``pack`` refuses (``ValueError``) anything the wire cannot carry exactly, so that
``parse(pack(m)) == m`` holds for every message it accepts. ``parse`` raises
nothing but :class:`~trisocks.wire.errors.MessageError`, whatever the input: a peer
must never be able to crash a connection with a malformed message. Where
LinkSocks is lenient (trailing bytes, a minor version bump, an unknown type), so
is ``parse``.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeAlias

import msgspec

from .csprng import random16
from .errors import MessageError

__all__ = [
    "ADD",
    "COMPRESSION_GZIP",
    "COMPRESSION_NONE",
    "PROTOCOL_VERSION",
    "REMOVE",
    "TCP",
    "T_AUTH",
    "T_AUTH_RESPONSE",
    "T_CONNECT",
    "T_CONNECTOR",
    "T_CONNECTOR_RESPONSE",
    "T_CONNECT_RESPONSE",
    "T_DATA",
    "T_DIRECT_CAPABILITIES",
    "T_DIRECT_RENDEZVOUS",
    "T_DIRECT_STATUS",
    "T_DISCONNECT",
    "T_LOG",
    "T_PARTNERS",
    "T_WINDOW_UPDATE",
    "T_EOF",
    "UDP",
    "Auth",
    "AuthResponse",
    "Connect",
    "ConnectResponse",
    "Connector",
    "ConnectorResponse",
    "Data",
    "Direct",
    "Disconnect",
    "Log",
    "Message",
    "MessageError",
    "Partners",
    "Unknown",
    "WindowUpdate",
    "Eof",
    "channel_str",
    "new_channel_id",
    "pack",
    "parse",
    "version_of",
]

PROTOCOL_VERSION = 0x01  # high nibble major, low nibble minor

TCP, UDP = 0x01, 0x02
ADD, REMOVE = 0x01, 0x02
COMPRESSION_NONE, COMPRESSION_GZIP = 0x00, 0x01

T_AUTH = 0x01
T_AUTH_RESPONSE = 0x02
T_CONNECT = 0x03
T_DATA = 0x04
T_CONNECT_RESPONSE = 0x05
T_DISCONNECT = 0x06
T_CONNECTOR = 0x07
T_CONNECTOR_RESPONSE = 0x08
T_LOG = 0x09
T_PARTNERS = 0x0A
T_DIRECT_CAPABILITIES = 0x0B
T_DIRECT_RENDEZVOUS = 0x0C
T_DIRECT_STATUS = 0x0D
# trisocks extension: only ever sent to peers that negotiated it, so LinkSocks
# never sees it (and would drop it as an unknown type if it did).
T_WINDOW_UPDATE = 0x70
T_EOF = 0x71  # half-close: the sender's socket ended its direction (negotiated with "eof=1")

_DIRECT_TYPES = frozenset((T_DIRECT_CAPABILITIES, T_DIRECT_RENDEZVOUS, T_DIRECT_STATUS))

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_MAX_U32 = 0xFFFFFFFF
_DEFAULT_MAX_DECOMPRESSED = 32 << 20  # LinkSocks' own cap on one WebSocket message
MAX_GZIP_MEMBERS = 64  # concatenated gzip members in one Data payload (LinkSocks writes one)
_GZIP_STEP = 64 << 10  # input fed to zlib at a time


# --- messages -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    """First message of a client; ``reverse`` asks to become a provider."""

    token: str
    reverse: bool
    instance: bytes  # 16 bytes, random per client process


@dataclass(frozen=True, slots=True)
class AuthResponse:
    success: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class Connect:
    """Opens a channel; a UDP channel (UDP ASSOCIATE) carries no address."""

    protocol: int
    channel: bytes
    address: str = ""
    port: int = 0


@dataclass(frozen=True, slots=True)
class ConnectResponse:
    success: bool
    channel: bytes
    error: str = ""


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes of one channel.

    ``data`` is always the plain payload: with ``compression=COMPRESSION_GZIP``
    :func:`pack` compresses it and :func:`parse` decompresses it.

    On a UDP channel each message is one datagram. Going from the SOCKS side to
    the remote side it names its destination in ``target_address`` /
    ``target_port`` (``address`` empty, ``port`` 0); coming back it names its
    source in ``address`` / ``port`` (target empty). TCP data has no addresses.
    """

    protocol: int
    channel: bytes
    data: bytes
    compression: int = COMPRESSION_NONE
    address: str = ""
    port: int = 0
    target_address: str = ""
    target_port: int = 0


@dataclass(frozen=True, slots=True)
class Disconnect:
    channel: bytes
    error: str = ""


@dataclass(frozen=True, slots=True)
class Connector:
    """A provider adds or removes one of its connector tokens (autonomy mode)."""

    channel: bytes
    token: str
    operation: int  # ADD or REMOVE


@dataclass(frozen=True, slots=True)
class ConnectorResponse:
    channel: bytes
    success: bool
    error: str = ""
    token: str = ""


@dataclass(frozen=True, slots=True)
class Log:
    level: str
    msg: str


@dataclass(frozen=True, slots=True)
class Partners:
    """How many peers are on the other side of the server."""

    count: int


@dataclass(frozen=True, slots=True)
class Direct:
    """LinkSocks peer-to-peer signalling (0x0B-0x0D): relayed opaquely, never interpreted."""

    type: int
    payload: bytes  # the raw JSON body, not validated


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    """trisocks flow control: the receiver grants ``credit`` more bytes on a channel."""

    channel: bytes
    credit: int


@dataclass(frozen=True, slots=True)
class Eof:
    """trisocks half-close: no more Data will come on ``channel`` from the sender (its socket
    sent EOF); the other direction goes on until the receiver's own Eof or a Disconnect."""

    channel: bytes


@dataclass(frozen=True, slots=True)
class Unknown:
    """A type this codec does not know; callers log and drop it."""

    type: int
    body: bytes


Message: TypeAlias = (
    Auth
    | AuthResponse
    | Connect
    | ConnectResponse
    | Data
    | Disconnect
    | Connector
    | ConnectorResponse
    | Log
    | Partners
    | Direct
    | WindowUpdate
    | Eof
    | Unknown
)


# JSON bodies. Missing fields read as zero values, like Go's encoding/json does.
class _LogBody(msgspec.Struct):
    level: str = ""
    msg: str = ""


_Int64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # Go's int


class _PartnersBody(msgspec.Struct):
    count: _Int64 = 0


_log_decoder = msgspec.json.Decoder(_LogBody)
_partners_decoder = msgspec.json.Decoder(_PartnersBody)
_json_encode = msgspec.json.encode


# --- helpers ------------------------------------------------------------------




def new_channel_id() -> bytes:
    """16 random bytes shaped as a UUID4 (LinkSocks parses them as one).

    From the OS's CSPRNG (buffered, see csprng.py): a guessable id would let a peer that
    shares a provider aim messages at another user's channel.
    """
    raw = bytearray(random16())
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return bytes(raw)


def channel_str(channel: bytes) -> str:
    """Canonical UUID text of a channel id, for logs."""
    if len(channel) != 16:  # never let a log line raise
        return bytes(channel).hex()
    return str(uuid.UUID(bytes=bytes(channel)))


def version_of(data: bytes) -> int:
    """The version byte of a message (to warn about a different minor version)."""
    if not data:
        raise MessageError("empty message: no version byte")
    return data[0]


# --- pack ---------------------------------------------------------------------


def _head(msg_type: int) -> bytes:
    return bytes((PROTOCOL_VERSION, msg_type))


def _str8(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"{what} is {len(raw)} bytes of UTF-8; the wire allows 255")
    return bytes((len(raw),)) + raw


def _text8(value: str) -> bytes:
    """An error text: longer ones (a Go DNS error, say) are cut at 255 bytes, on a UTF-8 boundary."""
    raw = value.encode()
    if len(raw) > 255:
        raw = raw[:255].decode("utf-8", "ignore").encode()
    return bytes((len(raw),)) + raw


def _id16(value: bytes, what: str) -> bytes:
    if len(value) != 16:
        raise ValueError(f"{what} must be 16 bytes, got {len(value)}")
    return bytes(value)


def _port(value: int, what: str) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what} {value} is outside 0..65535")
    return _U16.pack(value)


def _lost(value: object, what: str) -> None:
    # A field the layout has no room for would be silently dropped: refuse it.
    if value:
        raise ValueError(f"{what} has no place on the wire and would be lost")


def _pack_auth(m: Auth) -> bytes:
    return b"".join(
        (
            _head(T_AUTH),
            _str8(m.token, "Auth token"),
            b"\x01" if m.reverse else b"\x00",
            _id16(m.instance, "Auth instance"),
        )
    )


def _pack_auth_response(m: AuthResponse) -> bytes:
    if m.success:
        _lost(m.error, "an AuthResponse error on success")
        return _head(T_AUTH_RESPONSE) + b"\x01"
    return _head(T_AUTH_RESPONSE) + b"\x00" + _text8(m.error)


def _pack_connect(m: Connect) -> bytes:
    head = _head(T_CONNECT) + bytes((_protocol(m.protocol),)) + _id16(m.channel, "channel")
    if m.protocol == TCP:
        return head + _str8(m.address, "Connect address") + _port(m.port, "Connect port")
    _lost(m.address or m.port, "a UDP Connect address/port")
    return head


def _pack_connect_response(m: ConnectResponse) -> bytes:
    head = _head(T_CONNECT_RESPONSE) + (b"\x01" if m.success else b"\x00")
    head += _id16(m.channel, "channel")
    if m.success:
        _lost(m.error, "a ConnectResponse error on success")
        return head
    return head + _text8(m.error)


def _pack_data(m: Data) -> bytes:
    protocol = _protocol(m.protocol)
    payload = m.data
    if m.compression == COMPRESSION_GZIP:
        payload = _gzip(payload)
    elif m.compression != COMPRESSION_NONE:
        raise ValueError(f"unknown Data compression {m.compression}")
    if len(payload) > _MAX_U32:
        raise ValueError("Data payload does not fit a 4-byte length")
    parts = [
        _head(T_DATA),
        bytes((protocol,)),
        _id16(m.channel, "channel"),
        bytes((m.compression,)),
        _U32.pack(len(payload)),
        payload,
    ]
    if protocol == UDP:
        parts += (
            _str8(m.address, "Data address"),
            _port(m.port, "Data port"),
            _str8(m.target_address, "Data target address"),
            _port(m.target_port, "Data target port"),
        )
    else:
        _lost(m.address or m.port or m.target_address or m.target_port, "a TCP Data address")
    return b"".join(parts)


def _pack_disconnect(m: Disconnect) -> bytes:
    head = _head(T_DISCONNECT) + _id16(m.channel, "channel")
    # No error text means no ErrorLen byte at all, as LinkSocks sends it.
    return head + _text8(m.error) if m.error else head


def _pack_connector(m: Connector) -> bytes:
    if m.operation not in (ADD, REMOVE):
        raise ValueError(f"unknown Connector operation {m.operation}")
    return b"".join(
        (
            _head(T_CONNECTOR),
            _id16(m.channel, "channel"),
            _str8(m.token, "Connector token"),
            bytes((m.operation,)),
        )
    )


def _pack_connector_response(m: ConnectorResponse) -> bytes:
    head = _head(T_CONNECTOR_RESPONSE) + _id16(m.channel, "channel")
    if not m.success:
        _lost(m.token, "a ConnectorResponse token on failure")
        return head + b"\x00" + _text8(m.error)
    _lost(m.error, "a ConnectorResponse error on success")
    return head + b"\x01" + (_str8(m.token, "ConnectorResponse token") if m.token else b"")


def _json_message(msg_type: int, body: bytes) -> bytes:
    if len(body) > _MAX_U32:
        raise ValueError("JSON body does not fit a 4-byte length")
    return _head(msg_type) + _U32.pack(len(body)) + body


def _pack_log(m: Log) -> bytes:
    return _json_message(T_LOG, _json_encode(_LogBody(m.level, m.msg)))


def _pack_partners(m: Partners) -> bytes:
    if type(m.count) is not int or not -(1 << 63) <= m.count < 1 << 63:
        raise ValueError(f"Partners count {m.count!r} is not a 64-bit integer")
    return _json_message(T_PARTNERS, _json_encode(_PartnersBody(m.count)))


def _pack_direct(m: Direct) -> bytes:
    if m.type not in _DIRECT_TYPES:
        raise ValueError(f"type 0x{m.type:02X} is not a Direct message type")
    return _json_message(m.type, bytes(m.payload))


def _pack_window_update(m: WindowUpdate) -> bytes:
    if not 0 <= m.credit <= _MAX_U32:
        raise ValueError(f"WindowUpdate credit {m.credit} is outside 0..2**32-1")
    return _head(T_WINDOW_UPDATE) + _id16(m.channel, "channel") + _U32.pack(m.credit)


def _pack_eof(m: Eof) -> bytes:
    return _head(T_EOF) + _id16(m.channel, "channel")


def _pack_unknown(m: Unknown) -> bytes:
    if not 0 <= m.type <= 0xFF or m.type in _PARSERS:
        raise ValueError(f"type {m.type} is known or not a byte; use its own class")
    return _head(m.type) + bytes(m.body)


def _protocol(value: int) -> int:
    if value not in (TCP, UDP):
        raise ValueError(f"unknown channel protocol {value}")
    return value


def _gzip(data: bytes) -> bytes:
    # wbits=31 writes a bare gzip member (no name, mtime 0: deterministic output);
    # level 6 is Go's default, which LinkSocks uses.
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


_PACKERS: dict[type, Callable[[Any], bytes]] = {
    Auth: _pack_auth,
    AuthResponse: _pack_auth_response,
    Connect: _pack_connect,
    ConnectResponse: _pack_connect_response,
    Data: _pack_data,
    Disconnect: _pack_disconnect,
    Connector: _pack_connector,
    ConnectorResponse: _pack_connector_response,
    Log: _pack_log,
    Partners: _pack_partners,
    Direct: _pack_direct,
    WindowUpdate: _pack_window_update,
    Eof: _pack_eof,
    Unknown: _pack_unknown,
}


def pack(msg: Message) -> bytes:
    """Encode one message; ``ValueError`` if a field cannot be carried exactly."""
    try:
        packer = _PACKERS[type(msg)]
    except KeyError:
        raise TypeError(f"not a LinkSocks message: {msg!r}") from None
    return packer(msg)


# --- parse --------------------------------------------------------------------
# Each parser gets the whole message (header included) and reads from offset 2.
# LinkSocks ignores bytes after a complete body, and so do we.


def _need(buf: bytes, end: int, name: str, what: str) -> None:
    if len(buf) < end:
        raise MessageError(f"{name}: truncated {what}")


def _read_str(buf: bytes, pos: int, name: str, what: str, strict: bool = True) -> tuple[str, int]:
    """A length-prefixed string at ``pos``; strict means names (UTF-8 or error)."""
    _need(buf, pos + 1, name, f"{what} length")
    end = pos + 1 + buf[pos]
    _need(buf, end, name, what)
    raw = buf[pos + 1 : end]
    if not strict:  # human-readable texts: LinkSocks may cut them mid-character
        return raw.decode(errors="replace"), end
    try:
        return raw.decode(), end
    except UnicodeDecodeError:
        raise MessageError(f"{name}: {what} is not valid UTF-8") from None


def _read_port(buf: bytes, pos: int, name: str, what: str) -> tuple[int, int]:
    _need(buf, pos + 2, name, what)
    return _U16.unpack_from(buf, pos)[0], pos + 2


def _read_protocol(buf: bytes, name: str) -> int:
    protocol = buf[2]
    if protocol != TCP and protocol != UDP:
        raise MessageError(f"{name}: unknown protocol 0x{protocol:02X}")
    return protocol


def _read_blob(buf: bytes, pos: int, name: str, what: str) -> tuple[bytes, int]:
    """A DataLen(4)-prefixed body at ``pos``."""
    _need(buf, pos + 4, name, f"{what} length")
    end = pos + 4 + _U32.unpack_from(buf, pos)[0]
    _need(buf, end, name, what)
    return buf[pos + 4 : end], end


def _parse_auth(buf: bytes, limit: int) -> Auth:
    token, pos = _read_str(buf, 2, "Auth", "token")
    _need(buf, pos + 17, "Auth", "reverse flag and instance")
    return Auth(token, buf[pos] != 0, buf[pos + 1 : pos + 17])


def _parse_auth_response(buf: bytes, limit: int) -> AuthResponse:
    _need(buf, 3, "AuthResponse", "success flag")
    if buf[2]:
        return AuthResponse(True)
    if len(buf) == 3:  # LinkSocks accepts a failure without error text
        return AuthResponse(False)
    return AuthResponse(False, _read_str(buf, 3, "AuthResponse", "error", strict=False)[0])


def _parse_connect(buf: bytes, limit: int) -> Connect:
    _need(buf, 19, "Connect", "protocol and channel id")
    protocol = _read_protocol(buf, "Connect")
    channel = buf[3:19]
    if protocol == UDP:
        return Connect(UDP, channel)
    address, pos = _read_str(buf, 19, "Connect", "address")
    port = _read_port(buf, pos, "Connect", "port")[0]
    return Connect(TCP, channel, address, port)


def _parse_connect_response(buf: bytes, limit: int) -> ConnectResponse:
    _need(buf, 19, "ConnectResponse", "success flag and channel id")
    channel = buf[3:19]
    if buf[2]:
        return ConnectResponse(True, channel)
    if len(buf) == 19:  # pywssocks sends a text-less failure this way
        return ConnectResponse(False, channel)
    return ConnectResponse(False, channel, _read_str(buf, 19, "ConnectResponse", "error", False)[0])


def _parse_data(buf: bytes, limit: int) -> Data:
    _need(buf, 24, "Data", "header")
    protocol = _read_protocol(buf, "Data")
    channel = buf[3:19]
    compression = buf[19]
    payload, pos = _read_blob(buf, 20, "Data", "payload")
    if compression == COMPRESSION_GZIP:
        payload = _gunzip(payload, limit)
    elif compression != COMPRESSION_NONE:
        raise MessageError(f"Data: unknown compression 0x{compression:02X}")
    if protocol == TCP:
        return Data(TCP, channel, payload, compression)
    address, pos = _read_str(buf, pos, "Data", "UDP address")
    port, pos = _read_port(buf, pos, "Data", "UDP port")
    target, pos = _read_str(buf, pos, "Data", "UDP target address")
    target_port = _read_port(buf, pos, "Data", "UDP target port")[0]
    return Data(UDP, channel, payload, compression, address, port, target, target_port)


def _gunzip(data: bytes, limit: int) -> bytes:
    # Go's gzip reader accepts concatenated members, so we do too, up to MAX_GZIP_MEMBERS;
    # all members share the output bound (a gzip bomb must not get far). Input goes in
    # slices of _GZIP_STEP through a memoryview, so what zlib copies back as unused_data
    # is at most one slice per member: the work stays linear in the input.
    out: list[bytes] = []
    left = limit
    view = memoryview(data)
    pos, end = 0, len(view)
    for _ in range(MAX_GZIP_MEMBERS):
        d = zlib.decompressobj(31)
        while not d.eof:
            if pos >= end:
                raise MessageError("Data: truncated gzip payload")
            step = view[pos : pos + _GZIP_STEP]
            try:
                chunk = d.decompress(step, left + 1)
            except zlib.error as exc:
                raise MessageError(f"Data: bad gzip payload ({exc})") from None
            if len(chunk) > left:
                raise MessageError(f"Data: gzip payload inflates beyond {limit} bytes")
            out.append(chunk)
            left -= len(chunk)
            pos += len(step) - len(d.unused_data)
        if pos >= end:
            return b"".join(out)
    raise MessageError(f"Data: gzip payload of more than {MAX_GZIP_MEMBERS} members")


def _parse_disconnect(buf: bytes, limit: int) -> Disconnect:
    _need(buf, 18, "Disconnect", "channel id")
    channel = buf[2:18]
    if len(buf) == 18:
        return Disconnect(channel)
    return Disconnect(channel, _read_str(buf, 18, "Disconnect", "error", strict=False)[0])


def _parse_connector(buf: bytes, limit: int) -> Connector:
    _need(buf, 18, "Connector", "channel id")
    token, pos = _read_str(buf, 18, "Connector", "token")
    _need(buf, pos + 1, "Connector", "operation")
    operation = buf[pos]
    if operation != ADD and operation != REMOVE:
        raise MessageError(f"Connector: unknown operation 0x{operation:02X}")
    return Connector(buf[2:18], token, operation)


def _parse_connector_response(buf: bytes, limit: int) -> ConnectorResponse:
    _need(buf, 19, "ConnectorResponse", "channel id and success flag")
    channel = buf[2:18]
    if not buf[18]:
        if len(buf) == 19:  # text-less failure, as for AuthResponse
            return ConnectorResponse(channel, False)
        error = _read_str(buf, 19, "ConnectorResponse", "error", strict=False)[0]
        return ConnectorResponse(channel, False, error)
    if len(buf) == 19:
        return ConnectorResponse(channel, True)
    return ConnectorResponse(channel, True, "", _read_str(buf, 19, "ConnectorResponse", "token")[0])


def _parse_log(buf: bytes, limit: int) -> Log:
    body = _read_blob(buf, 2, "Log", "JSON body")[0]
    try:
        decoded = _log_decoder.decode(body)
    except ValueError as exc:  # msgspec.DecodeError, or UnicodeDecodeError inside strings
        raise MessageError(f"Log: bad JSON body ({exc})") from None
    return Log(decoded.level, decoded.msg)


def _parse_partners(buf: bytes, limit: int) -> Partners:
    body = _read_blob(buf, 2, "Partners", "JSON body")[0]
    try:
        decoded = _partners_decoder.decode(body)
    except ValueError as exc:  # msgspec.DecodeError, or UnicodeDecodeError inside strings
        raise MessageError(f"Partners: bad JSON body ({exc})") from None
    return Partners(decoded.count)


def _parse_direct(buf: bytes, limit: int) -> Direct:
    return Direct(buf[1], _read_blob(buf, 2, f"Direct 0x{buf[1]:02X}", "JSON body")[0])


def _parse_window_update(buf: bytes, limit: int) -> WindowUpdate:
    _need(buf, 22, "WindowUpdate", "channel id and credit")
    return WindowUpdate(buf[2:18], _U32.unpack_from(buf, 18)[0])


def _parse_eof(buf: bytes, limit: int) -> Eof:
    _need(buf, 18, "Eof", "channel id")
    return Eof(buf[2:18])


_PARSERS: dict[int, Callable[[bytes, int], Message]] = {
    T_AUTH: _parse_auth,
    T_AUTH_RESPONSE: _parse_auth_response,
    T_CONNECT: _parse_connect,
    T_DATA: _parse_data,
    T_CONNECT_RESPONSE: _parse_connect_response,
    T_DISCONNECT: _parse_disconnect,
    T_CONNECTOR: _parse_connector,
    T_CONNECTOR_RESPONSE: _parse_connector_response,
    T_LOG: _parse_log,
    T_PARTNERS: _parse_partners,
    T_DIRECT_CAPABILITIES: _parse_direct,
    T_DIRECT_RENDEZVOUS: _parse_direct,
    T_DIRECT_STATUS: _parse_direct,
    T_WINDOW_UPDATE: _parse_window_update,
    T_EOF: _parse_eof,
}


def parse(data: bytes, *, max_decompressed: int = _DEFAULT_MAX_DECOMPRESSED) -> Message:
    """Decode one message; ``MessageError`` (and nothing else) if it is malformed.

    A different minor version is accepted (the caller may warn, see
    :func:`version_of`); a different major version is refused. An unknown type
    comes back as :class:`Unknown`. ``max_decompressed`` bounds what a gzip
    Data payload may inflate to.
    """
    if type(data) is not bytes:
        data = bytes(data)  # slices must be bytes, not views into a reused buffer
    if len(data) < 2:
        raise MessageError(f"message of {len(data)} bytes is shorter than its header")
    version = data[0]
    if version >> 4 != PROTOCOL_VERSION >> 4:
        raise MessageError(
            f"unsupported protocol major version: got 0x{version:02X}, "
            f"we speak 0x{PROTOCOL_VERSION:02X}"
        )
    parser = _PARSERS.get(data[1])
    if parser is None:
        return Unknown(data[1], data[2:])
    return parser(data, max_decompressed)

"""Pure-Python reference of the hot path: WebSocket framing plus LinkSocks Data streaming.

This module and the compiled ``_relay.pyx`` have the same API and must give the
same results for every input (tests/test_codec_differential.py checks it).
Nothing here does I/O: bytes go in through a buffer the decoder owns, events
come out; frames are built into buffers the caller owns.

Decoder events (returned by ``Decoder.next_event``):

``NEED_DATA``  every complete event has been returned; read more bytes.
``DATA``       a piece of a TCP Data message: ``channel`` (16 bytes) and
               ``data`` (a memoryview into the decoder's buffer, unmasked,
               valid until the next ``get_buffer``). Large messages arrive
               in several pieces, as their bytes arrive.
``TRUNCATED``  a TCP Data message for ``channel`` ended before its DataLen.
``MESSAGE``    any other complete binary message, as bytes in ``data``.
``PING``/``PONG``  control frames, payload in ``data``.
``CLOSE``      close frame: ``close_code`` (1005 when absent) and ``close_reason``.

Framing violations raise :class:`trisocks.wire.errors.ProtocolError` carrying the
close code to answer with.
"""

from __future__ import annotations

from .errors import ProtocolError

IMPLEMENTATION = "pure"

NEED_DATA = 0
DATA = 1
MESSAGE = 2
PING = 3
PONG = 4
CLOSE = 5
TRUNCATED = 6

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# LinkSocks TCP Data message header: Version Type Protocol ChannelID(16) Compression DataLen(4)
DATA_HEADER = 24
# Room a caller leaves in front of a payload for encode_data: the largest
# WebSocket header (2 + 8 + 4 mask bytes) plus the Data header.
HEADROOM = 14 + DATA_HEADER

_VERSION = 0x01
_TYPE_DATA = 0x04
_PROTO_TCP = 0x01

# Message-assembly states
_HEAD = 0  # collecting the first bytes of a binary message to see what it is
_STREAM = 1  # passing TCP Data payload through as DATA events
_BUFFER = 2  # collecting a whole message for MESSAGE
_SKIP = 3  # discarding (text message, or bytes after a Data payload)

_VALID_OPCODES = (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
_MAX_SPARES = 16  # buffers kept for reuse after hold(); beyond that, left to the collector


def _valid_close_code(code: int) -> bool:
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def mask(buf, key: int, offset: int = 0) -> None:
    """XOR ``buf`` in place with the 4-byte big-endian ``key``, starting ``offset`` bytes into it."""
    view = memoryview(buf).cast("B")
    n = len(view)
    if n == 0:
        return
    kb = (key & 0xFFFFFFFF).to_bytes(4, "big")
    off = offset & 3
    kb = kb[off:] + kb[:off]
    pattern = (kb * (n // 4 + 1))[:n]
    value = int.from_bytes(view, "little") ^ int.from_bytes(pattern, "little")
    view[:] = value.to_bytes(n, "little")


def _frame_header(opcode: int, length: int, mask_key, fin: bool) -> bytearray:
    head = bytearray()
    head.append((0x80 if fin else 0) | opcode)
    mbit = 0x80 if mask_key is not None else 0
    if length < 126:
        head.append(mbit | length)
    elif length < 65536:
        head.append(mbit | 126)
        head += length.to_bytes(2, "big")
    else:
        head.append(mbit | 127)
        head += length.to_bytes(8, "big")
    if mask_key is not None:
        head += (mask_key & 0xFFFFFFFF).to_bytes(4, "big")
    return head


def encode_frame(opcode: int, payload, mask_key=None, fin: bool = True) -> bytes:
    """A complete WebSocket frame (copying ``payload``); ``mask_key`` masks it (client side)."""
    if opcode not in _VALID_OPCODES:
        raise ValueError(f"invalid opcode {opcode}")
    body = bytearray(payload)
    if opcode >= OP_CLOSE and (len(body) > 125 or not fin):
        raise ValueError("control frames carry at most 125 bytes and are never fragmented")
    head = _frame_header(opcode, len(body), mask_key, fin)
    if mask_key is not None:
        mask(body, mask_key)
    return bytes(head + body)


def encode_data(buf, payload_start: int, payload_len: int, channel, mask_key=None) -> int:
    """Frame ``buf[payload_start:payload_start+payload_len]`` as a TCP Data message, in place.

    Writes the LinkSocks Data header and the WebSocket header into the
    ``HEADROOM`` bytes before the payload (masking everything when
    ``mask_key`` is given) and returns the offset where the frame starts, so
    that ``buf[start:payload_start+payload_len]`` is ready to send.
    """
    view = memoryview(buf).cast("B")
    if len(channel) != 16:
        raise ValueError("channel id must be 16 bytes")
    if payload_len < 0 or payload_start + payload_len > len(view):
        raise ValueError("payload outside the buffer")
    msg_len = DATA_HEADER + payload_len
    hlen = 2 if msg_len < 126 else 4 if msg_len < 65536 else 10
    if mask_key is not None:
        hlen += 4
    start = payload_start - DATA_HEADER - hlen
    if start < 0:
        raise ValueError("not enough headroom before the payload")
    p = payload_start - DATA_HEADER
    view[p : p + 3] = bytes((_VERSION, _TYPE_DATA, _PROTO_TCP))
    view[p + 3 : p + 19] = bytes(channel)
    view[p + 19] = 0
    view[p + 20 : p + 24] = payload_len.to_bytes(4, "big")
    view[start:p] = _frame_header(OP_BINARY, msg_len, mask_key, True)
    if mask_key is not None:
        mask(view[p : p + msg_len], mask_key)
    return start


class Decoder:
    """Turns the bytes of one WebSocket direction into LinkSocks-level events.

    Use: ``n = sock.recv_into(d.get_buffer()); d.feed(n)``, then call
    ``d.next_event()`` until it returns ``NEED_DATA``.
    """

    def __init__(
        self, *, expect_masked: bool, max_message: int = 32 << 20, buffer_size: int = 256 << 10
    ) -> None:
        if buffer_size < 1024:
            raise ValueError("buffer_size must be at least 1024")
        self.expect_masked = bool(expect_masked)
        self.max_message = int(max_message)
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._rpos = 0
        self._wpos = 0
        # current frame
        self._in_frame = False
        self._opcode = 0
        self._fin = False
        self._remaining = 0
        self._mask = None  # 4 key bytes, or None
        self._mask_pos = 0
        self._ctl = bytearray()
        # current data message
        self._msg_active = False
        self._msg_size = 0
        self._kind = _HEAD
        self._head = bytearray()
        self._acc = bytearray()
        self._stream_left = 0
        self._last_channel = b""
        # results of the last event
        self.channel = b""
        self.data = b""
        self.close_code = 0
        self.close_reason = ""
        self.ignored = 0  # text messages discarded
        self._held = False
        self._spares: list[bytearray] = []

    # -- input ---------------------------------------------------------------
    def hold(self) -> None:
        """Somebody keeps a DATA piece handed out since the last ``get_buffer``: from the
        next read on, use another buffer (this one is reused once no view of it is left)."""
        self._held = True

    def _fresh_buffer(self) -> bytearray:
        for i, buf in enumerate(self._spares):
            try:
                buf.append(0)  # fails while any view of the buffer is alive
            except BufferError:
                continue
            del buf[-1]
            return self._spares.pop(i)
        return bytearray(len(self._buf))

    def get_buffer(self) -> memoryview:
        """The free space to read into; call only after ``next_event`` returned NEED_DATA."""
        r, w = self._rpos, self._wpos
        if self._held:
            self._held = False
            fresh = self._fresh_buffer()
            fresh[: w - r] = self._buf[r:w]
            self._view.release()
            if len(self._spares) < _MAX_SPARES:
                self._spares.append(self._buf)
            self._buf, self._view = fresh, memoryview(fresh)
            self._rpos, self._wpos = 0, w - r
            return self._view[self._wpos :]
        if r == w:
            self._rpos = self._wpos = 0
        elif r:
            self._buf[: w - r] = self._buf[r:w]
            self._rpos, self._wpos = 0, w - r
        return self._view[self._wpos :]

    def feed(self, n: int) -> None:
        """Account for ``n`` bytes written into the last ``get_buffer()``."""
        if n < 0 or self._wpos + n > len(self._buf):
            raise ValueError("fed more bytes than the buffer holds")
        self._wpos += n

    def feed_bytes(self, data) -> None:
        """Copy ``data`` in (handshake leftovers, tests); it must fit in the free space."""
        space = self.get_buffer()
        n = len(data)
        if n > len(space):
            raise ValueError("data does not fit in the decoder buffer")
        space[:n] = data
        self.feed(n)

    def take_unparsed(self) -> bytes:
        """Remove and return the bytes received but not parsed yet, to go on in another
        decoder (a small one before authentication, a full one after). Only between
        messages: right after a MESSAGE event, or before any."""
        if self._in_frame or self._msg_active:
            raise ValueError("in the middle of a frame or message")
        data = bytes(self._buf[self._rpos : self._wpos])
        self._rpos = self._wpos = 0
        return data

    # -- events --------------------------------------------------------------
    def next_event(self) -> int:
        while True:
            if not self._in_frame:
                if not self._parse_header():
                    return NEED_DATA
                continue
            if self._remaining == 0:
                ev = self._end_frame()
                if ev:
                    return ev
                continue
            avail = self._wpos - self._rpos
            if avail == 0:
                return NEED_DATA
            take = min(avail, self._remaining)
            ev = self._consume(take)
            if ev:
                return ev

    def _parse_header(self) -> bool:
        buf = self._buf
        r = self._rpos
        avail = self._wpos - r
        if avail < 2:
            return False
        b0, b1 = buf[r], buf[r + 1]
        fin = bool(b0 & 0x80)
        opcode = b0 & 0x0F
        masked = bool(b1 & 0x80)
        ln = b1 & 0x7F
        if b0 & 0x70:
            raise ProtocolError("reserved bits set")
        if opcode not in _VALID_OPCODES:
            raise ProtocolError(f"unknown opcode {opcode}")
        control = opcode >= OP_CLOSE
        if control:
            if not fin:
                raise ProtocolError("fragmented control frame")
            if ln > 125:
                raise ProtocolError("control frame too long")
        if masked != self.expect_masked:
            raise ProtocolError("unmasked client frame" if self.expect_masked else "masked server frame")
        if not control:
            if opcode == OP_CONT and not self._msg_active:
                raise ProtocolError("unexpected continuation frame")
            if opcode != OP_CONT and self._msg_active:
                raise ProtocolError("expected a continuation frame")
        hlen = 2 + (2 if ln == 126 else 8 if ln == 127 else 0) + (4 if masked else 0)
        if avail < hlen:
            return False
        p = r + 2
        if ln == 126:
            length = int.from_bytes(buf[p : p + 2], "big")
            p += 2
        elif ln == 127:
            length = int.from_bytes(buf[p : p + 8], "big")
            if length >> 63:
                raise ProtocolError("invalid frame length")
            p += 8
        else:
            length = ln
        if not control and self._msg_size + length > self.max_message:
            raise ProtocolError("message too big", 1009)
        self._mask = bytes(buf[p : p + 4]) if masked else None
        self._rpos = r + hlen
        self._in_frame = True
        self._opcode = opcode
        self._fin = fin
        self._remaining = length
        self._mask_pos = 0
        if control:
            self._ctl.clear()
        else:
            if opcode != OP_CONT:
                self._msg_active = True
                self._msg_size = 0
                self._head.clear()
                self._acc.clear()
                if opcode == OP_BINARY:
                    self._kind = _HEAD
                else:
                    self._kind = _SKIP
                    self.ignored += 1
            self._msg_size += length
        return True

    def _unmask(self, n: int) -> None:
        if self._mask is not None and n:
            key = int.from_bytes(self._mask, "big")
            r = self._rpos
            mask(self._view[r : r + n], key, self._mask_pos)
        self._mask_pos += n

    def _advance(self, n: int) -> None:
        self._rpos += n
        self._remaining -= n

    def _consume(self, take: int) -> int:
        r = self._rpos
        if self._opcode >= OP_CLOSE:
            self._unmask(take)
            self._ctl += self._view[r : r + take]
            self._advance(take)
            return 0
        kind = self._kind
        if kind == _HEAD:
            head = self._head
            if len(head) >= 2 and not (head[0] >> 4 == 0 and head[1] == _TYPE_DATA):
                self._acc += head
                self._kind = _BUFFER
                return 0
            need = (2 if len(head) < 2 else DATA_HEADER) - len(head)
            n = min(take, need)
            self._unmask(n)
            head += self._view[r : r + n]
            self._advance(n)
            if len(head) == DATA_HEADER:
                if head[2] == _PROTO_TCP and head[19] == 0:
                    channel = bytes(head[3:19])
                    if channel == self._last_channel:
                        channel = self._last_channel
                    self._last_channel = channel
                    self._stream_channel = channel
                    self._stream_left = int.from_bytes(head[20:24], "big")
                    self._kind = _STREAM
                else:
                    self._acc += head
                    self._kind = _BUFFER
            return 0
        if kind == _STREAM:
            n = min(take, self._stream_left)
            if n == 0:
                self._kind = _SKIP
                return 0
            self._unmask(n)
            self.channel = self._stream_channel
            self.data = self._view[r : r + n]
            self._advance(n)
            self._stream_left -= n
            if self._stream_left == 0:
                self._kind = _SKIP
            return DATA
        if kind == _BUFFER:
            self._unmask(take)
            self._acc += self._view[r : r + take]
        else:  # _SKIP: no need to unmask bytes nobody reads
            self._mask_pos += take
        self._advance(take)
        return 0

    def _end_frame(self) -> int:
        self._in_frame = False
        opcode = self._opcode
        if opcode >= OP_CLOSE:
            payload = bytes(self._ctl)
            if opcode == OP_PING:
                self.data = payload
                return PING
            if opcode == OP_PONG:
                self.data = payload
                return PONG
            return self._close_event(payload)
        if not self._fin:
            return 0
        self._msg_active = False
        self._msg_size = 0  # max_message limits each message, not the sum of consecutive ones
        kind = self._kind
        if kind == _HEAD:
            self.data = bytes(self._head)
            return MESSAGE
        if kind == _BUFFER:
            self.data = bytes(self._acc)
            self._acc.clear()
            return MESSAGE
        if kind == _STREAM and self._stream_left:
            self.channel = self._stream_channel
            self._stream_left = 0
            return TRUNCATED
        return 0

    def _close_event(self, payload: bytes) -> int:
        if len(payload) == 0:
            self.close_code, self.close_reason = 1005, ""
            return CLOSE
        if len(payload) == 1:
            raise ProtocolError("invalid close frame payload")
        code = int.from_bytes(payload[:2], "big")
        if not _valid_close_code(code):
            raise ProtocolError(f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("invalid UTF-8 in close reason", 1007) from None
        self.close_code, self.close_reason = code, reason
        return CLOSE

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled hot path: WebSocket framing plus LinkSocks Data streaming.

Same API and results as the pure-Python reference in ``_relay_py.py`` (read
its docstring for the event model); this twin does the per-byte work in C:
in-place unmasking eight bytes at a time, header parsing on raw pointers, and
no Python object per streamed chunk beyond the memoryview handed out.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memmove, memcmp

from .errors import ProtocolError

IMPLEMENTATION = "compiled"

cdef enum:
    _NEED_DATA = 0
    _DATA = 1
    _MESSAGE = 2
    _PING = 3
    _PONG = 4
    _CLOSE = 5
    _TRUNCATED = 6

NEED_DATA = _NEED_DATA
DATA = _DATA
MESSAGE = _MESSAGE
PING = _PING
PONG = _PONG
CLOSE = _CLOSE
TRUNCATED = _TRUNCATED

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

cdef enum:
    _DATA_HEADER = 24
DATA_HEADER = _DATA_HEADER
HEADROOM = 14 + _DATA_HEADER

cdef enum:
    _MAX_SPARES = 16  # buffers kept for reuse after hold(); beyond that, left to the collector

# message-assembly states
cdef enum:
    _HEAD = 0
    _STREAM = 1
    _BUFFER = 2
    _SKIP = 3


cdef inline bint _valid_opcode(int op) noexcept:
    return op == 0 or op == 1 or op == 2 or op == 8 or op == 9 or op == 10


cdef inline bint _valid_close_code(int code) noexcept:
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)


cdef inline void _xor(uint8_t* p, Py_ssize_t n, uint32_t key, Py_ssize_t offset) noexcept nogil:
    """XOR n bytes at p with the big-endian key, the first byte using key byte ``offset % 4``."""
    cdef uint8_t kb[4]
    cdef uint8_t rot[8]
    cdef uint64_t k64, w
    cdef Py_ssize_t i = 0, off = offset & 3
    kb[0] = (key >> 24) & 0xFF
    kb[1] = (key >> 16) & 0xFF
    kb[2] = (key >> 8) & 0xFF
    kb[3] = key & 0xFF
    for i in range(8):
        rot[i] = kb[(off + i) & 3]
    memcpy(&k64, rot, 8)
    i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        w ^= k64
        memcpy(p + i, &w, 8)
        i += 8
    while i < n:
        p[i] ^= rot[i & 7]
        i += 1


def mask(buf, uint32_t key, Py_ssize_t offset=0):
    """XOR ``buf`` in place with the 4-byte big-endian ``key``, starting ``offset`` bytes into it."""
    cdef unsigned char[::1] view = memoryview(buf).cast("B")
    cdef Py_ssize_t n = view.shape[0]
    if n:
        _xor(&view[0], n, key, offset)


cdef Py_ssize_t _write_header(uint8_t* out, int opcode, uint64_t length, object mask_key, bint fin) except -1:
    cdef Py_ssize_t p = 2
    cdef uint8_t mbit = 0x80 if mask_key is not None else 0
    cdef uint32_t key
    cdef int i
    out[0] = (0x80 if fin else 0) | opcode
    if length < 126:
        out[1] = mbit | <uint8_t>length
    elif length < 65536:
        out[1] = mbit | 126
        out[2] = (length >> 8) & 0xFF
        out[3] = length & 0xFF
        p = 4
    else:
        out[1] = mbit | 127
        for i in range(8):
            out[2 + i] = (length >> (56 - 8 * i)) & 0xFF
        p = 10
    if mask_key is not None:
        key = <uint32_t>(mask_key & 0xFFFFFFFF)
        out[p] = (key >> 24) & 0xFF
        out[p + 1] = (key >> 16) & 0xFF
        out[p + 2] = (key >> 8) & 0xFF
        out[p + 3] = key & 0xFF
        p += 4
    return p


def encode_frame(int opcode, payload, mask_key=None, bint fin=True):
    """A complete WebSocket frame (copying ``payload``); ``mask_key`` masks it (client side)."""
    if not _valid_opcode(opcode):
        raise ValueError(f"invalid opcode {opcode}")
    # The payload's bytes, however it is laid out: len(payload) counts items, not bytes,
    # for arrays of wider items, and cast("B") refuses strided views (copied instead).
    view = memoryview(payload)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    cdef const unsigned char[::1] body = view.cast("B") if view.nbytes else b""
    cdef Py_ssize_t n = body.shape[0]
    if opcode >= 8 and (n > 125 or not fin):
        raise ValueError("control frames carry at most 125 bytes and are never fragmented")
    cdef uint8_t head[14]
    cdef Py_ssize_t hlen = _write_header(head, opcode, n, mask_key, fin)
    out = PyBytes_FromStringAndSize(NULL, hlen + n)
    cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
    memcpy(o, head, hlen)
    if n:
        memcpy(o + hlen, &body[0], n)
        if mask_key is not None:
            _xor(o + hlen, n, <uint32_t>(mask_key & 0xFFFFFFFF), 0)
    return out


def encode_data(buf, Py_ssize_t payload_start, Py_ssize_t payload_len, channel, mask_key=None):
    """Frame ``buf[payload_start:payload_start+payload_len]`` as a TCP Data message, in place.

    Returns the offset where the frame starts; see the pure twin for details.
    """
    cdef unsigned char[::1] view = buf
    cdef const unsigned char[::1] ch = channel
    if ch.shape[0] != 16:
        raise ValueError("channel id must be 16 bytes")
    if payload_len < 0 or payload_start + payload_len > view.shape[0]:
        raise ValueError("payload outside the buffer")
    cdef Py_ssize_t msg_len = _DATA_HEADER + payload_len
    cdef Py_ssize_t hlen = 2 if msg_len < 126 else (4 if msg_len < 65536 else 10)
    if mask_key is not None:
        hlen += 4
    cdef Py_ssize_t start = payload_start - _DATA_HEADER - hlen
    if start < 0:
        raise ValueError("not enough headroom before the payload")
    cdef uint8_t* b = &view[0]
    cdef Py_ssize_t p = payload_start - _DATA_HEADER
    b[p] = 0x01
    b[p + 1] = 0x04
    b[p + 2] = 0x01
    memcpy(b + p + 3, &ch[0], 16)
    b[p + 19] = 0
    b[p + 20] = (payload_len >> 24) & 0xFF
    b[p + 21] = (payload_len >> 16) & 0xFF
    b[p + 22] = (payload_len >> 8) & 0xFF
    b[p + 23] = payload_len & 0xFF
    _write_header(b + start, 0x2, msg_len, mask_key, True)
    if mask_key is not None:
        _xor(b + p, msg_len, <uint32_t>(mask_key & 0xFFFFFFFF), 0)
    return start


cdef class Decoder:
    """Turns the bytes of one WebSocket direction into LinkSocks-level events (see the pure twin)."""

    cdef readonly bint expect_masked
    cdef readonly Py_ssize_t max_message
    cdef bytearray _buf
    cdef object _view
    cdef uint8_t* _p
    cdef Py_ssize_t _size, _rpos, _wpos
    # current frame
    cdef bint _in_frame, _fin, _masked
    cdef int _opcode
    cdef uint64_t _remaining
    cdef uint32_t _key
    cdef Py_ssize_t _mask_pos
    cdef bytearray _ctl
    # current message
    cdef bint _msg_active
    cdef uint64_t _msg_size
    cdef int _kind
    cdef uint8_t _head[_DATA_HEADER]
    cdef Py_ssize_t _head_len
    cdef bytearray _acc
    cdef uint64_t _stream_left
    cdef bytes _last_channel
    cdef bytes _stream_channel
    # results
    cdef public object channel
    cdef public object data
    cdef public int close_code
    cdef public object close_reason
    cdef public Py_ssize_t ignored
    cdef bint _held
    cdef list _spares

    def __init__(self, *, expect_masked, max_message=32 << 20, buffer_size=256 << 10):
        if buffer_size < 1024:
            raise ValueError("buffer_size must be at least 1024")
        self.expect_masked = bool(expect_masked)
        self.max_message = int(max_message)
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._p = <uint8_t*>PyByteArray_AS_STRING(self._buf)
        self._size = buffer_size
        self._rpos = 0
        self._wpos = 0
        self._in_frame = False
        self._ctl = bytearray()
        self._msg_active = False
        self._msg_size = 0
        self._kind = _HEAD
        self._head_len = 0
        self._acc = bytearray()
        self._stream_left = 0
        self._last_channel = b""
        self._stream_channel = b""
        self.channel = b""
        self.data = b""
        self.close_code = 0
        self.close_reason = ""
        self.ignored = 0
        self._held = False
        self._spares = []

    # -- input ---------------------------------------------------------------
    def hold(self):
        """Somebody keeps a DATA piece handed out since the last ``get_buffer``: from the
        next read on, use another buffer (this one is reused once no view of it is left)."""
        self._held = True

    cdef bytearray _fresh_buffer(self):
        cdef Py_ssize_t i
        cdef bytearray buf
        for i in range(len(self._spares)):
            buf = self._spares[i]
            try:
                buf.append(0)  # fails while any view of the buffer is alive
            except BufferError:
                continue
            del buf[-1]
            del self._spares[i]
            return buf
        return bytearray(self._size)

    def get_buffer(self):
        """The free space to read into; call only after ``next_event`` returned NEED_DATA."""
        cdef Py_ssize_t r = self._rpos, w = self._wpos
        cdef bytearray fresh
        cdef uint8_t* fp
        if self._held:
            self._held = False
            fresh = self._fresh_buffer()
            fp = <uint8_t*>PyByteArray_AS_STRING(fresh)
            if w > r:
                memcpy(fp, self._p + r, w - r)
            self._view.release()
            if len(self._spares) < _MAX_SPARES:
                self._spares.append(self._buf)
            self._buf = fresh
            self._view = memoryview(fresh)
            self._p = fp
            self._rpos = 0
            self._wpos = w - r
            return self._view[self._wpos:]
        if r == w:
            self._rpos = self._wpos = 0
        elif r:
            memmove(self._p, self._p + r, w - r)
            self._rpos = 0
            self._wpos = w - r
        return self._view[self._wpos:]

    def feed(self, Py_ssize_t n):
        """Account for ``n`` bytes written into the last ``get_buffer()``."""
        if n < 0 or self._wpos + n > self._size:
            raise ValueError("fed more bytes than the buffer holds")
        self._wpos += n

    def feed_bytes(self, data):
        """Copy ``data`` in (handshake leftovers, tests); it must fit in the free space."""
        space = self.get_buffer()
        cdef Py_ssize_t n = len(data)
        if n > len(space):
            raise ValueError("data does not fit in the decoder buffer")
        space[:n] = data
        self.feed(n)

    def take_unparsed(self):
        """Remove and return the bytes received but not parsed yet (see the pure twin)."""
        if self._in_frame or self._msg_active:
            raise ValueError("in the middle of a frame or message")
        data = bytes(self._buf[self._rpos:self._wpos])
        self._rpos = self._wpos = 0
        return data

    # -- events --------------------------------------------------------------
    def next_event(self):
        cdef int ev
        cdef Py_ssize_t avail, take
        while True:
            if not self._in_frame:
                if not self._parse_header():
                    return _NEED_DATA
                continue
            if self._remaining == 0:
                ev = self._end_frame()
                if ev:
                    return ev
                continue
            avail = self._wpos - self._rpos
            if avail == 0:
                return _NEED_DATA
            take = avail if <uint64_t>avail < self._remaining else <Py_ssize_t>self._remaining
            ev = self._consume(take)
            if ev:
                return ev

    cdef bint _parse_header(self) except -1:
        cdef uint8_t* b = self._p + self._rpos
        cdef Py_ssize_t avail = self._wpos - self._rpos
        cdef uint8_t b0, b1
        cdef bint fin, masked, control
        cdef int opcode, ln, i
        cdef Py_ssize_t hlen, p
        cdef uint64_t length
        if avail < 2:
            return False
        b0 = b[0]
        b1 = b[1]
        fin = (b0 & 0x80) != 0
        opcode = b0 & 0x0F
        masked = (b1 & 0x80) != 0
        ln = b1 & 0x7F
        if b0 & 0x70:
            raise ProtocolError("reserved bits set")
        if not _valid_opcode(opcode):
            raise ProtocolError(f"unknown opcode {opcode}")
        control = opcode >= 8
        if control:
            if not fin:
                raise ProtocolError("fragmented control frame")
            if ln > 125:
                raise ProtocolError("control frame too long")
        if masked != self.expect_masked:
            raise ProtocolError("unmasked client frame" if self.expect_masked else "masked server frame")
        if not control:
            if opcode == 0 and not self._msg_active:
                raise ProtocolError("unexpected continuation frame")
            if opcode != 0 and self._msg_active:
                raise ProtocolError("expected a continuation frame")
        hlen = 2 + (2 if ln == 126 else (8 if ln == 127 else 0)) + (4 if masked else 0)
        if avail < hlen:
            return False
        p = 2
        if ln == 126:
            length = (<uint64_t>b[2] << 8) | b[3]
            p = 4
        elif ln == 127:
            length = 0
            for i in range(8):
                length = (length << 8) | b[2 + i]
            if length >> 63:
                raise ProtocolError("invalid frame length")
            p = 10
        else:
            length = ln
        if not control and self._msg_size + length > <uint64_t>self.max_message:
            raise ProtocolError("message too big", 1009)
        self._masked = masked
        if masked:
            self._key = (<uint32_t>b[p] << 24) | (<uint32_t>b[p + 1] << 16) | (<uint32_t>b[p + 2] << 8) | b[p + 3]
        self._rpos += hlen
        self._in_frame = True
        self._opcode = opcode
        self._fin = fin
        self._remaining = length
        self._mask_pos = 0
        if control:
            del self._ctl[:]
        else:
            if opcode != 0:
                self._msg_active = True
                self._msg_size = 0
                self._head_len = 0
                del self._acc[:]
                if opcode == 2:
                    self._kind = _HEAD
                else:
                    self._kind = _SKIP
                    self.ignored += 1
            self._msg_size += length
        return True

    cdef inline void _unmask(self, Py_ssize_t n) noexcept:
        if self._masked and n:
            _xor(self._p + self._rpos, n, self._key, self._mask_pos)
        self._mask_pos += n

    cdef inline void _advance(self, Py_ssize_t n) noexcept:
        self._rpos += n
        self._remaining -= n

    cdef int _consume(self, Py_ssize_t take) except -1:
        cdef Py_ssize_t r = self._rpos, n, need
        cdef uint8_t* h = self._head
        cdef bytes channel
        if self._opcode >= 8:
            self._unmask(take)
            self._ctl += self._view[r:r + take]
            self._advance(take)
            return 0
        if self._kind == _HEAD:
            if self._head_len >= 2 and not ((h[0] >> 4) == 0 and h[1] == 0x04):
                self._acc += (<bytes>PyBytes_FromStringAndSize(<char*>h, self._head_len))
                self._kind = _BUFFER
                return 0
            need = (2 if self._head_len < 2 else _DATA_HEADER) - self._head_len
            n = take if take < need else need
            self._unmask(n)
            memcpy(h + self._head_len, self._p + r, n)
            self._head_len += n
            self._advance(n)
            if self._head_len == _DATA_HEADER:
                if h[2] == 0x01 and h[19] == 0:
                    if len(self._last_channel) == 16 and memcmp(PyBytes_AS_STRING(self._last_channel), h + 3, 16) == 0:
                        channel = self._last_channel
                    else:
                        channel = PyBytes_FromStringAndSize(<char*>(h + 3), 16)
                        self._last_channel = channel
                    self._stream_channel = channel
                    self._stream_left = (<uint64_t>h[20] << 24) | (<uint64_t>h[21] << 16) | (<uint64_t>h[22] << 8) | h[23]
                    self._kind = _STREAM
                else:
                    self._acc += (<bytes>PyBytes_FromStringAndSize(<char*>h, self._head_len))
                    self._kind = _BUFFER
            return 0
        if self._kind == _STREAM:
            n = take if <uint64_t>take < self._stream_left else <Py_ssize_t>self._stream_left
            if n == 0:
                self._kind = _SKIP
                return 0
            self._unmask(n)
            self.channel = self._stream_channel
            self.data = self._view[r:r + n]
            self._advance(n)
            self._stream_left -= n
            if self._stream_left == 0:
                self._kind = _SKIP
            return _DATA
        if self._kind == _BUFFER:
            self._unmask(take)
            self._acc += self._view[r:r + take]
        else:
            self._mask_pos += take
        self._advance(take)
        return 0

    cdef int _end_frame(self) except -1:
        self._in_frame = False
        cdef int opcode = self._opcode
        if opcode >= 8:
            payload = bytes(self._ctl)
            if opcode == 9:
                self.data = payload
                return _PING
            if opcode == 10:
                self.data = payload
                return _PONG
            return self._close_event(payload)
        if not self._fin:
            return 0
        self._msg_active = False
        self._msg_size = 0  # max_message limits each message, not the sum of consecutive ones
        if self._kind == _HEAD:
            self.data = PyBytes_FromStringAndSize(<char*>self._head, self._head_len)
            return _MESSAGE
        if self._kind == _BUFFER:
            self.data = bytes(self._acc)
            del self._acc[:]
            return _MESSAGE
        if self._kind == _STREAM and self._stream_left:
            self.channel = self._stream_channel
            self._stream_left = 0
            return _TRUNCATED
        return 0

    cdef int _close_event(self, bytes payload) except -1:
        cdef int code
        if len(payload) == 0:
            self.close_code = 1005
            self.close_reason = ""
            return _CLOSE
        if len(payload) == 1:
            raise ProtocolError("invalid close frame payload")
        code = (payload[0] << 8) | payload[1]
        if not _valid_close_code(code):
            raise ProtocolError(f"invalid close code {code}")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("invalid UTF-8 in close reason", 1007) from None
        self.close_code = code
        self.close_reason = reason
        return _CLOSE

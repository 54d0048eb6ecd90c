"""Decoder.hold(): a DATA view kept by the caller survives later reads, in both twins."""

from __future__ import annotations

import os

import pytest

from trisocks.wire import _relay_py

try:
    from trisocks.wire import _relay
except ImportError:  # the pure twin alone still gets tested
    _relay = None

MODULES = [m for m in (_relay, _relay_py) if m is not None]


def data_frame(mod, channel: bytes, payload: bytes) -> bytes:
    buf = bytearray(mod.HEADROOM + len(payload))
    buf[mod.HEADROOM:] = payload
    start = mod.encode_data(buf, mod.HEADROOM, len(payload), channel, None)
    return bytes(buf[start:])


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_held_views_survive_the_next_reads(mod):
    dec = mod.Decoder(expect_masked=False, buffer_size=4096)
    channel = os.urandom(16)
    payloads = [os.urandom(3000) for _ in range(6)]
    stream = b"".join(data_frame(mod, channel, p) for p in payloads)
    kept = []  # (view, expected bytes)
    got = bytearray()
    pos = 0
    while pos < len(stream):
        space = dec.get_buffer()
        n = min(len(space), len(stream) - pos, 1500)
        space[:n] = stream[pos:pos + n]
        dec.feed(n)
        pos += n
        while (ev := dec.next_event()) != mod.NEED_DATA:
            assert ev == mod.DATA
            view = dec.data
            got += view
            kept.append((view, bytes(view)))
            dec.hold()  # we keep every view, as a channel with a slow socket does
    assert got == b"".join(payloads)
    # every view still shows what it showed when it was handed out
    assert all(bytes(view) == expected for view, expected in kept)


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.IMPLEMENTATION)
def test_buffers_are_reused_once_released(mod):
    dec = mod.Decoder(expect_masked=False, buffer_size=4096)
    channel = os.urandom(16)
    frame = data_frame(mod, channel, os.urandom(1000))
    seen = set()
    for _ in range(50):
        space = dec.get_buffer()
        seen.add(id(space.obj))
        space[: len(frame)] = frame
        dec.feed(len(frame))
        assert dec.next_event() == mod.DATA
        view = dec.data
        dec.hold()
        assert dec.next_event() == mod.NEED_DATA
        del view, space  # released: the buffer can serve again
    assert len(seen) <= 3

"""Flow control: no byte dropped, bounded memory, and a stalled reader stops only itself."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import trio

from .inproc import echo_handler, echo_roundtrip, serve_tcp, socks_connect, start_tunnel

BLOB = os.urandom(256 << 10)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def blob_firehose(stream: trio.SocketStream) -> None:
    """Sends BLOB over and over, as fast as the connection takes it."""
    try:
        while True:
            await stream.send_all(BLOB)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def read_blob_stream(stream, nbytes: int, offset: int = 0) -> int:
    """Read nbytes and check they continue the BLOB repetition at ``offset``; returns the new offset."""
    got = 0
    while got < nbytes:
        data = await stream.receive_some(min(1 << 20, nbytes - got))
        assert data, "stream ended early"
        for i in range(0, len(data), len(BLOB)):
            piece = data[i : i + len(BLOB)]
            pos = (offset + got + i) % len(BLOB)
            expected = (BLOB[pos:] + BLOB[:pos])[: len(piece)]
            assert piece == expected, "bytes lost or reordered"
        got += len(data)
    return offset + got


@pytest.mark.parametrize("flow", [True, False], ids=["trisocks-flow", "linksocks-style"])
async def test_stalled_reader_is_bounded_and_loses_nothing(nursery, flow):
    window = 4 << 20 if flow else 0
    tunnel = await start_tunnel(nursery, server_cfg={"window": window}, client_cfg={"window": window})
    hose_port = await serve_tcp(nursery, blob_firehose)
    echo_port = await serve_tcp(nursery, echo_handler)

    stalled = await socks_connect(tunnel.socks_port, "127.0.0.1", hose_port)
    offset = await read_blob_stream(stalled, 4 << 20)  # it flows...
    base = rss_bytes()
    # ...then its reader stops for three seconds while the target keeps pushing.
    rounds = 0
    with trio.move_on_after(3):
        if flow:
            # the other channels keep moving meanwhile
            while True:
                assert await echo_roundtrip(tunnel.socks_port, echo_port, os.urandom(256 << 10))
                rounds += 1
        else:
            await trio.sleep_forever()
    growth = rss_bytes() - base
    assert growth < 48 << 20, f"memory grew by {growth >> 20} MiB while a reader stalled"
    if flow:
        assert rounds >= 10, f"only {rounds} echo round trips while one reader stalled"
    # the stalled reader resumes and every byte is there, in order
    await read_blob_stream(stalled, 32 << 20, offset)
    await stalled.aclose()


async def test_many_concurrent_channels_arrive_intact(nursery):
    """200 channels at once, each echoing a random payload of up to 8 MiB."""
    tunnel = await start_tunnel(nursery)
    echo_port = await serve_tcp(nursery, echo_handler)
    rng = random.Random(2024)
    # log-uniform sizes from 1 KiB to 8 MiB, with the extremes included
    sizes = [1 << 10, 8 << 20] + [int(2 ** rng.uniform(10, 23)) for _ in range(198)]
    results = []

    async def one(size: int) -> None:
        payload = rng.randbytes(size)
        results.append(await echo_roundtrip(tunnel.socks_port, echo_port, payload))

    with trio.fail_after(120):
        async with trio.open_nursery() as inner:
            for size in sizes:
                inner.start_soon(one, size)
    assert len(results) == 200 and all(results)
    # every channel ended on both sides
    with trio.fail_after(10):
        while any(s.channels for s in tunnel.server.sessions) or any(
            s.channels for s in tunnel.client.sessions
        ):
            await trio.sleep(0.01)


async def test_closing_one_channel_leaves_others_alone(nursery):
    tunnel = await start_tunnel(nursery)
    echo_port = await serve_tcp(nursery, echo_handler)
    keep = await socks_connect(tunnel.socks_port, "127.0.0.1", echo_port)
    for _ in range(20):
        victim = await socks_connect(tunnel.socks_port, "127.0.0.1", echo_port)
        await victim.send_all(b"x" * 1000)
        await victim.aclose()  # closed with data in flight
        await keep.send_all(b"still here")
        got = b""
        while len(got) < 10:
            got += await keep.receive_some(100)
        assert got == b"still here"
    await keep.aclose()


async def test_half_close_from_target_delivers_everything(nursery):
    """A target that sends its answer and closes: the client gets all of it, then EOF."""
    answer = os.urandom(3 << 20)

    async def say_and_close(stream):
        await stream.send_all(answer)
        await stream.aclose()

    port = await serve_tcp(nursery, say_and_close)
    tunnel = await start_tunnel(nursery)
    for _ in range(5):
        stream = await socks_connect(tunnel.socks_port, "127.0.0.1", port)
        got = bytearray()
        with trio.fail_after(10):
            while data := await stream.receive_some(1 << 20):
                got += data
        assert hashlib.sha256(got).digest() == hashlib.sha256(answer).digest()
        await stream.aclose()


@pytest.mark.parametrize("flow", [True, False], ids=["trisocks-flow", "linksocks-style"])
async def test_slow_reader_gets_everything_after_the_target_closed(nursery, monkeypatch, flow):
    """The target sends it all and closes at once; the SOCKS5 program reads slowly for far
    longer than any linger. Every byte must still arrive (regression: the tail was dropped)."""
    from trisocks.net import channel as channel_module

    monkeypatch.setattr(channel_module, "LINGER", 0.3)
    answer = os.urandom(6 << 20)

    async def say_and_close(stream):
        await stream.send_all(answer)
        await stream.aclose()

    port = await serve_tcp(nursery, say_and_close)
    window = 16 << 20 if flow else 0
    tunnel = await start_tunnel(nursery, server_cfg={"window": window}, client_cfg={"window": window})
    stream = await socks_connect(tunnel.socks_port, "127.0.0.1", port)
    got = bytearray()
    with trio.fail_after(30):
        while data := await stream.receive_some(32 << 10):
            got += data
            await trio.sleep(0.01)  # a slow reader: ~3 MB/s, two seconds in all
    assert len(got) == len(answer)
    assert hashlib.sha256(got).digest() == hashlib.sha256(answer).digest()
    await stream.aclose()

"""A lean TCP relay on Trio: the throughput ceiling of any Trio design.

No SOCKS5, no WebSocket, no framing: accept a connection, dial one fixed target,
and copy bytes both ways with raw ``trio.socket`` sockets, one task per direction,
each reading with ``recv_into`` into its own preallocated buffer (256 KiB by default)
and writing the filled part through a memoryview (no slicing copies).

The benchmark runs two of these in a chain (hop1 -> hop2 -> nginx) so that the
data crosses two user-space processes, like a tunnel's client and server.

Usage: python benchmarks/lean_relay.py --listen 127.0.0.1:21001 --target 127.0.0.1:21002
"""

from __future__ import annotations

import argparse
import socket as _stdsocket

import trio


async def _pump(src: trio.socket.SocketType, dst: trio.socket.SocketType, size: int) -> None:
    buf = bytearray(size)
    view = memoryview(buf)
    try:
        while True:
            n = await src.recv_into(buf)
            if not n:
                break
            sent = 0
            while sent < n:
                sent += await dst.send(view[sent:n])
    except OSError:
        pass
    finally:
        # Propagate the half-close so request/response protocols see EOF.
        try:
            dst.shutdown(_stdsocket.SHUT_WR)
        except OSError:
            pass


async def _serve_one(conn: trio.socket.SocketType, target: tuple[str, int], size: int) -> None:
    with conn:
        up = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        with up:
            try:
                await up.connect(target)
            except OSError:
                return
            for s in (conn, up):
                s.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, conn, up, size)
                nursery.start_soon(_pump, up, conn, size)


async def serve(listen: tuple[str, int], target: tuple[str, int], size: int) -> None:
    lsock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    lsock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await lsock.bind(listen)
    lsock.listen(1024)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await lsock.accept()
            nursery.start_soon(_serve_one, conn, target, size)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--listen", required=True, type=_hostport, help="HOST:PORT to accept on")
    p.add_argument("--target", required=True, type=_hostport, help="HOST:PORT to relay to")
    p.add_argument("--buffer", type=int, default=256 * 1024, help="bytes per direction buffer")
    args = p.parse_args()
    try:
        trio.run(serve, args.listen, args.target, args.buffer)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

"""Run a linksocks server through its Python API and block until SIGTERM/SIGINT.

linksocks's own ``linksocks server`` CLI is unreliable in some releases, so the
benchmark drives the server with the documented Python API instead. Run it with the
Python of the virtualenv that holds the pinned linksocks.

Usage:
  python linksocks_server.py --ws-port 21010 --token TOKEN
  python linksocks_server.py --ws-port 21010 --token TOKEN --reverse --socks-port 21011
"""

from __future__ import annotations

import argparse
import signal
import threading


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ws-host", default="127.0.0.1")
    p.add_argument("--ws-port", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--reverse", action="store_true", help="reverse mode: SOCKS5 port on the server")
    p.add_argument("--socks-host", default="127.0.0.1")
    p.add_argument("--socks-port", type=int, default=0)
    args = p.parse_args()

    import linksocks  # imported late: --help works without the package

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    kwargs = {"ws_host": args.ws_host, "ws_port": args.ws_port}
    if args.reverse:
        kwargs["socks_host"] = args.socks_host
    srv = linksocks.Server(**kwargs)
    if args.reverse:
        srv.add_reverse_token(token=args.token, port=args.socks_port)
    else:
        srv.add_forward_token(args.token)
    srv.wait_ready(timeout=30)
    print(f"linksocks server ready on ws://{args.ws_host}:{args.ws_port}", flush=True)
    while not stop.wait(0.5):
        pass
    srv.close()


if __name__ == "__main__":
    main()

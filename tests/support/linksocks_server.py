"""Run a LinkSocks (Go) server through its Python API, for interop tests.

    python linksocks_server.py PORT TOKEN [TOKEN ...]
        [--reverse TOKEN:SOCKSPORT]... [--connector TOKEN:REVERSE_TOKEN]...

TOKENs are forward tokens; --reverse adds a reverse token with its SOCKS5 port (on 127.0.0.1),
--connector a connector token for a reverse token.

Listens on 127.0.0.1:PORT, prints ``linksocks server ready on 127.0.0.1:PORT`` on stdout once
the server accepts clients, then blocks until SIGTERM or SIGINT and closes the server cleanly.
(The linksocks CLI server is not used: this keeps its options under the test's control.)
"""

from __future__ import annotations

import logging
import signal
import sys
import threading


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    port = int(argv[0])
    tokens, reverse, connectors = [], [], []
    args = iter(argv[1:])
    for arg in args:
        if arg == "--reverse":
            token, _, socks_port = next(args).rpartition(":")
            reverse.append((token, int(socks_port)))
        elif arg == "--connector":
            connectors.append(tuple(next(args).split(":", 1)))
        else:
            tokens.append(arg)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import linksocks

    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = linksocks.Server(ws_host="127.0.0.1", ws_port=port, socks_host="127.0.0.1")
    for token in tokens:
        server.add_forward_token(token)
    for token, socks_port in reverse:
        server.add_reverse_token(token=token, port=socks_port)
    for token, reverse_token in connectors:
        server.add_connector_token(token, reverse_token)
    server.wait_ready(timeout=10)
    print(f"linksocks server ready on 127.0.0.1:{port}", flush=True)
    while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
        pass
    server.close()
    print("linksocks server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The Trio I/O shell: transports and listeners, the WebSocket upgrade, sessions and their
channels, the outbox, flow control, dialing (directly or through upstream proxies), UDP
relaying, and containment (``guard``). Knows nothing of tokens or roles."""

"""Tunnel roles: the server (front door, authentication, reverse services), the client
(forward client, provider, connector), where traffic enters (``ingress``: SOCKS5 requests
become channels) and leaves (``egress``: channels become connections), agent-mode bridges,
session pools, tokens and auth throttling."""

"""Test support: payload server, subprocess management, peers, curl runner, tool checks.

Everything listens on loopback only; nothing here sends traffic off the machine.
"""

from .curl import CurlResult, curl
from .payload import (
    INDEX_BODY,
    PayloadServer,
    payload_bytes,
    payload_chunks,
    payload_sha256,
    write_payload_file,
)
from .peers import (
    HOST,
    Peer,
    start_linksocks_client,
    start_linksocks_provider,
    start_linksocks_reverse_server,
    start_linksocks_server,
    start_pywssocks_client,
    start_pywssocks_server,
    start_trisocks_client,
    start_trisocks_connector,
    start_trisocks_provider,
    start_trisocks_reverse_server,
    start_trisocks_server,
    trisocks_client_argv,
    trisocks_server_argv,
)
from .procs import ManagedProcess, ProcessFactory, ProcessFailure, free_port, port_open
from .tools import clean_env, in_ci, missing, require_peer, require_tool, trisocks_cmd

__all__ = [
    "HOST", "INDEX_BODY", "CurlResult", "ManagedProcess", "PayloadServer", "Peer", "ProcessFactory",
    "ProcessFailure", "clean_env", "curl", "free_port", "in_ci", "missing", "payload_bytes",
    "payload_chunks", "payload_sha256", "port_open", "require_peer", "require_tool",
    "start_linksocks_client", "start_linksocks_provider", "start_linksocks_reverse_server",
    "start_linksocks_server", "start_pywssocks_client", "start_pywssocks_server",
    "start_trisocks_client", "start_trisocks_connector", "start_trisocks_provider",
    "start_trisocks_reverse_server", "start_trisocks_server",
    "trisocks_client_argv", "trisocks_cmd", "trisocks_server_argv", "write_payload_file",
]

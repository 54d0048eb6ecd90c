"""What the management plane may ask of the tunnel server: this Protocol and nothing else.

``trisocks.tunnel.server.Server`` implements it; the plane never reaches into the
server's sessions, services or configuration, so either side can change inside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import trio

from ..tunnel.socks_server import Credentials
from ..tunnel.tokens import TokenInfo


class Tunnel(Protocol):
    ready: trio.Event
    port: int  # the bound WebSocket port
    trusts_proxies: bool  # --trusted-proxy given
    # called once per reverse token's SOCKS5 port with its own -n/-w pair (or None); what
    # it returns checks that port's credentials
    socks_credentials_hook: Callable[[Credentials | None], Any] | None

    @property
    def scheme(self) -> str: ...  # "ws" or "wss"

    @property
    def host(self) -> str: ...  # the configured listen host

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None: ...

    async def add_reverse_token(self, token: str | None = None, *, port: int | None = None,
                                username: str = "", password: str = "",
                                allow_manage_connector: bool = False) -> TokenInfo: ...

    def add_connector_token(self, token: str | None, reverse_token: str,
                            owner: bytes = b"") -> TokenInfo: ...

    def remove_token(self, token: str) -> TokenInfo | None: ...

    def session_tokens(self) -> list[TokenInfo]: ...  # one entry per open session

    def close_sessions_of(self, account: object, reason: str) -> int: ...

    def provider_count(self, token: str) -> int: ...

    def reverse_port(self, token: str) -> int | None: ...

    def client_address(self, peer_ip: str, headers: Mapping[str, str]) -> str: ...

    def add_listener(self, host: str, port: int) -> None: ...

    def check_socks_port(self, port: int) -> None: ...  # OSError when it cannot be bound

    destination_rules: Any  # the server's --allow/--deny RuleSet, or None (settable: a reload)

    @property
    def refused_destinations(self) -> int: ...  # connections and datagrams refused by a rule

"""The LinkSocks-compatible token API: /api/status and /api/token (the same requests get
the same JSON as LinkSocks's docs/guide/http-api.md describes)."""

from __future__ import annotations

import logging

from .._version import __version__
from ..tunnel.tokens import CONNECTOR, FORWARD, REVERSE, TokenInfo, generate, redact, refused_name
from . import schemas as s
from .errors import Conflict, Invalid, InvalidField, NotFound, Unavailable
from .model import TokenMeter, UserAccount
from .records import token_record
from .state import PlaneState

log = logging.getLogger("trisocks.management")


class TokenService:
    def __init__(self, state: PlaneState) -> None:
        self.state = state

    def reverse_port(self, info: TokenInfo) -> int:
        """A reverse token's SOCKS5 port; -1 in autonomy mode, which has none (as LinkSocks
        reports it: providers are reached through their own connector tokens)."""
        if info.allow_manage_connector:
            return -1
        port = self.state.server.reverse_port(info.token)
        return port if port is not None else (info.port or 0)

    def status(self) -> s.StatusResponse:
        tokens = self.state.tokens
        clients = self.state.token_clients()
        reverse, forward = [], []
        for info in tokens:
            if isinstance(info.account, UserAccount):
                continue
            if info.kind == REVERSE:
                port = self.reverse_port(info)
                # as LinkSocks does: connector_tokens only when there are some
                connectors = [c.token for c in tokens.connectors_of(info.token)]
                reverse.append(s.TokenStatus(
                    token=info.token, type="reverse", clients_count=clients[id(info)], port=port,
                    connector_tokens=connectors or s.UNSET))
            elif info.kind == FORWARD:
                forward.append(s.TokenStatus(token=info.token, type="forward",
                                             clients_count=clients[id(info)]))
        return s.StatusResponse(version=__version__, tokens=reverse + forward)

    @staticmethod
    def _check(req: s.TokenRequest) -> str:
        """The token to add (generated when not given), or Invalid."""
        kind = req.type
        if kind not in (FORWARD, REVERSE, CONNECTOR):
            raise Invalid("invalid token type")
        if kind == CONNECTOR and not req.reverse_token:
            raise Invalid("reverse_token is required for connector token")
        token = req.token or generate()
        reason = refused_name(token)
        if reason is not None:
            raise Invalid(reason)
        if kind == REVERSE and bool(req.username) != bool(req.password):
            raise Invalid("username and password go together")
        for name in ("username", "password"):  # SOCKS5 carries 255 bytes at most
            if len(getattr(req, name).encode()) > 255:
                raise InvalidField(f"Expected at most 255 bytes (UTF-8) - at `$.{name}`", field=name)
        return token

    async def add(self, req: s.TokenRequest) -> s.TokenResult:
        st = self.state
        kind = req.type
        token = self._check(req)
        async with st.lock:
            existing = st.tokens.get(token)
            if existing is not None:
                if (kind == CONNECTOR and existing.kind == CONNECTOR
                        and existing.reverse_token == req.reverse_token):
                    return s.TokenResult(token=token)  # idempotent, as in LinkSocks
                raise Conflict("token already exists")
            if kind == FORWARD:
                info = TokenInfo(token, FORWARD)
                info.account = TokenMeter(info, origin="api")
                await st.persist(st.store.put_token(token_record(info)))
                st.tokens.add(info)
                result = s.TokenResult(token=token)
            elif kind == CONNECTOR:
                rev = st.tokens.get(req.reverse_token)
                if rev is None or rev.kind != REVERSE:
                    raise Invalid("reverse token does not exist")
                info = TokenInfo(token, CONNECTOR, reverse_token=req.reverse_token)
                info.account = TokenMeter(info, origin="api")
                await st.persist(st.store.put_token(token_record(info)))
                st.tokens.add(info)
                result = s.TokenResult(token=token)
            else:
                result = await self._add_reverse(token, req)
        st.events.add("token_added", token=token, role=kind, detail="API")
        log.info("API: %s token %s added%s", kind, redact(token),
                 f" (SOCKS5 port {result.port})" if kind == REVERSE else "")
        return result

    async def _add_reverse(self, token: str, req: s.TokenRequest) -> s.TokenResult:
        """A reverse token: its SOCKS5 port is bound at once (the server's
        socks_credentials_hook lets users in there too), then the row is written."""
        st = self.state
        server = st.server
        try:
            info = await server.add_reverse_token(
                token, port=req.port or None, username=req.username,
                password=req.password, allow_manage_connector=req.allow_manage_connector)
        except OSError as exc:
            server.remove_token(token)
            log.warning("reverse token via API: port %s: %s", req.port or "any",
                        exc.strerror or exc)
            raise Conflict(f"cannot allocate port: {req.port or 0}") from None
        info.account.origin = "api"
        try:
            await st.persist(st.store.put_token(token_record(info)))
        except Unavailable:
            server.remove_token(token)
            raise
        return s.TokenResult(token=token, port=self.reverse_port(info))

    async def remove(self, token: str) -> s.TokenResult:
        st = self.state
        async with st.lock:
            info = st.tokens.get(token)
            if info is None or isinstance(info.account, UserAccount):
                raise NotFound("token not found")
            doomed = [token]
            if info.kind == REVERSE:
                doomed += [c.token for c in st.tokens.connectors_of(token) if not c.owner]
            await st.persist(st.store.delete_tokens(doomed))
            st.server.remove_token(token)
        for t in doomed:
            st.events.add("token_removed", token=t, detail="API" if t == token
                          else "removed with its reverse token")
        log.info("API: %s token %s removed", info.kind, redact(token))
        return s.TokenResult(token=token)

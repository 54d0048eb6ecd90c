"""The contracts between a session, the channels it carries and the accounts it meters.

A :class:`~trisocks.net.session.Session` drives a table of channel ends (a socket-backed
:class:`~trisocks.net.channel.Channel`, a bridge end in agent mode, a UDP association),
and they call back into the session. Both sides are written against these protocols
rather than against each other, so ``channel`` does not import ``session`` and a new
kind of channel end (or account) only has to provide what is listed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..wire import protocol
    from .flow import WindowBudget
    from .outbox import Outbox


class Account(Protocol):
    """Who a channel's bytes are metered to (a management-plane token meter or user).

    ``charge`` is called in the data path for every read or Data piece: an add and a compare.
    """

    def charge(self, n: int) -> bool:
        """Count ``n`` bytes; False once the limit is crossed (the channel is then closed)."""

    # the account's speed limits up and down (trisocks.policy.pace.Pacer), or None: read at
    # every read, so a change applies at once
    pace_up: object
    pace_down: object

    def refuse_reason(self) -> str | None:
        """Why no new session may start (disabled, expired, over quota), or None."""

    def admit(self) -> str | None:
        """Why no new channel may open now (refuse_reason, then connection limits), or None."""

    def opened(self, ch: ChannelEnd) -> None: ...

    def closed(self, ch: ChannelEnd) -> None:
        """The channel ended; its ``uploaded``/``downloaded`` are final."""


class ChannelEnd(Protocol):
    """What a session does with an entry of its channel table."""

    id: bytes
    account: Account | None

    @property
    def uploaded(self) -> int: ...

    @property
    def downloaded(self) -> int: ...

    def deliver(self, data, decoder=None) -> bool:
        """Stream bytes from the peer; True when the read loop must wait (``wait_space``)."""

    async def wait_space(self) -> None: ...

    def add_credit(self, n: int) -> None: ...

    def on_response(self, msg: protocol.ConnectResponse) -> None: ...

    def on_remote_disconnect(self, error: str) -> None: ...

    def on_datagram(self, msg: protocol.Data) -> None: ...

    def fail(self, error: str) -> None:
        """End with an error: tell the peer, stop both directions."""

    def abort(self) -> None:
        """The session is gone: stop at once."""


class ChannelHost(Protocol):
    """What a channel end uses of the session that carries it."""

    outbox: Outbox
    peer_window: int | None  # the credit the peer grants a channel (None: no flow control)
    recv_window: int  # the credit we grant a new channel (0: no flow control)
    windows: WindowBudget
    half_close: bool
    pending_limit: int
    pending_bytes: int
    pending_max: int
    channels: dict[bytes, ChannelEnd]
    trace: bool

    def mask_key(self) -> int | None: ...

    def send(self, msg) -> None: ...

    def send_if_open(self, msg) -> None: ...

    def spawn(self, fn, *args, unit: str = "channel") -> None: ...

    def register(self, ch: ChannelEnd, account: Account | None = None) -> None: ...

    def forget(self, ch: ChannelEnd) -> None: ...

    def pending_changed(self, delta: int) -> None: ...

    async def wait_sent(self) -> None: ...

"""Exceptions shared by the codecs (compiled and pure) and the I/O layers."""


class ProtocolError(Exception):
    """The peer broke the WebSocket or LinkSocks framing.

    ``close_code`` is the RFC 6455 status to close the WebSocket with
    (1002 protocol error, 1007 bad payload, 1009 message too big).
    """

    def __init__(self, reason: str, close_code: int = 1002) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code

    def __eq__(self, other: object) -> bool:  # lets differential tests compare errors
        return (
            isinstance(other, ProtocolError)
            and other.reason == self.reason
            and other.close_code == self.close_code
        )

    def __hash__(self) -> int:
        return hash((self.reason, self.close_code))

    def __repr__(self) -> str:
        return f"ProtocolError({self.reason!r}, close_code={self.close_code})"


class MessageError(ValueError):
    """A LinkSocks message could not be decoded (truncated, bad field, wrong major version)."""


class TunnelError(Exception):
    """Base for run-time failures reported to users with one clear line."""


class AuthError(TunnelError):
    """The server refused our token; retrying will not help."""

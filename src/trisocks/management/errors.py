"""What the services refuse, in their own words; app.py alone turns these into HTTP answers
(status code and body), so the services never speak HTTP."""

from __future__ import annotations


class DomainError(Exception):
    """A request the plane refuses; ``message`` is what the caller is told."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(DomainError):
    """The request makes no sense as a whole (a bad type, a missing companion field)."""


class InvalidField(Invalid):
    """One field's value is out of range; ``field`` names it."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class NotFound(DomainError):
    """No such token, user or key."""


class Conflict(DomainError):
    """It exists already, or a resource it needs (a port) is taken."""


class Refused(DomainError):
    """It exists, but its state forbids the request (a disabled or expired user)."""


class Unavailable(DomainError):
    """The store failed; nothing changed."""

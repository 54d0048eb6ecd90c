"""TRACE: the log level below DEBUG (``-dd``) at which sessions log every message.

Its own module so that the command line, which sets the level, and the session, which
logs at it, share one definition without the command line importing the data path."""

TRACE = 5

"""Logs for operators (docs/logging.md): text or JSON lines, on standard error or in a file
that logrotate may move away, floods of one kind of line held back, and the access log.

The log file is reopened when it has been moved or deleted: before each line the handler
compares the path's device and inode with those of the file it has open (the stdlib's
WatchedFileHandler). That is what logrotate's default (``create``: rename, new file) needs,
with no signal: SIGHUP belongs to the management plane, and two receivers of one signal
in Trio would fight over it. ``copytruncate`` works too, since the file is opened in
append mode. The cost is one ``stat`` per line, and lines are few: the data path never logs
(the TRACE level aside), and floods are limited here.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import sys
import threading
import time

TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
TEXT_DATE = "%Y-%m-%d %H:%M:%S"
FORMATS = ("text", "json")
DEFAULT_LIMIT = "50/10"  # lines of one kind per seconds (--log-limit)

# what every LogRecord has: anything else on a record is a structured extra
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


def rfc3339(created: float) -> str:
    """``2024-05-01T12:00:00.123Z``: UTC, milliseconds."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def extras(record: logging.LogRecord) -> dict:
    """The structured fields a call added with ``extra={...}``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``message``, then the
    record's extras (``event``, ``peer``, ...), and ``exception`` with a traceback; in a
    worker of ``--workers N``, ``worker`` (its number) after ``logger``."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": rfc3339(record.created), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if self.worker is not None:
            out["worker"] = self.worker
        for key, value in extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ASCII only: a stray surrogate in a host name can never make a line unwritable
        return json.dumps(out, default=str, separators=(",", ":"))


class AccessTextFormatter(logging.Formatter):
    """An access log line as text: the time (as in JSON), then ``key=value`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{rfc3339(record.created)} {record.getMessage()}"


def worker_tag() -> str | None:
    """The number of this worker of `trisocks server --workers N` (cli/workers.py), or None."""
    raw = os.environ.get("TRISOCKS_WORKER_ID", "")
    return raw if raw.isdigit() else None


def formatter(log_format: str, access: bool = False) -> logging.Formatter:
    worker = worker_tag()
    if log_format == "json":
        return JsonFormatter(worker=None if worker is None else int(worker))
    if access:
        return AccessTextFormatter()
    # a worker's lines say which worker wrote them
    text = TEXT_FORMAT if worker is None else TEXT_FORMAT.replace(
        "%(name)s", f"[worker {worker}] %(name)s")
    return logging.Formatter(text, TEXT_DATE)


def parse_limit(text: str) -> tuple[int, float] | None:
    """``COUNT/SECONDS`` (``50/10``), or ``0``/``off`` for no limit; ValueError otherwise."""
    text = text.strip().lower()
    if text in ("0", "off", "none"):
        return None
    count, sep, seconds = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r}: expected COUNT/SECONDS, e.g. {DEFAULT_LIMIT}, or 0 for none")
    n, interval = int(count), float(seconds)
    if n < 1 or not interval > 0:
        raise ValueError(f"{text!r}: COUNT must be 1 or more and SECONDS more than 0")
    return n, interval


class Limiter(logging.Filter):
    """Lets at most ``count`` records of one kind (logger, level, message template) through
    per window of ``interval`` seconds. The rest are counted; when the window ends (seen at
    the next record of any kind, or at exit) one WARNING line per kind says how many were
    held back and shows the last of them. Thousands of failed logins a second then write
    a few lines, not a disk full."""

    MAX_KINDS = 1024  # templates made on the fly (f-strings) share one kind per logger past this

    def __init__(self, count: int, interval: float, clock=time.monotonic) -> None:
        super().__init__()
        self.count = count
        self.interval = interval
        self.clock = clock
        self.sink = None  # where summaries go: the handler's handle()
        self.suppressed_total = 0
        self._window_end = 0.0
        self._kinds: dict[tuple, list] = {}  # kind -> [passed, held back, last held back]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_summary", False):
            return True
        now = self.clock()
        with self._lock:
            due = self._roll(now) if now >= self._window_end else ()
            template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
            kind = (record.name, record.levelno, template)
            seen = self._kinds.get(kind)
            if seen is None:
                if len(self._kinds) >= self.MAX_KINDS:
                    kind = (record.name, record.levelno, None)
                    seen = self._kinds.get(kind)
                if seen is None:
                    seen = self._kinds[kind] = [0, 0, None]
            passed = seen[0] < self.count
            if passed:
                seen[0] += 1
            else:
                seen[1] += 1
                seen[2] = record
                self.suppressed_total += 1
        self._emit(due)
        return passed

    def flush(self) -> None:
        """Say what the current window held back (at exit)."""
        with self._lock:
            due = self._roll(self.clock())
        self._emit(due)

    def _roll(self, now: float) -> list[logging.LogRecord]:
        due = [summary(kind, held, last, self.interval)
               for kind, (_, held, last) in self._kinds.items() if held]
        self._kinds = {}
        self._window_end = now + self.interval
        return due

    def _emit(self, records) -> None:
        if self.sink is not None:
            for record in records:
                self.sink(record)


def summary(kind: tuple, held: int, last: logging.LogRecord, interval: float) -> logging.LogRecord:
    name, level, template = kind
    try:
        example = last.getMessage()
    except Exception:  # a record whose arguments do not fit its template
        example = str(last.msg)
    record = logging.LogRecord(
        "trisocks.log", logging.WARNING, __file__, 0,
        "suppressed %d more %s lines of %s within %g s, the last: %s",
        (held, logging.getLevelName(level), name, interval, example), None)
    record.event = "log_suppressed"
    record.suppressed = held
    record.source_logger = name
    record.template = template
    record._summary = True
    return record


def open_handler(path: str, what: str) -> logging.Handler:
    """A handler writing to ``path`` ('' or '-': standard error for logs, standard output
    for the access log); OSError names the file if it cannot be opened."""
    if not path or path == "-":
        return logging.StreamHandler(sys.stdout if what == "access" else sys.stderr)
    return logging.handlers.WatchedFileHandler(path, mode="a", encoding="utf-8")


_limiter: Limiter | None = None


def configure(level: int, trace: int, log_format: str = "text", log_file: str = "",
              limit: tuple[int, float] | None = None) -> Limiter | None:
    """The process's logging: one handler on the root logger (trisocks at INFO, DEBUG or
    TRACE by ``level``, everyone else at WARNING), limited unless debugging (-d wants every
    line). Raises OSError when the file cannot be opened."""
    global _limiter
    handler = open_handler(log_file, "log")
    handler.setFormatter(formatter(log_format))
    if _limiter is not None:
        atexit.unregister(_limiter.flush)
        _limiter = None
    if limit is not None and level == 0:
        _limiter = Limiter(*limit)
        _limiter.sink = handler.handle
        handler.addFilter(_limiter)
        atexit.register(_limiter.flush)  # before logging's own shutdown (atexit is LIFO)
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("trisocks").setLevel({0: logging.INFO, 1: logging.DEBUG}.get(level, trace))
    return _limiter


def access_logger(path: str, log_format: str = "text") -> logging.Logger:
    """The ``trisocks.access`` logger writing to ``path`` ('-': standard output) only."""
    from ..net.access import ACCESS_LOGGER

    handler = open_handler(path, "access")
    handler.setFormatter(formatter(log_format, access=True))
    logger = logging.getLogger(ACCESS_LOGGER)
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not in the main log: it has a file of its own
    return logger

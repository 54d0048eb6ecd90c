"""One server per SQLite file: an exclusive flock on ``<db>.lock`` (store.py says why)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .rows import StoreError, StoreInUse


def lock_path_of(path: str | os.PathLike) -> Path:
    # next to the real file, so that a symlink to the database finds the same lock
    real = Path(path).resolve()
    return real.with_name(real.name + ".lock")


def lock_database(path: str | os.PathLike) -> int:
    """Hold an exclusive flock on <db>.lock (until the returned descriptor is closed), or
    raise StoreInUse. A server takes it for its database; the supervisor of workers takes
    it once for all of them (they open the file ``shared``).

    A separate file, because SQLite's own POSIX locks on the database must not be mixed
    with ours; it is never removed (removing it would let two servers lock two different
    files of the same name).
    """
    db = Path(path)
    lock = lock_path_of(db)
    try:
        db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create {lock}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"another trisocks server (pid {holder})" if holder.isdigit() else "another process"
        raise StoreInUse(f"{db} is in use by {who}; stop that one first, or give this "
                         "server a database of its own with --db FILE") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

"""The embedded index's single-writer lock, which says who holds it.

One process at a time may write an embedded index (SQLite serialises transactions, but the
keypoint index in memory must follow every write), while any number of processes read it.  The
writer holds ``flock(LOCK_EX)`` on the ``LOCK`` file, taken without blocking, and writes into it
who it is: PID, command line, host and since when.  A second writer is refused with
:class:`~delf_es.errors.IndexLocked` naming that holder, instead of "already open elsewhere".
The lock dies with its process (``flock`` is released by the kernel), so a crashed writer never
leaves the index locked; the stale text it leaves is overwritten by the next writer.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from delf_es.errors import IndexLocked

try:  # POSIX only; elsewhere one process per index is the user's responsibility
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["WriterLock", "describe_holder"]


def describe_holder(info: dict | None) -> str:
    """``PID 1234 (delf-es index photos/) on host, since 2026-12-01 09:41:02 UTC`` or "another process"."""
    if not info:
        return "another process"
    command = info.get("command") or "?"
    if len(command) > 120:
        command = command[:117] + "..."
    since = info.get("since", "?")
    return f"PID {info.get('pid', '?')} ({command}) on {info.get('host', '?')}, since {since}"


class WriterLock:
    """``flock`` on ``path`` plus the holder's description in the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self, what: str) -> None:
        """Take the lock or raise :class:`IndexLocked` naming the holder; ``what`` is the index, for
        the message.  Idempotent."""
        if self._handle is not None:
            return
        handle = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._read(handle)
                handle.close()
                raise IndexLocked(
                    f"embedded index {what} is being written by {describe_holder(holder)}; searches and stats "
                    f"work meanwhile, writes wait until it finishes (or stop it)", holder=holder,
                ) from None
        info = {"pid": os.getpid(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?",
                "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # releases the flock; the text stays (the next writer overwrites it)
            self._handle = None

    def holder(self) -> dict | None:
        """What the current (or last) holder wrote, or None."""
        try:
            with open(self.path) as handle:
                return self._read(handle)
        except OSError:
            return None

    @staticmethod
    def _read(handle) -> dict | None:
        try:
            handle.seek(0)
            text = handle.read()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

"""Free space where the agent writes, what failed there, and writing files whole.

A Raspberry Pi's SD card fills up. A write that fails for lack of space is told everywhere (the
job's reply, the log, ``/healthz``, the state topic), and the free bytes are a gauge with an
alert, so a full disk speaks before it silences anything.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def write_atomically(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write a file (0600) in one rename: readers see the old file or the whole new one.

    A failure removes the temporary file (half a file takes space too) and raises.

    Args:
        path: The file.
        data: Its new content.
        durable: Flush it to storage before the rename, so a power cut leaves no empty file
            either (for what a restart must be able to trust).
    """
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to storage."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def free_bytes(folder: Path) -> int | None:
    """Return the bytes an unprivileged writer may still use in ``folder``'s file system."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def is_full(error: BaseException) -> bool:
    """Return whether a write failed for lack of space (an OS error, or SQLite's own words)."""
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
        return True
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error).lower()


@dataclass
class StorageWatch:
    """The folders the agent writes to, and the last write that failed there (if any)."""

    folders: dict[str, Path]
    """By name (``state``, ``images``): what the gauge's ``folder`` label says."""
    problems: dict[str, str] = field(default_factory=dict)
    """What failed, by what was being written; each cleared by the next such write that works."""

    @property
    def problem(self) -> str | None:
        """Return what failed, for ``/healthz`` and the state topic; None when nothing did."""
        return "; ".join(self.problems.values()) or None

    def failed(self, what: str, folder: Path, error: BaseException) -> str:
        """Record a failed write of ``what``; return the sentence the reply and the log carry."""
        free = free_bytes(folder)
        room = f" ({free} bytes free)" if free is not None else ""
        sentence = f"cannot write {what} in {folder}{room}: {error}"
        self.problems[what] = sentence
        log.error("%s", sentence)
        return sentence

    def succeeded(self, what: str) -> None:
        """A write of ``what`` worked again: that condition is over."""
        sentence = self.problems.pop(what, None)
        if sentence is not None:
            log.info("writing works again (%s)", sentence)

    def free(self, name: str) -> float:
        """Return the free bytes of one folder (NaN when it cannot be read), for the gauge."""
        value = free_bytes(self.folders[name])
        return float("nan") if value is None else float(value)

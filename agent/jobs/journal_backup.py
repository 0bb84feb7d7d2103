"""The journal's copy for backups: consistent at any moment, and where a restore starts from.

The journal is SQLite in WAL mode, written while the agent runs. A backup that copies its files
one after another (the Supervisor's hot backup tars ``/data`` while the app runs) can catch the
database and its write-ahead log at different moments: a copy that may not open, or loses rows.
So backups hold another file, ``journal-backup.sqlite3``, written by SQLite's own backup API
from one read transaction: every job committed before it began, nothing half-written. It is
written just before a backup (the app's ``backup_pre``: ``edgeai-agent --journal-backup``) and
at every clean stop (a stopped app is backed up without that command), and the live journal's
files are left out of backups (config.yaml's ``backup_exclude``). After a restore the live
journal is missing and the copy is there: the agent starts from the copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from typing import TYPE_CHECKING

from agent.machine.disk import sync_folder

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

BACKUP_NAME = "journal-backup.sqlite3"
BUSY_TIMEOUT_S = 30.0
"""How long the copy waits for the journal's writer (a write takes milliseconds)."""


def backup_path(journal: Path) -> Path:
    """Return where the journal's copy is kept, beside it."""
    return journal.with_name(BACKUP_NAME)


def write_journal_backup(journal: Path) -> int | None:
    """Write the journal's consistent copy, replacing the last one; return its number of jobs.

    Returns:
        The number of jobs in the copy, or None when there is no journal yet.

    Raises:
        sqlite3.Error: The journal cannot be read.
        OSError: The copy cannot be written.
    """
    if not journal.exists():
        return None
    target = backup_path(journal)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    with (
        contextlib.closing(sqlite3.connect(journal, timeout=BUSY_TIMEOUT_S)) as source,
        contextlib.closing(sqlite3.connect(partial)) as copy,
    ):
        source.backup(copy)  # all pages in one step: one read transaction, one moment
        # One self-contained file: no write-ahead log beside it for a backup to miss.
        copy.execute("PRAGMA journal_mode=DELETE")
        jobs = int(copy.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    with partial.open("rb") as written:
        os.fsync(written.fileno())
    partial.replace(target)
    sync_folder(target.parent)
    return jobs


def restore_journal_backup(journal: Path) -> int | None:
    """After a restore (no journal, a copy beside it), start the journal from the copy.

    Returns:
        The number of jobs restored, or None when there was nothing to restore.

    Raises:
        sqlite3.DatabaseError: The copy is damaged (its integrity check fails).
        OSError: The journal cannot be written.
    """
    copy = backup_path(journal)
    if journal.exists() or not copy.exists():
        return None
    with contextlib.closing(sqlite3.connect(copy)) as source:
        verdict = source.execute("PRAGMA integrity_check").fetchone()[0]
        if verdict != "ok":
            message = f"the journal's copy {copy} is damaged: {verdict}"
            raise sqlite3.DatabaseError(message)
        # Into a file beside it first: a restore cut short leaves no half journal behind.
        partial = journal.with_name(journal.name + ".restoring")
        partial.unlink(missing_ok=True)
        with contextlib.closing(sqlite3.connect(partial)) as restored:
            source.backup(restored)
            jobs = int(restored.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    partial.replace(journal)
    sync_folder(journal.parent)
    return jobs


def start_from_backup(journal: Path) -> None:
    """At start, after a restore, start the journal from its copy; say so, or why not."""
    try:
        restored = restore_journal_backup(journal)
    except (OSError, sqlite3.Error) as exc:
        # The copy stays for whoever looks; the agent starts with an empty journal.
        log.error("journal: cannot start from the backup's copy (%s); starting empty", exc)  # noqa: TRY400 - the reason is the message
        return
    if restored is not None:
        log.info("journal: started from the backup's copy, %d jobs", restored)


def keep_backup_copy(journal: Path) -> None:
    """At a clean stop, write the copy that a backup of the stopped app will hold."""
    try:
        write_journal_backup(journal)
    except (OSError, sqlite3.Error) as exc:
        log.warning("journal: cannot write the copy for backups (%s)", exc)

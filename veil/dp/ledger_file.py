"""The SQLite budget ledger a worker writes is the file at the ledger's path, also after a restore by ``mv``.

A restore that puts another file at the path (``mv backup.sqlite3 veil-dp-budget.sqlite3``, or a copy renamed
over it) left a running worker's connection on the old, unlinked file: its charges were checkpointed there, a
worker started after the restore read the new file without them, and a restart lost them. A log deleted by hand
(``rm veil-dp-budget.sqlite3-wal -shm``) likewise left it appending to an unlinked log, and a copy written over
the file in place (``cp``) left it reading, and writing back, its cached pages. So the files a ledger opened are
known by their identities (``st_dev``, ``st_ino``; the database's taken before and after the open, a rename in
between opens it again; its modification time and size too, see :class:`FollowedFile`), compared with the path's
before each charge and read (three ``stat``: a few us) and again inside each charge's write transaction (a
restore while it waited for the lock): the ledger opens the path again (totals kept in memory dropped), and a
charge whose files changed inside its transaction is rolled back (nothing written to the old file) and made again
on the new one. A path with no file (moved away, deleted) is never made again empty: charges are refused until
a ledger file is back.

Closing the old connection of a moved or unlinked database writes nothing (SQLite neither checkpoints nor deletes
its ``-wal``). A ``-wal`` that still held the old file's pages at the restore is read by every connection to the
new file, as SQLite reads any ``-wal`` at a path: a restore under running workers belongs to ``sqlite3
veil-dp-budget.sqlite3 ".restore backup.sqlite3"`` (every connection sees it at once), and one by ``mv`` or ``cp``
to a stopped worker's data directory with its ``-wal`` and ``-shm`` removed.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from veil.exceptions import VeilError
from veil.workers.database import Database, OwnerStateUnavailableError, is_database_url

log = logging.getLogger(__name__)

Identity = tuple[int, int]

#: The files a connection to the ledger has open: the database and, beside it, its log and the log's index. A log
#: deleted by hand under a running worker (``rm veil-dp-budget.sqlite3-wal``, as a restore script does) left the
#: worker appending charges to the unlinked one, lost at a kill, while a worker started after read the file alone.
_BESIDE = ("", "-wal", "-shm")

_GONE = ("the owner's DP budget ledger file was moved or deleted while this worker had it open: the request was "
         "refused (charges resume once a ledger file is back at its path)")
_SWITCHED = ("the owner's DP budget ledger file was replaced again and again during this charge (restores): the "
             "charge was refused and nothing was recorded, try again")
#: Tries of one charge whose files changed while it waited for the lock (each rolled back, nothing recorded).
CHARGE_TRIES = 3
#: How long a charge whose database was only written meanwhile (its time and size: another worker's checkpoint,
#: tens of ms of writes) tries again without counting the tries, pausing between them (doubling up to the last).
#: Counted, two workers' honest charges were refused: a checkpoint of the other outlasted the three tries.
WRITTEN_WAIT_S = 5.0
WRITTEN_PAUSES_S = (0.002, 0.05)
#: Opens in a row that may each find the path renamed under them before one is taken as the path's file.
_OPEN_TRIES = 5

State = tuple[int, ...]


class FileChanged(VeilError):
    """Inside a charge's write transaction: the ledger's files changed since the check before it (a restore
    while it waited for the lock, or another process's checkpoint): rolled back, the charge is made again on the
    path's file as it is now. ``moved``: another file is at the path or beside it (else only written). Caught
    by the charge that raised it: never an error reply."""

    def __init__(self, message: str = "the ledger's files changed during the charge", moved: bool = True) -> None:
        super().__init__(message)
        self.moved = moved


def identity(path: str) -> Optional[Identity]:
    """The file at ``path`` (device and inode), or None when there is none."""
    state = _state(path)
    return None if state is None else state[:2]


def _state(path: str) -> Optional[State]:
    """The file at ``path``: device, inode, modification time and size (None: no file)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size


class FollowedFile:
    """The files a ledger's connection has open, as it last saw them (``None`` path: nothing to follow, as an
    in-memory or PostgreSQL ledger). The database's modification time and size are part of it: a copy written
    over the file in place (``cp backup.sqlite3 veil-dp-budget.sqlite3``, the same inode) left the worker reading
    its cached pages (SQLite keeps them while its log's index is unchanged), and writing them back over the
    restored ones. A checkpoint (the only write to the database in WAL mode) by another process changes them too:
    the ledger opens the file again, at the cost of one open per such checkpoint; its own are taken in after each
    write (:meth:`settle`)."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.opened: tuple[Optional[State], ...] = ()

    def _now(self) -> tuple[Optional[State], ...]:
        db, wal, shm = (_state(self.path + suffix) for suffix in _BESIDE)
        return db, wal and wal[:2], shm and shm[:2]  # (the log's size and time change at every commit)

    @classmethod
    def of(cls, location: str) -> "FollowedFile":
        return cls(None if location == ":memory:" or is_database_url(location) else location)

    def open(self, opener: Callable[[], Database]) -> Database:
        """``opener()``, its files kept as they are: the path's before and after the open, the same file (a
        rename in between opens it again); its log's after (the open makes them). Raises
        OwnerStateUnavailableError when the path stays without a file."""
        if self.path is None:
            return opener()
        for _ in range(_OPEN_TRIES):
            before = identity(self.path)
            db = opener()
            after = identity(self.path)
            if before is not None and before == after:
                self.opened = self._now()
                return db
            db.close()
        raise OwnerStateUnavailableError(_GONE)

    def changed(self) -> bool:
        """Whether the path, or its log beside, is another file than the one opened (or none), or the database
        was written since: three ``stat``."""
        return self.path is not None and self._now() != self.opened

    def refuse_if_changed(self) -> Optional[tuple]:
        """Inside a charge's write transaction: :class:`FileChanged` (rolled back) if the files changed; else the
        files' identities, for :meth:`committed_to_them`."""
        now = self._now() if self.path is not None else ()
        if now != (self.opened if self.path is not None else ()):
            raise FileChanged(moved=self._identities(now) != self._identities(self.opened))
        return self._identities(now)

    @staticmethod
    def _identities(state: tuple) -> tuple:
        return tuple(s and s[:2] for s in state)

    def committed_to_them(self, seen: Optional[tuple]) -> bool:
        """After the commit: whether the path and its log are still the files the transaction checked (``seen``,
        three ``stat``). A restore landing between that check and the COMMIT (its fsync alone takes
        milliseconds) left the charge committed to the old, unlinked file and reported as made: its release went
        out, and the file every other process reads never held it. Identities only: a checkpoint (the
        database's time and size) moves no charge."""
        return self.path is None or self._identities(self._now()) == seen

    def settle(self) -> None:
        """After the ledger's own write (its checkpoint writes the database): the database's time and size taken
        in, when it is still the file opened (a file put in place meanwhile stays seen)."""
        if self.path is None or not self.opened or self.opened[0] is None:
            return
        db = _state(self.path)  # (one stat: the log's files are left as seen, so a change of them stays seen)
        if db is not None and db[:2] == self.opened[0][:2]:
            self.opened = (db, *self.opened[1:])

    def forget(self) -> None:
        """The file opened is not taken as set up: the next check opens the path again."""
        self.opened = ()

    def reopen(self, old: Database, opener: Callable[[], Database]) -> Database:
        """After :meth:`changed`: the old connection closed, then the path's file opened; refused while the
        path has no file (never made again empty: the owner's rows would read as none). Closed first: the old
        and new connections of one process share the ``-shm`` file by its path, and closing one's descriptor
        drops the process's POSIX locks on it, the new one's too."""
        old.close()  # (a moved or unlinked file: SQLite neither checkpoints nor deletes its -wal)
        now = self._now()
        if now[0] is None:
            log.warning("DP budget ledger %s: the file is gone (moved or deleted): charges refused", self.path)
            raise OwnerStateUnavailableError(_GONE)
        if self.opened and self.opened[0] is not None and now[0][:2] == self.opened[0][:2] \
                and now[1:] == self.opened[1:]:
            log.info("DP budget ledger %s: written by another process (a checkpoint, or a copy in place): "
                     "opened again", self.path)
        else:
            log.warning("DP budget ledger %s: another file is at the path, or beside it (a restore): opened it",
                        self.path)
        return self.open(opener)


class FollowingReader:
    """The read-only connection a file ledger hands to its owner's console (the Budgets page asks once, then again
    for each user's curve), kept across a reopen: each statement runs on the ledger's current reader (``current``),
    under ``lock``, which a reopen takes before closing the old one. A reader closed by a reopen failed the page
    once ("the owner's state database was closed"). Statements run under one ``with reader.lock`` read one file."""

    dialect = "sqlite"

    def __init__(self, current: Callable[[], Database], lock) -> None:
        self._current, self.lock = current, lock

    def execute(self, sql: str, params=()):
        with self.lock:
            return self._current().execute(sql, params)


def refused_after_changes() -> OwnerStateUnavailableError:
    """A charge whose files changed at each of its tries (restores in a row): refused, nothing recorded."""
    return OwnerStateUnavailableError(_SWITCHED)

"""A data owner's per-user privacy budget ledger, persisted in SQLite or PostgreSQL.

Contract: **charge before release**. A worker computes a private result, then
calls :meth:`BudgetLedger.charge` with the result's (epsilon, delta) cost, and
only if the charge succeeds hands the result out. If the charge fails the
result is discarded. Charging first means a crash between charging and
releasing can only waste budget, never leak an uncharged result.

Composition is basic (epsilons and deltas add up), which is valid for any
mix of mechanisms; tighter accounting of a training run belongs in
:class:`veil.dp.Accountant`, whose final (epsilon, delta) is then charged here.

Several worker processes of one owner may share one ledger (a SQLite file, or
a ``postgresql://`` URL for replicas on several machines): every charge reads
the spent total (the user's running total, :mod:`veil.dp.charge_totals`, whose
cost does not grow with the user's charges) and inserts under one lock (SQLite
``BEGIN IMMEDIATE``, or the user's ``budgets`` row ``SELECT ... FOR UPDATE`` on
PostgreSQL), so two processes cannot both spend the last of a budget.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

from veil.dp import charge_totals, ledger_file, ledger_rows
from veil.dp.accountant import Accountant, accounted_noise
from veil.dp.errors import BudgetExceededError, PrivacyParameterError, ReplayedRequestError, UnknownUserError
from veil.workers.database import Database, DatabaseClosedError, OwnerStateUnavailableError, ReaderSlot

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    "user" TEXT PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    "user" TEXT NOT NULL REFERENCES budgets("user"),
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_by_user ON charges ("user");
CREATE TABLE IF NOT EXISTS requests (
    "user" TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY ("user", request_id)
);
CREATE TABLE IF NOT EXISTS training (
    "user" TEXT NOT NULL,
    delta REAL NOT NULL,
    state TEXT NOT NULL,
    epsilon REAL NOT NULL,
    PRIMARY KEY ("user", delta)
);
"""

# Float sums drift; a charge that fits up to this fraction of the total is accepted. Relative, never
# absolute: an absolute 1e-12 let a pure-DP (epsilon, 0) budget pay for Gaussian releases of delta <= 1e-12.
_SLACK = 1e-9

_T = TypeVar("_T")

_UNUSABLE = ("the owner's DP budget ledger file put in place of the one in use could not be opened (damaged, or "
             "read-only): the request was refused")

#: Distinct (noise multiplier, sample rate) pairs one user's training accountant (per training delta) may hold.
#: Each step recomputes the accountant's epsilon over all of them, under the user's ledger lock: unbounded, a
#: scientist sending steps of ever new (sigma, q) (each ~0 epsilon) would make every charge take seconds.
MAX_TRAINING_EVENTS = 16

#: Users whose total a read summed are kept in memory (checked before each use at the user's stamp count and nonce,
#: veil.dp.charge_totals: a restored ledger is not read through them), so asking for a budget again does not sum
#: the rows again when the total in the database is stale and may not be written.
_KNOWN_TOTALS = 1024


def _fits(spent: float, charge: float, total: float) -> bool:
    """Whether a charge fits the total up to float drift (so a total of 0 takes no charge above 0)."""
    return spent + charge <= total * (1 + _SLACK)


class BudgetLedger:
    """Per-user (epsilon, delta) budgets and the charges made against them.

    Args:
        path: SQLite file (created if absent); ``":memory:"`` for a throwaway ledger; or a
            ``postgresql://`` URL (shared by the owner's worker processes).
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = str(path)
        # A network worker serves requests from a thread pool: one connection
        # shared behind a (re-entrant) lock; transactions are begun explicitly below.
        self._file = ledger_file.FollowedFile.of(self.path)  # (a restore by mv is followed: veil.dp.ledger_file)
        self._db = self._file.open(self._open)
        self._lock = self._db.lock
        self._closed = False
        self._reader = ReaderSlot(self._db)
        # (a reopen takes it, after the ledger's lock, to swap the reader: never while the console reads on it)
        self._reader_lock = threading.RLock()
        self._following_reader = ledger_file.FollowingReader(lambda: self._reader.get(), self._reader_lock)
        self._known: dict[str, charge_totals.Total] = {}  # (see _KNOWN_TOTALS)
        self._known_lock = threading.Lock()  # (the console's reads run beside the ledger's lock)
        self._tried_runs: dict[str, set] = {}  # user -> runs of her refused steps, at any delta (see _tried)
        with self._lock:
            self._make_tables()
            self._file.settle()

    def _open(self) -> Database:
        # synchronous=FULL: each charge is fsynced at commit, before the release it pays for goes out (WAL +
        # NORMAL could lose the last charges to an OS crash or power cut while their answers were already sent)
        return Database(self.path, timeout=30.0, synchronous="FULL")

    def _make_tables(self) -> None:
        self._db.executescript(_SCHEMA)
        self._db.executescript(charge_totals.SCHEMA)  # (after: its index is on charges)
        ledger_rows.create(self._db)  # (after both: its triggers are on charges, its columns theirs)

    def _follow(self) -> None:
        """(Under the lock, before each charge and read.) The SQLite file at the path opened again when it, or its
        log, changed since (a restore by ``mv`` or ``cp``, a log deleted, another process's checkpoint:
        :mod:`veil.dp.ledger_file`), with its tables, triggers and columns made as at open (an older file's);
        totals kept in memory are dropped (summed over the other file's rows). Three ``stat`` when nothing did."""
        if self._closed or not self._file.changed():
            return
        with self._reader_lock:  # (a console read in progress ends first, on the file it began on)
            self._reader.close()  # (before the old connection: see FollowedFile.reopen)
            try:
                db = self._file.reopen(self._db, self._open)
                db.lock = self._lock  # (the ledger's lock stays the one every caller holds)
                self._db, self._reader = db, ReaderSlot(db)
                with self._known_lock:
                    self._known.clear()
                self._make_tables()
            except (sqlite3.Error, OSError):  # (a damaged file, another user's, a read-only one: opened again next)
                self._file.forget()
                log.warning("DP budget ledger %s: the file put at its path could not be opened", self.path,
                            exc_info=True)
                raise OwnerStateUnavailableError(_UNUSABLE) from None
        self._file.settle()

    def _followed_write(self, body: Callable[[], _T]) -> _T:
        """``body()`` in a write transaction on the file at the ledger's path as it is now
        (:mod:`veil.dp.ledger_file`): made again, rolled back first (nothing recorded), when the files changed
        while it waited for the lock. (The transaction takes the lock itself: a PostgreSQL commit whose answer
        was lost is looked up after it lets go, never holding up the worker's other charges.)"""
        moves, pause = 0, ledger_file.WRITTEN_PAUSES_S[0]
        written_until = time.monotonic() + ledger_file.WRITTEN_WAIT_S
        while moves < ledger_file.CHARGE_TRIES:
            with self._lock:
                self._follow()
                db = self._db
            try:
                with db.write_transaction():
                    if db is not self._db:  # (opened again by another thread meanwhile)
                        raise ledger_file.FileChanged(moved=False)
                    seen = self._file.refuse_if_changed()
                    result = body()
            except ledger_file.FileChanged as changed:
                if changed.moved or time.monotonic() > written_until:
                    moves += 1
                else:  # (only written, by another worker's checkpoint: tried again once it is done, uncounted)
                    time.sleep(pause)
                    pause = min(2 * pause, ledger_file.WRITTEN_PAUSES_S[1])
                continue
            except DatabaseClosedError:
                if self._closed or db is self._db:
                    raise
                moves += 1
                continue  # (closed by another thread's reopen before this one's transaction began)
            with self._lock:
                if not self._file.committed_to_them(seen):
                    moves += 1
                    continue  # (committed to a file no longer at the path: made again on the one there now)
                if db is self._db:
                    self._file.settle()  # (its own checkpoint wrote the file)
            return result
        raise ledger_file.refused_after_changes()

    def reader(self) -> Database:
        """A read-only connection of its own for long reads (the console's Budgets page sums and buckets a
        whole ledger): they never hold the lock every charge takes. An in-memory ledger has only its own."""
        with self._lock:
            self._follow()
            with self._reader_lock:  # (the console's FollowingReader opens it too: one connection, never two)
                reader = self._reader.get()  # (refused once the ledger is closed)
            # (a file ledger's: kept across a reopen, FollowingReader; in memory or PostgreSQL nothing is reopened)
            return reader if self._file.path is None else self._following_reader

    def close(self) -> None:
        """Closes the database file."""
        with self._lock:
            self._closed = True
            self._db.close()
            self._reader.close()

    def __enter__(self) -> "BudgetLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _check(epsilon: float, delta: float) -> None:
        if not epsilon >= 0:
            raise PrivacyParameterError(f"epsilon must be >= 0, got {epsilon}")
        if not 0 <= delta < 1:
            raise PrivacyParameterError(f"delta must be in [0, 1), got {delta}")

    def set_budget(self, user: str, epsilon: float, delta: float) -> None:
        """Sets (or replaces) the user's total budget; past charges still count."""
        self._check(epsilon, delta)
        self._followed_write(lambda: self._db.execute(
            'INSERT INTO budgets("user", epsilon, delta) VALUES (?, ?, ?) '
            'ON CONFLICT("user") DO UPDATE SET epsilon = excluded.epsilon, delta = excluded.delta',
            (user, float(epsilon), float(delta))))
        with self._known_lock:  # (refused for want of budget: a new budget may take them)
            self._tried_runs.pop(user, None)

    def _spent(self, user: str, db: Optional[Database] = None) -> tuple[float, float]:
        # the user's running total (veil.dp.charge_totals), not a SUM over their rows: with many tiny charges
        # that SUM made every charge slower, under the lock every other user's charge waits for. A read writes
        # nothing (a read-only standby answers too): a total it caught up is kept in memory instead.
        total = charge_totals.current(db or self._db, user, self._known_total(user))
        with self._known_lock:
            if user not in self._known and len(self._known) >= _KNOWN_TOTALS:
                self._known.pop(next(iter(self._known)))
            self._known[user] = total
        return total.spent

    def _known_total(self, user: str) -> Optional[charge_totals.Total]:
        with self._known_lock:
            return self._known.get(user)

    def _budget(self, user: str, lock: bool = False) -> tuple[float, float]:
        # lock=True (inside a charge): the user's row stays locked until commit, so concurrent
        # charges of the same user from other processes queue here (PostgreSQL; SQLite locks the file).
        row = self._db.execute('SELECT epsilon, delta FROM budgets WHERE "user" = ?'
                               + (self._db.for_update if lock else ""), (user,)).fetchone()
        if row is None:
            raise UnknownUserError(f"no privacy budget for user {user!r}; call set_budget first")
        return float(row[0]), float(row[1])

    def _refuse_replay(self, user: str, request_id: Optional[str]) -> None:
        """Replay protection (in the charge's transaction): one charge, one release per request id (within the
        replay horizon, :mod:`veil.dp.ledger_rows`; the id is stored with its charge)."""
        if request_id is None:
            return
        if self._db.execute('SELECT 1 FROM requests WHERE "user" = ? AND request_id = ?',
                            (user, request_id)).fetchone() is not None:
            raise ReplayedRequestError(
                f"request {request_id!r} of user {user!r} was already charged (and answered, unless the "
                "owner's database was lost while committing it); a replayed release is refused (send a new "
                "request id for a new release)")

    def charge(self, user: str, epsilon: float, delta: float, reason: str,
               request_id: Optional[str] = None) -> tuple[float, float]:
        """Atomically records a charge, or refuses it if it would exceed the budget.

        The check and the insert run in one write transaction holding the user's
        lock, so two processes sharing the ledger cannot both spend the last of a budget.

        Returns:
            The remaining ``(epsilon, delta)`` after the charge.

        Raises:
            BudgetExceededError: the charge does not fit; nothing is recorded.
            UnknownUserError: the user has no budget.
            ReplayedRequestError: ``request_id`` was already charged.
        """
        self._check(epsilon, delta)

        def charge() -> tuple[float, float]:
            self._budget(user, lock=True)  # lock first: replayed ids are checked under the user's lock
            self._refuse_replay(user, request_id)
            return self._charge_in_transaction(user, epsilon, delta, reason, request_id)

        return self._followed_write(charge)

    def _charge_in_transaction(self, user: str, epsilon: float, delta: float, reason: str,
                               request_id: Optional[str]) -> tuple[float, float]:
        total_eps, total_delta = self._budget(user, lock=True)
        before = charge_totals.current(self._db, user, self._known_total(user))
        spent_eps, spent_delta = before.spent
        if not (_fits(spent_eps, epsilon, total_eps) and _fits(spent_delta, delta, total_delta)):
            raise BudgetExceededError(
                f"charge of (epsilon={epsilon:.6g}, delta={delta:.3g}) for {reason!r} refused: user {user!r} has "
                f"(epsilon={total_eps - spent_eps:.6g}, delta={total_delta - spent_delta:.3g}) left "
                f"of (epsilon={total_eps}, delta={total_delta})")
        ledger_rows.ids_rise(self._db)  # (a fold takes the lowest ids for the oldest charges)
        charge_id = self._db.execute(
            'INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, ?, ?, ?, ?) RETURNING id',
            (user, float(epsilon), float(delta), reason, time.time()),
        ).fetchone()[0]
        if request_id is not None:
            self._db.execute('INSERT INTO requests("user", request_id, charge_id) VALUES (?, ?, ?)',
                             (user, request_id, int(charge_id)))
        after = before.plus(int(charge_id), float(epsilon), float(delta))
        # (the stamp read again: an id below a row put back above the ids handed out is stamped as a change; only
        # this insert can have stamped it, every other change of the user's rows waits for her lock)
        after = dataclasses.replace(after, edits=ledger_rows.edits(self._db, user))
        charge_totals.record(self._db, user, ledger_rows.fold_oldest(self._db, user, after))
        return total_eps - spent_eps - epsilon, total_delta - spent_delta - delta

    def charge_training_step(self, user: str, noise_multiplier: float, sample_rate: float, delta: float,
                             mechanism: str = "rdp", reason: str = "DP-SGD step",
                             request_id: Optional[str] = None, replace_one: bool = False) -> tuple[float, float]:
        """Charges one Poisson-subsampled Gaussian release of a training run.

        Training steps are composed with an accountant (far tighter than
        adding up per-step epsilons): the user's steps are kept, per training
        ``delta``, as an :class:`~veil.dp.Accountant` history in this file, and
        each step is charged the *increase* of the accountant's epsilon at
        ``delta``. The increases add up to the accountant's epsilon of all the
        user's steps, and ``delta`` itself is charged once, with the first
        step; training and any other charges then compose by basic composition.
        ``replace_one``: the step's neighbouring datasets differ by a replaced
        record (a hidden count's slots), composed under that relation
        (:mod:`veil.dp.replace_one`).

        Returns:
            The remaining ``(epsilon, delta)`` after the charge.

        Raises:
            BudgetExceededError: the step does not fit; nothing is recorded.
            PrivacyParameterError: a (sigma, q) pair beyond the :data:`MAX_TRAINING_EVENTS` distinct ones the
                user's accountant at ``delta`` holds; nothing is recorded.
        """
        self._check(0.0, delta)
        self._compose_ahead(user, noise_multiplier, sample_rate, delta, mechanism, request_id, replace_one)
        return self._followed_write(lambda: self._step_in_transaction(
            user, noise_multiplier, sample_rate, delta, mechanism, reason, request_id, replace_one))

    def _step_in_transaction(self, user: str, noise_multiplier: float, sample_rate: float, delta: float,
                             mechanism: str, reason: str, request_id: Optional[str],
                             replace_one: bool) -> tuple[float, float]:
        self._budget(user, lock=True)  # lock first: the training state is read-modify-written too
        self._refuse_replay(user, request_id)
        row = self._training_row(user, delta)
        # (the history composed again, here where it is current: from the caches the composition ahead
        # filled when it is the history composed there, in full when another process's step came between)
        acc = self._next_accountant(user, row, noise_multiplier, sample_rate, delta, mechanism, replace_one)
        before = float(row[1]) if row else 0.0
        after = max(acc.get_epsilon(delta), before)  # never a negative charge
        try:
            left = self._charge_in_transaction(user, after - before, 0.0 if row else float(delta),
                                               f"{reason} (sigma={noise_multiplier:.4g}, q={sample_rate:.4g})",
                                               request_id)
        except BudgetExceededError:
            self._refused(user, delta, (accounted_noise(noise_multiplier), sample_rate, replace_one))
            raise
        self._db.execute(
            'INSERT INTO training("user", delta, state, epsilon) VALUES (?, ?, ?, ?) '
            'ON CONFLICT("user", delta) DO UPDATE SET state = excluded.state, epsilon = excluded.epsilon',
            (user, float(delta), json.dumps(acc.state_dict()), after))
        return left

    def _training_row(self, user: str, delta: float) -> Optional[tuple]:
        return self._db.execute('SELECT state, epsilon FROM training WHERE "user" = ? AND delta = ?',
                                (user, float(delta))).fetchone()

    def _tried(self, user: str, delta: float) -> frozenset:
        """The (sigma, q, replace-one) runs of the user's refused steps, at any delta (in memory): they count
        toward MAX_TRAINING_EVENTS at every delta, as each composed a new run (a refused step records nothing,
        so a user out of budget sending steps of ever new pairs made each compose a new PLD, uncapped; counted
        per delta, a fresh delta each step did the same)."""
        with self._known_lock:
            return frozenset(self._tried_runs.get(user, ()))

    def _refused(self, user: str, delta: float, run: tuple) -> None:
        with self._known_lock:
            runs = self._tried_runs.pop(user, None)
            if runs is None:
                runs = set()
                if len(self._tried_runs) >= _KNOWN_TOTALS:  # (the least recently refused user's: one key a user)
                    self._tried_runs.pop(next(iter(self._tried_runs)))
            if len(runs) < MAX_TRAINING_EVENTS:  # (at the cap every fresh run is refused before composing)
                runs.add(run)
            self._tried_runs[user] = runs

    def _next_accountant(self, user: str, row: Optional[tuple], noise_multiplier: float, sample_rate: float,
                         delta: float, mechanism: str, replace_one: bool) -> Accountant:
        """The user's training accountant at ``delta`` (stored ``row``) with the step added; a run past the
        MAX_TRAINING_EVENTS distinct ones (those refused included) is refused before any composition."""
        acc = Accountant.from_state_dict(json.loads(row[0])) if row else Accountant(mechanism)
        pairs = acc.pairs()
        run = (accounted_noise(noise_multiplier), sample_rate, replace_one)
        known = pairs | self._tried(user, delta)
        if run not in known and len(known) >= MAX_TRAINING_EVENTS:
            raise PrivacyParameterError(
                f"user {user!r} already trained with {len(known)} distinct (noise_multiplier, sample_rate) "
                f"pairs at delta={delta:g} (at most {MAX_TRAINING_EVENTS}, refused steps' included): continue "
                "with one of them")
        acc.step(noise_multiplier, sample_rate, replace_one=replace_one)
        acc.merge_runs()
        return acc

    def _compose_ahead(self, user: str, noise_multiplier: float, sample_rate: float, delta: float, mechanism: str,
                       request_id: Optional[str], replace_one: bool) -> None:
        """Composes the step's history before the write transaction, whose lock every user's charge (and, on
        SQLite, every process's) waits for: the composition (a PLD build, 0.1-4 s, or an RDP one, up to ~2 s,
        for a new (sigma, q)) is kept in the accountants' caches, and the transaction's composition of the same
        history reads them. Refusals (replay, cap, parameters) are left to the transaction."""
        with self._lock:
            self._follow()
            self._budget(user)
            try:
                self._refuse_replay(user, request_id)
            except ReplayedRequestError:
                return
            row = self._training_row(user, delta)
        try:
            acc = self._next_accountant(user, row, noise_multiplier, sample_rate, delta, mechanism, replace_one)
        except PrivacyParameterError:
            return
        acc.get_epsilon(delta)  # (kept: veil.dp.pld_cache, and the RDP of each (sigma, q) in veil.dp.accountant)

    def remaining(self, user: str) -> tuple[float, float]:
        """The user's unspent ``(epsilon, delta)``."""
        return self.remaining_and_spent(user)[0]

    def remaining_and_spent(self, user: str) -> tuple[tuple[float, float], tuple[float, float]]:
        """The user's unspent and spent ``(epsilon, delta)`` of one read (asked one after the other, a charge
        landing between them made the two disagree: left + spent above the budget)."""
        with self._lock:
            self._follow()
            total_eps, total_delta = self._budget(user)
            spent_eps, spent_delta = self._spent(user)
        return (total_eps - spent_eps, total_delta - spent_delta), (spent_eps, spent_delta)

    def spent(self, user: str) -> tuple[float, float]:
        """The user's spent ``(epsilon, delta)`` (zero for a user without charges)."""
        with self._lock:
            self._follow()
            return self._spent(user)

    def history(self, user: str) -> list[tuple[float, float, str, float]]:
        """The user's charges, oldest first: ``(epsilon, delta, reason, unix time)`` (past
        :data:`veil.dp.ledger_rows.MAX_CHARGE_ROWS` of them, the oldest are one folded row: their sum)."""
        with self._lock:
            self._follow()
            return [tuple(r) for r in self._db.execute(
                'SELECT epsilon, delta, reason, at FROM charges WHERE "user" = ? ORDER BY id', (user,))]

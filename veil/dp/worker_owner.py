"""The data owner's DP settings on a worker: sanitizer policy, datasets and budget ledger.

The owner configures a worker once (``worker.enable_dp(...)`` or the
``veil worker --dp-clip/--dp-noise/--budget`` flags); the worker functions in
:mod:`veil.dp.worker_functions` read these settings for every request and
nothing a data scientist sends can change them. Settings are kept in an
explicit registry keyed by worker, so the worker classes need no DP fields.

The budget ledger is a :class:`veil.dp.BudgetLedger`. On a network worker
started with ``--data-dir`` it is the file ``veil-dp-budget.sqlite3`` next to
the worker's own database, so spent budgets survive restarts; with ``--db
postgresql://...`` it is in that database (shared by the owner's replicas);
elsewhere it lives in memory unless ``ledger_path`` is given.
"""

from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

from veil.dp.accountant import ACCOUNTANT_FACTORIES
from veil.dp.budget import BudgetLedger
from veil.dp.errors import PrivacyParameterError
from veil.dp.padding import check_ahead
from veil.exceptions import PermissionDeniedError
from veil.workers import cancellation
from veil.workers.cancellation import outside_turn
from veil.workers.database import is_database_url

LEDGER_FILENAME = "veil-dp-budget.sqlite3"

#: how often a release waiting for its user's lock looks at its deadline and cancellation
_LOCK_POLL_S = 0.05


@dataclass
class DPDataset:
    """One dataset the owner lets data scientists train on privately."""

    data: torch.Tensor
    target: torch.Tensor


@dataclass
class WorkerDP:
    """A worker's DP settings (the data owner's, never the requester's).

    Attributes:
        max_grad_norm: per-record clipping bound C.
        noise_multiplier: the least sigma the owner accepts; requests may add more.
        delta: delta at which training releases are accounted and charged.
        accountant: ``"rdp"`` (fast step-by-step charging) or ``"pld"``.
        max_sample_rate: the largest lot sampling rate q a request may ask for.
        ledger: per-user (epsilon, delta) budgets and charges.
        datasets: name -> data/target that DP training may use.
        max_bins: the most histogram bins a query may ask for (caps the work).
        hide_count: the exact record count of the DP datasets is private:
            pointers to them report a first dimension of 0 (unknown) and the
            count is only released through a charged ``dp_count``.
        nominal_count: with ``hide_count``, the public count DP-SGD releases divide
            by (``q * nominal_count`` instead of ``q * n``, whose noise scale would
            reveal ``n``); None: DP training is refused while the count is hidden.
        max_records: with ``hide_count``, a public bound on the record count: a release that reads the
            records (sum, mean, histogram, DP-SGD) computes over this many rows, the records and then
            masked padding, so its time and memory do not follow the count (:mod:`veil.dp.padding`);
            None: such releases are refused while the count is hidden (a DP count is still answered).
    """

    ledger: BudgetLedger
    max_grad_norm: Optional[float] = None
    noise_multiplier: Optional[float] = None
    delta: float = 1e-5
    accountant: str = "rdp"
    max_sample_rate: float = 1.0
    datasets: dict[str, DPDataset] = field(default_factory=dict)
    max_bins: int = 10_000
    hide_count: bool = False
    nominal_count: Optional[int] = None
    max_records: Optional[int] = None
    #: user -> [lock, releases of theirs in flight] (:meth:`user_lock`; a user's entry goes with their last)
    _user_locks: dict = field(default_factory=dict, repr=False)
    _user_locks_guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def user_lock(self, user: str) -> Iterator[None]:
        """One release of ``user``'s at a time (her accountant state is read, stepped and written back), and
        other users' not held up by it: a charge whose COMMIT answer was lost is looked up for up to ~10 s
        (workers/database.py), which one lock of the whole worker made every user's release wait for. Waited
        for outside a network worker's turn: the charge runs outside it too (worker_functions), and a holder
        taking the turn back must not find it held by a command waiting here."""
        with self._user_locks_guard:
            held = self._user_locks.setdefault(user, [threading.Lock(), 0])
            held[1] += 1
        try:
            if not held[0].acquire(blocking=False):
                with outside_turn():  # (the command's deadline and cancellation still count while it waits)
                    while not held[0].acquire(timeout=_LOCK_POLL_S):
                        cancellation.check()
            try:
                cancellation.check()  # (won just as its deadline passed, or cancelled: nothing charged)
                yield
            finally:
                held[0].release()
        finally:
            with self._user_locks_guard:
                held[1] -= 1
                if not held[1]:
                    del self._user_locks[user]

    @property
    def training_enabled(self) -> bool:
        return self.max_grad_norm is not None and self.noise_multiplier is not None

    def set_budget(self, user: str, epsilon: float, delta: float) -> "WorkerDP":
        """Sets (or replaces) ``user``'s total budget; past charges still count."""
        self.ledger.set_budget(user, epsilon, delta)
        return self

    def remaining(self, user: str) -> tuple[float, float]:
        """``user``'s unspent (epsilon, delta)."""
        return self.ledger.remaining(user)

    def dataset(self, name: object) -> DPDataset:
        ds = self.datasets.get(name) if isinstance(name, str) else None
        if ds is None:
            raise PermissionDeniedError(
                f"dataset {name!r} is not open to DP training on this worker (open: {sorted(self.datasets)})")
        return ds


# worker -> its DP settings (weak: a dropped worker takes its settings along).
_SETTINGS: "weakref.WeakKeyDictionary[Any, WorkerDP]" = weakref.WeakKeyDictionary()


def dp_settings(worker: Any) -> WorkerDP:
    """The worker's DP settings; refuses if the owner never enabled DP there."""
    settings = _SETTINGS.get(worker)
    if settings is None:
        raise PermissionDeniedError(
            f"worker {worker.id!r} has no differential-privacy settings: its owner must call "
            "worker.enable_dp(...) (or start `veil worker` with --dp-clip/--dp-noise/--budget)")
    return settings


def _ledger_path(worker: Any, ledger_path: Union[str, Path, None]) -> str:
    if ledger_path is not None:
        return str(ledger_path)
    db_path = getattr(getattr(worker, "db", None), "path", ":memory:")
    if is_database_url(db_path):  # PostgreSQL: the ledger's tables sit beside the worker's own
        return db_path
    return ":memory:" if db_path == ":memory:" else str(Path(db_path).parent / LEDGER_FILENAME)


def _find_tagged(worker: Any, name: str) -> DPDataset:
    tag = name if name.startswith("#") else f"#{name}"
    found: dict[str, torch.Tensor] = {}
    for _, entry in worker.monitor.owner_entries():
        if entry.protected and isinstance(entry.obj, torch.Tensor) and tag in entry.tags:
            for kind in ("#data", "#target"):
                if kind in entry.tags:
                    found[kind] = entry.obj
    if len(found) != 2:
        raise ValueError(f"worker {worker.id!r} holds no owner tensors tagged {tag} with #data and #target")
    return DPDataset(found["#data"], found["#target"])


def _datasets(worker: Any, spec: Union[str, Sequence[str], Mapping[str, tuple]]) -> dict[str, DPDataset]:
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping):
        out = {}
        for name, (data, target) in spec.items():
            if len(data) != len(target):
                raise ValueError(f"dataset {name!r}: {len(data)} records but {len(target)} targets")
            out[name] = DPDataset(data, target)
        return out
    return {s.lstrip("#"): _find_tagged(worker, s) for s in spec}


def enable_dp(worker: Any, datasets: Union[str, Sequence[str], Mapping[str, tuple]] = (), *,
              max_grad_norm: Optional[float] = None, noise_multiplier: Optional[float] = None,
              budgets: Optional[Mapping[str, tuple[float, float]]] = None, delta: float = 1e-5,
              accountant: str = "rdp", max_sample_rate: float = 1.0,
              ledger_path: Union[str, Path, None] = None, max_bins: int = 10_000,
              hide_count: bool = False, nominal_count: Optional[int] = None,
              max_records: Optional[int] = None) -> WorkerDP:
    """Turns on owner-side differential privacy on ``worker``.

    Args:
        worker: the data owner's worker (virtual or network server).
        datasets: what DP training may use: dataset names / tags (the owner
            tensors tagged ``#name`` and ``#data`` / ``#target``, as ``veil
            worker --dataset`` loads them) or ``{name: (data, target)}``.
        max_grad_norm: per-record clipping bound C (needed for training).
        noise_multiplier: the owner's sigma; requests for less are refused.
        budgets: ``{user: (epsilon, delta)}`` per data scientist. Users without
            a budget are refused every private release.
        delta: delta at which training steps are accounted (<= each user's delta).
        accountant: ``"rdp"`` or ``"pld"``.
        max_sample_rate: the largest lot sampling rate a request may use.
        ledger_path: SQLite file of the budget ledger (default: next to the
            worker's database when it has one on disk, else in memory).
        max_bins: the most bins a DP histogram may ask for (the owner's cap on work).
        hide_count: keep the exact record count of the DP datasets private:
            their pointers report the first dimension as 0 (unknown), and
            the count is released only by a charged DP count. Without it the
            shape a pointer reports reveals the exact count.
        nominal_count: with ``hide_count``, a public record count (rounded, or a
            noisy count you publish) that DP training divides its releases by:
            dividing by the true count would reveal it through the noise scale
            ``sigma C / (q n)``. Without it DP training is refused while the
            count is hidden (DP queries still work).
        max_records: with ``hide_count``, a public upper bound on the record count of the DP-only data
            (a capacity you are willing to publish): sums, means, histograms and DP training then compute
            over this many rows, padding masked out, so their time and memory do not reveal the count.
            Data with more records is refused here (later data: at its load as DP-only); data re-flagged
            DP-only or grown past the bound later is released over its first ``max_records`` records, so
            every release here is noised for a replaced record too (removing one of the first moves the next
            in): up to twice the noise of a signed-bounds sum or a histogram, DP-SGD steps charged at sigma / 2.
            Each such release gathers ``max_records`` rows and computes over them in float64 (no copy is
            kept between releases), uncharged: a bound whose release would hold more than a quarter of
            the machine's memory is refused here, with the figures. DP training there refuses plans whose ops may raise on a record's values
            (indexing or an embedding by value): a failing record cost more work than a padding row.
            Without it those releases are refused while the count is hidden; a DP count is always answered.

    Returns:
        The settings object (``.set_budget(user, eps, delta)``, ``.remaining(user)``).
    """
    if (max_grad_norm is None) != (noise_multiplier is None):
        raise PrivacyParameterError("DP training needs both max_grad_norm and noise_multiplier (or neither)")
    # (finite: C = inf clips nothing, and sigma = inf failed every release after its charge)
    if max_grad_norm is not None and not 0 < max_grad_norm < math.inf:
        raise PrivacyParameterError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    if noise_multiplier is not None and not 0 < noise_multiplier < math.inf:
        raise PrivacyParameterError(f"the owner's noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise PrivacyParameterError(f"delta must be in (0, 1), got {delta}")
    if type(max_bins) is not int or max_bins < 1:
        raise PrivacyParameterError(f"max_bins must be an integer >= 1, got {max_bins!r}")
    if nominal_count is not None and (type(nominal_count) is not int or nominal_count < 1 or not hide_count):
        raise PrivacyParameterError(f"nominal_count must be a positive integer, and only with hide_count "
                                    f"(got {nominal_count!r})")
    if max_records is not None and (type(max_records) is not int or max_records < 1 or not hide_count):
        raise PrivacyParameterError(f"max_records must be a positive integer, and only with hide_count "
                                    f"(got {max_records!r})")
    if not 0 < max_sample_rate <= 1:
        raise PrivacyParameterError(f"max_sample_rate must be in (0, 1], got {max_sample_rate}")
    if accountant not in ACCOUNTANT_FACTORIES:  # (else every training request failed at its charge)
        raise PrivacyParameterError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANT_FACTORIES)}")
    previous = _SETTINGS.get(worker)
    ledger = previous.ledger if previous is not None and ledger_path is None else \
        BudgetLedger(_ledger_path(worker, ledger_path))
    settings = WorkerDP(ledger, None if max_grad_norm is None else float(max_grad_norm),
                        None if noise_multiplier is None else float(noise_multiplier), float(delta), accountant,
                        float(max_sample_rate), _datasets(worker, datasets), max_bins=max_bins,
                        hide_count=bool(hide_count), nominal_count=nominal_count, max_records=max_records)
    # refused (before anything changes) past the bound: told to the owner, not to a scientist's release; the
    # owner's own data only (a client may flag its own object DP-only: one past the bound blocked this call)
    hidden = [e.obj for _, e in worker.monitor.owner_entries() if e.meta.get("dp_only") and e.protected]
    check_ahead(worker, settings, hidden + [t for ds in settings.datasets.values() for t in (ds.data, ds.target)])
    for user, (eps, dlt) in (budgets or {}).items():
        settings.set_budget(user, eps, dlt)
    _mark_dp_only(worker, settings.datasets.values())
    _SETTINGS[worker] = settings
    worker.monitor.hide_dp_counts = settings.hide_count
    return settings


def _mark_dp_only(worker: Any, datasets: Any) -> None:
    """Stored tensors of DP datasets answer only DP releases from now on.

    Otherwise ``(data * 1)`` through a pointer would hand the data scientist a
    result computed from raw records, and the noise would protect nothing.
    """
    tensors = {id(t) for ds in datasets for t in (ds.data, ds.target)}
    for _, entry in worker.monitor.owner_entries():
        if id(entry.obj) in tensors:
            entry.meta["dp_only"] = True

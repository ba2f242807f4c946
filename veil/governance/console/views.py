"""What the console pages show, gathered from the worker (read on the worker's handler thread)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import torch

from veil.dp.bound_note import past_bound_note
from veil.governance.console.budget_curve import curve
from veil.governance.policy import owner_sources
from veil.governance.provenance import sources_of
from veil.governance.state import governance, policy_of
from veil.workers.database import equality_filters
from veil.workers.persistence import db_read


def on_worker(worker: Any, fn: Any, *args: Any) -> Any:
    """Runs a page's ``fn`` on the calling thread (the console's own pool), never on one of the worker's
    handler threads: a scientist whose long command holds the turn can keep every one of those busy (each
    closed session's cleanup waits for the turn on one), and the owner's pages then waited 60 s and failed.
    (Those threads have long stopped serialising anything with commands: the store, the policies and the
    revocations have locks of their own.)"""
    return fn(*args)


def worker_turn(worker: Any) -> Any:
    """A network worker's turn (its commands' ``FairLock``), None for an in-process worker: what a change the
    commands check (a policy) is put in force in."""
    return getattr(worker, "_turn", None)


def datasets(worker: Any) -> list[dict]:
    derived_from: Counter = Counter()  # one pass over the store (a per-dataset pass was O(datasets x objects))
    for _, x in worker.monitor.owner_entries():
        if not x.protected:
            derived_from.update(sources_of(0, x))
    rows = []
    for oid, e in owner_sources(worker):
        t = e.obj
        derived = derived_from.get(oid, 0)
        rows.append({
            "id": oid, "tags": list(e.tags), "description": e.description,
            "shape": list(t.shape) if isinstance(t, torch.Tensor) else [],
            "dtype": str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else type(t).__name__,
            "policy": policy_of(worker, oid),
            "getters": "nobody" if e.allowed_users == () else "anyone holding the id" if e.allowed_users is None
            else ", ".join(e.allowed_users),
            "derived": derived,
            "bound_note": past_bound_note(worker, t),  # (data past a hidden count's bound: first N read only)
        })
    return rows


def sessions(worker: Any) -> list[dict]:
    held: dict = {}  # session -> [objects, tensor bytes], in one pass over the store
    for _, e in worker.monitor.owner_entries():
        count = held.setdefault(e.created_by, [0, 0])
        count[0] += 1
        if isinstance(e.obj, torch.Tensor):
            count[1] += e.obj.element_size() * e.obj.numel()
    out = []
    for sid, s in list(getattr(worker, "sessions", {}).items()):
        objects, nbytes = held.get(sid, (0, 0))
        out.append({"id": sid, "user": s.user, "roles": sorted({p.role for p in s.principals}),
                    "principals": [p.name for p in s.principals], "objects": objects, "bytes": nbytes,
                    "since": getattr(worker, "_connections", {}).get(sid, (None, None))[1]})
    return out


def _dataset_label(entry: Any) -> str:
    """A dataset's name as ``provenance._input_node`` writes it on the dataset's box of a request graph."""
    if entry.description and entry.tags:
        return f"{' '.join(entry.tags)} ({entry.description})"
    return " ".join(entry.tags) or entry.description or "owner data"


def request_rows(worker: Any, state: str | None, limit: int = 500) -> list[dict]:
    """The Requests page's rows, newest first: its columns only. Each request's op graph (up to ~400 KB of
    JSON: 64 nodes of 200 plan steps) stays in the database: a scientist's 100 pending requests made every
    load of the page (it refreshes itself every 5 s) parse 40 MB of it. "From" names the request's datasets
    as its graph's source boxes do (``provenance._input_node``), from the worker's store."""
    clauses, params = equality_filters(state=state)
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    rows = db_read(governance(worker).db,
                   f"SELECT id, ts, principal, state, shape, dtype, reason, sources FROM release_requests {where}"
                   f" ORDER BY ts DESC LIMIT ?", (*params, int(limit)))
    labels = on_worker(worker, lambda: {str(oid): _dataset_label(e) for oid, e in owner_sources(worker)})
    out = []
    for rid, ts, principal, st, shape, dtype, reason, sources in rows:
        names = [labels.get(str(s), f"dataset {s} (removed)") for s in json.loads(sources)]
        out.append({"id": rid, "ts": ts, "principal": principal, "state": st, "shape": json.loads(shape),
                    "dtype": dtype, "reason": reason, "sources": ", ".join(names)})
    return out


def audit_search(worker: Any, user: str = "", action: str = "", outcome: str = "", since: float | None = None,
                 text: str = "", limit: int = 200) -> list[dict]:
    """Audit rows, newest first, filtered (all filters optional; ``text`` searches the detail)."""
    clauses, params = equality_filters(principal=user, action=action, outcome=outcome)
    if since is not None:
        # the rows since then are those from the first one since then on: a range of seq read newest first
        # (with ts alone the newest-first scan read the whole log back when fewer than ``limit`` rows matched)
        clauses.append("ts >= ? AND seq >= (SELECT MIN(+seq) FROM audit WHERE ts >= ?)")  # (+: read from the ts index)
        params += [float(since), float(since)]
    if text:
        clauses.append("(detail LIKE ? ESCAPE '\\' OR object_ids LIKE ? ESCAPE '\\')")
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        params += [like, like]
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    # (on the database's read-only connection: a search of a long log never holds up the worker's audit rows)
    rows = db_read(governance(worker).db,
                   f"SELECT seq, ts, action, principal, session, object_ids, outcome, detail FROM audit {where}"
                   f" ORDER BY seq DESC LIMIT ?", (*params, int(limit)))
    names = ("seq", "ts", "action", "principal", "session", "object_ids", "outcome", "detail")
    return [dict(zip(names, r)) for r in rows]


#: audit rows the filter's choices are read from, newest first: the log grows with every refused command a
#: scientist sends (a million rows made each load of the page scan it whole, three times, under the lock the
#: worker's own audit writes wait for)
AUDIT_CHOICE_ROWS = 20_000


def audit_choices(worker: Any) -> dict[str, list[str]]:
    """The values the audit filter offers: those of the latest rows, and every user holding a token."""
    db = governance(worker).db
    choices = {col: {r[0] for r in db_read(
        db, f"SELECT DISTINCT {col} FROM (SELECT {col} FROM audit ORDER BY seq DESC LIMIT ?) AS recent",
        (AUDIT_CHOICE_ROWS,))} for col in ("principal", "action", "outcome")}
    tokens = getattr(worker, "tokens", None)
    if tokens is not None:
        choices["principal"] |= {p.name for p in tokens.principals()}
    return {col: sorted(values)[:200] for col, values in choices.items()}


def budgets(worker: Any, now: float | None = None) -> list[dict]:
    """Each user's DP budget: total, spent, left, and the cumulative epsilon over time (at most
    ``budget_curve.CURVE_POINTS`` points, summed and bucketed in the ledger's database)."""
    from veil.dp.worker_owner import _SETTINGS

    settings = _SETTINGS.get(worker)
    if settings is None:
        return []
    ledger = settings.ledger
    reader = ledger.reader()  # never the ledger's own connection and lock, which every charge waits for
    with reader.lock:
        # "user" quoted: unquoted it is PostgreSQL's CURRENT_USER (the database role), not the column
        users = [tuple(r) for r in reader.execute('SELECT "user", epsilon, delta FROM budgets ORDER BY "user"')]
    out = []
    now = time.time() if now is None else now
    for user, eps, delta in users:
        with reader.lock:
            spent_eps, spent_delta = ledger._spent(user, reader)
        start, end, points = curve(ledger, user, now)
        out.append({"user": user, "epsilon": eps, "delta": delta, "spent_epsilon": spent_eps,
                    "spent_delta": spent_delta, "left_epsilon": eps - spent_eps, "left_delta": delta - spent_delta,
                    "points": points, "span": (start, end)})
    return out


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, time.time() - ts)
    if s < 60:
        return f"{int(s)} s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))

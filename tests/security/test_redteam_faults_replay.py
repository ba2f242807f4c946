"""Red team: persistence, charging and releases under replay and crashes (ATTACKS.md classes 7 and 9).

Real ``veil worker`` processes on a ``tmp_path`` data dir, driven by raw frames on authenticated
connections (the same bytes can be sent twice), killed with SIGKILL at points of a DP charge or a
review decision and restarted on the same state; plus the ledger and review queue shared by two
connections to one file (what two worker processes of one owner do).

Every test asserts the safe behaviour. The holes this review found, all fixed:
- (4) a policy tightened at run time was in memory only: fixed, governance/policy.py set_policy stores each
  decision in the owner database (kv) and apply_policy restores the stricter of --policy and it at load.
- (6) a damaged state file at start gave a traceback: fixed, workers/database.py re-raises sqlite3.DatabaseError
  at open naming the file, and cli.py INPUT_ERRORS prints it in one line (exit 2, file untouched).
- (7) approve and deny racing from two processes both succeeded: fixed, governance/requests.py _decide_locked and
  mark_released check the conditional UPDATE's RETURNING row and refuse (no audit row) when another won.
- (8) ledger commits used synchronous=NORMAL: fixed, dp/budget.py opens its Database with synchronous=FULL.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import torch
import torch.nn as nn

from veil.governance.wire import AdminPolicyMessage, AdminRequestsMessage, RequestReleaseMessage
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize

from network_helpers import ADMIN, BOSTON, OTHER, TOKEN, base_args

LEDGER = "veil-dp-budget.sqlite3"
OWNER_DB = "veil-worker.sqlite3"


# ------------------------------------------------------------------------------------------ helpers

def _dp_args(data_dir, budget: str = "1.0,1e-3") -> list[str]:
    return base_args(["--data-dir", str(data_dir), "--dataset", f"boston={BOSTON}:target=MEDV",
                      "--dp-clip", "1.0", "--dp-noise", "1.1", "--budget", f"scientist={budget}",
                      "--budget", f"other={budget}"])


def _review_args(data_dir, policy: str = "review") -> list[str]:
    return base_args(["--data-dir", str(data_dir), "--dataset", f"boston={BOSTON}:target=MEDV",
                      "--policy", policy])


class Raw:
    """One authenticated connection sending raw frames (bytes can be resent as they are)."""

    def __init__(self, wp, token: str = TOKEN) -> None:
        from veil.workers.websocket_auth import handshake_headers
        from veil.workers.websocket_transport import BlockingConnection

        self.conn = BlockingConnection(f"ws://127.0.0.1:{wp.port}", handshake_headers(token))

    def send_bytes(self, data: bytes, timeout: float = 60):
        self.conn.send(data)
        return deserialize(self.conn.recv(timeout))[0]

    def req(self, msg, timeout: float = 60):
        return self.send_bytes(serialize(msg), timeout)

    def search(self, *tags) -> int:
        reply = self.req(m.SearchMessage(list(tags)))
        assert type(reply) is m.DescriptorsReply and reply.descriptors, reply
        return reply.descriptors[0].id

    def fetch(self, ids, delete: bool = False):
        return self.req(m.GetObjectsMessage(list(ids), delete))

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


@pytest.fixture
def raws():
    made = []

    def open_(wp, token: str = TOKEN) -> Raw:
        r = Raw(wp, token)
        made.append(r)
        return r

    yield open_
    for r in made:
        r.close()


def _query_frame(target_id: int, rid: str | None, eps: float = 0.1, out: list | None = None) -> tuple[bytes, list]:
    """A DP count on ``target_id`` with request id ``rid``: (frame bytes, its return ids)."""
    out = out or [new_id(), new_id()]
    msg = m.CommandMessage("veil.dp.query", (m.ObjectRef(target_id), "count", eps, 0.0, "laplace", None, None, None,
                                             rid), {}, out)
    return serialize(msg), out


def _ledger_rows(data_dir) -> dict:
    """What the ledger file holds (read-only, as a second process would see it)."""
    c = sqlite3.connect(f"file:{data_dir / LEDGER}?mode=ro", uri=True)
    try:
        return {
            "integrity": c.execute("PRAGMA integrity_check").fetchone()[0],
            "charges": c.execute('SELECT COUNT(*), COALESCE(SUM(epsilon), 0) FROM charges').fetchone(),
            "requests": {r[1] for r in c.execute('SELECT "user", request_id FROM requests')},
            "by_user": dict(c.execute('SELECT "user", COALESCE(SUM(epsilon), 0) FROM charges GROUP BY "user"')),
            "training": c.execute("SELECT COALESCE(SUM(epsilon), 0) FROM training").fetchone()[0],
            "training_charged": c.execute(
                "SELECT COALESCE(SUM(epsilon), 0) FROM charges WHERE reason LIKE 'DP-SGD%'").fetchone()[0],
        }
    finally:
        c.close()


def _budget(raw: Raw) -> list:
    reply = raw.req(m.CommandMessage("veil.dp.budget", (), {}, [rid := new_id()]))
    assert type(reply) is m.OkReply, reply
    got = raw.fetch([rid], True)
    return got.objects[0].tolist()


# ------------------------------------------------------------------- (1) replay of a DP release frame

def test_dp_release_frame_replayed_before_and_after_kill9_restart_is_charged_once(spawn, raws, tmp_path):
    """The same raw frame twice: one charge, one answer; after SIGKILL and restart on the same data dir the
    request id is still remembered (refused, no refund), and the worker serves new releases."""
    wp = spawn("alice", _dp_args(tmp_path))
    s = raws(wp)
    target = s.search("#boston", "#target")
    frame, out = _query_frame(target, "rt-fault-replay-0001")
    assert type(s.send_bytes(frame)) is m.OkReply
    again = s.send_bytes(frame)  # its return ids still hold the answer: refused (before any charge)
    assert type(again) is m.ErrorReply, again
    value = s.fetch(out, True).objects[0]  # answered once, then freed: the same bytes meet the ledger
    again = s.send_bytes(frame)
    assert type(again) is m.ErrorReply and again.error == "ReplayedRequestError", again
    # the same request id from another session of the same user, on a fresh return id: refused too
    s2 = raws(wp)
    other_frame, _ = _query_frame(target, "rt-fault-replay-0001")
    r = s2.send_bytes(other_frame)
    assert type(r) is m.ErrorReply and r.error == "ReplayedRequestError", r
    assert _budget(s)[2] == pytest.approx(0.1)
    # a frame without a request id (a raw client): every answer of it is charged, none is free
    bare, out_bare = _query_frame(target, None, 0.05)
    assert type(s.send_bytes(bare)) is m.OkReply
    assert type(s.send_bytes(bare)) is m.ErrorReply  # its return ids hold the answer: refused, not charged
    assert _budget(s)[2] == pytest.approx(0.15)
    s.fetch(out_bare, True)
    assert type(s.send_bytes(bare)) is m.OkReply  # answered again: charged again
    assert _budget(s)[2] == pytest.approx(0.2)
    wp.proc.kill()
    wp.proc.wait(10)

    wp2 = spawn("alice", _dp_args(tmp_path))  # same --budget again: replaces the total, charges still count
    s3 = raws(wp2)
    target2 = s3.search("#boston", "#target")
    r = s3.send_bytes(_query_frame(target2, "rt-fault-replay-0001")[0])
    assert type(r) is m.ErrorReply and r.error == "ReplayedRequestError", r
    left, _, spent, _ = _budget(s3)
    assert spent == pytest.approx(0.2) and left == pytest.approx(0.8)  # no refund
    ok, out2 = _query_frame(target2, "rt-fault-replay-0002")
    assert type(s3.send_bytes(ok)) is m.OkReply  # still serves
    assert s3.fetch(out2[:1]).objects[0].numel() == value.numel()
    assert _ledger_rows(tmp_path)["charges"][0] == 4


# -------------------------------------------------- (2) SIGKILL in the middle of a stream of DP releases

def _plan_frame(model: nn.Module) -> tuple[bytes, int]:
    from veil.plans.plan import Plan

    oid = new_id()
    spec = Plan(model).build(torch.zeros(2, 13)).spec
    return serialize(m.ObjectMessage([m.StoredObject(oid, spec)])), oid


def _gradient_frame(plan_id: int, model: nn.Module, rid: str, q: float = 0.05) -> tuple[bytes, list]:
    params = [p.detach().clone() for p in model.parameters()]
    out = [new_id()]
    msg = m.CommandMessage("veil.dp.sanitized_gradient", (m.ObjectRef(plan_id), "boston", params,
                                                          [True] * len(params), "mse", q, None, rid), {}, out)
    return serialize(msg), out


@pytest.mark.slow  # worker processes killed and restarted (~5-8 s)
def test_sigkill_during_dp_releases_leaves_no_uncharged_answer_and_no_refund(spawn, raws, tmp_path):
    """Queries and DP-SGD steps stream in; the worker is SIGKILLed at some point of a charge or a release.
    After restart: every answered request id is charged exactly once (charge and id in one transaction),
    the accountant state matches what training was charged, the file is intact, replays stay refused."""
    wp = spawn("alice", _dp_args(tmp_path, "1000,1e-3"))
    s = raws(wp)
    target = s.search("#boston", "#target")
    model = nn.Linear(13, 1)
    plan_bytes, plan_id = _plan_frame(model)
    assert type(s.send_bytes(plan_bytes)) is m.OkReply
    answered, stop = [], threading.Event()

    def stream():
        for i in range(10_000):
            if stop.is_set():
                return
            rid = f"rt-kill-stream-{i:06d}"
            frame = _gradient_frame(plan_id, model, rid)[0] if i % 3 == 0 else _query_frame(target, rid, 0.01)[0]
            try:
                reply = s.send_bytes(frame, timeout=30)
            except Exception:  # the worker died under us
                return
            if type(reply) is m.OkReply:
                answered.append(rid)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while len(answered) < 25 and time.monotonic() < deadline:
        time.sleep(0.01)
    wp.proc.kill()  # SIGKILL: mid-charge, mid-release or between
    wp.proc.wait(10)
    stop.set()
    t.join(30)
    assert len(answered) >= 25

    rows = _ledger_rows(tmp_path)
    assert rows["integrity"] == "ok"
    assert set(answered) <= rows["requests"]  # nothing answered without its charge
    assert rows["charges"][0] == len(rows["requests"])  # one charge per remembered id, none lost, none doubled
    assert rows["training"] == pytest.approx(rows["training_charged"])

    wp2 = spawn("alice", _dp_args(tmp_path, "1000,1e-3"))
    s2 = raws(wp2)
    left, _, spent, _ = _budget(s2)
    assert spent == pytest.approx(rows["charges"][1]) and left == pytest.approx(1000 - rows["charges"][1])
    target2 = s2.search("#boston", "#target")
    r = s2.send_bytes(_query_frame(target2, answered[-1], 0.01)[0])
    assert type(r) is m.ErrorReply and r.error == "ReplayedRequestError", r
    plan_bytes, plan_id2 = _plan_frame(model)
    assert type(s2.send_bytes(plan_bytes)) is m.OkReply
    assert type(s2.send_bytes(_gradient_frame(plan_id2, model, "rt-kill-after-0001")[0])) is m.OkReply
    after = _ledger_rows(tmp_path)
    assert after["training"] == pytest.approx(after["training_charged"])


# ----------------------------------------- (3) review: filing, approving and fetching replayed, and SIGKILL

def _mean_frame(data_id: int, out: int) -> bytes:
    return serialize(m.CommandMessage("Tensor.mean", (m.ObjectRef(data_id),), {"dim": 0}, [out]))


def _admin(raw: Raw, action: str, rid: str | None = None, state: str | None = None):
    return raw.req(AdminRequestsMessage(action, rid, "", state))


def test_approved_release_goes_once_to_its_user_across_replays_and_a_sigkill(spawn, raws, tmp_path):
    from veil.workers.websocket_cli import read_csv

    data, _, _ = read_csv(__import__("pathlib").Path(BOSTON), "MEDV")
    fixed = 0x5EED_F00D
    wp = spawn("alice", _review_args(tmp_path))
    s = raws(wp)
    assert type(s.send_bytes(_mean_frame(s.search("#boston", "#data"), fixed))) is m.OkReply
    get = serialize(m.GetObjectsMessage([fixed], False))
    first = s.send_bytes(get)
    assert type(first) is m.ErrorReply and first.error == "ReviewPendingError", first
    rid = first.message.split("release request ", 1)[1].split()[0]
    for _ in range(2):  # the same get frame again files nothing new
        again = s.send_bytes(get)
        assert type(again) is m.ErrorReply and rid in again.message, again
    filing = serialize(RequestReleaseMessage(fixed, "column means"))
    for reason in ("column means", "column means"):  # the same filing twice: the same request, one reason
        filed = s.send_bytes(filing).objects[0]
        assert filed["id"] == rid and filed["reason"] == reason
    assert s.req(RequestReleaseMessage(fixed, "something else")).objects[0]["reason"] == "column means"
    admin = raws(wp, ADMIN)
    assert [r["id"] for r in _admin(admin, "list").objects] == [rid]
    approve = serialize(AdminRequestsMessage("approve", rid))
    assert admin.send_bytes(approve).objects[0]["state"] == "approved"
    replayed = admin.send_bytes(approve)  # a replayed approval: refused, one audit row
    assert type(replayed) is m.ErrorReply and "already approved" in replayed.message, replayed
    wp.proc.kill()  # SIGKILL after the approval, before the scientist fetched
    wp.proc.wait(10)

    wp2 = spawn("alice", _review_args(tmp_path))
    admin = raws(wp2, ADMIN)
    (req,) = _admin(admin, "list").objects
    assert req["id"] == rid and req["state"] == "approved"  # the decision survived
    data_id = raws(wp2).search("#boston", "#data")
    # another user computing the very same value under the very same id cannot use the approval
    other = raws(wp2, OTHER)
    assert type(other.send_bytes(_mean_frame(data_id, fixed))) is m.OkReply
    r = other.send_bytes(get)
    assert type(r) is m.ErrorReply and r.error == "ReviewPendingError" and rid not in r.message, r
    # the user it was approved for gets exactly that value once; the same get frame again does not
    s2 = raws(wp2)
    assert type(s2.send_bytes(_mean_frame(data_id, fixed))) is m.OkReply
    got = s2.send_bytes(get)
    assert type(got) is m.ObjectsReply and torch.allclose(got.objects[0], data.mean(dim=0)), got
    r = s2.send_bytes(get)
    assert type(r) is m.ErrorReply and r.error == "ReviewPendingError" and rid not in r.message, r
    s3 = raws(wp2)  # nor another session of that user
    assert type(s3.send_bytes(_mean_frame(data_id, fixed))) is m.OkReply
    r = s3.send_bytes(get)
    assert type(r) is m.ErrorReply and r.error == "ReviewPendingError" and rid not in r.message, r
    states = {q["id"]: q["state"] for q in _admin(admin, "list").objects}
    assert states[rid] == "released" and list(states.values()).count("released") == 1
    decisions = [e for e in _audit(tmp_path) if e["action"] in ("approve", "deny")]
    assert len(decisions) == 1


def _audit(data_dir) -> list:
    from veil.workers.persistence import OwnerDB

    db = OwnerDB.in_dir(data_dir)
    try:
        return db.audit_entries()
    finally:
        db.close()


# ------------------------------------------- (4) the owner's run-time policy decision across a SIGKILL

def test_policy_tightened_at_run_time_survives_a_sigkill(spawn, raws, tmp_path):
    wp = spawn("alice", _review_args(tmp_path, policy="open"))
    admin = raws(wp, ADMIN)
    assert type(admin.req(AdminPolicyMessage("#boston", "review"))) is m.ObjectsReply
    s = raws(wp)
    assert type(s.send_bytes(_mean_frame(s.search("#boston", "#data"), 0xA11CE))) is m.OkReply
    r = s.fetch([0xA11CE])
    assert type(r) is m.ErrorReply and r.error == "ReviewPendingError", r  # in force before the crash
    assert any(e["action"] == "policy" for e in _audit(tmp_path))  # and audited as the owner's decision
    wp.proc.kill()
    wp.proc.wait(10)

    wp2 = spawn("alice", _review_args(tmp_path, policy="open"))  # restarted as it was started before
    s2 = raws(wp2)
    assert type(s2.send_bytes(_mean_frame(s2.search("#boston", "#data"), 0xA11CE))) is m.OkReply
    r = s2.fetch([0xA11CE])
    assert type(r) is m.ErrorReply and r.error == "ReviewPendingError", r  # today: the means come back


# ----------------------------------------------- (5) one user's budget spent at once from two processes

@pytest.mark.slow  # worker processes killed and restarted (~5-8 s)
def test_two_worker_processes_on_one_ledger_cannot_overspend_a_users_budget(spawn, raws, tmp_path):
    """Two ``veil worker`` processes of one owner share a --data-dir; 12 sessions of the same user (6 on each)
    race for epsilon 1.0 in pieces of 0.3: exactly 3 are answered, and the ledger says 0.9."""
    from worker_processes import spawn_all

    from veil.workers.websocket_launcher import free_port

    procs = spawn_all(spawn, {name: (_dp_args(tmp_path), free_port()) for name in ("alice", "alice2")})
    sessions = [raws(procs["alice" if i % 2 else "alice2"]) for i in range(12)]
    frames = [_query_frame(s.search("#boston", "#target"), f"rt-race-proc-{i:04d}", 0.3)[0]
              for i, s in enumerate(sessions)]
    start, outcomes = threading.Barrier(len(sessions)), []

    def go(i):
        start.wait()
        reply = sessions[i].send_bytes(frames[i])
        outcomes.append(reply.error if type(reply) is m.ErrorReply else "ok")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(sessions))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sorted(outcomes) == ["BudgetExceededError"] * 9 + ["ok"] * 3, outcomes
    rows = _ledger_rows(tmp_path)
    assert rows["by_user"] == {"scientist": pytest.approx(0.9)} and rows["charges"][0] == 3
    # a replayed id answered by one process is refused by the other
    answered = sorted(rows["requests"])[0]
    other = raws(procs["alice"])
    r = other.send_bytes(_query_frame(other.search("#boston", "#target"), answered, 0.01)[0])
    assert type(r) is m.ErrorReply and r.error == "ReplayedRequestError", r


def test_training_steps_racing_on_two_ledger_connections_charge_the_accountant_exactly(tmp_path):
    """DP-SGD charges read-modify-write the user's accountant: 2 connections to one file (2 processes) x 4
    threads, 40 steps: the charged epsilons add up to the accountant's epsilon of all 40 steps."""
    from veil.dp.accountant import Accountant
    from veil.dp.budget import BudgetLedger

    path = tmp_path / LEDGER
    ledgers = [BudgetLedger(path), BudgetLedger(path)]
    try:
        ledgers[0].set_budget("sci", 1e6, 1e-3)
        start = threading.Barrier(8)

        def go(k):
            start.wait()
            for j in range(5):
                ledgers[k % 2].charge_training_step("sci", 1.1, 0.05, 1e-5, request_id=f"rt-sgd-{k}-{j:04d}")

        threads = [threading.Thread(target=go, args=(k,)) for k in range(8)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        expected = Accountant("rdp")
        for _ in range(40):
            expected.step(1.1, 0.05)
        spent = ledgers[1].spent("sci")
        assert len(ledgers[0].history("sci")) == 40
        assert spent[0] == pytest.approx(expected.get_epsilon(1e-5), rel=1e-9) and spent[1] == pytest.approx(1e-5)
    finally:
        [lg.close() for lg in ledgers]


# ------------------------------------------------ (6) a state file cut short (a partial write) at restart

def _half_written_ledger(data_dir) -> bytes:
    """A ledger with charges, then its file cut to half its length (a write that stopped part-way)."""
    from veil.dp.budget import BudgetLedger

    data_dir.mkdir(exist_ok=True)
    ledger = BudgetLedger(data_dir / LEDGER)
    ledger.set_budget("scientist", 100.0, 1e-3)
    for i in range(1500):
        ledger.charge("scientist", 0.01, 0.0, "DP count" + "." * 60, request_id=f"rt-half-{i:08d}")
    ledger.close()
    path = data_dir / LEDGER
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path.read_bytes()


def _run_worker_once(args: list[str], timeout: float = 60):
    """``python -m veil.cli worker ...`` that fails at start-up, in the shared runner (tests/cli_batch.py)."""
    import os

    from tests.cli_batch import run_veil

    return run_veil(["worker", "--id", "alice", "--port", "0", *args], cwd=os.getcwd(), timeout=timeout,
                    env={k: v for k, v in os.environ.items() if k != "VEIL_TRACEBACK"})


def test_half_written_ledger_at_restart_fails_safe(tmp_path):
    """The worker does not start on a damaged ledger: no serving with the budget forgotten, and the file
    (the owner's only record of what was spent) is left exactly as it was."""
    before = _half_written_ledger(tmp_path)
    done = _run_worker_once(_dp_args(tmp_path))
    assert done.returncode != 0 and "listening on" not in done.stdout
    assert (tmp_path / LEDGER).read_bytes() == before


def test_half_written_ledger_at_restart_is_a_one_line_error(tmp_path):
    _half_written_ledger(tmp_path)
    done = _run_worker_once(_dp_args(tmp_path))
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("veil worker: error:") and LEDGER in err, err


# ----------------------------- (7) one request decided twice at once by two worker processes of the owner

class _OwnerProcess:
    """What governance needs of a worker: its id and its database (one connection, as one process has)."""

    def __init__(self, worker_id: str, db) -> None:
        self.id, self.db = worker_id, db


def test_an_approve_and_a_deny_racing_from_two_processes_do_not_both_succeed(tmp_path, monkeypatch):
    from veil.exceptions import PermissionDeniedError
    import importlib

    rq = importlib.import_module("veil.governance.requests")  # (the package exports a function of that name)
    from veil.workers.persistence import OwnerDB, add_release_requests_table, db_execute

    dbs = [OwnerDB.in_dir(tmp_path), OwnerDB.in_dir(tmp_path)]  # the same file, two connections
    try:
        add_release_requests_table(dbs[0])
        db_execute(dbs[0], "INSERT INTO release_requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   ("req-race0000000001", time.time(), "alice", "scientist", "s1", "7", "", "[]", "float32", "d",
                    "[]", "{}", "pending", "", None, ""))
        owners = [_OwnerProcess("alice", dbs[0]), _OwnerProcess("alice", dbs[1])]
        # the two owners read the request at the same moment (each holds only its own process's lock)
        real_get, both_read, seen = rq.ReviewQueue.get, threading.Barrier(2), threading.local()

        def get(self, request_id):
            found = real_get(self, request_id)
            if not getattr(seen, "once", False):
                seen.once = True
                both_read.wait(10)
            return found

        monkeypatch.setattr(rq.ReviewQueue, "get", get)
        results = {}

        def decide(k, action):
            queue = rq.ReviewQueue(owners[k])
            try:
                results[action] = (queue.approve if action == "approve" else queue.deny)(
                    "req-race0000000001", by="owner").state
            except PermissionDeniedError as e:
                results[action] = e

        threads = [threading.Thread(target=decide, args=(0, "approve")),
                   threading.Thread(target=decide, args=(1, "deny"))]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        final = db_execute(dbs[0], "SELECT state FROM release_requests")[0][0]
        audited = [e["action"] for e in dbs[0].audit_entries() if e["action"] in ("approve", "deny")]
        refused = [a for a, r in results.items() if isinstance(r, PermissionDeniedError)]
        assert len(refused) == 1, results  # the loser is told its decision did not take effect
        assert audited == [final[:-1] if final == "approved" else "deny"], (audited, final)
    finally:
        [db.close() for db in dbs]


# ---------------------------------------------- (8) a charge must outlive the release it paid for

def test_a_committed_charge_is_durable_before_its_release_goes_out(tmp_path):
    from veil.dp.budget import BudgetLedger

    ledger = BudgetLedger(tmp_path / LEDGER)
    try:
        level = ledger._db.execute("PRAGMA synchronous").fetchone()[0]
        assert level >= 2, f"PRAGMA synchronous={level} (1 = NORMAL: a WAL commit is not fsynced)"
    finally:
        ledger.close()

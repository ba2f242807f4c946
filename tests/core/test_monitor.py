"""The reference monitor: the only door to a worker's objects, its capabilities, quota and audit."""

import re
from pathlib import Path

import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError, PermissionDeniedError, error_from_reply
from veil.messaging import messages as m
from veil.mpc.party import OpenMessage
from veil.workers.monitor import Kind, Principal, Purpose, QuotaExceededError
from veil.workers.store import Entry, ObjectStore, StoreKey

VEIL = Path(sy.__file__).parent


def _open(me, worker, name, args):
    return me.send_msg(OpenMessage(name, tuple(args)), worker)


def test_store_answers_only_its_monitor(hook):
    w = sy.VirtualWorker(hook, id="mon_key")
    store = w.monitor._store
    with pytest.raises(PermissionDeniedError, match="answers only its monitor"):
        store.lookup(StoreKey(), "", 1)
    with pytest.raises(PermissionDeniedError, match="answers only its monitor"):
        store.spaces(StoreKey(), "")
    with pytest.raises(PermissionDeniedError):
        store.put(None, "", 1, Entry(torch.ones(1)))
    assert not hasattr(w, "store")  # no handler can reach the store by the old name


def test_lint_no_module_but_the_monitor_touches_the_store():
    """Every access to stored objects goes through veil/workers/monitor.py."""
    store_methods = r"\.(lookup|put|claim|remove|entries|drop_namespace|clear_clients|has|spaces)\("
    offenders = []
    for path in VEIL.rglob("*.py"):
        rel = path.relative_to(VEIL).as_posix()
        if rel in ("workers/monitor.py", "workers/store.py"):
            continue
        text = path.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"\b(_store|\.store)\b", line) and re.search(store_methods, line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
            if re.search(r"\.store\.|\bObjectStore\(|\bStoreKey\(|_ReferenceMonitor__key|\._store\b", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []


def test_open_message_refuses_private_and_dp_only_data(hook):
    """Finding: OpenMessage("beaver_mask"|"trunc_mask"|"fss_mask") named owner data and returned it in full."""
    w = sy.VirtualWorker(hook, id="mon_open")
    me = hook.local_worker
    secret = torch.arange(6, dtype=torch.int64)
    private_id = w.load(secret.clone(), tags=("#s",), private=True)
    nobody_id = w.load(secret.clone(), tags=("#n",), allowed_users=())
    zero = torch.zeros(6, dtype=torch.int64)
    for oid in (private_id, nobody_id):
        for name, args in (("beaver_mask", (m.ObjectRef(oid), zero, zero, zero)),
                           ("trunc_mask", (m.ObjectRef(oid), zero)),
                           ("fss_mask", ([m.ObjectRef(oid)], [zero]))):
            with pytest.raises(PermissionDeniedError, match="private"):
                _open(me, w, name, args)
    refused = [r for r in w.monitor.audit_log if r["action"] == "open" and r["outcome"] == "refused"]
    assert len(refused) == 6 and all(r["object_ids"] in ([private_id], [nobody_id]) for r in refused)
    assert torch.equal(w._objects[private_id], secret)
    # the client's own values open as before (what a protocol on its own shares does)
    mine = torch.tensor([5, 6], dtype=torch.int64).send(w)
    reply = _open(me, w, "trunc_mask", (m.ObjectRef(mine.id_at_location), torch.ones(2, dtype=torch.int64)))
    assert torch.equal(reply.objects[0], torch.tensor([6, 7]))
    assert w.monitor.audit_log[-1]["action"] == "open" and w.monitor.audit_log[-1]["outcome"] == "allowed"


def test_open_message_refuses_dp_only_data(hook):
    w = sy.VirtualWorker(hook, id="mon_open_dp")
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    w.load(x, tags=("#clinic", "#data"))
    w.load(y, tags=("#clinic", "#target"))
    w.enable_dp("clinic", max_grad_norm=1.0, noise_multiplier=1.0, budgets={"me": (5.0, 1e-5)})
    (target,) = w.search(["#clinic", "#target"])
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        _open(hook.local_worker, w, "trunc_mask", (m.ObjectRef(target.id_at_location), torch.zeros(20, 1)))
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        target.get()


def test_dealt_triples_are_never_revealable(hook):
    """Finding: .get() on a dealt triple gave c = a*b."""
    alice, bob, cp = (sy.VirtualWorker(hook, id=n) for n in ("mon_t_a", "mon_t_b", "mon_t_cp"))
    from veil.mpc.providers.worker_dealer import dealer_for

    for seeded in (True, False):
        dealer = dealer_for(cp, hook.local_worker, seeded=seeded)
        dealer.seeded = seeded
        triple = dealer.beaver_triples("mul", (3,), (3,), [alice.id, bob.id])
        for party, worker in ((alice.id, alice), (bob.id, bob)):
            for ptr in triple[party]:
                entry = worker.monitor.resolve(Principal("me", "me"), ptr.id_at_location, Purpose.COMPUTE)
                assert entry.kind == Kind.DEALER
                with pytest.raises(PermissionDeniedError, match="dealer material"):
                    ptr.get()
                # a plain op on dealer material stays dealer material
                with pytest.raises(PermissionDeniedError, match="dealer material"):
                    (ptr * 1).get()
    x = torch.tensor([1.0, -2.0, 3.0]).fix_prec().share(alice, bob, crypto_provider=cp)
    assert torch.allclose((x * x).get().float_precision(), torch.tensor([1.0, 4.0, 9.0]), atol=1e-3)


def test_results_record_kind_reveal_to_and_provenance(hook):
    w = sy.VirtualWorker(hook, id="mon_prov")
    a_id = w.load(torch.ones(3), tags=("#a",))
    b_id = w.load(torch.ones(3) * 2, tags=("#b",), private=True)
    a, b = w.search(["#a"])[0], w.search(["#b"])[0]
    c = a + b
    d = c * torch.tensor(3.0).send(w)
    w.flush()  # pipelined commands run at the next synchronization
    me = Principal("me", "me")
    owner_entry = w.monitor.resolve(me, a_id, Purpose.COMPUTE)
    assert owner_entry.kind == Kind.OWNER and owner_entry.provenance == {a_id}
    for ptr in (c, d):
        e = w.monitor.resolve(me, ptr.id_at_location, Purpose.COMPUTE)
        assert e.kind == Kind.CLIENT and e.provenance == {a_id, b_id} and e.reveal_to is None
    assert torch.equal(d.get(), torch.full((3,), 9.0))


def test_session_namespaces_hide_other_sessions_ids(hook):
    """Finding: storing under another session's id answered "id already in use" (existence oracle)."""
    w = sy.VirtualWorker(hook, id="mon_ns")
    mon = w.monitor
    s1 = Principal("session-1", "u1", namespace="session-1", isolated=True)
    s2 = Principal("session-2", "u2", namespace="session-2", isolated=True)
    mon.store(s1, 77, torch.tensor([1.0]))
    mon.store(s2, 77, torch.tensor([2.0]))  # no "already in use": session-1's id is invisible
    assert torch.equal(mon.resolve(s1, 77, Purpose.REVEAL).obj, torch.tensor([1.0]))
    assert torch.equal(mon.resolve(s2, 77, Purpose.REVEAL).obj, torch.tensor([2.0]))
    with pytest.raises(PermissionDeniedError, match="already in use"):
        mon.store(s1, 77, torch.tensor([3.0]))  # its own id: refused, nothing replaced
    mon.end_session("session-1")
    with pytest.raises(ObjectNotFoundError):
        mon.resolve(s1, 77, Purpose.REVEAL)
    assert torch.equal(mon.resolve(s2, 77, Purpose.REVEAL).obj, torch.tensor([2.0]))


def test_unknown_and_forbidden_look_the_same(hook):
    w = sy.VirtualWorker(hook, id="mon_same")
    mon = w.monitor
    s1 = Principal("session-1", "u1", namespace="session-1", isolated=True)
    s2 = Principal("session-2", "u2", namespace="session-2", isolated=True)
    mon.store(s1, 1234, torch.tensor([1.0]))
    errors = []
    for oid in (1234, 98765):  # another session's id, an id nobody uses
        with pytest.raises(ObjectNotFoundError) as info:
            mon.resolve(s2, oid, Purpose.COMPUTE)
        errors.append(str(info.value).replace(str(oid), "N"))
    assert errors[0] == errors[1]
    probes = [r for r in mon.audit_log if r["outcome"] == "refused" and r["session"] == "session-2"]
    assert [p["object_ids"] for p in probes] == [[1234], [98765]]  # probes are audited


def test_owner_data_is_never_deleted_or_replaced(hook):
    w = sy.VirtualWorker(hook, id="mon_owner")
    oid = w.load(torch.tensor([7.0]))
    me = hook.local_worker
    me.send_msg(m.DeleteMessage([oid]), w)
    me.send_msg(m.GetObjectsMessage([oid], delete=True), w)
    with pytest.raises(PermissionDeniedError, match="never replaced"):
        w.monitor.replace(Principal("me", "me"), oid, torch.tensor([0.0]))
    assert torch.equal(w._objects[oid], torch.tensor([7.0]))


def test_session_quota(hook):
    w = sy.VirtualWorker(hook, id="mon_quota", max_session_bytes=1000)
    mon = w.monitor
    s = Principal("session-q", "u", namespace="session-q", isolated=True)
    mon.store(s, 1, torch.zeros(200))  # 800 bytes
    with pytest.raises(QuotaExceededError, match="--max-session-mb"):
        mon.store(s, 2, torch.zeros(100))
    assert mon.session_bytes("session-q") == 800
    mon.discard(s, 1)
    mon.store(s, 2, torch.zeros(100))  # freed memory can be used again
    assert mon.session_bytes("session-q") == 400
    assert type(error_from_reply("QuotaExceededError", "x")) is QuotaExceededError  # crosses the wire


def test_dp_release_failures_are_audited(hook):
    w = sy.VirtualWorker(hook, id="mon_dp_audit")
    w.load(torch.linspace(0, 10, 50).reshape(50, 1), tags=("#ages",), private=True)
    w.enable_dp(budgets={"me": (1.0, 0.5)})
    (ptr,) = w.search(["#ages"])
    sy.dp.remote_query(ptr, "count", epsilon=0.6)
    with pytest.raises(PermissionDeniedError):
        sy.dp.remote_query(ptr, "count", epsilon=0.6)  # budget spent
    rows = [r for r in w.monitor.audit_log if r["action"] == "dp_release" and r["detail"].startswith("veil.dp.query")]
    assert [r["outcome"] for r in rows] == ["allowed", "refused"]
    assert "refused" in rows[1]["detail"]

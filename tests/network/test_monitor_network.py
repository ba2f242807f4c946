"""Findings of issue #12 on `veil worker` processes: openings, confused deputy, existence oracle, audit, quota."""

import pytest
import torch

from veil.exceptions import ObjectNotFoundError, PermissionDeniedError
from veil.messaging import messages as m
from veil.mpc.party import OpenMessage
from veil.tensors.pointer import PointerTensor
from veil.workers.monitor import QuotaExceededError

from network_helpers import ADMIN, OTHER, TOKEN, base_args, stopped_worker_rows


def test_openings_refuse_private_data_and_are_audited(spawn, connect, hook, tmp_path):
    """Finding: OpenMessage("beaver_mask"|"trunc_mask"|"fss_mask") on a private dataset returned it in full."""
    from network_helpers import BOSTON

    wp = spawn("alice", base_args(["--dataset", f"boston={BOSTON}:target=MEDV", "--tags", "#boston",
                                   "--data-dir", str(tmp_path)]))
    alice = connect(wp)
    me = hook.local_worker
    data, target = alice.search(["#boston"])
    zero = torch.zeros(1, dtype=torch.int64)
    for name, args in (("beaver_mask", (m.ObjectRef(data.id_at_location), zero, zero, zero)),
                       ("trunc_mask", (m.ObjectRef(target.id_at_location), zero)),
                       ("fss_mask", ([m.ObjectRef(data.id_at_location)], [zero]))):
        with pytest.raises(PermissionDeniedError, match="private"):
            me.send_msg(OpenMessage(name, args), alice)
    with pytest.raises(ObjectNotFoundError):  # an unknown id: a probe, audited too
        me.send_msg(m.GetObjectsMessage([123456789]), alice)
    mine = torch.tensor([1, 2], dtype=torch.int64).send(alice)
    reply = me.send_msg(OpenMessage("trunc_mask", (m.ObjectRef(mine.id_at_location), torch.ones(2, dtype=torch.int64))),
                        alice)
    assert torch.equal(reply.objects[0], torch.tensor([2, 3]))  # the worker still serves protocol steps
    assert 22 < float(target.mean().get()) < 23  # ...and computations
    alice.close()
    rows = stopped_worker_rows(tmp_path, wp)
    opens = [r for r in rows if r["action"] == "open"]
    assert [r["outcome"] for r in opens] == ["refused"] * 3 + ["allowed"]
    assert all(r["principal"] == "scientist" for r in opens)
    assert any(r["action"] == "get" and r["outcome"] == "refused" and r["object_ids"] == [123456789] for r in rows)


def test_stored_pointer_cannot_act_with_the_workers_peer_rights(peered, connect, hook):
    """Finding: a scientist stored PointerWire(bob, victim_id) on alice, then RemoteGet: alice fetched another
    session's object from bob with her peer rights (and the victim's copy disappeared)."""
    victim_bob = connect(peered["bob"], token=OTHER, id="bob")
    secret = torch.tensor([3.0, 1.0, 4.0])
    victim_ptr = secret.send(victim_bob)
    attacker_alice = connect(peered["alice"])
    me = hook.local_worker
    forged = PointerTensor(victim_bob, victim_ptr.id_at_location, me, (3,), torch.float32,
                           garbage_collect_data=False)
    oid = 424242
    me.send_msg(m.ObjectMessage([m.StoredObject(oid, forged)]), attacker_alice)
    with pytest.raises(PermissionDeniedError, match="pointer to another worker"):
        me.send_msg(m.RemoteGetMessage(oid), attacker_alice)
    with pytest.raises(PermissionDeniedError, match="pointer to another worker"):
        me.send_msg(m.CommandMessage("Tensor.mul", (m.ObjectRef(oid), 1), {}, [oid + 1]), attacker_alice)
    assert torch.equal(victim_ptr.get(), secret)  # the victim's object is intact


def test_ids_of_other_sessions_are_invisible(owner_server, connect, hook):
    """Finding: storing under another session's id answered "id already in use" (existence oracle)."""
    a = connect(owner_server)
    b = connect(owner_server, token=OTHER, id="alice-b")
    pa = torch.tensor([1.0]).send(a)
    me = hook.local_worker
    me.send_msg(m.ObjectMessage([m.StoredObject(pa.id_at_location, torch.tensor([2.0]))]), b)  # no oracle
    assert torch.equal(me.send_msg(m.GetObjectsMessage([pa.id_at_location], delete=False), b).objects[0],
                       torch.tensor([2.0]))
    assert torch.equal(pa.get(), torch.tensor([1.0]))  # a's object is untouched


def test_session_quota_over_the_network(spawn, connect):
    wp = spawn("alice", base_args(["--max-session-mb", "1"]))
    alice = connect(wp)
    small = torch.zeros(150_000).send(alice)  # 0.6 MB
    with pytest.raises(QuotaExceededError, match="max-session-mb"):
        torch.zeros(200_000).send(alice)  # would reach 1.4 MB of the 1.05 MB
    with pytest.raises(QuotaExceededError, match="deferred command"):
        small * 3  # results count too: 1.2 MB (pipelined: refused at the next synchronization)
        alice.flush()
    other = connect(wp, token=OTHER, id="alice-other")  # the quota is per session
    assert torch.equal((torch.ones(100_000).send(other) + 1).get(), torch.full((100_000,), 2.0))
    del small
    big = torch.ones(200_000).send(alice)  # freed memory can be used again
    assert big.get().shape == (200_000,)
    assert ADMIN and TOKEN

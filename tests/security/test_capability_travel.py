"""Capabilities travel with a moved object: moving a value never widens who may reveal it.

reveal_to, the protocol-share kind, the DP-only policy and provenance go with
``.move()``, peer hand-offs and a worker sharing its own values
(monitor.export_capabilities / store_objects); forged capability tags can
only restrict their sender's own object.
"""

import pytest
import torch

import veil as sy
from veil.exceptions import ObjectNotFoundError, PermissionDeniedError
from veil.messaging import messages as m
from veil.tensors.pointer import PointerTensor
from veil.workers.monitor import CAP_PREFIX, DEALER_TAG, Kind, Principal


def _entry(worker, ptr):
    worker.hook.local_worker.send_msg(m.DeleteMessage([]), worker)  # commands still queued there run first
    return dict(worker.monitor.owner_entries())[ptr.id_at_location]


def _restricted(worker, me, value, reveal_to, kind=Kind.CLIENT):
    """An object on ``worker`` revealable only to ``reveal_to`` (as a serving share is), and a pointer to it."""
    from veil.ids import new_id

    oid = new_id()
    worker.monitor.store(Principal(me.id, me.id), oid, value, kind=kind, reveal_to=reveal_to)
    return PointerTensor(worker, oid, me, value.shape, value.dtype)


def test_reveal_to_travels_on_move_and_derived_results_keep_it(hook):
    alice, bob = sy.VirtualWorker(hook, id="cap-alice"), sy.VirtualWorker(hook, id="cap-bob")
    me = hook.local_worker
    x = _restricted(alice, me, torch.tensor([4.0, 2.0]), ("carol",), kind=Kind.SHARE)
    with pytest.raises(PermissionDeniedError, match="designated recipient"):
        x.move(bob, user="mallory")  # moving is revealing: refused to everyone else
    moved = x.move(bob, user="carol")
    entry = _entry(bob, moved)
    assert entry.reveal_to == ("carol",) and entry.kind == Kind.SHARE
    assert not any(t.startswith(CAP_PREFIX) for t in entry.tags)  # carried, never shown as tags
    for attempt in (moved, moved + 1, moved * moved):  # derived results are as restricted
        with pytest.raises(PermissionDeniedError, match="designated recipient"):
            attempt.get(user="mallory", delete=False)
    charlie = sy.VirtualWorker(hook, id="cap-charlie")
    with pytest.raises(PermissionDeniedError):
        (moved + 0).move(charlie, user="mallory")  # nor can it be moved on to widen it
    again = moved.move(charlie, user="carol")  # the recipient may move it on: still only hers
    assert _entry(charlie, again).reveal_to == ("carol",)
    assert torch.equal(again.get(user="carol"), torch.tensor([4.0, 2.0]))


def test_provenance_and_private_rules_travel(hook):
    alice, bob = sy.VirtualWorker(hook, id="prov-alice"), sy.VirtualWorker(hook, id="prov-bob")
    oid = alice.load(torch.tensor([1.0, 2.0, 3.0]), tags=("#d",), allowed_users=("hospital",))
    (ptr,) = alice.search(["#d"])
    derived = ptr * 2
    moved = derived.move(bob, user="hospital")
    assert _entry(bob, moved).provenance == frozenset({f"prov-alice:{oid}"})
    assert (moved + 1).id_at_location and _entry(bob, moved + 1).provenance == frozenset({f"prov-alice:{oid}"})
    raw = ptr.move(bob, user="hospital")  # the owner's data is copied (it stays protected on alice)
    assert _entry(bob, raw).allowed_users == ("hospital",)
    with pytest.raises(PermissionDeniedError, match="private"):
        raw.get(user="mallory", delete=False)
    assert torch.equal(raw.get(user="hospital"), torch.tensor([1.0, 2.0, 3.0]))
    assert oid in dict(alice.monitor.owner_entries())


def test_dealer_material_never_moves_and_dp_only_travels(hook):
    alice, bob = sy.VirtualWorker(hook, id="dl-alice"), sy.VirtualWorker(hook, id="dl-bob")
    me = hook.local_worker
    triple = _restricted(alice, me, torch.tensor([7, 8]), None, kind=Kind.DEALER)
    with pytest.raises(PermissionDeniedError, match="dealer material"):
        triple.move(bob)
    # an object marked DP-only that reaches a worker answers DP releases only there too
    flagged = torch.tensor([1.0]).send(bob)
    me.send_msg(m.ObjectMessage([m.StoredObject(991, torch.tensor([5.0]), (CAP_PREFIX + "dp_only",))]), bob)
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        me.send_msg(m.CommandMessage("torch.add", (m.ObjectRef(991), 1), {}, [992]), bob)
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        me.send_msg(m.GetObjectsMessage([991]), bob)
    assert torch.equal(flagged.get(), torch.tensor([1.0]))


def test_share_own_pieces_carry_the_sources_capabilities(hook):
    alice, bob = sy.VirtualWorker(hook, id="so-alice"), sy.VirtualWorker(hook, id="so-bob")
    oid = alice.load(torch.tensor([5, 6], dtype=torch.int64), tags=("#s",), allowed_users=("hospital",))
    (ptr,) = alice.search(["#s"])
    from veil.compat.remote_fixed_precision import SHARE_OWN
    from veil.messaging.serde import deserialize, serialize

    def share_as(user, ids):  # in-process workers take the claimed sender as the user
        msg = m.CommandMessage(SHARE_OWN, [oid, ["so-alice", "so-bob"], ids], {}, [])
        return deserialize(alice._recv_msg(serialize(msg, sender=user)))[0]

    refused = share_as("mallory", [21, 22])
    assert type(refused) is m.ErrorReply and "private" in refused.message
    assert type(share_as("hospital", [31, 32])) is m.OkReply
    piece = dict(bob.monitor.owner_entries())[32]
    assert piece.provenance == frozenset({f"so-alice:{oid}"})


def test_forged_capability_tags_only_restrict(hook, spawn, connect):
    """A scientist cannot label its objects dealer material or protocol shares; malformed tags are refused."""
    from network_helpers import base_args

    wp = spawn("alice", base_args())
    alice = connect(wp)
    me = hook.local_worker
    forged = [(201, (DEALER_TAG,)), (202, (CAP_PREFIX + "kind=share",)), (203, (CAP_PREFIX + 'reveal_to=["other"]',))]
    me.send_msg(m.ObjectMessage([m.StoredObject(i, torch.tensor([float(i)]), tags) for i, tags in forged]), alice)
    # dealer / share labels from a client are ignored: its own objects stay plain, revealable to it
    assert float(me.send_msg(m.GetObjectsMessage([201], delete=False), alice).objects[0]) == 201.0
    assert float(me.send_msg(m.GetObjectsMessage([202], delete=False), alice).objects[0]) == 202.0
    with pytest.raises(PermissionDeniedError, match="designated recipient"):  # narrowing is honoured
        me.send_msg(m.GetObjectsMessage([203]), alice)
    for bad in (CAP_PREFIX + "reveal_to=[[[[", CAP_PREFIX + "reveal_to=" + "[" * 100_000, CAP_PREFIX + "admin",
                CAP_PREFIX + "reveal_to=" + '{"a": 1}'):
        with pytest.raises(PermissionDeniedError, match="capability tag"):
            me.send_msg(m.ObjectMessage([m.StoredObject(300, torch.tensor([1.0]), (bad,))]), alice)
    with pytest.raises(ObjectNotFoundError):
        me.send_msg(m.GetObjectsMessage([300]), alice)  # nothing was stored
    found = me.send_msg(m.ListObjectsMessage(), alice).descriptors
    assert {d.id for d in found} == {201, 202, 203}
    assert not any(t.startswith(CAP_PREFIX) or t == DEALER_TAG for d in found for t in d.tags)
    assert torch.equal((torch.tensor([1.0]).send(alice) + 1).get(), torch.tensor([2.0]))  # still serves


def test_capabilities_travel_between_network_workers(peered, connect, hook):
    """Over real workers: a restricted object moved alice -> bob stays restricted on bob, for every session."""
    from network_helpers import ADMIN, OTHER

    from veil.workers.websocket_admin import AdminLoadMessage

    me = hook.local_worker
    alice = connect(peered["alice"])
    bob = connect(peered["bob"], id="bob")
    other_bob = connect(peered["bob"], token=OTHER, id="bob-other")
    # the owner's data, allowed for the scientist only; and an object the scientist narrowed to itself
    admin = connect(peered["alice"], token=ADMIN, id="alice-admin")
    oid = me.send_msg(AdminLoadMessage(torch.tensor([9.0, 8.0]), ["#mine"], "", True, ["scientist"]), admin).objects[0]
    me.send_msg(m.ObjectMessage([m.StoredObject(77, torch.tensor([6.0]), (CAP_PREFIX + 'reveal_to=["scientist"]',))]),
                alice)
    for src, new in ((oid, 501), (77, 502)):
        me.send_msg(m.MoveMessage([src], "bob", [new]), alice)
    # another session on bob names the ids first (the hand-offs are claimed by it) and still cannot reveal
    with pytest.raises(PermissionDeniedError):
        me.send_msg(m.GetObjectsMessage([501], delete=False), other_bob)
    with pytest.raises(PermissionDeniedError):
        me.send_msg(m.GetObjectsMessage([502], delete=False), other_bob)
    with pytest.raises(PermissionDeniedError):  # nor through a derived value
        me.send_msg(m.CommandMessage("torch.mul", (m.ObjectRef(502), 2), {}, [503]), other_bob)
        me.send_msg(m.GetObjectsMessage([503]), other_bob)
    with pytest.raises(PermissionDeniedError):  # nor by moving it back
        me.send_msg(m.MoveMessage([502], "alice", [504]), other_bob)
    # the scientist's own session on bob: the claim went to the other session, so it cannot even name them
    with pytest.raises(ObjectNotFoundError):
        me.send_msg(m.GetObjectsMessage([501]), bob)
    # moved again, this time claimed by the scientist: revealable to it
    me.send_msg(m.MoveMessage([oid], "bob", [601]), alice)
    assert torch.equal(me.send_msg(m.GetObjectsMessage([601]), bob).objects[0], torch.tensor([9.0, 8.0]))
    assert torch.equal((torch.tensor([1.0]).send(alice) + 1).get(), torch.tensor([2.0]))  # both still serve
    assert torch.equal((torch.tensor([1.0]).send(bob) + 1).get(), torch.tensor([2.0]))

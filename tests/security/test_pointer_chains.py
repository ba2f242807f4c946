"""Network pointer chains are refused at the reference monitor, for every purpose but a plain .get().

Decision (docs/architecture.md, "Pointer chains"): a pointer stored on a network worker
would make that worker act on the pointed-to worker with its own peer rights (the
confused deputy). Following it with the scientist's own rights would need delegated
credentials the worker does not have, so the monitor refuses to use a stored pointer
for anything that acts through it (compute, protocol steps, openings, moves,
remote_get, DP releases); ``.get()`` hands the pointer back to its sender (no action).
In-process workers trust the claimed sender, and chains work there.
"""

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.tensors.pointer import PointerTensor, PointerWire

CHAIN = "is a pointer to another worker"  # the monitor's chain_error, NO_DEPUTY and the command guard


def test_every_door_refuses_a_stored_pointer_on_network_workers(peered, connect, hook):
    from network_helpers import OTHER

    from veil.mpc.party import OpenMessage

    me = hook.local_worker
    victim_bob = connect(peered["bob"], token=OTHER, id="bob")
    secret = torch.tensor([3.0, 1.0, 4.0])
    victim = secret.send(victim_bob)
    alice = connect(peered["alice"])
    forged = PointerTensor(victim_bob, victim.id_at_location, me, (3,), torch.float32, garbage_collect_data=False)
    oid = 515151
    me.send_msg(m.ObjectMessage([m.StoredObject(oid, forged)]), alice)
    ref = m.ObjectRef(oid)
    plan = sy.func2plan(args_shape=[(3,)])(lambda x: x * 2)
    plan_ptr = plan.send(alice)
    attempts = {
        "remote_get": m.RemoteGetMessage(oid),
        "command": m.CommandMessage("Tensor.mul", (ref, 1), {}, [oid + 1]),
        "nested in a list": m.CommandMessage("torch.stack", ([ref, ref],), {}, [oid + 2]),
        "keyword": m.CommandMessage("torch.add", (torch.zeros(3),), {"other": ref}, [oid + 3]),
        "plan input": m.CommandMessage("veil.plan.run", (m.ObjectRef(plan_ptr.id_at_location), [ref], []), {},
                                       None),
        "opening": OpenMessage("trunc_mask", (ref, torch.zeros(3, dtype=torch.int64))),
        "move": m.MoveMessage([oid], "bob", [oid + 4]),
        "dp query": m.CommandMessage("veil.dp.query", (ref, "sum", 1.0, 0.0, "laplace", 0.0, 1.0, None, "r-1"),
                                     {}, None),
    }
    assert all(ALLOWLIST.by_name(a.op) for a in attempts.values() if type(a) is m.CommandMessage)
    for name, msg in attempts.items():
        with pytest.raises(PermissionDeniedError, match=CHAIN):
            me.send_msg(msg, alice)
    # .get() only hands the (forged) pointer back: alice acted nowhere
    reply = me.send_msg(m.GetObjectsMessage([oid], delete=False), alice)
    assert isinstance(reply.objects[0], PointerTensor)
    reply.objects[0].mark_freed()
    # the victim's object on bob is intact, and both workers still serve
    assert torch.equal(victim.get(), secret)
    assert torch.equal(plan_ptr(torch.tensor([1.0, 2.0, 3.0]).send(alice)).get(), torch.tensor([2.0, 4.0, 6.0]))
    assert torch.equal((torch.ones(2).send(victim_bob) + 1).get(), torch.full((2,), 2.0))


def test_a_pointer_sent_as_an_argument_never_acts_with_the_workers_rights(peered, connect, hook):
    """Red-team R4 (main): a pointer to bob *inside a request's arguments* (not stored) made alice send
    commands to bob with her peer rights (only bob's peer role refused them). Every pointer a network
    client sends is now owned by a refusing stand-in: it can be stored and handed back, never act."""
    from network_helpers import OTHER

    from veil.mpc.party import OpenMessage

    me = hook.local_worker
    victim_bob = connect(peered["bob"], token=OTHER, id="bob")
    secret = torch.tensor([2.0, 7.0, 1.0])
    victim = secret.send(victim_bob)
    alice = connect(peered["alice"])
    lit = PointerTensor(victim_bob, victim.id_at_location, me, (3,), torch.float32, garbage_collect_data=True)
    plan_ptr = sy.func2plan(args_shape=[(3,)])(lambda x: x + 1).send(alice)
    for msg in (m.CommandMessage("torch.add", [lit, 1.0], {}, [601]),
                m.CommandMessage("torch.add", [torch.zeros(3)], {"other": lit}, None),
                m.CommandMessage("torch.stack", [[lit, lit]], {}, None),
                m.CommandMessage("veil.plan.run", (m.ObjectRef(plan_ptr.id_at_location), [lit], []), {}, None),
                OpenMessage("trunc_mask", (lit, torch.zeros(3, dtype=torch.int64)))):
        with pytest.raises(VeilError, match=CHAIN):  # (a plan wraps the refusal)
            me.send_msg(msg, alice)
    lit.mark_freed()
    assert torch.equal(victim.get(), secret)
    assert torch.equal(plan_ptr(torch.tensor([1.0, 2.0, 3.0]).send(alice)).get(), torch.tensor([2.0, 3.0, 4.0]))


def test_pointer_chains_work_in_process(hook):
    """In-process workers trust the claimed sender: the documented chain API keeps working there."""
    bob, alice = sy.VirtualWorker(hook, id="chain-bob"), sy.VirtualWorker(hook, id="chain-alice")
    x = torch.tensor([1.0, 2.0]).send(bob)
    xx = x.send(alice)  # alice holds a pointer to bob's object
    assert isinstance(xx, PointerTensor) and xx.location is alice
    xx.remote_get()  # alice fetches it from bob
    assert torch.equal(xx.get(), torch.tensor([1.0, 2.0]))
    assert PointerWire  # the wire form is what a network get of a stored pointer returns

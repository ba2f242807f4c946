"""A dealing names each party once: with one party named twice it would receive two (or every) share of an item
(a triple's a, b, c; both FSS key halves) and learn the mask that hides another party's value when opened.
Refused by the crypto provider before anything is generated or sent (session 45)."""

from __future__ import annotations

import pytest

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.providers.fss_dealing import DEAL_COMPARISON
from veil.mpc.providers.worker_dealer import DEAL


def _workers(hook, tag):
    return [sy.VirtualWorker(hook, id=f"dp-{tag}-{n}") for n in ("alice", "bob", "dave")]


@pytest.mark.parametrize("parties", [["alice", "alice"], ["alice", "bob", "alice"]])
def test_a_dealing_naming_one_party_twice_is_refused(hook, parties):
    alice, bob, dave = _workers(hook, f"t{len(parties)}")
    names = {"alice": alice.id, "bob": bob.id}
    ids = [[new_id()] for _ in parties]
    msg = m.CommandMessage(DEAL, ("zero", ((4,),), [names[p] for p in parties], ids, 1, False), {}, [], False)
    with pytest.raises(Exception, match="distinct parties"):
        hook.local_worker.send_msg(msg, dave)
    assert len(alice.monitor) == 0 and len(bob.monitor) == 0  # nothing was dealt to anyone
    ok_ids = [[new_id()] for _ in range(2)]  # the honest dealing still works
    hook.local_worker.send_msg(m.CommandMessage(DEAL, ("zero", ((4,),), [alice.id, bob.id], ok_ids, 1, False),
                                                {}, [], False), dave)
    assert len(alice.monitor) == 1 and len(bob.monitor) == 1


def test_a_comparison_dealing_naming_one_party_twice_is_refused(hook):
    alice, bob, dave = _workers(hook, "cmp")
    msg = m.CommandMessage(DEAL_COMPARISON, (((4,), 1), [alice.id, alice.id], [[new_id()], [new_id()]], 1, False),
                           {}, [], False)
    with pytest.raises(Exception, match="distinct parties"):
        hook.local_worker.send_msg(msg, dave)
    assert len(alice.monitor) == 0

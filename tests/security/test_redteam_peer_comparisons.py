"""Red team, peer openings of the comparison steps (veil/mpc/bit_comparison.py: ``cmp_mask_values``,
``cmp_quad_open``, ``cmp_quad_open_values`` and ``cmp_and_open`` go party to party between peer-enabled workers).

The network attacks reuse the cluster of test_redteam_peer_openings.py (alice, bob, dave processes, the
sink "charlie"): a share from a client or scientist token, a replay of each round of an honest ReLU, a
non-party peer, a share of the wrong shape or for another step, a party sending twice, an orchestrator
asking for a peer opening of a step that is not openable. In-process (VirtualWorker, a served client's
input): the peer path applies the monitor's opening rules (OPENING_MASKS) before anything is sent.
After each, the workers still compute a peer-opened ReLU equal to torch's and earlier objects are unchanged.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.exceptions import PermissionDeniedError, VeilError
from veil.mpc.errors import MPCError
from veil.mpc.bit_comparison import compact_words
from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers.peer_openings import PeerOpenMessage

from network_helpers import TOKEN
from test_redteam_peer_openings import (  # noqa: F401  (fixtures)
    CLIENT, REPLIES, _as, _fetch, _peer_token, _rounds_seen, _start, _stored_before, cluster, new_round, sink)
from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _ref, _setup

CMP_STEPS = ("cmp_mask_values", "cmp_quad_open", "cmp_quad_open_values", "cmp_and_open")
ULP = 2.0**-16


def _honest_relu(cluster, parties=("alice", "bob")):
    conns = [cluster[n][1] for n in parties]
    a = torch.randn(6, 7, generator=torch.Generator().manual_seed(11)) * 5
    x = a.fix_precision().share(*conns, crypto_provider=cluster["dave"][1])
    assert torch.allclose(F.relu(x).get().float_precision(), F.relu(a), atol=ULP)


def _unchanged(cluster, stored):
    value, ptr = stored
    assert torch.equal(ptr.copy().get(), value)
    _honest_relu(cluster)


@pytest.mark.parametrize("step", CMP_STEPS)
def test_comparison_peer_shares_need_a_peer_token(hook, cluster, step):
    stored = _stored_before(cluster)
    for token in (TOKEN, CLIENT):
        conn = _as(hook, cluster["bob"][0], token, "intruder")
        try:
            with pytest.raises(VeilError, match="(?i)peer|client token"):
                _fetch(hook, conn, new_round(), step)
        finally:
            conn.close()
    _unchanged(cluster, stored)


def test_every_round_of_a_relu_is_refused_on_replay(hook, cluster, monkeypatch):
    stored = _stored_before(cluster)
    seen = _rounds_seen(monkeypatch)
    _honest_relu(cluster)
    rounds = [msg for where, msg in seen if where == "bob"]
    assert {msg.name for msg in rounds} == {"cmp_mask_values", "cmp_quad_open", "cmp_and_open"}, rounds
    as_alice = _as(hook, cluster["bob"][0], _peer_token("alice"), "alice")
    try:
        for msg in rounds:  # alice's peer connection asks again for bob's share of each ended round
            with pytest.raises(VeilError, match="(?i)ended|no peer opening round"):
                _fetch(hook, as_alice, msg.round, msg.name)
    finally:
        as_alice.close()
    _unchanged(cluster, stored)


@pytest.mark.parametrize("step", ["cmp_leaves", "cmp_quad_next", "cmp_and_next", "cmp_select", "cmp_trunc_finish",
                                  "trunc_finish"])
def test_a_step_that_is_not_openable_is_not_peer_opened(hook, cluster, step):
    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    x = torch.arange(8, dtype=torch.int64).send(alice)
    ids = [new_id()]
    msg = PeerOpenMessage(step, (m.ObjectRef(x.id_at_location),) * 4, {}, new_round(), ["alice", "bob"], ids)
    with pytest.raises(VeilError, match="(?i)not an openable"):
        hook.local_worker.send_msg(msg, alice)
    with pytest.raises(VeilError):
        sy.PointerTensor(alice, ids[0], hook.local_worker, (8,), torch.int64).get()
    _unchanged(cluster, stored)


# the workers wait 20 s (not 45) for a round's shares: the attacks below take a few seconds; the abandoned
# round ends when its orchestrator closes the connection (the wait bounds it if cancellation failed)
@pytest.mark.parametrize("cluster", [20], indirect=True)
def test_an_xor_round_refuses_non_parties_other_steps_wrong_shapes_and_a_second_fetch(hook, cluster):
    """bob runs a three-party ``cmp_and_open`` round with alice and the sink charlie (which answers fetches
    with its share but takes none itself until the test does): dave (not a party), a fetch for another
    step and a second fetch from charlie are refused; charlie's one fetch completes the round, whose value
    is the three shares combined by XOR (an XOR opening). A charlie answering with the wrong shape or
    dtype ends a round of its own at once, nothing stored."""
    stored = _stored_before(cluster)
    round_id = new_round()
    words = compact_words(1, 6)  # bob's output: the first binary AND level's word of 6 entries, compacted
    good = [torch.full((words,), 0x0F0F, dtype=torch.int64)]
    REPLIES[round_id] = good
    orchestrator = {n: _as(hook, cluster[n][0], TOKEN, "orchestrator") for n in ("alice", "bob")}
    ids = {n: [new_id()] for n in orchestrator}
    x = torch.arange(6, dtype=torch.int64) * 0x1111
    shares = {n: x.send(c) for n, c in orchestrator.items()}
    errors = {}

    def opening(name, rid, parties):
        ref = m.ObjectRef(shares[name].id_at_location)
        return PeerOpenMessage("cmp_and_open", ([ref, ref], ref, ref, ref, 1, True), {}, rid, parties, ids[name])

    threads = {n: _start(hook, orchestrator[n], opening(n, round_id, ["alice", "bob", "charlie"]), errors, n)
               for n in orchestrator}
    bob = cluster["bob"][0]
    attacks = [("dave", "cmp_and_open", "(?i)not a reader"),
               ("charlie", "cmp_quad_open", "(?i)opens 'cmp_and_open'"),
               ("charlie", "cmp_and_open", None),  # answered ...
               ("charlie", "cmp_and_open", "(?i)already took|ended|no peer opening round")]  # ... once
    for sender, step, match in attacks:
        conn = _as(hook, bob, _peer_token(sender), sender)
        try:
            if match is None:
                _fetch(hook, conn, round_id, step)
            else:
                with pytest.raises(VeilError, match=match):
                    _fetch(hook, conn, round_id, step)
        finally:
            conn.close()
    threads["bob"].join(120)
    assert "bob" not in errors, errors
    # bob's and alice's outputs are equal (same x, same first): XORed they cancel, leaving charlie's share
    (got,) = [sy.PointerTensor(orchestrator["bob"], oid, hook.local_worker, (words,), torch.int64).get()
              for oid in ids["bob"]]
    assert torch.equal(got, good[0]), got
    orchestrator["alice"].close()  # alice waits for charlie's fetch: her round is abandoned
    threads["alice"].join(120)
    assert "alice" in errors
    for values in ([torch.zeros(words + 1, dtype=torch.int64)], [torch.zeros(words, dtype=torch.int32)], good * 2):
        rid = new_round()
        REPLIES[rid] = values
        with pytest.raises(VeilError, match="(?i)shapes and dtypes|values"):
            hook.local_worker.send_msg(opening("bob", rid, ["bob", "charlie"]), orchestrator["bob"])
    orchestrator["bob"].close()
    _unchanged(cluster, stored)


# ------------------------------------------------ the opening rules on the peer path (in-process parties)

_KEEP: list = []


@pytest.fixture
def served(hook, request):
    return _setup(hook, f"rpc{request.node.name[-14:]}", SECRET)


def _bad_opening(step, f, bad_mask):
    """The arguments of ``step`` opening the client's input (BATCH) with ``bad_mask`` where a dealt mask goes."""
    batch = m.ObjectRef(BATCH)
    state = [batch, batch]
    return {"cmp_mask_values": ([batch], [bad_mask]),
            "cmp_quad_open": (state, bad_mask),
            "cmp_quad_open_values": (state, f[2], [batch], [bad_mask]),
            "cmp_and_open": (state, bad_mask, f[4], f[5], 1, True)}[step]


@pytest.mark.parametrize("step", CMP_STEPS)
def test_the_peer_path_applies_the_opening_masks_rule(served, step):
    """A hostile serving owner asks party ``a`` to peer-open the client's input under each comparison step
    with an inline zero where the step's dealt mask goes: refused by the monitor before anything is sent
    to the peer, and nothing is stored under the result ids."""
    a, b, owner, dealer = served
    item = dealer.comparison_material(SHAPE, 2, [a.id, b.id])
    _KEEP.append(item)
    f = [_ref(t) for t in item[a.id]]
    ids = [new_id()]
    msg = PeerOpenMessage(step, _bad_opening(step, f, torch.zeros(SHAPE, dtype=torch.int64)), {}, new_round(),
                          [a.id, b.id], ids)
    position = {"cmp_mask_values": 1, "cmp_quad_open": 1, "cmp_quad_open_values": 3, "cmp_and_open": 1}[step]
    with pytest.raises(PermissionDeniedError, match=f"argument {position}"):
        owner.send_msg(msg, a)
    with pytest.raises(VeilError):
        owner.send_msg(m.GetObjectsMessage(ids), a)


def test_a_non_openable_step_is_refused_on_the_peer_path_in_process(served):
    a, b, owner, _ = served
    msg = PeerOpenMessage("cmp_select", (m.ObjectRef(BATCH),) * 5, {}, new_round(), [a.id, b.id], [new_id()])
    with pytest.raises(MPCError, match="not an openable"):
        owner.send_msg(msg, a)

"""Red team, top-bits peer openings (truncation: only the first party gets c = x + K + r, the others its
packed top bits; veil/workers/peer_openings.py, ``reveal="top_bits"``).

The cluster of test_redteam_peer_openings.py (alice, bob, dave as ``veil worker`` processes), with a
sink "charlie" that records every message it is sent: what an honest first party sends a spying second
party is only the packed top bits; an honest second party sends its share to the first party only and
keeps nothing but bits of the right size from the first party (not c, not from a non-party, not twice);
a top-bits reveal is refused for other steps and unknown reveals before any mask is consumed. After
each, the workers still serve a correct product and earlier objects are unchanged.
"""

from __future__ import annotations

import threading

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize
from veil.mpc.truncation import pack_top_bits, shift_for
from veil.workers.peer_openings import PEER_SHARE, PeerOpenMessage

from network_helpers import TOKEN
from test_redteam_peer_openings import (  # noqa: F401  (cluster: the fixture, with this module's sink)
    _as, _peer_token, _share, _stored_before, _unchanged, cluster, new_round)

N = 20_000  # entries: c is 160 kB, its packed top bits 2.5 kB
DIVISOR = 2**16

RECEIVED: list = []  # (message) every request the sink charlie was sent


@pytest.fixture(scope="module")
def sink():
    """A fake party "charlie": records every request (decoded) and answers OkReply."""
    from websockets.sync.server import serve

    from veil.messaging.serde import serialize
    from veil.workers.websocket_launcher import free_port

    def handler(ws):
        for data in ws:
            try:
                RECEIVED.append(deserialize(data)[0])
            except Exception as e:  # noqa: BLE001  (recorded: the test fails on it)
                RECEIVED.append(e)
            ws.send(serialize(m.OkReply(), sender="charlie"))

    port = free_port()
    server = serve(handler, "127.0.0.1", port, max_size=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()


def _shares_for(round_id: str) -> list:
    return [msg for msg in RECEIVED if type(msg) is m.CommandMessage and msg.op == PEER_SHARE
            and msg.args[0] == round_id]


def _start_open(hook, conn, msg, errors, name):
    def run():
        try:
            hook.local_worker.send_msg(msg, conn)
        except Exception as e:  # noqa: BLE001
            errors[name] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def _inputs(conn, gen):
    """x and r on a party (the scientist's own values: a peer opening of them is allowed, as a .get())."""
    x = torch.empty(N, dtype=torch.int64).random_(-2**40, 2**40, generator=gen)
    r = torch.empty(N, dtype=torch.int64).random_(generator=gen) * 3  # any ring element
    return x, r, x.send(conn), r.send(conn)


def test_the_first_party_sends_a_second_party_only_the_packed_top_bits(hook, cluster):
    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    gen = torch.Generator().manual_seed(11)
    x, r, xp, rp = _inputs(alice, gen)
    round_id, oid, errors = new_round(), new_id(), {}
    msg = PeerOpenMessage("trunc_mask", (m.ObjectRef(xp.id_at_location), m.ObjectRef(rp.id_at_location),
                                         shift_for(DIVISOR)), {}, round_id, ["alice", "charlie"], [oid], "top_bits")
    thread = _start_open(hook, alice, msg, errors, "alice")
    theirs = torch.empty(N, dtype=torch.int64).random_(generator=gen)
    as_charlie = _as(hook, cluster["alice"][0], _peer_token("charlie"), "charlie")
    try:  # charlie's share of c reaches alice, the first party
        _share(hook, as_charlie, round_id, [theirs], name="trunc_mask")
    finally:
        as_charlie.close()
    thread.join(120)
    assert not errors, errors
    c = x + r + shift_for(DIVISOR) + theirs
    got = sy.PointerTensor(alice, oid, hook.local_worker, (N,), torch.int64).get()
    assert torch.equal(got, c)  # the first party keeps c
    sent = _shares_for(round_id)
    assert len(sent) == 1, sent
    (bits,) = sent[0].args[2:]
    # charlie (the second party) got (N + 7) // 8 bytes: the top bits of c and nothing else
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == ((N + 7) // 8,)
    assert torch.equal(bits, pack_top_bits(c))
    _unchanged(cluster, stored)


@pytest.mark.parametrize("cluster", [20], indirect=True)
def test_a_second_party_sends_only_to_the_first_and_keeps_only_its_bits(hook, cluster):
    stored = _stored_before(cluster)
    bob = cluster["bob"][1]
    gen = torch.Generator().manual_seed(12)
    x, r, xp, rp = _inputs(bob, gen)
    round_id, oid, errors = new_round(), new_id(), {}
    msg = PeerOpenMessage("trunc_mask", (m.ObjectRef(xp.id_at_location), m.ObjectRef(rp.id_at_location), 0), {},
                          round_id, ["charlie", "bob", "alice"], [oid], "top_bits")
    thread = _start_open(hook, bob, msg, errors, "bob")
    packed = (N + 7) // 8
    good = torch.randint(0, 256, (packed,), dtype=torch.uint8, generator=gen)
    attacks = [("dave", [good], "not a party"),  # a peer that is no party of the round
               ("alice", [good], "not a party"),  # a party, but not the first: a second party hears only it
               ("charlie", [x], "shapes"),  # the first party sends c itself: refused, bob learns only bits
               ("charlie", [good[:-1]], "shapes"),
               ("charlie", [good.to(torch.int64)], "shapes"),
               ("charlie", [good, good], "values"),
               ("charlie", [good], "(?i)the round opens"),  # bits for another step's round of that id
               ("charlie", [good], None),  # the bits bob's round waits for: accepted ...
               ("charlie", [good], "(?i)already sent|ended|no peer opening round")]  # ... once
    for sender, values, match in attacks:
        conn = _as(hook, cluster["bob"][0], _peer_token(sender), sender)
        step = "beaver_mask" if match == "(?i)the round opens" else "trunc_mask"
        try:
            if match is None:
                _share(hook, conn, round_id, values, name=step)
            else:
                with pytest.raises(VeilError, match=match):
                    _share(hook, conn, round_id, values, name=step)
        finally:
            conn.close()
    thread.join(120)
    assert not errors, errors
    got = sy.PointerTensor(bob, oid, hook.local_worker, (packed,), torch.uint8).get()
    assert torch.equal(got, good)  # bob keeps the first party's bits (it never had c)
    sent = _shares_for(round_id)  # bob's share went to charlie, the first party, and to no one else
    assert len(sent) == 1 and torch.equal(sent[0].args[2], x + r)
    _unchanged(cluster, stored)


def test_top_bits_is_refused_for_other_steps_and_unknown_reveals(hook, cluster):
    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    x = torch.arange(8, dtype=torch.int64).send(alice)
    ref = m.ObjectRef(x.id_at_location)
    cases = [("beaver_mask", (ref,) * 4, "top_bits", [new_id(), new_id()]),
             ("trunc_mask", (ref, ref, 0), "everything", [new_id()]),
             ("trunc_mask", (ref, ref, 0), 1, [new_id()])]
    for name, args, reveal, ids in cases:
        with pytest.raises(VeilError, match="(?i)cannot reveal"):
            hook.local_worker.send_msg(PeerOpenMessage(name, args, {}, new_round(), ["alice", "bob"], ids, reveal),
                                       alice)
        for oid in ids:  # nothing was stored
            with pytest.raises(VeilError):
                sy.PointerTensor(alice, oid, hook.local_worker, (8,), torch.int64).get()
    _unchanged(cluster, stored)

"""Red team, top-bits peer openings (truncation: only the first party gets c = x + K + r, the others its
packed top bits; veil/workers/peer_openings.py, ``reveal="top_bits"``).

The cluster of test_redteam_peer_openings.py (alice, bob, dave as ``veil worker`` processes, the sink
"charlie" answering fetches as the test sets): what an honest first party gives a spying second party
is only the packed top bits; an honest second party gives its share to the first party only, once, and
keeps nothing but bits of the right size from the first party (not c, nothing malformed);
a top-bits reveal is refused for other steps and unknown reveals before any mask is consumed. After
each, the workers still serve a correct product and earlier objects are unchanged.
"""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.exceptions import VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc.truncation import pack_top_bits, shift_for
from veil.workers.peer_openings import PeerOpenMessage

from test_redteam_peer_openings import (  # noqa: F401  (fixtures: cluster and its sink charlie)
    REPLIES, _as, _fetch, _fetches_of, _peer_token, _start, _stored_before, _unchanged, cluster, new_round, sink)

N = 20_000  # entries: c is 160 kB, its packed top bits 2.5 kB
DIVISOR = 2**16
PACKED = (N + 7) // 8


def _inputs(conn, gen):
    """x and r on a party (the scientist's own values: a peer opening of them is allowed, as a .get())."""
    x = torch.empty(N, dtype=torch.int64).random_(-2**40, 2**40, generator=gen)
    r = torch.empty(N, dtype=torch.int64).random_(generator=gen) * 3  # any ring element
    return x, r, x.send(conn), r.send(conn)


def _trunc_open(xp, rp, shift, round_id, parties, oid):
    return PeerOpenMessage("trunc_mask", (m.ObjectRef(xp.id_at_location), m.ObjectRef(rp.id_at_location), shift),
                           {}, round_id, parties, [oid], "top_bits")


def test_the_first_party_gives_a_second_party_only_the_packed_top_bits(hook, cluster):
    """alice (first) fetches charlie's share, keeps c and publishes only c's packed top bits: what charlie
    (a spying second party) gets when it fetches is (N + 7) // 8 bytes, the bits of c, once."""
    stored = _stored_before(cluster)
    alice = cluster["alice"][1]
    gen = torch.Generator().manual_seed(11)
    x, r, xp, rp = _inputs(alice, gen)
    round_id, oid, errors = new_round(), new_id(), {}
    theirs = torch.empty(N, dtype=torch.int64).random_(generator=gen)
    REPLIES[round_id] = [theirs]  # charlie's share of c, for alice's fetch
    thread = _start(hook, alice, _trunc_open(xp, rp, shift_for(DIVISOR), round_id, ["alice", "charlie"], oid),
                    errors, "alice")
    as_charlie = _as(hook, cluster["alice"][0], _peer_token("charlie"), "charlie")
    try:
        (bits,) = _fetch(hook, as_charlie, round_id, "trunc_mask")
        with pytest.raises(VeilError, match="(?i)already took|ended|no peer opening round"):
            _fetch(hook, as_charlie, round_id, "trunc_mask")
    finally:
        as_charlie.close()
    thread.join(120)
    assert not errors, errors
    assert len(_fetches_of(round_id)) == 1  # alice asked charlie once
    c = x + r + shift_for(DIVISOR) + theirs
    got = sy.PointerTensor(alice, oid, hook.local_worker, (N,), torch.int64).get()
    assert torch.equal(got, c)  # the first party keeps c
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (PACKED,)  # the second party: c's top bits only
    assert torch.equal(bits, pack_top_bits(c))
    _unchanged(cluster, stored)


@pytest.mark.parametrize("cluster", [20], indirect=True)
def test_a_second_party_gives_its_share_only_to_the_first_and_keeps_only_bits(hook, cluster):
    """bob is the second of [charlie, bob, alice]: only charlie (the first) may take bob's share, once
    (not dave, a non-party, nor alice, a party that is not the first); bob keeps only a packed-bits
    answer from charlie: c itself, bits of the wrong size or dtype, or two values end the round with
    nothing stored."""
    stored = _stored_before(cluster)
    bob = cluster["bob"][1]
    gen = torch.Generator().manual_seed(12)
    x, r, xp, rp = _inputs(bob, gen)
    parties = ["charlie", "bob", "alice"]
    good = torch.randint(0, 256, (PACKED,), dtype=torch.uint8, generator=gen)
    for values in ([x], [good[:-1]], [good.to(torch.int64)], [good, good]):  # a hostile first party's answers
        round_id, oid = new_round(), new_id()
        REPLIES[round_id] = values
        with pytest.raises(VeilError, match="(?i)shapes and dtypes|values"):
            hook.local_worker.send_msg(_trunc_open(xp, rp, 0, round_id, parties, oid), bob)
        with pytest.raises(VeilError):
            sy.PointerTensor(bob, oid, hook.local_worker, (PACKED,), torch.uint8).get()
    round_id, oid, errors = new_round(), new_id(), {}
    REPLIES[round_id] = [good]
    thread = _start(hook, bob, _trunc_open(xp, rp, 0, round_id, parties, oid), errors, "bob")
    attacks = [("dave", "(?i)not a reader"), ("alice", "(?i)not a reader"),
               ("charlie", None),  # the first party takes bob's share ...
               ("charlie", "(?i)already took|ended|no peer opening round")]  # ... once
    for sender, match in attacks:
        conn = _as(hook, cluster["bob"][0], _peer_token(sender), sender)
        try:
            if match is None:
                (share,) = _fetch(hook, conn, round_id, "trunc_mask")
                assert torch.equal(share, x + r)
            else:
                with pytest.raises(VeilError, match=match):
                    _fetch(hook, conn, round_id, "trunc_mask")
        finally:
            conn.close()
    thread.join(120)
    assert not errors, errors
    got = sy.PointerTensor(bob, oid, hook.local_worker, (PACKED,), torch.uint8).get()
    assert torch.equal(got, good)  # bob keeps the first party's bits (it never had c)
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

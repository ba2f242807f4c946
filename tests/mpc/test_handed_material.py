"""A dealer's seeded material reaches an in-process last party without a copy, and stays right.

The last party's corrections are made for it alone (``dealing_recipe._own``) and dropped by the dealer once sent,
so ``Outbox._exchange`` hands them over with their memory (``HandedParts``) instead of copying them into an owned
frame. These tests check that the copy is gone and that what the parties keep is still exact: items dealt in one
request and in later ones, used after more dealings ran (a dealer reusing a buffer would change them)."""

from __future__ import annotations

import pytest
import torch

import veil as sy
from veil.mpc.providers.worker_dealer import dealer_for
from veil.workers import virtual


@pytest.fixture
def setup(hook):
    parties = [sy.VirtualWorker(hook, id=f"hm_{n}") for n in ("alice", "bob")]
    cp = sy.VirtualWorker(hook, id="hm_cp")
    return parties, cp, dealer_for(cp, hook.local_worker)


def _product(parties, cp, n):
    a, b = torch.randn(n), torch.randn(n)
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    y = b.fix_precision().share(*parties, crypto_provider=cp)
    return (lambda: x * y), a * b


def test_seeded_material_is_handed_over_and_every_item_stays_exact(setup, monkeypatch):
    parties, cp, dealer = setup
    step, want = _product(parties, cp, 50_000)  # 400 KB a field: past the size whose parts are handed
    with dealer.record() as plan:
        step().get()
    copies = []
    original = virtual.owned_frame
    monkeypatch.setattr(virtual, "owned_frame", lambda parts: copies.append(parts.nbytes) or original(parts))
    dealer.deal_ahead(plan, repeat=2)
    assert not [n for n in copies if n > 100_000], f"the dealt corrections were copied: {copies}"
    dealer.deal_ahead(plan, repeat=2)  # more dealings after the first items, before any is used
    dealer.on_exhausted = "raise"
    try:
        for _ in range(4):
            got = step().get().float_precision()
            torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    finally:
        dealer.on_exhausted = "deal"


def test_a_request_marked_fresh_is_copied_for_a_network_worker(monkeypatch):
    """Only an in-process destination takes a fresh request's memory: the flag means nothing to any other."""
    from veil.messaging.frames import HandedParts
    from veil.workers.outbox import Outbox

    seen = []

    class Remote:
        in_this_process = False
        frame_parts_over = 1

        def _recv_msg(self, data):
            seen.append(type(data))
            raise RuntimeError("stop here")

    from veil.messaging import messages as m

    box = Outbox.__new__(Outbox)  # (only its exchange runs: the sender's id and no prelude)
    box.id = "hm_box"
    msg = m.CommandMessage("add", (torch.zeros(100_000, dtype=torch.int64),), {}, [1], False)
    msg.fresh = True
    with pytest.raises(RuntimeError, match="stop here"):
        Outbox._exchange(box, msg, Remote(), None)
    assert seen and seen[0] is not HandedParts

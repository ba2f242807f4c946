"""FSS comparison material travels in bounded messages: the provider splits a request by item count."""

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.exceptions import VeilError
from veil.mpc import comparison
from veil.mpc.providers import fss_dealing
from veil.mpc.providers.worker_dealer import dealer_for


@pytest.fixture
def fss_setup(hook, monkeypatch):
    monkeypatch.setattr(comparison, "DEFAULT_COMPARISON", "fss")
    parties = [sy.VirtualWorker(hook, id=n) for n in ("alice", "bob", "charlie")]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    dealer = dealer_for(cp, hook.local_worker)
    sent = []  # (party, tensor bytes) of every comparison message the provider sends
    send = cp.send_msg

    def spy(msg, location):
        if getattr(msg, "op", None) == fss_dealing.RECEIVE_COMPARISON:
            tensors = [t for t in [*msg.args[4], *msg.args[5]] if isinstance(t, torch.Tensor)]  # not the seed
            sent.append((location.id, sum(t.numel() * t.element_size() for t in tensors)))
        return send(msg, location)

    monkeypatch.setattr(cp, "send_msg", spy)
    yield parties, cp, dealer, sent
    dealer.drop_ahead()
    dealer.on_exhausted = "deal"


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_a_large_request_is_split_into_bounded_messages(fss_setup, monkeypatch, seeded):
    parties, cp, dealer, sent = fss_setup
    dealer.seeded = seeded
    values = [torch.randn(30) * 100 for _ in range(7)]
    shared = [v.fix_precision().share(*parties, crypto_provider=cp) for v in values]
    with dealer.record() as plan:
        F.relu(shared[0]).get()
    one_item = max(fss_dealing.item_bytes((30,), 1, i, 3, seeded) for i in range(3))
    monkeypatch.setattr(fss_dealing, "MESSAGE_BYTES", 2 * one_item)  # two items per message
    sent.clear()
    requests = dealer.requests
    dealer.deal_ahead(plan, repeat=7)  # one request of 7 items ...
    assert dealer.requests == requests + 1
    per_party = {p.id: [b for q, b in sent if q == p.id] for p in parties}
    assert all(len(v) == 4 for v in per_party.values()), per_party  # ... sent as 2+2+2+1 items
    assert all(b <= 2 * one_item for v in per_party.values() for b in v)
    assert max(per_party["alice"]) > 0 and max(per_party["bob"]) > 0  # the key holders got their keys
    dealer.on_exhausted = "raise"  # the calls use exactly that material
    for v, x in zip(values, shared):
        out = F.relu(x).get().float_precision()
        torch.testing.assert_close(out, F.relu(v), atol=2**-15, rtol=0)


def test_one_item_over_the_limit_is_refused_clearly(fss_setup, monkeypatch):
    parties, cp, dealer, sent = fss_setup
    monkeypatch.setattr(fss_dealing, "MAX_ITEM_BYTES", 100_000)  # ~48 entries of keys
    with pytest.raises(VeilError, match=r"one comparison of 500 entries needs .* MiB .* compare at most \d+ entries"):
        dealer.comparison_keys((500,), 1, [p.id for p in parties])  # asked directly for one oversized item
    assert sent == []  # refused before anything was dealt
    big = torch.randn(500)  # a comparison takes chunks that fit instead (tests/mpc/test_fss_chunks.py)
    y = big.fix_precision().share(*parties, crypto_provider=cp)
    torch.testing.assert_close(F.relu(y).get().float_precision(), F.relu(big), atol=2**-15, rtol=0)
    assert sent  # dealt in items of at most comparison.chunk_entries(1, 3) entries


def test_item_bytes_match_the_fields_sent(fss_setup):
    parties, cp, dealer, sent = fss_setup
    for seeded in (True, False):
        dealer.seeded = seeded
        sent.clear()
        x = torch.randn(3, 5).fix_precision().share(*parties, crypto_provider=cp)
        dealer.drop_ahead()
        with dealer.record() as plan:
            F.relu(x).get()
        sent.clear()
        dealer.deal_ahead(plan, repeat=1)
        assert [b for _, b in sent] == [fss_dealing.item_bytes((3, 5), 1, i, 3, seeded) for i in range(3)]


def test_fss_dealing_ahead_over_network_workers(connect_websocket, hook, monkeypatch):
    monkeypatch.setattr(comparison, "DEFAULT_COMPARISON", "fss")
    parties = [connect_websocket(n) for n in ("alice", "bob")]
    cp = connect_websocket("dave")
    dealer = dealer_for(cp, hook.local_worker)
    values = [torch.randn(64) * 100 for _ in range(3)]
    shared = [v.fix_precision().share(*parties, crypto_provider=cp) for v in values]
    with dealer.record() as plan:
        F.relu(shared[0]).get()
    dealer.on_exhausted = "raise"
    try:
        dealer.deal_ahead(plan, repeat=3)  # one request of 3 items, dealt worker to worker
        for v, x in zip(values, shared):
            torch.testing.assert_close(F.relu(x).get().float_precision(), F.relu(v), atol=2**-15, rtol=0)
    finally:
        dealer.on_exhausted = "deal"
        dealer.drop_ahead()

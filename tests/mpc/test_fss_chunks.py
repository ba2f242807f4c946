"""FSS comparisons over tensors larger than one item: chunked keys, still one opening round, same results.

The bound on one item (``fss_dealing.MAX_ITEM_BYTES``) is patched small so that a few hundred entries
need several chunks; every result is compared with plain torch and with the unchunked path.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.mpc import comparison
from veil.mpc.comparison import chunk_entries, sign_select
from veil.mpc.opening import count_openings, reconstruct
from veil.mpc.providers import LocalDealer, fss_dealing
from veil.mpc.providers.worker_dealer import dealer_for
from veil.mpc.sharing import split

#: a patched item bound: 100 kB holds a few dozen entries' keys
SMALL_ITEM = 100_000


def _shared(x, parties):
    return dict(zip(parties, split(x, len(parties))))


def _values(shape, gen):
    return torch.randint(-(2**62), 2**62, shape, generator=gen)


def _run(d, extras, parties, products, seed=7):
    dealer = LocalDealer(seed=seed)
    with count_openings() as stats:
        bits, prods = sign_select(_shared(d, parties), [_shared(e, parties) for e in extras], dealer,
                                  products=products, protocol="fss")
    return reconstruct(bits), [reconstruct(p) for p in prods], stats, dealer.dealt["comparison"]


@pytest.mark.parametrize("n_extra,products", [(0, False), (0, True), (2, True)], ids=["bit", "relu", "argmax"])
def test_local_dealer_chunks_match_torch_and_the_unchunked_path(parties, monkeypatch, n_extra, products, gen):
    d = _values((5, 61), gen)
    d[0, :4] = torch.tensor([0, 1, -1, -(2**62)])
    extras = [_values(d.shape, gen) for _ in range(n_extra)]
    whole_bits, whole, whole_stats, whole_items = _run(d, extras, parties, products)
    monkeypatch.setattr(fss_dealing, "MAX_ITEM_BYTES", SMALL_ITEM)
    size = chunk_entries(1 + n_extra if products else 0, len(parties))
    assert 2 * size < d.numel() and d.numel() % size  # several chunks, the last one shorter
    bits, prods, stats, items = _run(d, extras, parties, products)
    bit = (d > 0).long()
    assert torch.equal(bits, bit) and torch.equal(bits, whole_bits) and bits.shape == d.shape
    assert len(prods) == len(whole) == (1 + n_extra if products else 0)
    for v, got, ref in zip([d] + extras, prods, whole):
        assert torch.equal(got, v * bit) and torch.equal(got, ref)
    assert (whole_items, items) == (1, math.ceil(d.numel() / size))  # one item per chunk ...
    assert stats.rounds == whole_stats.rounds == 1  # ... all opened in one round
    assert stats.elements == whole_stats.elements  # the same opened words


def test_each_chunk_fits_the_item_bound(monkeypatch):
    monkeypatch.setattr(fss_dealing, "MAX_ITEM_BYTES", SMALL_ITEM)
    for n_values in (0, 1, 2, 16):
        for n in (2, 3, 5):
            size = chunk_entries(n_values, n)
            sizes = [fss_dealing.item_bytes((k,), n_values, i, n, s)
                     for k in (size, size + 1) for i in range(n) for s in (True, False)]
            assert max(sizes[: len(sizes) // 2]) <= SMALL_ITEM < max(sizes[len(sizes) // 2:])


@pytest.fixture
def fss_workers(hook, monkeypatch):
    monkeypatch.setattr(comparison, "DEFAULT_COMPARISON", "fss")
    parties = [sy.VirtualWorker(hook, id=n) for n in ("alice", "bob", "charlie")]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    dealer = dealer_for(cp, hook.local_worker)
    largest = []  # tensor bytes of every comparison message the provider sends
    send = cp.send_msg

    def spy(msg, location):
        if getattr(msg, "op", None) == fss_dealing.RECEIVE_COMPARISON:
            tensors = [t for t in [*msg.args[4], *msg.args[5]] if isinstance(t, torch.Tensor)]
            largest.append(sum(t.numel() * t.element_size() for t in tensors))
        return send(msg, location)

    monkeypatch.setattr(cp, "send_msg", spy)
    yield parties, cp, largest
    dealer.drop_ahead()


def _ops(x, y):
    """Comparison, ReLU and max (over a dimension and over everything) of shared tensors, in the clear."""
    values, index = torch.max(x, dim=1)
    return [(x > y).get().float_precision(), F.relu(x).get().float_precision(),
            values.get().float_precision(), index.get().float_precision(), torch.max(x).get().float_precision()]


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_worker_dealer_chunks_match_torch_and_the_unchunked_path(fss_workers, hook, monkeypatch, seeded):
    parties, cp, sent = fss_workers
    dealer_for(cp, hook.local_worker).seeded = seeded
    a, b = torch.randn(3, 150) * 100, torch.randn(3, 150) * 100
    b[0, :5] = a[0, :5]  # ties
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    y = b.fix_precision().share(*parties, crypto_provider=cp)
    with count_openings() as whole_stats:
        whole = _ops(x, y)
    monkeypatch.setattr(fss_dealing, "MAX_ITEM_BYTES", SMALL_ITEM)  # the provider enforces it too
    monkeypatch.setattr(fss_dealing, "MESSAGE_BYTES", SMALL_ITEM)  # so one message holds at most one item
    sent.clear()
    with count_openings() as stats:
        got = _ops(x, y)
    assert stats.rounds == whole_stats.rounds and stats.elements == whole_stats.elements
    assert len(sent) > 2 * len(parties) and max(sent) <= SMALL_ITEM  # several items, each within the bound
    ea, eb = a.fix_precision().child, b.fix_precision().child
    expected = [(ea > eb).float(), F.relu(a), a.max(dim=1).values, ea.argmax(dim=1).float(), a.max()]
    for g, w, e in zip(got, whole, expected):
        assert torch.equal(g, w)
        torch.testing.assert_close(g, e, atol=2**-15, rtol=0)
    with count_openings() as relu_stats:
        F.relu(x)
    assert relu_stats.rounds == 1
    assert len(hook.local_worker._objects) == 0


def test_network_workers_take_chunks_in_one_round(connect_websocket, monkeypatch):
    """Over ``veil worker`` processes (dave deals): the orchestrator's bound cuts the items; the workers'
    monitors accept the chunk and join steps and the chunked opening (each output hidden by its own mask)."""
    monkeypatch.setattr(comparison, "DEFAULT_COMPARISON", "fss")
    monkeypatch.setattr(fss_dealing, "MAX_ITEM_BYTES", SMALL_ITEM)  # this process only: the chunk size
    parties = [connect_websocket(n) for n in ("alice", "bob", "charlie")]
    cp = connect_websocket("dave")
    a, b = torch.randn(2, 90) * 100, torch.randn(2, 90) * 100
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    y = b.fix_precision().share(*parties, crypto_provider=cp)
    with count_openings() as stats:
        r = F.relu(x)
        g = x > y
    assert chunk_entries(0, 3) * 2 < a.numel() and stats.rounds == 2  # one per comparison, 3-4 chunks each
    ea, eb = a.fix_precision().child, b.fix_precision().child
    assert torch.equal(r.get().child, ea.clamp(min=0))
    assert torch.equal(g.get().float_precision(), (ea > eb).float())

"""Comparisons and refresh() on SPDZ2k-authenticated shares (veil/mpc/mac_comparison.py).

Results are MAC-checked on ``.get()`` and compared with plain torch; a party
that changes one bit of its share of a value, of the dealt edaBit (``r``, its
bits, the group products), of a Beaver triple of the circuit, or of an opened
value is caught (MacCheckError), or the change cannot alter any result.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import veil as sy
from veil.messaging.messages import DeleteMessage
from veil.mpc import mac
from veil.mpc.errors import MacCheckError, ShareMismatchError
from veil.mpc.mac_comparison import BIT_ROUNDS
from veil.mpc.opening import count_openings
from veil.mpc.providers import LocalDealer, WorkerDealer
from veil.mpc.providers.base import MaterialExhaustedError
from veil.tensors.additive import share
from veil.tensors.mpc_glue.remote_sharing import local_worker_of

from mac_tampering import delta, tamper_material

MIN, MAX = -(2**63), 2**63 - 1
#: edges of the comparison's range (every d but -2^63) and of its bit positions
EDGES = [0, 1, -1, 2, -2, MAX, MAX - 1, MIN + 1, MIN + 2, 2**62, -(2**62), 2**32, -(2**32), 2**31 - 1, 3, -7]


@pytest.fixture
def net(hook):
    parties = [sy.VirtualWorker(hook, id=f"mc{i}") for i in range(3)]
    return parties, sy.VirtualWorker(hook, id="mc_cp")


def _setup(net, n, kind):
    parties, cp = net[0][:n], net[1]
    if kind == "local":
        return [f"lp{i}" for i in range(n)], LocalDealer(seed=n)
    if kind == "worker":
        return parties, cp
    return parties, WorkerDealer(cp, local_worker_of([cp]), seeded=False)


def _values(seed, size=40):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randint(MIN, MAX, (size,), generator=g)
    wide[wide == MIN] = 0
    return torch.cat([torch.tensor(EDGES), wide, torch.randint(-1000, 1000, (size,), generator=g)])


def _share(t, parties, cp):
    return t.share(*parties, crypto_provider=cp, active_security=True)


@pytest.mark.parametrize("kind", ["local", "worker", "worker_unseeded"])
@pytest.mark.parametrize("n", [2, 3])
def test_comparisons_and_relu_match_torch(net, n, kind):
    parties, cp = _setup(net, n, kind)
    X = _values(n)
    x = _share(X, parties, cp)
    with count_openings() as stats:
        bit = x > 0
    assert stats.rounds == BIT_ROUNDS and bit.mac is not None
    assert torch.equal(bit.get(), (X > 0).long())
    with count_openings() as stats:
        relu = torch.relu(x)
    assert stats.rounds == BIT_ROUNDS + 1  # the product by the bit
    assert torch.equal(relu.get(), torch.relu(X))
    # pairwise: differences must stay in the ring's range (as for the semi-honest protocols)
    Y = torch.randint(-(2**40), 2**40, tuple(X.shape), generator=torch.Generator().manual_seed(7))
    Z = X.clamp(-(2**40), 2**40)
    Y[:5] = Z[:5]  # ties
    y, z = _share(Y, parties, cp), _share(Z, parties, cp)
    for name in ("gt", "lt", "ge", "le", "eq", "ne"):
        assert torch.equal(getattr(z, name)(y).get(), getattr(Z, name)(Y).long()), name
    assert torch.equal((z < 5).get(), (Z < 5).long())


@pytest.mark.parametrize("kind", ["local", "worker"])
def test_max_argmax_and_pooling_match_torch(net, kind):
    parties, cp = _setup(net, 2, kind)
    g = torch.Generator().manual_seed(4)
    X = torch.randint(-(2**50), 2**50, (3, 7), generator=g)
    X[1, 2] = X[1, 5]  # a tie: argmax takes the first index, like torch
    X[1, :] = X[1, :].max() - torch.arange(7)
    x = _share(X, parties, cp)
    values, index = x.max(dim=1)
    assert torch.equal(values.get(), X.max(1)[0]) and torch.equal(index.get(), X.max(1)[1])
    assert torch.equal(x.max().get(), X.max()) and torch.equal(x.argmax().get(), X.argmax())
    assert torch.equal(x.max(dim=0)[0].get(), X.max(0)[0])
    f = torch.randn(2, 3, 4, 4, generator=g)
    fx = f.fix_precision().share(*parties, crypto_provider=cp, active_security=True)
    out = F.max_pool2d(F.relu(fx), 2)
    assert (out.get().float_precision() - F.max_pool2d(F.relu(f), 2)).abs().max() <= 2.0**-16
    amax = fx.view(2, -1).argmax(dim=1)  # fixed-precision index (PySyft 0.2 evaluation loops)
    assert torch.equal(amax.get().float_precision().long(), f.view(2, -1).argmax(dim=1))


def test_fixed_point_relu_backward_keeps_macs(net):
    parties, cp = net[0][:2], net[1]
    g = torch.Generator().manual_seed(5)
    a, grad = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    A = a.fix_precision().share(*parties, crypto_provider=cp, active_security=True)
    G = grad.fix_precision().share(*parties, crypto_provider=cp, active_security=True)
    out = torch.relu(A)
    back = torch.ops.aten.threshold_backward.default(G, out, 0)
    assert (back.get().float_precision() - grad * (a > 0)).abs().max() <= 2.0**-16
    assert (out.get().float_precision() - torch.relu(a)).abs().max() <= 2.0**-16


def test_mixing_authenticated_and_plain_shares_in_a_comparison_is_refused(net):
    parties, cp = net[0][:2], net[1]
    x, y = _share(torch.tensor([1, 2]), parties, cp), torch.tensor([3, 1]).share(*parties, crypto_provider=cp)
    with pytest.raises(ShareMismatchError, match="unauthenticated"):
        x > y


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.integers(MIN + 1, MAX), min_size=1, max_size=12), n=st.sampled_from([2, 3]),
       seed=st.integers(0, 2**32))
def test_sign_bit_over_the_whole_range(values, n, seed):
    """[d > 0] and d * [d > 0] for every d but -2^63, whatever the shares' upper limbs."""
    X = torch.tensor(values)
    x = share(X, [f"h{i}" for i in range(n)], LocalDealer(seed=seed), active_security=True)
    # arbitrary upper 64 bits, as after other ops (x~ = x mod 2^64 only): x~ + 2^64 u, MAC + alpha 2^64 u
    u = torch.randint(MIN, MAX, tuple(X.shape), generator=torch.Generator().manual_seed(seed))
    x.mac.hi.child["h1"] = x.mac.hi.child["h1"] + u
    x.mac.mac_hi.child["h1"] = x.mac.mac_hi.child["h1"] + x.mac_key.alpha * u
    assert torch.equal((x > 0).get(), (X > 0).long())
    assert torch.equal(torch.relu(x).get(), torch.relu(X))


# ------------------------------------------------------------------ refresh


def _plain(s):
    """A party's share itself: from the worker's store (after the steps queued for it ran), or local."""
    if not hasattr(s, "id_at_location"):
        return s.clone()
    s.owner.send_msg(DeleteMessage([]), s.location)  # deferred share steps run first
    return s.location._objects[s.id_at_location].clone()


@pytest.mark.parametrize("kind", ["local", "worker", "worker_unseeded"])
def test_refresh_keeps_value_and_macs_and_changes_every_limb(net, kind):
    parties, cp = _setup(net, 3, kind)
    X = _values(1, 8)
    x = _share(X, parties, cp)
    y = x.refresh()
    assert y.mac is not None
    p0 = parties[0] if isinstance(parties[0], str) else parties[0].id

    def limbs(t):
        return [_plain(s) for s in (t.child[p0], t.mac.hi.child[p0], t.mac.mac_lo.child[p0], t.mac.mac_hi.child[p0])]

    for before, after in zip(limbs(x), limbs(y)):
        assert not torch.equal(before, after)  # fresh 128-bit shares of the value and of its MAC
    assert torch.equal(y.get(), X) and torch.equal(x.get(), X)  # MAC-checked
    assert torch.equal((y * x + 1).get(), X * X + 1)


def test_tampered_share_after_refresh_is_caught():
    dealer = LocalDealer(seed=8)
    X = torch.tensor([5, -6, 7])
    y = share(X, ["a", "b"], dealer, active_security=True).refresh()
    y.child["b"] = y.child["b"] + 1
    with pytest.raises(MacCheckError, match=r"\(output\)"):
        y.get()
    z = share(X, ["a", "b"], dealer, active_security=True).refresh()
    z.child["a"] = z.child["a"] - (1 << 40)
    with pytest.raises(MacCheckError, match="comparison mask"):
        (z > 0).get()


# ------------------------------------------------------------------ tampering: every bit position

PARTIES = ("a", "b")
TX = torch.tensor([3, -4, 0, 1 << 40, -(1 << 50), 17])


#: place -> (dealer method, field) for material; the comparison_mac fields: r, bits, products, alpha*r, ...
MATERIAL = {
    "edabit_r": ("authenticated_comparison_material", 0),
    "edabit_bits": ("authenticated_comparison_material", 1),
    "edabit_products": ("authenticated_comparison_material", 2),
    "edabit_mac_bits": ("authenticated_comparison_material", 4),
    "triple_a": ("authenticated_triples", 0),
    "triple_c": ("authenticated_triples", 2),
}
PLACES = ["share", "mask_opening", "level_opening", *MATERIAL]


def _trial(place: str, v: int, seed: int, op: str) -> str:
    """One run with a fresh key: 'detected', 'harmless' (passed, right) or 'wrong' (passed, wrong)."""
    mac.new_session()
    dealer = LocalDealer(seed=seed)
    if place in MATERIAL:
        tamper_material(dealer, *MATERIAL[place], v)
    x = share(TX, PARTIES, dealer, active_security=True)
    limb, d = delta(v)
    if place == "share":
        target = x.child if limb == 0 else x.mac.hi.child
        target["b"] = target["b"] + d
    real_open = mac._open128
    lied = []

    def lying_open(name, per_party, n_values):
        opened = real_open(name, per_party, n_values)
        wanted = {"mask_opening": "mac_trunc_mask", "level_opening": "mac_beaver_mask"}[place]
        if name == wanted and not lied:  # the first such opening only
            lied.append(name)
            e = opened[0]
            opened[0] = (e[0] + d, e[1]) if limb == 0 else (e[0], e[1] + d)
        return opened

    if place in ("mask_opening", "level_opening"):
        mac._open128 = lying_open
    try:
        got = (x > 0).get() if op == "bit" else torch.relu(x).get()
    except MacCheckError:
        return "detected"
    finally:
        mac._open128 = real_open
    right = torch.equal(got, (TX > 0).long() if op == "bit" else torch.relu(TX))
    return "harmless" if right else "wrong"


# the two costliest places (~8 s each on 2 cores) run with the slow tests; the other edaBit fields stay
_SLOW_PLACES = {"edabit_products", "edabit_bits"}


@pytest.mark.parametrize("place", [pytest.param(p, marks=pytest.mark.slow) if p in _SLOW_PLACES else p
                                   for p in PLACES])
def test_single_bit_errors_are_detected_or_harmless(place):
    """Every bit position of a 128-bit share: no wrong result passes; an error in the low 64 bits
    of a value, of the edaBit, of a triple or of an opening is always caught."""
    positions = range(128) if place in ("share", "edabit_bits", "edabit_products") else \
        [0, 1, 7, 31, 32, 62, 63, 64, 65, 100, 126, 127]
    for v in positions:
        for op in ("bit", "relu") if v in (0, 63, 127) else ("relu",):
            outcome = _trial(place, v, 7919 * v + len(place), op)
            assert outcome != "wrong", (place, v, op)
            if v < 64 and place != "edabit_mac_bits":  # a MAC share error changes no value
                assert outcome == "detected", (place, v, op)



@pytest.mark.slow
@pytest.mark.parametrize("place", PLACES)
def test_every_bit_position_many_trials(place):
    """VEIL_MAC_TRIALS trials (default 5) per bit position 0..127 and place, fresh key each,
    ReLU: zero undetected wrong results; every low-64-bit error of a value, edaBit bit or
    product, triple or opening detected."""
    import os

    trials = int(os.environ.get("VEIL_MAC_TRIALS", "5"))
    for v in range(128):
        for t in range(trials):
            outcome = _trial(place, v, 104729 * v + 31 * t + len(place), "relu")
            assert outcome != "wrong", (place, v, t)
            if v < 64 and place != "edabit_mac_bits":
                assert outcome == "detected", (place, v, t)

def test_dealt_edabits_are_consistent():
    """The comparison_mac recipe: bits of r's low limb, group products, and MACs alpha * value mod 2^128."""
    from veil.mpc import ring128
    from veil.mpc.comparison_material import GROUP_SUBSETS
    from veil.mpc.material import register_mac_key, sum_wide

    alpha = torch.tensor(-(2**63) + 12345, dtype=torch.int64)  # top bit set: read unsigned
    register_mac_key("test-edabit", alpha)
    items = LocalDealer(seed=3).authenticated_comparison_material("test-edabit", (5,), ["a", "b", "c"])
    fields = sum_wide([[items[p][j] for p in "abc"] for j in range(12)])
    r, bits, prods, mr, mbits, mprods = (tuple(fields[2 * i:2 * i + 2]) for i in range(6))
    expect_bits = torch.stack([(r[0] >> i) & 1 for i in range(64)])
    assert torch.equal(bits[0], expect_bits) and not bits[1].any()
    grouped = expect_bits.view(16, 4, 5)
    for k, subset in enumerate(GROUP_SUBSETS):
        assert torch.equal(prods[0][k], grouped[:, list(subset)].prod(1)) and not prods[1][k].any()
    a = ring128.lift_unsigned(alpha)
    for value, tag in ((r, mr), (bits, mbits), (prods, mprods)):
        assert ring128.eq(ring128.mul(a, value), tag).all()


def test_mac_relu_material_can_be_dealt_ahead(net):
    """Offline/online: the edaBits and triples of a MAC ReLU are recorded, dealt ahead, and suffice."""
    parties, cpw = net[0][:2], net[1]
    dealer = WorkerDealer(cpw, local_worker_of([cpw]))
    a = torch.tensor([1.5, -2.0, 0.0, 3.25, -0.5])
    x = a.fix_precision().share(*parties, crypto_provider=dealer, active_security=True)
    with dealer.record() as plan:
        torch.relu(x).get()
    dealer.on_exhausted = "raise"
    assert dealer.deal_ahead(plan, repeat=2)["left_out"] == 0
    for _ in range(2):
        assert torch.equal(torch.relu(x).get().float_precision(), torch.relu(a))
    with pytest.raises(MaterialExhaustedError):
        torch.relu(x).get()

"""Function secret sharing: the DCF alone, then the 1-round comparison built on it."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import veil as sy
from veil.ids import new_id
from veil.messaging import messages as m
from veil.mpc import comparison
from veil.mpc.comparison import COMPARISON_BITS, COMPARISON_PROTOCOLS, COMPARISON_ROUNDS, sign_select
from veil.mpc.errors import ProviderError
from veil.mpc.fss import dcf, prg
from veil.mpc.fss import material as fss_material
from veil.mpc.opening import count_openings, reconstruct
from veil.mpc.providers import LocalDealer
from veil.mpc.providers.fss_dealing import RECEIVE_COMPARISON
from veil.mpc.providers.worker_dealer import dealer_for
from veil.mpc.sharing import split
from veil.exceptions import VeilError

MAX_D = 2 ** (COMPARISON_BITS - 1) - 1  # the protocol's range: the whole ring but -2^63


def _dcf_sum(alpha, beta, x, n_bits, seed=0):
    k0, k1 = dcf.gen(alpha, beta, n_bits, torch.Generator().manual_seed(seed))
    return dcf.evaluate(0, k0, x, n_bits) + dcf.evaluate(1, k1, x, n_bits)


# ------------------------------------------------------------------ the DCF


@pytest.mark.parametrize("n_bits", [1, 2, 3, 5])
def test_dcf_small_domains_exhaustive(n_bits):
    size = 1 << n_bits
    alpha = torch.arange(size).repeat_interleave(size)  # every (alpha, x) pair
    x = torch.arange(size).repeat(size)
    beta = torch.randint(-(2**63), 2**63 - 1, (size * size, 3))
    got = _dcf_sum(alpha, beta, x, n_bits)
    assert torch.equal(got, beta * (x < alpha).long().view(-1, 1))


@settings(max_examples=40, deadline=None)
@given(
    n_bits=st.sampled_from([8, 16, 39, 40, 63]),
    alphas=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=8),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**31),
)
def test_dcf_sums_to_beta_below_alpha(n_bits, alphas, k, seed):
    top = (1 << n_bits) - 1
    alpha = torch.tensor([a & top for a in alphas])
    # each alpha against the edges: alpha, alpha +- 1, 0, 2^(n-1) - 1, 2^(n-1), the top
    probes = torch.stack([alpha, alpha - 1, alpha + 1, torch.zeros_like(alpha), torch.full_like(alpha, top >> 1),
                          torch.full_like(alpha, (top >> 1) + 1), torch.full_like(alpha, top)], 1)
    probes = probes.clamp(0, top)
    x = probes.reshape(-1)
    alpha = alpha.repeat_interleave(probes.shape[1])
    gen = torch.Generator().manual_seed(seed)
    beta = torch.empty((x.numel(), k), dtype=torch.int64).random_(-(2**63), None, generator=gen)
    got = _dcf_sum(alpha, beta, x, n_bits, seed)
    assert torch.equal(got, beta * (x < alpha).long().view(-1, 1))


def test_one_key_alone_looks_random():
    """A party's evaluations do not follow f: they vary pseudo-randomly over x."""
    n_bits, size = 8, 256
    alpha = torch.full((size,), 100)
    beta = torch.full((size, 2), 7)
    k0, k1 = dcf.gen(alpha, beta, n_bits)
    x = torch.arange(size)
    y0 = dcf.evaluate(0, k0, x, n_bits)
    assert not torch.equal(k0.seed, k1.seed)
    assert torch.equal(k0.scw, k1.scw) and torch.equal(k0.vcw, k1.vcw)  # only the root seed differs
    assert y0.unique().numel() > size  # no value repeats: nothing like {0, 7}
    # the low bits are balanced on both sides of alpha (no trivial signal)
    for part in (y0[:100], y0[100:]):
        assert 0.3 < float((part & 1).float().mean()) < 0.7


def test_prg_sides_and_kinds_differ():
    seeds = torch.randint(-(2**62), 2**62, (4, 2)) & torch.tensor([-2, -1])
    left = prg.expand(seeds.clone(), 2)
    right_u = seeds.clone()
    right_u[:, 0] |= 1
    right = prg.expand(right_u, 2)
    assert not torch.equal(left[0], right[0]) and not torch.equal(left[2], right[2])
    assert torch.equal(left[0][:, 0] & 1, torch.zeros(4, dtype=torch.int64))  # control bit cleared
    assert not torch.equal(prg.convert(seeds, 2), left[2])


def test_key_size_matches_the_documented_formula():
    n, k = fss_material.DCF_BITS, 2
    shapes = dcf.key_shapes(10, n, k)
    assert sum(math.prod(s) for s in shapes) * 8 == 10 * (16 + n * (16 + 8 * k) + 16 + 8 * k)


# --------------------------------------------------------- the comparison


def _shared(x, parties):
    return dict(zip(parties, split(x, len(parties))))


def _edge_values(n):
    edges = torch.tensor([0, 1, -1, 2, -2, MAX_D, -MAX_D, MAX_D - 1, -MAX_D + 1, 2**20, -(2**20)])
    return torch.cat([edges, torch.empty(n, dtype=torch.int64).random_(-(2**63), None).clamp(min=-MAX_D)])


@pytest.fixture(params=sorted(COMPARISON_PROTOCOLS))
def protocol(request, monkeypatch):
    """Runs a test once per comparison protocol (as the default one)."""
    monkeypatch.setattr(comparison, "DEFAULT_COMPARISON", request.param)
    return request.param


def circuit_words(numel: int) -> int:
    """Opened words of the bitwise circuit besides the masked values: the quad level's packed variables, then
    2 binary AND levels compacted COMPACT[level] entries to a word (the last level's holds the result's top
    operand: no round after it)."""
    from veil.mpc.bit_comparison import AND_LEVELS, opened_words

    return sum(opened_words(level, numel) for level in range(AND_LEVELS))


@pytest.mark.parametrize("n_extra", [0, 1, 2])
def test_sign_select_local(parties, n_extra, protocol):
    d = _edge_values(300)
    extras = [torch.randint(-(2**63), 2**63 - 1, d.shape) for _ in range(n_extra)]
    with count_openings() as stats:
        bits, products = sign_select(_shared(d, parties), [_shared(e, parties) for e in extras], LocalDealer(seed=5))
    bit = (d > 0).long()
    assert torch.equal(reconstruct(bits), bit)
    for v, prod in zip([d] + extras, products):
        assert torch.equal(reconstruct(prod), v * bit)
    n = len(parties)
    words = 1 + n_extra
    circuit = circuit_words(d.numel()) if protocol == "circuit" else 0
    assert stats.rounds == COMPARISON_ROUNDS[protocol]
    assert stats.elements == n * (n - 1) * (d.numel() * words + circuit)


def test_bit_alone_opens_one_value_and_takes_a_smaller_key(parties):
    d = _edge_values(100)
    dealer = LocalDealer(seed=4)
    with count_openings() as stats:
        bits, products = sign_select(_shared(d, parties), [], dealer, products=False, protocol="fss")
    assert torch.equal(reconstruct(bits), (d > 0).long()) and products == []
    n = len(parties)
    assert stats.rounds == 1 and stats.elements == n * (n - 1) * d.numel()
    key_bytes = [8 * sum(t.numel() for t in dealer.comparison_keys((10,), p, parties)[parties[0]][-5:]) for p in (0, 1)]
    assert key_bytes == [10 * 1552, 10 * 2064]  # 63-bit DCF: 16 + 63 (16 + 8K) + 16 + 8K
    with pytest.raises(ValueError, match="products"):
        sign_select(_shared(d, parties), [_shared(d, parties)], dealer, products=False)


def test_sign_select_keeps_shape(protocol):
    d = torch.randint(-1000, 1000, (3, 4, 5))
    bits, (relu,) = sign_select(_shared(d, ("a", "b")), [], LocalDealer(seed=1))
    assert torch.equal(reconstruct(bits), (d > 0).long()) and torch.equal(reconstruct(relu), d.clamp(min=0))
    assert set(COMPARISON_PROTOCOLS) == {"fss", "circuit"}


def test_only_the_first_two_parties_hold_keys(parties):
    material = LocalDealer(seed=2).comparison_keys((6,), 1, parties)
    n_add = fss_material.n_additive(1)
    assert [len(material[p]) for p in parties] == [n_add + 5, n_add + 5] + [n_add] * (len(parties) - 2)


# ------------------------------------------------- on workers, worker dealer


@pytest.fixture(params=[2, 3], ids=["2party", "3party"])
def workers(request, hook):
    names = ("alice", "bob", "charlie")[: request.param]
    return [sy.VirtualWorker(hook, id=n) for n in names], sy.VirtualWorker(hook, id="crypto_provider")


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_worker_dealer_comparisons(workers, hook, seeded, protocol):
    parties, cp = workers
    dealer_for(cp, hook.local_worker).seeded = seeded
    scale = 2**16
    edge = (2**62 - 2**40) / scale  # near the encoder's bound (float32-exact): a - b is still exact
    a = torch.cat([torch.randn(200) * 1000, torch.tensor([edge, -edge, 0.0, 1 / scale])])
    b = torch.randn(a.shape) * 1000
    b[:5] = a[:5]
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    y = b.fix_precision().share(*parties, crypto_provider=cp)
    ea, eb = a.fix_precision().child, b.fix_precision().child
    for op in ("gt", "lt", "ge", "le", "eq"):
        with count_openings() as stats:
            z = getattr(x, f"__{op}__")(y)
        assert torch.equal(z.get().float_precision(), getattr(torch, op)(ea, eb).float()), op
        assert stats.rounds == COMPARISON_ROUNDS[protocol], op
    with count_openings() as stats:
        r = F.relu(x)
    assert stats.rounds == COMPARISON_ROUNDS[protocol]
    assert torch.equal(r.get().child, ea.clamp(min=0))
    assert len(hook.local_worker._objects) == 0


def test_max_argmax_rounds(hook):
    parties = [sy.VirtualWorker(hook, id=n) for n in ("alice", "bob")]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    a = torch.randn(4, 13) * 50
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    with count_openings() as stats:
        values, index = torch.max(x, dim=1)
    assert stats.rounds == math.ceil(math.log2(13)) * COMPARISON_ROUNDS[comparison.DEFAULT_COMPARISON]
    assert torch.equal(index.get().float_precision(), a.fix_precision().child.argmax(dim=1).float())
    assert torch.allclose(values.get().float_precision(), a.max(dim=1).values, atol=2**-16)


def test_parties_refuse_malformed_material(hook):
    alice = sy.VirtualWorker(hook, id="alice")
    me = hook.local_worker
    good = LocalDealer(seed=3).comparison_keys((4,), 1, ("a", "b"))["a"]
    n_add = fss_material.n_additive(1)
    shares, key = list(good[:n_add]), list(good[n_add:])

    def send(*args):  # fresh return ids each time (taken ones are refused before the function runs)
        me.send_msg(m.CommandMessage(RECEIVE_COMPARISON, args, {}, [new_id() for _ in range(n_add + 5)], False), alice)

    send([4], 1, 1, None, shares, key)  # well-formed: accepted
    bad_key = key[:1] + [key[1][:-1]] + key[2:]  # one level short
    with pytest.raises(VeilError, match="malformed"):
        send([4], 1, 1, None, shares, bad_key)
    with pytest.raises(VeilError, match="int64"):
        send([4], 1, 1, None, shares, key[:4] + [key[4].float()])
    with pytest.raises(VeilError, match="n_values"):
        send([4], -1, 1, None, shares, key)
    with pytest.raises(VeilError, match="malformed"):  # material of a bit-only comparison
        send([4], 0, 1, None, shares[:2], key)
    with pytest.raises(VeilError, match="shares"):
        send([4], 1, 1, None, shares[:-1], key)
    with pytest.raises(VeilError, match="seed"):
        send([4], 1, 1, torch.zeros(5, dtype=torch.uint8), [], key)


def test_provider_refuses_bad_specs():
    from veil.mpc.providers.fss_dealing import check_spec

    for spec, count in [(((3,), -1), 1), ((("x",), 1), 1), (((3,), 1), 0), ((3, 1), 1), (((3,), 99), 1)]:
        with pytest.raises(ProviderError):
            check_spec(spec, count)

"""The bitwise (dealer-assisted circuit) comparison: exact over the whole ring, at mask edges, small material."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import veil as sy
from veil.mpc import bit_comparison, quad_level
from veil.mpc.comparison_material import AND_LEVELS, ComparisonLayout
from veil.mpc.material import recipe
from veil.mpc.opening import count_openings, reconstruct
from veil.mpc.providers import LocalDealer
from veil.mpc.providers.worker_dealer import dealer_for
from veil.mpc.sharing import split

from tests.mpc.test_exact_range import across_range

MAX = 2**63 - 1
EDGES = [0, 1, -1, 2, -2, MAX, -MAX, MAX - 1, -MAX + 1, 2**62, -(2**62), 2**39, -(2**39), 2**32, -(2**32)]


def _shared(x, parties, gen=None):
    return dict(zip(parties, split(x, len(parties), gen)))


def _check(d, parties, dealer, extras=(), gen=None):
    bits, prods = bit_comparison.sign_select(_shared(d, parties, gen), [_shared(e, parties, gen) for e in extras],
                                             dealer)
    bit = (d > 0).long()
    wrong = reconstruct(bits) != bit
    assert int(wrong.sum()) == 0, f"{int(wrong.sum())} wrong bits of {d.numel()}, e.g. {d[wrong][:3].tolist()}"
    for v, p in zip([d, *extras], prods):
        assert torch.equal(reconstruct(p), v * bit)


def test_2e5_across_the_whole_ring():  # the default suite's share; 10^6 and more below (slow)
    gen = torch.Generator().manual_seed(21)
    d = torch.cat([torch.tensor(EDGES), across_range(2 * 10**5, MAX, gen)])
    _check(d, ("a", "b"), LocalDealer(seed=21), gen=gen)


@pytest.mark.slow
@pytest.mark.parametrize("n_parties", [2, 3])
def test_2e6_across_the_whole_ring(n_parties):
    gen = torch.Generator().manual_seed(22 + n_parties)
    d = across_range(2 * 10**6, MAX, gen)
    _check(d, ("a", "b", "c")[:n_parties], LocalDealer(seed=22), gen=gen)


class EdgeMaskDealer(LocalDealer):
    """Deals comparison masks ``r_0`` at the edges (0, +-1, 2^63 - 1, -2^63, ...) instead of uniform ones."""

    def __init__(self, masks, **kw):
        super().__init__(**kw)
        self.masks = masks

    def _deal_recipe(self, kind, spec, parties):
        if kind != "comparison":
            return super()._deal_recipe(kind, spec, parties)
        from veil.mpc.material import split_shares, xor_fields

        uniform_shapes, _, derive = recipe(kind, spec)
        uniform = [torch.empty(s, dtype=torch.int64).random_(generator=self._generator) for s in uniform_shapes]
        uniform[0] = self.masks.view(uniform_shapes[0])
        fields = uniform + derive(uniform, self._generator)
        xor = xor_fields(kind, spec)
        per_field = [split_shares(v, len(parties), j in xor, self._generator) for j, v in enumerate(fields)]
        return {p: tuple(f[i] for f in per_field) for i, p in enumerate(parties)}


def test_edge_masks_and_edge_values():
    mask_edges = [0, 1, -1, MAX, -MAX - 1, 2**62, -(2**62), 2**63 - 2, 12345]
    d = torch.tensor(EDGES).repeat_interleave(len(mask_edges))
    r = torch.tensor(mask_edges).repeat(len(EDGES))
    for parties in (("a", "b"), ("a", "b", "c")):
        _check(d, parties, EdgeMaskDealer(r, seed=3))


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(-MAX, MAX), min_size=1, max_size=20), n_extra=st.integers(0, 2),
       n_parties=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**31))
def test_property(values, n_extra, n_parties, seed):
    d = torch.tensor(values + EDGES)
    gen = torch.Generator().manual_seed(seed)
    extras = [torch.empty(d.shape, dtype=torch.int64).random_(generator=gen) for _ in range(n_extra)]
    _check(d, ("a", "b", "c", "d")[:n_parties], LocalDealer(seed=seed), extras, gen)


def test_rounds_bytes_and_dealt_material(hook):
    parties = [sy.VirtualWorker(hook, id=n) for n in ("alice", "bob")]
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    dealer = dealer_for(cp, hook.local_worker)
    dealer.max_batch = 1
    n = 1000
    a = torch.randn(n)
    x = a.fix_precision().share(*parties, crypto_provider=cp)
    sent = cp.stats.snapshot()["bytes_sent"]
    with count_openings() as stats:
        r = F.relu(x)
    dealt = cp.stats.snapshot()["bytes_sent"] - sent
    assert torch.equal(r.get().child, a.fix_precision().child.clamp(min=0))
    assert stats.rounds == 1 + AND_LEVELS == 4  # the masked value, then the AND levels (the select is local)
    # masked value, 3 AND levels' words: the quad level's 7 variables packed 16 entries to a word, the binary
    # levels' words compacted COMPACT[level] entries to a word
    words = sum(bit_comparison.opened_words(level, n) for level in range(AND_LEVELS))
    assert bit_comparison.COMPACT == {1: 10, 2: 21} and words == 7 * 63 + 100 + 48
    assert stats.bytes_by_party[parties[0].id] == n * 8 + words * 8
    # seeded: the last party gets the derived fields: R and the group products in the group layout (4 and 11
    # rows of 4 words per 16 entries), the quad products (22 rows of a word per 16 entries), the first binary
    # level's 2 AND products, the last level's select table of 4 rows and r times it: 10 words per entry and
    # 82 per 16 entries (the 63-bit DCF keys were 2,064 bytes per entry for each of two parties)
    _, derived, _ = recipe("comparison", ((n,), 1))
    assert len(derived) == ComparisonLayout(1).n_fields - ComparisonLayout(1).n_uniform == 7
    words = sum(torch.Size(shape).numel() for shape in derived)
    assert words == 10 * n + 82 * 63
    assert words * 8 <= dealt <= words * 8 + 4000


def test_party_steps_refuse_bad_arguments():
    w = torch.zeros(3, dtype=torch.int64)
    for level in (AND_LEVELS, 0, -1, True):  # the binary levels are 1 .. AND_LEVELS - 1 (0: the quad level)
        with pytest.raises(ValueError, match="level"):
            bit_comparison._and_open([w, w], w, w, w, level, True)
    with pytest.raises(ValueError, match="boolean"):
        bit_comparison._and_open([w, w], w, w, w, 1, 1)
    with pytest.raises(ValueError, match="state"):
        bit_comparison._and_open([w, w, w], w, w, w, 1, True)
    # 3 entries: a state of 4 group-layout words, the quad level's packed variables 7 rows of 1 word
    g, q = torch.zeros(4, dtype=torch.int64), torch.zeros(7, 1, dtype=torch.int64)
    for state in ([g], [g, g[:2]], [w, w], [g.int(), g], [g.view(2, 2), g.view(2, 2)]):
        with pytest.raises(ValueError, match="state"):
            quad_level._quad_open(state, q)
    for bad in (q[:1], q[:, :0], q.int(), torch.zeros(7, 2, dtype=torch.int64)):  # broadcast, empty, not the ring
        with pytest.raises(ValueError, match="mask must be int64"):
            quad_level._quad_open([g, g], bad)
    products = torch.zeros(22, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="products must be"):
        quad_level._quad_next([g, g], q, q, products[:21], [3], True)
    with pytest.raises(ValueError, match="opened variables must be"):
        quad_level._quad_next([g, g], q[:6], q, products, [3], True)
    with pytest.raises(ValueError, match="boolean"):
        quad_level._quad_next([g, g], q, q, products, [3], 1)
    for shape in ([17], [1, 17], (3,), [3.0], [-3], 3):  # the entries' shape: 3 entries (1 .. 16) in a list
        with pytest.raises(ValueError, match="entries' shape"):
            quad_level._quad_next([g, g], q, q, products, shape, True)
    r4, groups = torch.zeros(4, 4, dtype=torch.int64), torch.zeros(11, 4, dtype=torch.int64)
    for bad in ((w, r4[:, :3], groups), (w, r4, groups[:10]), (w, r4.int(), groups), (w.float(), r4, groups)):
        with pytest.raises(ValueError, match="cmp_leaves needs"):
            bit_comparison._leaves_step(*bad, True)
    table = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="one mask"):
        bit_comparison._select(w, [w], [w, w], table, [table], True)
    with pytest.raises(ValueError, match="select tables"):
        bit_comparison._select(w, [w], [w], table[:3], [table[:3]], True)
    with pytest.raises(ValueError, match="select tables"):
        bit_comparison._select(w, [w], [w], table, [table.int()], True)
    with pytest.raises(ValueError, match="select tables"):
        bit_comparison._select(w, [w], [w], [table], [table], True)
    with pytest.raises(ValueError, match="flat int64"):
        bit_comparison._select(w, [w], [w], table, [table], True)  # an entry-shaped word, not compacted

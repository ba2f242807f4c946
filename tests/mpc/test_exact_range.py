"""Truncation and comparison over the whole documented range, against exact integers.

The encoder's safe range (veil.mpc.encoding) is what these protocols support:
truncation of ``|v| <= 2^62 - d`` is within one ulp with no failure
probability, comparisons are exact for every difference but ``-2^63``.
Zero wrong results are allowed in every test (10^6 truncations and 10^5
comparisons by default, 10^6 comparisons with VEIL_SLOW=1).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc.comparison import sign_select
from veil.mpc.encoding import ENCODING_BOUND, make_encoding
from veil.mpc.opening import reconstruct
from veil.mpc.providers import LocalDealer
from veil.mpc.ring import random_ring
from veil.mpc.sharing import split
from veil.mpc.truncation import TRUNCATION_BOUND, truncate_shares

PARTIES = {2: ("a", "b"), 3: ("a", "b", "c")}


def across_range(n: int, bound: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` values in ``[-bound, bound]``: half uniform, half log-uniform magnitudes, plus the edges."""
    half = n // 2
    if bound >= 2**63 - 1:  # the whole ring but -2^63
        uniform = random_ring((half,), gen).clamp(min=-bound)
    else:
        uniform = torch.empty(half, dtype=torch.int64).random_(-bound, bound + 1, generator=gen)
    bits = torch.randint(0, bound.bit_length(), (n - half,), generator=gen)
    mags = torch.empty(n - half, dtype=torch.int64).random_(0, 2**63 - 1, generator=gen) >> (63 - bits)
    mags = torch.minimum(mags, torch.tensor(bound))
    signs = torch.randint(0, 2, (n - half,), generator=gen) * 2 - 1
    edges = torch.tensor([bound, -bound, bound - 1, -bound + 1, 0, 1, -1])
    return torch.cat([edges, uniform, mags * signs])[:n]


def _shared(values, n_parties, gen):
    return dict(zip(PARTIES[n_parties], split(values, n_parties, gen)))


def check_truncation(values: torch.Tensor, divisor: int, n_parties: int, dealer, gen) -> None:
    got = reconstruct(truncate_shares(_shared(values, n_parties, gen), divisor, dealer))
    floor = torch.div(values, divisor, rounding_mode="floor")
    err = got - floor
    bad = (err < 0) | (err > 1)  # floor or floor + 1
    assert int(bad.sum()) == 0, f"{int(bad.sum())} wrong of {values.numel()}, e.g. {values[bad][:3].tolist()}"


def check_comparison(d: torch.Tensor, n_parties: int, dealer, gen) -> None:
    bits, (prod,) = sign_select(_shared(d, n_parties, gen), [], dealer)
    assert torch.equal(reconstruct(bits), (d > 0).long())
    assert torch.equal(reconstruct(prod), torch.where(d > 0, d, torch.zeros_like(d)))


@pytest.mark.parametrize("n_parties", [2, 3])
@pytest.mark.parametrize("divisor", [2**16, 2**13, 1000, 3])
def test_truncation_1e5_across_range(n_parties, divisor):
    gen = torch.Generator().manual_seed(divisor + n_parties)
    values = across_range(10**5, TRUNCATION_BOUND - divisor, gen)
    check_truncation(values, divisor, n_parties, LocalDealer(seed=divisor), gen)


def test_products_at_the_encoders_product_bound():
    """Shared fixed-point products with |x*y| up to max_abs_product decode within bounds."""
    enc = make_encoding()
    gen = torch.Generator().manual_seed(5)
    bound = enc.max_abs_product * 0.999
    x = torch.rand(20000, generator=gen, dtype=torch.float64) * 2**15 + 1
    y = (torch.rand(20000, generator=gen, dtype=torch.float64) * 2 - 1) * bound / x
    from veil.tensors.fixed_precision import fix_precision

    dealer = LocalDealer(seed=3)
    for parties in PARTIES.values():
        a = fix_precision(x).share(*parties, crypto_provider=dealer)
        b = fix_precision(y).share(*parties, crypto_provider=dealer)
        got = (a * b).get().float_precision().to(torch.float64)
        tol = (x.abs() + y.abs()) * enc.resolution + 2 * enc.resolution
        assert bool(((got - x * y).abs() <= tol).all())


@pytest.mark.parametrize("n_parties", [2, 3])
def test_truncation_1e6_across_range(n_parties):  # ~3 s: in the default suite
    gen = torch.Generator().manual_seed(n_parties)
    values = across_range(10**6, TRUNCATION_BOUND - 2**16, gen)
    check_truncation(values, 2**16, n_parties, LocalDealer(seed=7), gen)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.integers(-(TRUNCATION_BOUND - 2**16), TRUNCATION_BOUND - 2**16), min_size=1, max_size=20),
    divisor=st.sampled_from([2, 2**16, 2**20, 10, 1000]),
    n_parties=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**31),
)
def test_truncation_property(values, divisor, n_parties, seed):
    edge = TRUNCATION_BOUND - divisor
    values = torch.tensor([max(-edge, min(edge, v)) for v in values] + [edge, -edge])
    gen = torch.Generator().manual_seed(seed)
    check_truncation(values, divisor, n_parties, LocalDealer(seed=seed), gen)


def test_truncation_mask_edges():
    """Masks at the wrap points (top bit set/clear, all-ones) with extreme values."""
    values = torch.tensor([TRUNCATION_BOUND - 2**16, -(TRUNCATION_BOUND - 2**16), 0, -1, 1] * 4)

    class EdgeDealer(LocalDealer):
        def _deal_recipe(self, kind, spec, parties):
            if kind != "truncation":
                return super()._deal_recipe(kind, spec, parties)
            from veil.mpc.material import recipe

            _, _, derive = recipe(kind, spec)
            r = torch.tensor([-(2**63)] * 5 + [2**63 - 1] * 5 + [0] * 5 + [-1] * 5)
            fields = [r] + derive([r], None)
            per_field = [split(v, len(parties), self._generator) for v in fields]
            return {p: tuple(f[i] for f in per_field) for i, p in enumerate(parties)}

    for n in (2, 3):
        check_truncation(values, 2**16, n, EdgeDealer(seed=1), torch.Generator().manual_seed(n))


@pytest.mark.parametrize("n_parties", [2, 3])
def test_comparison_1e5_full_ring(n_parties):
    gen = torch.Generator().manual_seed(11 + n_parties)
    d = across_range(10**5, 2**63 - 1, gen)
    check_comparison(d, n_parties, LocalDealer(seed=n_parties), gen)


@pytest.mark.slow
def test_comparison_1e6_full_ring():
    gen = torch.Generator().manual_seed(12)
    d = across_range(10**6, 2**63 - 1, gen)
    check_comparison(d, 2, LocalDealer(seed=5), gen)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.integers(-(2**63) + 1, 2**63 - 1), min_size=1, max_size=16), seed=st.integers(0, 2**31))
def test_comparison_property(values, seed):
    d = torch.tensor(values + [2**39, -(2**39), 2**62, 2**63 - 1, -(2**63) + 1, 1, 0, -1])
    check_comparison(d, 2, LocalDealer(seed=seed), torch.Generator().manual_seed(seed))


def test_power_of_two_equality_is_not_zero(hook):
    """2^39 == 0 was true with 40-bit comparisons."""
    import veil as sy

    alice, bob = sy.VirtualWorker(hook, id="alice"), sy.VirtualWorker(hook, id="bob")
    cp = sy.VirtualWorker(hook, id="crypto_provider")
    big = torch.tensor([2**39, 2**45, -(2**45), 0])
    x = big.share(alice, bob, crypto_provider=cp)
    assert torch.equal((x == 0).get(), (big == 0).long())
    assert torch.equal((x > 0).get(), (big > 0).long())
    f = torch.tensor([2.0**29, -(2.0**29), 0.5]).fix_precision().share(alice, bob, crypto_provider=cp)
    assert torch.equal((f == 0).get().float_precision(), torch.tensor([0.0, 0.0, 0.0]))
    assert torch.equal((f > 0).get().float_precision(), torch.tensor([1.0, 0.0, 1.0]))


def test_encoder_enforces_the_range():
    from veil.mpc.errors import EncodingOverflowError
    from veil.mpc.encoding import encode

    enc = make_encoding()
    assert enc.max_abs == ENCODING_BOUND / 2**16
    encode(torch.tensor([enc.max_abs * (1 - 2**-40)], dtype=torch.float64), enc)
    with pytest.raises(EncodingOverflowError):
        encode(torch.tensor([enc.max_abs], dtype=torch.float64), enc)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=0, max_size=40))
def test_top_bits_pack_and_unpack_exactly(values):
    """What parties 1.. receive of the opened ``c``: its top bits, 8 to a byte, for every length."""
    from veil.mpc.truncation import pack_top_bits, unpack_top_bits

    c = torch.tensor(values, dtype=torch.int64)
    packed = pack_top_bits(c)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(values) + 7) // 8
    expected = [1 if v < 0 else 0 for v in values]
    assert unpack_top_bits(packed, len(values)).tolist() == expected
    assert all(int(b) == sum(expected[8 * j + k] << k for k in range(8) if 8 * j + k < len(values))
               for j, b in enumerate(packed.tolist()))
    with pytest.raises(ValueError, match="packed top bits"):
        unpack_top_bits(packed, len(values) + 8)


@pytest.mark.parametrize("n_parties", [2, 3])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (2, 8), (0, 4)])
def test_truncation_shapes_through_packed_bits(n_parties, shape):
    """Multi-dimensional shares (and empty ones) through party 0's full ``c`` and the others' packed bits."""
    gen = torch.Generator().manual_seed(sum(shape) + n_parties)
    n = math.prod(shape)
    values = across_range(max(n, 7), TRUNCATION_BOUND - 2**16, gen)[:n].reshape(shape)
    check_truncation(values, 2**16, n_parties, LocalDealer(seed=n), gen)


def _finishes(monkeypatch) -> list:
    """(step name, first argument) of every truncation finish run from now on (the opened c or its bits)."""
    from veil.mpc import truncation

    seen = []
    real = truncation.run_party

    def spy(name, *args, **kwargs):
        seen.append((name, args[0]))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(truncation, "run_party", spy)
    return seen


def test_non_first_parties_get_only_packed_top_bits(monkeypatch):
    """Party 0 gets the opened ``c``; parties 1.. only its top bits (uint8, 1/64 of the bytes)."""
    seen = _finishes(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    values = across_range(1000, TRUNCATION_BOUND - 2**16, gen)
    check_truncation(values, 2**16, 3, LocalDealer(seed=3), gen)
    assert [name for name, _ in seen] == ["trunc_finish", "trunc_finish_bits", "trunc_finish_bits"]
    assert seen[0][1].dtype == torch.int64 and seen[0][1].numel() == 1000
    assert all(arg.dtype == torch.uint8 and arg.numel() == 125 for _, arg in seen[1:])


def test_parties_in_this_process_get_the_opened_value_itself(hook, monkeypatch):
    """VirtualWorker parties (in process: c's bytes cost nothing) all finish from ``c``, no packing; exact."""
    import veil as sy
    from veil.mpc import truncation

    seen = _finishes(monkeypatch)
    monkeypatch.setattr(truncation, "pack_top_bits", lambda c: pytest.fail("packed for in-process parties"))
    parties = [sy.VirtualWorker(hook, id=f"inproc{i}") for i in range(3)]
    cp = sy.VirtualWorker(hook, id="inproc_cp")
    x, y = torch.randn(1000) * 100, torch.randn(1000) * 100
    z = x.fix_precision().share(*parties, crypto_provider=cp) * y.fix_precision().share(*parties, crypto_provider=cp)
    assert torch.allclose(z.get().float_precision(), x * y, atol=1e-2)
    assert [name for name, _ in seen] == ["trunc_finish"] * 3
    assert all(c.dtype == torch.int64 and c.numel() == 1000 for _, c in seen)


@settings(max_examples=60, deadline=None)
@given(r=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=30), k=st.integers(1, 62))
def test_wrap_correction_power_of_two_matches_exact_integers(r, k):
    """The dealer's shortcut for d = 2^k against the defining formula in Python integers (r read unsigned)."""
    from veil.mpc.ring import wrap_int
    from veil.mpc.truncation import wrap_correction

    d = 1 << k
    edges = [0, 1, -1, d, -d, d - 1, 2**63 - 1, -(2**63), -(2**63) + d]
    values = r + edges
    got = wrap_correction(torch.tensor(values, dtype=torch.int64), d).tolist()
    for v, g in zip(values, got):
        u = v % 2**64
        expected = (u >> 63) * (u // d + (2**64 - u) // d + 1)
        assert g == wrap_int(expected), (v, k)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=0, max_size=40))
def test_top_bits_word_tricks_match_the_bytewise_path(values):
    """The int64 word tricks (little-endian hosts) and the bytewise path (others) pack and unpack alike."""
    from veil.mpc import truncation

    c = torch.tensor(values, dtype=torch.int64)
    fast = truncation.pack_top_bits(c)
    fast_bits = truncation.unpack_top_bits(fast, len(values))
    saved = truncation._LITTLE
    truncation._LITTLE = False
    try:
        slow = truncation.pack_top_bits(c)
        slow_bits = truncation.unpack_top_bits(fast, len(values))
    finally:
        truncation._LITTLE = saved
    assert torch.equal(fast, slow) and torch.equal(fast_bits, slow_bits)
    assert fast_bits.tolist() == [1 if v < 0 else 0 for v in values]


@settings(max_examples=80, deadline=None)
@given(c=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=30),
       k=st.integers(0, 62), odd=st.sampled_from([1, 3, 5, 10485, 2**20 + 1]), seed=st.integers(0, 2**31))
def test_first_party_finish_matches_exact_integers(c, k, odd, seed):
    """Party 0's finish, ``floor(c/d) - q - K/d + (1 - c_hi) g`` with ``c`` read unsigned, through numpy (the
    path taken) and through torch (the fallback) against Python integers, for divisors ``2^k m``."""
    from veil.mpc import truncation
    from veil.mpc.ring import wrap_int

    d = (1 << k) * odd
    if not 1 < d <= TRUNCATION_BOUND:
        return
    edges = [0, 1, -1, d, -d, d - 1, 2**63 - 1, -(2**63), -(2**63) + d]
    values = torch.tensor(c + edges, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    q, g = (torch.randint(-(2**63), 2**63 - 1, values.shape, dtype=torch.int64, generator=gen) for _ in range(2))
    k_over_d = truncation.shift_for(d) // d
    expected = [wrap_int((v % 2**64) // d - qi - k_over_d + (0 if v < 0 else gi))
                for v, qi, gi in zip(values.tolist(), q.tolist(), g.tolist())]
    assert truncation._first_finish_in_numpy(values, q, g, d).tolist() == expected
    assert truncation._first_finish_in_torch(values, q, g, d).tolist() == expected


def test_first_party_finish_in_pieces_matches_torch():
    """Past one piece (``_FINISH_PIECE`` entries) and with strided shares: numpy's finish and torch's agree."""
    from veil.mpc import truncation

    gen = torch.Generator().manual_seed(5)
    n = truncation._FINISH_PIECE * 2 + 17
    c, q, g = (torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=gen) for _ in range(3))
    for d in (2**16, 3 * 2**10, 7):
        assert torch.equal(truncation._first_finish_in_numpy(c, q, g, d), truncation._first_finish_in_torch(c, q, g, d))
    c2, q2, g2 = (t[: 300 * 300].view(300, 300).t() for t in (c, q, g))  # transposed views
    z = truncation._trunc_finish(c2, q2, g2, divisor=2**16, first=True)
    assert torch.equal(z, truncation._first_finish_in_torch(c2.contiguous(), q2, g2, 2**16))


@pytest.mark.parametrize("divisor", [1, 2**62 + 1, 2**64, 2**70, 3 * 2**63, 2.0**16])
def test_first_party_finish_refuses_a_divisor_outside_the_range(divisor):
    """A requester's divisor past 2^62 (where a uint64 shift by 64 or more would wrap its count and give
    garbage) or not an integer > 1 is refused in one line, before anything is computed."""
    from veil.mpc import truncation

    c, q, g = (torch.tensor([5, -5], dtype=torch.int64) for _ in range(3))
    with pytest.raises(ValueError, match="divisor in \\[2, 2\\^62\\]"):
        truncation._trunc_finish(c, q, g, divisor=divisor, first=True)
    assert truncation._trunc_finish(c, q, g, divisor=2**62, first=True).shape == (2,)  # the bound itself is served

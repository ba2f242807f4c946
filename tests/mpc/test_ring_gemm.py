"""Ring products through float64 limbs (veil.mpc.ring_gemm) against torch's own int64 products."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.mpc import ring, ring_gemm

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
#: values whose limbs sit at the edges of [-2^21, 2^21]: the largest limb products there are
EDGES = [0, 1, -1, INT64_MIN, INT64_MAX, -(1 << 21) - (1 << 43), (1 << 21) - 1 + ((1 << 21) - 1 << 22),
         -(1 << 21) + 1 - (1 << 43), 1 << 44, -(1 << 62)]


@pytest.fixture
def limbs_on(monkeypatch):
    """The limbs serve every product here (on any host, however small the product)."""
    monkeypatch.setattr(ring_gemm, "_choice", True)
    monkeypatch.setattr(ring_gemm, "MIN_WORK", 0)


def ints(shape, data, edges_only=False):
    n = 1
    for s in shape:
        n *= s
    value = st.sampled_from(EDGES) if edges_only else st.one_of(st.integers(INT64_MIN, INT64_MAX), st.sampled_from(EDGES))
    return torch.tensor(data.draw(st.lists(value, min_size=n, max_size=n)), dtype=torch.int64).reshape(shape)


def full_range(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.int64).random_(INT64_MIN, None, generator=g)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_limbs_rebuild_every_value_and_stay_within_2_21(data):
    x = ints((data.draw(st.integers(1, 40)),), data)
    outs = [torch.empty(x.shape, dtype=torch.float64) for _ in range(3)]
    ring_gemm.split_into(x, outs)
    assert all(o.abs().max() <= 1 << 21 and torch.equal(o, o.round()) for o in outs)
    rebuilt = [(int(a) + (int(b) << 22) + (int(c) << 44)) % (1 << 64) for a, b, c in zip(*(o.tolist() for o in outs))]
    assert rebuilt == [v % (1 << 64) for v in x.tolist()]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 6), st.integers(1, 3), st.booleans(), st.data())
def test_sums_of_products_match_torch(m, k, n, count, with_c, data):
    pairs = [(ints((m, k), data), ints((k, n), data)) for _ in range(count)]
    c = ints((m, n), data) if with_c else None
    expected = torch.zeros(m, n, dtype=torch.int64) if c is None else c.clone()
    for x, y in pairs:
        expected += x @ y
    assert torch.equal(ring_gemm.sum_of_products(c, pairs), expected)


@pytest.mark.parametrize("k", [ring_gemm.MAX_TERMS // 3, ring_gemm.MAX_TERMS // 3 + 1, 3 * ring_gemm.MAX_TERMS + 5])
def test_long_reductions_stay_exact_at_the_largest_limbs(k):
    # low and middle limbs at 2^21 - 1 or 2^21 - 3 (odd, one sign): every limb product is an odd ~2^42 and
    # the sums only grow, so a float64 sum of more than MAX_TERMS of them would round (the pieces keep
    # every sum within 2^53)
    g = torch.Generator().manual_seed(k)
    pick = torch.tensor([(1 << 21) - 1 + ((1 << 21) - 1 << 22), (1 << 21) - 3 + ((1 << 21) - 3 << 22)])
    x, x2 = pick[torch.randint(0, 2, (4, k), generator=g)], pick[torch.randint(0, 2, (4, k // 2 + 1), generator=g)]
    y, y2 = pick[torch.randint(0, 2, (k, 3), generator=g)], pick[torch.randint(0, 2, (k // 2 + 1, 3), generator=g)]
    assert torch.equal(ring_gemm.sum_of_products(None, [(x, y)]), x @ y)
    assert torch.equal(ring_gemm.sum_of_products(x @ y, [(x, y), (x2, y2)]), x @ y + x @ y + x2 @ y2)


def test_max_terms_is_the_longest_exact_float64_sum_of_limb_products():
    """Why the pieces exist: (2^21 - 1)^2 is odd, and MAX_TERMS + 1 of them pass 2^53 and round."""
    limb = float((1 << 21) - 1)
    for k, exact in ((ring_gemm.MAX_TERMS, True), (ring_gemm.MAX_TERMS + 1, False)):
        x = torch.full((1, k), limb, dtype=torch.float64)
        assert (int((x @ x.t()).item()) == k * ((1 << 21) - 1) ** 2) is exact


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 7), st.integers(1, 4), st.data())
def test_batched_and_broadcast_products_match_torch(b, m, k, n, data):
    x, y = ints((b, m, k), data), ints((b, k, n), data)
    assert torch.equal(ring_gemm.limb_bilinear(torch.bmm, x, y), torch.bmm(x, y))
    v = ints((k,), data)
    assert torch.equal(ring_gemm.limb_bilinear(torch.matmul, x, v), torch.matmul(x, v))
    assert torch.equal(ring_gemm.limb_bilinear(torch.matmul, x, y[0]), torch.matmul(x, y[0]))


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (1, 1, 1, 2)])
def test_convolutions_match_torch(stride, padding, dilation, groups):
    x, w = full_range(3, 4, 9, 9, seed=1), full_range(6, 4 // groups, 3, 3, seed=2)
    expected = F.conv2d(x, w, None, stride, padding, dilation, groups)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert torch.equal(ring_gemm.limb_bilinear(F.conv2d, x, w, bias=None, **kwargs), expected)


def test_the_ring_ops_give_the_same_values_either_way(monkeypatch):
    monkeypatch.setattr(ring_gemm, "MIN_WORK", 0)
    x, y, c = full_range(70, 90, seed=3), full_range(90, 50, seed=4), full_range(70, 50, seed=5)
    xb, yb = full_range(2, 30, 40, seed=6), full_range(2, 40, 30, seed=7)
    img, w = full_range(2, 4, 12, 12, seed=8), full_range(5, 4, 3, 3, seed=9)  # 36 taps: past MIN_CONV_TAPS
    results = []
    for choice in (True, False):
        monkeypatch.setattr(ring_gemm, "_choice", choice)
        results.append([ring.BILINEAR_OPS["matmul"](x, y), ring.BILINEAR_OPS["mm"](x, y), ring_gemm.addmm(c, x, y),
                        ring.BILINEAR_OPS["bmm"](xb, yb), ring.BILINEAR_OPS["matmul"](xb, yb[0]),
                        ring.conv2d(img, w, 1, 1)])
    expected = [x @ y, x @ y, torch.addmm(c, x, y), torch.bmm(xb, yb), torch.matmul(xb, yb[0]),
                F.conv2d(img, w, None, 1, 1)]
    for on, off, want in zip(*results, expected):
        assert torch.equal(on, want) and torch.equal(off, want)


def test_meta_tensors_and_other_dtypes_go_to_torch(limbs_on):
    meta = torch.empty(5, 7, dtype=torch.int64, device="meta")
    assert ring.BILINEAR_OPS["matmul"](meta, torch.empty(7, 3, dtype=torch.int64, device="meta")).shape == (5, 3)
    f = torch.randn(4, 4)
    assert torch.equal(ring_gemm.mm(f, f), f @ f)
    assert ring_gemm.products(None, [(torch.zeros(3, 0, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.int64))]) is None


def test_the_choice_can_be_pinned(monkeypatch):
    for pinned, want in (("int64", False), ("limbs", True)):
        monkeypatch.setattr(ring_gemm, "_choice", None)
        monkeypatch.setenv("VEIL_RING_GEMM", pinned)
        assert ring_gemm.limbs_pay() is want
    monkeypatch.setattr(ring_gemm, "_choice", None)
    monkeypatch.delenv("VEIL_RING_GEMM")
    assert ring_gemm.limbs_pay() in (True, False)  # timed on this host


@pytest.mark.parametrize("parties", [("alice", "bob"), ("alice", "bob", "charlie")])
@pytest.mark.parametrize("op, shapes", [("mm", ((40, 700), (700, 30))), ("matmul", ((33, 65), (65, 17))),
                                        ("matmul", ((2, 20, 40), (40, 10))), ("bmm", ((3, 20, 30), (3, 30, 9)))])
def test_beaver_products_through_limbs_open_to_torchs_ring_product(limbs_on, parties, op, shapes):
    from veil.mpc.beaver import beaver_op
    from veil.mpc.opening import reconstruct
    from veil.mpc.providers import LocalDealer
    from veil.mpc.sharing import split

    gen = torch.Generator().manual_seed(len(shapes[0]))
    x, y = (torch.empty(s, dtype=torch.int64).random_(INT64_MIN, None, generator=gen) for s in shapes)
    xs, ys = (dict(zip(parties, split(t, len(parties), gen))) for t in (x, y))
    got = reconstruct(beaver_op(xs, ys, op, LocalDealer(seed=7)))
    assert torch.equal(got, {"mm": torch.mm, "matmul": torch.matmul, "bmm": torch.bmm}[op](x, y))


M128 = 1 << 128


def _pair_of(values):
    from veil.mpc import ring128

    limbs = [ring128.from_int(v) for v in values]
    return torch.tensor([a for a, _ in limbs]), torch.tensor([b for _, b in limbs])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 4), st.booleans(), st.data())
def test_ring128_products_through_float_digit_images_match_python(limbs_on, n, k, m, public_first, data):
    """SPDZ2k's 128-bit products (MAC shares) through float64 digit images, against Python integers."""
    from veil.mpc import ring128

    value = st.one_of(st.integers(0, M128 - 1), st.sampled_from([0, 1, (1 << 64) - 1, 1 << 64, 1 << 127, M128 - 1]))
    p_vals = data.draw(st.lists(value, min_size=n * k, max_size=n * k))
    x_vals = data.draw(st.lists(value, min_size=k * m, max_size=k * m))
    p = tuple(t.reshape(n, k) for t in _pair_of(p_vals))
    x = tuple(t.reshape(k, m) for t in _pair_of(x_vals))
    assert ring128._float_digit_images(ring.BILINEAR_OPS["mm"], p[0], x[0], True, {}) is not None  # the new path
    if public_first:
        got, want_of = ring128.bilinear(ring.BILINEAR_OPS["mm"], p, x), (p_vals, x_vals, n, k, m)
    else:
        got, want_of = ring128.bilinear(ring.BILINEAR_OPS["mm"], x, p, public_first=False), (p_vals, x_vals, n, k, m)
    pv, xv, n_, k_, m_ = want_of
    want = [sum(pv[i * k_ + t] * xv[t * m_ + j] for t in range(k_)) % M128 for i in range(n_) for j in range(m_)]
    got_ints = [ring128.to_int(a, b) for a, b in zip(got[0].reshape(-1).tolist(), got[1].reshape(-1).tolist())]
    assert got_ints == want


def test_ring128_convolution_through_float_digit_images_matches_int64_digits(limbs_on):
    from veil.mpc import ring128

    g = torch.Generator().manual_seed(5)
    x = tuple(torch.empty(2, 3, 7, 7, dtype=torch.int64).random_(INT64_MIN, None, generator=g) for _ in range(2))
    w = tuple(torch.empty(4, 3, 3, 3, dtype=torch.int64).random_(INT64_MIN, None, generator=g) for _ in range(2))
    got = ring128.bilinear(ring.BILINEAR_OPS["conv2d"], x, w, padding=1, stride=2)
    want = ring128.bilinear(F.conv2d, x, w, padding=1, stride=2)  # (no float twin: int64 digit images)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

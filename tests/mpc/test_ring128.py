"""Z/2^128 limb arithmetic (veil.mpc.ring128) against Python integers."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc import ring128 as r

M = 1 << 128
u128 = st.integers(0, M - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
EDGES = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**127, M - 1]
vals = st.one_of(u128, st.sampled_from(EDGES))


def pair(values):
    limbs = [r.from_int(v) for v in values]
    return torch.tensor([a for a, _ in limbs]), torch.tensor([b for _, b in limbs])


def ints(p):
    return [r.to_int(a, b) for a, b in zip(p[0].reshape(-1).tolist(), p[1].reshape(-1).tolist())]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(vals, vals), min_size=1, max_size=8))
def test_elementwise_ops_match_python(xs):
    a, b = pair([x for x, _ in xs]), pair([y for _, y in xs])
    assert ints(r.add(a, b)) == [(x + y) % M for x, y in xs]
    assert ints(r.sub(a, b)) == [(x - y) % M for x, y in xs]
    assert ints(r.neg(a)) == [(-x) % M for x, _ in xs]
    assert ints(r.mul(a, b)) == [(x * y) % M for x, y in xs]
    lo, hi = r.mul_wide(a[0], b[0])
    assert ints((lo, hi)) == [((x % 2**64) * (y % 2**64)) for x, y in xs]
    assert r.eq(a, a).all() and ints(r.lift(torch.tensor([-1, 5]))) == [M - 1, 5]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 4), st.data())
def test_bilinear_and_linear_maps_are_exact(n, k, m, data):
    p_vals = data.draw(st.lists(vals, min_size=n * k, max_size=n * k))
    x_vals = data.draw(st.lists(vals, min_size=k * m, max_size=k * m))
    p = tuple(t.reshape(n, k) for t in pair(p_vals))
    x = tuple(t.reshape(k, m) for t in pair(x_vals))
    got = ints(r.bilinear(torch.mm, p, x))
    want = [sum(p_vals[i * k + t] * x_vals[t * m + j] for t in range(k)) % M for i in range(n) for j in range(m)]
    assert got == want
    got_t = ints(r.bilinear(torch.mm, x, p, public_first=False) if n == m else r.bilinear(torch.mm, p, x))
    assert got_t == want or n != m
    assert ints(r.sum_all(x)) == [sum(x_vals) % M]
    sums = ints(r.linear(lambda a, b: a.sum(0) - 3 * b.sum(0), [x, x]))
    assert sums == [(-2 * sum(x_vals[t * m + j] for t in range(k))) % M for j in range(m)]


@settings(max_examples=25, deadline=None)
@given(st.lists(vals, min_size=1, max_size=6), st.integers(2, 4))
def test_split_reconstructs(values, n):
    v = pair(values)
    shares = r.split(v, n, lambda s: torch.randint(-(2**63), 2**63 - 1, tuple(s)))
    assert ints(r.total(shares)) == [x % M for x in values]


def test_conv_bilinear_exact():
    g = torch.Generator().manual_seed(0)
    x = tuple(torch.randint(-(2**62), 2**62, (1, 2, 5, 5), generator=g) for _ in range(2))
    w = torch.randint(-(2**62), 2**62, (3, 2, 3, 3), generator=g)
    out = ints(r.bilinear(torch.nn.functional.conv2d, x, r.lift(w), public_first=True, padding=1))
    xs, ws = ints(x), [v % M for v in w.reshape(-1).tolist()]
    ref = []
    for o in range(3):
        for i in range(5):
            for j in range(5):
                s = 0
                for c in range(2):
                    for a in range(3):
                        for b in range(3):
                            ii, jj = i + a - 1, j + b - 1
                            if 0 <= ii < 5 and 0 <= jj < 5:
                                s += xs[c * 25 + ii * 5 + jj] * ws[o * 18 + c * 9 + a * 3 + b]
                ref.append(s % M)
    assert out == ref


def test_long_reductions_take_16_bit_digits_and_stay_exact():
    g = torch.Generator().manual_seed(1)
    k = 5000  # > 2^12 products per entry: the 16-bit digit path
    p = tuple(torch.randint(-(2**63), 2**63 - 1, (2, k), generator=g) for _ in range(2))
    x = tuple(torch.randint(-(2**63), 2**63 - 1, (k, 1), generator=g) for _ in range(2))
    pi, xi = ints(p), ints(x)
    want = [sum(pi[i * k + t] * xi[t] for t in range(k)) % M for i in range(2)]
    assert ints(r.bilinear(torch.mm, p, x)) == want
    assert r._products_per_entry(torch.mm, p[0], x[0]) == k

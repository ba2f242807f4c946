"""Fixed-point encoding: round trips, negatives, truncation, overflow."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.mpc.encoding import (
    FixedPointEncoding,
    check_no_wrap,
    decode,
    encode,
    encode_scalar,
    make_encoding,
    mul_error_bound,
    truncate,
)
from veil.mpc.errors import EncodingOverflowError

ENCODINGS = [make_encoding(), make_encoding(base=10), FixedPointEncoding(2, 24), FixedPointEncoding(10, 6)]
reals = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=64)


@pytest.mark.parametrize("enc", ENCODINGS, ids=str)
@settings(max_examples=200, deadline=None)
@given(values=st.lists(reals, min_size=1, max_size=20))
def test_roundtrip_within_half_ulp(enc, values):
    x = torch.tensor(values, dtype=torch.float64)
    err = (decode(encode(x, enc), enc, torch.float64) - x).abs().max().item()
    assert err <= 0.5 * enc.resolution + 1e-9


@pytest.mark.parametrize("enc", ENCODINGS, ids=str)
@settings(max_examples=200, deadline=None)
@given(v=st.integers(min_value=-(2**62), max_value=2**62))
def test_decode_exact_quotient(enc, v):
    """decode(v) is v / scale for every sign: q + r/s with 0 <= r < s."""
    got = decode(torch.tensor([v]), enc, torch.float64).item()
    assert math.isclose(got, v / enc.scale, rel_tol=1e-15, abs_tol=1e-15)


@pytest.mark.parametrize("enc", [make_encoding(base=10), make_encoding()], ids=str)
def test_regression_negative_decoding(enc):
    # Another implementation decoded -16.9999 as -17.9999 by mixing a
    # truncating quotient with a flooring remainder.
    for value in (-16.9999, -16.5, -0.001, -17.0, -1e-4):
        got = decode(encode(torch.tensor([value], dtype=torch.float64), enc), enc, torch.float64).item()
        assert abs(got - value) <= 0.5 * enc.resolution + 1e-12, (value, got)
    enc10 = make_encoding(base=10)
    assert decode(torch.tensor([-16999]), enc10, torch.float64).item() == pytest.approx(-16.999, abs=1e-12)


def test_defaults():
    assert make_encoding().scale == 2**16
    assert make_encoding(base=10).scale == 1000
    with pytest.raises(ValueError):
        make_encoding(base=7)


def test_overflow_is_clear():
    enc = make_encoding()
    with pytest.raises(EncodingOverflowError, match="encodable range"):
        encode(torch.tensor([2.0**46]), enc)  # the bound: |x| * scale < 2^62
    with pytest.raises(OverflowError):
        encode_scalar(1e30, enc)
    with pytest.raises(EncodingOverflowError, match="NaN"):
        encode(torch.tensor([float("nan")]), enc)
    with pytest.raises(EncodingOverflowError, match="overflows"):
        check_no_wrap(torch.tensor([2.0**64]), "mul")


@pytest.mark.parametrize("enc", ENCODINGS[:2], ids=str)
@settings(max_examples=300, deadline=None)
@given(x=st.floats(-1000, 1000), y=st.floats(-1000, 1000))
def test_truncated_product_within_bound(enc, x, y):
    product = encode(torch.tensor([x], dtype=torch.float64), enc) * encode(torch.tensor([y], dtype=torch.float64), enc)
    got = decode(truncate(product, enc.scale), enc, torch.float64).item()
    assert abs(got - x * y) <= mul_error_bound(abs(x), abs(y), enc) + 1e-9


@settings(max_examples=300, deadline=None)
@given(v=st.integers(-(2**60), 2**60), d=st.integers(1, 2**20))
def test_truncate_rounds_to_nearest(v, d):
    got = truncate(torch.tensor([v]), d).item()
    assert abs(Fraction(got) - Fraction(v, d)) <= Fraction(1, 2)  # exact: v / d in floats is off by up to 1

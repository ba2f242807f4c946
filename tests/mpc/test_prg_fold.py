"""The dealer's fused stream arithmetic (veil.mpc.prg.expand_sum, subtract_streams) against the
separate expansions it replaces: bit-exact mod 2^64 (and for XOR), across piece boundaries."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from veil.mpc import prg, ring_numpy
from veil.mpc.prg import expand, expand_sum, new_seed, subtract_streams

PIECE = prg._FOLD_WORDS
#: lengths around the piece size and the 16-byte AES block (2 words), and a few odd shapes
SHAPES = [(1,), (2,), (3,), (PIECE - 1,), (PIECE,), (PIECE + 1,), (2 * PIECE + 3,), (5, 7, 3), (0, 4)]


def _sum(tensors, xor):
    total = tensors[0].clone()
    for t in tensors[1:]:
        total = total ^ t if xor else total + t
    return total


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("xor", [False, True], ids=["add", "xor"])
def test_expand_sum_is_the_sum_of_the_expansions(shape, n, xor):
    seeds = [new_seed() for _ in range(n)]
    got = expand_sum(seeds, "0/1", shape, xor)
    assert got.shape == shape and got.dtype == torch.int64
    assert torch.equal(got, _sum([expand(s, "0/1", shape) for s in seeds], xor))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 2])
@pytest.mark.parametrize("xor", [False, True], ids=["sub", "xor"])
def test_subtract_streams_leaves_the_last_share_in_place(shape, n, xor):
    seeds = [new_seed() for _ in range(n)]
    value = expand(new_seed(), "v", shape).clone()
    before = value.clone()
    got = subtract_streams(value, seeds, "0/2", xor)
    assert got is value  # in place: no tensor of the field's size besides the value
    others = [expand(s, "0/2", shape) for s in seeds]
    # the shares (others + the last) combine to the value again
    assert torch.equal(_sum(others + [got], xor), before)


INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
EDGES = st.sampled_from([-(1 << 63), (1 << 63) - 1, -1, 0, 1])


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(INT64, EDGES), min_size=1, max_size=300), n=st.integers(1, 3),
       xor=st.booleans(), data=st.data())
def test_fold_property_any_values_and_lengths(values, n, xor, data):
    """Any value (edge values: the wrap points of Z/2^64) minus any streams and plus them again is the value."""
    seeds = [bytes(data.draw(st.binary(min_size=32, max_size=32))) for _ in range(n)]
    value = torch.tensor(values, dtype=torch.int64)
    last = subtract_streams(value.clone(), seeds, "k/j", xor)
    assert torch.equal(_sum([expand(s, "k/j", value.shape) for s in seeds] + [last], xor), value)
    assert torch.equal(expand_sum(seeds, "k/j", value.shape, xor),
                       _sum([expand(s, "k/j", value.shape) for s in seeds], xor))


def test_a_broken_fold_is_caught(monkeypatch):
    """The tests above fail on a fold that drops a piece's stream (they are not vacuous)."""
    seeds = [new_seed(), new_seed()]
    good = expand_sum(seeds, "x", (PIECE + 5,))
    original = ring_numpy.add_

    calls = {"n": 0}

    def skip_second_piece(self, other):
        calls["n"] += 1
        return self if calls["n"] == 2 else original(self, other)

    monkeypatch.setattr(ring_numpy, "add_", skip_second_piece)
    bad = expand_sum(seeds, "x", (PIECE + 5,))
    monkeypatch.undo()
    assert not torch.equal(bad, good)


def test_subtract_streams_refuses_what_it_cannot_fold_in_place():
    with pytest.raises(ValueError, match="contiguous int64"):
        subtract_streams(torch.zeros(4, 4, dtype=torch.int64).t(), [new_seed()], "x")
    with pytest.raises(ValueError, match="contiguous int64"):
        subtract_streams(torch.zeros(4, dtype=torch.int32), [new_seed()], "x")
    with pytest.raises(ValueError, match="seed"):
        expand_sum([b"short"], "x", (3,))


def test_the_dealer_copies_a_derived_field_that_is_a_uniform_one_or_repeats():
    """A derive may return a uniform field itself (the comparison's R) or one tensor twice: corrected
    in place, it would change the uniform value or be corrected twice; each field's shares still add up."""
    from veil.mpc.providers.dealing_recipe import _corrections

    seeds = [new_seed(), new_seed(), new_seed()]
    shape = (PIECE + 3,)
    corrections = _corrections("test", [shape], [shape, shape], lambda u, g: [u[0], u[0]], frozenset(),
                               seeds, 1, None)
    uniform = _sum([expand(s, "0/0", shape) for s in seeds], False)
    for j, last in enumerate(corrections):
        assert torch.equal(_sum([expand(s, f"0/{1 + j}", shape) for s in seeds[:-1]] + [last], False), uniform)

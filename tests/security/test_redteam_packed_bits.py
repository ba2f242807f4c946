"""Red team of the comparison's packed openings (veil/mpc/bit_comparison.py): the AND levels' words compacted
several entries to a word (``cmp_and_open``) and the result bit ``b ^ rho`` packed 8 entries to a byte
(``cmp_bit_open``). A hostile serving owner feeds a client's input share into them and tries to open it under
masks that do not cover every bit (broadcast, inline, reused, named twice) or with a layout it picks."""

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.bit_comparison import compact_words
from veil.mpc.material import AND_LEVELS, ComparisonLayout
from veil.mpc.truncation import unpack_top_bits

from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _KEPT, _open, _ref, _setup, comparison_fields

NAME = "cmp_bit_open"
LAST = AND_LEVELS - 1
LAY = ComparisonLayout(1)


@pytest.fixture
def served(hook, request):
    return _setup(hook, f"rpb{request.node.name[-14:]}", SECRET)


def _material(dealer, a, b, shape=SHAPE):
    return comparison_fields(dealer, a, b, 1, shape)


def _args(f, rho):
    """The client's input as the comparison's state and public X: whatever it holds, the packed bit is
    masked by rho alone."""
    x = m.ObjectRef(BATCH)
    opened = torch.zeros(compact_words(LAST, SECRET.numel()), dtype=torch.int64)  # the last level's word, compacted
    return ([x, x], opened, *(f[i] for i in LAY.triple(LAST)), *(f[i] for i in LAY.products(LAST)), x, f[LAY.r_xor],
            rho, True)


def test_honest_use_opens_one_masked_bit_per_entry(served):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    (packed,) = _open(owner, a, NAME, *_args(f, f[LAY.rho]))
    n = SECRET.numel()
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((n + 7) // 8,)
    assert set(unpack_top_bits(packed, n).tolist()) <= {0, 1}


def test_a_broadcast_rho_does_not_hide_every_bit(served):
    """A uniform but one-entry rho would mask every bit with the same bit (their XORs would open): the
    output then holds more bits than the mask has entries."""
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    small = _material(dealer, a, b, (1, 1))
    with pytest.raises(VeilError, match="shape"):  # (3 bits and 1 mask entry: both fit one byte)
        _open(owner, a, NAME, *_args(f, small[LAY.rho]))


@pytest.mark.parametrize("mask", ["inline zeros", "non-uniform field", "reused AND mask"])
def test_rho_must_be_a_fresh_dealt_field(served, mask):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    _KEPT.append(pair)
    rho = {"inline zeros": torch.zeros(SHAPE, dtype=torch.int64),
           "non-uniform field": _ref(pair[a.id][2]),  # g: almost always 0
           "reused AND mask": f[LAY.triple(LAST)[0]]}[mask]
    with pytest.raises(PermissionDeniedError, match="argument 9" if mask != "reused AND mask" else "also an operand"):
        _open(owner, a, NAME, *_args(f, rho))


def test_the_worker_still_serves_after_refusals(served):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    with pytest.raises(VeilError):
        _open(owner, a, NAME, *_args(f, torch.zeros(SHAPE, dtype=torch.int64)))
    (packed,) = _open(owner, a, NAME, *_args(f, f[LAY.rho]))
    assert packed.dtype == torch.uint8


def _and_args(f, level, a=None, state=None):
    x = m.ObjectRef(BATCH)
    a_, b1, b2 = (f[i] for i in LAY.triple(level))
    return (state or [x, x], a or a_, b1, b2, level, True)


@pytest.mark.parametrize("level", range(AND_LEVELS))
def test_an_and_level_opens_its_compacted_word(served, level):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    (word,) = _open(owner, a, "cmp_and_open", *_and_args(f, level))
    assert word.dtype == torch.int64 and tuple(word.shape) == (compact_words(level, SECRET.numel()),)


def test_a_broadcast_and_mask_is_refused_by_the_step(served):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    small = _material(dealer, a, b, (1, 1))
    with pytest.raises(VeilError, match="shape"):
        _open(owner, a, "cmp_and_open", *_and_args(f, 0, a=small[LAY.triple(0)[0]]))


@pytest.mark.parametrize("level", [AND_LEVELS, -1, "0", 0.0])
def test_a_level_outside_the_circuit_is_refused(served, level):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    with pytest.raises(VeilError):
        _open(owner, a, "cmp_and_open", *_and_args(f, 0)[:4], level, True)


def test_an_and_mask_in_the_state_too_is_refused(served):
    """The state's eq := a beside the mask a: eq_hi ^ a would cancel wherever the shift lines bits up."""
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    mask = f[LAY.triple(0)[0]]
    with pytest.raises(PermissionDeniedError, match="also an operand"):
        _open(owner, a, "cmp_and_open", *_and_args(f, 0, state=[m.ObjectRef(BATCH), mask]))

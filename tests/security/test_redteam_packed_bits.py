"""Red team of the comparison's packed openings (veil/mpc/bit_comparison.py): the AND levels' words compacted
several entries to a word (``cmp_and_open``), the last level's holding the result's top operand ``lt_hi ^ rho``.
A hostile serving owner feeds a client's input share into them and tries to open it under masks that do not
cover every bit (broadcast, inline, reused, named twice) or with a layout it picks."""

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.bit_comparison import COMPACT, compact_words
from veil.mpc.material import AND_LEVELS, ComparisonLayout

from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _KEPT, _open, _ref, _setup, comparison_fields

NAME = "cmp_and_open"
LAST = AND_LEVELS - 1
LAY = ComparisonLayout(1)


@pytest.fixture
def served(hook, request):
    return _setup(hook, f"rpb{request.node.name[-14:]}", SECRET)


def _material(dealer, a, b, shape=SHAPE):
    return comparison_fields(dealer, a, b, 1, shape)


def _last_args(f, rho=None, b1=None):
    """The client's input as the comparison's state at the last level: whatever it holds, each entry's three
    opened bits are masked by a, b1 and rho (the last level's b2)."""
    x = m.ObjectRef(BATCH)
    a_, b1_, rho_ = (f[i] for i in LAY.triple(LAST))
    return ([x, x], a_, b1_ if b1 is None else b1, rho_ if rho is None else rho, LAST, True)


def test_honest_use_opens_three_masked_bits_per_entry(served):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    (word,) = _open(owner, a, NAME, *_last_args(f))
    n = SECRET.numel()
    assert word.dtype == torch.int64 and tuple(word.shape) == (compact_words(LAST, n),)
    lanes = sum(7 << (3 * i) for i in range(COMPACT[LAST]))  # 3 bits per entry, nothing else
    assert torch.all(word & ~lanes == 0)


@pytest.mark.parametrize("which", ["rho", "b1"])
def test_a_broadcast_mask_does_not_hide_every_bit(served, which):
    """A uniform but one-entry rho (or b1) would mask every entry's bit with the same bit (their XORs would
    open): the step refuses masks smaller than the compared entries."""
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    small = _material(dealer, a, b, (1, 1))
    position = {"rho": LAY.rho, "b1": LAY.triple(LAST)[1]}[which]
    with pytest.raises(VeilError, match="shape"):
        _open(owner, a, NAME, *_last_args(f, **{which: small[position]}))


@pytest.mark.parametrize("mask", ["inline zeros", "non-uniform field", "reused AND mask"])
def test_rho_must_be_a_fresh_dealt_field(served, mask):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    _KEPT.append(pair)
    rho = {"inline zeros": torch.zeros(SHAPE, dtype=torch.int64),
           "non-uniform field": _ref(pair[a.id][2]),  # g: almost always 0
           "reused AND mask": f[LAY.triple(LAST)[0]]}[mask]
    with pytest.raises(PermissionDeniedError, match="argument 3" if mask != "reused AND mask" else "twice"):
        _open(owner, a, NAME, *_last_args(f, rho))


def test_the_worker_still_serves_after_refusals(served):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    with pytest.raises(VeilError):
        _open(owner, a, NAME, *_last_args(f, torch.zeros(SHAPE, dtype=torch.int64)))
    (word,) = _open(owner, a, NAME, *_last_args(f))
    assert tuple(word.shape) == (compact_words(LAST, SECRET.numel()),)


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

"""Red team of the comparison's packed openings (veil/mpc/bit_comparison.py): the AND levels' words compacted
several entries to a word (``cmp_and_open``; the quad level's variables packed 16 entries to a word,
``cmp_quad_open``), the last level's holding the result's top operand ``lt_hi ^ rho``.
A hostile serving owner feeds a client's input share into them and tries to open it under masks that do not
cover every bit (broadcast, inline, reused, named twice) or with a layout it picks."""

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.bit_comparison import COMPACT, compact_words, opened_words
from veil.mpc.comparison_material import AND_LEVELS, ComparisonLayout

from tests.security.test_redteam_dealt import (BATCH, SECRET, SHAPE, _KEPT, _cmd, _open, _ref, _setup,
                                              comparison_fields, group_state)

NAME = "cmp_and_open"
LAST = AND_LEVELS - 1
LAY = ComparisonLayout(1)


@pytest.fixture
def served(hook, request):
    a, b, owner, dealer = _setup(hook, f"rpb{request.node.name[-14:]}", SECRET)
    group_state(owner, a)
    return a, b, owner, dealer


def _material(dealer, a, b, shape=SHAPE):
    return comparison_fields(dealer, a, b, 1, shape)


def _last_args(f, rho=None, b1=None):
    """The client's input as the comparison's state at the last level: whatever it holds, each entry's three
    opened bits are masked by a, b1 and rho (the last level's b2)."""
    x = m.ObjectRef(BATCH)
    a_, b1_, rho_ = (f[i] for i in LAY.level_masks(LAST))
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
    position = {"rho": LAY.rho, "b1": LAY.level_masks(LAST)[1]}[which]
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
           "reused AND mask": f[LAY.level_masks(LAST)[0]]}[mask]
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
    a_, b1, b2 = (f[i] for i in LAY.level_masks(level))
    return (state or [x, x], a or a_, b1, b2, level, True)


def _quad_args(f, mask=None, state=None):
    x = m.ObjectRef(7002)  # the client's input as a group-layout state (group_state, made by the served fixture)
    return (state or [x, x], f[LAY.level_masks(0)[0]] if mask is None else mask)


def test_the_quad_level_opens_its_packed_variables_masked(served):
    """7 rows (the quad's four eq and lower three lt) of one packed word for 3 entries, under one mask of that
    shape: with the client's input as both lt and eq, the opened rows differ from its packed bits."""
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    (opened,) = _open(owner, a, "cmp_quad_open", *_quad_args(f))
    assert opened.dtype == torch.int64 and tuple(opened.shape) == (7, 1)
    assert opened_words(0, SECRET.numel()) == 7


@pytest.mark.parametrize("level", range(1, AND_LEVELS))
def test_an_and_level_opens_its_compacted_word(served, level):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    (word,) = _open(owner, a, "cmp_and_open", *_and_args(f, level))
    assert word.dtype == torch.int64 and tuple(word.shape) == (compact_words(level, SECRET.numel()),)


@pytest.mark.parametrize("which", ["quad", "quad inline", "and a"])
def test_a_broadcast_and_mask_is_refused(served, which):
    """The quad level's mask covers 16 entries per word: the client's input as an 8-word state packs to 2 words
    per row, which a mask of 3 entries' material (1 word per row) would hide with the same bits."""
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    small = _material(dealer, a, b, (1, 1))
    _cmd(owner, a, "torch.cat", ([m.ObjectRef(7002), m.ObjectRef(7002)],), [7300])
    wide = [m.ObjectRef(7300), m.ObjectRef(7300)]
    step, args = {"quad": ("cmp_quad_open", _quad_args(f, state=wide)),
                  # (7, 2) zeros: the monitor refuses anything but a dealt field before the step runs
                  "quad inline": ("cmp_quad_open", _quad_args(f, mask=torch.zeros((7, 2), dtype=torch.int64),
                                                              state=wide)),
                  "and a": ("cmp_and_open", _and_args(f, 1, a=small[LAY.level_masks(1)[0]]))}[which]
    with pytest.raises(VeilError, match="shape|dealt"):
        _open(owner, a, step, *args)
    (opened,) = _open(owner, a, "cmp_quad_open", *_quad_args(_material(dealer, a, b)))  # still serving
    assert tuple(opened.shape) == (7, 1)


@pytest.mark.parametrize("level", [AND_LEVELS, 0, -1, "1", 1.0, True])
def test_a_level_outside_the_binary_levels_is_refused(served, level):
    """Level 0 is the quad level, whose word has another layout: ``cmp_and_open`` opens levels 1 .. LAST."""
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    with pytest.raises(VeilError):
        _open(owner, a, "cmp_and_open", *_and_args(f, 1)[:4], level, True)


@pytest.mark.parametrize("step", ["cmp_quad_open", "cmp_and_open"])
def test_an_and_mask_in_the_state_too_is_refused(served, step):
    """The state's eq := a beside the mask a: eq ^ a (eq_hi ^ a) would cancel wherever the bits line up."""
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    if step == "cmp_quad_open":
        args = _quad_args(f, state=[m.ObjectRef(7002), f[LAY.level_masks(0)[0]]])  # (7, 1) beside the 4 words
    else:
        args = _and_args(f, 1, state=[m.ObjectRef(BATCH), f[LAY.level_masks(1)[0]]])
    with pytest.raises(PermissionDeniedError, match="also an operand"):
        _open(owner, a, step, *args)

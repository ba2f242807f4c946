"""Red team of ``cmp_quad_open_values`` (truncation folded into ReLU, veil/mpc/bit_comparison.py): a hostile
serving owner tries to open a client's input share through the value slot of the mixed opening."""

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError

from veil.messaging import messages as m

from tests.security.test_redteam_dealt import (BATCH, SECRET, SHAPE, _KEPT, _open, _ref, _setup, comparison_fields,
                                              group_state)

NAME = "cmp_quad_open_values"


@pytest.fixture
def served(hook, request):
    a, b, owner, dealer = _setup(hook, f"rov{request.node.name[-14:]}", SECRET)
    group_state(owner, a)
    return a, b, owner, dealer


def _material(dealer, a, b, shape=SHAPE):
    return comparison_fields(dealer, a, b, 2, shape)


def _state(fields):
    # the client's input as a group-layout state (group_state): the quad variables are masked whatever they hold
    return [m.ObjectRef(7002), m.ObjectRef(7002)]


def test_honest_use_opens_a_uniformly_masked_value(served):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    word, opened = _open(owner, a, NAME, _state(f), f[2], [m.ObjectRef(BATCH)], [f[1]])
    assert opened.shape == SHAPE and not torch.equal(opened, SECRET) and word.shape == (7, 1)


@pytest.mark.parametrize("mask", ["inline zero", "none", "non-uniform field", "reused AND mask"])
def test_the_value_slot_needs_its_own_fresh_dealt_mask(served, mask):
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    _KEPT.append(pair)
    masks = {"inline zero": [torch.zeros(SHAPE, dtype=torch.int64)], "none": [],
             "non-uniform field": [_ref(pair[a.id][2])],  # g: almost always 0
             "reused AND mask": [f[2]]}[mask]
    with pytest.raises(PermissionDeniedError, match="argument 3"):
        _open(owner, a, NAME, _state(f), f[2], [m.ObjectRef(BATCH)], masks)


def test_a_broadcast_mask_does_not_hide_a_value(served):
    """The monitor pairs outputs with masks in order (the value's output with r_1): a uniform but smaller
    r_1 would broadcast and hide only differences; the step itself refuses it."""
    a, b, owner, dealer = served
    f = _material(dealer, a, b)
    small = _material(dealer, a, b, (1, 1))
    with pytest.raises(VeilError, match="shapes"):
        _open(owner, a, NAME, _state(f), f[2], [m.ObjectRef(BATCH)], [small[1]])


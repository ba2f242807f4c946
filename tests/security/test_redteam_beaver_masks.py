"""Red team of ``beaver_masks``, several Beaver products opened in one round (veil/mpc/beaver.py, used by
veil/tensors/pending_products.py): a hostile serving owner against a client's input share (the fixture
of test_redteam_dealt.py: party ``a`` holds the client's share, claimed into BATCH).

The step takes four lists (operands x and y, masks a and b) and opens every ``x_k - a_k``, then every
``y_k - b_k``. Each attack tries to get an output that is not hidden by a fresh uniform mask of its own
shape: a mask reused across products or between a product's two operands, a list of masks shorter than
the operands, derived fields or inline values as masks, a broadcast mask, the client's value as a mask,
and a mask spent by an earlier opening. Each is refused and the worker still serves an honest opening.
"""

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.ring import DTYPE

from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _open, _ref, served  # noqa: F401

X = m.ObjectRef(BATCH)
_KEPT: list = []  # dealt items' pointers: dropping one deletes its fields on the party


def _triples(dealer, a, b, n=2, shape=SHAPE):
    """Party a's fields (a, b, c) of ``n`` fresh elementwise triples."""
    out = []
    for _ in range(n):
        ptrs = dealer.beaver_triples("mul", shape, shape, [a.id, b.id])
        _KEPT.append(ptrs)
        out.append([_ref(p) for p in ptrs[a.id]])
    return out


def _honest_opening_still_works(owner, a, dealer, b):
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    opened = _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, a2], [b1, b2])
    assert len(opened) == 4 and all(tuple(t.shape) == SHAPE and not torch.equal(t, SECRET) for t in opened)


def test_honest_products_open_masked(served):
    a, b, owner, dealer = served
    _honest_opening_still_works(owner, a, dealer, b)


def test_a_mask_shared_by_two_products_is_refused(served):
    """(x - a, x' - a) gives x - x'; a product's a reused as the other's b likewise."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    for masks in (([a1, a1], [b1, b2]), ([a1, a2], [b1, a1]), ([a1, a2], [b2, b2])):
        with pytest.raises(PermissionDeniedError, match="twice"):
            _open(owner, a, "beaver_masks", [X, X], [X, X], *masks)
    _honest_opening_still_works(owner, a, dealer, b)


def test_fewer_masks_than_operands_are_refused(served):
    """Masks for one product and operands for two: the unmasked outputs would be the client's share."""
    a, b, owner, dealer = served
    ((a1, b1, _),) = _triples(dealer, a, b, n=1)
    with pytest.raises((PermissionDeniedError, VeilError)):
        _open(owner, a, "beaver_masks", [X, X], [X, X], [a1], [b1])
    with pytest.raises((PermissionDeniedError, VeilError)):
        _open(owner, a, "beaver_masks", [X, X], [X], [a1], [b1])
    _honest_opening_still_works(owner, a, dealer, b)


@pytest.mark.parametrize("bad", ["c", "inline", "client", "broadcast"])
def test_a_mask_that_is_not_a_fresh_uniform_field_of_its_shape_is_refused(served, bad):
    a, b, owner, dealer = served
    (a1, b1, c1), (a2, b2, _) = _triples(dealer, a, b)
    wide = _triples(dealer, a, b, n=1, shape=(1,))[0][0]
    mask = {"c": c1, "inline": torch.zeros(SHAPE, dtype=DTYPE), "client": X, "broadcast": wide}[bad]
    with pytest.raises(PermissionDeniedError):
        _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, mask], [b1, b2])
    _honest_opening_still_works(owner, a, dealer, b)


def test_a_mask_spent_by_an_earlier_opening_is_refused(served):
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    _open(owner, a, "beaver_mask", X, X, a1, b1)
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, a2], [b1, b2])
    _honest_opening_still_works(owner, a, dealer, b)


def test_malformed_lists_are_clear_errors(served):
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    for args in (([], [], [], []), (X, X, a1, b1), ([X, X], [X, X], [a1, a2], (b1, b2))):
        with pytest.raises(VeilError):
            _open(owner, a, "beaver_masks", *args)
    _honest_opening_still_works(owner, a, dealer, b)

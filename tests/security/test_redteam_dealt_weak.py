"""Red team of weakly held dealt items (``veil/workers/dealt.py``: an item refers to its fields' entries
weakly, so used material is freed by refcount): a hostile serving owner against a client's input share
(the fixture of test_redteam_dealt.py: party ``a`` holds the client's share, claimed into BATCH).

A mask used twice reveals the difference of what it masked; a field of an item bound to the client and
revealed elsewhere reveals what its mask hid. Attacks: delete a field's entry and reuse its id, copy or
alias a field (``clone``, ``contiguous``, which returns the very tensor), copy a mask after it opened, and
free the whole item then ask again. Each holds: binding reaches every live field and every alias, a
copy is never a mask, a freed field is gone for good.
"""

import gc
import weakref

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.ring import DTYPE

from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _cmd, _open, _ref, served  # noqa: F401

X = m.ObjectRef(BATCH)
ZEROS = torch.zeros(SHAPE, dtype=DTYPE)


def _triple(dealer, a, b):
    """Party a's fields (a, b, c) of a fresh elementwise Beaver triple, and the pointers that keep them."""
    ptrs = dealer.beaver_triples("mul", SHAPE, SHAPE, [a.id, b.id])
    return [_ref(p) for p in ptrs[a.id]], ptrs


def _delete(owner, party, *ids):
    owner.send_msg(m.DeleteMessage(list(ids)), party)


def _entry(party, oid):
    return party.monitor._find(party.principal(party.id), oid)


def test_a_deleted_field_does_not_stop_binding_and_its_id_is_no_mask(served):
    a, b, owner, dealer = served
    (fa, fb, fc), keep = _triple(dealer, a, b)
    _delete(owner, a, fc.id)  # c gone before the item's first use
    assert _entry(a, fc.id) is None
    e, f = _open(owner, a, "beaver_mask", X, X, fa, fb)  # binds the item to the client
    assert e.shape == SHAPE and not torch.equal(e, SECRET)
    # b, still held, is the client's now: opening it without a fresh mask is refused
    with pytest.raises(PermissionDeniedError, match="protected"):
        _open(owner, a, "trunc_mask", fb, ZEROS)
    # c's id, reused for the owner's own tensor: a plain object, never a mask
    owner.send_msg(m.ObjectMessage([m.StoredObject(fc.id, ZEROS.clone())]), a)
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    with pytest.raises(PermissionDeniedError, match="dealer material|dealt"):
        _open(owner, a, "beaver_mask", X, X, fc, _ref(pair[a.id][0]))
    del keep


@pytest.mark.parametrize("op", ["Tensor.clone", "Tensor.contiguous", "Tensor.detach"])
def test_a_copy_or_alias_of_a_mask_is_bound_and_never_a_mask(served, op):
    """The copy is a use: the item binds (to the owner's taint: the client) before the op runs, so the copy
    inherits the restriction; with the original freed, the copy is still no mask and still not revealable."""
    a, b, owner, dealer = served
    (fa, fb, fc), keep = _triple(dealer, a, b)
    _cmd(owner, a, op, (fa,), [7101])
    copy = m.ObjectRef(7101)
    assert _entry(a, 7101).reveal_to is not None and _entry(a, fa.id).reveal_to is not None
    _delete(owner, a, fa.id)
    with pytest.raises(PermissionDeniedError, match="uniform|derived"):
        _open(owner, a, "beaver_mask", X, X, copy, fb)
    with pytest.raises(PermissionDeniedError, match="protected"):
        _open(owner, a, "trunc_mask", copy, ZEROS)
    with pytest.raises(VeilError):  # dealt material is never revealed
        owner.send_msg(m.GetObjectsMessage([7101], False), a)
    del keep


def test_a_copy_of_an_opened_mask_does_not_open_a_second_value(served):
    """``x - a`` opened, then ``a' = a.clone()`` as the mask of ``x'``: ``(x - a) - (x' - a')`` would be ``x - x'``."""
    a, b, owner, dealer = served
    (fa, fb, fc), keep = _triple(dealer, a, b)
    (e,) = _open(owner, a, "fixed_mask", X, fa)
    assert not torch.equal(e, SECRET)
    _cmd(owner, a, "Tensor.clone", (fa,), [7201])
    _delete(owner, a, fa.id)  # the original's entry (with its "opened" mark) is gone
    _cmd(owner, a, "Tensor.add", (X, 1), [7202])
    for mask in (m.ObjectRef(7201), fa):
        with pytest.raises((PermissionDeniedError, VeilError)):
            _open(owner, a, "fixed_mask", m.ObjectRef(7202), mask)
    del keep


def test_a_freed_item_is_gone_and_a_new_deal_is_fresh(served):
    a, b, owner, dealer = served
    (fa, fb, fc), keep = _triple(dealer, a, b)
    _open(owner, a, "beaver_mask", X, X, fa, fb)
    fields = [weakref.ref(_entry(a, r.id)) for r in (fa, fb, fc)]
    _delete(owner, a, fa.id, fb.id, fc.id)
    gc.collect()
    assert all(f() is None for f in fields)  # nothing keeps a field's entry alive behind the store
    for ref in (fa, fb):
        with pytest.raises(VeilError):
            _open(owner, a, "fixed_mask", X, ref)
    (ga, gb, gc_), keep2 = _triple(dealer, a, b)  # fresh ids, fresh values, unbound
    e, _ = _open(owner, a, "beaver_mask", X, X, ga, gb)
    assert e.shape == SHAPE
    del keep, keep2

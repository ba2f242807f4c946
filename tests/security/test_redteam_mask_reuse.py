"""Red team: a dealt mask, or the dealer's fields derived from it, computed with before the opening it hides.

A hostile serving owner holds a client's input share (BATCH) on party ``a`` and dealt material it asked for.
It moves mask bits into an operand first, with a torch command, so that the opening that mask hides cancels
them: ``X - r`` opened by ``trunc_mask`` under ``r`` is ``X``; ``(X >> k) ^ b1`` as the last AND level's
``lt`` opens bit ``k`` of ``X`` under ``b1``; the select table (derived from the last level's ``a, b1,
rho``) as ``lt`` cancels ``rho`` and opens ``X``'s bit 0 under ``a``. A computation now spends the masks it
uses, directly or through a derived field (``veil.workers.dealt.consume``). A meta tensor (no data) is never
stored, so a step's shape-inference branch cannot hand back uninitialized memory. The worker keeps serving.
"""

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.comparison_material import AND_LEVELS, ComparisonLayout
from veil.mpc.ring import DTYPE

from tests.security.test_redteam_dealt import (BATCH, SECRET, SHAPE, _KEPT, _cmd, _open, _ref, _setup,
                                              comparison_fields, group_state)

X = m.ObjectRef(BATCH)
LAST = AND_LEVELS - 1
LAY = ComparisonLayout(1)


@pytest.fixture
def served(hook, request):
    return _setup(hook, f"rmr{request.node.name[-14:]}", SECRET)


def _serves(owner, a, dealer, b):
    """The worker still opens an honest truncation mask over the client's input (nothing leaked by it)."""
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    _KEPT.append(pair)
    (opened,) = _open(owner, a, "trunc_mask", X, _ref(pair[a.id][0]))
    assert opened.shape == SECRET.shape and not torch.equal(opened, SECRET)


def test_a_mask_used_in_a_command_masks_nothing_after(served):
    a, b, owner, dealer = served
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    _KEPT.append(pair)
    r = _ref(pair[a.id][0])
    _cmd(owner, a, "torch.sub", (X, r), [6001])  # X - r: allowed, but r is spent
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "trunc_mask", m.ObjectRef(6001), r)  # would open X itself
    _serves(owner, a, dealer, b)


@pytest.mark.parametrize("bit", [0, 5])
def test_an_and_mask_moved_into_the_state_is_refused(served, bit):
    a, b, owner, dealer = served
    f = comparison_fields(dealer, a, b, 1)
    a_, b1, rho = (f[i] for i in LAY.level_masks(LAST))
    _cmd(owner, a, "torch.floor_divide", (X, 2 ** bit), [6100])
    _cmd(owner, a, "Tensor.__xor__", (m.ObjectRef(6100), b1), [6101])  # lt = (X >> bit) ^ b1
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "cmp_and_open", [m.ObjectRef(6101), m.ObjectRef(6100)], a_, b1, rho, LAST, True)
    _serves(owner, a, dealer, b)


def test_the_select_table_in_the_state_spends_rho(served):
    """Row 0 of the table is rho ^ (a & b1): as lt (bit 32, lt_hi at the last level) it would cancel rho."""
    a, b, owner, dealer = served
    item = dealer.comparison_material(SHAPE, 1, [a.id, b.id])
    _KEPT.append(item)
    f = [_ref(x) for x in item[a.id]]
    ma, mb1, mrho = (f[i] for i in LAY.level_masks(LAST))
    _cmd(owner, a, "Tensor.__getitem__", (f[LAY.table], 0), [6200])
    _cmd(owner, a, "Tensor.__mul__", (m.ObjectRef(6200), 2 ** 32), [6201])
    _cmd(owner, a, "Tensor.__mul__", (X, 2 ** 32), [6202])
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "cmp_and_open", [m.ObjectRef(6201), m.ObjectRef(6202)], ma, mb1, mrho, LAST, True)
    # an AND level's products spend that level's masks too (c1 = a & b1; the quad products of a and b)
    lo = comparison_fields(dealer, a, b, 1)
    _cmd(owner, a, "Tensor.__xor__", (X, lo[LAY.level_products(1)[0]]), [6203])
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "cmp_and_open", [m.ObjectRef(6203), X], *(lo[i] for i in LAY.level_masks(1)), 1, True)
    quad = comparison_fields(dealer, a, b, 1)
    state = group_state(owner, a)  # the client's input as a group-layout state (4 words)
    _cmd(owner, a, "Tensor.__getitem__", (quad[LAY.level_products(0)[0]], 0), [6204])  # mask rows 0 & 1
    _cmd(owner, a, "Tensor.__xor__", (state, m.ObjectRef(6204)), [6205])
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "cmp_quad_open", [m.ObjectRef(6205), state], quad[LAY.level_masks(0)[0]])
    _serves(owner, a, dealer, b)


@pytest.mark.parametrize("step", ["cmp_select", "cmp_and_next", "cmp_quad_next"])
def test_a_meta_tensor_is_never_stored(hook, step):
    """A meta operand sends a step down its shape-inference branch; what comes back is never a real
    tensor's uninitialized memory (another requester's freed data): nothing is stored."""
    import veil as sy

    a, victim, sci = (sy.VirtualWorker(hook, id=f"rmr-{step}-{n}") for n in ("a", "victim", "sci"))
    pattern, n = 0x5EC2E75EC2E75EC2, 1000
    victim.send_msg(m.ObjectMessage([m.StoredObject(9000, torch.full((n,), pattern, dtype=DTYPE))]), a)
    victim.send_msg(m.DeleteMessage([9000]), a)
    with pytest.raises(VeilError, match="meta"):
        sci.send_msg(m.CommandMessage("torch.zeros", (1,), {"device": "meta", "dtype": DTYPE}, [8000]), a)
    real = torch.zeros(n, dtype=DTYPE)
    args = {"cmp_select": (m.ObjectRef(8000), [], [], torch.zeros((4, n), dtype=DTYPE), [], True),
            "cmp_and_next": ([real, real], m.ObjectRef(8000), real, real, real, real, real, 1, True),
            "cmp_quad_next": ([real[:252], real[:252]], m.ObjectRef(8000), torch.zeros((7, 63), dtype=DTYPE),
                              torch.zeros((22, 63), dtype=DTYPE), [n], True)}[step]
    with pytest.raises(VeilError):
        sci.send_msg(m.CommandMessage(f"veil.mpc.{step}", args, {}, [8100]), a)
    with pytest.raises(VeilError):
        sci.send_msg(m.GetObjectsMessage([8100]), a)
    ok = sci.send_msg(m.CommandMessage("torch.ones", (3,), {"dtype": DTYPE}, [8200]), a)  # still serving
    assert ok is not None


def test_a_truncation_pairs_quotient_spends_its_mask(served):
    """``q = floor(r / d)`` is additively shared like ``r``: ``X - d q`` opened under ``r`` (at every party,
    summed) would be ``X + (r mod d)``, all of ``X`` but its low bits. Using ``q`` spends ``r``."""
    a, b, owner, dealer = served
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    _KEPT.append(pair)
    r, q = _ref(pair[a.id][0]), _ref(pair[a.id][1])
    _cmd(owner, a, "torch.mul", (q, 2 ** 16), [6300])
    _cmd(owner, a, "torch.sub", (X, m.ObjectRef(6300)), [6301])
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "trunc_mask", m.ObjectRef(6301), r)
    _serves(owner, a, dealer, b)

"""Red team of fixed-operand products (veil/mpc/fixed_operand.py): a hostile serving owner against a client's
input share, with a weight's fixed mask ``b`` whose ``w - b`` the owner may open once.

The owner knows ``w`` (its model), so ``b`` is as good as public to it: ``b`` must never hide anything
else (``x - b`` would be ``x``), and ``fixed_open`` must open one value per fixed mask.
"""

import secrets

import pytest
import torch

from veil.exceptions import PermissionDeniedError
from veil.messaging import messages as m
from veil.mpc.ring import DTYPE

from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _cmd, _open, _ref, _setup

_KEEP: list = []  # dealt items' pointers: dropping one deletes its fields on the party
WEIGHT = 6101  # the owner's own object on party a (its weight share, which it may reveal)


@pytest.fixture
def served(hook, request):
    a, b, owner, dealer = _setup(hook, f"rfo{request.node.name[-14:]}", SECRET)
    owner.send_msg(m.ObjectMessage([m.StoredObject(WEIGHT, torch.arange(3, dtype=DTYPE).view(SHAPE))]), a)
    return a, b, owner, dealer


def _fixed(dealer, a, b):
    """Party a's share of a fresh fixed mask, and of one (a, c = a * b) triple for it."""
    fid = secrets.token_hex(16)  # the provider keeps each id's b for good (one process: fresh ids per test)
    mask = dealer.fixed_operand_mask(fid, SHAPE, [a.id, b.id])
    triple = dealer.fixed_operand_triples(fid, "mul", SHAPE, SHAPE, [a.id, b.id])
    _KEEP.extend([mask, triple])
    return _ref(mask[a.id][0]), [_ref(t) for t in triple[a.id]]


def test_honest_use_opens_w_minus_b_once_then_masked_inputs(served):
    a, b, owner, dealer = served
    fb, (fa, fc) = _fixed(dealer, a, b)
    (f,) = _open(owner, a, "fixed_open", m.ObjectRef(WEIGHT), fb)
    assert f.shape == SHAPE
    (e,) = _open(owner, a, "fixed_mask", m.ObjectRef(BATCH), fa)  # the client's input, masked by a fresh a
    assert e.shape == SHAPE and not torch.equal(e, SECRET)


def test_a_fixed_mask_opens_one_value_only(served):
    """``w - b`` then ``w' - b`` gives ``w' - w``: the second opening is refused, whatever ``w'`` is."""
    a, b, owner, dealer = served
    fb, _ = _fixed(dealer, a, b)
    _open(owner, a, "fixed_open", m.ObjectRef(WEIGHT), fb)
    _cmd(owner, a, "Tensor.add", (m.ObjectRef(WEIGHT), 1), [6102])
    with pytest.raises(PermissionDeniedError, match="already opened"):
        _open(owner, a, "fixed_open", m.ObjectRef(6102), fb)


def test_fixed_open_never_opens_a_client_value(served):
    """``x - b`` with ``b`` known to the owner is ``x``: fixed_open has no mask rule, so it refuses protected values
    (and the refusal consumes nothing: the honest opening still runs)."""
    a, b, owner, dealer = served
    fb, _ = _fixed(dealer, a, b)
    with pytest.raises(PermissionDeniedError, match="protected"):
        _open(owner, a, "fixed_open", m.ObjectRef(BATCH), fb)
    (f,) = _open(owner, a, "fixed_open", m.ObjectRef(WEIGHT), fb)
    assert f.shape == SHAPE


@pytest.mark.parametrize("step", ["fixed_mask", "trunc_mask", "beaver_mask"])
def test_a_fixed_mask_is_no_mask_of_another_opening(served, step):
    """Before or after its own opening, ``b`` may not hide a client's input anywhere else."""
    a, b, owner, dealer = served
    fb, (fa, _) = _fixed(dealer, a, b)
    args = {"fixed_mask": (m.ObjectRef(BATCH), fb), "trunc_mask": (m.ObjectRef(BATCH), fb),
            "beaver_mask": (m.ObjectRef(BATCH), m.ObjectRef(BATCH), fb, fa)}[step]
    with pytest.raises(PermissionDeniedError, match="fixed mask"):
        _open(owner, a, step, *args)
    _open(owner, a, "fixed_open", m.ObjectRef(WEIGHT), fb)
    with pytest.raises(PermissionDeniedError, match="fixed mask"):
        _open(owner, a, step, *args)


def test_a_fixed_mask_is_not_opened_unmasked_elsewhere(served):
    """No protected value, so no mask rule: still, a fixed mask opens only in fixed_open."""
    a, b, owner, dealer = served
    fb, _ = _fixed(dealer, a, b)
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    _KEEP.append(pair)
    with pytest.raises(PermissionDeniedError, match="fixed mask"):
        _open(owner, a, "trunc_mask", fb, _ref(pair[a.id][0]))


@pytest.mark.parametrize("what", ["uniform mask", "derived c", "inline zero", "two fixed masks"])
def test_fixed_open_needs_one_fixed_mask_at_its_position(served, what):
    a, b, owner, dealer = served
    fb, (fa, fc) = _fixed(dealer, a, b)
    other, _ = _fixed(dealer, a, b)
    w, mask = {"uniform mask": (m.ObjectRef(WEIGHT), fa), "derived c": (m.ObjectRef(WEIGHT), fc),
               "inline zero": (m.ObjectRef(WEIGHT), torch.zeros(SHAPE, dtype=DTYPE)),
               "two fixed masks": (other, fb)}[what]
    with pytest.raises(PermissionDeniedError, match="fixed"):
        _open(owner, a, "fixed_open", w, mask)


def test_the_per_product_mask_is_single_use_and_c_is_no_mask(served):
    """``fixed_mask`` follows the ordinary rules: a fresh uniform ``a`` once; the derived ``c`` never."""
    a, b, owner, dealer = served
    fb, (fa, fc) = _fixed(dealer, a, b)
    _open(owner, a, "fixed_open", m.ObjectRef(WEIGHT), fb)
    _open(owner, a, "fixed_mask", m.ObjectRef(BATCH), fa)
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "fixed_mask", m.ObjectRef(BATCH), fa)
    with pytest.raises(PermissionDeniedError, match="derived"):
        _open(owner, a, "fixed_mask", m.ObjectRef(BATCH), fc)


def test_the_triple_binds_to_the_client_it_masked(served):
    """After ``x - a`` for a client's ``x``, the item's derived ``c = a * b`` (``b`` known to the owner) is the
    client's too: opening it without a fresh mask is refused."""
    a, b, owner, dealer = served
    fb, (fa, fc) = _fixed(dealer, a, b)
    _open(owner, a, "fixed_open", m.ObjectRef(WEIGHT), fb)
    _open(owner, a, "fixed_mask", m.ObjectRef(BATCH), fa)
    with pytest.raises(PermissionDeniedError, match="protected"):
        _open(owner, a, "trunc_mask", fc, torch.zeros(SHAPE, dtype=DTYPE))


@pytest.fixture
def unserved(hook, request):
    """Parties without a served batch: the orchestrator holds no client's input (its session is untainted, so a
    plain op on a fixed mask binds it to nobody and the mask rules alone stand between it and a second opening)."""
    import veil as sy
    from veil.mpc.providers.worker_dealer import WorkerDealer

    tag = f"rfu{request.node.name[-14:]}"
    a, b, cp, owner = (sy.VirtualWorker(hook, id=f"{tag}-{n}") for n in ("a", "b", "cp", "owner"))
    owner.send_msg(m.ObjectMessage([m.StoredObject(WEIGHT, torch.arange(3, dtype=DTYPE).view(SHAPE))]), a)
    _cmd(owner, a, "Tensor.add", (m.ObjectRef(WEIGHT), 5), [WEIGHT + 1])  # w' = w + 5
    return a, b, owner, WorkerDealer(cp, owner, seeded=True)


@pytest.mark.parametrize("op", ["Tensor.clone", "Tensor.contiguous", "Tensor.view_as"])
def test_a_plain_op_copy_of_a_fixed_mask_opens_nowhere(unserved, op):
    """``b' = b.clone()`` lost the fixed tag: after ``w - b`` in fixed_open, ``beaver_mask(w', ., b', .)`` opened
    ``w' - b``, so ``w' - w``. A copy is the fixed mask, already opened: no opening takes it."""
    a, b, owner, dealer = unserved
    fb, _ = _fixed(dealer, a, b)
    _cmd(owner, a, op, (fb, fb) if op == "Tensor.view_as" else (fb,), [6201])
    copy, w2 = m.ObjectRef(6201), m.ObjectRef(WEIGHT + 1)
    with pytest.raises(PermissionDeniedError, match="fixed mask"):
        _open(owner, a, "beaver_mask", w2, w2, copy, copy)  # before b opened
    (f,) = _open(owner, a, "fixed_open", m.ObjectRef(WEIGHT), fb)  # the honest opening still runs
    assert f.shape == SHAPE
    for step, args in (("beaver_mask", (w2, w2, copy, copy)), ("trunc_mask", (w2, copy)),
                       ("fixed_mask", (w2, copy)), ("fixed_open", (w2, copy))):
        with pytest.raises(PermissionDeniedError, match="fixed mask"):
            _open(owner, a, step, *args)


@pytest.mark.parametrize("w", [torch.zeros((4,) + SHAPE, dtype=DTYPE), torch.zeros(SHAPE, dtype=torch.float64),
                               torch.zeros((2, 1, 1), dtype=DTYPE)], ids=["broadcast", "float", "broadcast-both"])
def test_fixed_open_outputs_are_as_large_as_the_mask_and_of_its_dtype(unserved, w):
    """``w - b`` for a ``w`` that broadcasts ``b`` (or a float ``w``) was opened unchecked: outputs of fixed_open
    follow the rule of every masked output (its mask's shape and dtype); the refusal returns nothing."""
    a, b, owner, dealer = unserved
    fb, _ = _fixed(dealer, a, b)
    owner.send_msg(m.ObjectMessage([m.StoredObject(6301, w)]), a)
    with pytest.raises(PermissionDeniedError, match="shape|dtype"):
        _open(owner, a, "fixed_open", m.ObjectRef(6301), fb)
    fb2, _ = _fixed(dealer, a, b)  # a well-formed w opens as before
    (f,) = _open(owner, a, "fixed_open", m.ObjectRef(WEIGHT), fb2)
    assert f.shape == SHAPE and f.dtype == DTYPE

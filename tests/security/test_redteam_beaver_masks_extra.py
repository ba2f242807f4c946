"""More red team of ``beaver_masks`` (veil/mpc/beaver.py; the monitor's rules: veil/workers/openings.py), beyond
test_redteam_beaver_masks.py: a hostile serving owner against the client's input share on party ``a`` (the
fixture of test_redteam_dealt.py).

Attacks: a mask that is also an operand (of another product, nested in a list, in a keyword), derived and
fixed fields, operands computed from a mask, outputs wider than or of another dtype than their masks, more
masks than operands, nested lists, dicts and non-tensors in the lists, inline operands, masks spent by or for
other steps (trunc_mask, fss_mask, fixed_mask, a command), the step run as a command, the peer-opening path,
and lists sized to starve the worker. Each is refused (or opens only uniformly masked values) and the worker
still serves an honest opening afterwards.
"""

import secrets
import sys

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.party import WIRE_PREFIX, OpenMessage
from veil.mpc.ring import DTYPE
from veil.workers.peer_openings import PeerOpenMessage

from tests.security.test_redteam_beaver_masks import _KEPT, _triples
from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _cmd, _open, _ref, served  # noqa: F401

X = m.ObjectRef(BATCH)
ZEROS = torch.zeros(SHAPE, dtype=DTYPE)


def _pair(dealer, a, b, shape=SHAPE):
    """Party a's fields (r, q, g) of a fresh truncation pair."""
    ptrs = dealer.truncation_pairs(shape, 2 ** 16, [a.id, b.id])
    _KEPT.append(ptrs)
    return [_ref(p) for p in ptrs[a.id]]


def _serves(owner, a, dealer, b):
    """An honest two-product opening still runs, and opens masked values (no output is the client's share)."""
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    opened = _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, a2], [b1, b2])
    assert len(opened) == 4 and all(tuple(t.shape) == SHAPE and t.dtype == DTYPE for t in opened)
    assert not any(torch.equal(t, SECRET) for t in opened)
    assert len({tuple(t.flatten().tolist()) for t in opened}) == 4  # four independent masks


def _refused(owner, a, *args, match=None, error=PermissionDeniedError):
    with pytest.raises(error, match=match) as err:
        _open(owner, a, "beaver_masks", *args)
    assert "11, 22, 33" not in str(err.value)  # no value quoted
    return err


# ---------------------------------------------------------------- a mask that is also an operand


@pytest.mark.parametrize("where", ["x of the other product", "y of the same product", "x nested in a list",
                                   "x in a dict"])
def test_a_mask_that_is_also_an_operand_is_refused(served, where):
    """A mask named again as an operand of the same opening (``x - a1`` beside ``a1 - a2``, which ties the
    products' masks together; a step computing from its own mask could cancel it) is refused outright."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    xs, ys = {"x of the other product": ([X, a1], [X, X]), "y of the same product": ([X, X], [b2, X]),
              "x nested in a list": ([X, [a2]], [X, X]), "x in a dict": ([X, {"k": b1}], [X, X])}[where]
    _refused(owner, a, xs, ys, [a1, a2], [b1, b2], match="also an operand")
    # the refusal consumed nothing: the same masks still open the client's input once, masked
    opened = _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, a2], [b1, b2])
    assert not any(torch.equal(t, SECRET) for t in opened)
    _serves(owner, a, dealer, b)


def test_masks_cannot_come_from_keywords(served):
    """Mask positions are arguments 2 and 3: masks passed as keywords are no masks, the opening is refused."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    for args, kwargs in ((([X, X], [X, X]), {"as_": [a1, a2], "bs": [b1, b2]}),
                         ((), {"xs": [X, X], "ys": [X, X], "as_": [a1, a2], "bs": [b1, b2]}),
                         (([X, X], [X, X], [a1, a2], [b1, b2]), {"extra": a1})):
        with pytest.raises(VeilError):
            owner.send_msg(OpenMessage("beaver_masks", args, kwargs), a)
    _serves(owner, a, dealer, b)


# ---------------------------------------------------------------- derived, fixed and spent fields


def test_a_derived_field_beside_its_sources_is_refused_and_elsewhere_spends_them(served):
    """``c1 = a1 * b1`` as an operand beside ``a1``: refused. ``c3`` of an unused item opens masked (a fresh
    mask hides it) but spends ``a3, b3``: they mask nothing after it."""
    a, b, owner, dealer = served
    (a1, b1, c1), (a2, b2, _), (a3, b3, c3) = _triples(dealer, a, b, n=3)
    _refused(owner, a, [X, c1], [X, X], [a1, a2], [b1, b2], match="derived")
    opened = _open(owner, a, "beaver_masks", [X, c3], [X, X], [a1, a2], [b1, b2])
    assert not any(torch.equal(t, SECRET) for t in opened)
    (a4, b4, _), = _triples(dealer, a, b, n=1)
    _refused(owner, a, [X, X], [X, X], [a3, a4], [b3, b4], match="already used")
    _serves(owner, a, dealer, b)


@pytest.mark.parametrize("field", ["q", "g"])
def test_a_truncation_pairs_derived_field_is_no_mask(served, field):
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    r, q, g = _pair(dealer, a, b)
    _refused(owner, a, [X, X], [X, X], [a1, {"q": q, "g": g}[field]], [b1, b2], match="not a uniform field")
    _serves(owner, a, dealer, b)


def test_a_fixed_mask_is_neither_a_mask_nor_an_operand_of_beaver_masks(served):
    """The owner knows a fixed mask ``b`` (it opens ``w - b`` with its own ``w``): ``x - b`` would be ``x``."""
    a, b, owner, dealer = served
    fid = secrets.token_hex(16)
    mask = dealer.fixed_operand_mask(fid, SHAPE, [a.id, b.id])
    triple = dealer.fixed_operand_triples(fid, "mul", SHAPE, SHAPE, [a.id, b.id])
    _KEPT.extend([mask, triple])
    fb = _ref(mask[a.id][0])
    fa, fc = (_ref(t) for t in triple[a.id])
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    _refused(owner, a, [X, X], [X, X], [a1, fb], [b1, b2], match="fixed mask")
    _refused(owner, a, [X, fb], [X, X], [a1, a2], [b1, b2], match="fixed mask")
    _refused(owner, a, [X, X], [X, X], [a1, fc], [b1, b2], match="not a uniform field")
    # the fixed triple's uniform a is a fresh mask once; fixed_mask may not use it again
    opened = _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, fa], [b1, b2])
    assert not any(torch.equal(t, SECRET) for t in opened)
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "fixed_mask", X, fa)
    _serves(owner, a, dealer, b)


@pytest.mark.parametrize("step", ["trunc_mask", "fss_mask", "fixed_mask", "beaver_mask"])
def test_masks_spent_by_beaver_masks_hide_nothing_in_another_step(served, step):
    """``x - a1`` opened by beaver_masks, then ``x' + a1`` (trunc_mask, fss_mask) or ``x' - a1`` would give
    ``x -/+ x'``."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _), (a3, b3, _) = _triples(dealer, a, b, n=3)
    _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, a2], [b1, b2])
    args = {"trunc_mask": (X, b2), "fss_mask": ([X], [a1]), "fixed_mask": (X, a2),
            "beaver_mask": (X, X, a3, b1)}[step]
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, step, *args)
    _serves(owner, a, dealer, b)


@pytest.mark.parametrize("step", ["trunc_mask", "fss_mask", "command"])
def test_a_mask_spent_elsewhere_is_refused_by_beaver_masks(served, step):
    """A truncation pair's ``r`` spent by trunc_mask / fss_mask, or a triple's ``a`` moved into an operand by a
    command (``X - a2``, which beaver_masks would open as ``X``)."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    r = _pair(dealer, a, b)[0]
    xs, masks = [X, X], [a1, r]
    if step == "trunc_mask":
        _open(owner, a, "trunc_mask", X, r)
    elif step == "fss_mask":
        _open(owner, a, "fss_mask", [X], [r])
    else:
        _cmd(owner, a, "torch.sub", (X, a2), [7301])
        xs, masks = [X, m.ObjectRef(7301)], [a1, a2]
    _refused(owner, a, xs, [X, X], masks, [b1, b2], match="already used")
    _serves(owner, a, dealer, b)


def test_a_truncation_masks_r_is_a_fresh_mask_of_beaver_masks_once(served):
    """A fresh uniform field of another kind is a proper one-time pad: it opens masked, once."""
    a, b, owner, dealer = served
    (a1, b1, _), (_, b2, _) = _triples(dealer, a, b)
    r = _pair(dealer, a, b)[0]
    opened = _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, r], [b1, b2])
    assert not any(torch.equal(t, SECRET) for t in opened)
    with pytest.raises(PermissionDeniedError, match="already used"):
        _open(owner, a, "trunc_mask", X, r)
    _serves(owner, a, dealer, b)


def test_one_items_a_and_b_as_two_products_masks_open_masked_and_spend_its_c(served):
    """``(x - a1, x - b1)`` opens ``b1 - a1`` besides: both uniform and fresh, so nothing of x; ``c1 = a1 * b1``
    then never opens (its sources opened), masked or not."""
    a, b, owner, dealer = served
    (a1, b1, c1), (a2, b2, _) = _triples(dealer, a, b)
    opened = _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, b1], [a2, b2])
    assert not any(torch.equal(t, SECRET) for t in opened)
    r = _pair(dealer, a, b)[0]
    with pytest.raises(PermissionDeniedError, match="derived"):
        _open(owner, a, "trunc_mask", c1, r)
    _serves(owner, a, dealer, b)


# ---------------------------------------------------------------- outputs that are not their masks' size or dtype


@pytest.mark.parametrize("operand", ["rows", "float", "float 2^80", "int32", "row"])
def test_an_operand_that_widens_or_changes_the_output_is_refused(served, operand):
    """``X`` repeated to (2, 1, 3) broadcasts a (1, 3) mask over two copies (their difference is 0); a float
    operand swamps or rounds its mask. An int32 or narrower operand promotes to int64: masked as usual."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    _cmd(owner, a, "Tensor.repeat", (X, 2, 1, 1), [7401])
    _cmd(owner, a, "Tensor.double", (X,), [7402])
    _cmd(owner, a, "Tensor.mul", (m.ObjectRef(7402), 2.0 ** 80), [7403])
    _cmd(owner, a, "Tensor.int", (X,), [7404])
    _cmd(owner, a, "Tensor.flatten", (X,), [7405])  # (3,): broadcasts to the mask's (1, 3), entry by entry
    z = m.ObjectRef({"rows": 7401, "float": 7402, "float 2^80": 7403, "int32": 7404, "row": 7405}[operand])
    if operand in ("int32", "row"):
        opened = _open(owner, a, "beaver_masks", [X, z], [X, X], [a1, a2], [b1, b2])
        assert all(tuple(t.shape) == SHAPE and t.dtype == DTYPE for t in opened)
        assert not any(torch.equal(t.view(-1), SECRET.view(-1)) for t in opened)
    else:
        _refused(owner, a, [X, z], [X, X], [a1, a2], [b1, b2], match="own shape|dtype")
    _serves(owner, a, dealer, b)


def test_products_of_other_shapes_keep_each_output_under_its_own_mask(served):
    """Masks of two shapes, listed out of order: an output wider than its listed mask is refused; ``X``
    broadcast under a wider mask opens one fresh mask entry per entry (no two entries share one)."""
    a, b, owner, dealer = served
    ((a1, b1, _),) = _triples(dealer, a, b, n=1)
    ((w1, v1, _),) = _triples(dealer, a, b, n=1, shape=(2, 3))
    _cmd(owner, a, "Tensor.repeat", (X, 2, 1), [7501])  # (2, 3)
    wide = m.ObjectRef(7501)
    _refused(owner, a, [wide, X], [X, X], [a1, w1], [b1, v1], match="own shape")  # (spends them: run first)
    ((a1, b1, _),) = _triples(dealer, a, b, n=1)
    ((w1, v1, _),) = _triples(dealer, a, b, n=1, shape=(2, 3))
    e1, e2, f1, f2 = _open(owner, a, "beaver_masks", [X, X], [wide, X], [w1, a1], [v1, b1])
    assert tuple(e1.shape) == (2, 3) and not torch.equal(e1[0], e1[1])  # two rows, two independent masks
    assert tuple(f1.shape) == (2, 3) and not torch.equal(f1[0], f1[1])
    _serves(owner, a, dealer, b)


# ---------------------------------------------------------------- malformed lists


@pytest.mark.parametrize("shape", ["more a masks", "more b masks", "more x", "more y and masks"])
def test_lists_of_other_lengths_are_refused(served, shape):
    """More masks than operands (an output paired with the wrong mask), or operand lists of other lengths."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _), (a3, b3, _) = _triples(dealer, a, b, n=3)
    args = {"more a masks": ([X, X], [X, X], [a1, a2, a3], [b1, b2]),
            "more b masks": ([X, X], [X, X], [a1, a2], [b1, b2, b3]),
            "more x": ([X, X, X], [X, X], [a1, a2], [b1, b2]),
            "more y and masks": ([X, X], [X, X, X], [a1, a2, a3], [b1, b2, b3])}[shape]
    _refused(owner, a, *args, error=VeilError)
    _serves(owner, a, dealer, b)


@pytest.mark.parametrize("bad", ["nested mask", "tuple mask", "dict mask", "nested x", "None x", "str x",
                                 "float x", "huge int x", "bool x", "mask list as tuple", "x list as dict"])
def test_nested_and_non_tensor_entries_are_clear_errors(served, bad):
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    args = {"nested mask": ([X, X], [X, X], [[a1], a2], [b1, b2]),
            "tuple mask": ([X, X], [X, X], [(a1,), a2], [b1, b2]),
            "dict mask": ([X, X], [X, X], [{"k": a1}, a2], [b1, b2]),
            "nested x": ([[X], X], [X, X], [a1, a2], [b1, b2]),
            "None x": ([None, X], [X, X], [a1, a2], [b1, b2]),
            "str x": (["x", X], [X, X], [a1, a2], [b1, b2]),
            "float x": ([1.5, X], [X, X], [a1, a2], [b1, b2]),
            "huge int x": ([2 ** 70, X], [X, X], [a1, a2], [b1, b2]),
            "bool x": ([True, X], [X, X], [a1, a2], [b1, b2]),
            "mask list as tuple": ([X, X], [X, X], (a1, a2), [b1, b2]),
            "x list as dict": ({"0": X, "1": X}, [X, X], [a1, a2], [b1, b2])}[bad]
    with pytest.raises(VeilError):  # the step computes with tensors only (2^70 does not even serialize)
        _open(owner, a, "beaver_masks", *args)
    _serves(owner, a, dealer, b)


def test_an_inline_operand_reveals_only_its_mask_which_is_then_spent(served):
    """``0 - a1`` opens party a's share of ``a1``: a1 then masks nothing, and ``c1 = a1 * b1`` never opens."""
    a, b, owner, dealer = served
    (a1, b1, c1), (a2, b2, _), (a3, b3, _) = _triples(dealer, a, b, n=3)
    e1, e2, f1, f2 = _open(owner, a, "beaver_masks", [ZEROS, X], [ZEROS, X], [a1, a2], [b1, b2])
    assert not torch.equal(e2, SECRET) and not torch.equal(f2, SECRET)
    _refused(owner, a, [X, X], [X, X], [a1, a3], [b3, b2], match="already used|twice")
    _refused(owner, a, [X, c1], [X, X], [a3, a2], [b3, b2], match="derived|already used")
    with pytest.raises(PermissionDeniedError):  # c1 is the client's now: no unmasked opening either
        _open(owner, a, "fss_mask", [c1], [ZEROS])
    _serves(owner, a, dealer, b)


def test_the_step_run_as_a_command_stores_restricted_outputs_and_spends_its_masks(served):
    """``veil.mpc.beaver_masks`` as a command: its outputs are stored, not sent; they stay the client's and the
    masks used are spent (an opening under them again would cancel)."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    try:
        _cmd(owner, a, WIRE_PREFIX + "beaver_masks", ([X, X], [X, X], [a1, a2], [b1, b2]), [7601, 7602, 7603, 7604])
    except VeilError:
        pass  # refused outright is fine too
    else:
        for oid in (7601, 7602, 7603, 7604):
            with pytest.raises(VeilError):
                owner.send_msg(m.GetObjectsMessage([oid], False), a)
        with pytest.raises(PermissionDeniedError, match="protected|masks at argument"):
            _open(owner, a, "fss_mask", [m.ObjectRef(7601)], [ZEROS])
    _refused(owner, a, [X, X], [X, X], [a1, a2], [b1, b2], match="already used")
    _serves(owner, a, dealer, b)


# ---------------------------------------------------------------- the peer-opening path


def test_a_peer_opening_of_beaver_masks_applies_the_same_rules(served):
    """A PeerOpenMessage runs the same monitor check before any exchange: a reused mask, a mask as an
    operand, too few masks are refused there, and consume nothing."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)

    def peer(*args):
        msg = PeerOpenMessage("beaver_masks", tuple(args), {}, secrets.token_hex(12), [a.id, b.id], [7701, 7702])
        return owner.send_msg(msg, a)

    for args, match in ((([X, X], [X, X], [a1, a1], [b1, b2]), "twice"),
                        (([X, b1], [X, X], [a1, a2], [b1, b2]), "also an operand"),
                        (([X, X], [X, X], [a1, ZEROS], [b1, b2]), "not dealt material")):
        with pytest.raises(PermissionDeniedError, match=match):
            peer(*args)
    with pytest.raises(VeilError):  # X - 0 is X: never stored as the owner's opened value
        owner.send_msg(m.GetObjectsMessage([7701], False), a)
    opened = _open(owner, a, "beaver_masks", [X, X], [X, X], [a1, a2], [b1, b2])  # nothing was consumed
    assert not any(torch.equal(t, SECRET) for t in opened)
    _serves(owner, a, dealer, b)


# ---------------------------------------------------------------- starving the worker


def test_a_deeply_nested_list_is_an_error_not_a_crash(served):
    """Nesting the worker's recursive walks cannot follow: an error reply (20,000 levels do not even serialize)."""
    a, b, owner, dealer = served
    (a1, b1, _), (a2, b2, _) = _triples(dealer, a, b)
    for depth in (500, 950, 20000):
        deep = X
        for _ in range(depth):
            deep = [deep]
        for args in (([deep, X], [X, X], [a1, a2], [b1, b2]), ([X, X], [X, X], [deep, a2], [b1, b2])):
            with pytest.raises(VeilError):
                _open(owner, a, "beaver_masks", *args)
    _serves(owner, a, dealer, b)


def _monitor_steps(owner, a, *args) -> int:
    """Python frames run in the monitor's opening rules (veil/workers/openings.py, generator resumptions
    included) while ``a`` refuses this opening: a count of its work that does not depend on the load."""
    steps = 0

    def count(frame, event, arg):
        nonlocal steps
        if event == "call" and frame.f_code.co_filename.endswith("openings.py"):
            steps += 1

    sys.setprofile(count)
    try:
        with pytest.raises(VeilError):
            _open(owner, a, "beaver_masks", *args)
    finally:
        sys.setprofile(None)
    return steps


def test_the_mask_check_is_linear_in_the_opening_size(served):
    """The monitor's check of an opening must cost about what reading it costs. Its duplicate checks compared
    every mask with every mask and with every named object (``any(entry is e for e in masks)``, ``sum(1 for
    oid in named if found.get(oid) is entry)``): 1,600 masks beside 40,000 operand references (a ~0.5 MB
    message, refused by the step's length check only after the monitor's) held the worker ~3 s, and 4,000
    beside 2e6 references (~20 MB) would have held it ~6 minutes. Counted in steps, not seconds: the
    in-process worker checks on this thread."""
    a, b, owner, dealer = served
    n, refs = 800, 20000
    many = _triples(dealer, a, b, n=n)
    ops = [X] * refs
    (f1, g1, _), = _triples(dealer, a, b, n=1)
    baseline = _monitor_steps(owner, a, ops, ops, [f1], [g1])  # the same operand lists, one product's masks
    attack = _monitor_steps(owner, a, ops, ops, [t[0] for t in many], [t[1] for t in many])
    assert baseline > refs  # the count sees the check (it walks every reference once)
    assert attack < baseline + 20 * n, f"{n} products' masks: {attack} steps; one product's: {baseline}"
    _serves(owner, a, dealer, b)

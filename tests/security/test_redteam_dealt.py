"""Red team of the serving-opening rules (commit 12d2d0f): a hostile serving owner against a client's input share.

Each test claims a client's input share into a batch (as in test_dealt_masks.py) and tries to read it
through a door the mask rules did not close:

* an inline (non-dealt) value beside a dealt mask in a list mask argument (``fss_mask``, ``cmp_mask_values``):
  ``zip`` paired the protected value with the inline zero, the dealt mask only passed the check;
* a float copy of the share, scaled far above 2^64: ``x * 2^80 + r`` in float64 is ``x`` (the mask is
  added in the reals, not mod 2^64, and rounds away);
* ops whose result *shape* depends on values (``nonzero``, ``masked_select``, ``one_hot``): the reply's
  descriptor gave the shape, hence bits of the share;
* error texts quoting values (``IndexError: index 11 is out of bounds``) and value-dependent failures
  (an index out of range, a division by zero) as a 1-bit oracle.
"""

import pytest
import torch

import veil as sy
from review_steps import shows_number  # (tests/security is on the path)
from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.party import OpenMessage
from veil.mpc.providers.worker_dealer import WorkerDealer
from veil.mpc.ring import DTYPE
from veil.serving import protocol

SHAPE = (1, 3)
SECRET = torch.tensor([[11, 22, 33]], dtype=DTYPE)
BATCH = 4343


def _setup(hook, tag, secret):
    a, b, cp = (sy.VirtualWorker(hook, id=f"{tag}-{n}") for n in ("a", "b", "cp"))
    owner, client = sy.VirtualWorker(hook, id=f"{tag}-owner"), sy.VirtualWorker(hook, id=f"{tag}-client")
    for party, share in ((a, secret), (b, torch.zeros(SHAPE, dtype=DTYPE))):
        protocol.call(owner, party, "open", "svc", [client.id], {"input_shape": list(SHAPE)})
        protocol.call(client, party, "submit", "svc", 7, share)
        assert protocol.call(owner, party, "claim", "svc", [7], BATCH) == [1]
    return a, b, owner, WorkerDealer(cp, owner, seeded=True)


@pytest.fixture
def served(hook, request):
    """Party ``a`` holds the client's share SECRET (claimed into BATCH by the owner)."""
    return _setup(hook, f"rtd{request.node.name[-14:]}", SECRET)


def _open(owner, party, name, *args):
    return owner.send_msg(OpenMessage(name, tuple(args)), party).objects


def _cmd(owner, party, op, args, ids, kwargs=None):
    return owner.send_msg(m.CommandMessage(op, tuple(args), kwargs or {}, ids), party)


def _ref(ptr):
    return m.ObjectRef(ptr.id_at_location)


def _opens_no_secret(owner, party, mask) -> bool:
    """``trunc_mask`` of the client's input under ``mask`` hides it: it opens to something else, or it is
    refused because a computation already spent the mask (``veil.workers.dealt.consume``)."""
    try:
        (opened,) = _open(owner, party, "trunc_mask", m.ObjectRef(BATCH), mask)
    except PermissionDeniedError as e:
        return "already used" in str(e)
    return not torch.equal(opened, SECRET)


_KEPT: list = []  # dealt items' pointers: dropping one deletes its fields on the party


def group_state(owner, party, oid=7000):
    """A reference to the client's input (BATCH, 3 entries) as 4 int64 words: the shape of a comparison state
    in the group layout for SHAPE (what the quad level opens), built by commands on ``party``."""
    _cmd(owner, party, "Tensor.flatten", (m.ObjectRef(BATCH),), [oid])
    _cmd(owner, party, "torch.cat", ([m.ObjectRef(oid), m.ObjectRef(oid)],), [oid + 1])
    _cmd(owner, party, "Tensor.narrow", (m.ObjectRef(oid + 1), 0, 0, 4), [oid + 2])
    return m.ObjectRef(oid + 2)


def comparison_fields(dealer, a, b, n_values, shape=SHAPE):
    """References (on party ``a``) to the fields of one comparison item dealt to ``a`` and ``b``."""
    item = dealer.comparison_material(shape, n_values, [a.id, b.id])
    _KEPT.append(item)
    return [_ref(f) for f in item[a.id]]


@pytest.mark.parametrize("step", ["fss_mask", "cmp_mask_values"])
@pytest.mark.parametrize("inline", [0, "zeros"])
def test_an_inline_value_beside_a_dealt_mask_is_not_a_mask(served, step, inline):
    """``step([x], [0, r])`` returned ``x + 0``: only the dealt ``r`` was checked, zip used the zero."""
    a, b, owner, dealer = served
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    zero = torch.zeros(SHAPE, dtype=DTYPE) if inline == "zeros" else 0
    with pytest.raises(PermissionDeniedError, match="not dealt material"):
        _open(owner, a, step, [m.ObjectRef(BATCH)], [zero, _ref(pair[a.id][0])])
    # honest use still opens (a fresh mask: the refused one was not consumed by the refusal)
    (opened,) = _open(owner, a, step, [m.ObjectRef(BATCH)], [_ref(pair[a.id][0])])
    assert opened.shape == SHAPE and not torch.equal(opened, SECRET)


def test_a_float_share_does_not_swamp_its_mask(served):
    """float64(x) * 2^80 + r rounds r away: the mask must be added mod 2^64 (int64 outputs only)."""
    a, b, owner, dealer = served
    _cmd(owner, a, "Tensor.double", (m.ObjectRef(BATCH),), [5002])
    _cmd(owner, a, "Tensor.mul", (m.ObjectRef(5002), 2.0 ** 80), [5003])
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    with pytest.raises(PermissionDeniedError, match="dtype"):
        _open(owner, a, "trunc_mask", m.ObjectRef(5003), _ref(pair[a.id][0]))


@pytest.mark.parametrize("op, args", [
    ("torch.nonzero", lambda x: (x,)),
    ("torch.masked_select", lambda x: (torch.zeros(SHAPE, dtype=DTYPE), x.__class__(5011))),
    ("torch.nn.functional.one_hot", lambda x: (x,)),
    ("torch.unique", lambda x: (x,)),
])
def test_result_shapes_do_not_depend_on_a_client_value(served, op, args):
    """``nonzero(x & 2)`` had shape (number of set bits, 2) in the reply: the share, bit by bit."""
    a, b, owner, dealer = served
    _cmd(owner, a, "Tensor.__and__", (m.ObjectRef(BATCH), 2), [5010])
    _cmd(owner, a, "Tensor.bool", (m.ObjectRef(5010),), [5011])
    with pytest.raises(PermissionDeniedError, match="depend on the values"):
        _cmd(owner, a, op, args(m.ObjectRef(5010)), None)


FLAT = 5039  # the client's share, flattened to (3,)


def test_an_error_does_not_quote_a_client_value(served):
    """``zeros(3)[x]`` failed with 'index 11 is out of bounds': refused before it runs, and any other
    failure on a client's value is value-free ('Target 22 is out of bounds')."""
    a, b, owner, dealer = served
    with pytest.raises(VeilError) as err:
        _cmd(owner, a, "Tensor.__getitem__", (torch.zeros(3), m.ObjectRef(BATCH)), [5020])
    assert not shows_number(str(err.value), "11"), err.value
    _cmd(owner, a, "Tensor.flatten", (m.ObjectRef(BATCH),), [FLAT])
    with pytest.raises(VeilError) as err:
        _cmd(owner, a, "torch.nn.functional.cross_entropy", (torch.zeros(3, 12), m.ObjectRef(FLAT)), [5031])
    assert not shows_number(str(err.value), "22") and not shows_number(str(err.value), "11"), err.value


def _outcome(hook, tag, secret, op, args):
    a, _, owner, _ = _setup(hook, tag, secret)
    _cmd(owner, a, "Tensor.flatten", (m.ObjectRef(BATCH),), [FLAT])
    try:
        _cmd(owner, a, op, args, [5040])
        return "ok"
    except VeilError as e:
        return type(e).__name__


IN_RANGE = torch.tensor([[1, 2, 3]], dtype=DTYPE)


@pytest.mark.parametrize("op, args, other", [
    ("Tensor.__getitem__", (torch.zeros(12), m.ObjectRef(BATCH)), IN_RANGE + 10),  # in range iff all < 12
    ("torch.index_select", (torch.zeros(12), 0, m.ObjectRef(FLAT)), IN_RANGE + 10),
    ("torch.take", (torch.zeros(12), m.ObjectRef(BATCH)), IN_RANGE + 10),
    ("torch.gather", (torch.zeros(1, 12), 1, m.ObjectRef(BATCH)), IN_RANGE + 10),
    ("torch.nn.functional.embedding", (m.ObjectRef(BATCH), torch.zeros(12, 2)), IN_RANGE + 10),
    ("torch.floor_divide", (torch.ones(SHAPE, dtype=DTYPE), m.ObjectRef(BATCH)), IN_RANGE - 1),  # fails iff a 0
    ("torch.remainder", (torch.ones(SHAPE, dtype=DTYPE), m.ObjectRef(BATCH)), IN_RANGE - 1),
])
def test_success_does_not_depend_on_a_client_value(hook, request, op, args, other):
    """Whether a command on the client's share succeeds must not depend on the share (a 1-bit oracle,
    repeated per bit: ``zeros(2)[(x >> k) & 1 + 1]``)."""
    tag = f"rto{request.node.name[-10:]}"
    assert _outcome(hook, tag + "i", IN_RANGE, op, args) == _outcome(hook, tag + "o", other, op, args)


FIRST = 5038  # the share's first element, shape (1,)


@pytest.mark.parametrize("op, args", [
    ("torch.nn.functional.cross_entropy", (torch.zeros(3, 12), m.ObjectRef(FLAT))),  # fails iff a target >= 12
    ("torch.zeros", (m.ObjectRef(FIRST),)),  # a secret as a size: x[0] elements
    ("Tensor.narrow", (torch.zeros(12), 0, m.ObjectRef(FIRST), 1)),  # fails iff x[0] >= 12
    ("Tensor.view", (torch.zeros(12), m.ObjectRef(FIRST))),
    ("torch.nn.functional.one_hot", (m.ObjectRef(BATCH), 12)),  # fails iff a value >= 12
])
def test_a_client_value_is_never_a_size_a_target_or_a_python_value(hook, request, op, args):
    """The oracle through ops the name lists did not know: refused before anything depends on values."""
    tag = f"rtp{request.node.name[-10:]}"

    def outcome(secret):
        a, _, owner, _ = _setup(hook, tag + str(int(secret[0, 0])), secret)
        _cmd(owner, a, "Tensor.flatten", (m.ObjectRef(BATCH),), [FLAT])
        _cmd(owner, a, "Tensor.__getitem__", (m.ObjectRef(FLAT), slice(0, 1)), [FIRST])
        try:
            _cmd(owner, a, op, args, [5040])
            return "ok"
        except VeilError as e:
            return type(e).__name__

    assert outcome(IN_RANGE) == outcome(IN_RANGE + 10) != "ok"


@pytest.mark.parametrize("op, args", [
    ("Tensor.zero_", lambda r: (r,)),
    ("Tensor.mul_", lambda r: (r, 0)),
    ("Tensor.__setitem__", lambda r: (r, slice(None), 0)),
    ("torch.mul", lambda r: (r, 0)),  # with out=r
])
def test_a_mask_is_never_overwritten_before_it_opens(served, op, args):
    """``r.zero_()`` while the batch is claimed, then ``trunc_mask(x, r)``: r was still a fresh uniform
    field by its metadata, and the opening was x. Dealt material is written by no requester-chosen op."""
    a, b, owner, dealer = served
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    r = _ref(pair[a.id][0])
    kwargs = {"out": r} if op == "torch.mul" else None
    with pytest.raises(PermissionDeniedError, match="restricted value|modify"):
        _cmd(owner, a, op, args(r), [0] if op != "torch.mul" else [5050], kwargs)
    (opened,) = _open(owner, a, "trunc_mask", m.ObjectRef(BATCH), r)
    assert not torch.equal(opened, SECRET)


def test_an_alias_of_a_mask_is_not_a_way_to_write_it(served):
    """A view of the mask (stored as a new object) shares its storage: writing the view is refused too."""
    a, b, owner, dealer = served
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    r = _ref(pair[a.id][0])
    _cmd(owner, a, "Tensor.view", (r, -1), [5060])
    with pytest.raises(PermissionDeniedError):
        _cmd(owner, a, "Tensor.zero_", (m.ObjectRef(5060),), [0])
    assert _opens_no_secret(owner, a, r)


@pytest.mark.parametrize("reveal", ["mask", "derived"])
def test_a_field_opened_unmasked_during_the_batch_never_masks_a_client_value(served, reveal):
    """With the batch claimed (the session tainted), opening an unused mask r itself (or q + r) bound its
    item to the *taint*, not as unrestricted: r stayed a fresh mask of the client's and x + r was x."""
    a, b, owner, dealer = served
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    r = _ref(pair[a.id][0])
    if reveal == "mask":
        (known,) = _open(owner, a, "fss_mask", [r], [torch.zeros(SHAPE, dtype=DTYPE)])
    else:  # q + r: a function of r the owner can invert (here: just opened alongside)
        _open(owner, a, "fss_mask", [_ref(pair[a.id][1])], [r])
    with pytest.raises(PermissionDeniedError, match="unrestricted"):
        _open(owner, a, "trunc_mask", m.ObjectRef(BATCH), r)


def test_a_plan_is_no_way_around_the_oblivious_guard(served):
    """A stored plan runs requester-chosen ops too: ``nonzero`` inside it is refused like a command's."""
    a, b, owner, dealer = served
    plan = sy.func2plan(args_shape=[SHAPE])(lambda x: torch.nonzero(x > 0))
    ptr = plan.send(a)
    with pytest.raises(VeilError, match="depend on the values|failed on protected data"):
        _cmd(owner, a, "veil.plan.run", (m.ObjectRef(ptr.id_at_location), [m.ObjectRef(BATCH)], []), None)


@pytest.mark.parametrize("op, args, kwargs", [
    # a shape from the share's low bits: the result is empty iff one is 0, and its shape is the bits
    ("veil.mpc.prg_share", (torch.zeros(32, dtype=torch.uint8), m.ObjectRef(5070)), {}),
    ("veil.mpc.trunc_local", (torch.ones(SHAPE, dtype=DTYPE), m.ObjectRef(5071), False), {}),  # 1 // x
    ("veil.mpc.trunc_local", (torch.ones(SHAPE, dtype=DTYPE), 2, m.ObjectRef(5071)), {}),  # bool(x)
    ("veil.mpc.expand_material", (torch.zeros(32, dtype=torch.uint8), "zero", ([2],), m.ObjectRef(5071), []), {}),
])
def test_a_protocol_step_takes_no_client_value_as_a_public_parameter(served, op, args, kwargs):
    """Protocol steps are trusted code but take public parameters (shapes, divisors, flags): a client's
    share passed there became a Python value (a shape, a branch)."""
    a, b, owner, dealer = served
    _cmd(owner, a, "Tensor.flatten", (m.ObjectRef(BATCH),), [FLAT])
    _cmd(owner, a, "Tensor.__and__", (m.ObjectRef(FLAT), 1), [5070])
    _cmd(owner, a, "Tensor.__getitem__", (m.ObjectRef(5070), 0), [5071])
    with pytest.raises(PermissionDeniedError, match="public parameter"):
        _cmd(owner, a, op, args, None, kwargs)


def test_a_plan_neither_launders_a_client_share_nor_overwrites_a_mask(served):
    """The write rules applied to torch ops only: a stored plan doing ``mine.add_(x)`` (then ``mine.get()``)
    or ``r.mul_(0)`` ran on the stored tensors themselves."""
    a, b, owner, dealer = served

    def launder(mine, x):
        mine.add_(x)
        return mine * 1

    plan_ptr = sy.func2plan(args_shape=[SHAPE, SHAPE])(launder).send(a)
    mine = torch.zeros(SHAPE, dtype=DTYPE).send(a)
    try:
        _cmd(owner, a, "veil.plan.run", (m.ObjectRef(plan_ptr.id_at_location), [_ref(mine), m.ObjectRef(BATCH)], []),
             None)
    except VeilError:
        pass  # refused is fine too
    assert torch.equal(mine.get(), torch.zeros(SHAPE, dtype=DTYPE))
    pair = dealer.truncation_pairs(SHAPE, 2 ** 16, [a.id, b.id])
    r = _ref(pair[a.id][0])
    zero_ptr = sy.func2plan(args_shape=[SHAPE])(lambda t: t.mul_(0) + 0).send(a)
    try:
        _cmd(owner, a, "veil.plan.run", (m.ObjectRef(zero_ptr.id_at_location), [r], []), None)
    except VeilError:
        pass
    assert _opens_no_secret(owner, a, r)

"""Red team, second pass: the DP-plan constant-creation check (veil/dp/plan_constants.py) and the CKKS depth check
(veil/he/remote.py ``_check_depth``), attacked as a hostile data scientist.

Holes found (strict xfails before the fixes, checked by running this file against the previous versions of
plan_constants.py and he/remote.py):

- the taint walk did not follow aliasing: ``u = w * 1; u.view_as(x).add_(x)`` (or ``u.type_as(x)``, which is
  ``u`` itself) wrote the record into ``u`` while the walk kept ``u`` public, and ``torch.arange(u.sum().long())``
  sized every record's work from its values; a training-mode ``F.batch_norm`` writes the record's statistics
  into its running-mean argument and was not seen as a write at all;
- a plan writing into a tensor constant (``Tensor.add_(C, x)``, ``out=C``, ``C.data``) kept the sum of the lot's
  records in the plan object stored on the worker: every record saw the records before it, and running the plan
  afterwards (``veil.plan.run``, any plan, DP or not) on the scientist's own zeros returned the owner's records,
  with no review; so did a plan returning a view of its constant, once owner data was added in place into the
  stored result (both now refused when the plan is stored: veil/plans/aliasing.py, veil/plans/remote.py);
- the "writes into its own buffers" refusal compared version counters, and ``buffer.data`` has its own:
  ``self.seen.data.add_(x.sum(1))`` passed (cross-record dependence);
- ``DepthRequiredError`` (value-free, past the owner guard) vs success was an oracle on whether the owner's
  plaintext was zero: TenSEAL replaces a transparent product (a plaintext encoding to all zeros) by a fresh
  encryption of zero at the top level, so the result kept more levels than any other product;
- two CKKS products of one ciphertext with owner values shared its randomness: ``x * w[0] - x * w[1]`` was
  transparent, and failed (ProtectedDataError vs success), exactly when the two values were equal; a crafted row
  [s, s] (the requester holds the secret key) made ``mm``'s sum fail exactly when w[0] == -w[1] (now the
  ciphertext is re-randomized before a product with the owner's plaintext, and the product brought to its
  level: veil/he/remote.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import veil as sy
from veil.dp import PrivacyParameterError, RemoteDPOwner
from veil.dp.plan_grads import check_forward_plan
from veil.exceptions import OperationNotAllowedError, ReviewPendingError
from veil.he import ckks, conjugation
from veil.he.errors import DepthRequiredError
from veil.messaging.allowlist import ALLOWLIST
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.plans.plan import Plan

X, W = SlotRef(0), SlotRef(1)  # the record [1, 3] and a weight [1, 3]


def _op(f, args, out, kwargs=None):
    return PlanOp(ALLOWLIST.by_func(f).name, args, kwargs or {}, [out], True)


def _sized_from(write_ops, size_slot):
    """x -> (x * w).sum(1) * arange(size_slot.sum().long()).sum(): ``write_ops`` (slots 3..9) put the record
    into ``size_slot`` by aliasing, never by an op the old walk saw reading the record into it."""
    ops = [_op(torch.mul, (W, 1), 3), *write_ops,
           _op(torch.sum, (size_slot,), 10), _op(torch.Tensor.long, (SlotRef(10),), 11),
           _op(torch.arange, (SlotRef(11),), 12), _op(torch.sum, (SlotRef(12),), 13),
           _op(torch.mul, (X, W), 14), _op(torch.mul, (SlotRef(14), SlotRef(13)), 15)]
    return PlanSpec("evil", 1, 1, 16, ops, SlotRef(15))


ALIASING = {
    # u.view_as(x) reads the record, so the old walk marked the view and not u, which it is a view of
    "view_as": ([_op(torch.Tensor.view_as, (SlotRef(3), X), 4), _op(torch.Tensor.add_, (SlotRef(4), X), 4)],
                SlotRef(3)),
    # u.type_as(x) is u itself (same dtype)
    "type_as": ([_op(torch.Tensor.type_as, (SlotRef(3), X), 4), _op(torch.Tensor.mul_, (SlotRef(4), X), 4)],
                SlotRef(3)),
    # training-mode batch_norm writes the record's mean into its running_mean argument (slot 5)
    "batch_norm running stats": ([_op(torch.sum, (SlotRef(3),), 5, {"dim": 0}), _op(torch.add, (SlotRef(5), 1), 6),
                                  _op(torch.Tensor.view, (X, 1, 1, 3), 7),
                                  _op(F.batch_norm, (SlotRef(7), SlotRef(5), SlotRef(6), None, None, True, 1.0), 8)],
                                 SlotRef(5)),
}


@pytest.mark.parametrize("case", sorted(ALIASING))
def test_a_size_written_from_the_record_through_an_alias_is_refused(case):
    write_ops, size_slot = ALIASING[case]
    with pytest.raises(PrivacyParameterError, match="computed from the record|writes into"):
        check_forward_plan(_sized_from(write_ops, size_slot), 1)


def _dp_worker(hook, name):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    w = sy.VirtualWorker(hook, id=name)
    w.enable_dp({"toy": (x, y)}, budgets={"me": (float("inf"), 0.5)}, max_grad_norm=1e3, noise_multiplier=1e-9)
    return w, x, y


def _release(owner, plan_handle, state, trainable):
    from veil.dp.remote import _request_id
    from veil.tensors import remote_ops

    return remote_ops.call(ALLOWLIST.by_name("veil.dp.sanitized_gradient"),
                           (plan_handle, "toy", state, trainable, "mse", 1.0, None, _request_id()), {},
                           location=owner.worker).get()


def _accumulating_spec(write):
    """x -> (x * w + C').sum(1): ``write`` puts the record into the constant C (its result is C', slot 2)."""
    ops = [write, _op(torch.mul, (X, W), 3), _op(torch.add, (SlotRef(3), SlotRef(2)), 4),
           _op(torch.sum, (SlotRef(4),), 5, {"dim": 1, "keepdim": True})]
    return PlanSpec("acc", 1, 1, 6, ops, SlotRef(5))


def _constant_writes(C):
    return {"add_": _op(torch.Tensor.add_, (C, X), 2),
            "out=": _op(torch.add, (X, 0.0), 2, {"out": C}),
            # .data of a constant is a view with a version counter of its own
            "data then copy_": _op(torch.Tensor.copy_, (SlotRef(7), X), 2)}


@pytest.mark.parametrize("how", ["add_", "out=", "data then copy_"])
def test_a_plan_accumulating_records_in_its_constant_is_refused_and_keeps_none(hook, how):
    w, x, _ = _dp_worker(hook, f"rt-dpc2-const-{how}")
    C = torch.zeros(1, 3)
    spec = _accumulating_spec(_constant_writes(C)[how])
    if how == "data then copy_":
        spec = PlanSpec("acc", 1, 1, 8, [_op(torch.Tensor.data.__get__, (C,), 7), *spec.ops], SlotRef(5))
    with pytest.raises(PrivacyParameterError, match="writes into its parameters or buffers"):
        check_forward_plan(spec, 1)  # (the DP check refuses it too, from the plan alone)
    # the worker refuses to store it: run once on the owner's records, the plan kept them in C, and running it
    # afterwards on the scientist's own zeros returned them, with no review
    with pytest.raises(OperationNotAllowedError, match="writes in place into one of its constants"):
        Plan.from_spec(spec, [torch.ones(1, 3)], "acc").send(w)
    owner = RemoteDPOwner(w, "toy", nn.Linear(3, 1), x[:1])  # the worker still serves
    torch.testing.assert_close(owner.sanitized_gradient(nn.Linear(3, 1), None, None, 1.0)["weight"].shape,
                               torch.Size([1, 3]))


def test_a_plan_returning_a_view_of_its_constant_is_refused_when_stored(hook):
    """Run on the scientist's zeros, the result is a view of C stored as theirs; owner data added into it in place
    (marked, under review) reached C, and the next run returned C, unmarked: the owner's values."""
    w = sy.VirtualWorker(hook, id="rt-dpc2-view-out")
    spec = PlanSpec("alias", 1, 0, 2, [_op(torch.Tensor.view_as, (torch.zeros(1, 3), X), 1)], SlotRef(1))
    with pytest.raises(OperationNotAllowedError, match="returns one of its constants or a view of one"):
        Plan.from_spec(spec, [], "alias").send(w)
    fine = PlanSpec("copy", 1, 0, 3, [_op(torch.Tensor.view_as, (torch.ones(1, 3), X), 1),
                                      _op(torch.Tensor.clone, (SlotRef(1),), 2)], SlotRef(2))
    mine = torch.zeros(1, 3)
    torch.testing.assert_close(Plan.from_spec(fine, [], "copy").send(w)(mine.send(w)).get(), torch.ones(1, 3))


class DataWriter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        self.seen.data.add_(x.sum(1))  # .data has its own version counter: the dry run's check did not see it
        return self.lin(x) * self.seen


def test_a_plan_writing_into_a_buffer_through_data_is_refused_before_any_charge(hook):
    w, x, _ = _dp_worker(hook, "rt-dpc2-data")
    model = DataWriter()
    with pytest.raises(PrivacyParameterError, match="writes into its parameters or buffers"):
        RemoteDPOwner(w, "toy", model, x[:1]).sanitized_gradient(model, None, None, 1.0)
    assert sy.dp.remaining_budget(w, spent=True) == (0.0, 0.0)


class ResidualNet(nn.Module):
    """What the alias walk must still accept: in-place ReLU, ``out += identity``, BatchNorm in eval mode and a
    fill value from a buffer."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 1)
        self.register_buffer("shift", torch.tensor(0.25))

    def forward(self, x):
        h = self.lin(x)
        h += x
        h = F.relu(self.bn(h), inplace=True)
        return self.head(h) + torch.full_like(x[:, :1], self.shift)


def test_a_model_with_inplace_relu_and_residual_adds_still_gives_plain_torchs_gradient(hook):
    w, x, y = _dp_worker(hook, "rt-dpc2-ok")
    model = ResidualNet().eval()
    released = RemoteDPOwner(w, "toy", model, x[:1]).sanitized_gradient(model, None, None, 1.0)
    model.zero_grad()
    ((model(x) - y) ** 2).sum(1).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(released[name], p.grad, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ckks_small():
    ctx = ckks.context(galois_keys=False)  # (mul needs no rotations)
    conjugation.add_conjugation_key(ctx)  # (an mm on owner data keeps real parts: refused without this key)
    return ctx


@pytest.mark.parametrize("owner_values", [[0.0, 0.0, 0.0], [1e-13, -1e-13, 0.0], [0.5, -1.0, 2.0]])
def test_depth_refusal_does_not_say_whether_the_owners_plaintext_was_zero(hook, ckks_small, owner_values):
    owner = sy.VirtualWorker(hook, id=f"rt-dpc2-ckks-{owner_values[0]}-{owner_values[2]}")
    owner.load(torch.tensor([owner_values], dtype=torch.float64), tags=("#w",), policy="review")
    row = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    prod = sy.he.encrypt(row, protocol="ckks", context=ckks_small).send(owner) * owner.search(["#w"])[0]
    twice = prod * 2.0  # every product leaves one level fewer: the default chain's 2 are used up here
    with pytest.raises(DepthRequiredError, match=r"has 0 left"):
        twice * 2.0
    with pytest.raises(ReviewPendingError) as pending:
        twice.get()
    owner.release_requests.approve(pending.value.request_id)
    expected = row * torch.tensor([owner_values], dtype=torch.float64) * 2.0
    torch.testing.assert_close(twice.get().decrypt(), expected, atol=1e-4, rtol=0)


def test_two_products_with_owner_values_differ_without_saying_whether_the_values_are_equal(hook, ckks_small):
    """``x * w[0] - x * w[1]``: the products shared x's randomness scaled by the plaintext, so the difference of
    equal values was transparent and failed (ProtectedDataError), an equality oracle on data under review (and on
    a guess: ``x * w[0] - x * 0.5``)."""
    owner = sy.VirtualWorker(hook, id="rt-dpc2-ckks-eq")
    w = torch.tensor([[0.5, 0.5, 0.25]], dtype=torch.float64)
    owner.load(w.clone(), tags=("#w",), policy="review")
    ptr = owner.search(["#w"])[0]
    x = torch.tensor([[1.5]], dtype=torch.float64)
    enc = sy.he.encrypt(x, protocol="ckks", context=ckks_small).send(owner)
    equal = (enc * ptr[:, 0:1]) - (enc * ptr[:, 1:2])
    unequal = (enc * ptr[:, 0:1]) - (enc * ptr[:, 2:3])
    guess = (enc * ptr[:, 0:1]) - (enc * torch.tensor([[0.5]], dtype=torch.float64))
    for diff, expected in ((equal, x * (w[:, 0:1] - w[:, 1:2])), (unequal, x * (w[:, 0:1] - w[:, 2:3])),
                           (guess, x * (w[:, 0:1] - 0.5))):
        with pytest.raises(ReviewPendingError) as pending:
            diff.get()
        owner.release_requests.approve(pending.value.request_id)
        torch.testing.assert_close(diff.get().decrypt(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("column", [[0.5, -0.5], [0.5, 0.25]])
def test_a_crafted_row_of_one_ciphertext_twice_does_not_say_whether_owner_values_cancel(hook, ckks_small, column):
    """The requester holds the secret key and can shape its ciphertext's randomness: a row [s, s] made ``mm``'s
    sum s * w[0] + s * w[1] transparent, so it failed exactly when w[0] == -w[1]."""
    owner = sy.VirtualWorker(hook, id=f"rt-dpc2-ckks-row-{column[1]}")
    w = torch.tensor([[column[0]], [column[1]]], dtype=torch.float64)
    owner.load(w.clone(), tags=("#w",), policy="review")
    one = sy.he.encrypt(torch.tensor([[1.0]], dtype=torch.float64), protocol="ckks", context=ckks_small)
    crafted = one._like([one.segments[0], one.segments[0].copy()], (1, 2))
    out = crafted.send(owner).mm(owner.search(["#w"])[0])
    with pytest.raises(ReviewPendingError) as pending:
        out.get()
    owner.release_requests.approve(pending.value.request_id)
    torch.testing.assert_close(out.get().decrypt(), torch.ones(1, 2, dtype=torch.float64) @ w, atol=1e-3, rtol=0)

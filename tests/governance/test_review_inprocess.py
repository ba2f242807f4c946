"""Review-before-release on in-process workers: policies, requests, decisions, and every leak path we know."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.exceptions import PermissionDeniedError, RequestDeniedError, ReviewPendingError
from veil.plans import func2plan, training_plan

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])


@pytest.fixture
def owner(hook):
    w = sy.VirtualWorker(hook, id=f"gov-{time.monotonic_ns()}")
    w.load(SECRET.clone(), tags=("#clinic", "#data"), description="clinic data", policy="review")
    return w


@pytest.fixture
def other(hook):
    return sy.VirtualWorker(hook, id=f"gov-other-{time.monotonic_ns()}")


def _data(w):
    return w.search(["#clinic"])[0]


def _pending(fn):
    with pytest.raises(ReviewPendingError) as info:
        fn()
    assert info.value.request_id and info.value.request_id.startswith("req-")
    return info.value.request_id


def test_open_policy_returns_derived_values_as_before(hook):
    w = sy.VirtualWorker(hook, id="gov-open")
    w.load(SECRET.clone(), tags=("#clinic",), policy="open")
    assert torch.equal((_data(w) * 2).get(), SECRET * 2)


def test_dp_only_policy_refuses_arithmetic(hook):
    w = sy.VirtualWorker(hook, id="gov-dp")
    w.load(SECRET.clone(), tags=("#clinic",), policy="dp-only")
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        _data(w) * 1


def test_review_get_files_a_request_and_approval_releases_exactly_once(owner):
    y = (_data(owner) * 2).sum(dim=0)
    rid = _pending(y.get)
    assert _pending(y.get) == rid  # asking again does not file a second request
    mine = sy.requests(owner)
    assert [(r["id"], r["state"], r["shape"]) for r in mine] == [(rid, "pending", [3])]
    req = owner.release_requests.get(rid)
    ops = [n["op"] for n in req.graph.values()]
    assert ops == ["dataset", "Tensor.mul", "Tensor.sum"] and req.graph[req.root]["shape"] == [3]
    assert "dim=0" in req.graph[req.root]["args"]
    assert "11, 6.5, -7.5" in owner.release_requests.preview(rid)  # the owner sees the value
    owner.release_requests.approve(rid)
    assert torch.equal(y.get(delete=False), (SECRET * 2).sum(dim=0))
    assert owner.release_requests.get(rid).state == "released"
    assert _pending(y.get) != rid  # once: the next release is a new request


def test_deny_raises_with_the_owners_message(owner):
    y = _data(owner).copy()
    rid = _pending(y.get)
    owner.release_requests.deny(rid, "too close to raw records")
    with pytest.raises(RequestDeniedError, match="too close to raw records"):
        y.get()
    assert sy.requests(owner)[0]["state"] == "denied"


def test_explicit_request_with_reason(owner):
    y = _data(owner).mean()
    info = y.request(reason="mean for the paper")
    assert info["state"] == "pending" and info["reason"] == "mean for the paper"
    assert owner.release_requests.get(info["id"]).reason == "mean for the paper"
    assert _pending(y.get) == info["id"]


def test_get_wait_returns_when_the_owner_approves(owner):
    y = _data(owner) + 1
    y.request("waiting test")

    def owner_approves():
        time.sleep(0.3)
        owner.release_requests.approve(owner.release_requests.pending()[0].id)

    t = threading.Thread(target=owner_approves)
    t.start()
    assert torch.equal(y.get(wait=10), SECRET + 1)
    t.join()


def test_get_wait_times_out_as_pending(owner):
    with pytest.raises(ReviewPendingError):
        (_data(owner) + 1).get(wait=0.3)


def test_approval_is_for_that_value_only(owner):
    s = torch.zeros(3).send(owner)
    y = _data(owner)[0] * 1
    rid = _pending(y.get)
    owner.release_requests.approve(rid)
    y.add_(_data(owner)[1])  # changed after the approval: the approval does not cover it
    assert _pending(y.get) != rid
    assert torch.equal(s.get(), torch.zeros(3))  # the scientist's own data is not under review


@pytest.mark.parametrize("path", ["mul", "copy", "plan", "inplace_into_own", "view_alias", "grad", "fit_state",
                                  "move", "out_kwarg"])
def test_no_path_releases_derived_data_without_approval(owner, other, path):
    x = _data(owner)

    def attempt():
        if path == "mul":
            return (x * 1).get()
        if path == "copy":
            return x.copy().get()
        if path == "plan":
            @func2plan(args_shape=[(-1, 3)])
            def plan(a):
                return a * 1 + 0

            return plan.send(owner)(x).get()
        if path == "inplace_into_own":
            z = torch.zeros(2, 3).send(owner)
            z.add_(x)
            return z.get()
        if path == "view_alias":
            z = torch.zeros(2, 3).send(owner)
            v = z.view(-1)
            z.add_(x)
            return v.get()
        if path == "grad":
            w = torch.ones(3, 1, requires_grad=True).send(owner)
            (x @ w).sum().backward()
            return w.grad.get()
        if path == "fit_state":
            model = nn.Linear(3, 1)
            tp = training_plan(model, F.mse_loss, lr=0.1, args_shape=[(-1, 3), (-1, 1)])
            ptr = tp.send(owner)
            ptr.fit(x, torch.zeros(2, 1).send(owner), batch_size=2, epochs=1, shuffle=False)
            return ptr.get_state()
        if path == "move":
            return (x * 1).move(other).get()
        if path == "out_kwarg":
            z = torch.zeros(2, 3).send(owner)
            torch.add(x, 0, out=z)
            return z.get()
        raise AssertionError(path)

    with pytest.raises(ReviewPendingError):
        attempt()
    assert torch.equal(dict(owner.monitor.owner_entries())[next(iter(
        oid for oid, e in owner.monitor.owner_entries() if e.protected))].obj, SECRET)  # owner data unchanged
    assert torch.equal((torch.ones(2) * 3).send(owner).get(), torch.ones(2) * 3)  # still serves


def test_policy_change_at_run_time(owner):
    y = _data(owner) * 2
    _pending(y.get)
    owner.set_policy("#clinic", "open")
    assert torch.equal(y.get(), SECRET * 2)
    owner.set_policy("clinic", "review")
    _pending((_data(owner) * 2).get)
    with pytest.raises(ValueError):
        owner.set_policy("#clinic", "whatever")


def test_decisions_are_audited(owner):
    y = _data(owner) * 2
    rid = _pending(y.get)
    owner.release_requests.approve(rid)
    y.get()
    from veil.governance.state import governance

    actions = [(r["action"], r["outcome"]) for r in governance(owner).db.audit_entries()]
    assert ("request", "pending") in actions and ("approve", "allowed") in actions and ("release", "allowed") in actions


def test_switching_to_review_covers_what_was_computed_before(hook):
    w = sy.VirtualWorker(hook, id="gov-switch")
    w.load(SECRET.clone(), tags=("#clinic",), policy="open")
    before = _data(w) * 2  # computed while nothing was tracked
    own = torch.ones(3).send(w)
    w.set_policy("#clinic", "review")
    rid = _pending(before.get)
    assert w.release_requests.get(rid).graph[w.release_requests.get(rid).root]["label"].startswith("computed before")
    _pending(own.get)  # conservative: anything that existed at the switch may derive from the data
    assert torch.equal(torch.ones(2).send(w).get(), torch.ones(2))  # new own tensors are free


def test_a_tensor_written_in_place_from_review_data_gets_value_free_errors(hook, other):
    # One source set (the monitor's Entry.provenance): an in-place write from review data taints the
    # scientist's tensor for the error rules too, so an error text cannot quote the review data.
    w = sy.VirtualWorker(hook, id=f"gov-inplace-{time.monotonic_ns()}", pipelining=False)  # errors at the call
    w.load(torch.tensor([[4, 0, 1]]), tags=("#idx",), policy="review")
    mine = torch.zeros(1, 3, dtype=torch.long).send(w)
    mine.add_(w.search(["#idx"])[0])
    table = torch.zeros(1, 3).send(w)
    with pytest.raises(sy.exceptions.VeilError) as info:
        torch.gather(table, 1, mine)  # index 4 is out of bounds: torch's text would quote the value
    assert "index 4" not in str(info.value) and "protected data" in str(info.value)
    clean = torch.tensor([[4, 0, 1]]).send(w)  # the same op on the scientist's own values keeps its text
    with pytest.raises(sy.exceptions.VeilError, match="index 4"):
        torch.gather(table, 1, clean)
    _pending(mine.get)

"""Red team of one-request federated rounds (``PlanPointer.train_round``: load_state, fit and the mean loss as
deferred commands in front of one GetObjectsMessage of the mean and the new state) over a real ``veil worker``.

The round must keep every owner rule of the four-request path (load_state, fit, ``losses.mean().get()``,
``get_state()``): review data waits for approval, dp-only data refuses the fit, private data is computed
on but never read, errors on owner data name only the op, and a hostile plan pointer (the owner's data as its
"state") neither writes nor reads the owner's objects. Each test compares the two paths, checks the owner's
data is unchanged, and ends with the worker still serving.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from veil.exceptions import (PermissionDeniedError, ProtectedDataError, RemoteExecutionError, ReviewPendingError,
                             VeilError)
from veil.plans import training_plan
from veil.plans.ops import PlanOp, PlanSpec, SlotRef
from veil.plans.plan import Plan
from veil.workers.websocket_cli import read_csv

from network_helpers import BOSTON, TOKEN

DATA, TARGET, _ = read_csv(__import__("pathlib").Path(BOSTON), "MEDV")


@pytest.fixture(scope="module")
def worker():
    """Boston three times: #open (open policy, private: no raw .get()), #rev (review), #dpo (dp-only)."""
    from veil.workers.websocket_launcher import start_worker

    wp = start_worker("alice", ["--token", TOKEN,
                                "--dataset", f"open={BOSTON}:target=MEDV", "--policy", "open=open",
                                "--dataset", f"rev={BOSTON}:target=MEDV", "--policy", "rev=review",
                                "--dataset", f"dpo={BOSTON}:target=MEDV", "--policy", "dpo=dp-only"])
    yield wp
    wp.kill()


@pytest.fixture
def alice(worker, hook):
    import veil as sy

    conn = sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=worker.port, token=TOKEN, timeout=120)
    yield conn
    conn.close()


def _dataset(alice, name):
    return alice.search([f"#{name}", "#data"])[0], alice.search([f"#{name}", "#target"])[0]


def _plan(alice, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 4), nn.ReLU(), nn.Linear(4, 1))
    return training_plan(model, F.mse_loss, lr=1e-6, args_shape=[(-1, 13), (-1, 1)]).send(alice)


def _start(seed=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 4), nn.ReLU(), nn.Linear(4, 1))
    return [p.detach().clone() for p in model.parameters()]


def _four_requests(pp, start, x, y, **fit):
    pp.load_state(start)
    losses = pp.fit(x, y, **fit)
    return losses.mean().get(), pp.get_state()


def _outcome(call):
    try:
        return "ok", call()
    except VeilError as e:
        return type(e), str(e)


def _unchanged_and_serving(alice):
    """The owner's data as loaded (its column sums, a derived result the open policy releases), and the
    worker answers."""
    x, y = _dataset(alice, "open")
    assert torch.allclose(x.sum(dim=0).get(), DATA.sum(dim=0)) and torch.allclose(y.sum().get(), TARGET.sum())
    assert torch.equal((torch.ones(3).send(alice) * 2).get(), torch.full((3,), 2.0))


def test_a_round_on_private_open_data_equals_the_four_requests_and_reads_nothing_raw(alice):
    x, y = _dataset(alice, "open")
    fit = dict(batch_size=64, epochs=1, seed=5)
    mean4, state4 = _four_requests(_plan(alice), _start(), x, y, **fit)
    mean1, state1 = _plan(alice).train_round(_start(), x, y, **fit)
    assert torch.equal(mean1, mean4) and all(torch.equal(a, b) for a, b in zip(state1, state4))
    with pytest.raises(PermissionDeniedError):
        x.get()
    _unchanged_and_serving(alice)


def test_review_data_waits_for_approval_in_one_round_as_in_four(alice):
    x, y = _dataset(alice, "rev")
    fit = dict(batch_size=64, epochs=1, seed=5)
    four = _outcome(lambda: _four_requests(_plan(alice), _start(), x, y, **fit))
    one = _outcome(lambda: _plan(alice).train_round(_start(), x, y, **fit))
    assert four[0] is ReviewPendingError and one[0] is ReviewPendingError, (four, one)
    _unchanged_and_serving(alice)


def test_dp_only_data_refuses_the_fit_in_one_round_as_in_four(alice):
    x, y = _dataset(alice, "dpo")
    fit = dict(batch_size=64, epochs=1, seed=5)
    four = _outcome(lambda: _four_requests(_plan(alice), _start(), x, y, **fit))
    one = _outcome(lambda: _plan(alice).train_round(_start(), x, y, **fit))
    assert four[0] is PermissionDeniedError and one[0] is PermissionDeniedError, (four, one)
    assert "differential-privacy" in four[1] and "differential-privacy" in one[1]
    _unchanged_and_serving(alice)


def _indexing_plan(alice):
    """A "training" plan whose loss indexes a 3-element constant with the target's values: the error text
    of the failing index quotes a target value (``index 24 is out of bounds``)."""
    spec = PlanSpec("probe", 2, 0, 5, [
        PlanOp("Tensor.long", (SlotRef(1),), {}, [2], False),
        PlanOp("Tensor.__getitem__", (torch.zeros(3), SlotRef(2)), {}, [3], False),
        PlanOp("Tensor.sum", (SlotRef(3),), {}, [4], False),
    ], SlotRef(4))
    return Plan.from_spec(spec, [], "probe").send(alice)


def test_an_error_on_owner_data_names_only_the_op_in_one_round_as_in_four(alice):
    x, y = _dataset(alice, "open")
    fit = dict(batch_size=506, epochs=1, shuffle=False)
    four = _outcome(lambda: _indexing_plan(alice).fit(x, y, **fit).get())
    one = _outcome(lambda: _indexing_plan(alice).train_round([], x, y, **fit))
    assert four[0] is ProtectedDataError and one[0] is ProtectedDataError, (four, one)
    values = {str(int(v)) for v in TARGET.flatten().tolist() if v >= 10}
    for _, text in (four, one):
        assert not any(f"index {v}" in text or f" {v} " in text for v in values), text
    _unchanged_and_serving(alice)


@pytest.mark.parametrize("name", ["open", "rev"])
def test_a_plan_pointer_whose_state_is_the_owners_data_neither_writes_nor_reads_it(alice, name):
    """``train_round`` loads ``values`` into the plan's state in place and returns the state: with the
    dataset's own pointers as the "state", the load writes a copy and the release is a .get() of owner
    data (refused)."""
    x, y = _dataset(alice, name)
    pp = _plan(alice)
    honest_state = pp.state
    pp.state = [x]  # the hostile pointer: a one-tensor "state" that is the dataset itself
    probe = Plan.from_spec(PlanSpec("id", 2, 1, 4, [PlanOp("Tensor.sum", (SlotRef(2),), {}, [3], False)],
                                    SlotRef(3)), [torch.zeros(DATA.shape)], "id").send(alice)
    probe.state = [x]
    for target in (pp, probe):  # (the model's fit fails on the wrong state; the probe's release is refused)
        kind, text = _outcome(lambda: target.train_round([torch.zeros(DATA.shape)], x, y, batch_size=64, epochs=1))
        # (the model's wrong count of state tensors is the requester's own argument: said as it is, value-free)
        assert kind in (PermissionDeniedError, ProtectedDataError) or (
            kind is RemoteExecutionError and "takes 2 inputs and 4 state tensors, got 2 and 1" in text), (kind, text)
    pp.state = honest_state
    _unchanged_and_serving(alice)

"""Secure aggregation on review-policy data: the coordinator learns the sum only after each owner approved.

Before: a client's masked input left without review, so the coordinator recovered the sum of updates trained on
review data with no approval (README known limit). Now the masked input is a release of the client's state.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import veil as sy
from veil.exceptions import RequestDeniedError, ReviewPendingError
from veil.federated.secure_agg import ClientInput, secure_aggregate

SECRET = torch.tensor([[1.5, -2.25, 3.0], [4.0, 5.5, -6.75]])


def _clients(hook, policy_of_first):
    tag = time.monotonic_ns()
    workers = [sy.VirtualWorker(hook, id=f"sa-review-{tag}-{i}") for i in range(3)]
    inputs, plain = {}, {}
    for i, w in enumerate(workers):
        w.load(SECRET.clone() + i, tags=("#data",), policy=policy_of_first if i == 0 else "open")
        data = w.search(["#data"])[0]
        state = [(data * 0.5).sum(dim=0), data.mean().reshape(1)]  # an "update" derived from the owner's data
        inputs[w.id] = ClientInput(w, state, float(i + 1))
        plain[w.id] = [((SECRET + i) * 0.5).sum(dim=0), (SECRET + i).mean().reshape(1)]
    expected = [sum(inputs[w].weight * plain[w][k] for w in inputs) for k in range(2)]
    return workers, inputs, expected


def test_open_data_aggregates_as_before(hook):
    _, inputs, expected = _clients(hook, "open")
    result = secure_aggregate(inputs, 11)
    for got, want in zip(result.total, expected):
        assert torch.allclose(got, want, atol=1e-4)


def test_review_data_waits_for_the_owner_then_aggregates_once(hook):
    workers, inputs, expected = _clients(hook, "review")
    with pytest.raises(ReviewPendingError) as info:
        secure_aggregate(inputs, 12)
    pending = sy.requests(workers[0])
    assert [r["state"] for r in pending] == ["pending", "pending"]  # both state tensors, in one error
    assert all(r["id"] in str(info.value) for r in pending)
    for r in pending:
        workers[0].release_requests.approve(r["id"])
    result = secure_aggregate(inputs, 13)
    for got, want in zip(result.total, expected):
        assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(ReviewPendingError):  # the approval released that state once
        secure_aggregate(inputs, 14)


def test_review_wait_lets_the_owner_approve_during_the_round(hook):
    workers, inputs, expected = _clients(hook, "review")

    def owner_approves():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pending = [r for r in sy.requests(workers[0]) if r["state"] == "pending"]
            if len(pending) == 2:
                for r in pending:
                    workers[0].release_requests.approve(r["id"])
                return
            time.sleep(0.05)

    t = threading.Thread(target=owner_approves)
    t.start()
    result = secure_aggregate(inputs, 15, review_wait=20)
    t.join()
    for got, want in zip(result.total, expected):
        assert torch.allclose(got, want, atol=1e-4)


def test_a_denied_update_stops_the_round(hook):
    workers, inputs, _ = _clients(hook, "review")
    with pytest.raises(ReviewPendingError) as info:
        secure_aggregate(inputs, 16)
    workers[0].release_requests.deny(info.value.request_id, "not this week")
    with pytest.raises(RequestDeniedError, match="not this week"):
        secure_aggregate(inputs, 17)


def test_fl_train_with_secure_aggregation_waits_for_reviews(hook):
    """fl.train over review data: each round's updates are approved by the owner (here a thread) before the sum."""
    from torch import nn

    from veil import federated as fl

    tag = time.monotonic_ns()
    workers = [sy.VirtualWorker(hook, id=f"sa-train-{tag}-{i}") for i in range(3)]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, generator=g), torch.randn(24, 1, generator=g)
    datasets = []
    for i, w in enumerate(workers):
        policy = "review" if i == 0 else "open"
        w.load(x[8 * i:8 * i + 8].clone(), tags=("#x",), policy=policy)
        w.load(y[8 * i:8 * i + 8].clone(), tags=("#y",), policy=policy)
        datasets.append(fl.BaseDataset(w.search(["#x"])[0], w.search(["#y"])[0]))
    approved = []
    stop = threading.Event()

    def owner_approves_everything():
        while not stop.is_set():
            for r in sy.requests(workers[0]):
                if r["state"] == "pending":
                    workers[0].release_requests.approve(r["id"])
                    approved.append(r["id"])
            time.sleep(0.05)

    t = threading.Thread(target=owner_approves_everything, daemon=True)
    t.start()
    try:
        model = nn.Linear(3, 1)
        history = fl.train(model, fl.FederatedDataset(datasets), rounds=1, secure_aggregation=True, review_wait=30,
                           progress=False, seed=0)
    finally:
        stop.set()
        t.join()
    assert len(history.rounds[0].clients) == 3 and not history.rounds[0].dropped and approved  # the review-data client took part, approved

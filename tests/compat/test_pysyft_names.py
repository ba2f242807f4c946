"""PySyft 0.2 names at PySyft's paths (issue #15: items 4, 9, 10, 11, 12), compared with
plain PyTorch or PySyft's documented output."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import veil as sy
from veil.datasets import load_boston


# ------------------------------------------------------------------ 4: sandbox and grid

def test_create_sandbox_and_grid_search(hook):
    gbs: dict = {}
    sy.create_sandbox(gbs, verbose=False)
    assert [w.id for w in gbs["workers"]] == ["bob", "theo", "jason", "alice", "andy", "jon"]
    assert gbs["bob"] is gbs["workers"][0]
    grid = sy.PrivateGridNetwork(*gbs["workers"])
    data = grid.search("#boston", "#data")
    target = grid.search("#boston", "#target")
    assert set(data) == set(target) == {w.id for w in gbs["workers"]}
    x, _, _ = load_boston()
    rows = torch.cat([ptrs[0].get() for ptrs in data.values()])
    assert torch.allclose(rows, x)  # the owner's rows come back in order (no loss, no change)
    assert grid.search("#nothing-like-this") == {}
    assert isinstance(gbs["grid"], sy.grid.PrivateGridNetwork)


# ------------------------------------------------------------------ 9: plans and protocols

class Net(sy.Plan):
    def __init__(self):
        super(Net, self).__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=0)


def test_plan_subclass_runs_locally_remotely_and_comes_back(ws):
    alice = ws[1]
    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    x = torch.tensor([1.0, 0.0])
    ref = F.log_softmax(net.fc2(F.relu(net.fc1(x))), dim=0)
    assert torch.allclose(net(x), ref)
    ptr = net.send(alice)
    assert torch.allclose(ptr(x.send(alice)).get(), ref)
    back = ptr.get()
    assert torch.allclose(back(x), ref)


def test_func2plan_with_state(ws):
    bob = ws[0]

    @sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1.0]),))
    def plan_add_bias(x, state):
        (bias,) = state.read()
        return (x + bias) * 2

    assert torch.equal(plan_add_bias(torch.tensor([3.0])), torch.tensor([8.0]))
    ptr = plan_add_bias.send(bob)
    assert torch.equal(ptr(torch.tensor([3.0]).send(bob)).get(), torch.tensor([8.0]))


def test_protocol_deploy_run_and_request_search(hook, ws):
    bob, alice, james = ws

    @sy.func2plan(args_shape=[(1,)])
    def inc(x):
        return x + 1

    protocol = sy.Protocol([("worker1", inc), ("worker2", inc), ("worker3", inc)])
    protocol.deploy(alice, bob, james)
    ptr = protocol.run(torch.tensor([1.0]))
    assert ptr.location is james and torch.equal(ptr.get(), torch.tensor([4.0]))
    with pytest.raises(NotImplementedError, match="deploy"):
        protocol.send(james)
    t = torch.tensor([7.0]).tag("#proto").send(james)
    found = hook.local_worker.request_search(["#proto"], location=james)
    assert [p.id_at_location for p in found] == [t.id_at_location]


# ------------------------------------------------------------------ 10: workers

def test_worker_listing_counting_integer_ids_and_add_worker(hook):
    w = sy.VirtualWorker(hook, id=7)
    assert w.id == "7" and hook.workers["7"] is w
    ptrs = [torch.tensor([float(i)]).send(w) for i in range(3)]
    assert w.objects_count() == 3 == len(w.list_objects())
    assert {d.id for d in w.list_objects()} == {p.id_at_location for p in ptrs}
    other = sy.VirtualWorker(hook, id="other-x")
    assert w.add_worker(other) is w and w.resolve_worker("other-x") is other


def test_websocket_server_requires_a_token_and_says_how(hook):
    with pytest.raises(ValueError, match=r"tokens.add\(sy.new_token\(\)"):
        sy.WebsocketServerWorker(hook, id="srv", port=0)
    tokens = sy.TokenTable()
    tokens.add(sy.new_token(), "alice")
    server = sy.WebsocketServerWorker(hook, id="srv2", port=0, tokens=tokens)
    assert callable(server.start)


def test_websocket_client_without_token_says_how(hook, monkeypatch):
    monkeypatch.delenv("VEIL_TOKEN", raising=False)
    with pytest.raises(sy.exceptions.PermissionDeniedError, match="token=... or set VEIL_TOKEN"):
        sy.WebsocketClientWorker(hook, id="remote", host="127.0.0.1", port=1, lazy=True)


# ------------------------------------------------------------------ 11: federated utilities

def test_federated_loader_iter_per_worker(ws):
    bob, alice, _ = ws
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10.0)
    fed = sy.frameworks.torch.fl.FederatedDataset([
        sy.BaseDataset(x[:6], y[:6]).send(bob), sy.BaseDataset(x[6:], y[6:]).send(alice)])
    loader = sy.FederatedDataLoader(fed, batch_size=2, iter_per_worker=True)
    steps = list(loader)
    assert len(steps) == len(loader) == 3
    assert [set(w.id for w in s) for s in steps] == [{bob.id, alice.id}, {bob.id, alice.id}, {bob.id}]
    got = torch.cat([s[bob][0].get() for s in steps])
    assert torch.equal(got, x[:6])


def test_federated_avg_and_optims():
    torch.manual_seed(0)
    models = {"bob": nn.Linear(3, 2), "alice": nn.Linear(3, 2)}
    before = {k: copy.deepcopy(m.state_dict()) for k, m in models.items()}
    avg = sy.frameworks.torch.fl.utils.federated_avg(models)
    for name, p in avg.named_parameters():
        assert torch.allclose(p, (before["bob"][name] + before["alice"][name]) / 2)
    assert all(torch.equal(models["bob"].state_dict()[k], v) for k, v in before["bob"].items())

    model = nn.Linear(3, 1)
    optims = sy.federated.floptimizer.Optims(["bob", "alice"], optim=torch.optim.Adam(model.parameters(), lr=0.1))
    assert optims.count() == 2
    ob, oa = optims.get_optim("bob"), optims.get_optim("alice")
    assert ob is not oa and ob.param_groups[0]["params"][0] is model.weight
    model(torch.ones(1, 3)).sum().backward()
    ob.step()
    assert len(ob.state) == 2 and len(oa.state) == 0  # per-worker optimizer state stays separate


# ------------------------------------------------------------------ 12: PATE analysis

def test_perform_analysis_matches_pysyft_numbers():
    # Inputs of PySyft 0.2.4's own test (numpy seed 0); the expected values are
    # what PySyft 0.2.4's perform_analysis returned for them: (data-dependent, data-independent).
    np.random.seed(0)
    preds = (np.random.rand(100, 50) * 10).astype(int)
    indices = (np.random.rand(50) * 10).astype(int)
    preds[:, 0:10] *= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep, ind = sy.frameworks.torch.dp.pate.perform_analysis(preds, indices, noise_eps=0.1, delta=1e-5)
    assert dep == pytest.approx(1.4828339080100443, rel=1e-9)
    assert ind == pytest.approx(7.837641821656743, rel=1e-9)
    # the data-independent bound by hand: min_l (50 * 2 gamma^2 l (l+1) + ln(1/delta)) / l, gamma = 0.1
    by_hand = min((50 * 0.02 * l * (l + 1) + np.log(1e5)) / l for l in range(1, 9))
    assert ind == pytest.approx(by_hand)

    rng = np.random.RandomState(5)
    p2 = rng.randint(0, 3, size=(200, 40))
    p2[:, :30] = 1
    i2 = rng.randint(0, 40, size=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep2, ind2 = sy.frameworks.torch.dp.pate.perform_analysis(torch.tensor(p2), torch.tensor(i2), 0.05, 1e-5,
                                                                  moments=10, num_classes=3)  # (default 10)
    assert (dep2, ind2) == (pytest.approx(1.5937063224395753), pytest.approx(3.239115683121279))


def test_perform_analysis_rejects_bad_input():
    from veil.dp.errors import PrivacyParameterError

    with pytest.raises(PrivacyParameterError):
        sy.frameworks.torch.dp.pate.perform_analysis(np.zeros((3, 4), int), np.array([9]), 0.1)
    with pytest.raises(PrivacyParameterError):
        sy.frameworks.torch.dp.pate.perform_analysis(np.zeros((3, 4), int), np.array([0]), -1.0)

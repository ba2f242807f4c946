"""Federated datasets, loader, strategies, FedAvg/FedProx and secure aggregation."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil import federated as fl
from veil.datasets import load_boston, train_test_split
from veil.exceptions import ConnectionLostError, WorkerMismatchError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))


@pytest.fixture(scope="module")
def boston():
    x, y, _ = load_boston()
    return train_test_split(x, y, seed=0)


def test_federated_dataset_and_loader(alice, bob):
    d1, t1 = torch.randn(10, 3), torch.randn(10, 1)
    d2, t2 = torch.randn(7, 3), torch.randn(7, 1)
    fed = fl.FederatedDataset([fl.BaseDataset(d1, t1).send(bob), fl.BaseDataset(d2, t2).send(alice)])
    assert fed.workers == ["bob", "alice"] and len(fed) == 17
    loader = fl.FederatedDataLoader(fed, batch_size=4)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 + 2
    assert [b[0].location.id for b in batches] == ["bob"] * 3 + ["alice"] * 2  # per-worker order
    assert torch.equal(torch.cat([d.get() for d, _ in batches[:3]]), d1)
    assert len(fl.FederatedDataLoader(fed, batch_size=4, drop_last=True)) == 2 + 1
    shuffled = list(fl.FederatedDataLoader(fed, batch_size=10, shuffle=True))
    got = shuffled[0][0].get()
    assert not torch.equal(got, d1) and torch.allclose(got.sum(0), d1.sum(0), atol=1e-5)


def test_dataset_parts_must_share_a_worker(alice, bob):
    with pytest.raises(WorkerMismatchError, match="alice.*bob|bob.*alice"):
        fl.BaseDataset(torch.randn(3, 2).send(alice), torch.randn(3).send(bob))


def test_federate_splits_and_sends(alice, bob):
    x, y = torch.randn(9, 2), torch.randn(9)
    fed = torch.utils.data.TensorDataset(x, y).federate((alice, bob))
    assert fed.workers == ["alice", "bob"] and len(fed["alice"]) == 5
    assert torch.equal(fed["bob"].data.get(), x[5:])


def test_pointer_training_loop_from_the_tutorial(alice, bob, boston):
    xtr, ytr, _, _ = boston
    fed = fl.FederatedDataset([fl.BaseDataset(xtr[:40], ytr[:40]).send(bob),
                               fl.BaseDataset(xtr[40:80], ytr[40:80]).send(alice)])
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    first = None
    for _ in range(3):
        for data, target in fl.FederatedDataLoader(fed, batch_size=8, shuffle=True):
            model.send(data.location)
            opt.zero_grad()
            loss = F.mse_loss(model(data), target)
            loss.backward()
            opt.step()
            model.get()
            value = loss.get().item()
            first = value if first is None else first
    with torch.no_grad():
        assert F.mse_loss(model(xtr[:80]), ytr[:80]).item() < first


def test_weighted_average_is_pure_and_exact():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([3.0, 6.0]), torch.tensor([[7.0]])]
    out = fl.weighted_average([a, b], [1, 3])
    assert torch.allclose(out[0], torch.tensor([2.5, 5.0])) and torch.allclose(out[1], torch.tensor([[6.0]]))
    with pytest.raises(ValueError):
        fl.weighted_average([a, b], [0, 0])


def _centralized_mse(xtr, ytr, xte, yte, epochs, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 8):
            idx = perm[i:i + 8]
            opt.zero_grad()
            F.mse_loss(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        return F.mse_loss(model(xte), yte).item()


def _splits(xtr, ytr, n, iid):
    if iid:
        return list(zip(torch.tensor_split(xtr, n), torch.tensor_split(ytr, n)))
    order = torch.argsort(ytr.flatten())  # non-IID: each worker holds one price band
    return list(zip(torch.tensor_split(xtr[order], n), torch.tensor_split(ytr[order], n)))


FED_SEEDS, CENTRAL_SEEDS = range(5), range(20)
CENTRAL_BATCH, CENTRAL_LR, EPOCHS = 8, 0.001, 10


def _centralized_mses(xtr, ytr, xte, yte, epochs, seeds):
    """:func:`_centralized_mse` for every seed at once: the seeds' models stacked and trained together (torch.func's
    vmap over their parameters; each seed keeps its own initial weights and batch order), ~8x faster than one
    run after the other (the loop cost ~10 s of the default suite)."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    models, gens = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1)))
        gens.append(torch.Generator().manual_seed(seed))
    params, _ = stack_module_state(models)
    shape = models[0]
    step_grads = vmap(grad(lambda p, xb, yb: F.mse_loss(functional_call(shape, p, (xb,)), yb)))
    for _ in range(epochs):
        perms = torch.stack([torch.randperm(len(xtr), generator=g) for g in gens])
        for i in range(0, len(xtr), 8):
            idx = perms[:, i:i + 8]
            grads = step_grads(params, xtr[idx], ytr[idx])
            params = {k: v - 0.001 * grads[k] for k, v in params.items()}  # SGD, lr 0.001
    with torch.no_grad():
        return vmap(lambda p: F.mse_loss(functional_call(shape, p, (xte,)), yte))(params).tolist()


@pytest.fixture(scope="module")
def central_mean_mse(boston):
    """Centralized SGD's mean test MSE over CENTRAL_SEEDS: the same for every case below, computed once."""
    xtr, ytr, xte, yte = boston
    central = _centralized_mses(xtr, ytr, xte, yte, EPOCHS, CENTRAL_SEEDS)
    # the stacked runs are the plain loop's runs: one seed checked against torch.optim.SGD's
    assert central[3] == pytest.approx(_centralized_mse(xtr, ytr, xte, yte, EPOCHS, 3), rel=1e-4)
    return sum(central) / len(central)


# ten workers: 30-35 s each on CI's 2 cores (the default suite keeps the two-worker IID case; VEIL_SLOW=1 runs all)
@pytest.mark.parametrize("n_workers,iid", [(2, True), pytest.param(2, False, marks=pytest.mark.slow),
                                           pytest.param(10, True, marks=pytest.mark.slow),
                                           pytest.param(10, False, marks=pytest.mark.slow)])
def test_fedavg_close_to_centralized(hook, boston, central_mean_mse, n_workers, iid):
    """Within 10% of centralized SGD (batch 8, lr 0.001, 10 epochs), in mean test MSE.

    A round's clients all start from the same weights, so a round over K
    clients of batch B acts like one SGD step on K*B samples: to match a
    centralized run with batch 8, each client takes one step on
    B = max(1, 8 // K) samples (FedSGD) with the per-sample learning rate kept
    (client lr = 0.001 * B / 8, server_lr = K). FedAvg's default (batch 8 per
    client, plain averaging) lands at 1.2x (IID) to 1.5x (non-IID) instead.
    Seeds matter: test MSEs spread by ~15% between seeds (a 20-seed simulation
    gives ratios 0.96-1.03), so the bound compares means: federated over 5
    seeds, centralized (cheap) over 20.
    """
    xtr, ytr, xte, yte = boston
    splits = _splits(xtr, ytr, n_workers, iid)
    workers = [sy.VirtualWorker(hook, id=f"fl{n_workers}{iid}_{i}") for i in range(n_workers)]
    fed = fl.FederatedDataset(fl.BaseDataset(x, y).send(w) for (x, y), w in zip(splits, workers))
    batch = max(1, CENTRAL_BATCH // n_workers)
    rounds = EPOCHS * -(-max(len(x) for x, _ in splits) // batch)
    fed_mse = []
    for seed in FED_SEEDS:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))
        fl.train(model, fed, rounds=rounds, lr=CENTRAL_LR * batch / CENTRAL_BATCH, batch_size=batch,
                 steps_per_round=1, strategy=fl.FedAvg(server_lr="clients"), progress=False, seed=seed)
        with torch.no_grad():
            fed_mse.append(F.mse_loss(model(xte), yte).item())
    fed_mean = sum(fed_mse) / len(fed_mse)
    assert fed_mean <= 1.10 * central_mean_mse, (fed_mse, central_mean_mse)


def test_secure_aggregation_equals_plain_average_and_hides_updates(hook):
    workers = [sy.VirtualWorker(hook, id=f"sa_{i}") for i in range(3)]
    states = {w.id: [torch.randn(4, 3), torch.randn(3)] for w in workers}
    ptrs = {w.id: [t.send(w) for t in states[w.id]] for w in workers}
    weights = {"sa_0": 0.5, "sa_1": 0.3, "sa_2": 0.2}
    me = hook.local_worker
    me.stats.reset()
    total = fl.secure_agg.secure_sum(ptrs, weights, tag=77)
    expected = fl.weighted_average([states[w] for w in weights], list(weights.values()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(total, expected))
    # per client: a public key, one masked vector of 15 + 2 ring elements, 3 seed shares, 3 confirmation tags
    # of 32 bytes (+ envelopes)
    assert me.stats.bytes_received < 3 * (32 * 8 + 17 * 8 + 3 * 66 * 8 + 3 * 32 * 8 + 1000)
    assert all(not w.__dict__.get("_secagg_rounds") for w in workers)  # round state deleted after unmasking


def test_fedavg_with_secure_aggregation_and_fedprox(hook, boston):
    xtr, ytr, xte, yte = boston
    workers = [sy.VirtualWorker(hook, id=f"sp_{i}") for i in range(2)]
    fed = fl.federate(torch.utils.data.TensorDataset(xtr, ytr), workers)
    for strategy, secure in ((fl.FedAvg(), True), (fl.FedProx(mu=0.01), False)):
        model = _mlp()
        hist = fl.train(model, fed, rounds=5, lr=0.001, strategy=strategy, secure_aggregation=secure,
                        eval_data=(xte, yte), progress=False)
        assert hist.rounds[-1].eval_loss < hist.rounds[0].eval_loss
        assert "round" in hist.table()


class FlakyWorker(sy.VirtualWorker):
    fail = False

    def _recv_msg(self, data):
        if self.fail:
            raise ConnectionLostError(f"worker {self.id} is unreachable")
        return super()._recv_msg(data)


def test_dropout_completes_round_with_the_others(hook, boston):
    xtr, ytr, xte, yte = boston
    good = sy.VirtualWorker(hook, id="drop_ok")
    flaky = FlakyWorker(hook, id="drop_flaky")
    fed = fl.federate(torch.utils.data.TensorDataset(xtr, ytr), [good, flaky])
    flaky.fail = True
    with pytest.warns(UserWarning, match="drop_flaky"):
        hist = fl.train(_mlp(), fed, rounds=2, lr=0.001, min_workers=1, progress=False)
    assert hist.rounds[0].clients == ["drop_ok"] and hist.rounds[0].dropped == ["drop_flaky"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="2 required"):
            fl.train(_mlp(), fed, rounds=1, lr=0.001, min_workers=2, progress=False)


def test_fedavg_with_encrypted_aggregation_matches_plain(hook, boston):
    from veil.federated.he_agg import EncryptedAggregation

    xtr, ytr, xte, yte = boston
    workers = [sy.VirtualWorker(hook, id=f"he_fl_{i}") for i in range(3)]
    fed = fl.federate(torch.utils.data.TensorDataset(xtr, ytr), workers)
    ctx = sy.he.ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], global_scale=2**40)
    plain, enc = _mlp(), _mlp()
    fl.train(plain, fed, rounds=2, lr=0.001, progress=False, seed=3)
    fl.train(enc, fed, rounds=2, lr=0.001, progress=False, seed=3, encrypted_aggregation=EncryptedAggregation(context=ctx))
    for a, b in zip(plain.parameters(), enc.parameters()):
        assert torch.allclose(a, b, atol=1e-4)
    # each round's (public, fresh) context was freed with the round's ciphertexts
    stored = [o for w in workers for o in w._objects.values() if type(o).__name__ == "CKKSContext"]
    assert not stored

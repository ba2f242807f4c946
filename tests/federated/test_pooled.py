"""Batched dispatch (fl.train over a client pool) without Ray: an in-process pool of VirtualWorkers.

The pool path must give what the one-client-at-a-time path gives (same seeds -> same model),
and both what plain PyTorch FedAvg gives; a failing client is dropped with its own error; the
streaming aggregation equals the list one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.federated import trainer as fl
from veil.federated.client_pool import ClientIds
from veil.federated.pooled import client_seed, derive_ids
from veil.federated.strategies import ClientUpdate, FedAvg, FedProx, RunningWeightedSum, weighted_average

import fl_helpers


class VirtualPool(fl_helpers.VirtualPool):
    """Clients as VirtualWorkers; ``exchange`` hands each client its requests in chunks, out of order."""

    def __init__(self, hook, parts, prefix: str, per_call: int = 3) -> None:
        super().__init__(hook, parts, prefix, per_call)
        self.calls = 0

    def exchange(self, build, indices=None):
        order = list(range(len(self))) if indices is None else list(indices)
        chunks = [order[k:k + self.per_call] for k in range(0, len(order), self.per_call)]
        for chunk in reversed(chunks):  # completion order differs from the dataset order
            self.calls += 1
            jobs = [(i, build(i)) for i in chunk]
            for i, requests in jobs:
                yield i, [self.workers[i]._recv_msg(r) for r in requests]


def _parts(n: int, seed: int = 0, rows=(6, 9, 12)):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.5], [-2.0], [0.5]])
    out = []
    for k in range(n):
        x = torch.randn(rows[k % len(rows)], 3, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(len(x), 1, generator=g)))
    return out


def _train(fed, rounds=2, **kw):
    torch.manual_seed(7)
    model = torch.nn.Linear(3, 1)
    history = fl.train(model, fed, rounds=rounds, lr=0.05, batch_size=4, seed=3, progress=False, **kw)
    return model, history


def plain_fedavg(parts, rounds, seed, lr=0.05, batch_size=4, skip=()):
    """FedAvg in plain PyTorch: the same shuffles (client_seed), SGD steps and sample weights."""
    torch.manual_seed(7)
    model = torch.nn.Linear(3, 1)
    global_w = [t.detach().clone() for t in (model.weight, model.bias)]
    for r in range(1, rounds + 1):
        states, weights = [], []
        for k, (x, y) in enumerate(parts):
            if k in skip:
                continue
            local = [t.clone().requires_grad_(True) for t in global_w]
            gen = torch.Generator().manual_seed(client_seed(seed, r, k))
            order = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), batch_size):
                idx = order[s:s + batch_size]
                loss = F.mse_loss(x[idx] @ local[0].T + local[1], y[idx])
                grads = torch.autograd.grad(loss, local)
                with torch.no_grad():
                    for p, g in zip(local, grads):
                        p -= lr * g
            states.append([t.detach() for t in local])
            weights.append(len(x))
        global_w = [sum(s[j] * (w / sum(weights)) for s, w in zip(states, weights)) for j in range(2)]
    return global_w


def test_pooled_dispatch_equals_sequential_and_plain_torch(hook):
    parts = _parts(10)
    pool = VirtualPool(hook, parts, "pa")
    pooled, hist = _train(pool.federated_dataset())
    assert pool.calls == 3 * 4  # two rounds and the clean-up, 4 calls of <= 3 clients each
    seq_workers = VirtualPool(hook, parts, "sq")
    sequential, _ = _train(sy.FederatedDataset(seq_workers.datasets))
    torch.testing.assert_close(pooled.weight, sequential.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pooled.bias, sequential.bias, rtol=1e-6, atol=1e-7)
    ref_w, ref_b = plain_fedavg(parts, rounds=2, seed=3)
    torch.testing.assert_close(pooled.weight.detach(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled.bias.detach(), ref_b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pooled.weight, torch.nn.Linear(3, 1).weight)
    assert len(hist.rounds[-1].clients) == 10 and list(hist.rounds[-1].clients) == [f"pa{i}" for i in range(10)]
    assert hist.rounds[0].seconds > 0 and hist.rounds[0].train_loss > hist.rounds[1].train_loss
    # the clean-up freed the plan, state and losses: only the owner's data is left on each client
    assert all(len(w.monitor) == 2 for w in pool.workers)


def test_pooled_fedprox_and_secure_aggregation_match_sequential(hook):
    parts = _parts(6, seed=1)
    pool, seq = VirtualPool(hook, parts, "pb"), VirtualPool(hook, parts, "sb")
    a, _ = _train(pool.federated_dataset(), strategy=FedProx(0.05))
    b, _ = _train(sy.FederatedDataset(seq.datasets), strategy=FedProx(0.05))
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    plain, _ = _train(pool.federated_dataset(), rounds=1)
    secure, hist = _train(pool.federated_dataset(), rounds=1, secure_aggregation=True)
    torch.testing.assert_close(secure.weight, plain.weight, atol=1e-5, rtol=0)  # only the sum was revealed
    assert hist.rounds[0].train_loss == hist.rounds[0].train_loss  # the masked loss sum is a number
    assert all(len(w.monitor) == 2 for w in pool.workers)


def test_a_failing_client_is_dropped_with_its_error_and_the_coordinator_goes_on(hook):
    parts = _parts(6, seed=2)
    parts[4] = (torch.randn(5, 4), torch.randn(5, 1))  # the wrong number of features: fit fails there
    pool = VirtualPool(hook, parts, "pc")
    with pytest.warns(UserWarning, match=r"worker 'pc4' dropped out \(.*(shape|size)"):
        model, hist = _train(pool.federated_dataset())
    for record in hist.rounds:
        assert record.dropped == ["pc4"] and "pc4" not in record.clients and len(record.clients) == 5
        assert "pc4" in record.errors and record.errors["pc4"]
    ref_w, ref_b = plain_fedavg(parts, rounds=2, seed=3, skip={4})
    torch.testing.assert_close(model.weight.detach(), ref_w, rtol=1e-5, atol=1e-6)
    # the coordinator's state stays usable: the same clients train again, the failing one left out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again, _ = _train(pool.federated_dataset())
    torch.testing.assert_close(again.weight, model.weight)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="only 5 workers finished, 6 required"):
        _train(pool.federated_dataset(), min_workers=6)


def test_many_failures_warn_a_few_times_and_record_every_error(hook):
    parts = [(torch.randn(4, 4), torch.randn(4, 1)) for _ in range(9)] + _parts(1)
    parts = parts[-1:] + parts[:-1]  # client 0 is fine (it sets the plan's shapes), 1..9 fail
    pool = VirtualPool(hook, parts, "pd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, hist = _train(pool.federated_dataset(), rounds=1)
    assert len(hist.rounds[0].errors) == 9 and list(hist.rounds[0].clients) == ["pd0"]
    messages = [str(w.message) for w in caught if "dropped out" in str(w.message)]
    assert len(messages) == 6 and "4 more clients dropped out" in messages[-1]


def test_streaming_fedavg_equals_the_list_average():
    g = torch.Generator().manual_seed(0)
    states = [[torch.randn(3, 2, generator=g), torch.randn(2, generator=g)] for _ in range(7)]
    weights = [3, 1, 4, 1, 5, 9, 2]
    running = RunningWeightedSum()
    for s, w in zip(states, weights):
        running.add(s, w)
    for got, want in zip(running.average(), weighted_average(states, weights)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    updates = [ClientUpdate(f"c{k}", s, w, 0.0) for k, (s, w) in enumerate(zip(states, weights))]
    for strategy in (FedAvg(), FedAvg(server_lr=0.5), FedProx(0.1, server_lr="clients")):
        agg = strategy.aggregator([torch.zeros(3, 2), torch.zeros(2)])
        for u in updates:
            agg.add(u)
        assert type(agg).__name__ == "_StreamingFedAvg" and not agg.updates  # nothing kept per client
        for got, want in zip(agg.result(), strategy.aggregate(updates, [torch.zeros(3, 2), torch.zeros(2)])):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="different shapes"):
        running.add([torch.zeros(2, 2), torch.zeros(2)], 1)

    class Median(FedAvg):  # a strategy with its own aggregate still sees every update
        def aggregate(self, updates, global_state):
            return [torch.stack([u.state[j] for u in updates]).median(0).values for j in range(2)]

    agg = Median().aggregator([])
    for u in updates:
        agg.add(u)
    assert len(agg.updates) == 7 and torch.equal(agg.result()[1], Median().aggregate(updates, [])[1])


def test_derived_ids_are_distinct_per_client_and_secret():
    key, other = b"k" * 32, b"j" * 32
    a, b = derive_ids(key, 0, 5), derive_ids(key, 1, 5)
    assert a == derive_ids(key, 0, 5) and len(set(a + b)) == 10 and all(0 < v < 2**64 for v in a + b)
    assert not set(a) & set(derive_ids(other, 0, 5))


def test_client_ids_sequence(hook):
    pool = VirtualPool(hook, _parts(4), "pe")
    ids = ClientIds(pool, {2})
    assert len(ids) == 3 and list(ids) == ["pe0", "pe1", "pe3"] and ids == ["pe0", "pe1", "pe3"]
    assert "pe1" in ids and "pe2" not in ids and ids[-1] == "pe3"
    fed = pool.federated_dataset()
    assert fed.workers == ["pe0", "pe1", "pe2", "pe3"] and "pe2" in fed.datasets and "zz" not in fed.datasets
    assert len(fed) == sum(len(d) for d in pool.datasets) and fed["pe1"] is pool.datasets[1]


class TamperingPool(VirtualPool):
    """A pool whose clients 1-3 answer out of protocol (a hostile or broken client or transport)."""

    def exchange(self, build, indices=None):
        from veil.messaging import messages as m
        from veil.messaging.serde import serialize

        forged = {
            1: [serialize(m.ObjectsReply([torch.tensor(0.5), torch.full((1, 3), 1e6), torch.zeros(2)]), sender="x")],
            2: [serialize(m.OkReply(), sender="x")],
            3: [b"\x00not msgpack"],
        }
        for i, replies in super().exchange(build, indices):
            yield i, (forged[i][:1] * len(replies) if i in forged and len(replies) == 1 else
                      replies[:-1] + forged[i] if i in forged else replies)


def test_replies_out_of_protocol_drop_only_their_client(hook):
    parts = _parts(6, seed=6)
    pool = TamperingPool(hook, parts, "pt")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model, hist = _train(pool.federated_dataset())
    for record in hist.rounds:
        assert record.dropped == ["pt1", "pt2", "pt3"] and len(record.clients) == 3
    errors = hist.rounds[0].errors
    assert "state tensor" in errors["pt1"] and "OkReply" not in errors["pt1"]  # a wrong shape: not averaged
    assert "not the 3 tensors" in errors["pt2"] and "Serialization" in errors["pt3"]
    ref_w, ref_b = plain_fedavg(parts, rounds=2, seed=3, skip={1, 2, 3})
    torch.testing.assert_close(model.weight.detach(), ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), ref_b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # CKKS key generation: ~8 s
def test_pooled_encrypted_aggregation_matches_plain(hook):
    from veil.federated.he_agg import EncryptedAggregation

    parts = _parts(3, seed=7)
    pool = VirtualPool(hook, parts, "ph")
    ctx = sy.he.ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], global_scale=2**40)
    plain, _ = _train(pool.federated_dataset(), rounds=1)
    enc, hist = _train(pool.federated_dataset(), rounds=1, encrypted_aggregation=EncryptedAggregation(context=ctx))
    torch.testing.assert_close(enc.weight, plain.weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(enc.bias, plain.bias, atol=1e-4, rtol=0)
    assert list(hist.rounds[-1].clients) == ["ph0", "ph1", "ph2"]
    assert hist.rounds[-1].train_loss != hist.rounds[-1].train_loss  # no client's loss in the clear: NaN

"""Federated clients in a real local Ray: fl.train over Ray actors gives the weights it gives over
VirtualWorkers (batched dispatch and one client at a time alike, both equal to plain PyTorch FedAvg);
a failing client or a dead actor drops only its clients, with their errors; the actors' clients are
ordinary veil workers (allowlist, private data, bad frames)."""

from __future__ import annotations

import gc
import warnings

import pytest
import ray
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.federated import trainer as fl
from veil.federated.strategies import FedProx
from veil.messaging.messages import DeleteMessage, ErrorReply, GetObjectsMessage
from veil.messaging.serde import deserialize, serialize
from tests.federated.test_pooled import plain_fedavg

N_CLIENTS = 200


@pytest.fixture(scope="module")
def ray_local():
    ray = sy.ray.init(num_cpus=2)
    yield ray
    sy.ray.shutdown()


@pytest.fixture(scope="module")
def actors(ray_local, hook):
    """Two client-host actors shared by the tests (starting an actor costs seconds: it imports torch)."""
    first = sy.ray.federated_clients(num_clients=2, make_dataset=lambda i: (torch.zeros(1, 3), torch.zeros(1, 1)),
                                     actors=2, hook=hook, prefix="warmup")
    yield first.actors
    first.shutdown()


def _parts(n: int, seed: int = 0, rows=(12,)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.5], [-2.0], [0.5]])
    out = []
    for k in range(n):
        x = torch.randn(rows[k % len(rows)], 3, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(len(x), 1, generator=g)))
    return out


def _train(fed, rounds=2, **kw) -> torch.nn.Linear:
    torch.manual_seed(7)
    model = torch.nn.Linear(3, 1)
    fl.train(model, fed, rounds=rounds, lr=0.05, batch_size=4, seed=3, progress=False, **kw)
    return model


def test_200_clients_on_two_shared_actors_match_virtual_workers(hook, actors):
    parts = _parts(N_CLIENTS)
    clients = sy.ray.federated_clients(parts, actors=actors, hook=hook, prefix="rc")
    try:
        assert len(clients.actors) == 2 and len(clients) == N_CLIENTS
        stats = clients.actor_stats()
        assert sorted(s["clients"] for s in stats) == [N_CLIENTS // 2 + 1] * 2  # virtual clients (+ warm-up's)
        sent = hook.local_worker.stats.messages
        on_ray = _train(clients.federated_dataset(), strategy=FedProx(0.01))
        # state persisted between rounds: the plan went once (round 1: plan + round request, round 2: one request)
        assert hook.local_worker.stats.messages - sent == 3 * N_CLIENTS
        virtual = [sy.VirtualWorker(hook, id=f"vc{i}") for i in range(N_CLIENTS)]
        fed = sy.FederatedDataset(sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, virtual))
        in_process = _train(fed, strategy=FedProx(0.01))
        torch.testing.assert_close(on_ray.weight, in_process.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(on_ray.bias, in_process.bias, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(on_ray.weight, torch.nn.Linear(3, 1).weight)  # it trained
        # the training's plan, state and losses were freed at the end: the clients' data is what is left
        assert [s["objects"] for s in clients.actor_stats()] == [2 * s["clients"] for s in stats]
    finally:
        clients.shutdown()


def test_batched_dispatch_equals_one_at_a_time_and_plain_torch(hook, actors):
    parts = _parts(24, seed=4, rows=(6, 9, 12))  # unequal clients: FedAvg weights by rows
    clients = sy.ray.federated_clients(parts, actors=actors, hook=hook, prefix="eq", clients_per_call=5)
    try:
        batched = _train(clients.federated_dataset())
        # the coordinator kept no handle or pointer per client (the one-at-a-time path below does)
        gc.collect()
        assert sum(type(o) is sy.ray.RayClientWorker and o.id.startswith("eq") for o in gc.get_objects()) == 0
        one_by_one = _train(clients.federated_dataset(batched=False))
        torch.testing.assert_close(batched.weight, one_by_one.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(batched.bias, one_by_one.bias, rtol=1e-6, atol=1e-7)
        ref_w, ref_b = plain_fedavg(parts, rounds=2, seed=3)
        torch.testing.assert_close(batched.weight.detach(), ref_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.bias.detach(), ref_b, rtol=1e-5, atol=1e-6)
    finally:
        clients.shutdown()


def test_failing_client_and_dead_actor_drop_only_their_clients(hook, actors):
    parts = _parts(8, seed=5)
    parts[3] = (torch.randn(12, 5), torch.randn(12, 1))  # the wrong number of features: its fit fails
    spare = ray.remote(sy.ray.ClientHost).options(num_cpus=0).remote()  # an actor this test may kill
    clients = sy.ray.federated_clients(parts, actors=[actors[0], spare], hook=hook, prefix="fail")
    try:
        assert clients.data[3].shape == (12, 5) and clients.data[2].shape == (12, 3)
        # (the data is the owner's: the error names the op, its details stay in the owner's log)
        with pytest.warns(UserWarning, match=r"worker 'fail3' dropped out \(ProtectedDataError: .*veil.plan.fit failed"):
            model = _train(clients.federated_dataset(), rounds=1)
        ref_w, _ = plain_fedavg(parts, rounds=1, seed=3, skip={3})
        torch.testing.assert_close(model.weight.detach(), ref_w, rtol=1e-5, atol=1e-6)
        ray.kill(spare)  # clients 1, 3, 5, 7 go with it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(7)
            model = torch.nn.Linear(3, 1)
            hist = fl.train(model, clients.federated_dataset(), rounds=1, lr=0.05, batch_size=4, seed=3,
                            progress=False)
        record = hist.rounds[0]
        assert sorted(record.dropped) == ["fail1", "fail3", "fail5", "fail7"] and len(record.clients) == 4
        assert all("ConnectionLostError" in record.errors[c] and "actor" in record.errors[c] for c in record.dropped)
        assert any("fail5" in str(w.message) for w in caught)
        ref_w, _ = plain_fedavg(parts, rounds=1, seed=3, skip={1, 3, 5, 7})
        torch.testing.assert_close(model.weight.detach(), ref_w, rtol=1e-5, atol=1e-6)
        with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="only 4 workers finished, 5 required"):
            _train(clients.federated_dataset(), rounds=1, min_workers=5)
    finally:
        clients.actors = [actors[0]]  # the spare is dead: free these clients on the shared actor only
        clients.owns_actors = False
        clients.shutdown()


def test_secure_aggregation_across_actors(hook, actors):
    clients = sy.ray.federated_clients(_parts(5, seed=1), actors=actors, hook=hook, prefix="sa")
    try:
        plain = _train(clients.federated_dataset(), rounds=1)
        secure = _train(clients.federated_dataset(), rounds=1, secure_aggregation=True)
        torch.testing.assert_close(secure.weight, plain.weight, atol=1e-5, rtol=0)  # shares crossed actors
        torch.testing.assert_close(secure.bias, plain.bias, atol=1e-5, rtol=0)
    finally:
        clients.shutdown()


def test_owner_side_dp_on_actor_clients(hook, actors):
    dp = {"max_grad_norm": 1.0, "noise_multiplier": 2.0, "budgets": {"me": (10.0, 1e-4)}}
    clients = sy.ray.federated_clients(_parts(2, seed=2), actors=actors, hook=hook, prefix="dp", dp=dp)
    try:
        # raw (non-private) training on DP data is refused by every client's owner policy
        with pytest.warns(UserWarning, match="differential-privacy policy"), \
                pytest.raises(RuntimeError, match="only 0 workers finished"):
            _train(clients.federated_dataset(), rounds=1)
        model = torch.nn.Linear(3, 1)
        sy.dp.train_remote_dp(model, list(clients), "data", torch.zeros(2, 3), steps=3, sample_rate=0.2,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1), delta=1e-5)
        spent = [sy.dp.remaining_budget(c, spent=True)[0] for c in clients]
        assert sum(spent) > 0 and all(0 <= s < 10.0 for s in spent)  # charged on the clients' own ledgers
        count = sy.dp.remote_query(clients.targets[1], "count", epsilon=0.5)
        assert count.epsilon == 0.5
        with pytest.raises(sy.exceptions.BudgetExceededError):
            sy.dp.remote_query(clients.targets[1], "count", epsilon=20.0)
    finally:
        clients.shutdown()


def test_actor_clients_refuse_like_any_worker(hook, actors):
    clients = sy.ray.federated_clients(num_clients=3, make_dataset=lambda i: (torch.full((4, 2), float(i)),
                                                                           torch.zeros(4, 1)),
                                       actors=actors[:1], hook=hook, prefix="adv")
    try:
        with pytest.raises(PermissionDeniedError, match="private"):
            clients.data[2].get()
        total = (clients.data[2] * 2).sum().get()  # computing through pointers is allowed
        assert float(total) == 2 * 2 * 8
        for frame in (b"", b"\x00garbage", b"\x93\x01\x02"):  # hostile raw frames: a clear error, no crash
            reply, _, _ = deserialize(clients[1]._recv_msg(frame), hook.local_worker._decode_ctx)
            assert type(reply) is ErrorReply and reply.message
        assert float((clients.data[1] + 1).sum().get()) == 8 * 2  # still serving
        stranger = sy.ray.RayClientWorker(hook, "nobody-here", clients.actors[0])
        with pytest.raises(sy.exceptions.WorkerNotFoundError):
            sy.send(torch.ones(1), stranger)
        # the batched entry point: each client's requests are answered alone, hostile ones with an error
        data_id, target_id = clients.data_ids(2)
        fetch_private = serialize(GetObjectsMessage([data_id], delete=True), sender="me")
        fetch_target = serialize(GetObjectsMessage([target_id], delete=False), sender="me")
        replies = ray.get(clients.actors[0].recv_batch.remote([
            ("adv0", [b"\x00garbage", serialize(DeleteMessage([]), sender="me")]),  # stops at its first error
            ("nobody-here", [fetch_target]),
            ("adv2", [fetch_private]),
        ]))
        decoded = [[deserialize(r, hook.local_worker._decode_ctx)[0] for r in rs] for rs in replies]
        assert [len(rs) for rs in decoded] == [1, 1, 1] and all(type(rs[0]) is ErrorReply for rs in decoded)
        assert decoded[1][0].error == "WorkerNotFoundError" and "private" in decoded[2][0].message
        assert float(clients.data[2].sum().get()) == 2 * 8  # the private data is still there, unchanged
    finally:
        clients.shutdown()


def test_a_pointer_chain_through_one_client_to_another_resolves_after_the_handles_are_dropped(hook, actors):
    """A pointer stored on client 0 to client 1's data (a chain, as PySyft's ``.send`` of a pointer makes) is
    fetched back and computed on by the coordinator even after it dropped its handle on client 1: the pool
    names its clients (handles are made on demand and the hook's registry holds them weakly)."""
    parts = [(torch.full((2, 2), 3.0 * (i + 1)), torch.zeros(2, 1)) for i in range(2)]
    clients = sy.ray.federated_clients(parts, actors=actors, hook=hook, prefix="chain")
    try:
        relay = clients.data[1].send(clients[0])     # client 0 holds a pointer to client 1's data
        gc.collect()                                 # no handle on client 1 stays referenced here
        assert "chain1" not in hook.workers
        inner = relay.get()                          # the pointer client 0 held: to client 1's data
        assert inner.location.id == "chain1"
        assert torch.equal((inner * 2).get(), torch.full((2, 2), 12.0))
    finally:
        clients.shutdown()

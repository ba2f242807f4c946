"""Shared harness of the federated tests: linear-regression clients, the model, FedAvg in plain torch, a
client pool over in-process VirtualWorkers, and hostile clients whose replies are rewritten (what a hostile
``veil worker`` process could send)."""

from __future__ import annotations

import itertools
import time
import warnings

import torch
import torch.nn.functional as F

import veil as sy
from veil.federated import trainer as fl
from veil.federated.client_pool import ClientPool, PooledFederatedDataset
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize

_COUNTER = itertools.count()


def uid(prefix: str) -> str:
    return f"fl-{prefix}-{next(_COUNTER)}-{new_id() % 10**6}"


def make_parts(n: int, rows: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[1.5], [-2.0], [0.5]])
    out = []
    for _ in range(n):
        x = torch.randn(rows, 3, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(rows, 1, generator=g)))
    return out


def make_model(seed: int = 7):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1)


def attempt(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(), None, caught
        except Exception as e:  # noqa: BLE001  (the attack's outcome is inspected by the test)
            return None, e, caught


def honest_fedavg(parts, rounds=1, lr=0.05):
    """Plain FedAvg with one full-batch step per client and round (batch_size >= rows: shuffling is moot)."""
    return fedavg_rounds([parts] * rounds, lr)


def fedavg_rounds(rounds_parts, lr=0.05):
    """Plain FedAvg, one full-batch step per client, each round with its own clients (``rounds_parts[r]``)."""
    net = make_model()
    w = [net.weight.detach().clone(), net.bias.detach().clone()]
    for parts in rounds_parts:
        states, weights = [], []
        for x, y in parts:
            local = [t.clone().requires_grad_(True) for t in w]
            grads = torch.autograd.grad(F.mse_loss(x @ local[0].T + local[1], y), local)
            states.append([(p - lr * g).detach() for p, g in zip(local, grads)])
            weights.append(len(x))
        w = [sum(s[j] * (n / sum(weights)) for s, n in zip(states, weights)) for j in range(2)]
    return w



class VirtualPool(ClientPool):
    """A client pool of VirtualWorkers (``exchange``: the subclass's order and tampering)."""

    def __init__(self, hook, parts, prefix: str, per_call: int = 2) -> None:
        self.hook, self.prefix, self.per_call = hook, prefix, per_call
        self.workers = [sy.VirtualWorker(hook, id=f"{prefix}{i}") for i in range(len(parts))]
        self.datasets = [sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, self.workers)]

    def __len__(self):
        return len(self.workers)

    def client_id(self, i):
        return self.workers[i].id

    def index_of(self, client_id):
        ids = [w.id for w in self.workers]
        return ids.index(client_id) if client_id in ids else None

    def num_samples(self, i):
        return len(self.datasets[i])

    def data_ids(self, i):
        return self.datasets[i].data.id_at_location, self.datasets[i].targets.id_at_location

    def example(self):
        ds = self.datasets[0]
        return tuple(ds.data.shape[1:]), ds.data.dtype, tuple(ds.targets.shape[1:]), ds.targets.dtype

    def worker(self, i):
        return self.workers[i]

    def federated_dataset(self):
        return PooledFederatedDataset(self, lambda i: self.datasets[i])


class TamperedPool(VirtualPool):
    """Client ``bad`` (if any) gets its last reply rewritten by ``tamper``."""

    def __init__(self, hook, parts, bad=None, tamper=None, per_call=2):
        super().__init__(hook, parts, uid("pool") + "-", per_call)
        self.bad, self.tamper = bad, tamper

    def exchange(self, build, indices=None):
        order = list(range(len(self))) if indices is None else list(indices)
        for k in range(0, len(order), self.per_call):
            for i in order[k:k + self.per_call]:
                replies = [self.workers[i]._recv_msg(r) for r in build(i)]
                if i == self.bad and self.tamper is not None:
                    replies = self.tamper(replies)
                yield i, replies


class HostileClient(sy.VirtualWorker):
    """Answers ``train_round``'s fetch (mean loss + 2 state tensors) with what ``tamper`` makes of it."""

    tamper = None

    def _recv_msg(self, data):
        reply = super()._recv_msg(data)
        if self.tamper is None:
            return reply
        msg = deserialize(reply)[0]
        if type(msg) is m.ObjectsReply and isinstance(msg.objects, list) and len(msg.objects) == 3:
            return serialize(m.ObjectsReply(self.tamper(list(msg.objects))), sender=self.id)
        return reply


def sequential_with_hostile(hook, tamper, n_honest=2, rows=8, rounds=1, hostile_first=True, **kw):
    bad = HostileClient(hook, id=uid("bad"))
    bad.tamper = tamper
    honest = [sy.VirtualWorker(hook, id=uid("ok")) for _ in range(n_honest)]
    workers = [bad, *honest] if hostile_first else [*honest, bad]
    parts = make_parts(len(workers), rows)
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    model = make_model()
    hist, err, caught = attempt(lambda: fl.train(model, fed, rounds=rounds, lr=0.05, batch_size=rows,
                                              progress=False, **kw))
    honest_parts = [p for p, w in zip(parts, workers) if w is not bad]
    return model, hist, err, bad, honest_parts


def objects_tamper(fn):
    def tamper(replies):
        msg = deserialize(replies[-1])[0]
        if type(msg) is m.ObjectsReply:
            replies = replies[:-1] + [serialize(m.ObjectsReply(fn(list(msg.objects))), sender="x")]
        return replies
    return tamper


def pooled_with_hostile(hook, fn, n=3, rows=8, rounds=1, **kw):
    parts = make_parts(n, rows)
    pool = TamperedPool(hook, parts, bad=1, tamper=objects_tamper(fn) if fn else None)
    model = make_model()
    hist, err, caught = attempt(lambda: fl.train(model, pool.federated_dataset(), rounds=rounds, lr=0.05,
                                              batch_size=rows, progress=False, **kw))
    return model, hist, err, pool, [p for k, p in enumerate(parts) if k != 1], caught


def pick_aggregators(monkeypatch, first, second):
    """The coordinator's random pair of encrypted-FedAvg aggregators, fixed to ``first`` and ``second`` (each
    client is picked with probability 2/N a round: over enough rounds an attacker always is)."""
    from veil.federated import he_agg

    class _Random:
        def sample(self, population, k):
            assert first in population and second in population and k == 2
            return [first, second]

    class _Secrets:
        SystemRandom = _Random

    monkeypatch.setattr(he_agg, "secrets", _Secrets)


class CraftsItsCiphertext(sy.VirtualWorker):
    """A hostile client of an encrypted round: encrypts ``craft(encrypt, flat, kwargs)`` instead of its update
    (and commits to that: its commitment is its own, so it matches)."""

    craft = None

    def _recv_msg(self, data):
        if self.craft is None or b"veil.fl.encrypt_state" not in bytes(data):
            return super()._recv_msg(data)
        import veil.he

        real = veil.he.encrypt
        veil.he.encrypt = lambda flat, **kw: self.craft(real, flat, kw)
        try:
            return super()._recv_msg(data)
        finally:
            veil.he.encrypt = real


class RecordsCiphertexts(sy.VirtualWorker):
    """An aggregator that keeps the first ciphertext each client handed it (in ``seen``), of the type named
    ``kind`` (by name: importing the HE backends is left to the tests that use them)."""

    kind = ""

    def _recv_msg(self, data):
        msg, sender, _ = deserialize(bytes(data))
        if type(msg) is m.ObjectMessage:
            for o in msg.objects:
                if type(o.obj).__name__ == self.kind:
                    self.__dict__.setdefault("seen", {}).setdefault(sender, o.obj)
        return super()._recv_msg(data)


class RecordsCKKS(RecordsCiphertexts):
    kind = "CKKSTensor"


class RecordsPaillier(RecordsCiphertexts):
    kind = "PaillierTensor"


#: The round deadline of the deadline tests (test_redteam_fl_bounds, test_redteam_federated_third): the honest
#: clients' work before it (each trains, encrypts or answers a protocol step in well under a second) finishes
#: inside it even on a loaded machine that pauses the test process for a second or two.
ROUND_S = 5.0
#: A stalling client holds its first request until ROUND_S + PAST_S after it arrived (after the round's start, so
#: surely past the deadline); the next one (asked after that, past the deadline: a round that ignored it) is held
#: LATE_S, so a round that waits for it runs far past the tests' bounds.
PAST_S, LATE_S = 0.25, 30.0


class Hold:
    """What a round's stalling clients share: how many requests they held, and when the first was let go."""

    def __init__(self):
        self.held, self.released = 0, None

    def __call__(self):
        self.held += 1
        if self.released is not None:  # (asked after the first hold ended: past the round's deadline)
            if self.held == 2:
                time.sleep(LATE_S)
            return
        until = time.monotonic() + ROUND_S + PAST_S
        while (left := until - time.monotonic()) > 0:
            time.sleep(left)
        self.released = time.monotonic()

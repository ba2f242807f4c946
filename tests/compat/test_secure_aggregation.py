"""Part 10 of PySyft 0.2: secure aggregation of remote models (issue #15, item 5).

Each worker encodes and secret-shares its *own* parameters; the coordinator
holds pointers only. The coordinator's traffic is recorded: the only values
it ever receives are uniformly random ring shares (of the sum), from which it
reconstructs the final average.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError
from veil.mpc.encoding import encode, make_encoding


def _tensors_in(value, out):
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _tensors_in(getattr(value, f.name), out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _tensors_in(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors_in(v, out)
    return out


class Recorder:
    """Every tensor in every reply the coordinator (local worker) receives."""

    def __init__(self, worker):
        self.worker, self.received = worker, []
        self._orig = worker.send_msg

    def __enter__(self):
        def send_msg(msg, location):
            reply = self._orig(msg, location)
            _tensors_in(reply, self.received)
            return reply

        self.worker.send_msg = send_msg
        return self

    def __exit__(self, *exc):
        del self.worker.send_msg


def _train_remote(model, x, y, worker):
    model.send(worker)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x.send(worker)), y.send(worker)).backward()
    opt.step()
    return model


def test_part10_coordinator_sees_only_uniform_shares_and_the_average(hook, ws):
    bob, alice, james = ws
    torch.manual_seed(1)
    base = torch.nn.Linear(4, 1)
    data = {w: (torch.randn(6, 4), torch.randn(6, 1)) for w in (bob, alice)}
    # what each worker's model becomes, computed locally for the comparison
    expected = []
    for w, (x, y) in data.items():
        m = copy.deepcopy(base)
        torch.nn.functional.mse_loss(m(x), y).backward()
        expected.append([p.detach() - 0.1 * p.grad for p in m.parameters()])
    models = [_train_remote(copy.deepcopy(base), x, y, w) for w, (x, y) in data.items()]
    params = [list(m.parameters()) for m in models]

    enc = make_encoding(None, 2)
    plaintexts = [encode(t, enc) for per_worker in expected for t in per_worker]
    me = hook.local_worker
    with Recorder(me) as rec:
        averaged = []
        for i in range(len(params[0])):
            spdz = [params[k][i].copy().fix_precision().share(bob, alice, crypto_provider=james).get()
                    for k in range(len(params))]
            assert all(s.is_shared for s in spdz)
            averaged.append((spdz[0] + spdz[1]).get().float_precision() / 2)
    for got, a, b in zip(averaged, *expected):
        assert torch.allclose(got, (a + b) / 2, atol=1e-4)
    received = [t for t in rec.received if t.numel()]
    assert received, "the coordinator must have received the shares of the sums"
    for t in received:
        assert t.dtype == torch.int64, f"coordinator received a {t.dtype} tensor"
        # uniform in Z/2^64: |share| < 2^40 has probability 2^-23 per entry
        assert bool((t.abs() > 2**40).all()), "a received value is not a uniform share"
        assert not any(t.shape == p.shape and torch.equal(t, p) for p in plaintexts)


def test_remote_fix_precision_and_send_round_trip(ws):
    bob, alice, _ = ws
    x = torch.tensor([1.5, -2.25, 0.125])
    ptr = x.send(bob).fix_precision()
    assert ptr.location is bob and ptr.shape == x.shape
    assert torch.equal(ptr.get().float_precision(), x)
    sent = x.fix_precision().send(alice)
    assert torch.equal(sent.float_precision().get(), x)
    decimal = x.send(bob).fix_precision(base=10, precision_fractional=3)
    assert torch.equal(decimal.get().child, torch.tensor([1500, -2250, 125]))


def test_remote_integer_share(ws):
    bob, alice, james = ws
    shared = torch.tensor([5, -7]).send(bob).share(bob, alice, crypto_provider=james).get()
    assert torch.equal((shared + shared).get(), torch.tensor([10, -14]))


def test_a_scientist_cannot_share_private_data_to_itself(ws):
    bob, alice, james = ws
    secret = torch.tensor([123, 456])
    oid = bob.load(secret.clone(), tags=("#private",), private=True)
    (ptr,) = bob.search("#private")
    with pytest.raises(PermissionDeniedError):
        ptr.share(alice, james, crypto_provider=bob).get()
    assert alice.objects_count() == 0 and len(alice._objects) == 0  # no share was placed
    assert torch.equal(bob._objects[oid], secret)  # nothing changed
    assert torch.equal(torch.tensor([1]).send(bob).get(), torch.tensor([1]))  # the worker still serves


def test_share_own_rejects_malformed_requests(ws):
    bob, alice, _ = ws
    from veil.compat.remote_fixed_precision import SHARE_OWN
    from veil.messaging.allowlist import ALLOWLIST
    from veil.tensors import remote_ops

    ptr = torch.tensor([1, 2]).send(bob)
    for bad in ([bob.id], [bob.id, bob.id], [bob.id, 7]):
        with pytest.raises(Exception, match="distinct party ids"):
            remote_ops.call(ALLOWLIST.by_name(SHARE_OWN), (ptr.id_at_location, bad, [11, 12][: len(bad)]), {},
                            location=bob)
    fptr = torch.tensor([1.0]).send(bob)
    with pytest.raises(Exception, match="fix_precision"):
        fptr.share(bob, alice)
    with pytest.raises(Exception, match="int64"):  # the worker checks too (a raw request skips the client check)
        remote_ops.call(ALLOWLIST.by_name(SHARE_OWN), (fptr.id_at_location, [bob.id, alice.id], [11, 12]), {},
                        location=bob)
    assert len(alice._objects) == 0
    assert torch.equal(ptr.get(), torch.tensor([1, 2]))


def test_dp_only_data_can_be_neither_encoded_nor_shared(hook, ws):
    _, alice, james = ws
    owner = sy.VirtualWorker(hook, id=f"dp_owner_{alice.id}")
    x = torch.randint(0, 100, (20, 3))
    oid = owner.load(x.clone(), tags=("#clinic", "#data"), private=True)
    owner.load(torch.randn(20, 1), tags=("#clinic", "#target"), private=True)
    owner.enable_dp("clinic", max_grad_norm=1.0, noise_multiplier=1.0, budgets={"me": (5.0, 1e-5)})
    (data,) = owner.search(["#clinic", "#data"])
    with pytest.raises(PermissionDeniedError, match="differential-privacy|is private"):
        data.fix_precision()
    with pytest.raises(PermissionDeniedError, match="differential-privacy|is private"):
        data.share(alice, james, crypto_provider=sy.LocalDealer())
    assert len(alice._objects) == 0 and len(james._objects) == 0
    assert torch.equal(owner._objects[oid], x)

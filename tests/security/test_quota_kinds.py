"""The per-session memory quota (--max-session-mb) charges every stored kind: HE ciphertexts, plans, pointers."""

import pytest
import torch

import veil as sy
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.monitor import DEFAULT_OBJECT_BYTES, Principal, QuotaExceededError


def _arrived(obj):
    """``obj`` as a worker decodes it from the wire."""
    return deserialize(serialize(m.ObjectMessage([m.StoredObject(1, obj)])))[0].objects[0].obj


def test_he_objects_are_charged_their_wire_size(hook):
    w = sy.VirtualWorker(hook, id="quota-he", max_session_bytes=200_000)
    s = Principal("sq", "u", namespace="sq", isolated=True)
    pub, _ = sy.he.paillier.keygen(n_length=512)
    enc = _arrived(torch.arange(400.0).encrypt(protocol="paillier", public_key=pub))
    entry = w.monitor.store(s, 1, enc)
    assert entry.nbytes > 400 * 128  # 400 ciphertexts < n^2 (1024 bits each)
    with pytest.raises(QuotaExceededError):
        for i in range(2, 10):
            w.monitor.store(s, i, _arrived(torch.arange(400.0).encrypt(protocol="paillier", public_key=pub)))
    assert w.monitor.session_bytes("sq") <= 200_000


def test_ckks_ciphertexts_and_results_computed_on_the_worker_are_charged(hook):
    from veil.he import ckks_wire
    from veil.he.remote import _he_op

    ctx = sy.he.ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], global_scale=2**40)
    ckks_wire.remember(ctx)  # as if its public context had arrived first
    enc = _arrived(torch.randn(8).encrypt(protocol="ckks", context=ctx))
    w = sy.VirtualWorker(hook, id="quota-ckks", max_session_bytes=1_000_000)
    s = Principal("sc", "u", namespace="sc", isolated=True)
    first = w.monitor.store(s, 1, enc)
    assert first.nbytes > 100_000  # one CKKS ciphertext (N = 8192, 4 primes) is ~0.3 MB
    with pytest.raises(QuotaExceededError):  # a result computed on the worker counts too
        with w.monitor.running(s, [first], "veil.he.op"):
            for out in range(2, 10):
                _he_op(w, "add", enc, enc, out)
    assert w.monitor.session_bytes("sc") <= 1_000_000


def test_plans_and_pointers_are_charged(hook):
    w = sy.VirtualWorker(hook, id="quota-plan", max_session_bytes=100_000)
    s = Principal("sp", "u", namespace="sp", isolated=True)
    const = torch.arange(20_000.0)

    @sy.func2plan(args_shape=[(20_000,)])
    def shift(x):
        return x + const  # a 80 kB constant inside the op list

    spec = _arrived(shift.spec)
    with pytest.raises(QuotaExceededError):
        w.monitor.store(s, 1, spec)
    assert w.monitor.session_bytes("sp") == 0
    # many tiny objects (stored pointers) are not free either
    from veil.tensors.pointer import PointerTensor

    with pytest.raises(QuotaExceededError):
        for i in range(2, 200):
            w.monitor.store(s, i, PointerTensor(w, i, w, (1,), torch.float32, garbage_collect_data=False))
    assert w.monitor.session_bytes("sp") <= 100_000 and w.monitor.session_bytes("sp") % DEFAULT_OBJECT_BYTES == 0


def test_network_session_cannot_exceed_its_quota_with_ciphertexts_or_plans(spawn, connect, hook):
    from network_helpers import OTHER, base_args

    wp = spawn("alice", base_args(["--max-session-mb", "0.25"]))  # 262 kB per session
    alice = connect(wp)
    pub, priv = sy.he.paillier.keygen(n_length=512)
    x = torch.arange(600.0)
    p = x.encrypt(protocol="paillier", public_key=pub).send(alice)  # ~0.1 MB of ciphertexts
    with pytest.raises(QuotaExceededError, match="max-session-mb"):
        kept = [p]
        for _ in range(4):  # results of encrypted ops computed on the worker count too
            kept.append(kept[-1] + p)
    del kept
    with pytest.raises(QuotaExceededError, match="max-session-mb"):
        plans = []
        for _ in range(300):  # plans: each one is charged (at least 1 kB)

            @sy.func2plan(args_shape=[(2,)])
            def twice(t):
                return t * 2

            plans.append(twice.send(alice))
    # the worker still serves, and other sessions have their own quota
    other = connect(wp, token=OTHER, id="alice-other")
    q = torch.tensor([1.0, 2.0]).encrypt(protocol="paillier", public_key=pub).send(other)
    assert torch.allclose((q + q).get().decrypt(priv), torch.tensor([2.0, 4.0]), atol=1e-4)

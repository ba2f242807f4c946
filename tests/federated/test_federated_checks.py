"""Checks behind the federated red-team fixes (tests/security/test_redteam_federated.py): two aggregating
clients whose honest sums are byte-identical, clients dropped from an encrypted round, non-finite updates on
the one-client-at-a-time path, and the DP owner's release bound past what max_releases counts."""

from __future__ import annotations

import phe
import pytest
import torch
import torch.nn.functional as F

import veil as sy
from veil.exceptions import ConnectionLostError
from veil.federated import he_agg
from veil.federated import trainer as fl
from veil.federated.he_agg import EncryptedAggregation, EncryptedAggregationError
from veil.he.paillier import PaillierTensor
from veil.messaging import messages as m
from veil.messaging.serde import decode_value, deserialize, encode_value, serialize

from fl_helpers import honest_fedavg, make_model, make_parts, uid


@pytest.fixture(scope="module")
def paillier():
    return phe.generate_paillier_keypair(n_length=1024)


@pytest.fixture(scope="module")
def ckks():
    return sy.he.ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], global_scale=2**40)


def _train(workers, parts, **kw):
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    model = make_model()
    hist = fl.train(model, fed, rounds=1, lr=0.05, batch_size=8, progress=False, **kw)
    return model, hist


def _he(paillier):
    return EncryptedAggregation(public_key=paillier[0], private_key=paillier[1])


def _ciphertexts(workers):
    return [type(o).__name__ for w in workers for o in w._objects.values()
            if type(o).__name__ in ("PaillierTensor", "CKKSTensor")]


# ------------------------------------------------------------------ two aggregators, byte-identical sums


@pytest.mark.parametrize("scheme", ["paillier", "ckks"])
def test_honest_sums_are_byte_identical_whatever_the_order(scheme, paillier, ckks):
    """What the coordinator's comparison relies on: additions are exact and order-independent, so two
    aggregators' sums of the same ciphertexts have the same wire encoding (after crossing the wire)."""
    g = torch.Generator().manual_seed(1)
    values = [torch.randn(40, generator=g, dtype=torch.float64) * 10.0 ** k for k in range(-2, 3)]
    if scheme == "paillier":
        cts = [sy.he.encrypt(v, protocol="paillier", public_key=paillier[0]) for v in values]
    else:
        from veil.he.ckks_wire import remember

        remember(ckks)  # (tensors under it decode here, as on a worker that received it)
        cts = [sy.he.encrypt(v, protocol="ckks", context=ckks) for v in values]
    cts = [decode_value(encode_value(c)) for c in cts]  # as an aggregating client receives them
    encodings = set()
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 4, 1, 0, 2]):
        total = cts[order[0]]
        for k in order[1:]:
            total = total + cts[k]
        encodings.add(encode_value(decode_value(encode_value(total))))  # as the coordinator fetches it
    assert len(encodings) == 1
    # and a sum with another client's ciphertext in one place is told apart
    assert encode_value(cts[0] + cts[1]) != encode_value(cts[0] + cts[2])


@pytest.mark.parametrize("scheme", ["paillier", "ckks"])
def test_encrypted_round_matches_plain(hook, scheme, paillier, ckks):
    workers = [sy.VirtualWorker(hook, id=uid("he")) for _ in range(4)]
    parts = make_parts(4)
    agg = _he(paillier) if scheme == "paillier" else EncryptedAggregation(context=ckks)
    model, hist = _train(workers, parts, encrypted_aggregation=agg)
    ref = honest_fedavg(parts)
    torch.testing.assert_close(model.weight.detach(), ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.bias.detach(), ref[1], atol=1e-4, rtol=0)
    assert hist.rounds[0].clients == [w.id for w in workers] and not _ciphertexts(workers)


class Substitutes(sy.VirtualWorker):
    """As an aggregator, answers the fetch of the sum with a ciphertext another client handed it."""

    def _recv_msg(self, data):
        request = deserialize(bytes(data))[0]
        if type(request) is m.ObjectMessage:
            self.__dict__.setdefault("received", []).extend(
                o.id for o in request.objects if isinstance(o.obj, PaillierTensor))
        reply = super()._recv_msg(data)
        if type(request) is m.GetObjectsMessage and self.__dict__.get("received"):
            got = deserialize(reply)[0]
            if type(got) is m.ObjectsReply and any(isinstance(o, PaillierTensor) for o in got.objects):
                return serialize(m.ObjectsReply([self._objects[self.received[0]]]), sender=self.id)
        return reply


def test_substituted_sum_is_refused_and_nothing_decrypted(hook, paillier, monkeypatch):
    bad = Substitutes(hook, id=uid("subst"))
    workers = [sy.VirtualWorker(hook, id=uid("ok")), bad, sy.VirtualWorker(hook, id=uid("ok"))]

    class Picks:  # the coordinator's random pair, made to include the hostile client
        def sample(self, population, k):
            return [bad.id, next(w for w in population if w != bad.id)]

    monkeypatch.setattr(he_agg.secrets, "SystemRandom", Picks)
    decrypted = []
    real = PaillierTensor.decrypt
    monkeypatch.setattr(PaillierTensor, "decrypt", lambda self, *a, **k: decrypted.append(1) or real(self, *a, **k))
    with pytest.raises(EncryptedAggregationError, match="sums differ"):
        _train(workers, make_parts(3), encrypted_aggregation=_he(paillier))
    assert not decrypted and not _ciphertexts(workers)


class DiesAtEncryption(sy.VirtualWorker):
    def _recv_msg(self, data):
        if b"veil.fl.encrypt_state" in bytes(data):
            raise ConnectionLostError(f"client {self.id!r} went away")
        return super()._recv_msg(data)


def test_client_dropped_at_encryption_renormalises_over_survivors(hook, paillier):
    workers = [sy.VirtualWorker(hook, id=uid("ok")), DiesAtEncryption(hook, id=uid("dies")),
               sy.VirtualWorker(hook, id=uid("ok"))]
    parts = make_parts(3)
    with pytest.warns(UserWarning, match="dropped out"):
        model, hist = _train(workers, parts, encrypted_aggregation=_he(paillier))
    assert hist.rounds[0].dropped == [workers[1].id] and "went away" in hist.rounds[0].errors[workers[1].id]
    ref = honest_fedavg([parts[0], parts[2]])
    torch.testing.assert_close(model.weight.detach(), ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.bias.detach(), ref[1], atol=1e-5, rtol=0)
    assert not _ciphertexts(workers)


def test_one_survivor_of_several_is_not_decrypted(hook, paillier):
    workers = [sy.VirtualWorker(hook, id=uid("ok")), DiesAtEncryption(hook, id=uid("dies"))]
    with pytest.raises(EncryptedAggregationError, match="only 1 of the 2 clients"):
        _train(workers, make_parts(2), encrypted_aggregation=_he(paillier))
    assert not _ciphertexts(workers)


def test_a_single_client_federation_needs_no_second_aggregator(hook, paillier):
    workers = [sy.VirtualWorker(hook, id=uid("solo"))]
    parts = make_parts(1)
    model, _ = _train(workers, parts, encrypted_aggregation=_he(paillier))
    torch.testing.assert_close(model.weight.detach(), honest_fedavg(parts)[0], atol=1e-5, rtol=0)
    assert not _ciphertexts(workers)


# ------------------------------------------------------------------ one client at a time: non-finite updates


class NonFinite(sy.VirtualWorker):
    def _recv_msg(self, data):
        reply = super()._recv_msg(data)
        msg = deserialize(reply)[0]
        if type(msg) is m.ObjectsReply and isinstance(msg.objects, list) and len(msg.objects) == 3:
            loss, weight, bias = msg.objects
            return serialize(m.ObjectsReply([loss, torch.full_like(weight, float("nan")), bias]), sender=self.id)
        return reply


def test_sequential_non_finite_update_is_dropped(hook):
    workers = [NonFinite(hook, id=uid("nan")), sy.VirtualWorker(hook, id=uid("ok")),
               sy.VirtualWorker(hook, id=uid("ok"))]
    parts = make_parts(3)
    with pytest.warns(UserWarning, match="NaN or infinite"):
        model, hist = _train(workers, parts)
    assert hist.rounds[0].dropped == [workers[0].id]
    torch.testing.assert_close(model.weight.detach(), honest_fedavg(parts[1:])[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ owner-side federated DP


def test_dp_owner_still_answers_within_budget_past_max_releases_count():
    """max_releases counts up to MAX_COUNTED; past it each release is checked exactly (not refused)."""
    from veil.dp.federated import MAX_COUNTED, DPDataOwner, max_releases

    sigma, q, eps, delta = 50.0, 1e-4, 0.03, 1e-5
    assert max_releases(sigma, q, eps, delta, "rdp") == MAX_COUNTED
    x, y = make_parts(1, rows=16)[0]
    owner = DPDataOwner(x, y, max_grad_norm=1.0, noise_multiplier=sigma, budget=(eps, delta), accountant="rdp")
    owner.accountant.step(sigma, q, MAX_COUNTED)
    model = torch.nn.Linear(3, 1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    loss = lambda out, t: F.mse_loss(out, t, reduction="none").mean(dim=1)  # noqa: E731
    owner.sanitized_gradient(model, params, loss, q)
    assert owner.accountant.steps == MAX_COUNTED + 1 and owner.epsilon(delta) <= eps

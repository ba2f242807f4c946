"""Red team: per-client commitments of encrypted aggregation (``fl.he_agg``, ``fl.he_commitments``).

Attackers: a client of an encrypted FedAvg round (two-faced, replaying, failing one hand-over), an aggregating
client colluding with another client (forging), and an aggregating client reporting honest clients as
mismatching. Holes found (each test failed on the code before commitments; checked by running this file
against ``git archive HEAD`` of that code):

1. A client whose two copies differ refused the whole round (denial of service). Fixed: each client commits
   to its ciphertext (SHA-256 bound to a random round id and its client id) before any hand-over; aggregators
   check; a client whose copy fails at either aggregator is dropped and the rest re-summed.
2. A ciphertext that could not be handed to an aggregator refused the round. Fixed: that client is dropped.
3. An aggregator colluding with a client: the client hands the other aggregator a ciphertext forged from the
   ones the aggregator saw, both sums equal the victim's ciphertext, and the coordinator decrypted it alone.
   Fixed: the forged copy does not match the accomplice's commitment.
4. A client replaying its previous round's ciphertext had it summed into this round. Fixed: commitments bind
   the round id.

Guard (no hole on the old code, one the fix must not open): a client reported by one aggregator alone is
dropped on that aggregator's word, so the sum must hold a majority without that aggregator: else it (with one
accomplice) could report honest clients until a victim's update is alone next to theirs. The first version of
the fix (at least two others) let an aggregator and an accomplice do that in a round of four.
One-sided reports therefore drop a client only in rounds of five or more; reports by both aggregators
(both copies bad, a replay) in any round with a majority left.
In-process VirtualWorkers; a hostile party is a VirtualWorker whose messages are rewritten.
"""

from __future__ import annotations

import dataclasses

import phe
import pytest
import torch

import veil as sy
from veil.exceptions import ConnectionLostError
from veil.federated import trainer as fl
from veil.federated.he_agg import EncryptedAggregation, EncryptedAggregationError
from veil.he.paillier import PaillierTensor
from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize

from fl_helpers import pick_aggregators as _pick
from fl_helpers import attempt, honest_fedavg, make_model, make_parts, uid


@pytest.fixture(scope="module")
def paillier():
    return phe.generate_paillier_keypair(n_length=512)


def _he(paillier):
    return EncryptedAggregation(public_key=paillier[0], private_key=paillier[1])


def _train(model, workers, parts, rounds=1, **kw):
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    return attempt(lambda: fl.train(model, fed, rounds=rounds, lr=0.05, batch_size=8, progress=False, **kw))


def _close(model, ref):
    return torch.allclose(model.weight.detach(), ref[0], atol=1e-5) and \
        torch.allclose(model.bias.detach(), ref[1], atol=1e-5)


def _ciphertexts(msg):
    return type(msg) is m.ObjectMessage and any(isinstance(o.obj, PaillierTensor) for o in msg.objects)


class TwoFaced(sy.VirtualWorker):
    """Hands the aggregators copies of its update other than the one it encrypted (and committed to):
    the first copy doubled, or (``both``) each copy scaled differently."""

    both = False
    sent = 0

    def send_msg(self, msg, location):
        if _ciphertexts(msg):
            self.sent += 1
            if self.sent == 1 or self.both:
                factor = 2.0 if self.sent == 1 else 3.0
                msg = m.ObjectMessage([dataclasses.replace(o, obj=o.obj * factor)
                                       if isinstance(o.obj, PaillierTensor) else o for o in msg.objects])
        return super().send_msg(msg, location)


@pytest.mark.parametrize("both,n_honest", [(False, 4), (True, 3)], ids=["one-copy", "both-copies"])
def test_two_faced_client_is_dropped_and_the_round_is_fedavg_over_the_honest(hook, paillier, monkeypatch, both,
                                                                               n_honest):
    # (reported by one aggregator only, it is dropped where a majority remains without that aggregator: 5 clients)
    honest = [sy.VirtualWorker(hook, id=uid("hc-h")) for _ in range(n_honest)]
    bad = TwoFaced(hook, id=uid("hc-2face"))
    bad.both = both
    _pick(monkeypatch, honest[0].id, honest[1].id)
    parts = make_parts(n_honest + 1)
    model = make_model()
    hist, err, _ = _train(model, [*honest, bad], parts, encrypted_aggregation=_he(paillier))
    assert bad.sent == 2, "harness: both copies went out"
    assert err is None, f"one two-faced client refused the whole round: {err!r}"
    assert hist.rounds[0].dropped == [bad.id] and "commitment" in hist.rounds[0].errors[bad.id]
    assert _close(model, honest_fedavg(parts[:n_honest])), "the round is not plain FedAvg over the honest clients"


class FailsOneHandOver(sy.VirtualWorker):
    """Its first hand-over to an aggregator fails (its fault or the aggregator's: no telling)."""

    sent = 0

    def send_msg(self, msg, location):
        if _ciphertexts(msg):
            self.sent += 1
            if self.sent == 1:
                raise ConnectionLostError("connection reset")
        return super().send_msg(msg, location)


def test_client_whose_hand_over_fails_is_dropped_not_the_round(hook, paillier, monkeypatch):
    honest = [sy.VirtualWorker(hook, id=uid("hc-h")) for _ in range(4)]
    flaky = FailsOneHandOver(hook, id=uid("hc-flaky"))
    _pick(monkeypatch, honest[0].id, honest[1].id)
    parts = make_parts(5)
    model = make_model()
    hist, err, _ = _train(model, [*honest, flaky], parts, encrypted_aggregation=_he(paillier))
    assert err is None, f"one failed hand-over refused the whole round: {err!r}"
    assert hist.rounds[0].dropped == [flaky.id]
    assert _close(model, honest_fedavg(parts[:4]))


class Colluder(sy.VirtualWorker):
    """Aggregator A: keeps the ciphertexts handed to it and its own; answers the fetch of its sum with the
    victim's ciphertext."""

    victim = None

    def send_msg(self, msg, location):
        if _ciphertexts(msg):
            self.__dict__["mine"] = next(o.obj for o in msg.objects if isinstance(o.obj, PaillierTensor))
        return super().send_msg(msg, location)

    def _recv_msg(self, data):
        msg, sender, _ = deserialize(bytes(data))
        if _ciphertexts(msg):
            self.__dict__.setdefault("seen", {})[sender] = next(o.obj for o in msg.objects
                                                                if isinstance(o.obj, PaillierTensor))
        reply = super()._recv_msg(data)
        if type(msg) is m.GetObjectsMessage and self.victim in self.__dict__.get("seen", {}):
            got = deserialize(reply)[0]
            if type(got) is m.ObjectsReply and any(isinstance(o, PaillierTensor) for o in got.objects):
                return serialize(m.ObjectsReply([self.seen[self.victim]]), sender=self.id)
        return reply


class Accomplice(sy.VirtualWorker):
    """Hands aggregator B, instead of its update, -(A's + B's ciphertexts), forged from what A saw: B's sum
    becomes the victim's ciphertext alone, which A returns too."""

    colluder = None

    def send_msg(self, msg, location):
        a = self.colluder
        if _ciphertexts(msg) and location.id != a.id:
            forged = -(a.mine + a.seen[location.id])
            msg = m.ObjectMessage([dataclasses.replace(o, obj=forged) if isinstance(o.obj, PaillierTensor) else o
                                   for o in msg.objects])
        return super().send_msg(msg, location)


def test_forged_ciphertext_from_a_colluding_aggregator_is_detected(hook, paillier, monkeypatch):
    a = Colluder(hook, id=uid("hc-A"))
    b = sy.VirtualWorker(hook, id=uid("hc-B"))
    victim = sy.VirtualWorker(hook, id=uid("hc-victim"))
    y = Accomplice(hook, id=uid("hc-Y"))
    a.victim, y.colluder = victim.id, a
    _pick(monkeypatch, a.id, b.id)
    decrypted = []
    real = PaillierTensor.decrypt
    monkeypatch.setattr(PaillierTensor, "decrypt", lambda self, *k, **kw: decrypted.append(real(self, *k, **kw))
                        or decrypted[-1])
    model = make_model()
    he = dataclasses.replace(_he(paillier), fresh_keys=False)  # (the test decrypts what A saw with this key)
    hist, err, _ = _train(model, [a, b, victim, y], make_parts(4), encrypted_aggregation=he)
    victims = real(a.seen[victim.id], paillier[1])
    assert not any(d.shape == victims.shape and torch.allclose(d, victims) for d in decrypted), \
        "the coordinator decrypted the victim's ciphertext alone"
    assert isinstance(err, EncryptedAggregationError), repr(err)


def test_forged_copy_is_reported_by_the_aggregator_it_reached(hook, paillier, monkeypatch):
    from veil.federated import he_commitments  # (the fix's module)

    a = Colluder(hook, id=uid("hc-A"))
    b = sy.VirtualWorker(hook, id=uid("hc-B"))
    victim = sy.VirtualWorker(hook, id=uid("hc-victim"))
    y = Accomplice(hook, id=uid("hc-Y"))
    a.victim, y.colluder = victim.id, a
    _pick(monkeypatch, a.id, b.id)
    reports = []
    real_check = he_commitments.mismatches
    monkeypatch.setattr(he_commitments, "mismatches",
                        lambda agg, *k: reports.append((agg.id, real_check(agg, *k))) or reports[-1][1])
    _, err, _ = _train(make_model(), [a, b, victim, y], make_parts(4), encrypted_aggregation=_he(paillier))
    # (then, the round too small to drop Y on B's word, B checks the copy A verified: it matches, and the
    # round is refused by A's substituted sum instead)
    assert reports[:2] == [(a.id, set()), (b.id, {y.id})], reports
    assert isinstance(err, EncryptedAggregationError), repr(err)  # (and nothing decrypted: the test above)


def _states(workers, values):
    return {w.id: [torch.tensor(v, dtype=torch.float32).send(w)] for w, v in zip(workers, values)}


class Replays(sy.VirtualWorker):
    """From its second round on, hands over its first round's ciphertext bytes (under the new ids)."""

    def send_msg(self, msg, location):
        if _ciphertexts(msg):
            stale = self.__dict__.setdefault("stale", [])
            if len(stale) < 2:
                stale.append(next(o.obj for o in msg.objects if isinstance(o.obj, PaillierTensor)))
            else:
                k = self.__dict__.get("replayed", 0)
                self.__dict__["replayed"] = k + 1
                msg = m.ObjectMessage([dataclasses.replace(o, obj=stale[k % 2]) if isinstance(o.obj, PaillierTensor)
                                       else o for o in msg.objects])
        return super().send_msg(msg, location)


def test_replayed_ciphertext_of_an_old_round_is_refused(hook, paillier, monkeypatch):
    honest = [sy.VirtualWorker(hook, id=uid("hc-h")) for _ in range(3)]
    replayer = Replays(hook, id=uid("hc-replay"))
    workers = [*honest, replayer]
    _pick(monkeypatch, honest[0].id, honest[1].id)
    he = _he(paillier)
    weights = {w.id: 0.25 for w in workers}
    first, _ = he.aggregate(_states(workers, [[1.0, 2.0]] * 3 + [[100.0, 100.0]]), weights)
    torch.testing.assert_close(first[0], torch.tensor([25.75, 26.5]), atol=1e-5, rtol=0)
    second, failed = he.aggregate(_states(workers, [[3.0, 4.0]] * 3 + [[-50.0, 7.0]]), weights)
    assert replayer.replayed == 2, "harness: the stale copies went out"
    assert list(failed) == [replayer.id], failed  # dropped; the honest clients' average (not 25.75, 26.5)
    torch.testing.assert_close(second[0], torch.tensor([3.0, 4.0]), atol=1e-5, rtol=0)


class BlamesOne(sy.VirtualWorker):
    """Aggregator A: reports one honest client's ciphertext as not matching its commitment."""

    target = None

    def _recv_msg(self, data):
        msg = deserialize(bytes(data))[0]
        if type(msg) is m.CommandMessage and msg.op == "veil.fl.check_commitments":
            self.__dict__["blame"] = [c == self.target for c in msg.args[1]]
        reply = super()._recv_msg(data)
        if type(msg) is m.GetObjectsMessage and self.__dict__.get("blame") is not None:
            got = deserialize(reply)[0]
            if type(got) is m.ObjectsReply and len(got.objects) == 1 and got.objects[0].dtype == torch.uint8:
                return serialize(m.ObjectsReply([torch.tensor(self.__dict__.pop("blame"), dtype=torch.uint8)]),
                                 sender=self.id)
        return reply


@pytest.mark.parametrize("n,target", [(3, 2), (4, 1)], ids=["next-to-one", "with-an-accomplice"])
def test_aggregator_cannot_drop_honest_clients_to_isolate_an_update(hook, paillier, monkeypatch, n, target):
    """Guard: A reports one honest client's copy (its word against the client's). 3 clients: the sum would be A's
    update and one other. 4 clients, A reporting the other aggregator: the sum would be A's, an accomplice's and
    the victim's (the two subtract theirs). Must hold: no such sum is decrypted."""
    a = BlamesOne(hook, id=uid("hc-blamer"))
    others = [sy.VirtualWorker(hook, id=uid("hc-h")) for _ in range(n - 1)]
    a.target = others[target - 1].id
    _pick(monkeypatch, a.id, others[0].id)
    parts = make_parts(n)
    model = make_model()
    hist, err, _ = _train(model, [a, *others], parts, encrypted_aggregation=_he(paillier))
    left = [p for i, p in enumerate(parts) if i != target]
    assert not (err is None and _close(model, honest_fedavg(left))), \
        "an aggregator's false report shrank the decrypted sum to its own update, an accomplice's and a victim's"
    assert isinstance(err, EncryptedAggregationError), repr(err)


def test_commitment_binds_round_client_and_bytes(hook, paillier):
    from veil.federated import he_commitments as hc

    ct = sy.he.encrypt(torch.tensor([1.0, 2.0], dtype=torch.float64), protocol="paillier", public_key=paillier[0])
    base = hc.commitment("r1", "alice", ct)
    assert len(base) == 32 and base == hc.commitment("r1", "alice", ct)
    assert len({base, hc.commitment("r2", "alice", ct), hc.commitment("r1", "bob", ct),
                hc.commitment("r1a", "lice", ct), hc.commitment("r1", "alice", ct + ct)}) == 5
    w = sy.VirtualWorker(hook, id=uid("hc-check"))
    hook.local_worker.send_msg(m.ObjectMessage([m.StoredObject(4242, ct)]), w)
    assert hc.mismatches(w, "r1", {"alice": 4242}, {"alice": base}) == set()
    assert hc.mismatches(w, "r2", {"alice": 4242}, {"alice": base}) == {"alice"}  # an old round's commitment
    assert hc.mismatches(w, "r1", {"bob": 4242}, {"bob": base}) == {"bob"}  # another client's
    assert hc.mismatches(w, "r1", {"alice": 4243}, {"alice": base}) == {"alice"}  # never handed over
    assert hc.mismatches(w, "r1", {"alice": 4242, "bob": 4243},  # (the missing one alone, among others)
                         {"alice": base, "bob": hc.commitment("r1", "bob", ct)}) == {"bob"}
    with pytest.raises(ValueError):
        hc.as_bytes(torch.zeros(31, dtype=torch.uint8))


def test_check_names_one_ciphertext_many_times_encodes_it_once_and_bad_input_is_one_line(hook, paillier,
                                                                                         monkeypatch):
    """A requester calling ``veil.fl.check_commitments`` itself: one big ciphertext named under 500 client ids is
    encoded (the costly part) once, not 500 times; malformed arguments get one line and the worker serves on."""
    from veil.federated import he_commitments as hc
    from veil.messaging.allowlist import ALLOWLIST
    from veil.tensors import remote_ops

    ct = sy.he.encrypt(torch.zeros(64, dtype=torch.float64), protocol="paillier", public_key=paillier[0])
    w = sy.VirtualWorker(hook, id=uid("hc-many"))
    hook.local_worker.send_msg(m.ObjectMessage([m.StoredObject(4244, ct)]), w)
    encodings = []
    real = hc.encode_value
    monkeypatch.setattr(hc, "encode_value", lambda v: encodings.append(1) or real(v))
    clients = {f"c{i}": 4244 for i in range(500)}
    digests = {c: hc.commitment("r", c, ct) for c in clients}
    encodings.clear()
    assert hc.mismatches(w, "r", clients, digests) == set()
    assert len(encodings) == 1, f"{len(encodings)} encodings of one ciphertext"
    with pytest.raises(Exception) as err:
        remote_ops.call(ALLOWLIST.by_name("veil.fl.check_commitments"),
                        ("r", ["a", "b"], [m.ObjectRef(4244)], torch.zeros(2, 32, dtype=torch.uint8)), {},
                        location=w).get()
    assert "check_commitments" in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert hc.mismatches(w, "r", {"c0": 4244}, digests) == set()  # still serving

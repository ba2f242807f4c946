"""Red team (fl_weights): what a client's claimed weight, an earlier round's CKKS ciphertext and a second round
running at the same time do to encrypted aggregation (``veil.he.aggregation``, ``veil.federated.he_agg``).

Attackers: a client (or the aggregator summing for the key holder) that states the weight folded into an
encrypted update; an accomplice of an aggregating client that hands in, as its update, a CKKS ciphertext the
aggregator saw in an earlier round; clients that claim zero samples; a coordinator running two rounds on
one ``EncryptedAggregation`` at once.

Every test asserts the SAFE behaviour. Those whose docstring starts with HOLE failed on the code before the
fix (each was first a strict xfail, and the file was run against ``git archive`` of the parent commit); the
others guard. Fixed:

- ``decrypt_update(bound=)`` needs ``max_weight=``: a claimed weight above it is refused, nothing decrypted;
  negative weights are refused (``aggregate_encrypted``, ``update_from_wire``), weight 0 counts for nothing;
- ``EncryptedAggregation`` refuses negative or non-finite weights, and survivors of total weight 0 (a NaN
  model before);
- each CKKS round encrypts under a fresh context (``ckks.fresh_like``), as Paillier rounds had fresh pairs;
- a round's keys (and where its context is stored) live in the round (``he_agg._RoundKeys``), not on the
  shared ``EncryptedAggregation``.

Kept (documented in ``he_agg``): a refused sum tells a crafting client one bit about the others' sum; that
refusal stops ``fl.train`` with nothing released (guarded here).
"""

from __future__ import annotations

import threading
import time

import phe
import pytest
import torch

import veil as sy
import veil.he
from veil.federated import trainer as fl
from veil.federated.he_agg import EncryptedAggregation, EncryptedAggregationError
from veil.he import ckks
from veil.he.aggregation import aggregate_encrypted, decrypt_update, encrypt_update, update_from_wire, update_to_wire
from veil.he.ckks import CKKSContext, CKKSTensor
from veil.he.errors import EncodingOverflowError, WireFormatError
from veil.messaging.serde import deserialize

from fl_helpers import CraftsItsCiphertext as Crafts, RecordsCKKS, fedavg_rounds
from fl_helpers import attempt, make_model, make_parts, uid
from fl_helpers import pick_aggregators as _pick

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def paillier():
    return phe.generate_paillier_keypair(n_length=512)


@pytest.fixture(scope="module")
def ckks_ctx():
    return ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], galois_keys=False)


def _one_line(e: BaseException) -> bool:
    return "\n" not in str(e) and 0 < len(str(e)) < 400


# ================================================================== decrypt_update: the claimed weight


@pytest.mark.parametrize("claimed", [1e300, 1e6])
def test_a_claimed_weight_does_not_lift_the_decryption_bound(paillier, claimed):
    """HOLE: ``decrypt_update(bound=)`` refused a sum beyond ``bound`` times the aggregate's weight, and that
    weight is what the update's sender wrote on the wire: a finite 1e300 lifted the bound off any crafted sum
    (the key holder decrypted it and handed back sum / 1e300, which times 1e300 is the sum). Now the key holder
    states ``max_weight``: a claim above it is refused in one line, nothing decrypted."""
    pub, priv = paillier
    crafted = encrypt_update({"w": torch.tensor([5000.0, -7.0])}, protocol="paillier", public_key=pub)
    sent = update_from_wire(dict(update_to_wire(crafted), weight=claimed))
    decrypted = []
    real = sent.tensors["w"].decrypt
    sent.tensors["w"].decrypt = lambda *a: decrypted.append(1) or real(*a)
    with pytest.raises(ValueError, match="max_weight") as e:  # a bound with no stated ceiling is no bound
        decrypt_update(sent, priv, bound=10.0)
    assert _one_line(e.value) and not decrypted
    with pytest.raises(ValueError, match="max_weight") as e:
        decrypt_update(sent, priv, bound=10.0, max_weight=100)
    assert _one_line(e.value) and not decrypted


def test_the_bound_holds_at_an_honest_weight_and_fedavg_is_torchs(paillier):
    """Guard: within ``max_weight`` the bound scales with the weight, and the average is plain FedAvg."""
    pub, priv = paillier
    ups = [{"w": torch.tensor([1.0, -2.0, 3.0])}, {"w": torch.tensor([4.0, 0.5, -1.0])}]
    enc = [encrypt_update(u, protocol="paillier", public_key=pub) for u in ups]
    total = aggregate_encrypted(enc, weights=[3, 1])
    out = decrypt_update(total, priv, bound=4.0, max_weight=10)
    assert torch.allclose(out["w"], (3 * ups[0]["w"] + ups[1]["w"]) / 4, atol=1e-5), "not what plain torch gives"
    with pytest.raises(EncodingOverflowError):  # (9 > 3 * 2.5: refused at the weight it holds)
        decrypt_update(aggregate_encrypted(enc, weights=[3, 0]), priv, bound=2.5, max_weight=10)


def test_zero_weights_count_for_nothing_and_negative_ones_are_refused(paillier):
    """HOLE: negative weights were accepted (one client's negative weight cancels another's in the weight the
    bound scales with, and a negative-weight sum was "averaged"), and an aggregate of weight 0 was divided by 0
    (inf/NaN handed back). Now: as with Flower's ``num_examples``, a weight-0 update counts for nothing; a
    negative weight (given or on the wire) is refused in one line, and so is averaging a weight of 0."""
    pub, priv = paillier
    ups = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([-3.0, 5.0])}]
    enc = [encrypt_update(u, protocol="paillier", public_key=pub) for u in ups]
    out = decrypt_update(aggregate_encrypted(enc, weights=[0, 2]), priv)
    assert torch.allclose(out["w"], ups[1]["w"], atol=1e-5), "not what plain torch gives"
    for bad in ([-1, 2], [2, -1e-9]):
        with pytest.raises(ValueError, match="negative") as e:
            aggregate_encrypted(enc, weights=bad)
        assert _one_line(e.value)
    with pytest.raises(WireFormatError, match="negative"):
        update_from_wire(dict(update_to_wire(enc[0]), weight=-1.0))
    nothing = aggregate_encrypted(enc, weights=[0, 0])
    with pytest.raises(ValueError, match="weight") as e:
        decrypt_update(nothing, priv)
    assert _one_line(e.value)
    assert torch.allclose(decrypt_update(nothing, priv, average=False)["w"], torch.zeros(2), atol=1e-5)


# ================================================================== he_agg: a round's survivors that weigh nothing


class FailsToEncrypt(sy.VirtualWorker):
    def _recv_msg(self, data):
        if b"veil.fl.encrypt_state" in bytes(data):
            raise ConnectionResetError("gone")
        return super()._recv_msg(data)


def test_survivors_that_weigh_nothing_refuse_the_round_instead_of_a_nan_model(hook, paillier):
    """HOLE: the survivors' sum was divided by their total weight: when the one client holding samples failed
    and the others claimed 0, the round returned 0/0 (NaN) as the next model. Now refused in one line."""
    heavy = FailsToEncrypt(hook, id=uid("fw-heavy"))
    light = [sy.VirtualWorker(hook, id=uid("fw-light")) for _ in range(2)]
    states = {w.id: [torch.tensor([1.0, 2.0]).send(w)] for w in [heavy, *light]}
    weights = {heavy.id: 1.0, light[0].id: 0.0, light[1].id: 0.0}
    he = EncryptedAggregation(public_key=paillier[0], private_key=paillier[1])
    got, err, _ = attempt(lambda: he.aggregate(states, weights))
    assert isinstance(err, EncryptedAggregationError) and "weight" in str(err) and _one_line(err), (got, err)
    with pytest.raises(ValueError, match="weight"):  # (a negative or non-finite weight is refused up front)
        he.aggregate(states, {**weights, heavy.id: -1.0})


# ================================================================== CKKS: an earlier round's ciphertext


def test_an_earlier_rounds_ckks_ciphertext_cannot_be_handed_in(hook, ckks_ctx, monkeypatch):
    """HOLE: CKKS rounds shared one context, so an accomplice of aggregator A handed in, as its round-2 update,
    100 times the victim's round-1 ciphertext that A had seen (under the round's key, of its form, matching the
    accomplice's own commitment): the released round-2 model was dominated by the victim's update. Now each
    CKKS round encrypts under a fresh context (``fresh_keys``, as Paillier rounds did): the old ciphertext is
    flagged by both aggregators, its sender dropped, and round 2 is FedAvg over the honest clients."""
    a = RecordsCKKS(hook, id=uid("fw-A"))
    b = sy.VirtualWorker(hook, id=uid("fw-B"))
    victim = sy.VirtualWorker(hook, id=uid("fw-victim"))
    h = sy.VirtualWorker(hook, id=uid("fw-h"))
    accomplice = Crafts(hook, id=uid("fw-acc"))

    def old_scaled(encrypt, flat, kw):
        old = a.__dict__.get("seen", {}).get(victim.id)
        return encrypt(flat, **kw) if old is None else old * 100.0

    accomplice.craft = old_scaled
    _pick(monkeypatch, a.id, b.id)
    workers, parts = [a, b, victim, h, accomplice], make_parts(5)
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    model = make_model()
    he = EncryptedAggregation(context=ckks_ctx)
    hist, err, _ = attempt(lambda: fl.train(model, fed, rounds=2, lr=0.05, batch_size=8, progress=False,
                                         encrypted_aggregation=he))
    assert err is None, repr(err)
    assert victim.id in a.seen, "harness: A saw the victim's round-1 ciphertext"
    assert [r.dropped for r in hist.rounds] == [[], [accomplice.id]], [r.dropped for r in hist.rounds]
    ref = fedavg_rounds([parts, parts[:4]])
    assert torch.allclose(model.weight.detach(), ref[0], atol=1e-4), "not what plain torch gives"
    assert torch.allclose(model.bias.detach(), ref[1], atol=1e-4), "not what plain torch gives"
    # no client keeps a round's context, and none ever held a secret key
    assert not [o for w in workers for o in w._objects.values() if isinstance(o, (CKKSContext, CKKSTensor))]


class CountsRounds(sy.VirtualWorker):
    def _recv_msg(self, data):
        if b"veil.fl.encrypt_state" in bytes(data):
            self.asked = self.__dict__.get("asked", 0) + 1
        return super()._recv_msg(data)


def test_a_refused_sum_stops_the_training_run_with_nothing_released(hook, ckks_ctx):
    """Guard (the one-bit limit): whether a sum is refused depends on every client's values, so a client that
    crafts its entry near ``value_bound`` learns whether the others' sum passed its threshold. That bit must cost
    the whole run: ``fl.train`` raises in one line, the model is left as it was, and no later round is asked."""
    honest = [CountsRounds(hook, id=uid("fw-ok")) for _ in range(2)]
    prober = Crafts(hook, id=uid("fw-probe"))
    prober.craft = lambda encrypt, flat, kw: encrypt(flat + 2.0**17, **kw)  # (past 2**16 whatever the others hold)
    workers, parts = [*honest, prober], make_parts(3)
    fed = sy.FederatedDataset([sy.BaseDataset(x, y).send(w) for (x, y), w in zip(parts, workers)])
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    hist, err, _ = attempt(lambda: fl.train(model, fed, rounds=3, lr=0.05, batch_size=8, progress=False,
                                         encrypted_aggregation=EncryptedAggregation(context=ckks_ctx)))
    assert isinstance(err, EncryptedAggregationError) and "value bound" in str(err) and _one_line(err), repr(err)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before)), "a refused sum was released"
    assert [w.asked for w in honest] == [1, 1], "a later round ran after a refusal"


# ================================================================== two rounds at once on one EncryptedAggregation


class WaitsOnce(sy.VirtualWorker):
    """Holds its first encryption request until ``go`` is set (the first round pauses mid-encryption)."""

    def _recv_msg(self, data):
        if b"veil.fl.encrypt_state" in bytes(data) and not self.__dict__.get("held"):
            self.held = True
            self.paused.set()
            assert self.go.wait(30), "harness: the other round never finished"
        if b"veil.fl.encrypt_state" in bytes(data):
            msg = deserialize(bytes(data))[0]
            self.__dict__.setdefault("keys", []).append(getattr(msg.args[2], "n", None))
        return super()._recv_msg(data)


def test_two_rounds_at_once_each_use_their_own_keys(hook, paillier):
    """HOLE: the round's fresh Paillier pair lived on the ``EncryptedAggregation`` (``_round_keys``): a second
    round started while the first was encrypting replaced it, and its end reset it to None, so the first round's
    later clients encrypted under the configured long-term key (no longer fresh: an earlier round's ciphertext
    under it passes) and the round was refused. Now a round's keys are its own: both rounds finish, each is the
    weighted sum of its own clients, and no client is asked to encrypt under the configured key."""
    pub, priv = paillier
    go, paused = threading.Event(), threading.Event()
    first = [WaitsOnce(hook, id=uid("fw-r1")) for _ in range(3)]
    for w in first:
        w.go, w.paused = go, paused
    second = [sy.VirtualWorker(hook, id=uid("fw-r2")) for _ in range(3)]
    values = {w.id: torch.tensor([float(k), -2.0 * k]) for k, w in enumerate([*first, *second], start=1)}
    he = EncryptedAggregation(public_key=pub, private_key=priv)

    def states(ws):
        return {w.id: [values[w.id].send(w)] for w in ws}

    out: dict = {}
    s1, s2 = states(first), states(second)
    runner = threading.Thread(target=lambda: out.update(one=attempt(
        lambda: he.aggregate(s1, {w.id: 1 / 3 for w in first}))))
    runner.start()
    try:
        assert paused.wait(30), "harness: the first round never asked to encrypt"
        out["two"] = attempt(lambda: he.aggregate(s2, {w.id: 1 / 3 for w in second}))
    finally:
        go.set()
        runner.join(60)
    for name, ws in (("one", first), ("two", second)):
        (total, failed), err = out[name][0] or (None, None), out[name][1]
        assert err is None and not failed, (name, err, failed)
        assert torch.allclose(total[0], sum(values[w.id] for w in ws) / 3, atol=1e-5), "not what plain torch gives"
    asked = [k for w in first for k in w.keys]
    assert pub.n not in asked and len(set(asked)) == 1, "the first round's clients got another key mid-round"


# ================================================================== a fresh Paillier pair within the round's time


def test_a_rounds_fresh_paillier_key_stops_at_the_round_deadline(hook):
    """HOLE: each Paillier round made its fresh pair with phe, which no deadline stops: at the coordinator's key
    length of ~19,600 bits that took ~100 s here, all before the first client was asked, whatever
    ``round_seconds`` said. Now the pair is drawn candidate by candidate under the round's deadline: every client
    is dropped as late (nothing decrypted) soon after it. (The configured pair is two Mersenne primes,
    2**9689-1 and 2**9941-1: only its length matters here, and it costs nothing to make.)"""
    p, q = 2**9689 - 1, 2**9941 - 1
    public = phe.PaillierPublicKey(p * q)
    he = EncryptedAggregation(public_key=public, private_key=phe.PaillierPrivateKey(public, p, q), round_seconds=0.3)
    workers = [sy.VirtualWorker(hook, id=uid("fw-kg")) for _ in range(3)]
    states = {w.id: [torch.tensor([1.0, 2.0]).send(w)] for w in workers}
    start = time.monotonic()
    got, err, _ = attempt(lambda: he.aggregate(states, {w.id: 1.0 for w in workers}))
    took = time.monotonic() - start
    assert err is None and got[0] is None, (got, err)  # nothing decrypted: every client dropped as late
    assert sorted(got[1]) == sorted(states) and all("round_seconds" in e for e in got[1].values()), got
    assert took < 10.0, f"the round's key took {took:.1f} s"


# ================================================================== fixed CKKS keys: rounds at once share one public copy


def test_without_fresh_keys_a_finished_round_does_not_take_a_running_rounds_ckks_registration(ckks_ctx):
    """HOLE: with ``fresh_keys=False`` every round registered a public copy of its own under the one key id (a
    weak registry entry, replaced by the newest copy). When a round that started later ended first, its copy went
    and the entry with it: the running round's sums, fetched back over the wire, no longer decoded ("a context
    this process has not received"). Now the rounds share one public copy that lives with the aggregation."""
    import gc

    from veil.he import ckks_wire

    he = EncryptedAggregation(context=ckks_ctx, fresh_keys=False)
    running = he._keys_of_a_new_round()
    later = he._keys_of_a_new_round()
    wire = ckks_wire.tensor_to_wire(veil.he.encrypt(torch.tensor([1.5, -2.0]), protocol="ckks",
                                                    context=running.public))
    del later  # the later round ended first (its keys freed)
    gc.collect()
    back = ckks_wire.tensor_from_wire(wire)  # a running round's sum, decoded against the registered context
    assert torch.allclose(back.decrypt(ckks_ctx).to(torch.float32), torch.tensor([1.5, -2.0]), atol=1e-3)

"""Red team, second pass (fl_weights): what today's weight fixes (``decrypt_update(bound=, max_weight=)``, weight 0
counting for nothing, survivors of weight 0 refused) and fresh CKKS contexts per round (``ckks.fresh_like``,
``he_agg._RoundKeys``) left open (``veil.he.aggregation``, ``veil.federated.he_agg``).

Attackers: an aggregating client that reports an honest client's copy in a round where some clients hold no
samples; a sender stating a tiny or oversized weight; a key holder's bound that bounds nothing (NaN, inf);
an accomplice relabelling an earlier round's CKKS ciphertext with this round's key id; many failed CKKS rounds;
a round's registration of its context at the coordinator; a client encrypting at a scale of its own.

Tests whose docstring starts with HOLE failed on the code before the fix (the file was run against
``git archive`` of the parent commit); the others guard what holds (each was checked to fail with the
defence switched off: ``fresh_keys=False``, a round's ``_free`` skipped). Fixed:

- ``he_agg._Quorum``: a majority of the clients of positive weight must be left in a sum too, and only those
  count as cover for a one-sided drop (clients of weight 0 padded the head count: an aggregator's report, or a
  stalling client, left a victim's update alone beside the attacker's);
- ``decrypt_update`` refuses a non-finite average (a tiny claimed weight gave +-inf, as weight 0 did), a
  ``bound`` that is not a positive finite number (NaN or inf refused nothing); ``EncryptedAggregation`` so
  its ``value_bound``;
- an int weight past float64's range is refused in one line (``update_from_wire``: WireFormatError;
  ``aggregate_encrypted``, ``decrypt_update(max_weight=)``, ``EncryptedAggregation.aggregate``: ValueError),
  not a bare OverflowError;
- ``ckks_wire.remember``: a round's public context no longer replaces the coordinator's registered secret
  context of the same key (``fresh_keys=False``: its own ciphertexts on workers no longer decoded after a round);
- ``he_commitments.form_of``: a CKKS ciphertext's form holds its scale, so one at a scale of its sender's
  choosing is flagged and its sender dropped (the aggregator's addition failed: one client refused the round).
"""

from __future__ import annotations

import dataclasses
import gc
import time

import phe
import pytest
import tenseal as ts
import torch

import veil as sy
import veil.he
from veil.federated.he_agg import EncryptedAggregation, EncryptedAggregationError
from veil.he import ckks, ckks_wire
from veil.he.aggregation import aggregate_encrypted, decrypt_update, encrypt_update, update_from_wire, update_to_wire
from veil.he.ckks import CKKSContext, CKKSTensor
from veil.he.errors import WireFormatError
from veil.messaging.serde import deserialize, serialize

from fl_helpers import CraftsItsCiphertext as Crafts, RecordsCKKS
from fl_helpers import attempt, uid
from fl_helpers import pick_aggregators as _pick

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def paillier():
    return phe.generate_paillier_keypair(n_length=512)


@pytest.fixture(scope="module")
def ckks_ctx():  # (the smallest ring: each round sends its fresh public context to every client)
    return ckks.context(poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40], global_scale=2**20,
                        galois_keys=False)


@pytest.fixture(scope="module")
def precise_ctx():  # (where values are compared: scale 2**40, so flooding stays far below the values)
    return ckks.context(poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60], galois_keys=False)


def _one_line(e: BaseException) -> bool:
    return "\n" not in str(e) and 0 < len(str(e)) < 400


def _states(workers, values):
    return {w.id: [values[w.id].clone().send(w)] for w in workers}


# ================================================================== he_agg: clients of weight 0 are no cover


class BlamesOne(sy.VirtualWorker):
    """A hostile aggregator: checks the ``target``'s copy against a zeroed commitment (a mismatch), every time."""

    target = None

    def _recv_msg(self, data):
        if b"veil.fl.check_commitments" in bytes(data):
            msg, sender, _ = deserialize(bytes(data))
            args = list(msg.args)
            digests = args[3].clone()
            for k, name in enumerate(args[1]):
                if name == self.target:
                    digests[k] = 0
            args[3] = digests
            data = serialize(dataclasses.replace(msg, args=tuple(args)), sender=sender)
        return super()._recv_msg(data)


def test_clients_of_weight_0_are_no_cover_for_a_one_sided_drop(hook, paillier, monkeypatch):
    """HOLE: a client reported by one aggregator alone was dropped if a majority of the round's clients stayed
    in the sum beside the reporter, counted by heads; clients of weight 0 (0 samples: fl.train admits them) add
    nothing to the sum but counted. In a round of five where two hold no samples, aggregator A reported the one
    honest client H: dropped on A's word, the decrypted average was (A + V) / 2, and A, knowing its own update,
    had the victim V's alone. Now only clients of positive weight count as cover, so the drop goes to the repair
    path (A rejects the verified copy: the round is refused, nothing decrypted)."""
    a = BlamesOne(hook, id=uid("fw2-A"))
    b = sy.VirtualWorker(hook, id=uid("fw2-B"))  # (the other aggregator: 0 samples)
    victim, h, empty = (sy.VirtualWorker(hook, id=uid(f"fw2-{n}")) for n in ("V", "H", "Z"))
    a.target = h.id
    _pick(monkeypatch, a.id, b.id)
    workers = [a, b, victim, h, empty]
    values = {w.id: torch.tensor([float(k), -3.0 * k]) for k, w in enumerate(workers, start=1)}
    weights = {a.id: 1.0, b.id: 0.0, victim.id: 1.0, h.id: 1.0, empty.id: 0.0}
    he = EncryptedAggregation(public_key=paillier[0], private_key=paillier[1])
    got, err, _ = attempt(lambda: he.aggregate(_states(workers, values), weights))
    if err is None:
        total, failed = got
        isolated = (values[a.id] + values[victim.id]) / 2
        assert not torch.allclose(total[0], isolated, atol=1e-4), \
            "an aggregator's word alone left the victim's update beside its own (weight-0 clients counted as cover)"
        assert h.id not in failed and torch.allclose(total[0], (values[a.id] + values[victim.id] + values[h.id]) / 3,
                                                     atol=1e-4), "not what plain torch gives"
    else:
        assert isinstance(err, EncryptedAggregationError) and _one_line(err), repr(err)


class Stalls(sy.VirtualWorker):
    """A hostile client: holds its encryption request until the round's deadline has passed."""

    def _recv_msg(self, data):
        if b"veil.fl.encrypt_state" in bytes(data):
            time.sleep(0.4)
        return super()._recv_msg(data)


def test_clients_of_weight_0_are_no_cover_when_a_stalling_client_cuts_the_round(hook, paillier):
    """HOLE: a stalling client holds its encryption request past the round's deadline, so the clients after it
    are not asked (dropped as late); the round went on if a majority of its clients, counted by heads, had
    encrypted. With two clients of weight 0 before the staller, the sum held the victim's update and the
    staller's alone: it got V's update from the average. Now a majority of the clients of positive weight must
    be left too: the round is refused in one line, nothing decrypted."""
    victim = sy.VirtualWorker(hook, id=uid("fw2-V"))
    empty = [sy.VirtualWorker(hook, id=uid("fw2-Z")) for _ in range(2)]
    staller = Stalls(hook, id=uid("fw2-stall"))
    late = [sy.VirtualWorker(hook, id=uid("fw2-late")) for _ in range(3)]
    workers = [victim, *empty, staller, *late]
    values = {w.id: torch.tensor([float(k), 1.0 - k]) for k, w in enumerate(workers, start=1)}
    weights = {w.id: 0.0 if w in empty else 0.2 for w in workers}
    he = EncryptedAggregation(public_key=paillier[0], private_key=paillier[1])
    got, err, _ = attempt(lambda: he.aggregate(_states(workers, values), weights,
                                               deadline=time.monotonic() + 0.2))
    if err is None:
        total, failed = got
        assert set(failed) != {w.id for w in late} or not torch.allclose(
            total[0], (values[victim.id] + values[staller.id]) / 2, atol=1e-4), \
            "the staller cut the round to its own update and the victim's (weight-0 clients counted as cover)"
    else:
        assert isinstance(err, EncryptedAggregationError) and _one_line(err), repr(err)


def test_weight_0_clients_still_take_part_when_nobody_is_reported(hook, paillier, monkeypatch):
    """Guard (the fix must not refuse honest rounds): clients of weight 0 in a round with no report; the result is
    the weighted average of the others, as plain torch gives it."""
    workers = [sy.VirtualWorker(hook, id=uid("fw2-ok")) for _ in range(5)]
    _pick(monkeypatch, workers[0].id, workers[1].id)
    values = {w.id: torch.tensor([float(k), 2.0 - k]) for k, w in enumerate(workers, start=1)}
    weights = dict(zip([w.id for w in workers], [0.0, 0.25, 0.0, 0.75, 0.0]))
    he = EncryptedAggregation(public_key=paillier[0], private_key=paillier[1])
    total, failed = he.aggregate(_states(workers, values), weights)
    assert not failed
    expected = sum(weights[w] * values[w] for w in values)
    assert torch.allclose(total[0], expected, atol=1e-5), "not what plain torch gives"


# ================================================================== decrypt_update: weights near 0 and past a float


@pytest.mark.parametrize("claimed", [5e-324, 1e-300])
def test_a_tiny_claimed_weight_is_not_averaged_into_inf(paillier, claimed):
    """HOLE: weight 0 is refused for an average ("nothing to average"), but a subnormal or tiny claimed weight
    was not: the sum divided by it came back as +-inf (what the weight-0 fix removed). Now a non-finite average
    is refused in one line; -0.0 is a weight of 0 (refused for an average), and a weight exactly max_weight
    passes the bound (FedAvg as plain torch)."""
    pub, priv = paillier
    u = encrypt_update({"w": torch.tensor([1.0, -2.0])}, protocol="paillier", public_key=pub)
    tiny = update_from_wire(dict(update_to_wire(u), weight=claimed))
    got, err, _ = attempt(lambda: decrypt_update(tiny, priv))
    assert got is None and isinstance(err, ValueError) and _one_line(err), (got, err)
    with pytest.raises(ValueError, match="weight"):
        decrypt_update(update_from_wire(dict(update_to_wire(u), weight=-0.0)), priv)
    at_most = update_from_wire(dict(update_to_wire(u), weight=2))
    out = decrypt_update(at_most, priv, bound=1.0, max_weight=2)
    assert torch.allclose(out["w"], torch.tensor([1.0, -2.0]) / 2, atol=1e-6), "not what plain torch gives"


def test_weights_past_a_float_are_refused_in_one_line(hook, paillier):
    """HOLE: an int weight past float64's range (a JSON wire dict carries one; a caller may pass one) raised a
    bare ``OverflowError: int too large to convert to float`` from ``update_from_wire`` (not its WireFormatError),
    ``aggregate_encrypted``, ``decrypt_update(max_weight=)`` and ``EncryptedAggregation.aggregate`` (after the
    round had run, in its bound). Now each refuses it in one line, as it does inf."""
    pub, priv = paillier
    huge = 10**400
    u = encrypt_update({"w": torch.tensor([1.0, 2.0])}, protocol="paillier", public_key=pub)
    with pytest.raises(WireFormatError) as e:
        update_from_wire(dict(update_to_wire(u), weight=huge))
    assert _one_line(e.value)
    for call in (lambda: aggregate_encrypted([u, u], weights=[huge, 1]),
                 lambda: decrypt_update(u, priv, bound=10.0, max_weight=huge)):
        got, err, _ = attempt(call)
        assert type(err) is ValueError and _one_line(err), (got, err)
    w = sy.VirtualWorker(hook, id=uid("fw2-big"))
    he = EncryptedAggregation(public_key=pub, private_key=priv)
    got, err, _ = attempt(lambda: he.aggregate({w.id: [torch.tensor([1.0]).send(w)]}, {w.id: huge}))
    assert type(err) is ValueError and _one_line(err), (got, err)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bound_that_bounds_nothing_is_refused(paillier, ckks_ctx, bad):
    """HOLE: ``decrypt_update(bound=nan)`` or ``bound=inf`` decrypted and returned any crafted sum (``x > nan``
    is false), and ``EncryptedAggregation(value_bound=nan or inf)`` released any crafted CKKS sum, which may
    carry the round's secret key: a bound read from a config or computed as NaN switched the check off
    silently. Now both refuse a bound that is not a positive finite number, in one line, before decrypting
    (a bound of 0 or below, which refused every sum as "crafted", is refused so too)."""
    pub, priv = paillier
    crafted = encrypt_update({"w": torch.tensor([5000.0])}, protocol="paillier", public_key=pub)
    got, err, _ = attempt(lambda: decrypt_update(crafted, priv, bound=bad, max_weight=1))
    assert got is None and type(err) is ValueError and "bound" in str(err) and _one_line(err), (got, err)
    got, err, _ = attempt(lambda: EncryptedAggregation(context=ckks_ctx, value_bound=bad))
    assert got is None and type(err) is ValueError and "value_bound" in str(err) and _one_line(err), (got, err)


# ================================================================== CKKS: an earlier round's ciphertext relabelled


def test_an_earlier_rounds_ciphertext_relabelled_with_this_rounds_key_releases_nothing(hook, ckks_ctx, monkeypatch):
    """Guard: fresh contexts share the ring and modulus chain, so the victim's round-1 ciphertext (seen by
    aggregator A) loads under round 2's context once its wire key id is rewritten, passes the aggregators' form
    check and its sender's commitment. It must not bring the victim's update into round 2's result: under round
    2's secret key it decrypts to noise far past the value bound, so the round is refused in one line (or its
    sender dropped); no result near the victim's values is returned."""
    a = RecordsCKKS(hook, id=uid("fw2-A"))
    b, victim, h = (sy.VirtualWorker(hook, id=uid(f"fw2-{n}")) for n in ("B", "V", "h"))
    accomplice = Crafts(hook, id=uid("fw2-acc"))
    relabelled = []

    def relabel(encrypt, flat, kw):
        old = a.__dict__.get("seen", {}).get(victim.id)
        if old is None:
            return encrypt(flat, **kw)
        ctx = kw["context"]
        segments = [ts.ckks_vector_from(ctx.raw, s.serialize()) for s in old.segments]
        relabelled.append(1)
        return CKKSTensor(ctx, segments, old.shape, old.dtype)

    accomplice.craft = relabel
    _pick(monkeypatch, a.id, b.id)
    workers = [a, b, victim, h, accomplice]
    values = {w.id: torch.tensor([0.5 * k, -1.0, 2.0 * k]) for k, w in enumerate(workers, start=1)}
    weights = {w.id: 0.2 for w in workers}
    he = EncryptedAggregation(context=ckks_ctx)
    first, failed = he.aggregate(_states(workers, values), weights)
    assert not failed and victim.id in a.seen, "harness: A saw the victim's round-1 ciphertext"
    got, err, _ = attempt(lambda: he.aggregate(_states(workers, values), weights))
    assert relabelled, "harness: the accomplice handed in the relabelled ciphertext"
    if err is None:
        (total, failed) = got
        honest = sum(values[w.id] for w in workers[:4]) / 4
        assert accomplice.id in failed and torch.allclose(total[0], honest, atol=1e-3), (total, failed)
    else:
        assert isinstance(err, EncryptedAggregationError) and _one_line(err), repr(err)


# ================================================================== CKKS: what failed rounds leave behind


class FailsToEncrypt(sy.VirtualWorker):
    def _recv_msg(self, data):
        if b"veil.fl.encrypt_state" in bytes(data):
            raise ConnectionResetError("gone")
        return super()._recv_msg(data)


def _live_contexts() -> int:
    gc.collect()
    return sum(type(o) is CKKSContext for o in gc.get_objects())


def test_failed_ckks_rounds_leave_no_context_anywhere(hook, ckks_ctx):
    """Guard: each CKKS round makes a context (a fresh key pair), stores its public half on every client and
    registers it at the coordinator (``ckks_wire.remember``). Rounds refused part-way (a sum past the value
    bound; too few clients left) must leave no context or ciphertext on any client, and neither the
    coordinator's registry nor the live contexts grow with the rounds (each round's keys die with it)."""
    honest = [sy.VirtualWorker(hook, id=uid("fw2-m")) for _ in range(2)]
    prober = Crafts(hook, id=uid("fw2-probe"))
    prober.craft = lambda encrypt, flat, kw: encrypt(flat + 2.0**17, **kw)
    gone = [FailsToEncrypt(hook, id=uid("fw2-gone")) for _ in range(2)]
    he = EncryptedAggregation(context=ckks_ctx)
    values = {w.id: torch.tensor([1.0, -2.0]) for w in [*honest, prober, *gone]}

    def rounds():
        for workers in ([*honest, prober], [honest[0], *gone]):
            got, err, _ = attempt(lambda: he.aggregate(_states(workers, values), {w.id: 1 / 3 for w in workers}))
            assert isinstance(err, EncryptedAggregationError), (got, err)
            del err  # (its traceback holds the round's frame, and so its keys)

    rounds()  # (warm: lazily made module state is not the rounds')
    registered, live = len(ckks_wire._received), _live_contexts()
    rounds()
    assert len(ckks_wire._received) <= registered and _live_contexts() <= live, \
        (len(ckks_wire._received), registered, _live_contexts(), live)
    left = [o for w in [*honest, prober, *gone] for o in w._objects.values() if isinstance(o, (CKKSContext,
                                                                                             CKKSTensor))]
    assert not left, left


def test_a_round_leaves_the_coordinators_own_ckks_registration_alone(hook, precise_ctx):
    """HOLE: each round registers its public context (``ckks_wire.remember``) so that the sums fetched back
    decode; with ``fresh_keys=False`` that is the coordinator's own key, and the registration replaced the
    secret context ``send_encrypted`` had registered, then vanished with the round (a weak entry): the
    coordinator's own ciphertexts on a worker no longer came back (``ptr.get()``: "a context this process has
    not received"). Now a registered secret context is kept; the round and the fetch both work."""
    x = torch.tensor([0.25, -1.5, 3.0])
    keeper = sy.VirtualWorker(hook, id=uid("fw2-keep"))
    ptr = veil.he.remote.send_encrypted(ckks.encrypt(x, precise_ctx), keeper)
    workers = [sy.VirtualWorker(hook, id=uid("fw2-c")) for _ in range(3)]
    values = {w.id: torch.tensor([float(k), -1.0]) for k, w in enumerate(workers, start=1)}
    he = EncryptedAggregation(context=precise_ctx, fresh_keys=False)
    total, failed = he.aggregate(_states(workers, values), {w.id: 1 / 3 for w in workers})
    assert not failed and torch.allclose(total[0], sum(values.values()) / 3, atol=1e-2), "not what plain torch gives"
    gc.collect()
    got, err, _ = attempt(lambda: ptr.get().decrypt())
    assert err is None and torch.allclose(got, x, atol=1e-2), (got, err)


def test_a_ciphertext_at_another_scale_drops_only_its_client(hook, precise_ctx, monkeypatch):
    """HOLE: the aggregators' form check (type, size, key) let through a CKKS ciphertext under the round's key at
    a scale of its sender's choosing (a fresh context's parameters, encoded at 2**10): it matched its commitment,
    then the aggregator's addition failed ("scale mismatch"), so one client refused the round and the refusal
    blamed an aggregating client. Now the form holds the ciphertext's scale: both aggregators flag it, its
    sender alone is dropped, and the round is FedAvg of the others."""
    odd = Crafts(hook, id=uid("fw2-scale"))

    def other_scale(encrypt, flat, kw):
        ctx = kw["context"]
        segments = [ts.ckks_vector(ctx.raw, flat.tolist(), scale=2.0**10)]
        return CKKSTensor(ctx, segments, flat.shape, flat.dtype)

    odd.craft = other_scale
    honest = [sy.VirtualWorker(hook, id=uid("fw2-s")) for _ in range(4)]
    _pick(monkeypatch, honest[0].id, honest[1].id)
    workers = [*honest, odd]
    values = {w.id: torch.tensor([0.5 * k, -1.0]) for k, w in enumerate(workers, start=1)}
    he = EncryptedAggregation(context=precise_ctx)
    got, err, _ = attempt(lambda: he.aggregate(_states(workers, values), {w.id: 0.2 for w in workers}))
    assert err is None, repr(err)
    total, failed = got
    assert list(failed) == [odd.id], failed
    expected = sum(values[w.id] for w in honest) / 4
    assert torch.allclose(total[0], expected, atol=1e-3), ("not what plain torch gives", total[0], expected)

"""Encrypted aggregation: clients encrypt their updates under the coordinator's public key.

Each round, every client encrypts n_k/N * (its flattened weights) under the
coordinator's CKKS context (or Paillier public key) on its own worker; the
ciphertexts move worker-to-worker to two aggregating clients, which add them
without being able to decrypt; only the two sums come back to the coordinator,
which decrypts one of them if both are byte-identical. The coordinator never
receives an individual update, and no worker ever holds the secret key.

Commitments (:mod:`veil.federated.he_commitments`): each client, as it
encrypts, commits to its ciphertext (SHA-256 of its wire encoding, bound to a
random round id and its client id); the coordinator fetches every commitment
before any ciphertext is handed over. Each aggregator checks the copies it was
handed and reports the clients whose copy is missing or does not match; those
clients are dropped and both aggregators sum the rest. So one client cannot
refuse a round (two different copies, a copy that cannot be handed over, an
old round's ciphertext: it alone is dropped), and an aggregator colluding with
a client cannot have it hand the other aggregator a ciphertext forged from the
ones the aggregator saw (the accomplice committed before it saw any).

Trust: an aggregating client could return another client's ciphertext instead
of the sum (the coordinator would decrypt and broadcast that update). So the
coordinator picks the two aggregators at random (``secrets``) among the
clients that encrypted, after they did; Paillier and CKKS additions are exact
and order-independent, so honest sums of the same committed ciphertexts have
the same wire encoding, and a difference refuses the round
(:class:`EncryptedAggregationError`, nothing decrypted): a substituted sum is
caught unless both aggregators collude. The coordinator is trusted not to
collude with a client. A federation of one has nothing to hide: its "sum" is
its own update, fetched and decrypted alone (no commitment). Otherwise a
majority (and at least two) of the clients the round started with must be in
the sum, or nothing is decrypted: clients dropped on purpose cannot leave one
update alone in it. So must a majority of those of positive weight: a client of
weight 0 (no samples) adds nothing to the sum, so hides no update in it
(:class:`_Quorum`). A client reported by both aggregators misbehaved (one
hostile aggregator cannot make the other report it); one reported by a single
aggregator may be an honest client that aggregator drops, so the sum must then
hold those majorities without the reporting aggregator's own update: an
aggregator and one accomplice cannot shrink the sum to a victim's update next
to theirs. So where dropping it is refused so (rounds of fewer than five
clients, or many one-sided reports), the reporter is handed the other aggregator's copy, which matched there, checks it
and sums it: one bad copy no longer refuses a small round (the client's
committed update is summed), while a reporter that rejects a verified copy
still refuses it. Each aggregator also checks every ciphertext's form (type,
size, key, Paillier exponent or CKKS scale: ``he_commitments.form_of``), so a client cannot
break the addition or broadcast a one-entry ciphertext into the sum. A client
may still commit to any ciphertext of that form (no proof that it knows the
plaintext), but not to one an aggregator saw: this round's were committed to
before any hand-over, and each round has fresh keys (``fresh_keys``: a Paillier
key pair, or a CKKS context of the given one's parameters), so an earlier
round's ciphertext, scaled or combined, is of another form. A round's keys live
in that round alone (:class:`_RoundKeys`): two rounds at once on one
``EncryptedAggregation`` each use their own, and nothing is left on the clients.

A client that fails while encrypting or committing is dropped (the sum is
renormalised over the survivors). Every ciphertext and commitment the round
made is freed at its end, whatever happened.

CKKS trusts the clients' ciphertexts more than Paillier does: a CKKS decryption
is ``c0 + c1*s``, and a client that crafts its ciphertext puts the secret key
into the released model (Li & Micciancio 2021). The coordinator refuses a sum
beyond ``value_bound`` and floods what it releases (:mod:`veil.he.flooding`),
which stops a gross probe, not one scaled into the model's own range: against
hostile clients, aggregate with Paillier (its decryption gives no such key).
With fresh keys, a key so recovered opens that round's ciphertexts only.

A refusal of the sum (beyond ``value_bound``, or non-finite) depends on every
client's values: a client that crafts its own entry near the limit learns
whether the others' sum passed a threshold it chose, one bit. A range check of
each update alone would need its decryption (the coordinator would see it) or
a proof of range per value; instead the refusal aborts ``fl.train`` with
nothing released, so that bit costs the whole training run, and is seen.
"""

from __future__ import annotations

import math
import secrets
import sys
import threading
import time
from secrets import token_hex
from dataclasses import dataclass, field
from typing import Any

import phe
import torch

from veil.exceptions import CommandCancelledError, CommandTimeoutError, VeilError, register_remote_error
from veil.federated import he_commitments
from veil.federated.pooled import CLIENT_FAILURES, error_text  # (a client failing so is dropped, as in training)
from veil.he import ckks, ckks_wire, flooding, paillier, value_free
from veil.he._paillier_encoding import DEFAULT_FLOAT_EXPONENT
from veil.he.ckks import CKKSContext, CKKSTensor
from veil.he.paillier import PaillierTensor
from veil.he.remote import HEPointer, ciphertext_bytes, key_fingerprint, worker_output_lineage  # (HE wire types)
from veil.ids import new_id
from veil.messaging.allowlist import ALLOWLIST, register_worker_function
from veil.messaging.messages import DeleteMessage, MoveMessage, ObjectMessage, ObjectRef, StoredObject
from veil.messaging.serde import encode_value
from veil.shapes import numel
from veil.tensors import remote_ops
from veil.workers import output_bounds


class EncryptedAggregationError(VeilError):
    """An encrypted round refused as a whole (the aggregators' sums differ, an aggregator failed, too few
    clients are left): nothing was decrypted."""


register_remote_error(EncryptedAggregationError)


ENCRYPT_STATE = "veil.fl.encrypt_state"


def _encrypt_state(worker: Any, state: list, weight: float, key: Any, out_id: int | list,
                   commit: list | None = None) -> None:
    """Stores Enc(weight * flattened state) under ``out_id``, or the same ciphertext under each of a list of
    two ids (one copy for each aggregating client); with ``commit=[round id, client id, digest id]``, also
    its commitment (:func:`he_commitments.commitment`, a uint8 tensor) under the digest id."""
    from veil.he import encrypt

    out_ids = out_id if type(out_id) is list else [out_id]
    if len(out_ids) > 2:
        raise TypeError("encrypted aggregation stores its ciphertext under one or two ids")
    if commit is not None and not (type(commit) is list and len(commit) == 3 and type(commit[0]) is str
                                   and type(commit[1]) is str and type(commit[2]) is int):
        raise TypeError("encrypted aggregation's commit is [round id, client id, digest id]")
    if type(weight) not in (int, float) or not math.isfinite(weight) or not all(
            isinstance(s, torch.Tensor) and not s.is_complex() for s in state):
        raise TypeError("encrypted aggregation needs real state tensors and a finite weight")
    _check_encryption_room(worker, state, key, len(out_ids))
    output_bounds.check_named_again(worker, ENCRYPT_STATE, state, 8)  # (its float64 copies and their concatenation)
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in state]) * float(weight)
    owner_derived = worker.monitor.request_reads_owner_data()  # (its success must not depend on the data)
    if owner_derived:
        flat = value_free.finite(flat)
    if isinstance(key, CKKSContext):
        if owner_derived:
            flat = value_free.ckks_clamped(
                flat, lambda bound: encrypt(torch.tensor([bound], dtype=torch.float64), protocol="ckks", context=key),
                "encrypted aggregation refused")
        enc = encrypt(flat, protocol="ckks", context=key)
    elif isinstance(key, phe.PaillierPublicKey):
        if not owner_derived:
            enc = encrypt(flat, protocol="paillier", public_key=key)
        else:  # at a fixed exponent, refused from the dtypes, the weight and the key alone if it could overflow
            biggest = max((value_free.largest(s.dtype) for s in state), default=0) * (math.ceil(abs(weight)) or 1)
            value_free.check_paillier_room(biggest, DEFAULT_FLOAT_EXPONENT, key,
                                           f"state computed from the owner's data, at weight {weight},")
            enc = encrypt(flat, protocol="paillier", public_key=key, exponent=DEFAULT_FLOAT_EXPONENT)
    else:
        raise TypeError("encrypted aggregation needs a CKKS context or a Paillier public key")
    stored = [worker.monitor.store_output(oid, enc) for oid in out_ids]
    digest = None
    if commit is not None:  # (of the bytes that leave: a digest of a ciphertext under fresh randomness)
        digest = worker.monitor.store_output(commit[2], he_commitments.as_tensor(
            he_commitments.commitment(commit[0], commit[1], enc)))
    if owner_derived:
        _record_lineage(worker, state, weight, enc, stored, digest)


def _check_encryption_room(worker: Any, state: list, key: Any, copies: int) -> None:
    """Refuses, before anything is encrypted, ciphertexts that would not fit the session's quota: a Paillier
    ciphertext per entry (184 bytes at a 512-bit key, 568 at 2048, for a 1-byte bool entry) or a CKKS one per
    ``slots`` entries, plus the float64 copy, were built whole before ``store_output`` refused them (red team,
    session 64: ~180-570x what the session held, seconds of CPU). From shapes and the key alone."""
    monitor = worker.monitor
    principal = monitor.current_principal()
    if principal is None or monitor.max_session_bytes is None:
        return
    count = sum(numel(s.shape) for s in state)
    if isinstance(key, phe.PaillierPublicKey):
        cipher = count * ciphertext_bytes(key.n.bit_length())
    elif isinstance(key, CKKSContext):  # a fresh ciphertext: two polynomials over the data level's primes
        parms = key.raw.seal_context().data.key_context_data().parms()
        per = 2 * parms.poly_modulus_degree() * max(1, len(parms.coeff_modulus()) - 1) * 8
        cipher = -(-count // key.slots) * per
    else:
        return  # (refused below)
    monitor.check_room(principal, 8 * count + copies * cipher, ENCRYPT_STATE)


def _record_lineage(worker: Any, state: list, weight: float, enc: Any, stored: list, digest: Any = None) -> None:
    """Governance (#16): the op graph the owner reviews before a ciphertext of the owner's data (or its
    commitment) leaves."""
    from veil.governance import provenance

    lineage, _, _ = worker_output_lineage(worker, ENCRYPT_STATE, state, stored[0])
    if lineage is None:
        return
    marks = ", ".join("\u00b7" for _ in lineage.node["inputs"])
    lineage.node["args"] = f"[{marks}] flattened, times {weight!r}, under {key_fingerprint(enc)}"
    lineage.node["label"] = f"encrypted state of {list(enc.shape)} under {key_fingerprint(enc)}"
    for entry in stored:
        provenance.stamp(entry, lineage, enc)
        entry.meta[provenance.GRAPH][entry.meta[provenance.ROOT]]["shape"] = list(enc.shape)
    if digest is not None:
        provenance.stamp(digest, lineage, digest.obj, " (SHA-256 commitment of it)")


register_worker_function(ENCRYPT_STATE, _encrypt_state, shapes="none")


@dataclass
class _RoundKeys:
    """One round's keys: the private half (a CKKS context with its secret key, or a Paillier private key), the
    public half the clients encrypt under, and where the public CKKS context is stored for the round."""

    private: Any
    public: Any
    stored: dict = field(default_factory=dict)  # worker id -> id of the round's public context there


@dataclass(frozen=True)
class _Quorum:
    """Who must be left in a round's sum for it to be decrypted: a majority (and at least two) of the clients it
    started with, and of those among them that weigh something: a client of weight 0 adds nothing to the sum,
    so hides no one's update in it (one dropped before the round counts as weighing something)."""

    started: int
    needed: int
    weights: dict
    weighty_started: int
    weighty_needed: int

    @classmethod
    def of(cls, started: int, weights: dict) -> "_Quorum":
        weighty = sum(w > 0 for w in weights.values()) + started - len(weights)
        return cls(started, 1 if started == 1 else max(2, started // 2 + 1), weights, weighty,
                   0 if weighty <= 1 else max(2, weighty // 2 + 1))

    def weighty(self, clients: list) -> list:
        return [w for w in clients if self.weights[w] > 0]


@dataclass
class EncryptedAggregation:
    """The coordinator's key material: ``EncryptedAggregation(context=ckks_ctx)`` or ``(public_key, private_key)``.

    Pass it as ``federated.train(..., encrypted_aggregation=EncryptedAggregation(...))``.
    """

    context: CKKSContext | None = None
    public_key: Any = None
    private_key: Any = None
    #: CKKS: the largest magnitude of any value of the model (parameters and buffers) the round averages. A
    #: decrypted average beyond it is refused: it is no honest sum, but a client's crafted ciphertext whose
    #: decryption would hand it the coordinator's secret key (Li & Micciancio 2021). Raise it for larger models.
    value_bound: float = 2.0**16
    #: seconds from a round's first encryption request after which clients not yet asked to encrypt are
    #: dropped (stalling clients hold a round no longer; one request still waits up to its transport's
    #: timeout): the round goes on if a majority encrypted, else is refused. None: no limit.
    round_seconds: float | None = 3600.0
    #: each round encrypts under fresh keys, so a ciphertext an aggregator saw in an earlier round cannot be
    #: handed in again, scaled or combined, as a client's update (it is under another key: both aggregators
    #: flag it). Paillier: a key pair of the given key's size, drawn under the round's deadline (~0.1 s at 2048 bits).
    #: CKKS: a context of the given one's ring, modulus chain and scale, without Galois keys (~0.1 s and a
    #: ~1.9 MB public context to each client a round at ring 8192; ~0.4 s and ~7.9 MB at 16384).
    fresh_keys: bool = True
    _public: CKKSContext | None = field(default=None, init=False, repr=False, compare=False)  # (fixed keys' copy)
    _public_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.context is None) == (self.public_key is None):
            raise ValueError("give either a CKKS context or a Paillier public/private key pair")
        if self.round_seconds is not None and not (isinstance(self.round_seconds, (int, float)) and
                                                   math.isfinite(self.round_seconds) and self.round_seconds > 0):
            raise ValueError("round_seconds must be a positive number of seconds (or None)")
        if self.context is not None and not self.context.has_secret_key:
            raise ValueError("the coordinator's CKKS context must hold the secret key (it decrypts the sum)")
        # (NaN or inf: `sum > value_bound * weight` never held, and any crafted sum, the key in it, was released)
        if isinstance(self.value_bound, bool) or not isinstance(self.value_bound, (int, float)) or \
                not 0 < self.value_bound <= sys.float_info.max:
            raise ValueError(f"value_bound must be a finite, positive number, not {repr(self.value_bound)[:40]}")

    def _keys_of_a_new_round(self, deadline: float | None = None) -> _RoundKeys:
        """The keys of a round about to start (fresh ones with ``fresh_keys``; a fresh Paillier pair stops at
        ``deadline``: seconds to minutes at 4096-16384 bits)."""
        if self.context is not None:
            if self.fresh_keys:
                private = ckks.fresh_like(self.context)
                public = private.public()
            else:  # one public copy for every round: the registry holds it weakly, so a copy of a round's own
                private = self.context  # would leave with that round and take a running round's entry with it
                with self._public_lock:
                    if self._public is None:
                        self._public = self.context.public()
                    public = self._public
            ckks_wire.remember(public)  # (the sums fetched back decode against it, in any process)
            return _RoundKeys(private, public)
        if self.fresh_keys:
            public, private = paillier.keygen(self.public_key.n.bit_length(), deadline=deadline)
            return _RoundKeys(private, public)
        return _RoundKeys(self.private_key, self.public_key)

    @staticmethod
    def _key_on(worker: Any, keys: _RoundKeys, made: list) -> Any:
        """What an encryption request names as its key: the round's public CKKS context, stored on ``worker``
        once a round (freed with the round's ciphertexts), or the Paillier public key itself (it is small)."""
        if not isinstance(keys.public, CKKSContext):
            return keys.public
        if worker.id not in keys.stored:
            oid = new_id()
            made.append((worker, oid))
            worker.hook.local_worker.send_msg(ObjectMessage([StoredObject(oid, keys.public)]), worker)
            keys.stored[worker.id] = oid
        return ObjectRef(keys.stored[worker.id])

    def aggregate(self, state_pointers: dict[str, list], weights: dict[str, float],
                  started: int | None = None, deadline: float | None = None
                  ) -> tuple[list[torch.Tensor] | None, dict[str, str]]:
        """The weighted sum of the clients' states, divided by the survivors' total weight when some failed.

        ``started``: how many clients the round started with (default: those given). Unless that is one (a
        federation of one has nothing to hide from its coordinator), a majority of them (and at least two)
        must be in the sum: clients dropped until one or two are left (failing on purpose, or refused by a
        hostile aggregator) would otherwise have the coordinator decrypt a lone update, or one an
        aggregator can subtract its own from. ``deadline`` (``time.monotonic()``, from ``fl.train``'s
        ``round_seconds``): no client is asked to encrypt past it or past ``round_seconds``, whichever comes first.

        A client whose ciphertext could not be handed to an aggregator, or does not match its commitment
        there, is dropped (in the returned dict); the others are summed.

        ``weights``: finite and not negative (ValueError otherwise); a client of weight 0 counts for nothing
        in the sum, as a Flower client reporting ``num_examples=0`` does, but is one of the round's clients.
        Survivors of total weight 0 refuse the round (their sum has no average).

        Returns ``(state or None if no client finished, {failed client: why})``. Raises
        :class:`EncryptedAggregationError` (nothing decrypted) when the aggregators' sums differ, an
        aggregator fails, too few clients are left, or clients reported by one aggregator alone would leave
        fewer than that majority besides the reporting aggregator.
        """
        ids = list(state_pointers)
        bad = [w for w in ids if type(weights[w]) not in (int, float) or not 0 <= weights[w] <= sys.float_info.max]
        if bad:
            raise ValueError(f"encrypted aggregation weights are finite numbers >= 0; client {bad[0]!r} has "
                             f"{repr(weights[bad[0]])[:40]}")
        started = len(ids) if started is None else max(int(started), len(ids))
        quorum = _Quorum.of(started, {w: weights[w] for w in ids})
        where = {wid: state_pointers[wid][0].location for wid in ids}
        size = sum(int(torch.Size(p.shape).numel()) for p in state_pointers[ids[0]])  # entries of every sum
        owner = where[ids[0]].hook.local_worker
        made: list = []  # (worker, id) of every ciphertext and commitment this round makes: freed in the finally
        failed: dict[str, str] = {}
        own = None if self.round_seconds is None else time.monotonic() + self.round_seconds
        if deadline is None or (own is not None and own < deadline):
            deadline, limit = own, f"round_seconds={self.round_seconds}"
        else:
            limit = "fl.train's round_seconds"
        late = f"not asked to encrypt: the round ran past {limit}"
        try:  # (this round's keys alone: never on self, which another round may share)
            keys = self._keys_of_a_new_round(deadline)
        except CommandTimeoutError as e:  # no client was asked to encrypt in time
            if isinstance(e, CommandCancelledError):  # (the command running the round was cancelled: not late)
                raise
            return None, {wid: late for wid in ids}
        try:
            copies = 2 if len(ids) > 1 else 1
            round_id = token_hex(16)  # binds the commitments to this round (no replay of an old one)
            encrypted: dict[str, list] = {}
            commitments: dict[str, bytes] = {}
            for wid in ids:
                if deadline is not None and time.monotonic() > deadline:
                    failed[wid] = late
                    continue
                outs = [new_id() for _ in range(copies)]
                digest_id = new_id()
                made += [(where[wid], o) for o in [*outs, digest_id]]
                try:
                    key = self._key_on(where[wid], keys, made)
                    commit = [round_id, wid, digest_id] if copies == 2 else None
                    remote_ops.call(ALLOWLIST.by_name(ENCRYPT_STATE),
                                    (state_pointers[wid], weights[wid], key, outs, *([commit] if commit else [])), {})
                    if commit:  # fetched before any ciphertext is handed over: nobody has seen another's yet
                        commitments[wid] = he_commitments.fetch(owner, where[wid], digest_id)
                    encrypted[wid] = outs
                except (*CLIENT_FAILURES, ValueError) as e:  # dropped, as a client failing to train is
                    failed[wid] = error_text(e)
            if not encrypted:
                return None, failed
            self._enough(list(encrypted), quorum, failed, late)
            if copies == 1:  # a federation of one: nothing to hide from the coordinator (the sum is its update)
                sums = [self._sum(where[ids[0]], owner, encrypted[ids[0]], made, size)]
                survivors = ids
            else:
                survivors, sums = self._committed_sums(owner, where, encrypted, commitments, round_id, made, size,
                                                       quorum, failed, keys)
            return self._decrypt(sums[0], state_pointers[ids[0]], [weights[w] for w in survivors], failed,
                                 keys), failed
        finally:
            self._free(owner, made)

    @staticmethod
    def _enough(left: list, quorum: _Quorum, failed: dict, late: str) -> None:
        unasked = sum(why == late for why in failed.values())
        why = f" ({unasked} {late})" if unasked else ""
        if len(left) < quorum.needed:
            raise EncryptedAggregationError(f"only {len(left)} of the {quorum.started} clients of the round are left "
                                            f"({quorum.needed} needed): their sum is not decrypted; round refused{why}")
        if len(quorum.weighty(left)) < quorum.weighty_needed:
            raise EncryptedAggregationError(
                f"only {len(quorum.weighty(left))} of the {quorum.weighty_started} clients of the round of positive "
                f"weight are left ({quorum.weighty_needed} needed; one of weight 0 hides no update): their sum is not "
                f"decrypted; round refused{why}")

    def _committed_sums(self, owner: Any, where: dict, encrypted: dict, commitments: dict, round_id: str,
                        made: list, size: int, quorum: _Quorum, failed: dict,
                        keys: _RoundKeys) -> tuple[list, list]:
        """Hands each client's copies to two aggregators picked now, has both check them against the
        commitments, drops the clients whose copy failed at either, and returns (survivors, the two sums)."""
        # chosen now, at random: no client knew beforehand that it would add the others' ciphertexts
        pair = secrets.SystemRandom().sample(list(encrypted), 2)
        held: dict[str, dict] = {a: {} for a in pair}  # aggregator -> {client: the ciphertext id it holds}
        bad: dict[str, dict] = {a: {} for a in pair}  # aggregator -> {client: why its copy there failed}
        for wid, outs in encrypted.items():
            for a, cid in zip(pair, outs):
                try:
                    held[a][wid] = self._hand_over(owner, where[wid], cid, where[a], made) if a != wid else cid
                except CLIENT_FAILURES as e:  # the sender's fault, or the aggregator's refusal: see below
                    bad[a][wid] = f"its ciphertext could not be handed to an aggregating client ({error_text(e)})"
        form = self._form(size, keys)
        for a in pair:
            try:
                for wid in he_commitments.mismatches(where[a], round_id, held[a], commitments, form):
                    bad[a][wid] = "its ciphertext at an aggregating client does not match its commitment or the round"
            except (*CLIENT_FAILURES, ValueError) as e:
                raise EncryptedAggregationError(f"an aggregating client failed checking the commitments; round "
                                                f"refused, nothing decrypted ({error_text(e)})") from None
        everyone = [wid for wid in encrypted if wid not in failed]
        if self._one_sided_drop_refused(pair, bad, everyone, quorum.needed) or \
                self._one_sided_drop_refused(pair, bad, quorum.weighty(everyone), quorum.weighty_needed):
            return self._repaired_sums(owner, where, pair, held, bad, round_id, commitments, made, size, everyone,
                                       quorum, failed, keys)
        for a in pair:
            failed.update({wid: why for wid, why in bad[a].items() if wid not in failed})
        survivors = [wid for wid in encrypted if wid not in failed]
        self._enough(survivors, quorum, failed, "")
        try:
            sums = [self._sum(where[a], owner, [held[a][w] for w in survivors], made, size) for a in pair]
        except CLIENT_FAILURES as e:
            raise EncryptedAggregationError(f"an aggregating client failed; round refused, nothing "
                                            f"decrypted ({error_text(e)})") from None
        self._same(sums)
        return survivors, sums

    @staticmethod
    def _same(sums: list) -> None:
        # both added the same committed ciphertexts: honest sums are byte-identical (exact, order-independent
        # additions); a difference means an aggregator returned something else, so nothing is decrypted
        if encode_value(sums[0]) != encode_value(sums[1]):
            raise EncryptedAggregationError(
                "the two aggregated sums differ (an aggregating client did not follow the protocol); round "
                "refused, nothing decrypted")

    @staticmethod
    def _one_sided_drop_refused(pair: list, bad: dict, clients: list, needed: int) -> bool:
        """Whether dropping the clients one aggregator alone reports would leave fewer than ``needed`` of
        ``clients`` (all, or those of positive weight) beside it: its word alone (with an accomplice, to leave a
        victim's update alone with theirs) must not shrink the sum so far."""
        survivors = [w for w in clients if w not in bad[pair[0]] and w not in bad[pair[1]]]
        return any(set(bad[a]) - set(bad[other]) and len([w for w in survivors if w != a]) < needed
                   for a, other in (pair, pair[::-1]))

    def _repaired_sums(self, owner: Any, where: dict, pair: list, held: dict, bad: dict, round_id: str,
                       commitments: dict, made: list, size: int, everyone: list, quorum: _Quorum,
                       failed: dict, keys: _RoundKeys) -> tuple[list, list]:
        """Sums in a round too small to drop a client on one aggregator's word: each aggregator adds the copies
        it verified, hands the other the ones that other reported (they matched here), and adds those it gets
        once it has checked them itself. Only clients both reported are dropped; so one client's bad copy no
        longer refuses a small round (its committed update is summed), while an aggregator that reports a copy
        the other verified again refuses it, as before (nothing decrypted)."""
        a, b = pair
        both = set(bad[a]) & set(bad[b])
        failed.update({wid: bad[a][wid] for wid in both if wid not in failed})
        survivors = [wid for wid in everyone if wid not in both]
        self._enough(survivors, quorum, failed, "")
        form = self._form(size, keys)
        try:
            totals = {x: self._add(where[x], [held[x][w] for w in survivors if w not in bad[x]], made) for x in pair}
            handed: dict = {a: {}, b: {}}  # receiving aggregator -> {client: the copy it was handed}
            for x, y in (pair, pair[::-1]):
                for wid in survivors:
                    if wid in bad[y]:  # (x verified it; moved after x added it)
                        handed[y][wid] = self._hand_over(owner, where[x], held[x][wid], where[y], made)
            for y in pair:
                if handed[y] and he_commitments.mismatches(where[y], round_id, handed[y], commitments, form):
                    raise EncryptedAggregationError(
                        "an aggregating client reported a client's copy the other verified; round refused, nothing "
                        "decrypted")
                totals[y] = self._add(where[y], [t for t in [totals[y], *handed[y].values()] if t is not None],
                                      made)
            sums = [self._fetch_sum(where[x], owner, totals[x], size) for x in pair]
        except (*CLIENT_FAILURES, ValueError) as e:
            if isinstance(e, EncryptedAggregationError):
                raise
            raise EncryptedAggregationError(f"an aggregating client failed; round refused, nothing "
                                            f"decrypted ({error_text(e)})") from None
        self._same(sums)
        return survivors, sums

    @staticmethod
    def _form(size: int, keys: _RoundKeys) -> list:
        """The form of every honest ciphertext of a round (``he_commitments.form_of``)."""
        if isinstance(keys.public, CKKSContext):
            return ["ckks", [size], he_commitments.key_name(keys.public.key_id),
                    he_commitments.ckks_scale_name(keys.public.global_scale) if size else None]
        return ["paillier", [size], he_commitments.key_name(keys.public.n), DEFAULT_FLOAT_EXPONENT]

    def _hand_over(self, owner: Any, source: Any, cid: int, aggregator: Any, made: list) -> int:
        """Moves ciphertext ``cid`` straight from its client to an aggregating client (not through us)."""
        moved = new_id()
        made.append((aggregator, moved))
        owner.send_msg(MoveMessage([cid], aggregator.id, [moved]), source)
        return moved

    def _sum(self, worker: Any, owner: Any, cipher_ids: list, made: list, size: int) -> Any:
        """The aggregating client adds the ciphertexts it holds; returns the sum (a copy, fetched)."""
        return self._fetch_sum(worker, owner, self._add(worker, cipher_ids, made), size)

    @staticmethod
    def _add(worker: Any, cipher_ids: list, made: list) -> int | None:
        """Has ``worker`` add the ciphertexts it holds under ``cipher_ids``; the id of their sum (None: none)."""
        if not cipher_ids:
            return None
        total = cipher_ids[0]
        for cid in cipher_ids[1:]:
            out = new_id()
            made.append((worker, out))
            remote_ops.call(ALLOWLIST.by_name("veil.he.op"), ("add", ObjectRef(total), ObjectRef(cid), out), {},
                            location=worker)
            total = out
        return total

    def _fetch_sum(self, worker: Any, owner: Any, total: int | None, size: int) -> Any:
        """The sum ``worker`` holds under ``total`` (a copy), its type and shape checked."""
        if total is None:
            raise EncryptedAggregationError(f"aggregating client {worker.id!r} holds nothing to sum; round refused")
        pointer = HEPointer(worker, owner, total, "he", ())
        pointer.mark_freed()  # (freed with the others in aggregate's finally)
        got = pointer.fetch(delete=False)[0]
        expected = CKKSTensor if self.context is not None else PaillierTensor
        if type(got) is not expected or tuple(got.shape) != (size,):  # before any comparison or decryption (a
            raise EncryptedAggregationError(  # decryption per entry: an oversized sum would cost minutes)
                f"aggregating client {worker.id!r} returned a {type(got).__name__} of shape "
                f"{tuple(getattr(got, 'shape', ()))[:4]} for a {expected.__name__} of shape ({size},); round refused, "
                "nothing decrypted")
        return got

    def _decrypt(self, total: Any, like: list, weights: list, failed: dict, keys: _RoundKeys) -> list[torch.Tensor]:
        expected = CKKSTensor if self.context is not None else PaillierTensor
        if not isinstance(total, expected):
            raise EncryptedAggregationError(f"the aggregated sum is a {type(total).__name__}, not a "
                                            f"{expected.__name__}; round refused")
        if not sum(weights) > 0:  # (their sum divided by 0 was a NaN model)
            raise EncryptedAggregationError("the clients left in the sum hold no weight (0 samples in all): "
                                            "nothing to average; round refused, nothing decrypted")
        flat = total.decrypt(keys.private).reshape(-1)
        sizes = [int(torch.Size(p.shape).numel()) for p in like]
        if flat.numel() != sum(sizes) or not torch.isfinite(flat).all():
            raise EncryptedAggregationError("the decrypted sum has the wrong size or non-finite entries; round "
                                            "refused")
        if self.context is not None:
            flat = self._checked_and_flooded(flat, weights)
        if failed:  # the survivors' weights no longer sum to 1
            flat = flat / sum(weights)
        return [part.reshape(p.shape).to(p.dtype) for part, p in zip(flat.split(sizes), like)]

    def _checked_and_flooded(self, flat: torch.Tensor, weights: list) -> torch.Tensor:
        """A CKKS decryption as it may leave the coordinator (every client gets it as the next model): refused
        beyond what honest clients' values can sum to (a client's crafted ciphertext), and flooded
        (:mod:`veil.he.flooding`: the sum's own noise depends on the secret key)."""
        if flat.numel() and float(flat.abs().max()) > self.value_bound * sum(weights):
            raise EncryptedAggregationError(f"the decrypted sum exceeds the value bound ({self.value_bound:g} times "
                                            "the clients' weight): a crafted ciphertext, or raise value_bound; "
                                            "round refused, nothing released")
        return flat.to(torch.float64) + flooding.gaussian(flat.numel(), flooding.sigma(self.context.global_scale))

    @staticmethod
    def _free(owner: Any, made: list) -> None:
        """Frees the round's ciphertexts, one request per worker (ids already moved or freed are ignored)."""
        by_worker: dict[int, tuple] = {}
        for worker, oid in made:
            by_worker.setdefault(id(worker), (worker, []))[1].append(oid)
        for worker, oids in by_worker.values():
            try:
                owner.send_msg(DeleteMessage(oids), worker)
            except CLIENT_FAILURES:  # a client gone holds nothing we can reach
                pass

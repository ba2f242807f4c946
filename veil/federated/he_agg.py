"""Encrypted aggregation: clients encrypt their updates under the coordinator's public key.

Each round, every client encrypts n_k/N * (its flattened weights) under the
coordinator's CKKS context (or Paillier public key) on its own worker; the
ciphertexts move worker-to-worker to one aggregating client, which adds them
without being able to decrypt; only the sum comes back to the coordinator,
which decrypts it. The coordinator never receives an individual update, and no
worker ever holds the secret key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import phe
import torch

from veil.he import value_free
from veil.he._paillier_encoding import DEFAULT_FLOAT_EXPONENT
from veil.he.ckks import CKKSContext
from veil.he.remote import HEPointer, send_encrypted  # noqa: F401  (registers HE wire types)
from veil.ids import new_id
from veil.messaging.allowlist import ALLOWLIST, register_worker_function
from veil.messaging.messages import MoveMessage, ObjectMessage, StoredObject
from veil.tensors import remote_ops


def _encrypt_state(worker: Any, state: list, weight: float, key: Any, out_id: int) -> None:
    from veil.he import encrypt

    if type(weight) not in (int, float) or not math.isfinite(weight) or not all(
            isinstance(s, torch.Tensor) and not s.is_complex() for s in state):
        raise TypeError("encrypted aggregation needs real state tensors and a finite weight")
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
    worker.monitor.store_output(out_id, enc)


register_worker_function("veil.fl.encrypt_state", _encrypt_state, shapes="none")


@dataclass
class EncryptedAggregation:
    """The coordinator's key material: ``EncryptedAggregation(context=ckks_ctx)`` or ``(public_key, private_key)``.

    Pass it as ``federated.train(..., encrypted_aggregation=EncryptedAggregation(...))``.
    """

    context: CKKSContext | None = None
    public_key: Any = None
    private_key: Any = None
    _key_ids: dict = field(default_factory=dict)  # worker id -> id of the public key material stored there

    def __post_init__(self) -> None:
        if (self.context is None) == (self.public_key is None):
            raise ValueError("give either a CKKS context or a Paillier public/private key pair")
        if self.context is not None and not self.context.has_secret_key:
            raise ValueError("the coordinator's CKKS context must hold the secret key (it decrypts the sum)")

    def _public(self) -> Any:
        return self.context.public() if self.context is not None else self.public_key

    def _key_on(self, worker: Any) -> int:
        if worker.id not in self._key_ids:
            oid = new_id()
            material = self._public()
            if isinstance(material, CKKSContext):
                worker.hook.local_worker.send_msg(ObjectMessage([StoredObject(oid, material)]), worker)
            else:  # a Paillier public key is small: it travels with each command instead
                oid = 0
            self._key_ids[worker.id] = oid
        return self._key_ids[worker.id]

    def aggregate(self, state_pointers: dict[str, list], weights: dict[str, float]) -> list[torch.Tensor]:
        from veil.messaging.messages import ObjectRef

        ids = list(state_pointers)
        aggregator = state_pointers[ids[0]][0].location
        owner = aggregator.hook.local_worker
        cipher_ids = []
        for wid in ids:
            state = state_pointers[wid]
            location = state[0].location
            key_id = self._key_on(location)
            key = ObjectRef(key_id) if key_id else self.public_key
            out = new_id()
            remote_ops.call(ALLOWLIST.by_name("veil.fl.encrypt_state"), (state, weights[wid], key, out), {})
            if location is not aggregator:  # straight to the aggregating client, not through us
                moved = new_id()
                owner.send_msg(MoveMessage([out], aggregator.id, [moved]), location)
                out = moved
            cipher_ids.append(out)
        total = HEPointer(aggregator, owner, cipher_ids[0], "he", ())
        for cid in cipher_ids[1:]:
            total = total + HEPointer(aggregator, owner, cid, "he", ())
        flat = total.get().decrypt(self.context if self.context is not None else self.private_key)
        out, offset = [], 0
        for p in state_pointers[ids[0]]:
            n = int(torch.Size(p.shape).numel())
            out.append(flat[offset:offset + n].reshape(p.shape).to(p.dtype))
            offset += n
        return out
